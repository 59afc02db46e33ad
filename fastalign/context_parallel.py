"""Context parallelism: each sequence's tokens split over the ranks of a `sequence_group` (ring
attention's chunks, Ulysses' sequence shards, verl's sequence-parallel packed rows), every rank
holding the same sequences and a slice of their tokens, in rank order.

The vocabulary pass runs on each rank's own tokens; what a sequence-level loss needs across the
split is only per-token results (a few numbers per token, never `[T, V]`). They are gathered along
the sequence in one all-gather per field, so the per-sequence sums, means, ratios, aggregation
weights and metrics that follow are the unsplit computation's, on every rank alike. The backward
communicates nothing: every rank computes the same loss, so the gradient of a gathered field is
the same everywhere and each rank keeps its own tokens' part. The parameters' gradients, summed
over the sequence group (as data-parallel x context-parallel engines sum them), are then the
unsplit ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def check_sequence_group(group: object) -> None:
    """Refuses a `sequence_group` that is not a torch.distributed process group in use."""
    if group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sequence_group: torch.distributed is not initialized (init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"sequence_group: expected a torch.distributed ProcessGroup, got {type(group).__name__}")


def token_counts(local: int, group) -> list[int]:
    """Every rank's number of tokens per sequence, in rank order. Collective."""
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([local], dtype=torch.int64), group=group)
    return [int(s) for s in sizes]


def _all_gather_tokens(local: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    # all_gather wants equal shapes: slices are padded to the longest, then trimmed.
    width = max(counts)
    send = local
    if send.dtype == torch.bool:
        send = send.to(torch.uint8)
    if local.shape[-1] < width:
        send = torch.nn.functional.pad(send, (0, width - local.shape[-1]))
    parts = [torch.empty_like(send) for _ in counts]
    dist.all_gather(parts, send.contiguous(), group=group)
    out = torch.cat([p[..., :c] for p, c in zip(parts, counts)], dim=-1)
    return out.to(torch.bool) if local.dtype == torch.bool else out


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, group, counts):
        rank = dist.get_rank(group)
        ctx.span = (sum(counts[:rank]), counts[rank])
        return _all_gather_tokens(local, counts, group)

    @staticmethod
    def backward(ctx, grad):
        start, size = ctx.span
        return grad[..., start:start + size], None, None


def gather_tokens(values: torch.Tensor | None, group, counts: list[int] | None = None) -> torch.Tensor | None:
    """Per-token values `[..., T_local]` of this rank as the whole sequences' `[..., T]`, the ranks'
    slices in rank order. Differentiable: the backward keeps this rank's slice of the gradient.
    Collective: every rank of `group` must call it with the same leading shape."""
    if values is None or group is None:
        return values
    if counts is None:
        counts = token_counts(values.shape[-1], group)
    if values.requires_grad:
        return _GatherTokens.apply(values, group, counts)
    return _all_gather_tokens(values, counts, group)
