"""RLOO's policy loss from logits, hidden states or per-token log-probs: TRL 1.16's
`RLOOTrainer._compute_loss` and the metrics it logs.

A PPO-clip surrogate per sequence whose ratio compares *summed* completion log-probs with the
rollout's (`fastalign.policy_objective.sequence_log_ratio`), averaged over the sequences. Metrics, under TRL's names:
`entropy` (mean over the counted tokens) and `clip_ratio/low_mean`, `low_min`, `high_mean`,
`high_max`, `region_mean` (per-sequence flags: ratio below 1 - eps_low with A < 0, above
1 + eps_high with A > 0, either; mean / min / max over the sequences).

The ratio needs every log-prob of a sequence before any gradient exists, so from logits (or
hidden states) this is `token_logprobs`' forward, the sequence math, then its backward: the
two-pass path of `fastalign/policy.py`. The leave-one-out advantages themselves come from
`fastalign.group_advantages(estimator="rloo", convention="trl")`.

Options follow every loss's convention (GRPO's): `rloo_options(...)` checks them into
`RLOOOptions`, `rloo_loss` takes them as keywords or as `options=` (not both), and
`RLOOLoss(**options)` checks them once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import option_docs
from .policy_layout import LAYOUT_DOC, laid_out, policy_on_sequences
from ._checks import check_gather, check_positive_finite, options_from
from ._deprecation import keyword_only, parameter_names
from .aggregation import sequence_mean_weights
from .masked import masked_sum
from .policy import run_objective
from .policy_inputs import (
    as_float,
    check_batch_not_empty,
    check_epsilon,
    check_policy_labels,
    check_tokens,
    check_transform,
    token_shape,
)
from .policy_objective import sequence_log_ratio
from .sequence import metric
from .token_objective import TokenObjective
from .types import LossOutput


def clip_range(epsilon: float, epsilon_high: float | None = None, *, prefix: str = "") -> tuple[float, float]:
    """(epsilon_low, epsilon_high): the ratio is clipped to [1 - epsilon, 1 + epsilon_high], and
    epsilon_high defaults to epsilon (TRL's RLOOConfig). epsilon is in (0, 1) (a lower bound of
    at least 0 is no clipping at all); epsilon_high is any positive number. `prefix` goes in front
    of the names in errors."""
    low = check_epsilon(f"{prefix}epsilon", epsilon)
    high = low if epsilon_high is None else check_positive_finite(f"{prefix}epsilon_high", epsilon_high)
    return low, high


@dataclass(frozen=True)
class RLOOOptions:
    """Checked RLOO options, built by `rloo_options(...)`: the clipping range and the logit transform
    (temperature, logit_scale, softcap)."""

    epsilon_low: float
    epsilon_high: float
    transform: tuple[float, float, float | None]


def rloo_options(
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> RLOOOptions:
    """Checks every option once (at construction for `RLOOLoss`) and names the bad one.

    Options:
        {options}
    """
    epsilon_low, epsilon_high = clip_range(epsilon, epsilon_high)
    return RLOOOptions(epsilon_low, epsilon_high, check_transform(temperature, logit_scale, softcap))


def _per_sequence(name: str, value: object, batch: int, device: torch.device, what: str) -> torch.Tensor:
    """A [B] or [B, 1] float tensor, returned as [B, 1]."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) not in ((batch,), (batch, 1)):
        raise ValueError(
            f"{name}: expected shape ({batch},) or ({batch}, 1), {what}; got {tuple(value.shape)}"
        )
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {value.device}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
    return value.reshape(batch, 1)


