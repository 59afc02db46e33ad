"""Pairwise preference judgements as tensors: their checks, their layout by prompt, and reading them
from a dataset. The diagnostics (`preference_cycles`, `bradley_terry`) read them through here.

Judgements are four `[N]` tensors, one row per judgement:

    prompt_ids  integer  the prompt both items answer (any ids, not necessarily dense)
    item_a      integer  one item (completion) of the pair
    item_b      integer  the other item, != item_a
    a_won       bool     True: item_a was preferred (a ≻ b); False: item_b was

Item ids are read within their prompt: the same id under two prompts names two unrelated items. A
TRL preference dataset (`prompt`, `chosen`, `rejected`) is such a table with `a_won` all True;
`judgements_from_dataset` builds the tensors from a `datasets.Dataset`.

Repeated judgements of a pair are kept as counts. The work is batched over prompts: prompts with the
same number of items share one `[P, n, n]` count tensor (no padding), split into batches of at most
`_MAX_BATCH_ENTRIES` entries.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from typing import NamedTuple

import torch

from ._checks import INDEX_DTYPES

# Entries (prompts x n x n) of one batch's count tensor: about 32 MB in fp64.
_MAX_BATCH_ENTRIES = 1 << 22


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


class JudgementIndex(NamedTuple):
    prompts: torch.Tensor  # [P] distinct prompt ids
    row_prompt: torch.Tensor  # [N] position of each row's prompt in `prompts`
    num_items: torch.Tensor  # [P]
    offsets: torch.Tensor  # [P + 1] start of each prompt's items in `items`
    items: torch.Tensor  # [K] item ids, sorted by prompt then id
    winner: torch.Tensor  # [N] the winner's position among its prompt's items
    loser: torch.Tensor  # [N]


# --- checks ----------------------------------------------------------------------------------------


def check_judgements(prompt_ids, item_a, item_b, a_won) -> None:
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



# --- layout: prompts batched by their number of items ----------------------------------------------


def index_judgements(prompt_ids, item_a, item_b, a_won) -> JudgementIndex:
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
    return JudgementIndex(prompts, row_prompt, num_items, offsets, items, winner, loser)


def prompt_batches(index: JudgementIndex):
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
