"""`linear_token_divergence`: `token_divergence` between a student and a teacher given as hidden
states and lm_head weights, neither model's `[N, V]` logits ever existing in memory.

Blocks of the counted tokens go through both heads (`h @ W.T + b`, each model with its own hidden
width; only V must match) into two buffers of one block each, and the op `token_divergence_forward`
(on the backend in force) reads them. Backward recomputes each block's logits and turns the op's
gradient into the hidden states', the weight's and the bias' (fp32 accumulation), for the student
and, if its tensors require grad, the teacher. Peak extra memory: two blocks of logits, their
gradient, and the fp32 weight-gradient accumulator.
"""

from __future__ import annotations

import math

import torch

from .backend import current_backend
from .divergence import (
    TokenDivergence,
    checked_options,
    token_divergence_backward,
    token_divergence_forward,
    valid_positions,
)
from .linear_blocked import _BlockLogits, _rows_per_block, accumulate_product
from .linear_logprobs import gather_sharded
from .reference.divergence import swapped


def _check_head(prefix: str, hidden: object, weight: object, bias: object, vocab: int | None = None) -> None:
    for name, value in ((f"{prefix}_hidden", hidden), (f"{prefix}_weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}_hidden: expected hidden states [..., H], got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight: expected the lm_head weight [V, {hidden.shape[-1]}] (H from "
                         f"{prefix}_hidden), got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}_weight: the vocabulary dimension (V, the first) is empty")
    if vocab is not None and weight.shape[0] != vocab:
        raise ValueError(f"{prefix}_weight: expected the student's vocabulary V = {vocab}, got {weight.shape[0]} rows")
    if weight.device != hidden.device or weight.dtype != hidden.dtype:
        raise ValueError(f"{prefix}_weight: expected {hidden.dtype} on {hidden.device} ({prefix}_hidden's), got "
                         f"{weight.dtype} on {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}_bias: expected a tensor of shape ({weight.shape[0]},) or None, got "
                             f"{tuple(getattr(bias, 'shape', ())) or type(bias).__name__}")
        if bias.device != hidden.device or bias.dtype != hidden.dtype:
            raise ValueError(f"{prefix}_bias: expected {hidden.dtype} on {hidden.device}, got {bias.dtype} on "
                             f"{bias.device}")


def check_heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias) -> None:
    """Both models' hidden states and lm_heads: each consistent, one vocabulary, the same positions."""
    _check_head("student", student_hidden, student_weight, student_bias)
    _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, vocab=student_weight.shape[0])
    leading = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != leading:
        raise ValueError(f"teacher_hidden: expected leading dims {tuple(leading)} (the student's positions), got "
                         f"{tuple(teacher_hidden.shape[:-1])}")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden: expected a tensor on {student_hidden.device}, got {teacher_hidden.device}")
    if teacher_hidden.dtype != student_hidden.dtype:
        raise ValueError(f"teacher_hidden: expected {student_hidden.dtype} (the student's dtype: the kernels read both "
                         f"models' logits in one dtype), got {teacher_hidden.dtype}")


