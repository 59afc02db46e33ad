"""`token_divergence`: per-token divergences between a student's and a teacher's next-token
distributions (forward / reverse KL, generalized JSD, skew KL, total variation) from both models'
logits, with the student's entropy, reading both rows without ever forming a probability tensor.

Registered as the torch.library ops `fastalign::token_divergence_forward` and
`fastalign::token_divergence_backward`; each op body picks its backend at run time like
`token_logprobs` (Triton for CUDA, C++ for CPU, the reference otherwise). The math is
`fastalign/reference/divergence.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._checks import check_finite, check_ignore_index, check_positive_finite
from .backend import current_backend, resolve
from .logprobs import _as_rows
from .reference.divergence import FORWARD_KL, MIXTURE, REVERSE_KL, TOTAL_VARIATION, swapped

DIVERGENCES = ("jsd", "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "tv")


class TokenDivergence(NamedTuple):
    """divergence: per token, shaped like the logits' leading dims (fp32; fp64 for fp64 input),
    0 where masked, differentiable; entropy: the student's (no gradient), when asked for."""

    divergence: torch.Tensor
    entropy: torch.Tensor | None = None


def divergence_params(divergence: object, beta: object = 0.5, skew: object = 0.1) -> tuple[int, float, float, float]:
    """(kind, beta, w_t, w_s) the kernels take for a named divergence (see the reference's table)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}")
    if divergence == "jsd":
        b = check_finite("beta", beta)
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"beta: the JSD interpolation must lie in [0, 1] (0: forward KL, 1: reverse KL), got {b}")
        if b == 0.0:
            return FORWARD_KL, 0.0, 0.0, 0.0
        if b == 1.0:
            return REVERSE_KL, 1.0, 0.0, 0.0
        return MIXTURE, b, b, 1.0 - b
    if divergence in ("skew_forward_kl", "skew_reverse_kl"):
        a = check_finite("skew", skew)
        if not 0.0 <= a < 1.0:
            raise ValueError(f"skew: the skew KL's mixing weight must lie in [0, 1), got {a}")
        # skew forward: KL(p_t || a p_t + (1 - a) p_s); skew reverse: KL(p_s || a p_s + (1 - a) p_t).
        return (MIXTURE, a, 1.0, 0.0) if divergence == "skew_forward_kl" else (MIXTURE, 1.0 - a, 0.0, 1.0)
    return {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "tv": TOTAL_VARIATION}[divergence], 0.0, 0.0, 0.0


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.library.custom_op("fastalign::token_divergence_forward", mutates_args=())
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
    entropy [N] or [0], stats [N, 6]: each model's normalizer (shift, log_s) and each side's aux)."""
    _, forward = resolve("token_divergence_forward", student=student, teacher=teacher)
    return forward(student, teacher, valid, kind, beta, w_t, w_s, temperature, student_scale, student_softcap,
                   teacher_scale, teacher_softcap, with_entropy)


@token_divergence_forward.register_fake
def _(student, teacher, valid, kind, beta, w_t, w_s, temperature, student_scale, student_softcap, teacher_scale,
      teacher_softcap, with_entropy):
    n = valid.shape[0]
    acc = _acc_dtype(student, teacher)
    return (student.new_empty(n, dtype=acc), student.new_empty(n if with_entropy else 0, dtype=acc),
            student.new_empty((n, 6), dtype=acc))


@torch.library.custom_op("fastalign::token_divergence_backward", mutates_args=())
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
    backend: str,
) -> torch.Tensor:
    """Gradient w.r.t. `first` [B, T, V] (contiguous, its dtype) of sum(grad * divergence), the
    divergence taking `first` as its student (the teacher's gradient: arguments swapped)."""
    _, backward = resolve("token_divergence_backward", backend, first=first, second=second)
    return backward(grad, first, second, valid, stats, kind, beta, w_t, w_s, temperature, first_scale, first_softcap,
                    second_scale, second_softcap)


@token_divergence_backward.register_fake
def _(grad, first, second, valid, stats, kind, beta, w_t, w_s, temperature, first_scale, first_softcap, second_scale,
      second_softcap, backend):
    return torch.empty(first.shape, dtype=first.dtype, device=first.device)


def _setup_context(ctx, inputs, output):
    student, teacher, valid, kind, beta, w_t, w_s, temperature, s_scale, s_softcap, t_scale, t_softcap, _ = inputs
    _, entropy, stats = output
    ctx.save_for_backward(student, teacher, valid, stats)
    ctx.params = (kind, beta, w_t, w_s, temperature, s_scale, s_softcap, t_scale, t_softcap)
    ctx.backend = current_backend()
    ctx.mark_non_differentiable(entropy, stats)


def _backward(ctx, grad, *_unused):
    student, teacher, valid, stats = ctx.saved_tensors
    kind, beta, w_t, w_s, temperature, s_scale, s_softcap, t_scale, t_softcap = ctx.params
    grad_student = grad_teacher = None
    if grad is not None:
        grad = grad.to(stats.dtype)
        if ctx.needs_input_grad[0]:
            grad_student = token_divergence_backward(grad, student, teacher, valid, stats, kind, beta, w_t, w_s,
                                                     temperature, s_scale, s_softcap, t_scale, t_softcap, ctx.backend)
        if ctx.needs_input_grad[1]:
            teacher_stats = stats[:, [2, 3, 0, 1, 5, 4]].contiguous()
            grad_teacher = token_divergence_backward(grad, teacher, student, valid, teacher_stats,
                                                     *swapped(kind, beta, w_t, w_s), temperature, t_scale, t_softcap,
                                                     s_scale, s_softcap, ctx.backend)
    return (grad_student, grad_teacher) + (None,) * 11


