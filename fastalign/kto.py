"""KTO and unpaired APO-zero: losses on single completions labelled desirable or undesirable.

The formulas are TRL 1.16's `trl.KTOTrainer._compute_loss` (TRL has no separate loss method for KTO):
per-completion log-prob sums for the policy and the reference, the KL baseline
`z = clamp(mean(KL_logps - ref_KL_logps), min=0)`, detached, estimated from mismatched
(prompt, completion) pairs, and

    kto:                desirable  1 - sigmoid(beta * (logratio - z))
                        undesirable 1 - sigmoid(beta * (z - logratio))
    apo_zero_unpaired:  desirable  1 - sigmoid(beta * logratio)
                        undesirable sigmoid(beta * logratio)

each weighted by `desirable_weight` / `undesirable_weight` and averaged over the batch.

What the caller passes for the baseline: TRL builds the mismatched pairs by rotating each batch's
completions by one, (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}), and sums the policy's (under
no_grad) and the reference's log-probs over each mismatched completion: those are `kl_logps` and
`ref_kl_logps` (`fastalign.sequence.sequence_logprobs` computes them from logits). With data
parallelism TRL averages the per-rank means before clamping: pass `gather` (below) with the
log-prob sums, or that average as `kl`.

Metrics are this process's unless `gather` is given: a function returning every process's tensor
concatenated along dim 0 (e.g. `fastalign.integrations.trl.gather_for(accelerator)`). Then, as TRL's
trainer reduces them, the KL estimate is the mean of the processes' estimates, and each group's
`rewards/*` and `logps/*` (and `kto_token_metrics`' token means) are sums over every process divided
by counts over every process.

`kto_from_sequences` is the math on per-sequence tensors; `kto_loss` takes them,
`kto_loss_from_logits` computes the policy's log-probs (and the entropy and logits metrics) in one
pass over the vocabulary, from logits or from the hidden states and the lm_head weight (`hidden=`,
`weight=`, `bias=`), and `KTOLoss` is its `nn.Module` form. Options follow every loss's convention:
`kto_options(...)` checks them into `KTOOptions`, the functions take them as keywords or as
`options=` (not both), and `KTOLoss(**options)` checks them once.

A batch with no desirable (or no undesirable) completion is fine for the loss, which is per
completion; the metrics of the missing group (`rewards/*`, `logps/*`, `logits/*` and
`rewards/margins`) are NaN where TRL leaves them out of its log. A completion with no counted token has
a log-prob sum of 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from . import option_docs
from ._checks import (
    check_finite,
    check_gather,
    check_ignore_index,
    check_loss_type,
    check_positive_finite,
    check_sequence_values,
    check_token_mask,
    options_from,
    policy_logits,
    values_checkable,
)
from ._deprecation import keyword_only, parameter_names
from .sequence_layout import SCALING_DOC, sequence_layout
from .sequence import metric, sequence_logprobs
from .types import HiddenStates, LossOutput

LOSS_TYPES = ("kto", "apo_zero_unpaired")
Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class KTOOptions:
    """Checked KTO options, built by `kto_options(...)`."""

    beta: float
    loss_type: str
    desirable_weight: float
    undesirable_weight: float


@keyword_only("beta", "loss_type", "desirable_weight", "undesirable_weight")
def kto_options(
    *, beta: float = 0.1, loss_type: str = "kto", desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> KTOOptions:
    """Checks the options into `KTOOptions`, for `options=` of `kto_loss` and `kto_loss_from_logits`.

    Options:
        {options}
    """
    beta = check_positive_finite("beta", beta)
    loss_type = check_loss_type(loss_type, LOSS_TYPES)
    weights = []
    for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        value = check_finite(name, value)
        if value < 0:
            raise ValueError(f"{name}: expected a number >= 0, got {value}")
        weights.append(value)
    if weights == [0.0, 0.0]:
        raise ValueError("desirable_weight, undesirable_weight: both are 0, so the loss would be 0 for every batch")
    return KTOOptions(beta, loss_type, *weights)


def kl_baseline(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, gather: Gather | None = None) -> torch.Tensor:
    """KTO's reference point z: mean(kl_logps - ref_kl_logps), detached, clamped at 0. With `gather`,
    the mean of every process's mean, clamped after averaging (as TRL does)."""
    estimate = (kl_logps - ref_kl_logps).mean().detach()
    if gather is not None:
        estimate = gather(estimate.reshape(1)).mean()
    return estimate.clamp(min=0)


