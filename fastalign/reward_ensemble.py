"""Reward-model ensembles: K reward models' scores combined per sample, and their votes on
preference pairs.

The layout is `[K, B]`, models first: row k holds reward model k's scalar scores of the B samples,
as `torch.stack` builds it from K per-model `[B]` tensors; such a list (or tuple) is also accepted
and stacked here. A single model's `[B]` scores are rejected rather than guessed at (pass
`scores.unsqueeze(0)`): a 1-d tensor could be K models' scores of one sample as well.

* `ensemble_rewards(scores, reduction=...)`: one reward per sample. "mean"; "min", the worst case
  (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization": worst-case
  optimization, WCO); "mean_minus_std", mean − λ·σ (Eisenstein et al. 2023, "Helping or Herding?
  Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking"); "mean_minus_var",
  mean − λ·σ², Coste et al.'s uncertainty-weighted optimization (UWO), which penalizes the
  variance rather than the standard deviation. `normalize=True` z-scores each model first.
* `ensemble_preferences(chosen_scores, rejected_scores)`: each model votes on each pair; the
  majority, the share of votes for the chosen response, the agreement (with the majority, or with
  human labels), the margins' mean and spread.
* `flag_inconsistent_pairs(chosen_scores, rejected_scores, threshold=)`: the pairs whose human
  label too few models agree with, to inspect or drop when cleaning a preference dataset.
* `flag_inconsistent_rows(dataset, chosen_columns, rejected_columns)`
  (`fastalign.reward_ensemble_dataset`): the same on a `datasets.Dataset` with one score column
  per model: `agreement` and `flagged` columns added, the flagged rows optionally dropped.

Conventions shared by every function:

* The spread across models is the population standard deviation (divided by K, not K − 1), the
  intra-ensemble variance of Coste et al.'s UWO: K = 1 has spread 0, so every reduction of one
  model is its own score.
* NaN marks a score a model did not give (it failed on that sample): that model is left out of
  that sample's statistics and votes. A sample no model scored gets NaN (and no vote).
* Scores must otherwise be finite: ±inf is a ValueError where values can be read without a device
  synchronization (CPU tensors, outside torch.compile); on other devices it is not checked and
  propagates through the arithmetic. Large finite scores are safe: the spread is computed from
  deviations scaled by their largest, so ±1e30 in fp32 gives a finite standard deviation
  (the UWO variance of such scores still overflows fp32, as its square does).
* Scores may be fp32, bf16, fp16 or fp64; the arithmetic and the float results are fp32, or fp64
  when an input is fp64.
* Rewards fed to policy optimization are detached, so these functions run under `torch.no_grad()`.
* Everything is vectorized over the batch: no Python loop over samples, any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._checks import check_finite, check_flag, values_checkable

REDUCTIONS = ("mean", "min", "mean_minus_std", "mean_minus_var")
# The reductions that read `uncertainty_penalty` (λ), and the λ they use when none is given.
PENALIZED_REDUCTIONS = ("mean_minus_std", "mean_minus_var")
DEFAULT_UNCERTAINTY_PENALTY = 1.0


class EnsemblePreferences(NamedTuple):
    """The votes of K reward models on B preference pairs; every field is `[B]`.

    A model votes on a pair when it scored both responses (neither score NaN): for the chosen
    response when it scores it higher, for the rejected one when it scores that higher, and half a
    vote to each on a tie (equal scores).

    majority: int64, 1 where more than half of the votes go to the chosen response, -1 where more
        than half go to the rejected one, 0 on an even split or where no model voted.
    chosen_share: the fraction of the votes that go to the chosen response, in [0, 1]
        (ties counted half); NaN where no model voted.
    agreement: without human labels, the fraction of the votes that go with the majority,
        `max(chosen_share, 1 - chosen_share)`, in [0.5, 1]; with labels, the fraction that go to
        the response the human preferred, in [0, 1]. NaN where no model voted.
    mean_margin: the mean over the voting models of `chosen - rejected` (after `normalize=`).
    margin_std: the population standard deviation of those margins across the voting models.
    voters: int64, the number of models that voted.
    """

    majority: torch.Tensor
    chosen_share: torch.Tensor
    agreement: torch.Tensor
    mean_margin: torch.Tensor
    margin_std: torch.Tensor
    voters: torch.Tensor


class FlaggedPairs(NamedTuple):
    """flagged: `[B]` bool, the pairs whose agreement with the human label is below the threshold.
    agreement: `[B]`, the fraction of the voting models that prefer the human's choice (NaN where
    no model voted; such a pair is not flagged)."""

    flagged: torch.Tensor
    agreement: torch.Tensor


# --- argument checks --------------------------------------------------------------------------


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_float_tensor(name: str, value: torch.Tensor) -> None:
    if value.dtype == torch.bool or not value.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor of scores (float32, bfloat16, float16 or float64), "
            f"got {value.dtype}"
        )


def _stacked_rows(name: str, rows: Sequence[object]) -> torch.Tensor:
    """K `[B]` tensors as one `[K, B]` tensor, each row checked and named by its index."""
    if len(rows) == 0:
        raise ValueError(f"{name}: the list of per-model scores is empty (K = 0)")
    for k, row in enumerate(rows):
        if not isinstance(row, torch.Tensor):
            raise TypeError(
                f"{name}[{k}]: expected a [B] torch.Tensor of one model's scores, got {type(row).__name__}"
            )
        _check_float_tensor(f"{name}[{k}]", row)
        if row.dim() != 1:
            raise ValueError(
                f"{name}[{k}]: expected a 1-d tensor [B] of one model's scores, got shape {tuple(row.shape)}"
            )
        if k > 0 and row.shape != rows[0].shape:
            raise ValueError(
                f"{name}[{k}]: expected shape {tuple(rows[0].shape)} (that of {name}[0]), got {tuple(row.shape)}"
            )
        if row.device != rows[0].device:
            raise ValueError(
                f"{name}[{k}]: expected a tensor on {rows[0].device} (that of {name}[0]), got {row.device}"
            )
    dtype = _compute_dtype(*rows)
    return torch.stack([row.to(dtype) for row in rows])


def _score_matrix(name: str, scores: object, like: torch.Tensor | None = None, like_name: str = "") -> torch.Tensor:
    """A checked `[K, B]` score tensor (a list of K `[B]` tensors stacked); `like` fixes K, B and the device."""
    if isinstance(scores, (list, tuple)):
        scores = _stacked_rows(name, scores)
    elif not isinstance(scores, torch.Tensor):
        raise TypeError(
            f"{name}: expected a [K, B] torch.Tensor (K reward models' scores of B samples) or a list of K [B] "
            f"tensors, got {type(scores).__name__}"
        )
    _check_float_tensor(name, scores)
    if scores.dim() != 2:
        raise ValueError(
            f"{name}: expected shape [K, B] (K reward models' scores of B samples), got {tuple(scores.shape)}; "
            "one model's [B] scores are scores.unsqueeze(0)"
        )
    if like is not None:
        if scores.shape != like.shape:
            raise ValueError(
                f"{name}: expected shape {tuple(like.shape)} (that of {like_name}: the same K models and B pairs), "
                f"got {tuple(scores.shape)}"
            )
        if scores.device != like.device:
            raise ValueError(f"{name}: expected a tensor on {like.device} (that of {like_name}), got {scores.device}")
    elif scores.shape[0] == 0:
        raise ValueError(f"{name}: no reward model (K = 0 rows)")
    elif scores.shape[1] == 0:
        raise ValueError(f"{name}: the batch is empty (B = 0 columns)")
    if values_checkable(scores):
        infinite = torch.isinf(scores)
        if bool(infinite.any()):
            k, b = (int(i) for i in infinite.nonzero()[0])
            raise ValueError(
                f"{name}: expected finite scores, or NaN where a model gave none; found {scores[k, b].item()} "
                f"at [{k}, {b}] (model {k}, sample {b})"
            )
    return scores


def _score_pair(chosen_scores: object, rejected_scores: object) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = _score_matrix("chosen_scores", chosen_scores)
    rejected = _score_matrix("rejected_scores", rejected_scores, chosen, "chosen_scores")
    dtype = _compute_dtype(chosen, rejected)
    return chosen.to(dtype), rejected.to(dtype)


def _check_labels(labels: object, batch: int, device: torch.device) -> torch.Tensor | None:
    """The human labels as a `[B]` bool tensor (True: the chosen_scores response was preferred)."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a [B] bool or integer torch.Tensor, or None; got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"labels: expected a bool or integer tensor (True / 1: the human preferred the response of "
            f"chosen_scores, False / 0: that of rejected_scores), got {labels.dtype}"
        )
    if labels.shape != (batch,):
        raise ValueError(f"labels: expected shape [{batch}] (one label per pair), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels: expected a tensor on {device} (that of the scores), got {labels.device}")
    if labels.dtype == torch.bool:
        return labels
    if values_checkable(labels):
        bad = (labels != 0) & (labels != 1)
        if bool(bad.any()):
            position = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels: expected 0 or 1 (or bool); found {labels[position].item()} at pair {position}")
    return labels != 0


