"""`linear_token_logprobs`: per-token log-probs (and entropy, TRL's extra fields) straight from
hidden states and the lm_head weight; the [N, V] logits never exist.

Ops `fastalign::linear_token_logprobs_forward` / `_backward` (fake implementations, autograd via
`register_autograd`), served like every op: Triton for CUDA tensors (`kernels/linear_logprobs.py`:
tiled matmul with an online logsumexp over vocabulary tiles), blocks of tokens through ATen
matmuls and the C++ row kernels on CPU (`linear_blocked.py`), the unfused reference otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import torch

from ._checks import FLOAT_DTYPES, check_label_range, check_token_logprobs_args, flat_labels, values_checkable
from .backend import current_backend, resolve
from .types import TokenLogprobs
from .zero3 import full_shape, gathered, is_zero3_param


def _acc(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastalign::linear_token_logprobs_forward", mutates_args=())
def linear_token_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
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
    """hidden [N, H], weight [V, H], bias [V] or [0], labels [N] -> token_logprobs_forward's outputs."""
    _, forward = resolve("linear_token_logprobs_forward", hidden=hidden)
    if hidden.device.type == "cpu":
        check_label_range(labels, weight.shape[0], ignore_index)
    return forward(
        hidden, weight, bias, labels, temperature, logit_scale, softcap, ignore_index,
        with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1,
    )


@linear_token_logprobs_forward.register_fake
def _(hidden, weight, bias, labels, temperature, logit_scale, softcap, ignore_index,
      with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1):
    n = labels.shape[0]
    acc = _acc(hidden)

    def sized(wanted, dtype=acc):
        return hidden.new_empty(n if wanted else 0, dtype=dtype)

    return (sized(True), sized(with_entropy), sized(with_log_sum_sq_probs), sized(with_mean_logits),
            sized(with_is_top1, torch.bool), hidden.new_empty((n, 2), dtype=acc))


@torch.library.custom_op("fastalign::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward(
    grad_logps: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    norm: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
    backend: str,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden [N, H], grad_weight [V, H], grad_bias [V] or [0]) on the forward's backend.
    A gradient nobody needs is not computed and comes back as [0]: grad_hidden without
    `need_hidden`, grad_weight and grad_bias without `need_weight` (a frozen lm_head: one matmul
    and a [V, H] fp32 accumulator saved)."""
    _, backward = resolve("linear_token_logprobs_backward", backend, hidden=hidden)
    return backward(
        grad_logps, grad_entropy, hidden, weight, bias, labels, norm, entropy,
        temperature, logit_scale, softcap, ignore_index, need_hidden, need_weight,
    )


@linear_token_logprobs_backward.register_fake
def _(grad_logps, grad_entropy, hidden, weight, bias, labels, norm, entropy, temperature, logit_scale, softcap,
      ignore_index, backend, need_hidden, need_weight):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_weight else bias.new_empty(0))


# (gather, weight, bias) while linear_token_logprobs runs with weight_gather: the backward enters
# gather() and reads those tensors again, instead of keeping the forward's whole weight alive.
_BACKWARD_GATHER: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("fastalign_backward_gather",
                                                                                 default=None)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, logit_scale, softcap, ignore_index, with_entropy, *_ = inputs
    logps, entropy, _, _, _, norm = output
    ctx.regather = _BACKWARD_GATHER.get()
    ctx.has_bias = bias.numel() != 0
    if ctx.regather is not None:
        weight, bias = weight.new_empty(0), bias.new_empty(0)
    ctx.save_for_backward(hidden, weight, bias, labels, norm, entropy)
    ctx.params = (temperature, logit_scale, softcap, ignore_index)
    ctx.with_entropy = with_entropy
    ctx.backend = current_backend()
    ctx.mark_non_differentiable(*output[2:])


def _backward(ctx, grad_logps, grad_entropy, *_unused):
    hidden, weight, bias, labels, norm, entropy = ctx.saved_tensors
    if not ctx.with_entropy:
        grad_entropy = None
    acc = _acc(hidden)
    grad_logps = None if grad_logps is None else grad_logps.to(acc)
    grad_entropy = None if grad_entropy is None else grad_entropy.to(acc)
    if grad_logps is None and grad_entropy is None:
        return (None,) * 12
    need_hidden = ctx.needs_input_grad[0]
    need_weight = ctx.needs_input_grad[1] or (ctx.needs_input_grad[2] and ctx.has_bias)
    if not (need_hidden or need_weight):
        return (None,) * 12
    gather = contextlib.nullcontext()
    if ctx.regather is not None:
        gather, weight, bias = ctx.regather[0](), ctx.regather[1], ctx.regather[2]
        bias = hidden.new_empty(0) if bias is None else bias
    with gather:
        grad_hidden, grad_weight, grad_bias = linear_token_logprobs_backward(
            grad_logps, grad_entropy, hidden, weight, bias, labels, norm, entropy, *ctx.params, ctx.backend,
            need_hidden, need_weight,
        )
    return (
        grad_hidden if ctx.needs_input_grad[0] else None,
        grad_weight if ctx.needs_input_grad[1] else None,
        grad_bias if ctx.needs_input_grad[2] and ctx.has_bias else None,
        *(None,) * 9,
    )


linear_token_logprobs_forward.register_autograd(_backward, setup_context=_setup_context)


def gather_sharded(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor (an FSDP2 parameter read outside its module's forward) as the full tensor,
    gathered differentiably; anything else as is.

    Each rank's gradient of the gathered weight comes from its own tokens, so it is marked a
    partial average: backward reduce-scatters it like FSDP's own gradient reduction (a plain
    full_tensor() would keep each rank's local part unreduced)."""
    try:
        from torch.distributed.tensor import DTensor, Partial
    except ImportError:  # pragma: no cover - torch built without distributed
        return t
    if not isinstance(t, DTensor):
        return t
    return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)


