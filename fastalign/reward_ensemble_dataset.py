"""`flag_inconsistent_pairs` on a `datasets.Dataset`: one score column per reward model, the
agreement and the flag added as columns, the flagged rows optionally dropped
(`fastalign.reward_ensemble` holds the math and its conventions). `datasets` is imported only
when called."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import check_flag
from .reward_ensemble import _check_threshold, flag_inconsistent_pairs

SCORE_COLUMN_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                       "uint8", "uint16", "uint32", "uint64", "null")
LABEL_COLUMN_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def _datasets_module():
    try:
        import datasets
    except ImportError:
        return None
    return datasets


def _check_dataset(dataset: object):
    datasets = _datasets_module()
    if datasets is None or not isinstance(dataset, datasets.Dataset):
        hint = " (a DatasetDict: call it on each split)" if type(dataset).__name__ == "DatasetDict" else ""
        raise TypeError(f"dataset: expected a datasets.Dataset{hint}, got {type(dataset).__name__}")
    return datasets


def _check_column(name: str, column: object, dataset, allowed: tuple[str, ...], datasets) -> str:
    if not isinstance(column, str):
        raise TypeError(f"{name}: expected column names (str), got {type(column).__name__} {column!r}")
    if column not in dataset.column_names:
        raise ValueError(
            f"{name}: the dataset has no column {column!r} (its columns: {', '.join(dataset.column_names)})"
        )
    feature = dataset.features[column]
    if not isinstance(feature, datasets.Value) or feature.dtype not in allowed:
        raise TypeError(
            f"{name}: column {column!r} holds {feature}; expected one of the value types {', '.join(allowed)}"
        )
    return column


def _check_score_columns(name: str, columns: object, dataset, datasets) -> list[str]:
    if isinstance(columns, str):
        columns = [columns]
    if not isinstance(columns, Sequence):
        raise TypeError(
            f"{name}: expected a list of column names, one per reward model; got {type(columns).__name__}"
        )
    if len(columns) == 0:
        raise ValueError(f"{name}: no column given (K = 0 reward models)")
    return [_check_column(name, column, dataset, SCORE_COLUMN_DTYPES, datasets) for column in columns]


def _check_new_column(name: str, column: object, dataset) -> str:
    if not isinstance(column, str) or not column:
        raise TypeError(
            f"{name}: expected a non-empty column name (str), got {type(column).__name__} {column!r}"
        )
    if column in dataset.column_names:
        raise ValueError(f"{name}: the dataset already has a column {column!r}; name the new column otherwise")
    return column


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size: expected an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size}")
    return batch_size


def _batch_scores(name: str, batch: dict, columns: list[str], rows: list[int]) -> torch.Tensor:
    """The `[K, B]` float64 scores of a batch; None (a model that gave no score) becomes NaN."""
    import numpy as np

    scores = torch.from_numpy(np.array([batch[column] for column in columns], dtype=np.float64))
    infinite = torch.isinf(scores)
    if bool(infinite.any()):
        k, b = (int(i) for i in infinite.nonzero()[0])
        raise ValueError(
            f"{name}: column {columns[k]!r} holds {scores[k, b].item()} at row {rows[b]}; expected finite "
            "scores, or None / NaN where a model gave none"
        )
    return scores


def _batch_labels(label_column: str, batch: dict, rows: list[int]) -> torch.Tensor:
    import numpy as np

    values = np.asarray(batch[label_column])
    # A missing label (None) makes the array one of Python objects.
    bad = np.equal(values, None) if values.dtype == object else (values != 0) & (values != 1)
    if bad.any():
        b = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"label_column: column {label_column!r} holds {batch[label_column][b]!r} at row {rows[b]}; "
            "expected 0 or 1 (or bool)"
        )
    return torch.from_numpy(values.astype(bool))


def flag_inconsistent_rows(
    dataset,
    chosen_columns: Sequence[str],
    rejected_columns: Sequence[str],
    *,
    threshold: float = 0.5,
    label_column: str | None = None,
    agreement_column: str = "agreement",
    flagged_column: str = "flagged",
    drop_flagged: bool = False,
    batch_size: int = 1000,
):
    """`flag_inconsistent_pairs` on a `datasets.Dataset` with one score column per reward model.

    Row i is pair i; `chosen_columns[k]` and `rejected_columns[k]` hold model k's scores of its two
    responses (numbers; None or NaN where model k gave none). The rows are read in batches
    (`Dataset.map(batched=True)`); a pair's votes depend on that pair alone, so the result is the
    same for every `batch_size`.

    Args:
        dataset: a `datasets.Dataset`.
        chosen_columns, rejected_columns: K column names each, in the same model order (one name
            alone is K = 1).
        threshold: in [0, 1], as in `flag_inconsistent_pairs`.
        label_column: a bool or 0/1 column, True / 1 where the human preferred the response of the
            chosen columns; None: the chosen response always is the preferred one (TRL's
            chosen / rejected layout).
        agreement_column, flagged_column: the names of the two columns added: the fraction of
            the voting models that agree with the human's choice (float64, NaN where none voted),
            and whether it is below the threshold (bool). Neither may exist already.
        drop_flagged: return only the rows not flagged (`Dataset.filter`).
        batch_size: rows per batch.

    Returns:
        datasets.Dataset: the dataset with the two columns added (and the flagged rows dropped
        when `drop_flagged`).
    """
    datasets = _check_dataset(dataset)
    chosen_columns = _check_score_columns("chosen_columns", chosen_columns, dataset, datasets)
    rejected_columns = _check_score_columns("rejected_columns", rejected_columns, dataset, datasets)
    if len(rejected_columns) != len(chosen_columns):
        raise ValueError(
            f"rejected_columns: expected {len(chosen_columns)} names (one per reward model, as chosen_columns), "
            f"got {len(rejected_columns)}"
        )
    shared = sorted(set(chosen_columns) & set(rejected_columns))
    if shared:
        raise ValueError(
            f"rejected_columns: column(s) {shared} also among chosen_columns; a model scores two responses"
        )
    if label_column is not None:
        _check_column("label_column", label_column, dataset, LABEL_COLUMN_DTYPES, datasets)
    threshold = _check_threshold(threshold)
    agreement_column = _check_new_column("agreement_column", agreement_column, dataset)
    flagged_column = _check_new_column("flagged_column", flagged_column, dataset)
    if flagged_column == agreement_column:
        raise ValueError(f"flagged_column: the same name as agreement_column ({agreement_column!r})")
    drop_flagged = check_flag("drop_flagged", drop_flagged)
    batch_size = _check_batch_size(batch_size)

    new_features = {agreement_column: datasets.Value("float64"), flagged_column: datasets.Value("bool")}
    if len(dataset) == 0:
        # map() calls no function on an empty dataset, so it would add no column.
        for name, feature in new_features.items():
            dataset = dataset.add_column(name, [], feature=feature)
        return dataset

    def annotate(batch: dict, rows: list[int]) -> dict:
        chosen = _batch_scores("chosen_columns", batch, chosen_columns, rows)
        rejected = _batch_scores("rejected_columns", batch, rejected_columns, rows)
        labels = None if label_column is None else _batch_labels(label_column, batch, rows)
        flagged, agreement = flag_inconsistent_pairs(chosen, rejected, threshold=threshold, labels=labels)
        return {agreement_column: agreement.tolist(), flagged_column: flagged.tolist()}

    annotated = dataset.map(
        annotate, with_indices=True, batched=True, batch_size=batch_size,
        features=datasets.Features({**dataset.features, **new_features}), desc="Reward-ensemble agreement",
    )
    if drop_flagged:
        import numpy as np

        annotated = annotated.filter(
            lambda flags: ~np.asarray(flags, dtype=bool), input_columns=flagged_column, batched=True,
            batch_size=batch_size, desc="Dropping flagged pairs",
        )
    return annotated
