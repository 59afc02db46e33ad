"""PPO: the clipped policy objective (dual-clip, KL penalty, entropy bonus) and the clipped value loss.

The policy term is verl's `compute_policy_loss_vanilla` (TRL's PPOTrainer is the same without
dual-clip and without the +-20 log-ratio clamp: convention="trl"); the value term is
`compute_value_loss` (TRL: `0.5 * masked_mean(max(vf1, vf2))`), both aggregated by verl's
`agg_loss` modes. From logits the policy term takes one pass over the vocabulary (the forward
kernel writes the logits gradient); the value term is elementwise on the value head's [B, T].

    loss = pg_loss + kl_coef * kl_loss - entropy_coef * entropy_loss + vf_coef * vf_loss

Metrics: pg_loss, vf_loss, approx_kl (masked mean of (log r)^2 / 2, TRL's approxkl),
ppo_kl (masked mean of -log r, verl's), clipfrac (share of tokens whose clipped term is the
larger loss), pg_clipfrac_lower (dual-clip active, A < 0), vf_clipfrac, entropy, kl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import option_docs
from .policy_layout import LAYOUT_DOC, laid_out, policy_on_sequences
from ._checks import options_from
from ._deprecation import renamed_option
from .grpo import AGG_MODES
from .policy import run_objective
from .policy_inputs import (
    as_float,
    check_choice,
    check_count,
    check_epsilon,
    check_nonnegative,
    check_optional_positive,
    check_tokens,
    check_total,
    check_transform,
    policy_token_inputs,
)
from .aggregation import verl_weights
from .masked import masked_mean, masked_sum
from .policy_objective import clipped_value_loss
from .sequence import metric
from .token_objective import TokenObjective, kl_estimator_name
from .types import LossOutput


@dataclass(frozen=True)
class PPOOptions:
    convention: str
    epsilon_low: float
    epsilon_high: float
    dual_clip: float | None
    kl_coef: float
    kl_estimator: str
    entropy_coef: float
    vf_coef: float
    value_clip: float | None
    loss_agg_mode: str
    dp_size: int
    loss_scale_factor: float | None
    transform: tuple[float, float, float | None]

    def objective(self) -> TokenObjective:
        kl = self.kl_estimator if self.kl_coef != 0 else "none"
        return TokenObjective(
            surrogate="clip",
            ratio_low=1 - self.epsilon_low,
            ratio_high=1 + self.epsilon_high,
            dual_clip=self.dual_clip if self.dual_clip is not None else math.inf,
            log_ratio_clamp=20.0 if self.convention == "verl" else math.inf,
            kl=kl.rstrip("+"),
            kl_straight_through=kl.endswith("+"),
        )


def ppo_options(
    *,
    convention: str = "verl",
    epsilon: float = 0.2,
    epsilon_low: float | None = None,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "low_var_kl",
    entropy_coef: float = 0.0,
    vf_coef: float = 0.1,
    value_clip: float | None = 0.2,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> PPOOptions:
    """Checks every option and names the bad one.

    Options:
        {options}
    """
    check_choice("convention", convention, ("trl", "verl"))
    epsilon = check_epsilon("epsilon", epsilon)
    epsilon_low = epsilon if epsilon_low is None else check_epsilon("epsilon_low", epsilon_low)
    epsilon_high = epsilon if epsilon_high is None else check_epsilon("epsilon_high", epsilon_high)
    if dual_clip is not None:
        if isinstance(dual_clip, bool) or not isinstance(dual_clip, (int, float)):
            raise TypeError(f"dual_clip: expected a number > 1 or None, got {type(dual_clip).__name__}")
        if not dual_clip > 1:
            raise ValueError(f"dual_clip: the dual-clip bound c must be > 1, got {dual_clip!r}")
    if convention == "trl" and dual_clip is not None:
        raise ValueError("dual_clip: TRL's PPO has no dual-clip; use convention='verl'")
    kl_coef = check_nonnegative("kl_coef", kl_coef)
    kl_estimator = kl_estimator_name(kl_estimator, convention)
    entropy_coef = check_nonnegative("entropy_coef", entropy_coef)
    vf_coef = check_nonnegative("vf_coef", vf_coef)
    value_clip = check_optional_positive("value_clip", value_clip)
    check_choice("loss_agg_mode", loss_agg_mode, AGG_MODES)
    check_count("dp_size", dp_size)
    loss_scale_factor = check_optional_positive("loss_scale_factor", loss_scale_factor)
    return PPOOptions(
        convention, epsilon_low, epsilon_high, None if dual_clip is None else float(dual_clip), kl_coef,
        kl_estimator, entropy_coef, vf_coef, value_clip, loss_agg_mode, dp_size, loss_scale_factor,
        check_transform(temperature, logit_scale, softcap),
    )


def ppo_loss(
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
    ref_logps: torch.Tensor | None = None,
    vpreds: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    value_mask: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    batch_num_tokens: torch.Tensor | float | None = None,
    global_batch_size: torch.Tensor | float | None = None,
    options: PPOOptions | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sequence_group: object = None,
    vocab_group: object = None,
    **option_kwargs,
) -> LossOutput:
    """PPO policy + value loss. `vpreds` [B, T] (the value head, differentiable), `values` [B, T]
    (the rollout's values) and `returns` [B, T] come together or not at all; `value_mask`
    defaults to `completion_mask` (TRL's PPOTrainer masks values one position further).
    `importance_sampling_ratio` [B, T] or [B, 1]: the rollout-correction weights on the policy
    term (verl's `rollout_is_weights`, grpo_loss's argument of the same name);
    `rollout_is_weights=` is its earlier, deprecated name.
    {layout}

    Options (`options=ppo_options(...)`, or these as keywords):
        {options}
    """
    importance_sampling_ratio = renamed_option(
        "rollout_is_weights", rollout_is_weights, "importance_sampling_ratio", importance_sampling_ratio, None
    )
    o = options_from(options, option_kwargs, PPOOptions, ppo_options)
    if laid_out(cu_seqlens, position_ids, sequence_group, vocab_group):
        return policy_on_sequences(
            ppo_loss, logits=logits, labels=labels, hidden=hidden, weight=weight, bias=bias, logps=logps,
            entropies=entropies, completion_mask=completion_mask, transform=o.transform, cu_seqlens=cu_seqlens,
            position_ids=position_ids, sequence_group=sequence_group, vocab_group=vocab_group,
            token_inputs=dict(old_logps=old_logps, ref_logps=ref_logps, vpreds=vpreds, values=values,
                              returns=returns, value_mask=value_mask),
            token_or_sequence_inputs=dict(advantages=advantages, importance_sampling_ratio=importance_sampling_ratio),
            batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size, options=o,
        )
    check_total("batch_num_tokens", batch_num_tokens, zero_ok=False)
    check_total("global_batch_size", global_batch_size, zero_ok=False)
    lm_head = (hidden, weight, bias) if (hidden is not None or weight is not None or bias is not None) else None
    x = policy_token_inputs(
        logits=logits, labels=labels, logps=logps, entropies=entropies, completion_mask=completion_mask,
        advantages=advantages, old_logps=old_logps, ref_logps=ref_logps, transform=o.transform,
        lm_head=lm_head, kl_name="kl_coef",
        kl_weight=o.kl_coef, entropy_needed_by="entropy_coef != 0" if o.entropy_coef != 0 else None,
    )
    shape, device, transform, like, mask, mask_f = x.shape, x.device, x.transform, x.like, x.mask, x.mask_f
    adv, old_logps, ref_logps, entropies = x.advantages, x.old_logps, x.ref_logps, x.entropies
    given = [name for name, t in (("vpreds", vpreds), ("values", values), ("returns", returns)) if t is not None]
    if given and len(given) != 3:
        missing = sorted({"vpreds", "values", "returns"} - set(given))
        raise ValueError(f"{', '.join(missing)}: the value loss needs vpreds, values and returns together")
    if value_mask is not None and not given:
        raise ValueError("value_mask: only used by the value loss, which needs vpreds, values and returns")
    if o.dp_size > 1:
        if o.loss_agg_mode == "token-mean" and batch_num_tokens is None:
            raise ValueError("batch_num_tokens: required when dp_size > 1 with loss_agg_mode='token-mean'")
        if o.loss_agg_mode.startswith("seq-mean") and global_batch_size is None:
            raise ValueError(f"global_batch_size: required when dp_size > 1 with loss_agg_mode={o.loss_agg_mode!r}")

    def weights(m, given_dtype):
        return verl_weights(
            m, o.loss_agg_mode, dp_size=o.dp_size, batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size, loss_scale_factor=o.loss_scale_factor, verl_mask_dtype=given_dtype,
        )

    w = weights(mask_f, mask.dtype)
    w_pg = w
    if importance_sampling_ratio is not None:
        w_pg = w * as_float(
            check_tokens("importance_sampling_ratio", importance_sampling_ratio, shape, device, per_sequence=True), like
        )
    w_kl = o.kl_coef * w if o.kl_coef != 0 else None
    w_entropy = o.entropy_coef * w if o.entropy_coef != 0 else None
    obj = o.objective()
    pieces, token_logps, token_entropies = run_objective(
        logits=logits, labels=labels, lm_head=lm_head, logps=logps, entropies=entropies, mask=mask, old_logps=old_logps,
        ref_logps=ref_logps, advantages=adv, obj=obj, w_pg=w_pg, w_kl=w_kl, w_entropy=w_entropy,
        transform=transform,
    )
    loss = pieces["loss"]
    metrics = _policy_metrics(o, obj, pieces, token_entropies, mask_f, adv, w_pg, w_kl, w)
    if given:
        vmask = mask if value_mask is None else value_mask
        vmask_dtype = vmask.dtype if isinstance(vmask, torch.Tensor) else None
        vmask = as_float(check_tokens("value_mask", vmask, shape, device, floating=False), like)
        vpreds_ = check_tokens("vpreds", vpreds, shape, device)
        values_ = check_tokens("values", values, shape, device).detach()
        returns_ = check_tokens("returns", returns, shape, device).detach()
        # Past a response's end the rollout may leave anything (NaN returns): masked_sum never reads
        # those tokens, but the squared error's gradient there would be 0 * NaN.
        kept = vmask != 0
        values_ = torch.where(kept, values_, vpreds_.detach())
        returns_ = torch.where(kept, returns_, vpreds_.detach())
        per_token, clipped = clipped_value_loss(vpreds_, values_, returns_, o.value_clip)
        vf_loss = 0.5 * masked_sum(per_token, weights(vmask, vmask_dtype))
        loss = loss + o.vf_coef * vf_loss
        metrics["vf_loss"] = metric(vf_loss)
        metrics["vf_clipfrac"] = metric(masked_mean(clipped.float(), vmask))
    return LossOutput(loss, metrics)


def _policy_metrics(o, obj, pieces, entropies, mask, adv, w_pg, w_kl, w):
    ratio = pieces["ratio"].detach()
    log_ratio_ = pieces["log_ratio"].detach()
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(obj.ratio_low, obj.ratio_high)
    out = {
        "pg_loss": masked_sum(pieces["pg"].detach(), w_pg),
        "approx_kl": masked_mean(0.5 * log_ratio_.square(), mask),
        "ppo_kl": masked_mean(-log_ratio_, mask),
        "clipfrac": masked_mean((loss2 > loss1).float(), mask),
    }
    if o.dual_clip is not None:
        best = torch.maximum(loss1, loss2)
        out["pg_clipfrac_lower"] = masked_mean(((best > -adv * o.dual_clip) & (adv < 0)).float(), mask)
    else:
        out["pg_clipfrac_lower"] = torch.zeros(())
    if entropies is not None:
        out["entropy"] = masked_mean(entropies.detach(), mask)
    if w_kl is not None:
        out["kl"] = masked_sum(pieces["kl"].detach(), w)
    return {name: metric(value) for name, value in out.items()}


class PPOLoss(torch.nn.Module):
    """`ppo_loss` with its options fixed (and checked) at construction.

    Options:
        {options}
    """

    def __init__(self, **options):
        super().__init__()
        self.options = ppo_options(**options)

    def forward(self, logits=None, labels=None, **inputs) -> LossOutput:
        return ppo_loss(logits, labels, options=self.options, **inputs)


option_docs.document(option_docs.PPO, ppo_options, ppo_options, ppo_loss, PPOLoss, layout=LAYOUT_DOC)
