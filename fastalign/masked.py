"""Masked reductions, written once: every loss and metric that sums or averages over the counted
positions (completion tokens, sequences with a token) goes through these.

Both read a value only where its mask or weight is nonzero, so a NaN or inf in the padding
(a rollout's filler log-prob) never leaks into a loss or a metric.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def masked_sum(values: torch.Tensor, weights: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * weights) over the positions whose weight is nonzero."""
    values, weights = torch.broadcast_tensors(values, weights)
    total = torch.where(weights != 0, values * weights, 0.0)
    return total.sum() if dim is None else total.sum(dim)


def masked_mean(
    values: torch.Tensor,
    mask: torch.Tensor,
    dim: int | None = None,
    *,
    eps: float | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """masked_sum(values, mask) / count, the count being sum(mask) (over `dim`, or all).

    By default the count is at least 1 (an empty mask gives 0, never 0/0). With `eps` it is
    sum(mask) + eps instead (verl's `masked_mean`). With `gather` (one process of several) the sum
    and the count are first summed over every process (TRL's global masked mean); `gather` returns
    every process's tensor concatenated along dim 0.
    """
    values, mask = torch.broadcast_tensors(values, mask)
    total = masked_sum(values, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    if not count.is_floating_point():
        count = count.to(total.dtype)
    if gather is not None:
        if dim is not None:
            raise ValueError("masked_mean: gather reduces over every position (dim must be None)")
        totals = gather(torch.stack([total, count.to(total.dtype)]).view(1, 2)).sum(0)
        total, count = totals[0], totals[1]
    # The count keeps the mask's dtype, as the trainers' formulas do (verl's 1e-8 vanishes in fp32).
    return total / (count + eps if eps is not None else count.clamp(min=1.0))