class _LinearTokenDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, rows, params, with_entropy, block):
        kind, beta, w_t, w_s, temperature, s_scale, s_cap, t_scale, t_cap = params
        n = hs.shape[0]
        acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
        value = torch.zeros(n, dtype=acc, device=hs.device)
        entropy = torch.zeros(n if with_entropy else 0, dtype=acc, device=hs.device)
        stats = torch.zeros(n, 6, dtype=acc, device=hs.device)
        step = max(1, min(block, rows.numel()))
        student_logits, teacher_logits = _BlockLogits(step, ws, bs), _BlockLogits(step, wt, bt)
        for start in range(0, rows.numel(), step):
            idx = rows[start:start + step]
            zs, zt = student_logits(hs.index_select(0, idx)), teacher_logits(ht.index_select(0, idx))
            ones = torch.ones(idx.numel(), dtype=torch.bool, device=hs.device)
            v, e, st = token_divergence_forward(zs, zt, ones, *params, with_entropy)
            value.index_copy_(0, idx, v.to(acc))
            if with_entropy:
                entropy.index_copy_(0, idx, e.to(acc))
            stats.index_copy_(0, idx, st.to(acc))
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, rows, stats)
        ctx.params, ctx.block, ctx.backend = params, block, current_backend()
        ctx.mark_non_differentiable(entropy)
        return value, entropy

    @staticmethod
    def backward(ctx, grad_value, _grad_entropy):
        hs, ws, bs, ht, wt, bt, rows, stats = ctx.saved_tensors
        kind, beta, w_t, w_s, temperature, s_scale, s_cap, t_scale, t_cap = ctx.params
        needs = ctx.needs_input_grad
        student, teacher = any(needs[:3]), any(needs[3:6])
        if grad_value is None or not (student or teacher):
            return (None,) * 10
        acc = stats.dtype
        grad_value = grad_value.to(acc)

        def zeros(like, needed):
            return torch.zeros(like.shape, dtype=acc, device=like.device) if needed else None

        g_hs, g_ws, g_bs = zeros(hs, needs[0]), zeros(ws, needs[1]), zeros(bs, needs[2] and bs.numel() > 0)
        g_ht, g_wt, g_bt = zeros(ht, needs[3]), zeros(wt, needs[4]), zeros(bt, needs[5] and bt.numel() > 0)
        step = max(1, min(ctx.block, rows.numel()))
        student_logits, teacher_logits = _BlockLogits(step, ws, bs), _BlockLogits(step, wt, bt)
        teacher_stats = stats[:, [2, 3, 0, 1, 5, 4]]
        for start in range(0, rows.numel(), step):
            idx = rows[start:start + step]
            h_s, h_t = hs.index_select(0, idx), ht.index_select(0, idx)
            zs, zt = student_logits(h_s), teacher_logits(h_t)
            ones = torch.ones(idx.numel(), dtype=torch.bool, device=hs.device)
            g = grad_value.index_select(0, idx)
            for on, z1, z2, st, kind_params, transform, (gh, gw, gb), h, w in (
                (student, zs, zt, stats, (kind, beta, w_t, w_s), (s_scale, s_cap, t_scale, t_cap), (g_hs, g_ws, g_bs),
                 h_s, ws),
                (teacher, zt, zs, teacher_stats, swapped(kind, beta, w_t, w_s), (t_scale, t_cap, s_scale, s_cap),
                 (g_ht, g_wt, g_bt), h_t, wt),
            ):
                if not on:
                    continue
                dz = token_divergence_backward(g, z1, z2, ones, st.index_select(0, idx).contiguous(), *kind_params,
                                               temperature, *transform, ctx.backend)[0]
                if gh is not None:
                    block = torch.zeros(idx.numel(), gh.shape[1], dtype=acc, device=gh.device)
                    accumulate_product(block, dz, w)
                    gh.index_add_(0, idx, block)
                if gw is not None:
                    accumulate_product(gw, dz.t(), h)
                if gb is not None:
                    gb += dz.sum(0, dtype=acc)

        def cast(grad, like):
            return None if grad is None else grad.to(like.dtype)

        return (cast(g_hs, hs), cast(g_ws, ws), cast(g_bs, bs), cast(g_ht, ht), cast(g_wt, wt), cast(g_bt, bt),
                None, None, None, None)


def linear_token_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "jsd",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    outputs=(),
    rows_per_block: int | None = None,
) -> TokenDivergence:
    """`token_divergence(student_hidden @ student_weight.T + student_bias, teacher_hidden @
    teacher_weight.T + teacher_bias, ...)` without either model's logits.

    Args:
        student_hidden: `[..., H_s]`; student_weight: `[V, H_s]` (student_bias `[V]`).
        teacher_hidden: `[..., H_t]` with the student's leading dims; teacher_weight: `[V, H_t]`
            (teacher_bias `[V]`): the teacher's width may differ, the vocabulary may not.
        divergence ... outputs: as `token_divergence`; only the counted positions are projected.
        rows_per_block: tokens per block (default: about 8M logits a block).

    Each block's logits are rounded to the hidden states' dtype, as `hidden @ weight.T` is. An
    FSDP2-sharded weight or bias (a DTensor) is gathered, differentiably.
    """
    student_weight, student_bias = gather_sharded(student_weight), gather_sharded(student_bias)
    teacher_weight, teacher_bias = gather_sharded(teacher_weight), gather_sharded(teacher_bias)
    check_heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    leading = student_hidden.shape[:-1]
    params, with_entropy = checked_options(divergence, beta, skew, temperature, student_logit_scale, student_softcap,
                                           teacher_logit_scale, teacher_softcap, outputs, "linear_token_divergence")
    if rows_per_block is not None and (isinstance(rows_per_block, bool) or not isinstance(rows_per_block, int)
                                       or rows_per_block < 1):
        raise ValueError(f"rows_per_block: expected an integer >= 1, got {rows_per_block!r}")
    valid = valid_positions(leading, student_hidden.device, mask, labels, ignore_index)
    rows = valid.nonzero().squeeze(1)
    n = math.prod(leading)
    empty = student_hidden.new_empty(0)
    value, entropy = _LinearTokenDivergence.apply(
        student_hidden.reshape(n, -1), student_weight, empty if student_bias is None else student_bias,
        teacher_hidden.reshape(n, -1), teacher_weight, empty if teacher_bias is None else teacher_bias, rows, params,
        with_entropy, rows_per_block or _rows_per_block(student_weight.shape[0]),
    )
    return TokenDivergence(value.view(leading), entropy.view(leading) if with_entropy else None)


