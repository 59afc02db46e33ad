"""Where a sequence-level loss finds its sequences' tokens: ordinary `[B, T]` rows, packed rows
(`fastalign.packing`), a context-parallel split of the tokens over a `sequence_group`
(`fastalign.context_parallel`), or packed rows split that way (verl's remove-padding with
sequence parallelism: the packed row is gathered, then unpacked).

The vocabulary pass always runs on the input as it is; `SequenceLayout.to_sequences` brings its
per-token results (and the per-token inputs) to `[S, longest]` rows for the per-sequence math.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .context_parallel import check_sequence_group, gather_tokens, token_counts
from .packing import PackedLayout, packed_layout, unpack

SCALING_DOC = """`sequence_group` (context parallelism): a process group over which every sequence's tokens
are split; each rank passes its slice of the per-token tensors (in rank order; with cu_seqlens
or position_ids, its slice of the packed row, which they describe whole) and the per-sequence
ones whole. Every rank gets the unsplit loss and metrics, and its own tokens' share of the
gradient. `vocab_group` (tensor parallelism): `logits` (and `ref_logits`) are this rank's slice
of the vocabulary, or `weight` (and `bias`) its rows of the lm_head (plain, or a DTensor
sharded along dim 0), the ranks' slices in rank order; `hidden` and `labels` (global ids) are
the same on every rank. No rank holds the whole vocabulary (`fastalign.vocab_parallel`)."""


class SequenceLayout(NamedTuple):
    """`packing`: the packed row's layout (None: ordinary rows); `group`: the sequence group (None:
    unsplit), `counts`: its ranks' token counts; `rows`: the number of sequences."""

    packing: PackedLayout | None
    group: object
    counts: list[int] | None
    rows: int

    def to_sequences(self, values: torch.Tensor | None, fill=0) -> torch.Tensor | None:
        """This rank's per-token `values` (`[B, T_local]`, `[1, total_local]`) as the whole
        sequences' rows `[S, T]`. Differentiable; collective when there is a sequence group."""
        if values is None:
            return None
        values = gather_tokens(values, self.group, self.counts)
        return values if self.packing is None else unpack(values, self.packing, fill)


def sequence_layout(logits, labels, cu_seqlens=None, position_ids=None, sequence_group=None,
                    paired: bool = False) -> SequenceLayout | None:
    """The layout of a sequence-level loss's input, None for ordinary unsplit `[B, T]` rows.

    Packed (`cu_seqlens` or `position_ids`, describing the whole packed row, after any gathering):
    `logits` (or hidden states) is one row `[1, total, ...]` with `labels` `[1, total]`, and a
    paired loss's row holds 2B >= 2 sequences (B chosen, then B rejected). `sequence_group`: each
    rank holds its slice of every sequence's tokens (collective: every rank of the group calls)."""
    check_sequence_group(sequence_group)
    packed = cu_seqlens is not None or position_ids is not None
    if not packed and sequence_group is None:
        return None
    shape = tuple(logits.shape) if hasattr(logits, "shape") else type(logits).__name__
    if not hasattr(logits, "shape") or len(logits.shape) != 3 or (packed and logits.shape[0] != 1):
        if packed:
            raise ValueError(f"logits: a packed row (cu_seqlens / position_ids) is [1, total, V], got {shape}")
        raise ValueError(f"logits: expected [B, T, V], got {shape}")
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), "
                         f"got {tuple(getattr(labels, 'shape', ()))}")
    return token_layout(labels.shape, labels.device, cu_seqlens, position_ids, sequence_group, paired)


def token_layout(shape: torch.Size, device: torch.device, cu_seqlens=None, position_ids=None, sequence_group=None,
                 paired: bool = False) -> SequenceLayout | None:
    """The layout of this rank's per-token tensors of `shape` ([B, T_local], or [1, total_local]
    packed); None for ordinary unsplit rows. Collective when there is a sequence group."""
    check_sequence_group(sequence_group)
    packed = cu_seqlens is not None or position_ids is not None
    if not packed and sequence_group is None:
        return None
    if packed and (len(shape) != 2 or shape[0] != 1):
        raise ValueError(f"labels: a packed row (cu_seqlens / position_ids) is [1, total], got {tuple(shape)}")
    counts = None if sequence_group is None else token_counts(shape[-1], sequence_group)
    total = shape[-1] if counts is None else sum(counts)
    packing = packed_layout(total, device, cu_seqlens, position_ids) if packed else None
    rows = packing.count if packing is not None else shape[0]
    if paired and packing is not None and rows % 2:
        raise ValueError(f"cu_seqlens / position_ids: a paired loss takes 2B packed sequences, B chosen then "
                         f"B rejected; got {rows}")
    return SequenceLayout(packing, sequence_group, counts, rows)
