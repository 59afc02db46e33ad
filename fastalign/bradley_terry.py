"""A Bradley–Terry fit of item scores per prompt, and the share of judgements it cannot explain.

The fit reads every judgement, so a conflicting one weighs in the likelihood as it was given.
Judgements: `fastalign.preference_judgements`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_positive_finite
from .preference_judgements import check_judgements, index_judgements, prompt_batches

# A fitted winner-minus-loser difference at or below this is a tie to the fit's precision (the
# Newton iterations stop at a gradient of `tolerance`, far below it).
TIE_TOLERANCE = 1e-7


class BradleyTerryFit(NamedTuple):
    """Bradley–Terry scores per prompt and what they leave unexplained.

    prompts: `[P]` distinct prompt ids, ascending.
    item_prompts, items, scores: `[K]` one row per (prompt, item), sorted by prompt then item id;
        `scores` fp64, mean 0 within each prompt.
    judgement_margins: `[N]` fp64, s_winner - s_loser of each input row, in input order.
    unexplained_fraction: `[P]` fp64, the share of each prompt's judgements whose winner the fit
        does not rank above the loser (sigma(s_w - s_l) <= 0.5, a difference <= TIE_TOLERANCE).
    converged: `[P]` bool, the gradient's largest entry reached `tolerance`.
    """

    prompts: torch.Tensor
    item_prompts: torch.Tensor
    items: torch.Tensor
    scores: torch.Tensor
    judgement_margins: torch.Tensor
    unexplained_fraction: torch.Tensor
    converged: torch.Tensor


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value}")
    return value


def _penalized_nll(scores: torch.Tensor, counts: torch.Tensor, l2: float) -> torch.Tensor:
    """-sum_ij counts_ij log sigma(s_i - s_j) + l2/2 |s|^2 per prompt."""
    differences = scores.unsqueeze(-1) - scores.unsqueeze(-2)
    return -(counts * F.logsigmoid(differences)).sum((-1, -2)) + 0.5 * l2 * (scores * scores).sum(-1)


def _fit_scores(counts: torch.Tensor, l2: float, max_iterations: int, tolerance: float):
    """Newton's method with a backtracking (Armijo) line search, batched: [b, n, n] counts ->
    ([b, n] scores, [b] converged). The objective is l2-strongly convex, so the Hessian
    diag(W 1) - W + l2 I, W_ij = N_ij p_ij (1 - p_ij), is positive definite. A prompt leaves the
    batch once its gradient's largest entry is at most `tolerance`."""
    batch, n = counts.shape[0], counts.shape[1]
    scores = torch.zeros(batch, n, dtype=torch.float64, device=counts.device)
    converged = torch.zeros(batch, dtype=torch.bool, device=counts.device)
    active = torch.arange(batch, device=counts.device)
    totals = counts + counts.transpose(1, 2)
    wins = counts.sum(2)
    current = scores
    objective = _penalized_nll(current, counts, l2)
    for iteration in range(max_iterations + 1):
        p = torch.sigmoid(current.unsqueeze(2) - current.unsqueeze(1))
        expected = totals * p
        gradient = expected.sum(2) - wins + l2 * current
        done = gradient.abs().amax(1) <= tolerance
        converged[active[done]] = True
        if iteration == max_iterations or bool(done.all()):
            break
        if bool(done.any()):
            keep = ~done
            active, counts, totals, wins, current, objective, p, expected, gradient = (
                x[keep] for x in (active, counts, totals, wins, current, objective, p, expected, gradient))
        weights = expected * (1 - p)
        hessian = -weights
        hessian.diagonal(dim1=1, dim2=2).add_(weights.sum(2) + l2)
        step = torch.linalg.solve(hessian, gradient)
        current, objective = _line_search(current, objective, step, (gradient * step).sum(1), counts, l2)
        scores[active] = current
    return scores, converged


