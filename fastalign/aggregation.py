"""Aggregation as per-token weights: for each trainer's normalization of a per-token loss x,
the weights w [B, T] with sum(w * x) equal to that trainer's loss. Handing the kernels these
weights lets them write the logits' gradient in the same pass that reads the logits.
"""

from __future__ import annotations

import torch


def trl_weights(
    mask: torch.Tensor,
    loss_type: str,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int | None = None,
) -> torch.Tensor:
    """Weights w [B, T] with sum(w * x) = the loss TRL's `_compute_loss` forms from per-token x."""
    m = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    ga = gradient_accumulation_steps
    if loss_type in ("grpo", "sapo"):
        return m / m.sum(-1, keepdim=True).clamp(min=1.0) / m.shape[0] / ga
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0) / ga
    if loss_type == "dr_grpo":
        return m / (m.shape[0] * max_completion_length) / ga
    if loss_type in ("dapo", "cispo", "vespo"):
        n = torch.as_tensor(num_items_in_batch, dtype=m.dtype, device=m.device)
        normalizer = n.clamp(min=1.0) / num_processes
        normalizer = normalizer * ga / (steps_per_generation or ga)
        return m / normalizer
    if loss_type == "luspo":
        return m / m.shape[0] / ga
    raise ValueError(f"unknown TRL loss type {loss_type!r}")


def verl_weights(
    mask: torch.Tensor,
    loss_agg_mode: str,
    *,
    dp_size: int = 1,
    batch_num_tokens: torch.Tensor | float | None = None,
    global_batch_size: torch.Tensor | float | None = None,
    loss_scale_factor: float | None = None,
    verl_mask_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weights w [B, T] with sum(w * x) = verl's `agg_loss(x, mask, loss_agg_mode, ...)`.

    `verl_mask_dtype`: the dtype of the mask the caller handed verl, when `mask` is a converted copy.
    One departure: "token-mean" over a batch without a single token gives 0, not 0/0."""
    m = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    verl_mask_dtype = mask.dtype if verl_mask_dtype is None else verl_mask_dtype
    if loss_agg_mode == "token-mean":
        total = m.sum().clamp(min=1.0) if batch_num_tokens is None else torch.as_tensor(batch_num_tokens)
        return m / total.to(m) * dp_size
    if loss_agg_mode == "token-sum":
        return m * dp_size
    counts = m.sum(-1, keepdim=True)
    has_tokens = (counts > 0).to(m.dtype)
    sequences = has_tokens.sum() if global_batch_size is None else torch.as_tensor(global_batch_size)
    sequences = sequences.to(m)
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        w = m * has_tokens / sequences * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            w = w / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return w
    if loss_agg_mode == "seq-mean-token-mean":
        # verl adds its 1e-8 to the count in the mask's dtype (a bool or integer count becomes the
        # default float dtype): below fp64 it vanishes next to a count of 1 or more.
        if verl_mask_dtype == torch.float64 or (
            not verl_mask_dtype.is_floating_point and torch.get_default_dtype() == torch.float64
        ):
            denominator = counts + 1e-8
        else:
            denominator = (counts.float() + 1e-8).to(m.dtype)
        return m / denominator * has_tokens / sequences * dp_size
    raise ValueError(f"unknown verl loss_agg_mode {loss_agg_mode!r}")


def sequence_mean_weights(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1]: 1/B per sequence, for a per-sequence loss averaged over the batch (TRL RLOOTrainer's
    `.mean()`; a completion without a counted token still counts, as there)."""
    b = mask.shape[0]
    dtype = torch.float64 if mask.dtype == torch.float64 else torch.float32
    return torch.full((b, 1), 1.0 / max(b, 1), dtype=dtype, device=mask.device)
