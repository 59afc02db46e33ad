"""RRHF: rank responses to align language models with human feedback (Yuan et al. 2023).

For each prompt, k >= 2 responses with rewards r_i. Each response's score is its length-normalised
log-probability under the policy, `p_i = sum_t log pi(y_i,t | x, y_i,<t) / |y_i|^length_penalty`
(paper Eq. 1, with the released code's `length_penalty` exponent; 1 in the paper), and the loss is

    L_rank = sum over pairs with r_i < r_j of max(0, p_i - p_j)                    (paper Eq. 2)
    L_ft   = -sum_t log pi(y_i',t | x, y_i',<t),  i' = argmax_i r_i                  (paper Eq. 3)
    L      = rank_weight * L_rank + sft_weight * L_ft                                (paper Eq. 4: both 1)

averaged over the prompts of the batch (the paper's batch is one prompt). Pairs of equal reward
are not ranked; among equal best rewards the first response is the SFT target (torch.argmax).
`sft_reduction="mean"` divides L_ft by the target's token count. The released training script
weights the ranking term by `rrhf_weight=100` and divides L_ft by the padded length of the batch;
`rank_weight=100, sft_reduction="mean"` is the padding-free form of that choice.

Groups: `group_size` (consecutive runs of k responses) or `group_index` (a prompt id per row:
groups of different sizes, rows of one group need not be adjacent). Three entry points share one
piece of math, `rrhf_from_sequences`:

- `rrhf_loss`: from per-sequence log-prob sums and token counts;
- `rrhf_loss_from_logits`: from `[N, T, V]` logits, or from the hidden states and the lm_head
  weight (`hidden=`, `weight=`, `bias=`), one pass over the vocabulary (`sequence_logprobs`);
- `RRHFLoss`: the `nn.Module` form of `rrhf_loss_from_logits`.

A response with no counted token has a log-prob sum of 0 and a score of 0 (its count taken as 1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from . import option_docs
from ._checks import (
    check_finite,
    check_group_index,
    check_ignore_index,
    check_sequence_values,
    check_token_mask,
    options_from,
    policy_logits,
    values_checkable,
)
from ._deprecation import keyword_only, parameter_names
from .sequence import metric, sequence_logprobs
from .sequence_layout import SCALING_DOC, sequence_layout
from .types import LossOutput

SFT_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class RRHFOptions:
    """Checked options, built by `rrhf_options(...)`."""

    rank_weight: float
    sft_weight: float
    length_penalty: float
    sft_reduction: str


def _non_negative(name: str, value: object) -> float:
    value = check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
    return value


@keyword_only("rank_weight", "sft_weight", "length_penalty", "sft_reduction")
def rrhf_options(
    *,
    rank_weight: float = 1.0,
    sft_weight: float = 1.0,
    length_penalty: float = 1.0,
    sft_reduction: str = "sum",
) -> RRHFOptions:
    """Checks RRHF's options into `RRHFOptions`, for `options=` of `rrhf_loss` and
    `rrhf_loss_from_logits`.

    Options:
        {options}
    """
    rank_weight = _non_negative("rank_weight", rank_weight)
    sft_weight = _non_negative("sft_weight", sft_weight)
    length_penalty = _non_negative("length_penalty", length_penalty)
    if sft_reduction not in SFT_REDUCTIONS:
        raise ValueError(f"sft_reduction: expected one of {', '.join(map(repr, SFT_REDUCTIONS))}; got {sft_reduction!r}")
    if rank_weight == 0 and sft_weight == 0:
        raise ValueError("rank_weight, sft_weight: both are 0, so the loss would be 0 whatever the policy")
    return RRHFOptions(rank_weight, sft_weight, length_penalty, sft_reduction)


# --- groups -------------------------------------------------------------------------------------


def response_groups(count: int, group_size: object, group_index: object, device: torch.device) -> torch.Tensor:
    """`[G, K]` row indices of each prompt's responses (K: the largest group), -1 past a group's end.
    Rows of a group keep their order in the batch."""
    if (group_size is None) == (group_index is None):
        raise ValueError("group_size, group_index: pass exactly one (k responses per prompt in consecutive runs, "
                         "or a prompt id per row)")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size: expected an int, got {type(group_size).__name__}")
        if group_size < 1:
            raise ValueError(f"group_size: expected an int >= 1, got {group_size}")
        if count % group_size:
            raise ValueError(f"group_size: the batch of {count} responses is not divisible by group_size={group_size}")
        return torch.arange(count, device=device).view(-1, group_size)
    check_group_index(group_index, count, device, "response")
    sorted_ids, order = torch.sort(group_index.to(torch.int64), stable=True)
    _, group_of_sorted, counts = torch.unique_consecutive(sorted_ids, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(count, device=device) - starts[group_of_sorted]
    rows = torch.full((counts.numel(), int(counts.max())), -1, dtype=torch.int64, device=device)
    rows[group_of_sorted, position] = order
    return rows


# --- the math -----------------------------------------------------------------------------------


def rrhf_from_sequences(
    logps: torch.Tensor,
    num_tokens: torch.Tensor,
    rewards: torch.Tensor,
    groups: torch.Tensor,
    options: RRHFOptions,
) -> LossOutput:
    """RRHF on checked `[N]` log-prob sums, token counts and rewards, grouped by `response_groups`."""
    valid = groups >= 0
    rows = groups.clamp(min=0)
    counts = num_tokens.to(logps.dtype).clamp(min=1)
    scores = logps / counts.pow(options.length_penalty)
    score = torch.where(valid, scores[rows], 0.0)  # [G, K]
    reward = torch.where(valid, rewards[rows].to(scores.dtype), float("-inf"))

    # Every ordered pair (i, j) of one prompt with r_i < r_j adds max(0, p_i - p_j).
    ranked = valid.unsqueeze(2) & valid.unsqueeze(1) & (reward.unsqueeze(2) < reward.unsqueeze(1))
    violation = torch.relu(score.unsqueeze(2) - score.unsqueeze(1))
    rank_loss = torch.where(ranked, violation, 0.0).sum(dim=(1, 2))

    best = rows.gather(1, reward.argmax(dim=1, keepdim=True)).squeeze(1)
    sft_loss = -logps[best]
    if options.sft_reduction == "mean":
        sft_loss = sft_loss / counts[best]

    loss = (options.rank_weight * rank_loss + options.sft_weight * sft_loss).mean()
    with torch.no_grad():
        pairs = ranked.sum()
        agree = (ranked & (score.unsqueeze(2) < score.unsqueeze(1))).sum()
        accuracy = torch.where(pairs > 0, agree / pairs.clamp(min=1), 1.0)
    metrics = {
        "rank_loss": metric(rank_loss),
        "sft_loss": metric(sft_loss),
        # The share of reward-ordered pairs whose scores are ordered the same way (1 with no pair).
        "rewards/accuracies": metric(accuracy),
        "scores/best": metric(scores[best]),
        "scores/mean": metric(scores),
    }
    return LossOutput(loss, metrics)


def _check_rewards(rewards: object, count: int, device: torch.device, like_name: str) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards: expected a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise TypeError(f"rewards: expected a float or integer tensor, got {rewards.dtype}")
    if rewards.shape != (count,):
        raise ValueError(f"rewards: expected shape [{count}] (one per response, as {like_name}), "
                         f"got {tuple(rewards.shape)}")
    if rewards.device != device:
        raise ValueError(f"rewards: expected a tensor on {device} (that of {like_name}), got {rewards.device}")
    # Ranking compares rewards: a NaN would silently drop every pair it is in.
    if values_checkable(rewards) and not bool(torch.isfinite(rewards).all()):
        position = int((~torch.isfinite(rewards)).nonzero()[0, 0])
        raise ValueError(f"rewards: expected finite rewards, found {rewards[position].item()} at position {position}")
    return rewards if rewards.dtype == torch.float64 else rewards.float()


def rrhf_loss(
    logps: torch.Tensor,
    num_tokens: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_index: torch.Tensor | None = None,
    options: RRHFOptions | None = None,
    **option_kwargs,
) -> LossOutput:
    """RRHF loss from per-sequence log-probs.

    Args:
        logps: `[N]` sums of per-token log-probs over each response (not averages).
        num_tokens: `[N]` counted response tokens (float or integer).
        rewards: `[N]` finite rewards of the responses (float or integer).
        group_size: responses are consecutive runs of this many per prompt; or
        group_index: `[N]` integer prompt ids (groups of different sizes, in any order). Exactly one.
        options: the options below, checked once by `rrhf_options(...)`; or pass them as keywords.

    Options (keywords, or options=rrhf_options(...), not both):
        {options}

    Returns:
        LossOutput: the loss averaged over prompts, and the metrics `rank_loss`, `sft_loss` (prompt
        means), `rewards/accuracies` (share of pairs with r_i < r_j whose scores have p_i < p_j),
        `scores/best` and `scores/mean` (length-normalised log-probs of the best and all responses).
    """
    options = options_from(options, option_kwargs, RRHFOptions, rrhf_options)
    logps = check_sequence_values("logps", logps)
    num_tokens = check_sequence_values("num_tokens", num_tokens, logps, "logps", counts=True)
    rewards = _check_rewards(rewards, logps.shape[0], logps.device, "logps")
    groups = response_groups(logps.shape[0], group_size, group_index, logps.device)
    return rrhf_from_sequences(logps, num_tokens, rewards, groups, options)


def rrhf_loss_from_logits(
    logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    group_index: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sequence_group: object = None,
    vocab_group: object = None,
    options: RRHFOptions | None = None,
    **option_kwargs,
) -> LossOutput:
    """RRHF loss from logits, reading the vocabulary once.

    `logits` `[N, T, V]` (the N responses of the batch's prompts) and `labels` `[N, T]` are aligned:
    pass `logits[:, :-1]`, `input_ids[:, 1:]` (the view is read in place). Or, in place of `logits`,
    `hidden` `[N, T, H]` with the lm_head `weight` `[V, H]` (and `bias`): the logits are never
    materialized. A position counts when its label is not `ignore_index` and `completion_mask` (if
    given, `[N, T]`) is nonzero: labels with -100 on the prompt and padding work as they are.
    `rewards` `[N]`, `group_size` / `group_index` and the metrics are those of `rrhf_loss`.
    `cu_seqlens` / `position_ids`: a packed row `[1, total, ...]` holding the N responses instead of
    the padded batch (`fastalign.packing`).
    {scaling}

    Options (keywords, or options=rrhf_options(...), not both):
        {options}
    """
    options = options_from(options, option_kwargs, RRHFOptions, rrhf_options)
    logits = policy_logits(logits, hidden, weight, bias, labels, vocab_group)
    layout = sequence_layout(logits, labels, cu_seqlens, position_ids, sequence_group)
    if layout is None:
        _check_logits(logits, labels)
    if completion_mask is not None:
        check_token_mask("completion_mask", completion_mask, labels)
    count = logits.shape[0] if layout is None else layout.rows
    rewards = _check_rewards(rewards, count, labels.device, "the responses' labels")
    groups = response_groups(count, group_size, group_index, labels.device)
    seq = sequence_logprobs(logits, labels, completion_mask=completion_mask, ignore_index=ignore_index,
                            layout=layout, vocab_group=vocab_group)
    return rrhf_from_sequences(seq.logps, seq.num_tokens, rewards, groups, options)


def _check_logits(logits: object, labels: object) -> None:
    if not hasattr(logits, "shape") or len(logits.shape) != 3 or logits.shape[0] == 0:
        shape = tuple(logits.shape) if hasattr(logits, "shape") else type(logits).__name__
        raise ValueError(f"logits: expected [N, T, V] with N >= 1 responses, got {shape}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), "
                         f"got {tuple(labels.shape)}")


class RRHFLoss(nn.Module):
    """RRHF loss on `[N, T, V]` logits or `[N, T, H]` hidden states (see `rrhf_loss_from_logits`).

    Options are checked here, so a bad configuration fails when the module is built.

    Options (keywords; `ignore_index`, the label value not counted, besides):
        {options}
    """

    @keyword_only(*parameter_names(rrhf_options), "ignore_index")
    def __init__(self, *, ignore_index: int = -100, **options) -> None:
        super().__init__()
        self.options = rrhf_options(**options)
        self.ignore_index = check_ignore_index(ignore_index)

    def forward(
        self,
        logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        rewards: torch.Tensor | None = None,
        *,
        group_size: int | None = None,
        group_index: torch.Tensor | None = None,
        completion_mask: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        sequence_group: object = None,
        vocab_group: object = None,
    ) -> LossOutput:
        return rrhf_loss_from_logits(
            logits, labels, rewards, group_size=group_size, group_index=group_index,
            completion_mask=completion_mask, hidden=hidden, weight=weight, bias=bias,
            ignore_index=self.ignore_index, cu_seqlens=cu_seqlens, position_ids=position_ids,
            sequence_group=sequence_group, vocab_group=vocab_group, options=self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in fields(self.options))


option_docs.document(
    option_docs.RRHF, rrhf_options, rrhf_options, rrhf_loss, rrhf_loss_from_logits, RRHFLoss, scaling=SCALING_DOC
)
