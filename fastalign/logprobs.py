"""`token_logprobs`: per-token log-probs (selective log-softmax) with entropy and TRL's extra
fields, in one pass over the vocabulary.

Registered as the torch.library ops `fastalign::token_logprobs_forward` and
`fastalign::token_logprobs_backward` (fake implementations for torch.compile, autograd through
`register_autograd`). Each op body picks its backend at run time: Triton for CUDA tensors, the
C++ kernels for CPU tensors, the reference PyTorch otherwise or when forced (see `backend.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._checks import check_label_range, check_token_logprobs_args, flat_labels, values_checkable
from .backend import current_backend, resolve
from .types import TokenLogprobs
from .vocab_parallel import is_vocab_sharded, local_shard, vocab_parallel_fields

def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastalign::token_logprobs_forward", mutates_args=())
def token_logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
    with_entropy: bool,
    with_log_sum_sq_probs: bool,
    with_mean_logits: bool,
    with_is_top1: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, T, V] (any strides), labels [B*T] int64 -> (logps, entropy, log_sum_sq_probs,
    mean_logits, is_top1, norm), each [B*T] or [0] when not asked for; norm is [B*T, 2], each row's
    softmax normalizer (shift, log_s) that the backward takes (reference/logprobs.py: row_normalizer)."""
    backend, forward = resolve("token_logprobs_forward", logits=logits)
    if logits.device.type == "cpu" and backend != "native":
        check_label_range(labels, logits.shape[-1], ignore_index)  # the C++ kernel checks its own
    return forward(
        logits, labels, temperature, logit_scale, softcap, ignore_index,
        with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1,
    )


@token_logprobs_forward.register_fake
def _(logits, labels, temperature, logit_scale, softcap, ignore_index,
      with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1):
    n = labels.shape[0]
    acc = _acc_dtype(logits)

    def sized(wanted: bool, dtype: torch.dtype = acc) -> torch.Tensor:
        return logits.new_empty(n if wanted else 0, dtype=dtype)

    return (
        sized(True), sized(with_entropy), sized(with_log_sum_sq_probs), sized(with_mean_logits),
        sized(with_is_top1, torch.bool), logits.new_empty((n, 2), dtype=acc),
    )


