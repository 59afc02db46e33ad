"""Token-level policy objectives from logits in one pass: the op `fastalign::policy_token_forward`.

The op reads each row of logits once and returns the token's log-prob and entropy together with
the gradient of the whole loss w.r.t. that row (`fastalign/token_objective.py` describes the
objective; the weights carry the aggregation). The loss value and every metric are then computed
from those log-probs by `fastalign.policy_objective` (a few elementwise ops on [B, T]), and the
gradient is handed to autograd as is: backward never reads the logits again.

Objectives that are not token-local (GSPO's sequence ratio, the top-entropy-quantile mask,
off-policy sequence masking) need every log-prob before any gradient exists; they take the two
passes of `token_logprobs` (forward, then backward) with the same math in between.
"""

from __future__ import annotations

import math
import os

import torch

from ._checks import check_label_range, flat_labels
from .backend import resolve
from .logprobs import _acc_dtype, _as_rows
from .policy_objective import objective
from .token_objective import TokenObjective


@torch.library.custom_op("fastalign::policy_token_forward", mutates_args=())
def policy_token_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    w_pg: torch.Tensor,
    w_kl: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
    surrogate: int,
    kl: int,
    params: list[float],
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, T, V] (any strides), labels and the per-token vectors [B*T] (absent ones [0]) ->
    (logps, entropy, grad w.r.t. logits [B, T, V] contiguous or [0], norm)."""
    _, forward = resolve("policy_token_forward", logits=logits)
    if labels.numel() == 0:
        # No token (completions of length 0): every per-token vector is [0], present or not, so
        # the kernels' "absent" marker is ambiguous; there is nothing to compute anyway.
        acc = _acc_dtype(logits)
        grad = torch.zeros(logits.shape if with_grad else (0,), dtype=logits.dtype, device=logits.device)
        empty = logits.new_empty(0, dtype=acc)
        return empty, empty.clone(), grad, logits.new_empty((0, 2), dtype=acc)
    if logits.device.type == "cpu":
        check_label_range(labels, logits.shape[-1], ignore_index)
    return forward(
        logits, labels, old_logps, ref_logps, advantages, w_pg, w_kl, grad_entropy,
        temperature, logit_scale, softcap, ignore_index, surrogate, kl, params, with_grad,
    )


@policy_token_forward.register_fake
def _(logits, labels, old_logps, ref_logps, advantages, w_pg, w_kl, grad_entropy,
      temperature, logit_scale, softcap, ignore_index, surrogate, kl, params, with_grad):
    n = labels.shape[0]
    acc = _acc_dtype(logits)
    grad = torch.empty(logits.shape if with_grad else (0,), dtype=logits.dtype, device=logits.device)
    return logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc), grad, logits.new_empty((n, 2), dtype=acc)


def _refuse_second_derivative() -> None:
    # Grad mode is on inside a backward only under create_graph=True, the first step of every
    # double backward. The gradient came out of the forward kernel with no graph of its own: passed
    # on, a Hessian-vector product through it would silently drop the loss's term.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fastalign: no second derivative for a loss computed in one pass (grpo_loss and ppo_loss with a "
            "token-level objective, and distillation_loss from hidden states, write their gradient in the forward "
            "pass): backward with create_graph=True, double backward and Hessian-vector products through it are "
            "not supported"
        )


class _PrecomputedGradient(torch.autograd.Function):
    """A loss value whose gradient w.r.t. `logits` was produced by the forward kernel."""

    @staticmethod
    def forward(ctx, loss, logits, grad):
        ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        _refuse_second_derivative()
        (grad,) = ctx.saved_tensors
        grad = grad.view(ctx.shape)
        # loss.backward() passes exactly 1: skip a pass over the gradient (eager only: reading the
        # value would break a compiled graph).
        if torch.compiler.is_compiling() or not bool(grad_output == 1):
            grad = grad * grad_output.to(grad.dtype)
        return None, grad, None


def _flat(value: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
    """A per-token tensor broadcast to `shape`, as a contiguous [N] vector for the kernels."""
    if value is None:
        return None
    return torch.broadcast_to(value.detach().to(dtype), shape).reshape(-1).contiguous()


def fused_objective(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    obj: TokenObjective,
    w_pg: torch.Tensor,
    w_kl: torch.Tensor | None,
    w_entropy: torch.Tensor | None,
    temperature: float,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(pieces of `reference.objective` with a differentiable "loss", logps, entropy) in one pass.

    `labels` already hold `ignore_index` wherever the token does not count; logps and entropy come
    back shaped like `labels`, detached (the gradient travels with the loss)."""
    shape = labels.shape
    # The op sits outside autograd: its gradient output reaches `logits` through _PrecomputedGradient.
    rows = _as_rows(logits.detach())
    acc = _acc_dtype(logits)
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    empty = logits.new_empty(0, dtype=acc)

    def vector(value):
        flat = _flat(value, shape, acc)
        return empty if flat is None else flat

    surrogate, kl, params = obj.kernel_args()
    grad_entropy = None if w_entropy is None else -w_entropy
    logps, entropy, grad, _ = policy_token_forward(
        rows, flat_labels(labels), vector(old_logps), vector(ref_logps), vector(advantages),
        vector(w_pg), vector(w_kl), vector(grad_entropy), temperature, logit_scale, softcap, ignore_index,
        surrogate, kl, params, with_grad,
    )
    logps, entropy = logps.view(shape), entropy.view(shape)
    with torch.no_grad():
        pieces = objective(
            logps, old_logps, ref_logps, advantages, obj, w_pg, w_kl, entropy, w_entropy
        )
    if with_grad:
        pieces["loss"] = _PrecomputedGradient.apply(pieces["loss"], logits, grad)
    return pieces, logps, entropy


