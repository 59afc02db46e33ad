"""`topk_token_divergence`: a student's full distribution against a sparse teacher, given as its
top-k token ids and their log-probs per position (what an inference server returns when the
teacher runs in vLLM), in the two usual forms:

    "renormalized"  both distributions restricted to the teacher's k tokens and renormalized there
    "tail"          k + 1 outcomes: the k tokens, and the rest of the vocabulary as one bucket
                    holding 1 - sum of the k probabilities (each model's own remainder)

The student's log-probs at the k ids need its whole-vocabulary normalizer: one pass over its
logits (`token_logprobs`, on the backend in force) gives the log-prob of the first id and the
normalizer, and the other ids follow from differences of the gathered logits (exact for close
values). Everything after that is [N, k + 1] small: the divergence runs as `token_divergence` on
those rows, and autograd carries the gradient back to the student's logits.
"""

from __future__ import annotations

import torch

from .divergence import TokenDivergence, check_pair, entropy_asked, token_divergence, valid_positions
from .logprobs import token_logprobs
from .reference.logprobs import transform_logits

FORMS = ("renormalized", "tail")


def _check_teacher(teacher_ids: object, teacher_logps: object, leading: torch.Size, device, vocab: int) -> int:
    for name, value in (("teacher_ids", teacher_ids), ("teacher_logps", teacher_logps)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor [..., k], got {type(value).__name__}")
        if value.dim() != len(leading) + 1 or value.shape[:-1] != leading or value.shape[-1] == 0:
            raise ValueError(f"{name}: expected shape {(*leading, 'k')} (the student logits' leading dims, k >= 1), "
                             f"got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the student's device), got {value.device}")
    if teacher_ids.is_floating_point() or teacher_ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids: expected integer token ids, got {teacher_ids.dtype}")
    if not teacher_logps.is_floating_point():
        raise TypeError(f"teacher_logps: expected floating-point log-probs, got {teacher_logps.dtype}")
    if teacher_logps.shape != teacher_ids.shape:
        raise ValueError(f"teacher_logps: expected shape {tuple(teacher_ids.shape)} (teacher_ids'), got "
                         f"{tuple(teacher_logps.shape)}")
    return teacher_ids.shape[-1]


def _with_tail(logps: torch.Tensor) -> torch.Tensor:
    """[..., k] log-probs -> [..., k + 1] with log(1 - sum p) last (0 mass where rounding overshoots)."""
    rest = 1.0 - logps.exp().sum(-1, keepdim=True)
    # log of a bucket with no mass is -inf, with no gradient (log's own would be 0 * inf there).
    positive = rest > 0
    tail = torch.where(positive, torch.where(positive, rest, 1.0).log(), float("-inf"))
    return torch.cat([logps, tail], dim=-1)


def topk_token_divergence(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logps: torch.Tensor,
    *,
    form: str = "tail",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    outputs=(),
) -> TokenDivergence:
    """Per-token divergence between the student and a top-k teacher.

    Args:
        student_logits: `[..., V]`, any float dtype and strides.
        teacher_ids: `[..., k]` int token ids in `[0, V)` where the position counts.
        teacher_logps: `[..., k]` the teacher's log-probs of those tokens (over its whole
            vocabulary, at whatever temperature it sampled with; -inf marks an unused slot).
        form: "tail" (the k tokens and a remainder bucket) or "renormalized" (the k tokens only).
        divergence, beta, skew: as `token_divergence`, between the two k(+1)-outcome distributions.
        temperature, student_logit_scale, student_softcap: the student's transform.
        mask, labels, ignore_index: the positions that count, as `token_divergence`.
        outputs: ("entropy",) adds the student's entropy over its whole vocabulary (same pass).

    Returns:
        TokenDivergence(divergence): shaped like the leading dims, differentiable w.r.t. the
        student's logits (and the teacher's log-probs if they require grad).
    """
    if not isinstance(student_logits, torch.Tensor) or student_logits.dim() == 0:
        raise TypeError(f"student_logits: expected a torch.Tensor [..., V], got "
                        f"{type(student_logits).__name__ if not isinstance(student_logits, torch.Tensor) else '0-d'}")
    check_pair(student_logits, student_logits)
    if form not in FORMS:
        raise ValueError(f"form: expected one of {', '.join(map(repr, FORMS))}, got {form!r}")
    leading, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    _check_teacher(teacher_ids, teacher_logps, leading, student_logits.device, vocab)
    valid = valid_positions(leading, student_logits.device, mask, labels, ignore_index).view(leading)
    ids = teacher_ids.long()
    if student_logits.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = ((ids < 0) | (ids >= vocab)) & valid.unsqueeze(-1)
        if bool(bad.any()):
            position = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"teacher_ids: every id where the position counts must lie in [0, {vocab}) (the "
                             f"vocabulary size); found {int(ids[position])} at position {position}")
    ids = torch.where(valid.unsqueeze(-1), ids, 0).clamp(0, vocab - 1)
    # log p_s(ids[0]) and the normalizer in one pass; the other ids by differences of gathered logits.
    with_entropy = entropy_asked(outputs, "topk_token_divergence")
    fields = token_logprobs(student_logits, ids[..., 0], temperature=temperature, logit_scale=student_logit_scale,
                            softcap=student_softcap, mask=valid, outputs=("entropy",) if with_entropy else ())
    first = fields.logps
    z = transform_logits(torch.gather(student_logits, -1, ids), temperature, student_logit_scale,
                         student_softcap or 0.0)
    student = first.unsqueeze(-1) + (z - z[..., :1])
    teacher = teacher_logps.to(student.dtype)
    if form == "tail":
        student, teacher = _with_tail(student), _with_tail(teacher)
    # Softmax over k(+1) log-probs: the identity for the tail form, the renormalization for the other.
    out = token_divergence(student, teacher, divergence=divergence, beta=beta, skew=skew, mask=valid)
    entropy = None if fields.entropy is None else fields.entropy.detach()
    return TokenDivergence(out.divergence, entropy)
