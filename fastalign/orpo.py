"""ORPO: the odds-ratio preference term plus the NLL on the chosen sequences, without a reference model.

The formulas are TRL 1.16's `trl.experimental.orpo.ORPOTrainer`: `odds_ratio_loss` (and the module's
`log1mexp`), `concatenated_forward` (completion log-probs averaged over tokens; the NLL over every
attended token of the chosen sequences, prompt included) and `get_batch_loss_metrics`
(`loss = nll_loss - mean(beta * logsigmoid(log_odds))` and the logged metrics).

`orpo_from_sequences` is the math on per-sequence sums and counts; `orpo_loss` takes those sums,
`orpo_loss_from_logits` gets both token sets (completion and NLL) from one pass over the
vocabulary (from logits, or from the hidden states and the lm_head weight: `hidden=`, `weight=`,
`bias=`), and `ORPOLoss` is its `nn.Module` form. Its one option, `beta`, follows every loss's
convention: `orpo_options(...)` checks it into `ORPOOptions`, the functions take it as a keyword or
as `options=`, and `ORPOLoss(**options)` checks it once.

A completion with no counted token has probability 1, so its odds are infinite and the odds ratio
undefined. A pair with such a completion adds 0 to the odds-ratio term (and to the `log_odds_ratio`
and `log_odds_chosen` means, which still divide by B) and gets no gradient from it; its average
log-prob, logged under `logps/*`, is 0. Chosen sequences with no NLL token give an NLL of 0.

A chosen completion whose every token has log-prob 0 (certain, or rounded to 0 in fp32) has log
odds +inf: its pair adds log sigmoid(+inf) = 0 and its log-probs get the finite limit of the
gradient, where TRL's formula gives NaN (0 * inf). A certain rejected completion gives a loss of
+inf, its true value; both certain, NaN, as in TRL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import option_docs
from ._checks import (
    check_ignore_index,
    check_positive_finite,
    check_sequence_values,
    check_token_mask,
    options_from,
    policy_logits,
)
from ._deprecation import keyword_only, parameter_names
from .sequence_layout import SCALING_DOC, sequence_layout
from .sequence import (
    check_logits_batch,
    completion_logits_metrics,
    metric,
    pair_metrics,
    sequence_logprobs,
    split_pairs,
)
from .types import LossOutput

# log1mexp's switch point, -ln 2: below it log1p(-exp(x)) is accurate, above it log(-expm1(x)) is.
_LOG1MEXP_SWITCH = -0.6931471805599453


@dataclass(frozen=True)
class ORPOOptions:
    """Checked ORPO options, built by `orpo_options(...)`."""

    beta: float


def orpo_options(*, beta: float = 0.1) -> ORPOOptions:
    """Checks the options into `ORPOOptions`, for `options=` of `orpo_loss` and `orpo_loss_from_logits`.

    Options:
        {options}
    """
    return ORPOOptions(check_positive_finite("beta", beta))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -ln 2 (TRL's `orpo_trainer.log1mexp`)."""
    return torch.where(x < _LOG1MEXP_SWITCH, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class _OddsRatioTerm(torch.autograd.Function):
    """(log sigmoid(log_odds), log_odds) of average log-probs c (chosen) and r (rejected), with
    log_odds = (c - log(1 - e^c)) - (r - log(1 - e^r)) as TRL's `odds_ratio_loss` writes it.

    The gradient is written out, with u = 1 - e^c and v = 1 - e^r:
        d/dc = 1 / (u + e^(c - r) v)        d/dr = -u / (v (u + e^(c - r) v))
    the same numbers as autograd through TRL's formula wherever that is finite, and finite at c = 0
    (a chosen completion the policy is certain of, or whose log-probs fp32 rounded to 0), where the
    chain rule multiplies sigmoid(-inf) = 0 by d log_odds / dc = inf."""

    @staticmethod
    def forward(ctx, chosen, rejected):
        ctx.save_for_backward(chosen, rejected)
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ctx.mark_non_differentiable(log_odds)
        return F.logsigmoid(log_odds), log_odds

    @staticmethod
    def backward(ctx, grad, _):
        chosen, rejected = ctx.saved_tensors
        u, v = -torch.expm1(chosen), -torch.expm1(rejected)
        denominator = u + torch.exp(chosen - rejected) * v
        return grad / denominator, -grad * u / (v * denominator)


def orpo_from_sequences(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    rejected_num_tokens: torch.Tensor,
    chosen_nll_logps: torch.Tensor,
    chosen_nll_num_tokens: torch.Tensor,
    beta: float,
) -> LossOutput:
    """The ORPO math on checked [B] tensors (sums and counts; see `orpo_loss`)."""
    chosen = chosen_logps / chosen_num_tokens.clamp(min=1)
    rejected = rejected_logps / rejected_num_tokens.clamp(min=1)

    # ORPOTrainer.odds_ratio_loss. Empty pairs are computed at a harmless stand-in value and then
    # dropped, so that neither their value nor their gradient (0 * inf) can turn into NaN.
    defined = (chosen_num_tokens > 0) & (rejected_num_tokens > 0)
    stand_in = chosen.new_tensor(-1.0)
    safe_chosen = torch.where(defined, chosen, stand_in)
    safe_rejected = torch.where(defined, rejected, stand_in)
    ratio, log_odds = _OddsRatioTerm.apply(safe_chosen, safe_rejected)
    zero = chosen.new_zeros(())
    log_odds = torch.where(defined, log_odds, zero)
    ratio = torch.where(defined, ratio, zero)

    nll = -chosen_nll_logps.sum() / chosen_nll_num_tokens.sum().clamp(min=1)
    loss = nll - (beta * ratio).mean()

    chosen_rewards = beta * chosen.detach()
    rejected_rewards = beta * rejected.detach()
    metrics = {
        **pair_metrics(chosen_rewards, rejected_rewards, chosen, rejected),
        "nll_loss": metric(nll),
        "log_odds_ratio": metric(ratio),
        "log_odds_chosen": metric(log_odds),
    }
    return LossOutput(loss, metrics)


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    rejected_num_tokens: torch.Tensor,
    chosen_nll_logps: torch.Tensor,
    chosen_nll_num_tokens: torch.Tensor,
    *,
    options: ORPOOptions | None = None,
    **option_kwargs,
) -> LossOutput:
    """ORPO loss from per-sequence log-probs.

    Args:
        chosen_logps, rejected_logps: `[B]` sums of per-token log-probs over each completion; the odds
            ratio uses their per-token averages, as TRL does.
        chosen_num_tokens, rejected_num_tokens: `[B]` counted completion tokens.
        chosen_nll_logps: `[B]` sums of log-probs over every attended token of each chosen sequence,
            prompt and completion (TRL computes ORPO's NLL over both).
        chosen_nll_num_tokens: `[B]` the number of those tokens.
        options: the options below, checked once by `orpo_options(...)`; or pass them as keywords.

    Options (keywords, or options=orpo_options(...), not both):
        {options}

    Returns:
        LossOutput: `loss = nll_loss - mean(beta * log_odds_ratio)` and TRL's metrics `rewards/chosen`,
        `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`
        (per-token averages), `nll_loss`, `log_odds_ratio` (mean logsigmoid of the log odds ratio) and
        `log_odds_chosen` (mean log odds ratio).
    """
    beta = options_from(options, option_kwargs, ORPOOptions, orpo_options).beta
    like, like_name = chosen_logps, "chosen_logps"
    values = [check_sequence_values("chosen_logps", chosen_logps)]
    values.append(check_sequence_values("rejected_logps", rejected_logps, like, like_name))
    values.append(check_sequence_values("chosen_num_tokens", chosen_num_tokens, like, like_name, counts=True))
    values.append(check_sequence_values("rejected_num_tokens", rejected_num_tokens, like, like_name, counts=True))
    values.append(check_sequence_values("chosen_nll_logps", chosen_nll_logps, like, like_name))
    values.append(check_sequence_values("chosen_nll_num_tokens", chosen_nll_num_tokens, like, like_name, counts=True))
    return orpo_from_sequences(*values, beta)


