"""Intransitive cycles (A ≻ B ≻ C ≻ A) in each prompt's majority preferences.

The majority graph has i ≻ j when i won more of their judgements than j; a pair split evenly is a
tie and gives no edge (counted in `tied_pairs`). Judgements: `fastalign.preference_judgements`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .preference_judgements import check_judgements, index_judgements, prompt_batches


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
        prompt_ids, item_a, item_b, a_won: the `[N]` judgements (`fastalign.preference_judgements`):
            integer ids and a bool "item_a won".

    Returns:
        IntransitivityReport: per prompt whether its majority graph has a cycle, its circular
        triads (directed 3-cycles), and one concrete cycle of each cyclic prompt.

    A prompt is cyclic iff the transitive closure of its majority graph has a diagonal entry
    (boolean matrix powers, batched over prompts). Circular triads are trace(A^3) / 3 of the
    majority adjacency A; for a complete tournament of n items with win counts s this is
    Kendall & Babington Smith's n(n^2 - 1)/24 - 1/2 sum_i (s_i - (n - 1)/2)^2.
    """
    check_judgements(prompt_ids, item_a, item_b, a_won)
    index = index_judgements(prompt_ids, item_a, item_b, a_won)
    count = index.prompts.shape[0]
    device = index.prompts.device
    is_cyclic = torch.zeros(count, dtype=torch.bool, device=device)
    triads = torch.zeros(count, dtype=torch.int64, device=device)
    tied = torch.zeros(count, dtype=torch.int64, device=device)
    cycles: dict[int, list[int]] = {}
    listed = None  # the ids as lists, read once the first cycle is found
    for _, batch, counts in prompt_batches(index):
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