def _line_search(scores, objective, step, decrease, counts, l2):
    """(scores - t * step, its objective) for the largest t in 1, 1/2, 1/4, ... meeting Armijo's
    condition, per prompt; a prompt no t improves keeps its scores."""
    # The slack lets a full step through where the decrease is below fp64 rounding of the
    # objective: Newton's local convergence then finishes the job.
    bound = objective + 16 * torch.finfo(torch.float64).eps * objective.abs()
    pending = torch.arange(scores.shape[0], device=scores.device)
    updated, updated_objective = scores.clone(), objective.clone()
    length = 1.0
    for _ in range(60):
        trial = scores[pending] - length * step[pending]
        value = _penalized_nll(trial, counts[pending], l2)
        accepted = value <= bound[pending] - 1e-4 * length * decrease[pending]
        updated[pending[accepted]] = trial[accepted]
        updated_objective[pending[accepted]] = value[accepted]
        pending = pending[~accepted]
        if pending.shape[0] == 0:
            break
        length /= 2
    return updated, updated_objective


def bradley_terry_fit(
    prompt_ids: torch.Tensor,
    item_a: torch.Tensor,
    item_b: torch.Tensor,
    a_won: torch.Tensor,
    *,
    l2: float = 1e-2,
    max_iterations: int = 100,
    tolerance: float = 1e-10,
) -> BradleyTerryFit:
    """Bradley–Terry scores of each prompt's items by penalized maximum likelihood, batched over prompts.

    The model is P(i ≻ j) = sigma(s_i - s_j) (Bradley & Terry 1952); each prompt's scores minimize

        -sum over its judgements of log sigma(s_winner - s_loser) + l2 / 2 * sum_i s_i^2

    The L2 term keeps the scores finite where the maximum-likelihood estimate has none (a prompt
    whose judgements a strict order explains: the likelihood rises without bound as the scores
    spread), and fixes the additive gauge: the likelihood's gradient sums to 0, so at the minimum
    sum_i s_i = 0 (mean 0 per prompt). As l2 -> 0 the scores tend to the MLE (Hunter 2004) with
    mean 0 where it exists.

    Args:
        prompt_ids, item_a, item_b, a_won: the `[N]` judgements (`fastalign.preference_judgements`).
        l2: the prior's weight (> 0), i.e. a N(0, 1 / l2) prior on each score.
        max_iterations: Newton steps at most (>= 1); `converged` says which prompts got there.
        tolerance: the stopping test on the gradient's largest entry (> 0).

    Returns:
        BradleyTerryFit: the scores, each judgement's fitted margin, and per prompt the share of
        its judgements the fit cannot explain (winner not scored above the loser): 0 for a prompt a
        strict order explains; for a 3-cycle whose pairs are judged once each, 1 (the scores are equal).
    """
    check_judgements(prompt_ids, item_a, item_b, a_won)
    l2 = check_positive_finite("l2", l2)
    max_iterations = _check_positive_int("max_iterations", max_iterations)
    tolerance = check_positive_finite("tolerance", tolerance)
    index = index_judgements(prompt_ids, item_a, item_b, a_won)
    device = index.prompts.device
    scores = torch.zeros(index.items.shape[0], dtype=torch.float64, device=device)
    converged = torch.zeros(index.prompts.shape[0], dtype=torch.bool, device=device)
    for n, batch, counts in prompt_batches(index):
        batch_scores, converged[batch] = _fit_scores(counts, l2, max_iterations, tolerance)
        positions = index.offsets[batch].unsqueeze(1) + torch.arange(n, device=device)
        scores[positions.reshape(-1)] = batch_scores.reshape(-1)
    base = index.offsets[index.row_prompt]
    margins = scores[base + index.winner] - scores[base + index.loser]
    unexplained = torch.zeros(index.prompts.shape[0], dtype=torch.float64, device=device)
    unexplained.index_add_(0, index.row_prompt, (margins <= TIE_TOLERANCE).to(torch.float64))
    judged = torch.bincount(index.row_prompt, minlength=index.prompts.shape[0])
    item_prompts = torch.repeat_interleave(index.prompts, index.num_items)
    return BradleyTerryFit(index.prompts, item_prompts, index.items, scores, margins, unexplained / judged, converged)