@torch.library.custom_op("fastalign::linear_policy_token_forward", mutates_args=())
def linear_policy_token_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    w_pg: torch.Tensor,
    w_kl: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
    surrogate: int,
    kl: int,
    params: list[float],
    with_grad: bool,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`policy_token_forward` from hidden [N, H] and weight [V, H]: (logps, entropy, grad_hidden,
    grad_weight, grad_bias, norm); the gradients are [0] without `with_grad`, grad_hidden without
    `need_hidden`, grad_weight and grad_bias without `need_weight` (a frozen lm_head: no
    weight-gradient matmul, no [V, H] accumulator)."""
    _, forward = resolve("linear_policy_token_forward", hidden=hidden)
    if hidden.device.type == "cpu":
        check_label_range(labels, weight.shape[0], ignore_index)
    return forward(
        hidden, weight, bias, labels, old_logps, ref_logps, advantages, w_pg, w_kl, grad_entropy,
        temperature, logit_scale, softcap, ignore_index, surrogate, kl, params, with_grad, need_hidden, need_weight,
    )


@linear_policy_token_forward.register_fake
def _(hidden, weight, bias, labels, old_logps, ref_logps, advantages, w_pg, w_kl, grad_entropy,
      temperature, logit_scale, softcap, ignore_index, surrogate, kl, params, with_grad, need_hidden, need_weight):
    n = labels.shape[0]
    acc = _acc_dtype(hidden)

    def like(t, needed):
        return torch.empty_like(t) if with_grad and needed else t.new_empty(0)

    vec = [hidden.new_empty(n, dtype=acc) for _ in range(2)]
    norm = hidden.new_empty((n, 2), dtype=acc)
    return vec[0], vec[1], like(hidden, need_hidden), like(weight, need_weight), like(bias, need_weight), norm


class _PrecomputedGradients(torch.autograd.Function):
    """A loss value whose gradients w.r.t. hidden, weight and bias the forward already produced."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.hidden_shape = hidden.shape
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        _refuse_second_derivative()
        grads = list(ctx.saved_tensors)
        if torch.compiler.is_compiling() or not bool(grad_output == 1):
            grads = [g * grad_output.to(g.dtype) for g in grads]
        # A gradient the forward skipped (a frozen input) is [0]: none reaches autograd.
        grad_hidden = grads[0].view(ctx.hidden_shape) if ctx.needs_input_grad[1] else None
        grad_weight = grads[1] if ctx.needs_input_grad[2] else None
        grad_bias = grads[2] if grads[2].numel() and ctx.needs_input_grad[3] else None
        return None, grad_hidden, grad_weight, grad_bias, None, None, None