def _pooled(totals: torch.Tensor, gather: Gather | None) -> torch.Tensor:
    """This process's [K] totals, summed over every process when `gather` is given."""
    return totals if gather is None else gather(totals.unsqueeze(0)).sum(0)


def _resolve_kl(
    options: KTOOptions,
    kl_logps: torch.Tensor | None,
    ref_kl_logps: torch.Tensor | None,
    kl: torch.Tensor | float | None,
    like: torch.Tensor,
    gather: Gather | None = None,
) -> torch.Tensor:
    """The checked baseline z as a 0-d tensor (0 for apo_zero_unpaired, which has none). A given
    `kl` is the caller's final estimate: `gather` pools only the one computed from kl_logps."""
    candidates = (("kl_logps", kl_logps), ("ref_kl_logps", ref_kl_logps), ("kl", kl))
    given = [name for name, value in candidates if value is not None]
    if options.loss_type == "apo_zero_unpaired":
        if given:
            raise ValueError(f"{given[0]}: loss_type='apo_zero_unpaired' has no KL baseline; pass None")
        return like.new_zeros(())
    if kl is not None:
        if kl_logps is not None or ref_kl_logps is not None:
            raise ValueError("kl: pass either the estimate kl or kl_logps with ref_kl_logps, not both")
        if isinstance(kl, torch.Tensor):
            if kl.numel() != 1 or not kl.is_floating_point():
                raise ValueError(f"kl: expected a single floating-point value, got a {kl.dtype} tensor of shape "
                                 f"{tuple(kl.shape)}")
            if values_checkable(kl) and not bool(torch.isfinite(kl).all()):
                raise ValueError(f"kl: expected a finite estimate, got {kl.item()}")
            kl = kl.detach().reshape(()).to(device=like.device, dtype=like.dtype)
        else:
            kl = like.new_tensor(check_finite("kl", kl))
        return kl.clamp(min=0)
    if kl_logps is None or ref_kl_logps is None:
        missing = "kl_logps" if kl_logps is None else "ref_kl_logps"
        raise ValueError(
            f"{missing}: loss_type='kto' needs the KL baseline: kl_logps and ref_kl_logps (policy and reference "
            "log-prob sums over mismatched prompt/completion pairs), or a precomputed kl"
        )
    policy = check_sequence_values("kl_logps", kl_logps)
    reference = check_sequence_values("ref_kl_logps", ref_kl_logps, kl_logps, "kl_logps")
    if policy.device != like.device:
        raise ValueError(f"kl_logps: expected a tensor on {like.device} (that of policy_logps), got {policy.device}")
    if policy.shape[0] < 2:
        # TRL rejects a per-device batch of 1 for the same reason: rotating one completion by one pairs
        # it with its own prompt, and z becomes the implied reward itself.
        raise ValueError(
            "kl_logps: the KL baseline needs at least 2 mismatched pairs; with 1 the 'mismatched' completion "
            "is the matched one"
        )
    return kl_baseline(policy, reference, gather)