def rloo_loss(
    logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    logps: torch.Tensor | None = None,
    entropies: torch.Tensor | None = None,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    options: RLOOOptions | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sequence_group: object = None,
    vocab_group: object = None,
    **option_kwargs,
) -> LossOutput:
    """The RLOO policy loss and the trainer's metrics.

    Inputs: `logits` [B, T, V] with `labels` [B, T] (the completion ids); or `hidden` [B, T, H]
    with the lm_head `weight` [V, H] (and `bias`) and `labels`, the logits never materialized; or
    `logps` [B, T] (with `entropies` [B, T] for the entropy metric). `completion_mask` [B, T];
    `advantages` [B]; `old_logps` [B]: the rollout policy's completion log-probs, *summed* over
    the counted tokens as TRL stores them (None: on-policy, a ratio of 1 with its gradient).
    `gather` (several processes): a function returning every process's tensor concatenated along
    dim 0 (lengths may differ), e.g. `fastalign.integrations.trl.gather_for(accelerator)`; the
    metrics are then global, as TRL's trainer logs them. Without it they are this process's.
    {layout}

    Options (keywords, or options=rloo_options(...), not both):
        {options}
    """
    o = options_from(options, option_kwargs, RLOOOptions, rloo_options)
    epsilon_low, epsilon_high = o.epsilon_low, o.epsilon_high
    check_gather(gather)
    if laid_out(cu_seqlens, position_ids, sequence_group, vocab_group):
        return policy_on_sequences(
            rloo_loss, logits=logits, labels=labels, hidden=hidden, weight=weight, bias=bias, logps=logps,
            entropies=entropies, completion_mask=completion_mask, transform=o.transform, cu_seqlens=cu_seqlens,
            position_ids=position_ids, sequence_group=sequence_group, vocab_group=vocab_group, token_inputs={},
            token_or_sequence_inputs={}, advantages=advantages, old_logps=old_logps, options=o, gather=gather,
        )
    lm_head = (hidden, weight, bias) if (hidden is not None or weight is not None or bias is not None) else None
    shape, device, transform = token_shape(logits, labels, logps, o.transform, lm_head)
    check_batch_not_empty(shape, logits, logps)
    batch = shape[0]
    mask = check_tokens("completion_mask", completion_mask, shape, device, floating=False)
    if logits is not None or lm_head is not None:
        check_policy_labels(labels, mask, logits.shape[-1] if logits is not None else lm_head[1].shape[0])
    like = logps if logps is not None else torch.empty(0)
    adv = as_float(_per_sequence("advantages", advantages, batch, device, "one advantage per sequence"), like)
    if old_logps is not None:
        old_logps = as_float(
            _per_sequence(
                "old_logps", old_logps, batch, device,
                "the rollout's completion log-probs summed per sequence (per-token old log-probs are grpo_loss's)",
            ),
            like,
        )
    if entropies is not None:
        if logps is None:
            raise ValueError("entropies: only used with logps; from logits the entropy is computed in the same pass")
        entropies = check_tokens("entropies", entropies, shape, device)
    mask_f = as_float(mask, like)
    weights = sequence_mean_weights(mask_f)
    obj = TokenObjective(surrogate="clip", ratio_low=1 - epsilon_low, ratio_high=1 + epsilon_high)

    def sequence_ratio(logps_, entropies_):
        return weights, None, sequence_log_ratio(logps_, old_logps, mask_f)

    pieces, _, token_entropies = run_objective(
        logits=logits, labels=labels, lm_head=lm_head, logps=logps, entropies=entropies, mask=mask,
        old_logps=None, ref_logps=None, advantages=adv, obj=obj, w_pg=weights, w_kl=None, w_entropy=None,
        transform=transform, adjust=sequence_ratio,
    )
    metrics = _metrics(pieces["ratio"], adv, token_entropies, mask_f, epsilon_low, epsilon_high, gather)
    return LossOutput(pieces["loss"], metrics)


def _metrics(ratio, adv, entropies, mask, epsilon_low, epsilon_high, gather):
    """TRL's RLOO metrics, reduced over every process when `gather` is given."""
    out = {}
    if entropies is not None:
        # TRL reduces (sum, count) over the processes, then divides: a global token mean.
        total = masked_sum(entropies.detach(), mask)
        stats = torch.stack([total, mask.sum().to(total.dtype)])
        if gather is not None:
            stats = gather(stats.view(1, 2)).sum(0)
        out["entropy"] = stats[0] / stats[1].clamp(min=1.0)
    r, a = ratio.detach().view(-1), adv.view(-1)
    low = (r < 1 - epsilon_low) & (a < 0)
    high = (r > 1 + epsilon_high) & (a > 0)
    # One gather for the three per-sequence flags (TRL gathers each).
    flags = torch.stack([low, high, low | high], dim=1).float()
    if gather is not None:
        flags = gather(flags)
    low, high, region = flags.unbind(1)
    # TRL's nanmean / nanmin / nanmax: flags are never NaN, so these are the plain reductions.
    out["clip_ratio/low_mean"] = low.mean()
    out["clip_ratio/low_min"] = low.min()
    out["clip_ratio/high_mean"] = high.mean()
    out["clip_ratio/high_max"] = high.max()
    out["clip_ratio/region_mean"] = region.mean()
    return {name: metric(value) for name, value in out.items()}


class RLOOLoss(torch.nn.Module):
    """`rloo_loss` with its options fixed (and checked) at construction.

    >>> loss_fn = RLOOLoss(epsilon=0.2, epsilon_high=0.28, temperature=0.9)
    >>> out = loss_fn(logits=logits, labels=ids, completion_mask=mask, advantages=adv, old_logps=old)

    Options (keywords):
        {options}
    """

    @keyword_only(*parameter_names(rloo_options))
    def __init__(self, **options):
        super().__init__()
        self.options = rloo_options(**options)

    def forward(self, logits=None, labels=None, **inputs) -> LossOutput:
        return rloo_loss(logits, labels, options=self.options, **inputs)


option_docs.document(option_docs.RLOO, rloo_options, rloo_options, rloo_loss, RLOOLoss, layout=LAYOUT_DOC)
