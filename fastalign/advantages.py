"""Group-relative advantages (GRPO, Dr.GRPO, RLOO, REINFORCE++-baseline, GDPO), REINFORCE++ and ReMax.

Registered as the torch.library ops `fastalign::group_advantages_forward` (every group's
statistics and every advantage in one kernel launch), `fastalign::discounted_returns` and
`fastalign::remax_advantages_forward`. They are
forward-only: trainers compute advantages from detached rewards under `torch.no_grad()`, so there
is no gradient to define. Each op body picks its backend at run time like `token_logprobs`: the
C++ kernels for CPU tensors, Triton for CUDA tensors, the reference PyTorch otherwise or when
forced (see `backend.py`).

Which trainer each option reproduces (the tests port each trainer's code and compare):

| call | matches |
|---|---|
| `estimator="grpo", scale="group"` (default) | TRL 1.16 GRPOTrainer `scale_rewards="group"`: `(r - nanmean_g) / (nanstd_g + 1e-4)` |
| `estimator="grpo", scale="batch"` | TRL `scale_rewards="batch"`: group mean, std of the whole batch |
| `estimator="grpo", scale="none"` or `estimator="dr_grpo"` | TRL `scale_rewards="none"` (Dr.GRPO): `r - mean_g` |
| `estimator="grpo", convention="verl"` | verl `compute_grpo_outcome_advantage` (`eps=1e-6`; `scale="none"` is `norm_adv_by_std_in_grpo=False`) |
| `estimator="rloo"` | TRL RLOOTrainer: `r - ` mean of the other scorable rewards; `normalize_advantages=True` as TRL's option |
| `estimator="rloo", convention="verl"` | verl `compute_rloo_outcome_advantage`: `n / (n - 1) * (r - mean_g)` |
| `estimator="reinforce++-baseline"` | verl `compute_reinforce_plus_plus_baseline_outcome_advantage` |
| `aggregation="normalize_then_sum"` | TRL `multi_objective_aggregation="normalize_then_sum"` (GDPO) |
| `reinforce_plus_plus_advantages` | verl 0.9.1 `compute_reinforce_plus_plus_outcome_advantage` (masked tokens skipped) |
| `remax_advantages` | verl 0.9.1 `compute_remax_outcome_advantage` (ReMax: the greedy response's reward as baseline) |
"""

from __future__ import annotations

import math

import torch

from ._checks import check_flag, check_group_index, values_checkable
from .backend import resolve
from .reference.advantages import SCALE_GIVEN, SCALE_GROUP, SCALE_NONE

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce++-baseline")
SCALES = ("group", "batch", "none")
CONVENTIONS = ("trl", "verl")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
DEFAULT_EPS = {"trl": 1e-4, "verl": 1e-6}
# verl's masked_whiten adds this to the variance before the square root.
WHITEN_EPS = 1e-8


@torch.library.custom_op("fastalign::group_advantages_forward", mutates_args=())
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
    """values [N] fp32/fp64 -> advantages [N]; groups are runs of `group_size` when `order` is
    empty, else segments `offsets` of the permutation `order`. Formula: reference/advantages.py."""
    _, forward = resolve("group_advantages_forward", rewards=values)
    return forward(values, order, offsets, group_size, rloo, scale, denom, eps, verl, nan_to_zero)


@group_advantages_forward.register_fake
def _(values, order, offsets, group_size, rloo, scale, denom, eps, verl, nan_to_zero):
    return values.new_empty(values.shape)


@torch.library.custom_op("fastalign::discounted_returns", mutates_args=())
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """rewards [B, T] fp32/fp64, mask [B, T] -> REINFORCE++ returns [B, T] (reference/advantages.py)."""
    _, forward = resolve("discounted_returns", rewards=rewards)
    return forward(rewards, mask, gamma)


@discounted_returns.register_fake
def _(rewards, mask, gamma):
    return rewards.new_empty(rewards.shape)