def kto_from_sequences(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    options: KTOOptions,
    gather: Gather | None = None,
) -> LossOutput:
    """The KTO math on checked [B] tensors (log-prob sums, bool labels) and the clamped baseline `kl`;
    the group metrics over every process with `gather`."""
    beta = options.beta
    logratios = policy_logps - ref_logps
    if options.loss_type == "kto":
        # 1 - sigmoid(x) written as sigmoid(-x): the same value without cancellation near x >> 0.
        desirable_losses = torch.sigmoid(-beta * (logratios - kl))
        undesirable_losses = torch.sigmoid(-beta * (kl - logratios))
    else:
        desirable_losses = torch.sigmoid(-beta * logratios)
        undesirable_losses = torch.sigmoid(beta * logratios)
    losses = torch.where(
        desirable, options.desirable_weight * desirable_losses, options.undesirable_weight * undesirable_losses
    )
    loss = losses.mean()

    rewards = beta * logratios.detach()
    metrics = {"kl": metric(kl), **_group_metrics(rewards, policy_logps.detach(), desirable, gather)}
    return LossOutput(loss, metrics)


def _group_metrics(rewards: torch.Tensor, logps: torch.Tensor, desirable: torch.Tensor,
                   gather: Gather | None) -> dict[str, torch.Tensor]:
    """rewards/* and logps/*: a group's sum over its completions divided by its size (both over every
    process with `gather`); NaN for a group with no completion, which TRL leaves out of its log."""
    totals = []
    for members in (desirable, ~desirable):
        totals += [torch.where(members, rewards, 0.0).sum(), torch.where(members, logps, 0.0).sum(),
                   members.sum().to(rewards.dtype)]
    chosen_rewards, chosen_logps, chosen, rejected_rewards, rejected_logps, rejected = _pooled(
        torch.stack(totals), gather)
    return {
        "rewards/chosen": metric(chosen_rewards / chosen),
        "logps/chosen": metric(chosen_logps / chosen),
        "rewards/rejected": metric(rejected_rewards / rejected),
        "logps/rejected": metric(rejected_logps / rejected),
        "rewards/margins": metric(chosen_rewards / chosen - rejected_rewards / rejected),
    }


def kto_token_metrics(
    entropy: torch.Tensor,
    mean_logits: torch.Tensor,
    mask: torch.Tensor,
    desirable: torch.Tensor,
    *,
    gather: Gather | None = None,
) -> dict[str, torch.Tensor]:
    """TRL's token-level KTO metrics from per-token fields (a fused LM head's `entropy` and `mean_logits`).

    Args:
        entropy, mean_logits: `[B, T]` per-token values.
        mask: `[B, T]` the counted completion tokens (nonzero).
        desirable: `[B]` bool labels.
        gather: see the module docstring; sums and counts then span every process.

    Returns:
        `entropy` (mean over all counted tokens, 0 if none), `logits/chosen` and `logits/rejected`
        (mean of the per-token vocabulary-mean logit over each group's counted tokens, NaN if none).
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask: expected [B, T] per-token flags, got {shape}")
    for name, value in (("entropy", entropy), ("mean_logits", mean_logits)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.shape != mask.shape:
            got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name}: expected a floating-point tensor of shape {tuple(mask.shape)} (that of mask), "
                             f"got {got}")
    counted = mask != 0
    good = _check_desirable(desirable, counted.new_empty(counted.shape[:1])).unsqueeze(-1)
    dtype = torch.promote_types(entropy.dtype, mean_logits.dtype)
    entropy, mean_logits = entropy.detach().to(dtype), mean_logits.detach().to(dtype)
    totals = [torch.where(counted, entropy, 0.0).sum(), counted.sum().to(dtype)]
    for members in (counted & good, counted & ~good):
        totals += [torch.where(members, mean_logits, 0.0).sum(), members.sum().to(dtype)]
    entropy_sum, tokens, chosen_logits, chosen, rejected_logits, rejected = _pooled(torch.stack(totals), gather)
    return {
        "entropy": metric(entropy_sum / tokens.clamp(min=1)),
        "logits/chosen": metric(chosen_logits / chosen),
        "logits/rejected": metric(rejected_logits / rejected),
    }


def _like(value: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Reference-side values, detached, in the policy's precision: fp64 reference log-probs (say,
    precomputed and stored) must not silently turn an fp32 loss into an fp64 one."""
    return value.detach().to(policy.dtype)