def check_linear_args(hidden, weight, bias, labels):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise TypeError("hidden: expected a tensor of hidden states [..., H]")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden: expected a float32, bfloat16, float16 or float64 tensor, got {hidden.dtype}")
    # A ZeRO-3 parameter is checked by its whole shape: it is gathered only where it is read.
    shape = full_shape(weight) if isinstance(weight, torch.Tensor) else None
    if shape is None or len(shape) != 2:
        raise ValueError(f"weight: expected the lm_head weight [V, H], got {getattr(weight, 'shape', weight)}")
    if shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[-1]}] (H = hidden.shape[-1]), got {tuple(shape)}")
    if shape[0] == 0:
        raise ValueError(f"weight: the vocabulary dimension (first) is empty, got shape {tuple(shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} (the hidden states'), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected a tensor on {hidden.device} (the hidden states'), got {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(full_shape(bias)) != (shape[0],):
            raise ValueError(f"bias: expected shape ({shape[0]},) (V), got {getattr(bias, 'shape', bias)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"bias: expected {hidden.dtype} on {hidden.device}, got {bias.dtype} on {bias.device}")


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    mask: torch.Tensor | None = None,
    outputs: Sequence[str] = (),
    process_group=None,
    weight_gather=None,
) -> TokenLogprobs:
    """`token_logprobs(hidden @ weight.T + bias, labels, ...)` without the logits.

    Args:
        hidden: `[..., H]` hidden states (the last layer's output, after the final norm).
        weight: `[V, H]` lm_head weight (a view is fine: tied embeddings pass the embedding matrix).
        labels: `[...]` int64/int32 in `[0, V)` or `ignore_index`; ignored positions cost no matmul.
        bias, temperature, ignore_index, logit_scale, softcap, mask, outputs: as `token_logprobs`.
        process_group: tensor parallelism with the lm_head split by rows (Megatron's vocabulary-
            parallel head, `ColwiseParallel`): `weight` [V_r, H] (and `bias`) are this rank's rows
            (plain, or a DTensor sharded along dim 0), the ranks hold them in rank order, `hidden`
            is the same on every rank and `labels` are global token ids. Each rank forms only its
            slice of the logits, block by block; one all-gather of a few numbers per token combines
            the fields, and backward all-reduces grad_hidden. Without it a DTensor weight is an
            FSDP2 parameter, gathered whole.
        weight_gather: a function returning a context manager in which `weight` and `bias` are
            whole; the forward runs in it and the backward enters it again to read them, instead of
            keeping them alive in between. DeepSpeed ZeRO-3 parameters need none: they are
            recognized and gathered this way (`deepspeed.zero.GatheredParameters`).

    Returns:
        TokenLogprobs shaped like `labels`; log-probs and entropy are differentiable w.r.t.
        hidden, weight and bias (gradients accumulate into existing `.grad` as usual).
    """
    if weight_gather is None and process_group is None and (is_zero3_param(weight) or is_zero3_param(bias)):
        def weight_gather():
            return gathered(weight, bias)
    if weight_gather is not None:
        if not callable(weight_gather):
            raise TypeError(f"weight_gather: expected a function returning a context manager, got "
                            f"{type(weight_gather).__name__}")
        with weight_gather():
            token = _BACKWARD_GATHER.set((weight_gather, weight, bias))
            try:
                return _linear_token_logprobs(hidden, weight, labels, bias, temperature, ignore_index, logit_scale,
                                              softcap, mask, outputs, process_group)
            finally:
                _BACKWARD_GATHER.reset(token)
    return _linear_token_logprobs(hidden, weight, labels, bias, temperature, ignore_index, logit_scale, softcap, mask,
                                  outputs, process_group)


def _linear_token_logprobs(hidden, weight, labels, bias, temperature, ignore_index, logit_scale, softcap, mask, outputs,
                           process_group):
    shard = None
    if process_group is not None:
        from .vocab_parallel import row_shard

        weight, bias, shard = row_shard(weight, bias, process_group)
    else:
        weight, bias = gather_sharded(weight), gather_sharded(bias)
    check_linear_args(hidden, weight, bias, labels)
    # A stand-in for the logits that never exist (a broadcast view, no memory), so the shared
    # checks name labels, mask and options exactly as token_logprobs does.
    probe = hidden.new_empty((1,) * hidden.dim()).expand(*hidden.shape[:-1], weight.shape[0])
    temperature, logit_scale, softcap_value, wanted = check_token_logprobs_args(
        probe, labels, temperature, ignore_index, logit_scale, softcap, mask, outputs
    )
    leading = labels.shape
    if mask is not None:
        labels = labels.masked_fill(mask == 0, ignore_index)
    flat_hidden = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])
    label_rows = flat_labels(labels)
    bias_t = bias if bias is not None else hidden.new_empty(0)
    if shard is not None:
        from .vocab_parallel import vocab_parallel_linear_fields

        if values_checkable(label_rows):
            check_label_range(label_rows, shard.vocab_size, ignore_index)
        logps, entropy, log_sum_sq, mean, top1 = vocab_parallel_linear_fields(
            flat_hidden, weight, bias_t, label_rows, shard, temperature, logit_scale, softcap_value, ignore_index,
            wanted,
        )
    else:
        logps, entropy, log_sum_sq, mean, top1, _ = linear_token_logprobs_forward(
            flat_hidden, weight, bias_t, label_rows, temperature, logit_scale, softcap_value, ignore_index,
            "entropy" in wanted, "log_sum_sq_probs" in wanted, "mean_logits" in wanted, "is_top1" in wanted,
        )

    def field(name, value):
        return value.view(leading) if name in wanted else None

    return TokenLogprobs(
        logps=logps.view(leading),
        entropy=field("entropy", entropy),
        log_sum_sq_probs=field("log_sum_sq_probs", log_sum_sq),
        mean_logits=field("mean_logits", mean),
        is_top1=field("is_top1", top1),
    )