def orpo_loss_from_logits(
    logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    completion_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sequence_group: object = None,
    vocab_group: object = None,
    options: ORPOOptions | None = None,
    **option_kwargs,
) -> LossOutput:
    """ORPO loss from logits, reading the vocabulary once for both of its token sets.

    Args:
        logits: `[2B, T, V]`, B chosen rows then their B rejected rows, aligned with `labels`
            (pass `logits[:, :-1]`; the view is read in place).
        hidden, weight, bias: in place of `logits`, the hidden states `[2B, T, H]` and the lm_head
            `weight` `[V, H]` (and `bias` `[V]`): the logits are never materialized.
        labels: `[2B, T]` the next tokens (`input_ids[:, 1:]`), prompt tokens included: the NLL scores them.
        completion_mask: `[2B, T]` nonzero on completion tokens, those the odds ratio scores.
        attention_mask: `[2B, T]` (`attention_mask[:, 1:]`) nonzero on the tokens the NLL scores; None
            scores every position whose label is not `ignore_index`.
        ignore_index: label value never scored.
        cu_seqlens, position_ids: a packed row (padding-free batches) in place of the padded batch:
            the tensors above `[1, total, ...]`, the sequences between `cu_seqlens` boundaries or where
            `position_ids` restart at 0, in the padded batch's order (`fastalign.packing`).
        sequence_group, vocab_group: splits over processes:
            {scaling}
        options: the options below, checked once by `orpo_options(...)`; or pass them as keywords.

    Options (keywords, or options=orpo_options(...), not both):
        {options}

    Returns:
        LossOutput: as `orpo_loss`, plus `logits/chosen` and `logits/rejected`
        (see `fastalign.sequence.completion_logits_metrics`).
    """
    beta = options_from(options, option_kwargs, ORPOOptions, orpo_options).beta
    logits = policy_logits(logits, hidden, weight, bias, labels, vocab_group)
    return _orpo_from_logits(logits, labels, completion_mask, attention_mask, ignore_index, beta, cu_seqlens,
                             position_ids, sequence_group, vocab_group)