def _check_desirable(desirable: object, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(desirable, torch.Tensor):
        raise TypeError(f"desirable: expected a torch.Tensor of bools, got {type(desirable).__name__}")
    if desirable.dtype != torch.bool and (desirable.is_floating_point() or desirable.is_complex()):
        raise TypeError(f"desirable: expected a bool (or 0/1 integer) tensor, got {desirable.dtype}")
    if desirable.shape != like.shape:
        raise ValueError(f"desirable: expected shape {tuple(like.shape)} (one label per completion), got "
                         f"{tuple(desirable.shape)}")
    if desirable.device != like.device:
        raise ValueError(f"desirable: expected a tensor on {like.device}, got {desirable.device}")
    if desirable.dtype != torch.bool and values_checkable(desirable):
        other = (desirable != 0) & (desirable != 1)
        if bool(other.any()):
            # A 2 or a -1 is no label: it would count as desirable without a word.
            position = int(other.nonzero()[0, 0])
            raise ValueError(
                f"desirable: expected labels 0 or 1, found {int(desirable[position])} at position {position}"
            )
    return desirable != 0


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    gather: Gather | None = None,
    options: KTOOptions | None = None,
    **option_kwargs,
) -> LossOutput:
    """KTO / unpaired APO-zero loss from per-sequence log-probs.

    Args:
        policy_logps: `[B]` sums of the policy's per-token log-probs over each completion.
        ref_logps: `[B]` the same sums under the reference model.
        desirable: `[B]` bool, True for a desirable completion (TRL's `label`).
        kl_logps, ref_kl_logps: `[B_kl]` policy and reference log-prob sums over the mismatched KL
            completions ("kto" only; B_kl >= 2). Detached here.
        kl: instead of those, the baseline estimate itself (e.g. already averaged across ranks);
            detached and clamped at 0 here.
        gather: every process's tensor concatenated along dim 0, for metrics (and a KL baseline from
            kl_logps) over every process; see the module docstring. None: this process's.
        options: the options below, checked once by `kto_options(...)`; or pass them as keywords.

    Options (keywords, or options=kto_options(...), not both):
        {options}

    Returns:
        LossOutput: the weighted per-completion losses averaged over B, and TRL's metrics `kl`,
        `rewards/chosen`, `logps/chosen`, `rewards/rejected`, `logps/rejected`, `rewards/margins`
        (NaN for a group with no completion in the batch).
    """
    options = options_from(options, option_kwargs, KTOOptions, kto_options)
    check_gather(gather)
    policy = check_sequence_values("policy_logps", policy_logps)
    reference = check_sequence_values("ref_logps", ref_logps, policy_logps, "policy_logps")
    labels = _check_desirable(desirable, policy_logps)
    z = _resolve_kl(options, kl_logps, ref_kl_logps, kl, policy, gather)
    return kto_from_sequences(policy, _like(reference, policy), labels, _like(z, policy), options, gather)


def kto_loss_from_logits(
    logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    desirable: torch.Tensor | None = None,
    *,
    completion_mask: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    gather: Gather | None = None,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sequence_group: object = None,
    vocab_group: object = None,
    options: KTOOptions | None = None,
    **option_kwargs,
) -> LossOutput:
    """KTO / unpaired APO-zero loss from the policy's logits, reading the vocabulary once.

    `logits` `[B, T, V]` and `labels` `[B, T]` are aligned (pass `logits[:, :-1]`, `input_ids[:, 1:]`;
    the view is read in place); or, in place of `logits`, `hidden` `[B, T, H]` with the lm_head
    `weight` `[V, H]` (and `bias`), the logits never materialized. A position counts when its
    label is not `ignore_index` and `completion_mask` (if given, `completion_mask[:, 1:]`) is
    nonzero. `ref_logps` and `desirable` (both required) and the rest are as in `kto_loss`; the
    metrics add `kto_token_metrics`' `entropy`, `logits/chosen` and `logits/rejected`.
    `cu_seqlens` / `position_ids`: a packed row `[1, total, ...]` holding the B sequences in order
    instead of the padded batch (`fastalign.packing`).
    {scaling}

    Options (keywords, or options=kto_options(...), not both):
        {options}
    """
    options = options_from(options, option_kwargs, KTOOptions, kto_options)
    logits = policy_logits(logits, hidden, weight, bias, labels, vocab_group)
    return _kto_from_logits(logits, labels, ref_logps, desirable, completion_mask, ignore_index,
                            kl_logps, ref_kl_logps, kl, options, gather, cu_seqlens, position_ids, sequence_group,
                            vocab_group)