# A token-local objective from hidden states (GRPO / PPO at token level) runs one of two ways:
#   "blocked": blocks of tokens, logits = h @ W.T per block, then the policy pass writes the
#              block's logits gradient over its logits, and grad_h / grad_W are formed at once:
#              three matmul-equivalents, one [rows, V] buffer (C++ with ATen matmuls; Triton with
#              cuBLAS);
#   "tiled":   linear_token_logprobs' forward, then its backward through autograd: four
#              matmul-equivalents, no [rows, V] buffer.
# Read at each call; FASTALIGN_LINEAR_POLICY sets it. bench_linear_logprobs times both (impls
# native / native-tiled, triton / triton-tiled). "blocked" measured faster on CPU at both
# benchmark shapes; on CUDA the choice awaits a GPU run of that benchmark.
LINEAR_POLICY_PASS = os.environ.get("FASTALIGN_LINEAR_POLICY", "blocked")


def fused_linear_supported(hidden: torch.Tensor) -> bool:
    """Whether a token-local objective from `hidden` takes the three-matmul policy pass (every
    backend provides it) or the two passes of `linear_token_logprobs`."""
    if LINEAR_POLICY_PASS not in ("blocked", "tiled"):
        raise ValueError(f"FASTALIGN_LINEAR_POLICY: expected 'blocked' or 'tiled', got {LINEAR_POLICY_PASS!r}")
    return LINEAR_POLICY_PASS == "blocked"


def fused_linear_objective(
    hidden, weight, bias, labels, *, old_logps, ref_logps, advantages, obj, w_pg, w_kl, w_entropy,
    temperature, logit_scale, softcap, ignore_index,
):
    """`fused_objective` from hidden states: the gradients w.r.t. hidden, weight and bias come out
    of the forward (three matmul-equivalents, no recomputation in backward)."""
    shape = labels.shape
    acc = _acc_dtype(hidden)
    grad_on = torch.is_grad_enabled()
    need_hidden = grad_on and hidden.requires_grad
    need_weight = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    with_grad = need_hidden or need_weight
    empty = hidden.new_empty(0, dtype=acc)

    def vector(value):
        flat = _flat(value, shape, acc)
        return empty if flat is None else flat

    surrogate, kl, params = obj.kernel_args()
    grad_entropy = None if w_entropy is None else -w_entropy
    bias_t = bias.detach() if bias is not None else hidden.new_empty(0)
    logps, entropy, grad_hidden, grad_weight, grad_bias, _ = linear_policy_token_forward(
        hidden.detach().reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1]), weight.detach(), bias_t,
        flat_labels(labels),
        vector(old_logps), vector(ref_logps), vector(advantages), vector(w_pg), vector(w_kl), vector(grad_entropy),
        temperature, logit_scale, softcap, ignore_index, surrogate, kl, params, with_grad, need_hidden, need_weight,
    )
    logps, entropy = logps.view(shape), entropy.view(shape)
    with torch.no_grad():
        pieces = objective(logps, old_logps, ref_logps, advantages, obj, w_pg, w_kl, entropy, w_entropy)
    if with_grad:
        bias_leaf = bias if bias is not None else hidden.new_empty(0)
        pieces["loss"] = _PrecomputedGradients.apply(
            pieces["loss"], hidden, weight, bias_leaf, grad_hidden, grad_weight, grad_bias
        )
    return pieces, logps, entropy


