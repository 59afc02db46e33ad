"""Packed rows and context-parallel token splits for the policy losses (GRPO family, PPO, RLOO).

The vocabulary pass runs on the input as given (a packed row `[1, total, V]`, or this rank's slice
of every sequence's tokens); its per-token log-probs and entropies, and every per-token input,
are then brought to the whole sequences' `[S, T]` rows (`fastalign.sequence_layout`) and the loss
runs at its log-prob level there. So the per-sequence means, GSPO's sequence ratio, RLOO's sums,
the aggregation's counts and every metric are those of the padded, unsplit batch. The price: the
vocabulary pass is `token_logprobs`' forward and backward, not the one fused policy pass.
"""

from __future__ import annotations

import torch

from ._checks import check_vocab_group, policy_logits
from .policy import policy_token_fields
from .policy_inputs import check_policy_labels, check_tokens, token_shape
from .sequence_layout import token_layout
from .types import HiddenStates

LAYOUT_DOC = """`cu_seqlens` / `position_ids`: a packed row: `logits` [1, total, V] (or `hidden` [1, total, H],
or `logps` [1, total]) and each per-token input [1, total] hold S sequences, between `cu_seqlens`
[S + 1] or where `position_ids` restart at 0; per-sequence inputs ([S]) follow that order. The
loss and metrics are the padded [S, T] batch's. `sequence_group`: a process group over which
every sequence's tokens are split (context parallelism): each rank passes its slice of each
per-token input, in rank order, and the per-sequence inputs whole; every rank gets the unsplit
loss and metrics, and its own tokens' share of the gradient. Both: a packed row split over the
group (`cu_seqlens` / `position_ids` then describe the whole row). `vocab_group` (tensor
parallelism): `logits` are this rank's slice of the vocabulary, or `weight` (and `bias`) its rows
of the lm_head (plain, or a DTensor sharded along dim 0), the ranks' slices in rank order;
`hidden`, `labels` (global ids) and the rest are the same on every rank. No rank holds the whole
vocabulary, and every rank gets the whole loss (`fastalign.vocab_parallel`)."""


# What a per-token input holds past a packed sequence's end once in [S, T] rows: the vLLM ratio's
# neutral 1, since VESPO sums its log over every position as TRL does; 0 for the rest.
PADDING = {"importance_sampling_ratio": 1.0}


def laid_out(cu_seqlens, position_ids, sequence_group, vocab_group=None) -> bool:
    """Whether a policy loss's tokens come packed or split over a sequence group, or its
    vocabulary split over a tensor-parallel group."""
    return any(x is not None for x in (cu_seqlens, position_ids, sequence_group, vocab_group))


def policy_on_sequences(
    loss_fn, *, logits, labels, hidden, weight, bias, logps, entropies, completion_mask, transform,
    cu_seqlens, position_ids, sequence_group, token_inputs: dict, token_or_sequence_inputs: dict,
    vocab_group=None, **passthrough,
):
    """`loss_fn` (a policy loss at its logps level) on the whole sequences of a packed or split
    batch, or on a vocabulary split over `vocab_group`. `token_inputs`: per-token tensors shaped
    like `labels` (this rank's tokens); `token_or_sequence_inputs`: per token when shaped like
    `labels`, else per sequence (given whole on every rank, as the loss itself takes them);
    `passthrough`: the loss's other arguments."""
    vocab_size = None
    if vocab_group is not None and hidden is not None and weight is not None and logits is None:
        # This rank's rows stay local: no rank gathers the whole lm_head, not even for the checks.
        source = policy_logits(None, hidden, weight, bias, labels, vocab_group)
        weight, bias, vocab_size = source.weight, source.bias, source.vocab_size
    lm_head = (hidden, weight, bias) if (hidden is not None or weight is not None or bias is not None) else None
    shape, device, transform = token_shape(logits, labels, logps, transform, lm_head)
    mask = check_tokens("completion_mask", completion_mask, shape, device, floating=False)
    layout = token_layout(shape, device, cu_seqlens, position_ids, sequence_group)
    if lm_head is not None:
        source = policy_logits(None, hidden, weight, bias, labels) if vocab_size is None else None
        if source is not None:
            lm_head, vocab_size = tuple(source)[:3], source.shape[-1]
        check_policy_labels(labels, mask, vocab_size)
        logps, entropies = policy_token_fields(None, labels, lm_head, mask, transform, vocab_group)
    elif logits is not None:
        check_vocab_group(vocab_group, logits)
        if vocab_group is None:  # a slice's labels are checked against the whole vocabulary by the op
            check_policy_labels(labels, mask, logits.shape[-1])
        logps, entropies = policy_token_fields(logits, labels, None, mask, transform, vocab_group)
    else:
        if vocab_group is not None:
            raise ValueError("vocab_group: only used with logits= or hidden= (log-probs are already whole)")
        if entropies is not None:
            entropies = check_tokens("entropies", entropies, shape, device)
    seq = (lambda value: value) if layout is None else layout.to_sequences
    inputs = {}
    for name, value in token_inputs.items():
        if value is not None:
            value = check_tokens(name, value, shape, device, floating=not name.endswith("mask"))
        inputs[name] = seq(value)
    for name, value in token_or_sequence_inputs.items():
        per_token = isinstance(value, torch.Tensor) and value.shape == shape and shape[-1] != 1
        if per_token and layout is not None:
            value = layout.to_sequences(value, fill=PADDING.get(name, 0))
        inputs[name] = value
    return loss_fn(logps=seq(logps), entropies=seq(entropies), completion_mask=seq(mask), **inputs, **passthrough)
