"""The token-level policy objective as TRL and verl write it: the importance ratio, the
surrogates, the KL estimators, the loss pieces and their gradient in the log-probs, and the
clipped value loss. The loss value and every metric of GRPO, PPO and RLOO are computed here
from the per-token log-probs; the kernels run `objective_grad`'s formula (tests check it against
autograd of `objective`, and each kernel against it).

Sources, read against TRL 1.16 and verl 0.9.1:
- TRL `GRPOTrainer._compute_loss`: the surrogate per loss type (grpo/bnpo/dr_grpo/dapo/luspo clip
  with `delta`, cispo, sapo), the k3 KL with `use_bias_correction_kl`, the entropy bonus.
- verl `compute_policy_loss_vanilla` / `_gspo` / `_sapo` / `_cispo`, `kl_penalty` and
  `compute_value_loss` (verl/trainer/ppo/core_algos.py).

Every loss is  sum_t w_pg*surrogate + w_kl*kl - w_entropy*H  with per-token weights from
`fastalign.aggregation`: the trainers' aggregation, regrouped so that the kernels can be handed
the weights before they see a single logit.
"""

from __future__ import annotations

import math

import torch

from .masked import masked_sum
from .token_objective import TokenObjective


def log_ratio(logps: torch.Tensor, old_logps: torch.Tensor | None, clamp: float = math.inf) -> torch.Tensor:
    """log(pi / pi_old); without old log-probs, logps - sg(logps): 0 with the on-policy gradient."""
    value = logps - (logps.detach() if old_logps is None else old_logps)
    return value.clamp(-clamp, clamp) if math.isfinite(clamp) else value


def sapo_temperature(advantages: torch.Tensor, ratio: torch.Tensor, obj: TokenObjective) -> torch.Tensor:
    """SAPO's tau per token (tau_pos where A > 0, else tau_neg) in the computation's dtype.

    torch.where on two Python floats makes an fp32 tensor, so tau_neg = 1.05 would be rounded to
    fp32 before an fp64 computation; verl builds the temperatures in the advantages' dtype."""
    dtype = torch.promote_types(advantages.dtype, ratio.dtype)
    pos = torch.tensor(obj.tau_pos, dtype=dtype, device=advantages.device)
    neg = torch.tensor(obj.tau_neg, dtype=dtype, device=advantages.device)
    return torch.where(advantages > 0, pos, neg)


def surrogate(
    log_ratio_: torch.Tensor, logps: torch.Tensor, advantages: torch.Tensor, obj: TokenObjective
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token policy loss, ratio r = exp(log_ratio_)); shapes broadcast like the trainers'."""
    ratio = torch.exp(log_ratio_)
    a = advantages
    if obj.surrogate == "clip":
        unclipped = ratio.clamp(max=obj.delta) if math.isfinite(obj.delta) else ratio
        loss1 = -a * unclipped
        loss2 = -a * ratio.clamp(obj.ratio_low, obj.ratio_high)
        loss = torch.maximum(loss1, loss2)
        if math.isfinite(obj.dual_clip):
            loss = torch.where(a < 0, torch.minimum(-a * obj.dual_clip, loss), loss)
        return loss, ratio
    if obj.surrogate == "cispo":
        low = obj.ratio_low if math.isfinite(obj.ratio_low) else None
        weight = ratio.clamp(low, obj.ratio_high).detach()
        return -weight * a * logps, ratio
    if obj.surrogate == "sapo":
        tau = sapo_temperature(a, ratio, obj)
        return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a, ratio
    raise ValueError(f"unknown surrogate {obj.surrogate!r}")


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, obj: TokenObjective) -> torch.Tensor:
    """The per-token KL estimate of `obj.kl` (TRL's k3, or verl's `kl_penalty`)."""
    diff = logps - ref_logps
    if obj.kl == "k1":
        value = diff
    elif obj.kl == "abs":
        value = diff.abs()
    elif obj.kl == "k2":
        value = 0.5 * diff.square()
    elif obj.kl == "k3":
        value = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
    elif obj.kl == "low_var_kl":
        kl = (ref_logps - logps).clamp(-20, 20)
        value = (torch.exp(kl) - kl - 1).clamp(-10, 10)
    else:
        raise ValueError(f"unknown KL estimator {obj.kl!r}")
    if obj.kl_straight_through:
        backward = 0.5 * diff.square()
        value = backward - backward.detach() + value.detach()
    return value


