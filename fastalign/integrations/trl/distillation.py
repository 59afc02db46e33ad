"""What TRL's distillation trainers call for their divergence, served by fastalign.

* `DistillationTrainer` (TRL 1.16, stable): its `_chunked_divergence_loss` looks up
  `ChunkedDivergenceFunction` in `trl.trainer.distillation_trainer` at every call and calls
  `.apply(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
  teacher_bias, beta, temperature, student_logit_scale, student_softcap, teacher_logit_scale,
  teacher_softcap)` for (per-token divergence, per-token student entropy), fp32. `ChunkedDivergence`
  answers with fastalign's blocked divergence, the student's gradients taken in the same pass
  (`linear_divergence_loss`); TRL's masking, reductions and logging stay.
* `GKDTrainer` (experimental): its static `generalized_jsd_loss(student_logits, teacher_logits,
  labels, beta, temperature, reduction, num_items_in_batch)` on both models' logits is replaced
  by `generalized_jsd_loss` here, on `fastalign.token_divergence`, with TRL's reductions.
"""

from __future__ import annotations

import torch

from ...divergence import token_divergence


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _softcap(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected None or a positive cap, got {value!r} (fastalign does not guess)")
    return float(value)


class _DivergenceWithGradients(torch.autograd.Function):
    """Per-token divergence and entropy whose student gradients, for a weight of 1 on every token,
    came out of the forward (`linear_divergence_loss`). TRL reduces the per-token values by a sum
    over the compact rows scaled by one normalizer, so the incoming gradient is one number for
    every token: the stored gradients are scaled by it. Any other incoming gradient is served by
    recomputing (`linear_token_divergence`'s backward)."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                params):
        from ...linear_divergence import linear_divergence_loss

        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) if t is not None else None
                      for t, need in zip((student_hidden, student_weight, student_bias), ctx.needs_input_grad[:3])]
            weights = torch.ones(student_hidden.shape[0], dtype=torch.float32, device=student_hidden.device)
            loss, value, entropy = linear_divergence_loss(*leaves, teacher_hidden, teacher_weight, teacher_bias,
                                                          weights, params, True)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = torch.autograd.grad(loss, wanted) if wanted else ()
        stored = iter(grads)
        ctx.grads = [next(stored) if t is not None and t.requires_grad else None for t in leaves]
        ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                              teacher_bias)
        ctx.params = params
        ctx.mark_non_differentiable(entropy)
        return value.float(), entropy.float()

    @staticmethod
    def backward(ctx, grad_value, _grad_entropy):
        from ...linear_divergence import linear_token_divergence

        if grad_value is None:
            return (None,) * 7
        first = grad_value.reshape(-1)[:1]
        if grad_value.numel() and bool((grad_value == first).all()):
            scale = first[0]
            return (*(None if g is None else g * scale.to(g.dtype) for g in ctx.grads), None, None, None, None)
        hs, ws, bs, ht, wt, bt = ctx.saved_tensors
        kind, beta, w_t, w_s, temperature, s_scale, s_cap, t_scale, t_cap = ctx.params
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) if t is not None else None
                      for t, need in zip((hs, ws, bs), ctx.needs_input_grad[:3])]
            value = linear_token_divergence(leaves[0], leaves[1], ht, wt, student_bias=leaves[2], teacher_bias=bt,
                                            divergence="jsd", beta=beta if kind == 2 else float(kind),
                                            temperature=temperature, student_logit_scale=s_scale,
                                            student_softcap=s_cap or None, teacher_logit_scale=t_scale,
                                            teacher_softcap=t_cap or None).divergence
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(value, wanted, grad_value.to(value.dtype)))
        return (*(next(grads) if t is not None and t.requires_grad else None for t in leaves), None, None, None, None)


class ChunkedDivergence:
    """Stands in for `trl.kernels.chunked_divergence.ChunkedDivergenceFunction` (only `.apply`)."""

    @staticmethod
    def apply(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, beta,
              temperature=1.0, student_logit_scale=1.0, student_final_logit_softcapping=None, teacher_logit_scale=1.0,
              teacher_final_logit_softcapping=None):
        from ...divergence import checked_options
        from ...linear_divergence import check_heads

        s_dtype, t_dtype = _compute_dtype(student_hidden), _compute_dtype(teacher_hidden)
        # The kernels read both models' logits in one dtype: the wider of the two compute dtypes.
        dtype = torch.promote_types(s_dtype, t_dtype)
        params, _ = checked_options(
            "jsd", float(beta), 0.1, temperature, student_logit_scale,
            _softcap("student_final_logit_softcapping", student_final_logit_softcapping), teacher_logit_scale,
            _softcap("teacher_final_logit_softcapping", teacher_final_logit_softcapping), (), "ChunkedDivergence",
        )
        with torch.autocast(student_hidden.device.type, enabled=False):
            hs, ws = student_hidden.to(dtype), student_weight.to(dtype)
            bs = None if student_bias is None else student_bias.to(dtype)
            # As TRL's function: the gradient reaches the student only.
            ht, wt = teacher_hidden.detach().to(dtype), teacher_weight.detach().to(dtype)
            bt = None if teacher_bias is None else teacher_bias.detach().to(dtype)
            check_heads(hs, ws, bs, ht, wt, bt)
            return _DivergenceWithGradients.apply(hs, ws, bs, ht, wt, bt, params)


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