def _orpo_from_logits(logits, labels, completion_mask, attention_mask, ignore_index, beta, cu_seqlens=None,
                      position_ids=None, sequence_group=None, vocab_group=None) -> LossOutput:
    layout = sequence_layout(logits, labels, cu_seqlens, position_ids, sequence_group, paired=True)
    if layout is None or layout.packing is None:
        check_logits_batch(logits, labels)
    check_token_mask("completion_mask", completion_mask, labels)
    if attention_mask is not None:
        check_token_mask("attention_mask", attention_mask, labels)
    seq = sequence_logprobs(logits, labels, completion_mask=attention_mask, ignore_index=ignore_index,
                            outputs=("mean_logits",), layout=layout, vocab_group=vocab_group)
    completion_tokens = completion_mask != 0
    if layout is not None:
        completion_tokens = layout.to_sequences(completion_tokens, False)
    # The completion tokens are a subset of the NLL tokens, so one pass serves both sums.
    completion = seq.mask & completion_tokens
    completion_logps = torch.where(completion, seq.token.logps, 0.0).sum(-1)
    completion_num_tokens = completion.sum(-1, dtype=torch.float32)
    chosen, rejected = split_pairs(completion_logps, "logits")
    chosen_n, rejected_n = split_pairs(completion_num_tokens, "logits")
    chosen_nll, _ = split_pairs(seq.logps, "logits")
    chosen_nll_n, _ = split_pairs(seq.num_tokens, "logits")
    out = orpo_from_sequences(chosen, rejected, chosen_n, rejected_n, chosen_nll, chosen_nll_n, beta)
    out.metrics.update(completion_logits_metrics(seq.token.mean_logits, completion))
    return out


class ORPOLoss(nn.Module):
    """ORPO loss on `[2B, T, V]` logits or `[2B, T, H]` hidden states (see `orpo_loss_from_logits`);
    the options are checked when it is built.

    Options (keywords; `ignore_index`, the label value never scored, besides):
        {options}
    """

    @keyword_only(*parameter_names(orpo_options), "ignore_index")
    def __init__(self, *, ignore_index: int = -100, **options) -> None:
        super().__init__()
        self.options = orpo_options(**options)
        self.ignore_index = check_ignore_index(ignore_index)

    @property
    def beta(self) -> float:
        return self.options.beta

    @keyword_only("completion_mask", "attention_mask")
    def forward(
        self,
        logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        completion_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        sequence_group: object = None,
        vocab_group: object = None,
    ) -> LossOutput:
        return orpo_loss_from_logits(
            logits, labels, completion_mask=completion_mask, attention_mask=attention_mask, hidden=hidden,
            weight=weight, bias=bias, ignore_index=self.ignore_index, cu_seqlens=cu_seqlens,
            position_ids=position_ids,
            sequence_group=sequence_group, vocab_group=vocab_group, options=self.options,
        )

    def extra_repr(self) -> str:
        return f"beta={self.options.beta}"


option_docs.document(
    option_docs.ORPO, orpo_options, orpo_options, orpo_loss, orpo_loss_from_logits, ORPOLoss, scaling=SCALING_DOC
)
