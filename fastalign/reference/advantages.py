"""Reference PyTorch for the two advantage kernels, vectorized (no Python loop over groups).

`group_advantages_forward` takes a flat vector and its group layout (contiguous runs of
`group_size`, or a permutation `order` that sorts the elements by group plus the segment
`offsets` into it) and returns one advantage per element; `discounted_returns` is REINFORCE++'s
reverse scan (verl 0.9.1's: masked tokens skipped, the running return carried across them);
`remax_advantages_forward` is ReMax's (the reward-to-go minus the greedy response's reward). The
group statistics are accumulated in float64 whatever the input dtype: a group of equal rewards
then centres to exactly 0, so `0 / (0 + eps)` stays 0 instead of amplifying a rounding residue
by 1/eps.

The per-element formula (shared by every backend; `fastalign/advantages.py` documents which
trainer each flag combination reproduces):

    n     = rewards counted in the group: the non-NaN ones (TRL), or all of them (verl)
    mean  = sum / n,   std = sqrt(sum (x - mean)^2 / (n - 1))   (NaN when n <= 1)
    verl and a group of one: mean = 0, std = 1
    base  = x - mean                                  (GRPO)
          = n / (n - 1) * (x - mean)   when n > 1     (RLOO: x minus the leave-one-out mean)
            0 for a group of one (TRL), x (verl), NaN when one reward of several is scorable (TRL)
    adv   = base / (d + eps), d = std (scale 1) or denom[0] (scale 2); adv = base (scale 0)
    nan_to_zero: a NaN advantage becomes 0
"""

from __future__ import annotations

import torch

from .._triton import contract

SCALE_NONE, SCALE_GROUP, SCALE_GIVEN = contract().SCALE_NONE, contract().SCALE_GROUP, contract().SCALE_GIVEN


def _group_ids(n: int, order: torch.Tensor, offsets: torch.Tensor, group_size: int, device) -> tuple[torch.Tensor, int]:
    if order.numel() == 0:
        return torch.arange(n, device=device) // group_size, n // group_size
    counts = offsets[1:] - offsets[:-1]
    n_groups = counts.numel()
    sorted_ids = torch.repeat_interleave(torch.arange(n_groups, device=device), counts)
    ids = torch.empty(n, dtype=torch.int64, device=device)
    ids[order] = sorted_ids
    return ids, n_groups


def group_advantages_forward(
    values: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    rloo: bool,
    scale: int,
    denom: torch.Tensor,
    eps: float,
    verl: bool,
    nan_to_zero: bool,
) -> torch.Tensor:
    out_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    n = values.numel()
    if n == 0:
        return torch.empty(0, dtype=out_dtype, device=values.device)
    x = values.double()
    ids, n_groups = _group_ids(n, order, offsets, group_size, values.device)
    length = torch.zeros(n_groups, dtype=torch.float64, device=x.device).index_add_(0, ids, torch.ones_like(x))
    valid = torch.ones_like(x, dtype=torch.bool) if verl else ~torch.isnan(x)
    xv = torch.where(valid, x, torch.zeros_like(x))
    count = torch.zeros_like(length).index_add_(0, ids, valid.double())
    total = torch.zeros_like(length).index_add_(0, ids, xv)
    mean = total / count
    dev = torch.where(valid, x - mean[ids], torch.zeros_like(x))
    m2 = torch.zeros_like(length).index_add_(0, ids, dev * dev)
    std = torch.where(count > 1, (m2 / (count - 1)).sqrt(), torch.full_like(m2, float("nan")))
    if verl:
        single = length == 1
        mean = torch.where(single, torch.zeros_like(mean), mean)
        std = torch.where(single, torch.ones_like(std), std)
    n_e, len_e = count[ids], length[ids]
    centred = x - mean[ids]
    if rloo:
        loo = n_e / (n_e - 1) * centred
        lone = x if verl else torch.zeros_like(x)
        base = torch.where(n_e > 1, loo, torch.where(len_e == 1, lone, torch.full_like(x, float("nan"))))
    else:
        base = centred
    if scale == SCALE_GROUP:
        adv = base / (std[ids] + eps)
    elif scale == SCALE_GIVEN:
        adv = base / (denom.double().reshape(()) + eps)
    else:
        adv = base
    adv = adv.to(out_dtype)
    # TRL's torch.nan_to_num(advantages, nan=0.0): NaN -> 0, +-inf -> the dtype's finite extremes.
    return torch.nan_to_num(adv, nan=0.0) if nan_to_zero else adv


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """verl 0.9.1's REINFORCE++ return (`compute_reinforce_plus_plus_outcome_advantage`,
    in verl/trainer/ppo/core_algos.py; its scan over the tokens), from the right:

        new      = r_t + gamma * running
        G_t      = new * mask[t]
        running  = new * mask[t] + running * (1 - mask[t])

    A masked token (a tool observation inside a multi-turn response, or padding) is skipped: its
    reward is dropped, its return is 0, and the running return crosses it unchanged, so a reward
    after the observation still reaches the response tokens before it. The formula is applied as
    written, with verl's ops in the output dtype, so that fractional masks and NaN/inf rewards
    give verl's numbers too (a shortcut such as `where(mask, new, running)` would not)."""
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(out_dtype)
    m = mask.to(out_dtype)
    out = torch.empty_like(r)
    running = torch.zeros(r.shape[0], dtype=out_dtype, device=r.device)
    for t in range(r.shape[1] - 1, -1, -1):
        new = r[:, t] + gamma * running
        out[:, t] = new * m[:, t]
        running = new * m[:, t] + running * (1 - m[:, t])
    return out


def remax_advantages_forward(
    rewards: torch.Tensor, mask: torch.Tensor, baselines: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl 0.9.1's ReMax (`compute_remax_outcome_advantage`, verl/trainer/ppo/core_algos.py; Li et
    al. 2023, "ReMax", Algorithm 1: the greedy response's reward as the baseline):

        returns[b, t]    = sum_{s >= t} rewards[b, s] * mask[b, s]
        advantages[b, t] = returns[b, t] - baselines[b] * mask[b, t]

    `rewards`, `mask` [B, T] and `baselines` [B] in one float dtype. The products are rounded in
    that dtype and the reward-to-go is accumulated in float64, as torch's `cumsum` on CPU does it for
    verl's `flip(-1).cumsum(-1).flip(-1)`: every backend gives verl-on-CPU's numbers."""
    weighted = rewards * mask
    returns = weighted.double().flip(-1).cumsum(-1).flip(-1).to(rewards.dtype)
    return returns - baselines.unsqueeze(-1) * mask, returns
