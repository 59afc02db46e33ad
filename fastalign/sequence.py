"""Per-sequence log-probs from logits: the one pass over the vocabulary every sequence-level loss
(DPO family, SimPO/CPO, ORPO, KTO) starts from.

`token_logprobs` reads the logits once (and once more in backward, writing the gradient once);
everything here reduces [B, T] per-token values, never [B, T, V].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .logprobs import token_logprobs
from .masked import masked_mean
from .sequence_layout import SequenceLayout
from .types import HiddenStates, TokenLogprobs


class SequenceLogprobs(NamedTuple):
    """logps: [B] sum of log p over the counted tokens (differentiable); num_tokens: [B] fp32 count;
    mask: [B, T] bool, the counted positions; token: the per-token fields ([B, T], 0 off the mask)."""

    logps: torch.Tensor
    num_tokens: torch.Tensor
    mask: torch.Tensor
    token: TokenLogprobs


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    completion_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    outputs: Sequence[str] = (),
    layout: SequenceLayout | None = None,
    vocab_group=None,
) -> SequenceLogprobs:
    """Sums of per-token log-probs over each sequence's completion tokens.

    `logits` [B, T, V] and `labels` [B, T] are aligned: logits[b, t] scores labels[b, t] (pass
    `logits[:, :-1]`, `input_ids[:, 1:]`, `completion_mask[:, 1:]` for a causal LM's output; the
    view is read in place). A position counts when its label is not `ignore_index` and
    `completion_mask` (if given) is nonzero there.

    `layout` (`fastalign.sequence_layout.sequence_layout`): packed rows, or tokens split over a
    sequence group; the per-token results come back as the whole sequences' [S, T] rows.
    """
    if not isinstance(logits, (torch.Tensor, HiddenStates)) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected [B, T, V], got {shape}")
    options = dict(temperature=temperature, ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                   mask=completion_mask, outputs=outputs, process_group=vocab_group)
    if isinstance(logits, HiddenStates):
        from .linear_logprobs import linear_token_logprobs

        token = linear_token_logprobs(logits.hidden, logits.weight, labels, bias=logits.bias, **options)
    else:
        token = token_logprobs(logits, labels, **options)
    mask = labels != ignore_index
    if completion_mask is not None:
        mask = mask & (completion_mask != 0)
    if layout is not None:
        token = TokenLogprobs(*(None if f is None else layout.to_sequences(f, False if f.dtype == torch.bool else 0)
                                for f in token))
        mask = layout.to_sequences(mask, False)
    return SequenceLogprobs(
        logps=token.logps.sum(-1), num_tokens=mask.sum(-1, dtype=torch.float32), mask=mask, token=token
    )


def split_pairs(values: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B, ...] -> ([B, ...] chosen, [B, ...] rejected): the first half chosen, the second rejected."""
    if values.dim() == 0 or values.shape[0] % 2:
        raise ValueError(
            f"{name}: a paired loss takes 2B rows, B chosen then B rejected; got {values.shape[0] if values.dim() else 0}"
        )
    return values.chunk(2, dim=0)


def check_logits_batch(logits: object, labels: object) -> None:
    """[2B, T, V] logits with labels [2B, T]; the odd-batch error names logits before any work is done."""
    if not isinstance(logits, (torch.Tensor, HiddenStates)) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected [2B, T, V] (B chosen rows, then B rejected), got {shape}")
    if logits.shape[0] == 0 or logits.shape[0] % 2:
        # No row at all would average over no pair: a NaN loss rather than an error.
        raise ValueError(
            f"logits: a paired loss takes 2B rows, B chosen then B rejected, with B >= 1; got {logits.shape[0]}"
        )
    if isinstance(labels, torch.Tensor) and labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels: expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), got {tuple(labels.shape)}"
        )


def metric(value: torch.Tensor) -> torch.Tensor:
    """A logged value: detached 0-d fp32, the mean when given several."""
    value = value.detach()
    return (value.mean() if value.dim() else value).float()


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                 rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics TRL's paired trainers (CPO, ORPO) log under these names: batch means of the
    rewards, the share of pairs whose chosen reward is higher, the margin and the log-probs."""
    return {
        "rewards/chosen": metric(chosen_rewards),
        "rewards/rejected": metric(rejected_rewards),
        "rewards/accuracies": metric((chosen_rewards > rejected_rewards).float()),
        "rewards/margins": metric(chosen_rewards - rejected_rewards),
        "logps/rejected": metric(rejected_logps),
        "logps/chosen": metric(chosen_logps),
    }


def completion_logits_metrics(
    mean_logits: torch.Tensor, mask: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """logits/chosen and logits/rejected: the vocabulary-mean logit averaged over the counted completion
    tokens of each half, as TRL's DPOTrainer logs them (0 for a half with no token).

    `gather` (several processes): a function returning every process's tensor concatenated along
    dim 0; the averages are then over every process's tokens (TRL sums and counts across ranks).

    TRL's CPO and ORPO trainers average the full logits tensor instead, prompt and padding positions
    included, so their value shifts with the padding; the completion-token average does not."""

    def average(values: torch.Tensor, half_mask: torch.Tensor) -> torch.Tensor:
        return metric(masked_mean(values.detach(), half_mask, gather=gather))

    chosen_logits, rejected_logits = mean_logits.chunk(2, dim=0)
    chosen_mask, rejected_mask = mask.chunk(2, dim=0)
    return {"logits/chosen": average(chosen_logits, chosen_mask),
            "logits/rejected": average(rejected_logits, rejected_mask)}