def policy_token_fields(logits, labels, lm_head, mask, transform,
                        vocab_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies) [B, T] of the tokens `mask` counts (0 elsewhere, whatever the label
    there), from `logits` or from `lm_head` = (hidden, weight, bias); differentiable. `vocab_group`:
    the logits or the lm_head rows are this rank's slice of the vocabulary."""
    from .policy_inputs import POLICY_IGNORE_INDEX

    temperature, logit_scale, softcap = transform
    options = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap or None, mask=mask,
                   outputs=("entropy",), ignore_index=POLICY_IGNORE_INDEX, process_group=vocab_group)
    if lm_head is not None:
        from .linear_logprobs import linear_token_logprobs

        hidden, weight, bias = lm_head
        fields = linear_token_logprobs(hidden, weight, labels, bias=bias, **options)
    else:
        from .logprobs import token_logprobs

        fields = token_logprobs(logits, labels, **options)
    return fields.logps, fields.entropy


def run_objective(
    *,
    logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    lm_head: tuple | None = None,
    logps: torch.Tensor | None,
    entropies: torch.Tensor | None,
    mask: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    obj: TokenObjective,
    w_pg: torch.Tensor,
    w_kl: torch.Tensor | None,
    w_entropy: torch.Tensor | None,
    transform: tuple[float, float, float],
    adjust=None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """The objective at either input level: (pieces with a differentiable "loss", logps, entropies).

    From logits with `adjust=None` (a token-local objective) this is one fused pass. Otherwise the
    log-probs come first (from `token_logprobs` when given logits), then
    `adjust(logps, entropies) -> (w_pg, w_entropy, log_ratio or None)` may reweight tokens or set a
    sequence-level log-ratio from them, and autograd carries the gradient back through the same
    math (`token_logprobs`' backward reads the logits a second time)."""
    from .policy_inputs import POLICY_IGNORE_INDEX
    from .vocab_parallel import is_vocab_sharded

    temperature, logit_scale, softcap = transform
    if lm_head is not None:
        hidden, weight, bias = lm_head
        if adjust is None and fused_linear_supported(hidden):
            from .zero3 import gathered

            masked_labels = labels.masked_fill(mask == 0, POLICY_IGNORE_INDEX)
            # The weight gradient comes out of the forward: a ZeRO-3 weight is gathered for it alone.
            with gathered(weight, bias):
                return fused_linear_objective(
                    hidden, weight, bias, masked_labels, old_logps=old_logps, ref_logps=ref_logps,
                    advantages=advantages, obj=obj, w_pg=w_pg, w_kl=w_kl, w_entropy=w_entropy, temperature=temperature,
                    logit_scale=logit_scale, softcap=softcap, ignore_index=POLICY_IGNORE_INDEX,
                )
        logps, entropies = policy_token_fields(None, labels, lm_head, mask, transform)
    if logits is not None and adjust is None and not is_vocab_sharded(logits):
        ignore_index = POLICY_IGNORE_INDEX
        masked_labels = labels.masked_fill(mask == 0, ignore_index)
        return fused_objective(
            logits, masked_labels, old_logps=old_logps, ref_logps=ref_logps, advantages=advantages, obj=obj,
            w_pg=w_pg, w_kl=w_kl, w_entropy=w_entropy, temperature=temperature, logit_scale=logit_scale,
            softcap=softcap, ignore_index=ignore_index,
        )
    if logits is not None:
        logps, entropies = policy_token_fields(logits, labels, None, mask, transform)
    log_ratio_ = None
    if adjust is not None:
        w_pg, w_entropy, log_ratio_ = adjust(logps, entropies)
    pieces = objective(
        logps, old_logps, ref_logps, advantages, obj, w_pg, w_kl, entropies, w_entropy, log_ratio_
    )
    return pieces, logps, entropies
