"""Student-teacher divergences per token in plain PyTorch (the ground truth), and the adapter to the
op contract of `fastalign::token_divergence_forward` / `_backward`.

Per row, each model's logits go through its own transform (`logprobs.transform_logits`: its
logit scale, then its softcap, then the shared temperature), giving log p_s (the student) and
log p_t (the teacher). The divergences, in the parameters the kernels take (kind, beta, w_t, w_s):

    FORWARD_KL   KL(p_t || p_s) = sum p_t (log p_t - log p_s)
    REVERSE_KL   KL(p_s || p_t)
    MIXTURE      w_t KL(p_t || m) + w_s KL(p_s || m),  m = (1 - beta) p_s + beta p_t
                 (the generalized JSD: w_t = beta, w_s = 1 - beta; skew KL: one of the two terms)
    TOTAL_VARIATION  1/2 sum |p_s - p_t|

The gradient w.r.t. the student's transformed logits z_s is p_s g - p_s sum(p_s g) with g the
derivative w.r.t. log p_s (forward KL: directly p_s - p_t); p_s g is formed as one product (g
alone overflows where p_s is far below the mixture). The teacher's gradient is the same
formula with the roles swapped (`swapped`): forward and reverse KL trade places, a mixture's beta
becomes 1 - beta and its weights swap, total variation is symmetric. `aux_s` / `aux_t` are the
sums sum p g each side needs, kept by the forward.

A masked row gives 0 and no gradient. Terms where a probability is exactly 0 count 0 (a vocabulary
masked to -inf in both models is legal); NaN logits give NaN.
"""

from __future__ import annotations

import math

import torch

from .logprobs import row_normalizer, sweep_values

FORWARD_KL, REVERSE_KL, MIXTURE, TOTAL_VARIATION = 0, 1, 2, 3


def swapped(kind: int, beta: float, w_t: float, w_s: float) -> tuple[int, float, float, float]:
    """The same divergence seen from the teacher's side (the teacher as the first argument)."""
    if kind == FORWARD_KL:
        return REVERSE_KL, beta, w_t, w_s
    if kind == REVERSE_KL:
        return FORWARD_KL, beta, w_t, w_s
    if kind == MIXTURE:
        return MIXTURE, 1.0 - beta, w_s, w_t
    return kind, beta, w_t, w_s


