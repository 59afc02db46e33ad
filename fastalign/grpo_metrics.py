"""The metrics `grpo_loss` logs: TRL GRPOTrainer's (token means over every process, per-sequence
extremes of the clip flags) or verl's actor metrics, under each trainer's names, from the pieces of
the objective (`fastalign.policy_objective.objective`) the loss already computed.
"""

from __future__ import annotations

import math

import torch

from .masked import masked_mean, masked_sum
from .sequence import metric

# TRL's loss types that log clip_ratio/* (the clipped surrogate), and those whose logged policy
# loss TRL scales by the gradient accumulation steps.
CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
TRL_GA_SCALED = ("grpo", "sapo", "bnpo", "dr_grpo", "luspo")


def grpo_metrics(o, obj, pieces, token_logps, old_logps, entropies, mask, adv, w_pg, w_kl, w_entropy, gather=None,
                 vespo_phi=None):
    """The trainer's metrics under the option's convention (TRL's or verl's names and reductions).
    `vespo_phi`: VESPO's sequence weights ([B, 1], or [B, T] for per-token advantages)."""
    pg_loss = masked_sum(pieces["pg"].detach(), w_pg).detach()
    kl_loss = masked_sum(pieces["kl"].detach(), w_kl) if w_kl is not None else None
    if o.convention == "trl":
        out = _trl_metrics(o, pieces, entropies, mask, adv, pg_loss, kl_loss, gather, vespo_phi)
    else:
        out = _verl_metrics(o, obj, pieces, token_logps, old_logps, entropies, mask, adv, w_entropy, pg_loss, kl_loss)
    return {name: metric(value) for name, value in out.items() if value is not None}


def _trl_metrics(o, pieces, entropies, mask, adv, pg_loss, kl_loss, gather, vespo_phi=None):
    """GRPOTrainer's metrics: token means over every process (`gather`), per-sequence extremes."""
    ratio = pieces["ratio"].detach()

    def global_mean(x):
        # TRL's global_masked_mean; a per-sequence value [B, 1] counts once per sequence.
        return masked_mean(x, torch.ones_like(x) if x.shape[-1] == 1 else mask, gather=gather)

    def seq_means(x):
        seq = x.squeeze(-1) if x.shape[-1] == 1 else (x * mask).sum(-1) / mask.sum(-1)
        return seq if gather is None else gather(seq)

    out = {}
    if o.beta != 0:
        out["kl"] = global_mean(pieces["kl"].detach())
    if entropies is not None:
        out["entropy"] = global_mean(entropies.detach())
    if o.loss_type in CLIP_TYPES:
        coef = ratio.clamp(max=o.delta) if o.delta is not None else ratio
        low = ((coef < 1 - o.epsilon_low) & (adv < 0)).float()
        high = ((coef > 1 + o.epsilon_high) & (adv > 0)).float()
        region = ((low + high) > 0).float()
        out["clip_ratio/low_mean"] = global_mean(low)
        out["clip_ratio/high_mean"] = global_mean(high)
        out["clip_ratio/region_mean"] = global_mean(region)
        out["clip_ratio/low_min"] = _nan_extreme(seq_means(low), torch.min)
        out["clip_ratio/high_max"] = _nan_extreme(seq_means(high), torch.max)
    elif o.loss_type == "cispo":
        out["cispo_clip_ratio"] = global_mean(((ratio > o.epsilon_high) & (adv > 0)).float())
    elif o.loss_type == "vespo":
        # Per sequence, every sequence counts once, those without a counted token too (as TRL logs it).
        out["vespo/phi_seq_mean"] = global_mean(vespo_phi)
    if o.entropy_coef != 0:
        policy = pg_loss + (kl_loss if kl_loss is not None else 0.0)
        if o.loss_type in TRL_GA_SCALED:
            policy = policy * o.gradient_accumulation_steps
        out["policy_loss"] = policy if gather is None else gather(policy.view(1)).nanmean()
        out["entropy_coef"] = torch.tensor(o.entropy_coef)
    return out


def _verl_metrics(o, obj, pieces, token_logps, old_logps, entropies, mask, adv, w_entropy, pg_loss, kl_loss):
    """verl's actor metrics (`compute_policy_loss_*`, the KL loss) under its names."""
    ratio = pieces["ratio"].detach()
    log_ratio_ = pieces["log_ratio"].detach()

    def verl_mean(x):
        return masked_mean(x, mask, eps=1e-8)  # verl's masked_mean

    out = {}
    if o.loss_type == "gspo":
        # verl's ppo_kl for GSPO is the plain token log-ratio, not the sequence one.
        log_ratio_ = token_logps.detach() - old_logps if old_logps is not None else torch.zeros_like(token_logps)
    if o.loss_type in ("vanilla", "gspo"):
        loss1 = -adv * ratio
        loss2 = -adv * ratio.clamp(obj.ratio_low, obj.ratio_high)
        out["actor/pg_clipfrac"] = verl_mean((loss2 > loss1).float())
    elif o.loss_type == "cispo":
        out["actor/pg_clipfrac"] = verl_mean((ratio != ratio.clamp(obj.ratio_low, obj.ratio_high)).float())
    else:
        out["actor/pg_clipfrac"] = torch.zeros(())
    if o.loss_type == "vanilla":
        best = torch.maximum(-adv * ratio, -adv * ratio.clamp(obj.ratio_low, obj.ratio_high))
        out["actor/pg_clipfrac_lower"] = verl_mean(((best > -adv * obj.dual_clip) & (adv < 0)).float())
    else:
        out["actor/pg_clipfrac_lower"] = torch.zeros(())
    out["actor/ppo_kl"] = verl_mean(-log_ratio_)
    out["actor/pg_loss"] = pg_loss
    if entropies is not None and w_entropy is not None:
        out["actor/entropy_loss"] = masked_sum(entropies.detach(), w_entropy / o.entropy_coef)
    if kl_loss is not None:
        out["kl_loss"] = kl_loss / o.beta
        out["kl_coef"] = torch.tensor(o.beta)
    return out


def _nan_extreme(values: torch.Tensor, reduce) -> torch.Tensor:
    """TRL's nanmin / nanmax: the extreme over non-NaN values, NaN when there is none."""
    nan = torch.isnan(values)
    filled = values.masked_fill(nan, math.inf if reduce is torch.min else -math.inf)
    return torch.where(nan.all(), float("nan"), reduce(filled))