def linear_divergence_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    weights: torch.Tensor,
    params: tuple,
    with_entropy: bool,
    rows_per_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss = sum(weights * divergence), divergence, entropy), the student's gradients formed in the
    forward: each block's logits gradient is taken while both blocks of logits are still in their
    buffers, so the backward recomputes nothing (three matmul-equivalents for the student instead
    of five, no teacher matmul in backward). `weights` [N] are the per-token weights of the
    reduction (0 where a position does not count); the teacher gets no gradient."""
    from .policy import _PrecomputedGradients

    n = weights.shape[0]
    hs, ht = student_hidden.reshape(n, -1), teacher_hidden.reshape(n, -1)
    ws, wt = student_weight.detach(), teacher_weight.detach()
    empty = hs.new_empty(0)
    bs = empty if student_bias is None else student_bias.detach()
    bt = empty if teacher_bias is None else teacher_bias.detach()
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    need_h, need_w = student_hidden.requires_grad, student_weight.requires_grad
    need_b = student_bias is not None and student_bias.requires_grad
    value = torch.zeros(n, dtype=acc, device=hs.device)
    entropy = torch.zeros(n if with_entropy else 0, dtype=acc, device=hs.device)
    g_h = torch.zeros(hs.shape if need_h else (0,), dtype=acc, device=hs.device)
    g_w = torch.zeros(ws.shape if need_w else (0,), dtype=acc, device=hs.device)
    g_b = torch.zeros(bs.shape if need_b else (0,), dtype=acc, device=hs.device)
    weights = weights.detach().to(acc)
    rows = (weights != 0).nonzero().squeeze(1)
    block = rows_per_block or _rows_per_block(ws.shape[0])
    step = max(1, min(block, rows.numel()))
    student_logits, teacher_logits = _BlockLogits(step, ws, bs), _BlockLogits(step, wt, bt)
    backend = current_backend()
    with torch.no_grad():
        for start in range(0, rows.numel(), step):
            idx = rows[start:start + step]
            h_s = hs.detach().index_select(0, idx)
            zs, zt = student_logits(h_s), teacher_logits(ht.detach().index_select(0, idx))
            ones = torch.ones(idx.numel(), dtype=torch.bool, device=hs.device)
            v, e, st = token_divergence_forward(zs, zt, ones, *params, with_entropy)
            value.index_copy_(0, idx, v.to(acc))
            if with_entropy:
                entropy.index_copy_(0, idx, e.to(acc))
            if not (need_h or need_w or need_b):
                continue
            dz = token_divergence_backward(weights.index_select(0, idx), zs, zt, ones, st, *params, backend)[0]
            if need_h:
                part = torch.zeros(idx.numel(), g_h.shape[1], dtype=acc, device=hs.device)
                accumulate_product(part, dz, ws)
                g_h.index_add_(0, idx, part)
            if need_w:
                accumulate_product(g_w, dz.t(), h_s)
            if need_b:
                g_b += dz.sum(0, dtype=acc)
    loss = (weights * value).sum()
    if need_h or need_w or need_b:
        loss = _PrecomputedGradients.apply(
            loss, student_hidden, student_weight, student_bias if student_bias is not None else empty,
            g_h.to(hs.dtype), g_w.to(ws.dtype), g_b.to(bs.dtype) if need_b else g_b,
        )
    return loss, value, entropy