def _times(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p * x with 0 where p is 0 (x may then be -inf - -inf)."""
    return torch.where(p != 0, p * x, 0.0)


def _log_mixture(lp_s: torch.Tensor, lp_t: torch.Tensor, beta: float) -> torch.Tensor:
    a = lp_s + (math.log(1.0 - beta) if beta < 1.0 else -math.inf)
    b = lp_t + (math.log(beta) if beta > 0.0 else -math.inf)
    return torch.logaddexp(a, b)


def _weighted_grad(kind, beta, w_t, w_s, lp_s, lp_t, p_s, p_t):
    """(per-token divergence [N], p_s * g [N, V]) with g its derivative w.r.t. log p_s up to a
    per-row constant; the product is formed without g itself, which overflows where p_s << m."""
    if kind == FORWARD_KL:
        return _times(p_t, lp_t - lp_s).sum(-1), None
    if kind == REVERSE_KL:
        pg = _times(p_s, lp_s - lp_t)
        return pg.sum(-1), pg
    if kind == MIXTURE:
        lm = _log_mixture(lp_s, lp_t, beta)
        value = w_t * _times(p_t, lp_t - lm) + w_s * _times(p_s, lp_s - lm)
        # d/dlog p_s of w_t KL(p_t||m) + w_s KL(p_s||m) is w_s (log p_s - log m) - (1 - beta) q with
        # q = (w_t p_t + w_s p_s) / m; times p_s, with p_s / m = exp(log p_s - log m) <= 1 / (1 - beta).
        if beta < 1.0:
            ratio = torch.where(p_s != 0, torch.exp(lp_s - lm), 0.0)
            pg = w_s * _times(p_s, lp_s - lm) - (1.0 - beta) * (w_t * p_t + w_s * p_s) * ratio
        else:
            pg = w_s * _times(p_s, lp_s - lm)
        return value.sum(-1), pg
    diff = p_s - p_t
    return 0.5 * diff.abs().sum(-1), 0.5 * p_s * torch.sign(diff)


def _log_probs(logits, temperature, logit_scale, softcap):
    u, factor = sweep_values(logits, temperature, logit_scale, softcap)
    shift, log_s, d = row_normalizer(u, factor)
    return d - log_s.unsqueeze(-1), shift, log_s


def token_divergence_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    kind: int,
    beta: float,
    w_t: float,
    w_s: float,
    temperature: float,
    student_scale: float,
    student_softcap: float,
    teacher_scale: float,
    teacher_softcap: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """student, teacher [B, T, V] (any strides), valid [B*T] bool -> (divergence [N], student
    entropy [N] or [0], stats [N, 6]: the student's (shift, log_s), the teacher's, aux_s, aux_t)."""
    V = student.shape[-1]
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    with torch.no_grad():
        lp_s, s_shift, s_log_s = _log_probs(student.reshape(-1, V).to(acc), temperature, student_scale,
                                            student_softcap)
        lp_t, t_shift, t_log_s = _log_probs(teacher.reshape(-1, V).to(acc), temperature, teacher_scale,
                                            teacher_softcap)
        p_s, p_t = torch.exp(lp_s), torch.exp(lp_t)
        value, pg_s = _weighted_grad(kind, beta, w_t, w_s, lp_s, lp_t, p_s, p_t)
        _, pg_t = _weighted_grad(*swapped(kind, beta, w_t, w_s), lp_t, lp_s, p_t, p_s)
        aux_s = pg_s.sum(-1) if pg_s is not None else torch.zeros_like(value)
        aux_t = pg_t.sum(-1) if pg_t is not None else torch.zeros_like(value)
        zero = value.new_zeros(())
        value = torch.where(valid, value, zero)
        entropy = torch.where(valid, -_times(p_s, lp_s).sum(-1), zero) if with_entropy else value.new_zeros(0)
        stats = torch.stack([s_shift, s_log_s, t_shift, t_log_s, aux_s, aux_t], dim=-1)
    return value, entropy, stats


def token_divergence_backward(
    grad: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    valid: torch.Tensor,
    stats: torch.Tensor,
    kind: int,
    beta: float,
    w_t: float,
    w_s: float,
    temperature: float,
    first_scale: float,
    first_softcap: float,
    second_scale: float,
    second_softcap: float,
) -> torch.Tensor:
    """d(sum grad * divergence)/d first [B, T, V] (contiguous, first's dtype), where the divergence
    takes `first` as its student: the student's gradient, or with swapped arguments, stats columns
    and kind (`swapped`), the teacher's. stats: first's (shift, log_s), second's, first's aux."""
    V = first.shape[-1]
    acc = stats.dtype
    u1, f1 = sweep_values(first.reshape(-1, V).to(acc), temperature, first_scale, first_softcap)
    u2, f2 = sweep_values(second.reshape(-1, V).to(acc), temperature, second_scale, second_softcap)
    lp_1 = (u1 - stats[:, 0:1]) * f1 - stats[:, 1:2]
    lp_2 = (u2 - stats[:, 2:3]) * f2 - stats[:, 3:4]
    p_1, p_2 = torch.exp(lp_1), torch.exp(lp_2)
    if kind == FORWARD_KL:
        dz = p_1 - p_2
    else:
        _, pg = _weighted_grad(kind, beta, w_t, w_s, lp_1, lp_2, p_1, p_2)
        dz = pg - _times(p_1, stats[:, 4:5].expand_as(p_1))
    dz = torch.where(valid.unsqueeze(-1), dz * grad.to(acc).unsqueeze(-1), 0.0)
    # Back through the transform: z = factor * u, u = tanh(x * scale / softcap) under a softcap.
    dx = dz * f1
    if first_softcap:
        dx = dx * (1.0 - u1 * u1) * (first_scale / first_softcap)
    return dx.to(first.dtype).reshape(first.shape)
