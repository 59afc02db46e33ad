"""The Bradley–Terry loss of reward-model training.

The formula is TRL 1.16's `trl.RewardTrainer.compute_loss`:

    loss = -mean(logsigmoid(r_chosen - r_rejected - margin))
           + center_rewards_coefficient * mean((r_chosen + r_rejected) ** 2)

with its metrics `accuracy` (r_chosen > r_rejected), `margin` (mean r_chosen - r_rejected, without
the optional target margin) and `min_reward`, `mean_reward`, `max_reward` over all 2B scores.

The reward model's head outputs one score per sequence, so there is no vocabulary to fuse over: the
inputs are scores. `bradley_terry_loss` takes the chosen and rejected scores, `reward_loss` the
`[2B]` or `[2B, 1]` head output (B chosen rows, then B rejected, as TRL's collator stacks them), and
`RewardLoss` is the `nn.Module` form of `reward_loss`. The math runs in fp32 (fp64 stays fp64)
whatever the scores' dtype; the gradient comes back in it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_finite, check_sequence_values
from .sequence import metric, split_pairs
from .types import LossOutput


def check_center_rewards_coefficient(center_rewards_coefficient: float | None) -> float | None:
    """The checked coefficient: None, or a finite number >= 0."""
    if center_rewards_coefficient is None:
        return None
    value = check_finite("center_rewards_coefficient", center_rewards_coefficient)
    if value < 0:
        raise ValueError(f"center_rewards_coefficient: expected a number >= 0 or None, got {value}")
    return value


def _check_margin(margin: object, like: torch.Tensor, like_name: str) -> torch.Tensor | float | None:
    if margin is None or isinstance(margin, torch.Tensor):
        return margin if margin is None else check_sequence_values("margin", margin, like, like_name)
    return check_finite("margin", margin)


def bradley_terry_from_sequences(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None,
    center_rewards_coefficient: float | None,
) -> LossOutput:
    """The Bradley–Terry math on checked [B] scores."""
    difference = chosen_rewards - rejected_rewards
    target = difference if margin is None else difference - margin
    loss = -F.logsigmoid(target).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen_rewards + rejected_rewards) ** 2)
    with torch.no_grad():
        scores = torch.cat((chosen_rewards, rejected_rewards))
        metrics = {
            "min_reward": metric(scores.min()),
            "mean_reward": metric(scores.mean()),
            "max_reward": metric(scores.max()),
            "accuracy": metric((chosen_rewards > rejected_rewards).float()),
            "margin": metric(difference),
        }
    return LossOutput(loss, metrics)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> LossOutput:
    """Bradley–Terry loss on `[B]` chosen and `[B]` rejected scores.

    Args:
        chosen_rewards, rejected_rewards: `[B]` scores of each pair's chosen and rejected sequence.
        margin: a target margin subtracted from each difference, `[B]` (TRL's per-example `margin`
            column) or a number; None for none.
        center_rewards_coefficient: weight (>= 0) of the mean squared sum of each pair's scores, which
            pulls the rewards towards mean 0; None for none.

    Returns:
        LossOutput: the loss and TRL's metrics `min_reward`, `mean_reward`, `max_reward`, `accuracy`, `margin`.
    """
    center = check_center_rewards_coefficient(center_rewards_coefficient)
    chosen = check_sequence_values("chosen_rewards", chosen_rewards)
    rejected = check_sequence_values("rejected_rewards", rejected_rewards, chosen_rewards, "chosen_rewards")
    margin = _check_margin(margin, chosen_rewards, "chosen_rewards")
    return bradley_terry_from_sequences(chosen, rejected, margin, center)


def _split_rewards(rewards: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards: expected a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() == 2 and rewards.shape[1] == 1:
        rewards = rewards.squeeze(1)
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards: expected the scores as [2B] or [2B, 1] (one per sequence, B chosen then B rejected), "
            f"got shape {tuple(rewards.shape)}"
        )
    if rewards.shape[0] == 0:
        raise ValueError("rewards: the batch is empty")
    return split_pairs(rewards, "rewards")


def reward_loss(
    rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> LossOutput:
    """Bradley–Terry loss on a reward head's output `[2B]` or `[2B, 1]`: B chosen scores, then B rejected.

    See `bradley_terry_loss` for `margin` (`[B]` or a number), `center_rewards_coefficient` and the metrics.
    """
    center = check_center_rewards_coefficient(center_rewards_coefficient)
    chosen, rejected = _split_rewards(rewards)
    if not rewards.is_floating_point():
        raise TypeError(f"rewards: expected a floating-point tensor, got {rewards.dtype}")
    chosen = check_sequence_values("rewards", chosen)
    rejected = check_sequence_values("rewards", rejected)
    margin = _check_margin(margin, chosen, "rewards' chosen half")
    return bradley_terry_from_sequences(chosen, rejected, margin, center)


class RewardLoss(nn.Module):
    """Bradley–Terry reward-model loss on `[2B]` or `[2B, 1]` scores (see `reward_loss`)."""

    def __init__(self, center_rewards_coefficient: float | None = None) -> None:
        super().__init__()
        self.center_rewards_coefficient = check_center_rewards_coefficient(center_rewards_coefficient)

    def forward(self, rewards: torch.Tensor, margin: torch.Tensor | float | None = None) -> LossOutput:
        return reward_loss(rewards, margin=margin, center_rewards_coefficient=self.center_rewards_coefficient)

    def extra_repr(self) -> str:
        return f"center_rewards_coefficient={self.center_rewards_coefficient}"