@torch.library.custom_op("fastalign::remax_advantages_forward", mutates_args=())
def remax_advantages_forward(
    rewards: torch.Tensor, mask: torch.Tensor, baselines: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, mask [B, T] and baselines [B] of one dtype, fp32/fp64 -> ReMax (advantages, returns)
    [B, T] (reference/advantages.py)."""
    _, forward = resolve("remax_advantages_forward", rewards=rewards)
    return forward(rewards, mask, baselines)


@remax_advantages_forward.register_fake
def _(rewards, mask, baselines):
    return rewards.new_empty(rewards.shape), rewards.new_empty(rewards.shape)


# --- argument checks --------------------------------------------------------------------------


def _choice(name: str, value: object, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"{name}: expected one of {', '.join(repr(v) for v in valid)}; got {value!r}")
    return value


def _float_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name}: expected a float or integer tensor, got {value.dtype}")
    return value if value.dtype == torch.float64 else value.float()


def _check_mask(mask: object, batch: int, device: torch.device, name: str = "response_mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2 or mask.shape[0] != batch:
        raise ValueError(f"{name}: expected shape [{batch}, T] (one row per reward), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the rewards' device), got {mask.device}")
    if mask.is_complex():
        raise TypeError(f"{name}: expected a bool, integer or float tensor, got {mask.dtype}")
    return mask


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a number, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps}")
    return float(eps)


def _layout(batch: int, group_size: object, group_index: object, device: torch.device):
    """(order, offsets, group_size) for the kernel: contiguous runs, or a stable sort of the ids."""
    if (group_size is None) == (group_index is None):
        raise ValueError("group_size, group_index: pass exactly one (a contiguous group size, or a group id per row)")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size: expected an int, got {type(group_size).__name__}")
        if group_size < 1:
            raise ValueError(f"group_size: expected an int >= 1, got {group_size}")
        if batch % group_size != 0:
            raise ValueError(f"group_size: the batch of {batch} rewards is not divisible by group_size={group_size}")
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty, group_size
    check_group_index(group_index, batch, device, "reward")
    # One stable sort gives every backend the same segments (see csrc/cpu/advantages.cpp).
    sorted_ids, order = torch.sort(group_index.to(torch.int64), stable=True)
    _, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets, 0


def _tile_layout(order, offsets, group_size, batch: int, k: int):
    """The layout of k columns laid end to end ([K * B]), each grouped like the batch."""
    if order.numel() == 0:
        return order, offsets, group_size
    shift = torch.arange(k, device=order.device, dtype=torch.int64) * batch
    tiled_order = (order.unsqueeze(0) + shift.unsqueeze(1)).reshape(-1)
    starts = (offsets[:-1].unsqueeze(0) + shift.unsqueeze(1)).reshape(-1)
    tiled_offsets = torch.cat([starts, offsets.new_tensor([k * batch])])
    return tiled_order, tiled_offsets, group_size


def _nanstd_all(x: torch.Tensor) -> torch.Tensor:
    """TRL's `nanstd` over the whole batch (Bessel, NaN ignored), 0 for a batch of one as TRL sets it."""
    if x.numel() <= 1:
        return torch.zeros(1, dtype=x.dtype, device=x.device)
    valid = ~torch.isnan(x)
    count = valid.sum()
    mean = torch.where(valid, x, 0).sum() / count
    var = torch.where(valid, (x - mean) ** 2, 0).sum() / (count - 1)
    return var.sqrt().reshape(1)


def _masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's `masked_whiten(values, mask) * mask`: masked mean, Bessel-corrected masked variance,
    `(values - mean) * rsqrt(var + 1e-8)`; the whole batch of tokens is one population."""
    m = mask.to(values.dtype)
    total = m.sum()
    if bool(total <= 1):
        raise ValueError(
            f"response_mask: whitening over the batch needs at least 2 unmasked tokens, found {int(total)}"
        )
    mean = (values * m).sum() / total
    var = (((values - mean) ** 2) * m).sum() / total * (total / (total - 1))
    return (values - mean) * torch.rsqrt(var + WHITEN_EPS) * m


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_index: torch.Tensor | None = None,
    estimator: str = "grpo",
    scale: str | None = None,
    eps: float | None = None,
    convention: str = "trl",
    reward_weights: torch.Tensor | None = None,
    aggregation: str = "sum_then_normalize",
    normalize_advantages: bool = False,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-relative advantages, one kernel launch for the group statistics.

    Args:
        rewards: `[B]`, or `[B, K]` with one column per reward function (combined with
            `reward_weights` by `nansum`, as TRL does; a row whose K rewards are all NaN is
            unscorable). For verl, pass `token_level_rewards.sum(-1)`.
        group_size: groups are consecutive runs of this many rows (TRL's `num_generations`).
        group_index: or an integer group id per row (verl's `uid`): arbitrary ids, groups of
            different sizes, rows of one group need not be adjacent. Exactly one of the two.
        estimator: "grpo", "dr_grpo" (GRPO without the std division), "rloo",
            "reinforce++-baseline" (group mean removed, then whitened over the response tokens:
            needs `response_mask`; always verl's convention).
        scale: "group" (divide by the group's std), "batch" (by the std of all rewards, TRL's
            `scale_rewards="batch"`) or "none". Default: "group" for "grpo", "none" otherwise.
        eps: added to the std; default 1e-4 (TRL) or 1e-6 (verl's `epsilon`). Must be >= 0.
        convention: "trl": NaN rewards are left out of the statistics and their advantage is 0,
            a group with one scorable reward gives 0. "verl": NaN propagates; a group of one has
            mean 0 and std 1 (GRPO) or keeps its reward (RLOO).
        reward_weights: `[K]` weights of the reward columns; default all ones.
        aggregation: "sum_then_normalize" (weighted sum, then the estimator) or
            "normalize_then_sum" (TRL's GDPO option: each column normalized within its group as
            `(r - nanmean) / (nanstd + 1e-4)`, weighted `nansum`, then the sum normalized over the
            batch with `eps`). Only with "grpo" and the TRL convention.
        normalize_advantages: RLOO only, TRL's option: advantages whitened over the batch,
            `(A - nanmean(A)) / (nanstd(A) + eps)`.
        response_mask: `[B, T]`; when given the result is `advantage[:, None] * response_mask`.

    Returns:
        float32 advantages (float64 for float64 rewards), `[B]`, or `[B, T]` with `response_mask`.
    """
    estimator = _choice("estimator", estimator, ESTIMATORS)
    convention = _choice("convention", convention, CONVENTIONS)
    aggregation = _choice("aggregation", aggregation, AGGREGATIONS)
    if scale is None:
        scale = "group" if estimator == "grpo" else "none"
    scale = _choice("scale", scale, SCALES)
    if estimator in ("dr_grpo", "reinforce++-baseline") and scale != "none":
        raise ValueError(f"scale: estimator {estimator!r} does not divide by a std; expected 'none', got {scale!r}")
    if estimator == "reinforce++-baseline":
        convention = "verl"
    eps = _check_eps(DEFAULT_EPS[convention] if eps is None else eps)
    rewards = _float_tensor("rewards", rewards)
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards: expected shape [B] or [B, K], got {tuple(rewards.shape)}")
    batch = rewards.shape[0]
    if batch == 0:
        raise ValueError("rewards: the batch is empty")
    order, offsets, size = _layout(batch, group_size, group_index, rewards.device)
    if response_mask is not None:
        response_mask = _check_mask(response_mask, batch, rewards.device)
    elif estimator == "reinforce++-baseline":
        raise ValueError("response_mask: estimator 'reinforce++-baseline' whitens over tokens and needs the mask")
    check_flag("normalize_advantages", normalize_advantages)
    if normalize_advantages and estimator != "rloo":
        raise ValueError("normalize_advantages: TRL's option for RLOO; use scale='batch' for GRPO")
    if aggregation == "normalize_then_sum" and (estimator != "grpo" or convention != "trl"):
        raise ValueError("aggregation: 'normalize_then_sum' is TRL's GDPO option, for estimator='grpo' and "
                         "convention='trl' only")

    k = rewards.shape[1] if rewards.dim() == 2 else 1
    if reward_weights is not None:
        reward_weights = _float_tensor("reward_weights", reward_weights).to(rewards.dtype)
        if reward_weights.dim() != 1 or reward_weights.shape[0] != k:
            raise ValueError(f"reward_weights: expected shape [{k}] (one weight per reward column), "
                             f"got {tuple(reward_weights.shape)}")
        if reward_weights.device != rewards.device:
            raise ValueError(f"reward_weights: expected a tensor on {rewards.device}, got {reward_weights.device}")
        if values_checkable(reward_weights) and not bool(torch.isfinite(reward_weights).all()):
            raise ValueError(f"reward_weights: expected finite weights, got {reward_weights.tolist()}")
    none = rewards.new_empty(0)
    trl_nan = convention == "trl"

    if aggregation == "normalize_then_sum":
        columns = rewards.reshape(batch, k).t().contiguous().reshape(-1)
        t_order, t_offsets, t_size = _tile_layout(order, offsets, size, batch, k)
        normed = group_advantages_forward(columns, t_order, t_offsets, t_size, False, SCALE_GROUP, none, 1e-4,
                                          False, False).reshape(k, batch).t()
        summed = _weighted_nansum(normed, reward_weights, unscorable=torch.isnan(rewards.reshape(batch, k)).all(1))
        whole = torch.empty(0, dtype=torch.int64, device=rewards.device)
        adv = group_advantages_forward(summed, whole, whole, batch, False, SCALE_GROUP, none, eps, False, True)
    else:
        if rewards.dim() == 2:
            summed = _weighted_nansum(rewards, reward_weights, unscorable=torch.isnan(rewards).all(1))
        else:
            summed = rewards if reward_weights is None else rewards * reward_weights[0]
        rloo = estimator == "rloo"
        if scale == "group":
            mode, denom = SCALE_GROUP, none
        elif scale == "batch":
            if trl_nan:
                mode, denom = SCALE_GIVEN, _nanstd_all(summed)
            else:
                mode, denom = SCALE_GIVEN, summed.std().reshape(1) if batch > 1 else summed.new_zeros(1)
        else:
            mode, denom = SCALE_NONE, none
        post = normalize_advantages
        adv = group_advantages_forward(summed, order, offsets, size, rloo, mode, denom, eps, not trl_nan,
                                       trl_nan and not post)
        if post:
            whole = torch.empty(0, dtype=torch.int64, device=rewards.device)
            adv = group_advantages_forward(adv, whole, whole, batch, False, SCALE_GROUP, none, eps, False, True)

    if estimator == "reinforce++-baseline":
        return _masked_whiten(adv.unsqueeze(-1) * response_mask.to(adv.dtype), response_mask)
    if response_mask is not None:
        return adv.unsqueeze(-1) * response_mask.to(adv.dtype)
    return adv


def _weighted_nansum(rewards: torch.Tensor, weights: torch.Tensor | None, unscorable: torch.Tensor) -> torch.Tensor:
    weighted = rewards if weights is None else rewards * weights.unsqueeze(0)
    summed = weighted.nansum(dim=1)
    return summed.masked_fill(unscorable, float("nan")).contiguous()


def reinforce_plus_plus_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, *, gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl 0.9.1's REINFORCE++ (`compute_reinforce_plus_plus_outcome_advantage`,
    in verl/trainer/ppo/core_algos.py): discounted returns `G_t = r_t + gamma * G_{t+1}` over
    the unmasked tokens, scanned from the right, then whitened over every unmasked token of the
    batch and masked. Masked tokens (tool observations inside a multi-turn response, padding) are
    skipped as verl skips them: their reward is dropped, their return is 0, and the running return
    is carried across them undiscounted. A fractional mask `m` blends the two, as in verl:
    `G_t = m * (r_t + gamma * running)`, `running <- G_t + (1 - m) * running`.

    Args:
        token_level_rewards: `[B, T]`.
        response_mask: `[B, T]`, nonzero on response tokens (at least 2 in the batch).
        gamma: discount, finite and in [0, 1].

    Returns:
        `(advantages, returns)`, both `[B, T]` float32 (float64 for float64 rewards); the returns
        are 0 on masked tokens.
    """
    rewards = _float_tensor("token_level_rewards", token_level_rewards)
    if rewards.dim() != 2:
        raise ValueError(f"token_level_rewards: expected shape [B, T], got {tuple(rewards.shape)}")
    mask = _check_mask(response_mask, rewards.shape[0], rewards.device)
    if mask.shape != rewards.shape:
        raise ValueError(f"response_mask: expected shape {tuple(rewards.shape)} (that of token_level_rewards), "
                         f"got {tuple(mask.shape)}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma: expected a number in [0, 1], got {type(gamma).__name__}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma: expected a number in [0, 1], got {gamma!r}")
    returns = discounted_returns(rewards.contiguous(), mask.to(rewards.dtype).contiguous(), float(gamma))
    return _masked_whiten(returns, mask), returns


def remax_advantages(
    rewards: torch.Tensor,
    reward_baselines: torch.Tensor,
    *,
    response_mask: torch.Tensor | None = None,
    group_size: int | None = None,
    group_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """ReMax advantages (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement
    Learning Method for Aligning Large Language Models", Algorithm 1): the reward of each sampled
    response minus the reward of the greedy response to the same prompt, broadcast to its tokens.

    Args:
        rewards: `[B]` sequence rewards of the sampled responses, or `[B, T]` token-level rewards
            (verl's `token_level_rewards`; needs `response_mask`). Token-level rewards give verl
            0.9.1's `compute_remax_outcome_advantage` exactly: the reward-to-go
            `sum_{s >= t} rewards[s] * mask[s]` minus `baseline * mask[t]` (so a reward on the
            last token alone gives `reward - baseline` on every response token).
        reward_baselines: the greedy responses' rewards: `[B]`, one per row (verl's
            `reward_baselines`, repeated over the samples of a prompt), or one per prompt, `[G]`,
            with `group_size` (rows are runs of that many samples per prompt, TRL's
            `num_generations`) or `group_index` (each row's prompt, an index into the baselines).
        response_mask: `[B, T]`; with `[B]` rewards the result is `advantage[:, None] * mask`.

    Returns:
        float32 advantages (float64 for float64 rewards): `[B]`, or `[B, T]` with a mask.
    """
    advantages, _ = _remax(rewards, reward_baselines, response_mask, group_size, group_index)
    return advantages


def _remax(rewards, reward_baselines, response_mask, group_size, group_index):
    """(advantages, returns): the returns are verl's reward-to-go for token-level rewards, else the rewards."""
    rewards = _float_tensor("rewards", rewards)
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards: expected shape [B] (sequence rewards) or [B, T] (token-level), "
                         f"got {tuple(rewards.shape)}")
    batch = rewards.shape[0]
    if batch == 0:
        raise ValueError("rewards: the batch is empty")
    baselines = _float_tensor("reward_baselines", reward_baselines).to(rewards.dtype)
    if baselines.dim() != 1:
        raise ValueError(f"reward_baselines: expected shape [B] or [G] (one per prompt), got {tuple(baselines.shape)}")
    if baselines.device != rewards.device:
        raise ValueError(f"reward_baselines: expected a tensor on {rewards.device} (the rewards' device), "
                         f"got {baselines.device}")
    baselines = _row_baselines(baselines, batch, group_size, group_index, rewards.device)
    if response_mask is not None:
        response_mask = _check_mask(response_mask, batch, rewards.device)
    if rewards.dim() == 1:
        advantages = rewards - baselines
        if response_mask is None:
            return advantages, rewards
        m = response_mask.to(rewards.dtype)
        return advantages.unsqueeze(-1) * m, rewards.unsqueeze(-1) * m
    if response_mask is None:
        raise ValueError("response_mask: token-level rewards [B, T] need the response mask (verl's response_mask)")
    if response_mask.shape != rewards.shape:
        raise ValueError(f"response_mask: expected shape {tuple(rewards.shape)} (that of rewards), "
                         f"got {tuple(response_mask.shape)}")
    return remax_advantages_forward(rewards.contiguous(), response_mask.to(rewards.dtype).contiguous(),
                                    baselines.contiguous())


def _row_baselines(baselines, batch: int, group_size, group_index, device) -> torch.Tensor:
    """One baseline per row: as given, repeated over runs of `group_size`, or indexed by `group_index`."""
    if group_size is not None and group_index is not None:
        raise ValueError("group_size, group_index: pass at most one (per-prompt baselines laid out in runs, "
                         "or a prompt index per row)")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size: expected an int, got {type(group_size).__name__}")
        if group_size < 1 or baselines.shape[0] * group_size != batch:
            raise ValueError(f"group_size: expected {batch} rows = {baselines.shape[0]} baselines x group_size, "
                             f"got group_size={group_size}")
        return baselines.repeat_interleave(group_size)
    if group_index is not None:
        check_group_index(group_index, batch, device, "reward")
        # Checked on every device (one sync, once per step): an index past the baselines would read out of bounds.
        if not torch.compiler.is_compiling() and group_index.numel() and not bool(
                ((group_index >= 0) & (group_index < baselines.shape[0])).all()):
            raise ValueError(f"group_index: expected indices in [0, {baselines.shape[0]}) (one per baseline), got "
                             f"values in [{int(group_index.min())}, {int(group_index.max())}]")
        return baselines[group_index.long()]
    if baselines.shape[0] != batch:
        raise ValueError(f"reward_baselines: expected shape [{batch}] (one per row; or pass group_size / group_index "
                         f"for one per prompt), got {tuple(baselines.shape)}")
    return baselines
