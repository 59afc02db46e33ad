"""Distillation losses: a per-token student-teacher divergence (`token_divergence`) reduced the way
TRL's distillation trainers reduce it, with the metric they log.

TRL 1.16's `DistillationTrainer` (`_chunked_divergence_loss`) sums the divergence over the
completion tokens and divides by `num_items_in_batch` when given, else by this batch's count of
those tokens (at least 1); it logs the mean student entropy over them as "entropy".
"""

from __future__ import annotations

import torch
from torch import nn

from .divergence import DIVERGENCES, divergence_params, token_divergence
from .policy_inputs import check_total
from .types import LossOutput

REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    return reduction


def distillation_loss(
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    *,
    student_hidden: torch.Tensor | None = None,
    student_weight: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_logps: torch.Tensor | None = None,
    topk_form: str = "tail",
    completion_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    divergence: str = "jsd",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | float | None = None,
) -> LossOutput:
    """The distillation loss between the student's and the teacher's logits, and TRL's metric.

    Args:
        student_logits, teacher_logits: `[..., V]` aligned position by position (both models'
            `logits[:, :-1]` over the same sequences); the teacher's are usually computed under
            no_grad, and get a gradient only if they require one.
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias:
            in place of the logits, each model's hidden states `[..., H]` and lm_head (its own H;
            one V): neither `[N, V]` logits tensor is ever formed. Unless the teacher's tensors
            require grad, the student's gradients are taken in the forward pass, while each block's
            logits are in hand (no recomputation in backward; no second derivative).
        teacher_ids, teacher_logps, topk_form: in place of the teacher's logits, its top-k token ids
            and log-probs `[..., k]` (an inference server's answer), as `topk_token_divergence` takes
            them ("tail" or "renormalized"); the student's full logits are read once.
        completion_mask, labels: the positions that count: `completion_mask` nonzero and `labels`
            not `ignore_index` (either or both; neither: every position).
        divergence, beta, skew, temperature, *_logit_scale, *_softcap: as `token_divergence`
            (TRL's `beta`: 0 forward KL, 1 reverse KL, else the generalized JSD).
        reduction: "mean" (over the counted positions; `num_items_in_batch` replaces their count,
            as TRL's gradient-accumulation-correct normalizer) or "sum".

    Returns:
        LossOutput(loss, {"entropy": the student's mean entropy over the counted positions}).
    """
    _check_reduction(reduction)
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError("num_items_in_batch: only used with reduction='mean' (it replaces the token count)")
        check_total("num_items_in_batch", num_items_in_batch, zero_ok=False)
    options = dict(divergence=divergence, beta=beta, skew=skew, temperature=temperature,
                   student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                   teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap, mask=completion_mask,
                   labels=labels, ignore_index=ignore_index, outputs=("entropy",))
    heads = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    if teacher_ids is not None or teacher_logps is not None:
        if teacher_logits is not None or any(t is not None for t in heads):
            raise ValueError("teacher_ids / teacher_logps: a top-k teacher goes with student_logits alone (not with "
                             "teacher_logits or hidden states)")
        if teacher_ids is None or teacher_logps is None:
            raise ValueError("teacher_ids / teacher_logps: a top-k teacher needs both its ids and its log-probs")
        from .topk_divergence import topk_token_divergence

        topk_options = {k: v for k, v in options.items() if k not in ("teacher_logit_scale", "teacher_softcap")}
        out = topk_token_divergence(student_logits, teacher_ids, teacher_logps, form=topk_form, **topk_options)
    elif any(t is not None for t in heads):
        if student_logits is not None or teacher_logits is not None:
            raise ValueError("student_logits / student_hidden: pass either both models' logits or both models' "
                             "hidden states with their lm_head weights, not both")
        missing = [name for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight),
                                        ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight))
                   if t is None]
        if missing:
            raise ValueError(f"{', '.join(missing)}: the hidden-states level needs both models' hidden states and "
                             "lm_head weights")
        teacher_grad = any(t is not None and t.requires_grad for t in (teacher_hidden, teacher_weight, teacher_bias))
        if torch.is_grad_enabled() and not teacher_grad:
            return _one_pass_from_hidden(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                         teacher_bias, options, reduction, num_items_in_batch)
        from .linear_divergence import linear_token_divergence

        out = linear_token_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                      student_bias=student_bias, teacher_bias=teacher_bias, **options)
    else:
        if student_logits is None or teacher_logits is None:
            raise ValueError("student_logits / teacher_logits: both models' logits are needed (or their hidden "
                             "states and lm_head weights)")
        out = token_divergence(student_logits, teacher_logits, **options)
    valid = torch.ones_like(out.divergence, dtype=torch.bool)
    if completion_mask is not None:
        valid = valid & (completion_mask != 0)
    if labels is not None:
        valid = valid & (labels != ignore_index)
    count = valid.sum()
    total = out.divergence.sum()
    if reduction == "sum":
        loss = total
    elif num_items_in_batch is not None:
        loss = total / torch.as_tensor(num_items_in_batch, device=total.device).to(total.dtype)
    else:
        loss = total / count.clamp(min=1).to(total.dtype)
    entropy = out.entropy.sum() / count.clamp(min=1).to(out.entropy.dtype)
    return LossOutput(loss, {"entropy": entropy.detach().float()})


