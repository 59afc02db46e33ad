"""The DPO family of preference losses: the per-sequence math once, and the input levels that feed it.

- `dpo_loss`: from per-sequence log-prob sums the caller already has (`policy_chosen_logps`, ...);
- `dpo_loss_from_logits`: from `[2B, T, V]` logits (B chosen rows, then B rejected), one pass over
  the vocabulary forward and one backward;
- `DPOLoss`: the `nn.Module` form of `dpo_loss_from_logits`, options checked once when it is built.

All of them end in `dpo_from_sequences(pairs, options)` (`fastalign/dpo_sequences.py`), which sees
only per-sequence tensors ([B] sums over each completion and token counts, in `DPOPairs`): a level
that starts from hidden states and the `lm_head` weight reduces its per-token output with
`pairs_from_tokens` and calls it unchanged.

Every formula is TRL 1.16's `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py; each loss
type is its branch of that method's `loss_type` loop), except DPOP (Pal et al. 2024,
arXiv:2402.13228), which TRL lacks.

Options follow one convention (as GRPO's): `dpo_options(...)` checks them into a `DPOOptions`;
every function takes them as keywords or as `options=` (not both), and `DPOLoss(**options)`
checks them once. Their descriptions live in `fastalign.option_docs.DPO`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import option_docs
from ._checks import check_ignore_index, options_from, policy_logits
from ._deprecation import keyword_only, parameter_names
from .dpo_sequences import (  # noqa: F401  (the per-sequence names stay importable from here)
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCES,
    LABEL_SMOOTHING_LOSS_TYPES,
    LENGTH_LOSS_TYPES,
    LOSS_TYPES,
    METRIC_NAMES,
    POLICY_ONLY_LOSS_TYPES,
    DPOOptions,
    DPOPairs,
    _check_reference_given,
    check_pairs,
    dpo_from_sequences,
    dpo_options,
)
from .sequence_layout import SCALING_DOC, sequence_layout
from .sequence import completion_logits_metrics, sequence_logprobs
from .types import HiddenStates, LossOutput, TokenLogprobs

# --- from per-token values to per-sequence sums (shared by the logits and hidden-state levels) --------


def ld_tail_mask(mask: torch.Tensor) -> torch.Tensor:
    """[2B, T] bool: the completion tokens past the length of the shorter completion of each pair (LD-DPO,
    the `ld_alpha` branch of TRL's `_compute_loss`). `mask` marks the counted tokens, rows B chosen then B rejected."""
    position = mask.cumsum(dim=1)
    lengths = mask.sum(dim=1)
    chosen_lengths, rejected_lengths = lengths.chunk(2, dim=0)
    shared = torch.minimum(chosen_lengths, rejected_lengths).repeat(2)
    return mask & (position > shared.unsqueeze(1))


def pairs_from_tokens(
    token: TokenLogprobs,
    mask: torch.Tensor,
    options: DPOOptions,
    ref_token_logps: torch.Tensor | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[DPOPairs, dict[str, torch.Tensor]]:
    """Per-sequence sums from per-token fields [2B, T] (0 off `mask`, a bool [2B, T]), and the
    logits/* metrics.

    `token` needs `mean_logits`, and `log_sum_sq_probs` under WPO. `ref_token_logps` [2B, T], if
    given, are the reference's per-token log-probs (no gradient); they are reduced the same way,
    LD weighting included, as TRL does for a reference model it runs itself. `gather`: as in
    `dpo_from_sequences`; the logits/* metrics are then averaged over every process's tokens.
    """
    logps = token.logps.sum(-1)
    num_tokens = mask.sum(-1, dtype=logps.dtype)
    tail = tail_logps = None
    if options.ld_alpha is not None:
        tail = ld_tail_mask(mask)
        tail_logps = torch.where(tail, token.logps, 0.0).sum(-1)
    ref_logps = None
    if ref_token_logps is not None:
        ref_logps = ref_token_logps.sum(-1)
        if tail is not None:
            ref_logps = ref_logps - (1 - options.ld_alpha) * torch.where(tail, ref_token_logps, 0.0).sum(-1)
    lssp = token.log_sum_sq_probs.sum(-1) if options.use_weighting else None

    def halves(value):
        return (None, None) if value is None else value.chunk(2, dim=0)

    chosen_logps, rejected_logps = halves(logps)
    pairs = DPOPairs(
        chosen_logps, rejected_logps, *halves(ref_logps), *halves(num_tokens), *halves(tail_logps), *halves(lssp)
    )
    # As TRL's `_compute_loss` logs logits/*: the mean over all chosen (rejected) completion tokens of the
    # per-token mean logit.
    return pairs, completion_logits_metrics(token.mean_logits, mask, gather)


def _ordered(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: metrics[name] for name in METRIC_NAMES if name in metrics}


# --- the logits level ------------------------------------------------------------------------------


def _dpo_from_logits(
    options: DPOOptions,
    logits: torch.Tensor,
    labels: torch.Tensor,
    completion_mask: torch.Tensor | None,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    ref_logits: torch.Tensor | None,
    ignore_index: int,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sequence_group: object = None,
    vocab_group: object = None,
) -> LossOutput:
    if not isinstance(logits, (torch.Tensor, HiddenStates)) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected [2B, T, V] (B chosen rows, then B rejected rows), got {shape}")
    layout = sequence_layout(logits, labels, cu_seqlens, position_ids, sequence_group, paired=True)
    rows = layout.rows if layout is not None else logits.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(
            f"logits: a paired loss takes 2B rows, B chosen then B rejected, with B >= 1; got {rows} rows"
        )
    batch = rows // 2
    given_logps = ref_chosen_logps is not None, ref_rejected_logps is not None
    if given_logps[0] != given_logps[1]:
        missing = "ref_rejected_logps" if given_logps[0] else "ref_chosen_logps"
        raise ValueError(f"{missing}: the reference log-probs come in pairs; pass both or neither")
    if ref_logits is not None and given_logps[0]:
        raise ValueError("ref_logits: pass either ref_logits or ref_chosen_logps/ref_rejected_logps, not both")
    given = ref_logits is not None or given_logps[0]
    _check_reference_given(options, given, "ref_chosen_logps/ref_rejected_logps/ref_logits")
    if given_logps[0]:
        for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
            if value.shape != (batch,):
                raise ValueError(
                    f"{name}: expected shape ({batch},), one per pair (logits has {rows} rows = 2B), "
                    f"got {tuple(value.shape)}"
                )
            if value.device != logits.device:
                raise ValueError(
                    f"{name}: expected a tensor on {logits.device} (the logits' device), got {value.device}"
                )
            if not value.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
    if ref_logits is not None:
        if not isinstance(ref_logits, (torch.Tensor, HiddenStates)):
            raise TypeError(f"ref_logits: expected a torch.Tensor, got {type(ref_logits).__name__}")
        if ref_logits.shape != logits.shape:
            raise ValueError(
                f"ref_logits: expected shape {tuple(logits.shape)} (logits' shape), got {tuple(ref_logits.shape)}"
            )
        if ref_logits.device != logits.device:
            raise ValueError(
                f"ref_logits: expected a tensor on {logits.device} (the logits' device), got {ref_logits.device}"
            )
        if not ref_logits.is_floating_point():
            raise TypeError(f"ref_logits: expected a floating-point tensor, got {ref_logits.dtype}")
    if completion_mask is not None:
        # Checked here too so that the message names this argument, not token_logprobs' `mask`.
        if not isinstance(completion_mask, torch.Tensor):
            raise TypeError(f"completion_mask: expected a torch.Tensor or None, got {type(completion_mask).__name__}")
        if completion_mask.shape != logits.shape[:-1]:
            raise ValueError(
                f"completion_mask: expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1], like labels), "
                f"got {tuple(completion_mask.shape)}"
            )
        if completion_mask.device != logits.device:
            raise ValueError(
                f"completion_mask: expected a tensor on {logits.device} (the logits' device), "
                f"got {completion_mask.device}"
            )
        if completion_mask.is_complex():
            raise TypeError(f"completion_mask: expected a bool, integer or float tensor, got {completion_mask.dtype}")

    outputs = ("mean_logits", "log_sum_sq_probs") if options.use_weighting else ("mean_logits",)
    seq = sequence_logprobs(logits, labels, completion_mask=completion_mask, ignore_index=ignore_index, outputs=outputs,
                            layout=layout, vocab_group=vocab_group)
    ref_token_logps = None
    if ref_logits is not None:
        with torch.no_grad():
            ref_token_logps = sequence_logprobs(
                ref_logits, labels, completion_mask=completion_mask, ignore_index=ignore_index, layout=layout,
                vocab_group=vocab_group,
            ).token.logps
    pairs, logit_metrics = pairs_from_tokens(seq.token, seq.mask, options, ref_token_logps)
    if given_logps[0]:
        pairs = pairs._replace(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    out = dpo_from_sequences(pairs, options)
    return LossOutput(out.loss, _ordered({**out.metrics, **logit_metrics}))


_EMPTY = """A fully masked completion (no counted token) is legal and gives a finite loss: its log-prob is 0
(the empty sum), its token count 0; ipo, sigmoid_norm and WPO divide by max(count, 1) as TRL
does, an sft term with no chosen token is 0, and no gradient reaches that sequence's logits.
The pair still counts in the batch mean (with policy = reference its sigmoid loss is ln 2).

Metrics (detached 0-d fp32 tensors, TRL's names and meanings): rewards/chosen, rewards/rejected
(mean of beta * (log pi - log pi_ref)), rewards/accuracies (share of pairs whose chosen reward
is higher), rewards/margins, logps/chosen, logps/rejected (mean sequence log-probs, LD-weighted
under ld_alpha), and from logits logits/chosen, logits/rejected (mean over the completion
tokens of the per-token mean logit). The rewards/* metrics need reference log-probs (or
reference_free) and are absent without them."""


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    chosen_num_tokens: torch.Tensor | None = None,
    rejected_num_tokens: torch.Tensor | None = None,
    chosen_tail_logps: torch.Tensor | None = None,
    rejected_tail_logps: torch.Tensor | None = None,
    chosen_log_sum_sq_probs: torch.Tensor | None = None,
    rejected_log_sum_sq_probs: torch.Tensor | None = None,
    options: DPOOptions | None = None,
    **option_kwargs,
) -> LossOutput:
    """A DPO-family loss from per-sequence log-probs the caller already has.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] sums of the policy's token log-probs over
            each completion (the whole completion, also under ld_alpha), differentiable.
        ref_chosen_logps, ref_rejected_logps: [B] the reference's (LD-weighted under ld_alpha, as
            TRL precomputes them); not needed for loss_type "sft" alone or with reference_free=True.
        chosen_num_tokens, rejected_num_tokens: [B] completion token counts; needed by ipo,
            sigmoid_norm, sft and WPO.
        chosen_tail_logps, rejected_tail_logps: [B] the policy's log-prob sums over the tokens past
            the shorter completion of the pair; needed by ld_alpha (`ld_tail_mask` marks them).
        chosen_log_sum_sq_probs, rejected_log_sum_sq_probs: [B] sums over each completion of the
            per-token log sum_v p_v^2 (`token_logprobs(..., outputs=("log_sum_sq_probs",))`); needed
            by use_weighting.
        options: the options below, checked once by `dpo_options(...)`; or pass them as keywords.

    Options (keywords, or options=dpo_options(...), not both):
        {options}

    Returns:
        LossOutput(loss, metrics): the scalar loss (fp32, fp64 for fp64 inputs) and TRL's metrics
        (no logits/* here: they need the logits).

    {empty}
    """
    options = options_from(options, option_kwargs, DPOOptions, dpo_options)
    pairs = DPOPairs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_num_tokens, rejected_num_tokens, chosen_tail_logps, rejected_tail_logps,
        chosen_log_sum_sq_probs, rejected_log_sum_sq_probs,
    )
    check_pairs(pairs, options)
    return dpo_from_sequences(pairs, options)


@keyword_only("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
def dpo_loss_from_logits(
    logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    completion_mask: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sequence_group: object = None,
    vocab_group: object = None,
    options: DPOOptions | None = None,
    **option_kwargs,
) -> LossOutput:
    """A DPO-family loss from the policy's logits (or hidden states): one pass forward, one backward.

    Args:
        logits: [2B, T, V] fp32/bf16/fp16, rows B chosen then B rejected, aligned with `labels`:
            logits[b, t] scores labels[b, t]. For a causal LM pass `logits[:, :-1]`,
            `input_ids[:, 1:]` and `completion_mask[:, 1:]`; the view is read in place, not copied.
        hidden, weight, bias: in place of `logits`, the policy's hidden states [2B, T, H] and its
            lm_head `weight` [V, H] (and `bias` [V]): the logits are never materialized. An
            FSDP2-sharded weight (a DTensor) is gathered.
        labels: [2B, T] int64/int32 token ids; `ignore_index` positions do not count.
        completion_mask: optional [2B, T]; only positions where it is nonzero count (the completion).
        ref_chosen_logps, ref_rejected_logps: [B] the reference model's sequence log-probs, as TRL
            precomputes them (LD-weighted under ld_alpha). Or:
        ref_logits: [2B, T, V] the reference model's logits, reduced under no_grad like the policy's.
            Neither is needed for loss_type "sft" alone or with reference_free=True.
        ignore_index: the label value that marks a position as not counted.
        cu_seqlens, position_ids: a packed row (padding-free batches): `logits` [1, total, V] (or
            hidden [1, total, H]), `labels`, `completion_mask` and `ref_logits` [1, total], holding
            the 2B sequences (B chosen, then B rejected) between `cu_seqlens` [2B + 1] or where
            `position_ids` restart at 0. The same loss as the padded [2B, T] batch (`fastalign.packing`).
        sequence_group, vocab_group: splits over processes:
            {scaling}
        options: the options below, checked once by `dpo_options(...)`; or pass them as keywords.

    Options (keywords, or options=dpo_options(...), not both):
        {options}

    Returns:
        LossOutput(loss, metrics): the scalar loss (fp32) and TRL's metrics.

    The forward pass computes every token's log-prob and mean logit (and log sum p^2 for WPO) in
    one pass over the vocabulary (`fastalign.token_logprobs`, on the backend in force); the
    backward pass reads the logits once more and writes their gradient once. No [2B*T, V] fp32
    buffer is made on the native and Triton backends.

    {empty}
    """
    options = options_from(options, option_kwargs, DPOOptions, dpo_options)
    logits = policy_logits(logits, hidden, weight, bias, labels, vocab_group)
    return _dpo_from_logits(
        options, logits, labels, completion_mask, ref_chosen_logps, ref_rejected_logps, ref_logits, ignore_index,
        cu_seqlens, position_ids, sequence_group, vocab_group,
    )


class DPOLoss(nn.Module):
    """`dpo_loss_from_logits` as a module: the options are checked once here, the tensors on each call.

    loss_fn = DPOLoss(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    out = loss_fn(logits=logits, labels=labels, completion_mask=mask,
                  ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)   # or ref_logits=...
    out = loss_fn(hidden=hidden, weight=lm_head.weight, labels=labels, ...)    # the logits never built
    out.loss.backward(); out.metrics["rewards/margins"]

    Inputs are aligned (logits[b, t] scores labels[b, t]: pass `logits[:, :-1]`, `input_ids[:, 1:]`,
    `completion_mask[:, 1:]`); rows are B chosen then B rejected. See `dpo_loss_from_logits` for
    the inputs, the metrics and what a fully masked completion gives.

    Options (keywords; `ignore_index`, the label value not counted, besides):
        {options}
    """

    @keyword_only(*parameter_names(dpo_options), "ignore_index")
    def __init__(self, *, ignore_index: int = -100, **options) -> None:
        super().__init__()
        self.options = dpo_options(**options)
        self.ignore_index = check_ignore_index(ignore_index)

    @keyword_only("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
    def forward(
        self,
        logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        completion_mask: torch.Tensor | None = None,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        ref_logits: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        sequence_group: object = None,
        vocab_group: object = None,
    ) -> LossOutput:
        return dpo_loss_from_logits(
            logits, labels, completion_mask=completion_mask, ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps, ref_logits=ref_logits, hidden=hidden, weight=weight, bias=bias,
            ignore_index=self.ignore_index, cu_seqlens=cu_seqlens, position_ids=position_ids,
            sequence_group=sequence_group, vocab_group=vocab_group, options=self.options,
        )

    def extra_repr(self) -> str:
        o = self.options
        text = f"beta={o.beta}, loss_type={list(o.loss_types)}"
        if any(w != 1.0 for w in o.loss_weights):
            text += f", loss_weights={list(o.loss_weights)}"
        defaults = {"label_smoothing": 0.0, "f_divergence_type": "reverse_kl", "use_weighting": False,
                    "ld_alpha": None, "dpop_lambda": 0.0, "reference_free": False}
        for name, default in defaults.items():
            if getattr(o, name) != default:
                text += f", {name}={getattr(o, name)!r}"
        return text


option_docs.document(
    option_docs.DPO, dpo_options, dpo_options, dpo_loss, dpo_loss_from_logits, DPOLoss, empty=_EMPTY,
    scaling=SCALING_DOC,
)
