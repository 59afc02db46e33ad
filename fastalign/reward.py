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

Unlike the other losses there is no `hidden=, weight=, bias=` level: a reward head projects hidden
states to one score, not to a vocabulary, so there is no [V]-wide softmax to fuse and no logits
tensor to avoid; the scores it outputs are this loss's input.

Its one option, `center_rewards_coefficient`, follows every loss's convention: `reward_options(...)`
checks it into `RewardOptions`, the functions take it as a keyword or as `options=` (not both), and
`RewardLoss(**options)` checks it once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import option_docs
from ._checks import check_finite, check_sequence_values, options_from
from ._deprecation import keyword_only, parameter_names
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


@dataclass(frozen=True)
class RewardOptions:
    """Checked reward-loss options, built by `reward_options(...)`."""

    center_rewards_coefficient: float | None


def reward_options(*, center_rewards_coefficient: float | None = None) -> RewardOptions:
    """Checks the options into `RewardOptions`, for `options=` of `reward_loss` and `bradley_terry_loss`.

    Options:
        {options}
    """
    return RewardOptions(check_center_rewards_coefficient(center_rewards_coefficient))


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
    options: RewardOptions | None = None,
    **option_kwargs,
) -> LossOutput:
    """Bradley–Terry loss on `[B]` chosen and `[B]` rejected scores.

    Args:
        chosen_rewards, rejected_rewards: `[B]` scores of each pair's chosen and rejected sequence.
        margin: a target margin subtracted from each difference, `[B]` (TRL's per-example `margin`
            column) or a number; None for none.
        options: the options below, checked once by `reward_options(...)`; or pass them as keywords.

    Options (keywords, or options=reward_options(...), not both):
        {options}

    Returns:
        LossOutput: the loss and TRL's metrics `min_reward`, `mean_reward`, `max_reward`, `accuracy`, `margin`.

    Scores, not logits: there is no `hidden=, weight=, bias=` level (see the module docstring).
    """
    center = options_from(options, option_kwargs, RewardOptions, reward_options).center_rewards_coefficient
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
    options: RewardOptions | None = None,
    **option_kwargs,
) -> LossOutput:
    """Bradley–Terry loss on a reward head's output `[2B]` or `[2B, 1]`: B chosen scores, then B rejected.

    See `bradley_terry_loss` for `margin` (`[B]` or a number) and the metrics. It takes the head's
    scores, not logits, so it has no `hidden=, weight=, bias=` level: the reward head projects to
    one score, with no vocabulary to fuse over.

    Options (keywords, or options=reward_options(...), not both):
        {options}
    """
    center = options_from(options, option_kwargs, RewardOptions, reward_options).center_rewards_coefficient
    chosen, rejected = _split_rewards(rewards)
    if not rewards.is_floating_point():
        raise TypeError(f"rewards: expected a floating-point tensor, got {rewards.dtype}")
    chosen = check_sequence_values("rewards", chosen)
    rejected = check_sequence_values("rewards", rejected)
    margin = _check_margin(margin, chosen, "rewards' chosen half")
    return bradley_terry_from_sequences(chosen, rejected, margin, center)


class RewardLoss(nn.Module):
    """Bradley–Terry reward-model loss on `[2B]` or `[2B, 1]` scores (see `reward_loss`); the
    options are checked when it is built.

    Options (keywords):
        {options}
    """

    @keyword_only(*parameter_names(reward_options))
    def __init__(self, **options) -> None:
        super().__init__()
        self.options = reward_options(**options)

    @property
    def center_rewards_coefficient(self) -> float | None:
        return self.options.center_rewards_coefficient

    def forward(self, rewards: torch.Tensor, margin: torch.Tensor | float | None = None) -> LossOutput:
        return reward_loss(rewards, margin=margin, options=self.options)

    def extra_repr(self) -> str:
        return f"center_rewards_coefficient={self.options.center_rewards_coefficient}"


option_docs.document(option_docs.REWARD, reward_options, reward_options, bradley_terry_loss, reward_loss, RewardLoss)
