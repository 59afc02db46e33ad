"""What TRL's fused LM head calls, served by `fastalign.linear_token_logprobs`.

TRL 1.16's `add_fused_lm_head` (used by its DPO, GRPO, KTO, RLOO and SFT trainers, for the policy
and the reference model) looks up `trl.trainer.utils._ChunkedLogProbFunction` at every call and
calls its `.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
outputs)`. `FastalignChunkedLogProb` answers that call with the same five outputs (fp32 log-probs,
entropy, log_sum_sq_probs, mean_logits, is_top1; a field not asked for is None), gradients for
hidden, weight and bias through log-probs and entropy."""

from __future__ import annotations

import torch

from ...linear_logprobs import linear_token_logprobs

# The optional fields of TRL's ChunkedLogProbFunction, in its output order; it always returns log-probs first.
FIELDS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
IGNORE_INDEX = -100


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    # As TRL's function: the autocast dtype when autocast is on, else the hidden states' dtype.
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class FastalignChunkedLogProb:
    """Stands in for `trl.kernels.ChunkedLogProbFunction` (only `.apply` is called)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=FIELDS):
        # Under DeepSpeed ZeRO-3 TRL calls this inside its gather of the lm_head; linear_token_logprobs
        # recognizes the ZeRO-3 parameters and gathers them again for its backward (fastalign/zero3.py).
        cap = final_logit_softcapping
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float))):
            raise TypeError(f"final_logit_softcapping: expected None or a positive number, got {type(cap).__name__}")
        if cap is not None and not cap > 0:
            raise ValueError(
                f"final_logit_softcapping: expected None or a positive cap, got {final_logit_softcapping} "
                "(TRL would cap at 1.0 here; fastalign does not guess)"
            )
        unknown = [name for name in outputs if name not in FIELDS and name != "log_probs"]
        if unknown:
            raise ValueError(f"outputs: unknown field(s) {unknown}; expected names from {('log_probs',) + FIELDS}")
        wanted = tuple(name for name in FIELDS if name in outputs)
        dtype = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            out = linear_token_logprobs(
                hidden.to(dtype), weight.to(dtype), targets, bias=None if bias is None else bias.to(dtype),
                temperature=temperature, softcap=final_logit_softcapping, logit_scale=logit_scale,
                ignore_index=IGNORE_INDEX, outputs=wanted,
            )
        fields = (out.logps, out.entropy, out.log_sum_sq_probs, out.mean_logits, out.is_top1)
        # TRL's outputs are fp32 whatever the compute dtype; fastalign's op keeps fp64 for fp64 inputs, so
        # those are cast to match TRL.
        return tuple(x if x is None or x.dtype in (torch.float32, torch.bool) else x.float() for x in fields)
