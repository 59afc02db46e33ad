"""Diagnostics of pairwise preference data: intransitive cycles and a Bradley–Terry fit per prompt.

Judgements are four `[N]` tensors, one row per judgement:

    prompt_ids  integer  the prompt both items answer (any ids, not necessarily dense)
    item_a      integer  one item (completion) of the pair
    item_b      integer  the other item, != item_a
    a_won       bool     True: item_a was preferred (a ≻ b); False: item_b was

Item ids are read within their prompt: the same id under two prompts names two unrelated items. A
TRL preference dataset (`prompt`, `chosen`, `rejected`) is such a table with `a_won` all True;
`judgements_from_dataset` builds the tensors from a `datasets.Dataset`.

Repeated judgements of a pair are kept as counts. The cycle analysis reads the majority graph:
i ≻ j when i won more of their judgements than j; a pair split evenly is a tie and gives no edge
(counted in `tied_pairs`). The Bradley–Terry fit reads every judgement, so a conflicting one
weighs in the likelihood as it was given.

The work is batched over prompts: prompts with the same number of items share one `[P, n, n]`
count tensor (no padding), split into batches of at most `_MAX_BATCH_ENTRIES` entries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import INDEX_DTYPES, check_positive_finite

# Entries (prompts x n x n) of one batch's count tensor: about 32 MB in fp64.
_MAX_BATCH_ENTRIES = 1 << 22
# A fitted winner-minus-loser difference at or below this is a tie to the fit's precision (the
# Newton iterations stop at a gradient of `tolerance`, far below it).
TIE_TOLERANCE = 1e-7


class PairwiseJudgements(NamedTuple):
    """The four `[N]` judgement tensors (see the module docstring); unpack into the diagnostics:
    `intransitive_cycles(*judgements)`."""

    prompt_ids: torch.Tensor
    item_a: torch.Tensor
    item_b: torch.Tensor
    a_won: torch.Tensor


class DatasetJudgements(NamedTuple):
    """`judgements_from_dataset`'s result: the tensors, and the values their ids index
    (`prompt_values[prompt_ids[k]]`, `item_values[item_a[k]]`)."""

    judgements: PairwiseJudgements
    prompt_values: list
    item_values: list


class IntransitivityReport(NamedTuple):
    """Per prompt, in the order of `prompts` (the distinct prompt ids, ascending):

    is_cyclic: `[P]` bool, the majority graph has a directed cycle (A ≻ B ≻ ... ≻ A).
    circular_triads: `[P]` int64, its directed 3-cycles (Kendall & Babington Smith's circular
        triads when every pair is judged).
    num_items: `[P]` int64, distinct items judged.
    tied_pairs: `[P]` int64, pairs judged both ways equally often (no majority edge).
    cycles: prompt id -> one cycle `[i0, i1, ..., ik]` of item ids, i0 ≻ i1 ≻ ... ≻ ik ≻ i0: a
        shortest cycle through the cyclic prompt's smallest item id that lies on one.
    """

    prompts: torch.Tensor
    is_cyclic: torch.Tensor
    circular_triads: torch.Tensor
    num_items: torch.Tensor
    tied_pairs: torch.Tensor
    cycles: dict[int, list[int]]

    @property
    def num_cyclic_prompts(self) -> int:
        return int(self.is_cyclic.sum())


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


class _Index(NamedTuple):
    prompts: torch.Tensor  # [P] distinct prompt ids
    row_prompt: torch.Tensor  # [N] position of each row's prompt in `prompts`
    num_items: torch.Tensor  # [P]
    offsets: torch.Tensor  # [P + 1] start of each prompt's items in `items`
    items: torch.Tensor  # [K] item ids, sorted by prompt then id
    winner: torch.Tensor  # [N] the winner's position among its prompt's items
    loser: torch.Tensor  # [N]


# --- checks ----------------------------------------------------------------------------------------


def _check_judgements(prompt_ids, item_a, item_b, a_won) -> None:
    for name, value in (("prompt_ids", prompt_ids), ("item_a", item_a), ("item_b", item_b), ("a_won", a_won)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 1:
            raise ValueError(
                f"{name}: expected a 1-d tensor [N], one value per judgement; got shape {tuple(value.shape)}"
            )
        if name == "a_won":
            if value.dtype != torch.bool:
                raise TypeError(f"a_won: expected a bool tensor (True: item_a won), got {value.dtype}")
        elif value.dtype not in INDEX_DTYPES:
            raise TypeError(f"{name}: expected an int64 or int32 tensor of ids, got {value.dtype}")
        if name != "prompt_ids":
            if value.shape != prompt_ids.shape:
                raise ValueError(
                    f"{name}: expected shape {tuple(prompt_ids.shape)} (that of prompt_ids), got {tuple(value.shape)}"
                )
            if value.device != prompt_ids.device:
                raise ValueError(
                    f"{name}: expected a tensor on {prompt_ids.device} (that of prompt_ids), got {value.device}"
                )
    if prompt_ids.shape[0] == 0:
        raise ValueError("prompt_ids: no judgement (N = 0)")
    same = item_a.to(torch.int64) == item_b.to(torch.int64)
    if bool(same.any()):
        row = int(same.nonzero()[0, 0])
        raise ValueError(f"item_b: an item judged against itself (item_a == item_b == {int(item_b[row])} at row {row})")


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value}")
    return value


# --- layout: prompts batched by their number of items ----------------------------------------------


def _index(prompt_ids, item_a, item_b, a_won) -> _Index:
    prompts, row_prompt = torch.unique(prompt_ids.to(torch.int64), return_inverse=True)
    n = row_prompt.shape[0]
    item_values, item_rank = torch.unique(torch.cat((item_a, item_b)).to(torch.int64), return_inverse=True)
    # One int64 key per (prompt, item), ordered by prompt then item id: each prompt's items are one
    # run of the sorted keys, numbered from its start.
    keys, key_index = torch.unique(row_prompt.repeat(2) * item_values.shape[0] + item_rank, return_inverse=True)
    key_prompt = keys // item_values.shape[0]
    num_items = torch.bincount(key_prompt, minlength=prompts.shape[0])
    offsets = torch.zeros(prompts.shape[0] + 1, dtype=torch.int64, device=prompts.device)
    torch.cumsum(num_items, 0, out=offsets[1:])
    local = key_index - offsets[key_prompt[key_index]]
    local_a, local_b = local[:n], local[n:]
    winner = torch.where(a_won, local_a, local_b)
    loser = torch.where(a_won, local_b, local_a)
    items = item_values[keys % item_values.shape[0]]
    return _Index(prompts, row_prompt, num_items, offsets, items, winner, loser)


def _batches(index: _Index):
    """(n, prompt positions [b], counts [b, n, n] fp64 with counts[k, i, j] = judgements i ≻ j) for
    every batch of prompts with n items."""
    # Prompts ranked by their number of items, rows by their prompt's rank: a batch is a range of
    # ranks, and its rows one slice of the sorted rows.
    prompt_order = torch.argsort(index.num_items, stable=True)
    rank = torch.empty_like(prompt_order)
    rank[prompt_order] = torch.arange(prompt_order.shape[0], device=rank.device)
    row_rank = rank[index.row_prompt]
    row_order = torch.argsort(row_rank, stable=True)
    sorted_rank = row_rank[row_order]
    sizes, group_counts = torch.unique_consecutive(index.num_items[prompt_order], return_counts=True)
    low = 0
    for n, group in zip(sizes.tolist(), group_counts.tolist()):
        per_batch = max(1, _MAX_BATCH_ENTRIES // (n * n))
        for first in range(low, low + group, per_batch):
            last = min(first + per_batch, low + group)
            bounds = torch.searchsorted(sorted_rank, torch.tensor([first, last], device=rank.device)).tolist()
            rows = row_order[bounds[0]:bounds[1]]
            counts = torch.zeros(last - first, n, n, dtype=torch.float64, device=rank.device)
            where = (row_rank[rows] - first, index.winner[rows], index.loser[rows])
            counts.index_put_(where, torch.ones_like(rows, dtype=torch.float64), accumulate=True)
            yield n, prompt_order[first:last], counts
        low += group


# --- intransitive cycles ---------------------------------------------------------------------------


def _closure(edges: torch.Tensor) -> torch.Tensor:
    """[b, n, n] 0/1 float -> reachability by paths of length >= 1 (repeated squaring: after k
    rounds, paths up to 2^k edges; a cycle has at most n)."""
    reach = edges
    for _ in range(max(1, math.ceil(math.log2(edges.shape[-1])))):
        longer = ((reach + reach @ reach) > 0).to(edges.dtype)
        if torch.equal(longer, reach):
            break
        reach = longer
    return reach


def _shortest_cycles(edges: torch.Tensor, start: torch.Tensor) -> list[list[int]]:
    """A shortest cycle through `start` [c] in each of the graphs `edges` [c, n, n] (bool, i ≻ j),
    as local item positions from `start`: one breadth-first search for all graphs at once, then
    the walk back through each one's parents."""
    count, n = edges.shape[0], edges.shape[1]
    rows = torch.arange(count, device=edges.device)
    parent = torch.full((count, n), -1, dtype=torch.int64, device=edges.device)
    closing = torch.full((count,), -1, dtype=torch.int64, device=edges.device)
    visited = torch.zeros(count, n, dtype=torch.bool, device=edges.device)
    visited[rows, start] = True
    frontier = visited.clone()
    for _ in range(n):
        steps = frontier.unsqueeze(2) & edges  # [c, u, w]: u in the frontier beats w
        back = steps[rows, :, start]  # u in the frontier beats the start: the cycle closes at u
        closes = (closing < 0) & back.any(1)
        closing = torch.where(closes, back.to(torch.int8).argmax(1), closing)
        reached = steps.any(1) & ~visited
        parent = torch.where(reached, steps.to(torch.int8).argmax(1), parent)
        visited |= reached
        frontier = reached & (closing < 0).unsqueeze(1)
        if bool((closing >= 0).all()):
            break
    # Walk back from the closing item to the start: trail[:, k] is k parents up.
    trail = [closing]
    for _ in range(n - 1):
        previous = trail[-1]
        up = parent.gather(1, previous.clamp(min=0).unsqueeze(1)).squeeze(1)
        trail.append(torch.where(previous == start, start, up))
    cycles = []
    for first, walk in zip(start.tolist(), torch.stack(trail, dim=1).tolist()):
        path = walk[: walk.index(first) + 1]
        cycles.append(path[::-1])
    return cycles


