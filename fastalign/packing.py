"""Packed rows: many sequences in one row `[1, total]` (padding-free training: flash-attention's
varlen, verl's remove-padding, TRL's padding-free collators), described by `cu_seqlens` (the
sequences' boundaries, `[S + 1]`, starting at 0) or `position_ids` (restarting at 0 where each
sequence starts).

The sequence-level losses take such rows as they are: the one pass over the vocabulary runs on the
packed row, and only its per-token results (a few numbers per token, never `[total, V]`) are laid
out as `[S, longest]` rows, padded with masked positions, for the per-sequence math. Gradients
flow back through that layout to the packed logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PackedLayout(NamedTuple):
    """Where each packed token goes: sequence `seq[i]`, position `pos[i]` in it; `count` sequences,
    the longest `width` tokens."""

    seq: torch.Tensor
    pos: torch.Tensor
    count: int
    width: int


def packed_layout(total: int, device: torch.device, cu_seqlens: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None) -> PackedLayout:
    """The layout of a packed row of `total` tokens from `cu_seqlens` or `position_ids` (one of them)."""
    if (cu_seqlens is None) == (position_ids is None):
        raise ValueError("cu_seqlens, position_ids: pass exactly one to describe a packed row")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise TypeError("cu_seqlens: expected a 1-d integer tensor [S + 1] of sequence boundaries")
        bounds = cu_seqlens.to(device=device, dtype=torch.int64)
        if bounds.numel() < 2:
            raise ValueError("cu_seqlens: expected at least one sequence (S + 1 >= 2 boundaries)")
        lengths = bounds[1:] - bounds[:-1]
        if int(bounds[0]) != 0 or int(bounds[-1]) != total or bool((lengths <= 0).any()):
            raise ValueError(
                f"cu_seqlens: expected increasing boundaries from 0 to the packed length {total}, "
                f"got {cu_seqlens.tolist()}"
            )
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
        pos = torch.arange(total, device=device) - bounds[:-1].repeat_interleave(lengths)
        return PackedLayout(seq, pos, lengths.numel(), int(lengths.max()))
    if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
        raise TypeError("position_ids: expected an integer tensor [1, total] or [total]")
    pos = position_ids.reshape(-1).to(device=device, dtype=torch.int64)
    if pos.numel() != total:
        raise ValueError(f"position_ids: expected {total} positions (the packed length), got {pos.numel()}")
    if total == 0 or int(pos[0]) != 0:
        raise ValueError("position_ids: a packed row starts a sequence at its first token (position 0)")
    starts = pos == 0
    if bool((pos[1:] != pos[:-1] + 1)[~starts[1:]].any()):
        raise ValueError("position_ids: within a sequence the positions must count up by 1 from 0")
    seq = torch.cumsum(starts.to(torch.int64), 0) - 1
    return PackedLayout(seq, pos, int(starts.sum()), int(pos.max()) + 1)


def unpack(values: torch.Tensor, layout: PackedLayout, fill=0) -> torch.Tensor:
    """Per-token values of a packed row (`[total]` or `[1, total]`) as `[S, width]` rows, `fill`
    past each sequence's end. Differentiable."""
    flat = values.reshape(-1)
    out = flat.new_full((layout.count, layout.width), fill)
    return out.index_put((layout.seq, layout.pos), flat)
