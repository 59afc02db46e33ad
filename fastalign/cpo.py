"""CPO and SimPO (with AlphaPO's reward shaping): reference-free paired preference losses.

The formulas are TRL 1.16's `trl.experimental.cpo.CPOTrainer`: `CPOTrainer.cpo_loss` (the
per-pair losses and rewards), `concatenated_forward` (length-normalised log-probs for "ipo" and
"simpo", and the behaviour-cloning NLL on the chosen completions) and `get_batch_loss_metrics` (the
total loss and the logged metrics).

Three entry points share one piece of math, `cpo_from_sequences`, which takes per-sequence sums
and token counts, so a path that produces those sums without logits reuses it unchanged:

- `cpo_loss`: from per-sequence log-prob sums and token counts of the chosen and rejected completions;
- `cpo_loss_from_logits`: from `[2B, T, V]` logits (B chosen rows, then B rejected), or from the
  hidden states and the lm_head weight (`hidden=`, `weight=`, `bias=`), one pass over the vocabulary;
- `CPOLoss`: the `nn.Module` form of `cpo_loss_from_logits`. SimPO and AlphaPO are loss types of the
  same loss, as in TRL: `CPOLoss(loss_type="simpo", cpo_alpha=0)`,
  `CPOLoss(loss_type="alphapo", alpha=...)`.

Options follow every loss's convention: `cpo_options(...)` checks them into a `CPOOptions`, the
functions take them as keywords or as `options=` (not both), and `CPOLoss(**options)` checks them
once; they are described in `fastalign.option_docs.CPO`.

A completion with no counted token has a log-prob sum of 0 and, where the loss type averages over
tokens, an average of 0 (the count is taken as at least 1): the empty sequence has probability 1.
The loss stays finite and that completion's logits get no gradient. The NLL over a batch whose chosen
completions are all empty is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from . import option_docs
from ._checks import (
    check_finite,
    check_ignore_index,
    check_loss_type,
    check_positive_finite,
    check_sequence_values,
    check_token_mask,
    options_from,
    policy_logits,
)
from ._deprecation import keyword_only, parameter_names
from .sequence_layout import SCALING_DOC, sequence_layout
from .sequence import (
    SequenceLogprobs,
    check_logits_batch,
    completion_logits_metrics,
    metric,
    pair_metrics,
    sequence_logprobs,
    split_pairs,
)
from .types import LossOutput

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
# TRL's concatenated_forward averages the log-probs over tokens for these (AlphaPO is SimPO in TRL's config).
LENGTH_NORMALISED = ("ipo", "simpo", "alphapo")
DEFAULT_SIMPO_GAMMA = 0.5


# CPO / SimPO / AlphaPO ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CPOOptions:
    """Checked options, built by `cpo_options(...)`; `loss_type` "alphapo" is kept, with the SimPO
    margin and cpo_alpha resolved."""

    beta: float
    loss_type: str
    label_smoothing: float
    cpo_alpha: float
    simpo_gamma: float
    alpha: float

    @property
    def length_normalised(self) -> bool:
        return self.loss_type in LENGTH_NORMALISED


@keyword_only("beta", "loss_type", "label_smoothing", "cpo_alpha", "simpo_gamma", "alpha")
def cpo_options(
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float | None = None,
    simpo_gamma: float | None = None,
    alpha: float = 0.0,
) -> CPOOptions:
    """Checks CPOConfig-style options into `CPOOptions`, for `options=` of `cpo_loss` and
    `cpo_loss_from_logits`. TRL ignores (with a warning) or silently overrides the combinations
    that are rejected here, so a setting that would have no effect fails instead.

    Options:
        {options}
    """
    beta = check_positive_finite("beta", beta)
    loss_type = check_loss_type(loss_type, LOSS_TYPES)
    label_smoothing = check_finite("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing}")
    if label_smoothing and loss_type in ("hinge", "ipo"):
        raise ValueError(
            f"label_smoothing: loss_type={loss_type!r} has no label smoothing (only 'sigmoid', 'simpo' and "
            f"'alphapo' do); got {label_smoothing}"
        )
    if simpo_gamma is None:
        simpo_gamma = DEFAULT_SIMPO_GAMMA
    elif loss_type not in ("simpo", "alphapo"):
        raise ValueError(
            f"simpo_gamma: only loss_type 'simpo' or 'alphapo' uses a target margin; got loss_type={loss_type!r}"
        )
    else:
        simpo_gamma = check_finite("simpo_gamma", simpo_gamma)
    if cpo_alpha is None:
        # TRL's CPOConfig turns "alphapo" into "simpo" with the NLL term off.
        cpo_alpha = 0.0 if loss_type == "alphapo" else 1.0
    else:
        cpo_alpha = check_finite("cpo_alpha", cpo_alpha)
        if cpo_alpha < 0:
            raise ValueError(f"cpo_alpha: expected a number >= 0 (the weight of the NLL term), got {cpo_alpha}")
        if loss_type == "alphapo" and cpo_alpha != 0:
            raise ValueError(
                f"cpo_alpha: loss_type='alphapo' has no NLL term (TRL sets cpo_alpha=0); got {cpo_alpha}"
            )
    alpha = check_finite("alpha", alpha)
    return CPOOptions(beta, loss_type, label_smoothing, cpo_alpha, simpo_gamma, alpha)


def _alphapo_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    # CPOTrainer.cpo_loss: r = (1 - p^(-alpha)) / alpha with p = exp(logps). exp(-alpha * logps) is the same
    # number without p underflowing to 0 (and p^(-alpha) to inf) for long summed completions.
    return -torch.expm1(-alpha * logps) / alpha


def cpo_from_sequences(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    rejected_num_tokens: torch.Tensor,
    options: CPOOptions,
) -> LossOutput:
    """The CPO-family math on checked [B] tensors: log-prob sums over each completion and token counts."""
    beta, loss_type, smoothing = options.beta, options.loss_type, options.label_smoothing
    if options.length_normalised:
        chosen = chosen_logps / chosen_num_tokens.clamp(min=1)
        rejected = rejected_logps / rejected_num_tokens.clamp(min=1)
    else:
        chosen, rejected = chosen_logps, rejected_logps
    if options.alpha != 0.0:
        chosen_rewards = _alphapo_reward(chosen, options.alpha)
        rejected_rewards = _alphapo_reward(rejected, options.alpha)
    else:
        chosen_rewards, rejected_rewards = chosen, rejected

    # CPOTrainer.cpo_loss
    logits = chosen_rewards - rejected_rewards
    if loss_type in ("simpo", "alphapo"):
        logits = logits - options.simpo_gamma / beta
    if loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing

    # concatenated_forward: token-mean cross-entropy over the chosen completions (the same tokens as the
    # log-probs), and a constant 0 when the term is off.
    if options.cpo_alpha != 0.0:
        nll = -chosen_logps.sum() / chosen_num_tokens.sum().clamp(min=1)
    else:
        nll = chosen_logps.new_zeros(())
    loss = losses.mean() + options.cpo_alpha * nll

    chosen_rewards = beta * chosen_rewards.detach()
    rejected_rewards = beta * rejected_rewards.detach()
    metrics = {
        **pair_metrics(chosen_rewards, rejected_rewards, chosen, rejected),
        "nll_loss": metric(nll),
    }
    return LossOutput(loss, metrics)


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    rejected_num_tokens: torch.Tensor,
    *,
    options: CPOOptions | None = None,
    **option_kwargs,
) -> LossOutput:
    """CPO / SimPO / AlphaPO loss from per-sequence log-probs.

    Args:
        chosen_logps, rejected_logps: `[B]` sums of per-token log-probs over each completion (not averages:
            the loss types that average, "ipo", "simpo" and "alphapo", divide by the counts themselves).
        chosen_num_tokens, rejected_num_tokens: `[B]` counted completion tokens (float or integer).
        options: the options below, checked once by `cpo_options(...)`; or pass them as keywords.

    Options (keywords, or options=cpo_options(...), not both):
        {options}

    Returns:
        LossOutput: `loss = mean(losses) + cpo_alpha * nll_loss` and TRL's metrics `rewards/chosen`,
        `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`
        (averages for the length-normalised types) and `nll_loss` (0 when cpo_alpha is 0, as TRL logs it).
    """
    options = options_from(options, option_kwargs, CPOOptions, cpo_options)
    like = (chosen_logps, "chosen_logps")
    chosen = check_sequence_values("chosen_logps", chosen_logps)
    rejected = check_sequence_values("rejected_logps", rejected_logps, *like)
    chosen_n = check_sequence_values("chosen_num_tokens", chosen_num_tokens, *like, counts=True)
    rejected_n = check_sequence_values("rejected_num_tokens", rejected_num_tokens, *like, counts=True)
    return cpo_from_sequences(chosen, rejected, chosen_n, rejected_n, options)


def _paired_sequences(seq: SequenceLogprobs) -> tuple[torch.Tensor, ...]:
    chosen, rejected = split_pairs(seq.logps, "logits")
    chosen_n, rejected_n = split_pairs(seq.num_tokens, "logits")
    return chosen, rejected, chosen_n, rejected_n


def cpo_loss_from_logits(
    logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    completion_mask: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sequence_group: object = None,
    vocab_group: object = None,
    options: CPOOptions | None = None,
    **option_kwargs,
) -> LossOutput:
    """CPO / SimPO / AlphaPO loss from logits, reading the vocabulary once.

    `logits` `[2B, T, V]` (B chosen rows, then their B rejected rows, as TRL concatenates them) and
    `labels` `[2B, T]` are aligned: pass `logits[:, :-1]`, `input_ids[:, 1:]` (the view is read in
    place). Or, in place of `logits`, `hidden` `[2B, T, H]` with the lm_head `weight` `[V, H]` (and
    `bias`): the logits are never materialized. A position counts when its label is not
    `ignore_index` and `completion_mask` (if given, `[2B, T]`) is nonzero: TRL's
    `concatenated_labels[:, 1:]` with -100 on the prompt and padding works as is. The metrics are
    those of `cpo_loss`, plus `logits/chosen` and `logits/rejected` (see `completion_logits_metrics`).
    `cu_seqlens` / `position_ids`: a packed row `[1, total, ...]` holding the 2B sequences in that
    order instead of the padded batch (`fastalign.packing`).
    {scaling}

    Options (keywords, or options=cpo_options(...), not both):
        {options}
    """
    options = options_from(options, option_kwargs, CPOOptions, cpo_options)
    logits = policy_logits(logits, hidden, weight, bias, labels, vocab_group)
    return _cpo_from_logits(logits, labels, completion_mask, ignore_index, options, cu_seqlens, position_ids,
                            sequence_group, vocab_group)


def _cpo_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    completion_mask: torch.Tensor | None,
    ignore_index: int,
    options: CPOOptions,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sequence_group: object = None,
    vocab_group: object = None,
) -> LossOutput:
    layout = sequence_layout(logits, labels, cu_seqlens, position_ids, sequence_group, paired=True)
    if layout is None or layout.packing is None:
        check_logits_batch(logits, labels)
    if completion_mask is not None:
        check_token_mask("completion_mask", completion_mask, labels)
    seq = sequence_logprobs(logits, labels, completion_mask=completion_mask, ignore_index=ignore_index,
                            outputs=("mean_logits",), layout=layout, vocab_group=vocab_group)
    out = cpo_from_sequences(*_paired_sequences(seq), options)
    out.metrics.update(completion_logits_metrics(seq.token.mean_logits, seq.mask))
    return out


class CPOLoss(nn.Module):
    """CPO / SimPO / AlphaPO loss on `[2B, T, V]` logits or `[2B, T, H]` hidden states (see
    `cpo_loss_from_logits`).

    `CPOLoss()` is CPO, `CPOLoss(loss_type="simpo", cpo_alpha=0)` is SimPO as its paper states it
    (TRL keeps `cpo_alpha=1`, CPO-SimPO, unless told otherwise), `CPOLoss(loss_type="alphapo", alpha=0.25)`
    is AlphaPO. Options are checked here, so a bad configuration fails when the module is built.

    Options (keywords; `ignore_index`, the label value not counted, besides):
        {options}
    """

    @keyword_only(*parameter_names(cpo_options), "ignore_index")
    def __init__(self, *, ignore_index: int = -100, **options) -> None:
        super().__init__()
        self.options = cpo_options(**options)
        self.ignore_index = check_ignore_index(ignore_index)

    @keyword_only("completion_mask")
    def forward(
        self,
        logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        completion_mask: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        sequence_group: object = None,
        vocab_group: object = None,
    ) -> LossOutput:
        return cpo_loss_from_logits(
            logits, labels, completion_mask=completion_mask, hidden=hidden, weight=weight, bias=bias,
            ignore_index=self.ignore_index, cu_seqlens=cu_seqlens, position_ids=position_ids,
            sequence_group=sequence_group, vocab_group=vocab_group, options=self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in fields(self.options))


option_docs.document(
    option_docs.CPO, cpo_options, cpo_options, cpo_loss, cpo_loss_from_logits, CPOLoss, scaling=SCALING_DOC
)