def objective(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    obj: TokenObjective,
    w_pg: torch.Tensor,
    w_kl: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    w_entropy: torch.Tensor | None = None,
    log_ratio_: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All per-token pieces and the total loss; differentiable in logps (and entropy).

    `log_ratio_` overrides the token log-ratio (sequence-level importance sampling)."""
    lr = log_ratio(logps, old_logps, obj.log_ratio_clamp) if log_ratio_ is None else log_ratio_
    lr_loss = lr
    if log_ratio_ is None:
        # Padding holds whatever the rollout left there (NaN, a log-prob of -1e4): masked_sum never
        # reads its value, but autograd would still multiply the 0 weight by exp(inf) or NaN and send
        # NaN into the log-probs. The loss sees a ratio of 1 and an advantage of 0 there instead (the
        # pieces keep the rollout's ratio: metrics average it over the completion mask).
        unread = w_pg == 0 if w_kl is None else (w_pg == 0) & (w_kl == 0)
        lr_loss = torch.where(unread, 0.0, lr)
        advantages = torch.where(unread, 0.0, advantages)
        if ref_logps is not None:
            ref_logps = torch.where(unread, logps.detach(), ref_logps)
    pg, ratio = surrogate(lr_loss, logps, advantages, obj)
    loss = masked_sum(pg, w_pg)
    out = {"pg": pg, "ratio": ratio if lr_loss is lr else torch.exp(lr), "log_ratio": lr}
    if obj.kl != "none":
        kl = kl_penalty(logps, ref_logps, obj)
        if obj.kl_bias_correction:
            kl = kl * ratio
        out["kl"] = kl
        loss = loss + masked_sum(kl, w_kl)
    if w_entropy is not None:
        loss = loss - masked_sum(entropy, w_entropy)
    out["loss"] = loss
    return out


def objective_grad(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    obj: TokenObjective,
    w_pg: torch.Tensor,
    w_kl: torch.Tensor | None,
) -> torch.Tensor:
    """d loss / d logps of `objective` (token level), written out: the formula the kernels run.

    Ties of max/min split the gradient evenly (as torch.maximum/minimum do); a clamp passes the
    gradient at its bounds (as torch.clamp does). Tests check it against autograd of `objective`.
    """
    l, a = logps, advantages
    lr = torch.zeros_like(l) if old_logps is None else l - old_logps
    in_clamp = (lr.abs() <= obj.log_ratio_clamp).to(l.dtype)
    r = torch.exp(lr.clamp(-obj.log_ratio_clamp, obj.log_ratio_clamp))
    if obj.surrogate == "clip":
        d1 = -a * r * in_clamp * (r <= obj.delta)
        d2 = -a * r * in_clamp * ((r >= obj.ratio_low) & (r <= obj.ratio_high))
        loss1 = -a * torch.clamp(r, max=obj.delta)
        loss2 = -a * r.clamp(obj.ratio_low, obj.ratio_high)
        d = torch.where(loss1 > loss2, d1, torch.where(loss2 > loss1, d2, 0.5 * (d1 + d2)))
        if math.isfinite(obj.dual_clip):
            loss3 = -a * obj.dual_clip
            best = torch.maximum(loss1, loss2)
            dual = torch.where(loss3 < best, 0.0, torch.where(loss3 > best, d, 0.5 * d))
            d = torch.where(a < 0, dual, d)
    elif obj.surrogate == "cispo":
        d = -r.clamp(obj.ratio_low, obj.ratio_high) * a
    else:  # sapo: d/dl of -sigmoid(tau (r - 1)) * 4 / tau * A
        tau = sapo_temperature(a, r, obj)
        s = torch.sigmoid(tau * (r - 1))
        d = -4 * a * s * (1 - s) * r * in_clamp
    grad = torch.where(w_pg != 0, d * w_pg, 0.0)
    if obj.kl != "none":
        diff = l - ref_logps
        x = ref_logps - l
        if obj.kl == "k1":
            value, dk = diff, torch.ones_like(l)
        elif obj.kl == "abs":
            value, dk = diff.abs(), torch.sign(diff)
        elif obj.kl == "k2":
            value, dk = 0.5 * diff.square(), diff
        elif obj.kl == "k3":
            value, dk = torch.exp(x) - x - 1, 1 - torch.exp(x)
        else:  # low_var_kl
            xc = x.clamp(-20, 20)
            raw = torch.exp(xc) - xc - 1
            value = raw.clamp(-10, 10)
            dk = (1 - torch.exp(xc)) * (x.abs() <= 20) * (raw.abs() <= 10)
        if obj.kl_straight_through:
            dk = diff
        if obj.kl_bias_correction:
            # d(kl * r)/dl, r = exp(l - o) (on-policy: r = 1 with dr/dl = 1).
            dk = (dk + value * in_clamp) * r
        grad = grad + torch.where(w_kl != 0, dk * w_kl, 0.0)
    return grad


def sequence_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """[B, 1]: log(pi(y) / pi_old(y)) of each completion, its token log-probs summed over the
    counted tokens (TRL RLOOTrainer's ratio; `old_logps` [B, 1] are already summed). Without them,
    s - sg(s): a ratio of 1 that keeps the on-policy gradient. A sum, where GSPO's sequence ratio
    is a mean: the two differ as soon as a completion has more than one token."""
    s = masked_sum(logps, mask, dim=-1).unsqueeze(-1)
    return s - (s.detach() if old_logps is None else old_logps)


def clipped_value_loss(
    vpreds: torch.Tensor, values: torch.Tensor, returns: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token max(vf1, vf2), clipped flag): TRL PPOTrainer's and verl's compute_value_loss before
    the 0.5 * aggregation. Without `clip` the loss is the plain squared error."""
    loss1 = (vpreds - returns).square()
    if clip is None:
        return loss1, torch.zeros_like(loss1, dtype=torch.bool)
    clipped = torch.max(torch.min(vpreds, values + clip), values - clip)  # verl's clip_by_value
    loss2 = (clipped - returns).square()
    return torch.max(loss1, loss2), loss2 > loss1