token_divergence_forward.register_autograd(_backward, setup_context=_setup_context)


def _transform_args(prefix: str, logit_scale: object, softcap: object) -> tuple[float, float]:
    scale = check_finite(f"{prefix}_logit_scale", logit_scale)
    if scale == 0.0:
        raise ValueError(f"{prefix}_logit_scale: must be nonzero (every logit would be 0)")
    cap = 0.0 if softcap is None else check_positive_finite(f"{prefix}_softcap", softcap)
    return scale, cap


def checked_options(divergence, beta, skew, temperature, student_logit_scale, student_softcap, teacher_logit_scale,
                    teacher_softcap, outputs, caller: str) -> tuple[tuple, bool]:
    """The ops' (kind, beta, w_t, w_s, temperature, student scale, softcap, teacher scale, softcap)
    from a divergence's keyword options, checked; and whether the entropy is asked for."""
    kind, b, w_t, w_s = divergence_params(divergence, beta, skew)
    temperature = check_positive_finite("temperature", temperature)
    s_scale, s_cap = _transform_args("student", student_logit_scale, student_softcap)
    t_scale, t_cap = _transform_args("teacher", teacher_logit_scale, teacher_softcap)
    return (kind, b, w_t, w_s, temperature, s_scale, s_cap, t_scale, t_cap), entropy_asked(outputs, caller)


def entropy_asked(outputs: object, caller: str) -> bool:
    """Whether `outputs` (a divergence's extra fields: only "entropy") asks for the entropy."""
    if not isinstance(outputs, (str, tuple, list, set, frozenset)):
        raise TypeError(f"outputs: expected a sequence of field names, got {type(outputs).__name__}")
    outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    unknown = sorted(map(str, set(outputs) - {"entropy"}))
    if unknown:
        raise ValueError(f"outputs: unknown field(s) {unknown}; {caller} adds only 'entropy'")
    return "entropy" in outputs


def check_pair(student_logits: object, teacher_logits: object) -> None:
    """Both models' logits: tensors of one shape [..., V], V >= 1, floating point, on one device."""
    for name, value in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor [..., V], got {type(value).__name__}")
        if value.dim() == 0 or value.shape[-1] == 0:
            raise ValueError(f"{name}: expected logits [..., V] with V >= 1, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected floating-point logits, got {value.dtype}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits: expected shape {tuple(student_logits.shape)} (the student's: the same "
                         f"positions and vocabulary), got {tuple(teacher_logits.shape)}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits: expected a tensor on {student_logits.device} (the student's device), "
                         f"got {teacher_logits.device}")


def valid_positions(leading: torch.Size, device: torch.device, mask: object, labels: object,
                    ignore_index: int) -> torch.Tensor:
    """[N] bool: the positions that count (mask nonzero and label not ignore_index, where given)."""
    check_ignore_index(ignore_index)
    valid = torch.ones(leading, dtype=torch.bool, device=device)
    for name, value in (("mask", mask), ("labels", labels)):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(value).__name__}")
        if value.shape != leading:
            raise ValueError(f"{name}: expected shape {tuple(leading)} (the logits' leading dims), "
                             f"got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the logits' device), got {value.device}")
        if value.is_complex():
            raise TypeError(f"{name}: expected a bool, integer or float tensor, got {value.dtype}")
        valid = valid & ((value != ignore_index) if name == "labels" else (value != 0))
    return valid.reshape(-1)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
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
    outputs: Sequence[str] = (),
) -> TokenDivergence:
    """Per-token divergence between the student's and the teacher's distributions.

    Args:
        student_logits, teacher_logits: `[..., V]` of one shape, any float dtype and strides (views
            such as `logits[:, :-1]` are read in place). The gradient reaches the student's logits,
            and the teacher's too if they require grad.
        divergence: "jsd" (TRL's generalized JSD with `beta`: 0 is the forward KL(teacher ||
            student), 1 the reverse KL(student || teacher), else beta KL(p_t || m) + (1 - beta)
            KL(p_s || m) with m = (1 - beta) p_s + beta p_t), "forward_kl", "reverse_kl",
            "skew_forward_kl" (KL(p_t || skew p_t + (1 - skew) p_s)), "skew_reverse_kl"
            (KL(p_s || skew p_s + (1 - skew) p_t)) or "tv" (total variation, 1/2 sum |p_s - p_t|).
        temperature: divides both models' logits, after each one's scale and softcap (TRL's order).
        student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap: each model's
            `logit_scale` and `final_logit_softcapping` (None: off).
        mask, labels: optional `[...]`; a position counts where `mask` is nonzero and `labels` is
            not `ignore_index`. Others give 0 and no gradient.
        outputs: ("entropy",) adds the student's entropy per token (a metric: no gradient).

    Returns:
        TokenDivergence(divergence, entropy), shaped like the leading dims, fp32 (fp64 for fp64).
    """
    check_pair(student_logits, teacher_logits)
    params, with_entropy = checked_options(divergence, beta, skew, temperature, student_logit_scale, student_softcap,
                                           teacher_logit_scale, teacher_softcap, outputs, "token_divergence")
    leading = student_logits.shape[:-1]
    valid = valid_positions(leading, student_logits.device, mask, labels, ignore_index)
    value, entropy, _ = token_divergence_forward(_as_rows(student_logits), _as_rows(teacher_logits), valid, *params,
                                                 with_entropy)
    return TokenDivergence(value.view(leading), entropy.view(leading) if with_entropy else None)


__all__ = ["DIVERGENCES", "TokenDivergence", "divergence_params", "token_divergence"]
