"""Generalized advantage estimation in plain PyTorch: the ground truth for the kernels.

The reverse loop over time is the trainers' own loop, written once for both masking rules (see
`fastalign.gae` for the two conventions); it runs in fp32, or fp64 when an input is fp64.
"""

from __future__ import annotations

import torch

from .._deprecation import renamed_option

WHITEN_EPS = 1e-8


def _acc_dtype(rewards: torch.Tensor, values: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32


def masked_whiten(
    x: torch.Tensor, valid: torch.Tensor, *, shift_mean: bool = True, unbiased: bool = True
) -> torch.Tensor:
    """(x - mean) * rsqrt(var + 1e-8) over the positions where `valid` is True (all rows together),
    plus the mean again when `shift_mean` is False. Raises ValueError, as the trainers do, when too
    few positions are valid for the variance."""
    ddof = 1 if unbiased else 0
    n = int(valid.sum())
    if n <= ddof:
        raise ValueError(
            f"mask: whitening needs at least {ddof + 1} valid position(s) in the batch "
            f"({'unbiased' if unbiased else 'biased'} variance), got {n}"
        )
    selected = x[valid]
    mean = selected.mean()
    var = (selected - mean).square().sum() / (n - ddof)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return out


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    gamma: float,
    lam: float,
    *,
    convention: str = "verl",
    whiten: bool = True,
    shift_mean: bool = True,
    unbiased: bool = True,
    semantics: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each [B, T] fp32 (fp64 for fp64 input); arguments as `fastalign.gae`."""
    convention = renamed_option("semantics", semantics, "convention", convention, "verl")
    acc = _acc_dtype(rewards, values)
    r = rewards.to(acc)
    v = values.to(acc)
    B, T = r.shape
    valid = torch.ones(B, T, dtype=torch.bool, device=r.device) if mask is None else mask != 0
    carry_mask = valid if convention == "verl" else torch.ones_like(valid)
    next_values = torch.zeros(B, dtype=acc, device=r.device)
    last = torch.zeros(B, dtype=acc, device=r.device)
    advantages = torch.empty(B, T, dtype=acc, device=r.device)
    for t in reversed(range(T)):
        m = carry_mask[:, t]
        delta = r[:, t] + gamma * next_values - v[:, t]
        last = torch.where(m, delta + gamma * lam * last, last)
        next_values = torch.where(m, v[:, t], next_values)
        advantages[:, t] = last
    returns = advantages + v
    if whiten:
        advantages = masked_whiten(advantages, valid, shift_mean=shift_mean, unbiased=unbiased)
        if convention == "trl" and mask is not None:
            advantages = advantages.masked_fill(~valid, 0.0)
    return advantages, returns


def gae_forward(rewards, values, mask, gamma, lam, trl, whiten, shift_mean, unbiased):
    """The op-level entry point every backend shares (see `fastalign.gae.gae_forward`)."""
    return gae(
        rewards, values, mask, gamma, lam, convention="trl" if trl else "verl",
        whiten=whiten, shift_mean=shift_mean, unbiased=unbiased,
    )