def intransitive_cycles(
    prompt_ids: torch.Tensor, item_a: torch.Tensor, item_b: torch.Tensor, a_won: torch.Tensor
) -> IntransitivityReport:
    """The intransitive cycles of each prompt's majority preferences.

    Args:
        prompt_ids, item_a, item_b, a_won: the `[N]` judgements (module docstring): integer ids
            and a bool "item_a won".

    Returns:
        IntransitivityReport: per prompt whether its majority graph has a cycle, its circular
        triads (directed 3-cycles), and one concrete cycle of each cyclic prompt.

    A prompt is cyclic iff the transitive closure of its majority graph has a diagonal entry
    (boolean matrix powers, batched over prompts). Circular triads are trace(A^3) / 3 of the
    majority adjacency A; for a complete tournament of n items with win counts s this is
    Kendall & Babington Smith's n(n^2 - 1)/24 - 1/2 sum_i (s_i - (n - 1)/2)^2.
    """
    _check_judgements(prompt_ids, item_a, item_b, a_won)
    index = _index(prompt_ids, item_a, item_b, a_won)
    count = index.prompts.shape[0]
    device = index.prompts.device
    is_cyclic = torch.zeros(count, dtype=torch.bool, device=device)
    triads = torch.zeros(count, dtype=torch.int64, device=device)
    tied = torch.zeros(count, dtype=torch.int64, device=device)
    cycles: dict[int, list[int]] = {}
    listed = None  # the ids as lists, read once the first cycle is found
    for _, batch, counts in _batches(index):
        against = counts.transpose(1, 2)
        edges = counts > against
        tied[batch] = ((counts == against) & (counts > 0)).sum((1, 2)) // 2
        # 0/1 floats: matrix products count paths exactly (fp32 to n = 2^24 per entry; the triad
        # sum, up to n^3, in fp64).
        adjacency = edges.to(torch.float64)
        triads[batch] = ((adjacency @ adjacency) * adjacency.transpose(1, 2)).sum((1, 2)).round().to(torch.int64) // 3
        on_cycle = _closure(adjacency.to(torch.float32)).diagonal(dim1=1, dim2=2) > 0
        cyclic = on_cycle.any(1)
        is_cyclic[batch] = cyclic
        if not bool(cyclic.any()):
            continue
        which = cyclic.nonzero().squeeze(1)
        # Items are numbered in ascending id order: the first on a cycle has the smallest id.
        start = on_cycle[which].to(torch.int8).argmax(1)
        if listed is None:
            listed = (index.prompts.tolist(), index.offsets.tolist(), index.items.tolist())
        prompts, offsets, items = listed
        for position, path in zip(batch[which].tolist(), _shortest_cycles(edges[which], start)):
            cycles[prompts[position]] = [items[offsets[position] + k] for k in path]
    return IntransitivityReport(index.prompts, is_cyclic, triads, index.num_items, tied, cycles)