def _one_pass_from_hidden(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                          options, reduction, num_items_in_batch) -> LossOutput:
    """The hidden-states loss with the student's gradients taken in the forward: the per-token
    weights of the reduction are known before the pass (1, 1 / count or 1 / num_items_in_batch),
    so each block's gradient is formed while its logits are in hand (linear_divergence_loss)."""
    from .divergence import checked_options, valid_positions
    from .linear_divergence import check_heads, linear_divergence_loss
    from .linear_logprobs import gather_sharded

    student_weight, student_bias = gather_sharded(student_weight), gather_sharded(student_bias)
    teacher_weight, teacher_bias = gather_sharded(teacher_weight), gather_sharded(teacher_bias)
    check_heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    params, _ = checked_options(options["divergence"], options["beta"], options["skew"], options["temperature"],
                                options["student_logit_scale"], options["student_softcap"],
                                options["teacher_logit_scale"], options["teacher_softcap"], (), "distillation_loss")
    leading = student_hidden.shape[:-1]
    valid = valid_positions(leading, student_hidden.device, options["mask"], options["labels"],
                            options["ignore_index"])
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    count = valid.sum()
    if reduction == "sum":
        scale = torch.ones((), dtype=acc, device=valid.device)
    elif num_items_in_batch is not None:
        scale = 1.0 / torch.as_tensor(num_items_in_batch, device=valid.device).to(acc)
    else:
        scale = 1.0 / count.clamp(min=1).to(acc)
    loss, _, entropy = linear_divergence_loss(student_hidden, student_weight, student_bias, teacher_hidden,
                                              teacher_weight, teacher_bias, valid.to(acc) * scale, params, True)
    return LossOutput(loss, {"entropy": (entropy.sum() / count.clamp(min=1).to(acc)).detach().float()})


class DistillationLoss(nn.Module):
    """`distillation_loss` with its options fixed (and checked) at construction.

    >>> loss_fn = DistillationLoss(beta=0.5, temperature=0.9)
    >>> out = loss_fn(student_logits, teacher_logits, completion_mask=mask, num_items_in_batch=n)
    """

    def __init__(self, *, divergence: str = "jsd", beta: float = 0.5, skew: float = 0.1, temperature: float = 1.0,
                 student_logit_scale: float = 1.0, student_softcap: float | None = None,
                 teacher_logit_scale: float = 1.0, teacher_softcap: float | None = None, reduction: str = "mean",
                 ignore_index: int = -100):
        super().__init__()
        divergence_params(divergence, beta, skew)
        _check_reduction(reduction)
        self.options = dict(divergence=divergence, beta=beta, skew=skew, temperature=temperature,
                            student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                            teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap,
                            reduction=reduction, ignore_index=ignore_index)
        # Checked now, not at the first step: a tiny call validates every transform option.
        probe = torch.zeros(1, 2)
        distillation_loss(probe, probe, **self.options)

    def forward(self, student_logits=None, teacher_logits=None, *, completion_mask=None, labels=None,
                num_items_in_batch=None, **heads) -> LossOutput:
        return distillation_loss(student_logits, teacher_logits, completion_mask=completion_mask, labels=labels,
                                 num_items_in_batch=num_items_in_batch, **heads, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


__all__ = ["DIVERGENCES", "DistillationLoss", "distillation_loss"]