def _kto_from_logits(logits, labels, ref_logps, desirable, completion_mask, ignore_index,
                     kl_logps, ref_kl_logps, kl, options: KTOOptions, gather: Gather | None,
                     cu_seqlens=None, position_ids=None, sequence_group=None, vocab_group=None) -> LossOutput:
    if not isinstance(logits, (torch.Tensor, HiddenStates)) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected [B, T, V], got {shape}")
    if logits.shape[0] == 0:
        raise ValueError("logits: the batch is empty")
    layout = sequence_layout(logits, labels, cu_seqlens, position_ids, sequence_group, paired=False)
    check_gather(gather)
    # Fixes B and the device for the per-sequence checks.
    batch = layout.rows if layout is not None else logits.shape[0]
    rows = (logits.hidden if isinstance(logits, HiddenStates) else logits).new_empty(batch)
    reference = check_sequence_values("ref_logps", ref_logps, rows, "logits.shape[:1]")
    good = _check_desirable(desirable, rows)
    if completion_mask is not None:
        check_token_mask("completion_mask", completion_mask, labels)
    z = _resolve_kl(options, kl_logps, ref_kl_logps, kl, reference, gather)
    seq = sequence_logprobs(logits, labels, completion_mask=completion_mask, ignore_index=ignore_index,
                            outputs=("entropy", "mean_logits"), layout=layout, vocab_group=vocab_group)
    out = kto_from_sequences(seq.logps, _like(reference, seq.logps), good, _like(z, seq.logps), options, gather)
    out.metrics.update(kto_token_metrics(seq.token.entropy, seq.token.mean_logits, seq.mask, good, gather=gather))
    return out


class KTOLoss(nn.Module):
    """KTO / unpaired APO-zero loss on `[B, T, V]` policy logits or `[B, T, H]` hidden states (see
    `kto_loss_from_logits`); the options are checked when it is built.

    Options (keywords; `ignore_index`, the label value not counted, besides):
        {options}
    """

    @keyword_only(*parameter_names(kto_options), "ignore_index")
    def __init__(self, *, ignore_index: int = -100, **options) -> None:
        super().__init__()
        self.options = kto_options(**options)
        self.ignore_index = check_ignore_index(ignore_index)

    @keyword_only("completion_mask", "kl_logps", "ref_kl_logps", "kl", "gather")
    def forward(
        self,
        logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        desirable: torch.Tensor | None = None,
        *,
        completion_mask: torch.Tensor | None = None,
        kl_logps: torch.Tensor | None = None,
        ref_kl_logps: torch.Tensor | None = None,
        kl: torch.Tensor | float | None = None,
        gather: Gather | None = None,
        hidden: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        sequence_group: object = None,
        vocab_group: object = None,
    ) -> LossOutput:
        return kto_loss_from_logits(
            logits, labels, ref_logps, desirable, completion_mask=completion_mask, hidden=hidden, weight=weight,
            bias=bias, ignore_index=self.ignore_index, kl_logps=kl_logps, ref_kl_logps=ref_kl_logps, kl=kl,
            gather=gather, cu_seqlens=cu_seqlens, position_ids=position_ids,
            sequence_group=sequence_group, vocab_group=vocab_group, options=self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in fields(self.options))


option_docs.document(
    option_docs.KTO, kto_options, kto_options, kto_loss, kto_loss_from_logits, KTOLoss, scaling=SCALING_DOC
)