@torch.library.custom_op("fastalign::token_logprobs_backward", mutates_args=())
def token_logprobs_backward(
    grad_logps: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    norm: torch.Tensor,
    entropy: torch.Tensor | None,
    temperature: float,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    """Gradient w.r.t. logits [B, T, V] (contiguous, logits' dtype); `backend` is the one the forward used."""
    _, backward = resolve("token_logprobs_backward", backend, logits=logits)
    return backward(
        grad_logps, grad_entropy, logits, labels, norm, entropy, temperature, logit_scale, softcap, ignore_index
    )


@token_logprobs_backward.register_fake
def _(grad_logps, grad_entropy, logits, labels, norm, entropy, temperature, logit_scale, softcap, ignore_index,
      backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, logit_scale, softcap, ignore_index, with_entropy, *_ = inputs
    logps, entropy, log_sum_sq_probs, mean_logits, is_top1, norm = output
    ctx.save_for_backward(logits, labels, norm, entropy if with_entropy else None)
    ctx.params = (temperature, logit_scale, softcap, ignore_index)
    # Backward runs on the backend the forward ran on, even if it is called outside `use_backend`.
    ctx.backend = current_backend()
    ctx.mark_non_differentiable(log_sum_sq_probs, mean_logits, is_top1, norm)


def _backward(ctx, grad_logps, grad_entropy, *_unused):
    logits, labels, norm, entropy = ctx.saved_tensors
    if entropy is None:
        grad_entropy = None
    if grad_logps is not None:
        grad_logps = grad_logps.float() if grad_logps.dtype != torch.float64 else grad_logps
    if grad_entropy is not None:
        grad_entropy = grad_entropy.float() if grad_entropy.dtype != torch.float64 else grad_entropy
    grad = None
    if ctx.needs_input_grad[0]:
        grad = token_logprobs_backward(grad_logps, grad_entropy, logits, labels, norm, entropy, *ctx.params,
                                       ctx.backend)
    return grad, None, None, None, None, None, None, None, None, None


token_logprobs_forward.register_autograd(_backward, setup_context=_setup_context)


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """A [B, T, V] view of logits [..., V] without copying whenever the strides allow it."""
    if logits.dim() == 1:
        return logits.view(1, 1, -1)
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    if logits.dim() == 3:
        return logits
    lead = logits.shape[:-2]
    strides = logits.stride()[:-2]
    mergeable = all(strides[i] == strides[i + 1] * lead[i + 1] for i in range(len(lead) - 1))
    if mergeable:
        return logits.flatten(0, -3)
    # The leading dims cannot be merged without a copy (rare: a permuted batch of batches). Their
    # count is spelled out: with an empty dim, -1 would be ambiguous.
    return logits.reshape(math.prod(lead), logits.shape[-2], logits.shape[-1])


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    mask: torch.Tensor | None = None,
    outputs: Sequence[str] = (),
    process_group=None,
) -> TokenLogprobs:
    """Per-token log p(label) from logits, in one pass over the vocabulary.

    Args:
        logits: `[..., V]` float32/bfloat16/float16 (float64 for gradcheck), any strides:
            `model(...).logits[:, :-1]` is read in place, never copied.
        labels: `[...]` int64 or int32, values in `[0, V)` or `ignore_index`.
        temperature: logits are divided by it (> 0), after `logit_scale` and `softcap`.
        ignore_index: label value whose position yields 0 and no gradient.
        logit_scale: multiplies the logits first (a model's `logit_scale`).
        softcap: `cap * tanh(z / cap)` after the scale (Gemma's `final_logit_softcapping`); None = off.
        mask: optional `[...]`; positions where it is 0/False are ignored like `ignore_index`.
        outputs: extra fields among "entropy", "log_sum_sq_probs", "mean_logits", "is_top1",
            each computed in the same pass only when asked for.
        process_group: tensor parallelism with the vocabulary sharded: `logits` is this rank's slice
            `[..., V_r]` and the group's ranks hold the slices in rank order; `labels` are global
            token ids. A DTensor `logits` sharded along the vocabulary (`Shard(-1)`) needs no group.
            Every rank gets the whole vocabulary's fields (one all-gather of a few numbers per
            token; `[N, V]` is never gathered) and the gradient of its own slice.

    Returns:
        TokenLogprobs: `logps` and the requested fields shaped like `labels`, fp32 (bool for
        `is_top1`); log-probs and entropy are differentiable.

    A label outside `[0, V)` other than `ignore_index` raises ValueError for CPU tensors; on CUDA
    the kernels never read out of bounds and give NaN for that position (no device sync).
    """
    shard = None
    if process_group is not None or is_vocab_sharded(logits):
        logits, shard = local_shard(logits, process_group)
        labels, mask = (t.to_local() if hasattr(t, "to_local") else t for t in (labels, mask))
    temperature, logit_scale, softcap_value, wanted = check_token_logprobs_args(
        logits, labels, temperature, ignore_index, logit_scale, softcap, mask, outputs
    )
    leading = labels.shape
    if mask is not None:
        labels = labels.masked_fill(mask == 0, ignore_index)
    rows = _as_rows(logits)
    label_rows = flat_labels(labels)
    if shard is not None:
        if values_checkable(label_rows):
            check_label_range(label_rows, shard.vocab_size, ignore_index)
        logps, entropy, log_sum_sq_probs, mean_logits, is_top1 = vocab_parallel_fields(
            rows, label_rows, shard, temperature, logit_scale, softcap_value, ignore_index, wanted
        )
    else:
        logps, entropy, log_sum_sq_probs, mean_logits, is_top1, _ = token_logprobs_forward(
            rows, label_rows, temperature, logit_scale, softcap_value, ignore_index,
            "entropy" in wanted, "log_sum_sq_probs" in wanted, "mean_logits" in wanted, "is_top1" in wanted,
        )

    def field(name: str, value: torch.Tensor) -> torch.Tensor | None:
        return value.view(leading) if name in wanted else None

    return TokenLogprobs(
        logps=logps.view(leading),
        entropy=field("entropy", entropy),
        log_sum_sq_probs=field("log_sum_sq_probs", log_sum_sq_probs),
        mean_logits=field("mean_logits", mean_logits),
        is_top1=field("is_top1", is_top1),
    )