def _check_threshold(threshold: object) -> float:
    value = check_finite("threshold", threshold)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold: expected a fraction of the reward models, in [0, 1]; got {value}")
    return value


def _check_reduction(reduction: object) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(repr(r) for r in REDUCTIONS)}; got {reduction!r}")
    return reduction


def _check_uncertainty_penalty(uncertainty_penalty: object, reduction: str) -> float:
    if uncertainty_penalty is None:
        return DEFAULT_UNCERTAINTY_PENALTY if reduction in PENALIZED_REDUCTIONS else 0.0
    value = check_finite("uncertainty_penalty", uncertainty_penalty)
    if value < 0:
        raise ValueError(f"uncertainty_penalty: expected a finite number >= 0 (λ), got {value}")
    if reduction not in PENALIZED_REDUCTIONS:
        raise ValueError(
            f"uncertainty_penalty: read only by reduction='mean_minus_std' or 'mean_minus_var'; "
            f"got it with reduction={reduction!r}"
        )
    return value


# --- statistics over the models that scored -------------------------------------------------------


def _nan_moments(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population standard deviation along `dim` over the non-NaN entries (NaN where there
    are none)."""
    present = ~torch.isnan(x)
    count = present.sum(dim)
    zero = x.new_zeros(())
    mean = torch.where(present, x, zero).sum(dim) / count
    deviation = torch.where(present, x - mean.unsqueeze(dim), zero)
    # Squares of deviations beyond ~1e19 overflow fp32: scale by the largest deviation first.
    scale = deviation.abs().amax(dim)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    std = scale * torch.sqrt((deviation / scale.unsqueeze(dim)).square().sum(dim) / count)
    # Equal values have no spread; the mean's rounding would otherwise leave a few ulps of it.
    highest = torch.where(present, x, -math.inf).amax(dim)
    lowest = torch.where(present, x, math.inf).amin(dim)
    std = torch.where(highest == lowest, zero, std)
    return mean, std


def _nan_min(x: torch.Tensor, dim: int) -> torch.Tensor:
    present = ~torch.isnan(x)
    lowest = torch.where(present, x, math.inf).amin(dim)
    return torch.where(present.any(dim), lowest, math.nan)


def _standardized(x: torch.Tensor, dim: int) -> torch.Tensor:
    """z-scores along `dim` (NaN ignored and kept); values with no spread map to 0."""
    mean, std = _nan_moments(x, dim)
    mean, std = mean.unsqueeze(dim), std.unsqueeze(dim)
    # x * 0 keeps a NaN score NaN where a constant model's z-scores are 0.
    return torch.where(std > 0, (x - mean) / std, x * 0)


def _chosen_share(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(which models vote on which pair [K, B] bool, votes for the chosen response [B] with a tie
    counted half, number of voters [B] int64)."""
    voted = ~(torch.isnan(chosen) | torch.isnan(rejected))
    wins = (voted & (chosen > rejected)).sum(0)
    ties = (voted & (chosen == rejected)).sum(0)
    return voted, wins.to(chosen.dtype) + 0.5 * ties.to(chosen.dtype), voted.sum(0)


def _agreement(share: torch.Tensor, human: torch.Tensor | None) -> torch.Tensor:
    if human is None:
        return torch.maximum(share, 1 - share)
    return torch.where(human, share, 1 - share)


# --- the ensemble functions ---------------------------------------------------------------------


@torch.no_grad()
def ensemble_rewards(
    scores: torch.Tensor | Sequence[torch.Tensor],
    *,
    reduction: str = "mean",
    uncertainty_penalty: float | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """One reward per sample from K reward models' scores.

    Args:
        scores: `[K, B]`, row k the scores model k gave the B samples; or a list of K `[B]` tensors.
            NaN: the model gave no score for that sample (left out of that sample's reduction).
        reduction: how the K scores of a sample become one (σ² is the population variance across
            the models that scored it, σ its square root; K = 1 gives σ = 0):
            "mean": the ensemble mean;
            "min": the lowest score, the conservative worst case (Coste et al. 2023, WCO);
            "mean_minus_std": mean − λ·σ, the uncertainty-penalized reward of Eisenstein et al.
            2023 ("mean minus std");
            "mean_minus_var": mean − λ·σ², Coste et al.'s uncertainty-weighted optimization (UWO),
            which penalizes the variance, not the standard deviation.
        uncertainty_penalty: λ >= 0 (finite); only for "mean_minus_std" and "mean_minus_var",
            default 1.0.
        normalize: z-score each model's scores over the batch first, `(s - mean_b) / std_b`
            (population std over the model's non-NaN scores), so that models on different scales
            weigh alike; a model whose scores are all equal contributes 0. The statistics are the
            batch's: for statistics fixed over a dataset, standardize the scores before the call.

    Returns:
        `[B]` fp32 (fp64 for fp64 scores); NaN where no model scored the sample.
    """
    x = _score_matrix("scores", scores)
    reduction = _check_reduction(reduction)
    penalty = _check_uncertainty_penalty(uncertainty_penalty, reduction)
    normalize = check_flag("normalize", normalize)
    x = x.to(_compute_dtype(x))
    if normalize:
        x = _standardized(x, dim=1)
    if reduction == "min":
        return _nan_min(x, 0)
    mean, std = _nan_moments(x, 0)
    # λ = 0 is the mean, even where σ² overflows (0 · inf would be NaN).
    if reduction == "mean" or penalty == 0:
        return mean
    if reduction == "mean_minus_std":
        return mean - penalty * std
    return mean - penalty * std.square()


@torch.no_grad()
def ensemble_preferences(
    chosen_scores: torch.Tensor | Sequence[torch.Tensor],
    rejected_scores: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor | None = None,
    *,
    normalize: bool = False,
) -> EnsemblePreferences:
    """K reward models vote on B preference pairs (see `EnsemblePreferences` for each field).

    Args:
        chosen_scores, rejected_scores: `[K, B]` (or lists of K `[B]` tensors): model k's scores of
            the two responses of each pair. NaN in either: model k does not vote on that pair.
        labels: `[B]` bool or 0/1 integer human labels, True / 1 where the human preferred the
            response scored in `chosen_scores`, False / 0 where the one in `rejected_scores`; the
            agreement is then with the label. None: the agreement is with the ensemble's majority.
            (A dataset whose chosen column is by construction the preferred one has labels all
            True: `flag_inconsistent_pairs` reads it so.)
        normalize: z-score each model's 2B scores (both responses together) over the batch before
            the margins are taken, so that margins of models on different scales are comparable.
            The votes are always taken on the raw scores.

    Returns:
        EnsemblePreferences: majority, chosen_share, agreement, mean_margin, margin_std, voters.
    """
    chosen, rejected = _score_pair(chosen_scores, rejected_scores)
    human = _check_labels(labels, chosen.shape[1], chosen.device)
    normalize = check_flag("normalize", normalize)
    voted, chosen_votes, voters = _chosen_share(chosen, rejected)
    share = chosen_votes / voters
    majority = torch.sign(2 * chosen_votes - voters).to(torch.int64)
    if normalize:
        # The votes above come from the raw scores: z-scores of close, large scores can round equal.
        chosen, rejected = _standardized(torch.cat((chosen, rejected), dim=1), dim=1).chunk(2, dim=1)
    margin = torch.where(voted, chosen - rejected, math.nan)
    mean_margin, margin_std = _nan_moments(margin, 0)
    return EnsemblePreferences(majority, share, _agreement(share, human), mean_margin, margin_std, voters)


@torch.no_grad()
def flag_inconsistent_pairs(
    chosen_scores: torch.Tensor | Sequence[torch.Tensor],
    rejected_scores: torch.Tensor | Sequence[torch.Tensor],
    *,
    threshold: float = 0.5,
    labels: torch.Tensor | None = None,
) -> FlaggedPairs:
    """The pairs of a preference dataset whose human label the reward-model ensemble disagrees with.

    Each model votes as in `ensemble_preferences` (ties half a vote, a NaN score no vote); a pair
    is flagged when the fraction of the votes that go to the human's choice is below `threshold`
    (strictly). The human's choice is the `chosen_scores` response, or, with `labels`, the response
    the label names. Inspect or drop the flagged pairs: mislabelled ones are among them.

    Args:
        chosen_scores, rejected_scores: `[K, B]` (or lists of K `[B]` tensors).
        threshold: in [0, 1]. 0.5 flags the pairs where more than half of the votes go against
            the label; 0 flags none; 1 flags every pair with any vote, or half a vote, against it.
        labels: `[B]` bool or 0/1 integer, True / 1 where the human preferred the `chosen_scores`
            response; None: it always did.

    Returns:
        FlaggedPairs: `flagged` `[B]` bool and `agreement` `[B]` (NaN, and not flagged, where no
        model voted).
    """
    threshold = _check_threshold(threshold)
    chosen, rejected = _score_pair(chosen_scores, rejected_scores)
    human = _check_labels(labels, chosen.shape[1], chosen.device)
    if human is None:
        human = torch.ones(chosen.shape[1], dtype=torch.bool, device=chosen.device)
    _, chosen_votes, voters = _chosen_share(chosen, rejected)
    agreement = _agreement(chosen_votes / voters, human)
    return FlaggedPairs(agreement < threshold, agreement)