# --- Bradley–Terry ---------------------------------------------------------------------------------


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
        prompt_ids, item_a, item_b, a_won: the `[N]` judgements (module docstring).
        l2: the prior's weight (> 0), i.e. a N(0, 1 / l2) prior on each score.
        max_iterations: Newton steps at most (>= 1); `converged` says which prompts got there.
        tolerance: the stopping test on the gradient's largest entry (> 0).

    Returns:
        BradleyTerryFit: the scores, each judgement's fitted margin, and per prompt the share of
        its judgements the fit cannot explain (winner not scored above the loser): 0 for a prompt a
        strict order explains; for a 3-cycle whose pairs are judged once each, 1 (the scores are equal).
    """
    _check_judgements(prompt_ids, item_a, item_b, a_won)
    l2 = check_positive_finite("l2", l2)
    max_iterations = _check_positive_int("max_iterations", max_iterations)
    tolerance = check_positive_finite("tolerance", tolerance)
    index = _index(prompt_ids, item_a, item_b, a_won)
    device = index.prompts.device
    scores = torch.zeros(index.items.shape[0], dtype=torch.float64, device=device)
    converged = torch.zeros(index.prompts.shape[0], dtype=torch.bool, device=device)
    for n, batch, counts in _batches(index):
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


# --- datasets --------------------------------------------------------------------------------------


def _key(value: object) -> Hashable:
    # Conversational columns hold lists of message dicts: their JSON text stands for them (tagged,
    # so that no string value can be taken for it).
    try:
        hash(value)
    except TypeError:
        return ("json", json.dumps(value, sort_keys=True, default=str))
    return value


def _column(dataset, argument: str, column: object) -> list:
    if not isinstance(column, str):
        raise TypeError(f"{argument}: expected a column name (str), got {type(column).__name__}")
    if column not in dataset.column_names:
        raise ValueError(f"{argument}: {column!r} is not a column of the dataset (columns: {dataset.column_names})")
    return list(dataset[column])


def judgements_from_dataset(
    dataset,
    *,
    prompt_column: str = "prompt",
    a_column: str = "chosen",
    b_column: str = "rejected",
    a_won_column: str | None = None,
) -> DatasetJudgements:
    """The judgement tensors of a `datasets.Dataset` (or anything with `column_names` and
    `dataset[column]`), one judgement per row.

    Args:
        dataset: the rows.
        prompt_column: the prompt (any value: text, a conversation, an id).
        a_column, b_column: the two items. The defaults read TRL's preference format, where the
            chosen completion won every row.
        a_won_column: a bool column, True where the a item won; None: a won every row.

    Returns:
        DatasetJudgements: `judgements` (int64 ids and the bool `a_won`), `prompt_values` and
        `item_values`, the distinct values in order of first appearance, indexed by the ids. Items
        share one numbering across prompts; the diagnostics read them within each prompt.
    """
    if not hasattr(dataset, "column_names"):
        raise TypeError(f"dataset: expected a datasets.Dataset (with column_names), got {type(dataset).__name__}")
    prompts = _column(dataset, "prompt_column", prompt_column)
    a_items = _column(dataset, "a_column", a_column)
    b_items = _column(dataset, "b_column", b_column)
    if not prompts:
        raise ValueError("dataset: no rows")
    if a_won_column is None:
        a_won = [True] * len(prompts)
    else:
        a_won = _column(dataset, "a_won_column", a_won_column)
        wrong = next((value for value in a_won if not isinstance(value, bool)), None)
        if wrong is not None:
            raise TypeError(f"a_won_column: expected bool values (True: the a item won), found {wrong!r}")
    prompt_values, prompt_ids = _numbered(prompts)
    item_values, item_ids = _numbered(a_items + b_items)
    judgements = PairwiseJudgements(
        torch.tensor(prompt_ids, dtype=torch.int64),
        torch.tensor(item_ids[: len(a_items)], dtype=torch.int64),
        torch.tensor(item_ids[len(a_items):], dtype=torch.int64),
        torch.tensor(a_won, dtype=torch.bool),
    )
    return DatasetJudgements(judgements, prompt_values, item_values)


def _numbered(values: list) -> tuple[list, list[int]]:
    """(distinct values in order of first appearance, the id of each value)."""
    ids: dict[Hashable, int] = {}
    distinct = []
    numbers = []
    for value in values:
        key = _key(value)
        if key not in ids:
            ids[key] = len(distinct)
            distinct.append(value)
        numbers.append(ids[key])
    return distinct, numbers
