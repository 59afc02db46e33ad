"""What TRL's distillation trainers call for their divergence, served by fastalign.

* `DistillationTrainer` (TRL 1.16, stable): its `_chunked_divergence_loss` looks up
  `ChunkedDivergenceFunction` in `trl.trainer.distillation_trainer` at every call and calls
  `.apply(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
  teacher_bias, beta, temperature, student_logit_scale, student_softcap, teacher_logit_scale,
  teacher_softcap)` for (per-token divergence, per-token student entropy), fp32. `ChunkedDivergence`
  answers with `fastalign.linear_token_divergence`; TRL's masking, reductions and logging stay.
* `GKDTrainer` (experimental): its static `generalized_jsd_loss(student_logits, teacher_logits,
  labels, beta, temperature, reduction, num_items_in_batch)` on both models' logits is replaced
  by `generalized_jsd_loss` here, on `fastalign.token_divergence`, with TRL's reductions.
"""

from __future__ import annotations

import torch

from ...divergence import token_divergence
from ...linear_divergence import linear_token_divergence


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _softcap(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected None or a positive cap, got {value!r} (fastalign does not guess)")
    return float(value)


class ChunkedDivergence:
    """Stands in for `trl.kernels.chunked_divergence.ChunkedDivergenceFunction` (only `.apply`)."""

    @staticmethod
    def apply(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, beta,
              temperature=1.0, student_logit_scale=1.0, student_final_logit_softcapping=None, teacher_logit_scale=1.0,
              teacher_final_logit_softcapping=None):
        s_dtype, t_dtype = _compute_dtype(student_hidden), _compute_dtype(teacher_hidden)
        # The kernels read both models' logits in one dtype: the wider of the two compute dtypes.
        dtype = torch.promote_types(s_dtype, t_dtype)
        with torch.autocast(student_hidden.device.type, enabled=False):
            # As TRL's function: the gradient reaches the student only.
            out = linear_token_divergence(
                student_hidden.to(dtype), student_weight.to(dtype), teacher_hidden.detach().to(dtype),
                teacher_weight.detach().to(dtype),
                student_bias=None if student_bias is None else student_bias.to(dtype),
                teacher_bias=None if teacher_bias is None else teacher_bias.detach().to(dtype),
                divergence="jsd", beta=float(beta), temperature=temperature, student_logit_scale=student_logit_scale,
                student_softcap=_softcap("student_final_logit_softcapping", student_final_logit_softcapping),
                teacher_logit_scale=teacher_logit_scale,
                teacher_softcap=_softcap("teacher_final_logit_softcapping", teacher_final_logit_softcapping),
                outputs=("entropy",),
            )
        return out.divergence.float(), out.entropy.float()


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL GKDTrainer.generalized_jsd_loss on fastalign: the same value and student gradient.

    TRL's reductions act on the per-vocabulary-entry tensor [B, T, V] (or [n, V] after the label
    mask): "sum" sums it, "mean" divides by its element count (V included), "batchmean" divides
    by the counted tokens (by B without labels), `num_items_in_batch` overrides them all.
    "none" (the per-entry tensor itself) has no fused form and is refused."""
    if reduction not in ("batchmean", "sum", "mean"):
        raise ValueError(f"reduction: fastalign serves 'batchmean', 'sum' and 'mean', got {reduction!r}")
    mask = None if labels is None else labels != -100
    per_token = token_divergence(student_logits, teacher_logits.detach(), beta=float(beta), temperature=temperature,
                                 mask=mask).divergence
    total = per_token.sum()
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    vocab = student_logits.shape[-1]
    if reduction == "sum":
        return total
    if reduction == "mean":
        count = mask.sum() * vocab if mask is not None else per_token.numel() * vocab
        return total / count
    denominator = mask.sum().clamp_min(1) if mask is not None else max(student_logits.shape[0], 1)
    return total / denominator
