"""Policy-gradient math in plain PyTorch, as TRL and verl write it (the ground truth).

Sources, read against TRL 1.16 and verl 0.9.1:
- TRL `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py): the surrogate per loss type
  (grpo/bnpo/dr_grpo/dapo/luspo clip with `delta`, cispo, sapo), the k3 KL with
  `use_bias_correction_kl`, the normalizer of each loss type, the entropy bonus.
- verl `compute_policy_loss_vanilla` / `_gspo` / `_sapo` / `_cispo`, `agg_loss`, `kl_penalty`
  and `compute_value_loss` (verl/trainer/ppo/core_algos.py).

Every loss here is  sum_t w_pg*surrogate + w_kl*kl - w_entropy*H  with per-token weights from
`trl_weights` / `verl_weights`; this is the aggregation the trainers perform, regrouped so that
the kernels can be handed the weights before they see a single logit.
"""

from __future__ import annotations

import math

import torch

from ..token_objective import TokenObjective


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


def masked_total(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(values * weights) where the weight is nonzero: a masked token's inf/NaN never leaks in."""
    values, weights = torch.broadcast_tensors(values, weights)
    return torch.where(weights != 0, values * weights, 0.0).sum()


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
        # Padding holds whatever the rollout left there (NaN, a log-prob of -1e4): masked_total never
        # reads its value, but autograd would still multiply the 0 weight by exp(inf) or NaN and send
        # NaN into the log-probs. The loss sees a ratio of 1 and an advantage of 0 there instead (the
        # pieces keep the rollout's ratio: metrics average it over the completion mask).
        unread = w_pg == 0 if w_kl is None else (w_pg == 0) & (w_kl == 0)
        lr_loss = torch.where(unread, 0.0, lr)
        advantages = torch.where(unread, 0.0, advantages)
        if ref_logps is not None:
            ref_logps = torch.where(unread, logps.detach(), ref_logps)
    pg, ratio = surrogate(lr_loss, logps, advantages, obj)
    loss = masked_total(pg, w_pg)
    out = {"pg": pg, "ratio": ratio if lr_loss is lr else torch.exp(lr), "log_ratio": lr}
    if obj.kl != "none":
        kl = kl_penalty(logps, ref_logps, obj)
        if obj.kl_bias_correction:
            kl = kl * ratio
        out["kl"] = kl
        loss = loss + masked_total(kl, w_kl)
    if w_entropy is not None:
        loss = loss - masked_total(entropy, w_entropy)
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


# Aggregation: per-token weights equal to each trainer's normalization.


def trl_weights(
    mask: torch.Tensor,
    loss_type: str,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int | None = None,
) -> torch.Tensor:
    """Weights w [B, T] with sum(w * x) = the loss TRL's `_compute_loss` forms from per-token x."""
    m = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    ga = gradient_accumulation_steps
    if loss_type in ("grpo", "sapo"):
        return m / m.sum(-1, keepdim=True).clamp(min=1.0) / m.shape[0] / ga
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0) / ga
    if loss_type == "dr_grpo":
        return m / (m.shape[0] * max_completion_length) / ga
    if loss_type in ("dapo", "cispo"):
        n = torch.as_tensor(num_items_in_batch, dtype=m.dtype, device=m.device)
        normalizer = n.clamp(min=1.0) / num_processes
        normalizer = normalizer * ga / (steps_per_generation or ga)
        return m / normalizer
    if loss_type == "luspo":
        return m / m.shape[0] / ga
    raise ValueError(f"unknown TRL loss type {loss_type!r}")


def verl_weights(
    mask: torch.Tensor,
    loss_agg_mode: str,
    *,
    dp_size: int = 1,
    batch_num_tokens: torch.Tensor | float | None = None,
    global_batch_size: torch.Tensor | float | None = None,
    loss_scale_factor: float | None = None,
    verl_mask_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weights w [B, T] with sum(w * x) = verl's `agg_loss(x, mask, loss_agg_mode, ...)`.

    `verl_mask_dtype`: the dtype of the mask the caller handed verl, when `mask` is a converted copy.
    One departure: "token-mean" over a batch without a single token gives 0, not 0/0."""
    m = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    verl_mask_dtype = mask.dtype if verl_mask_dtype is None else verl_mask_dtype
    if loss_agg_mode == "token-mean":
        total = m.sum().clamp(min=1.0) if batch_num_tokens is None else torch.as_tensor(batch_num_tokens)
        return m / total.to(m) * dp_size
    if loss_agg_mode == "token-sum":
        return m * dp_size
    counts = m.sum(-1, keepdim=True)
    has_tokens = (counts > 0).to(m.dtype)
    sequences = has_tokens.sum() if global_batch_size is None else torch.as_tensor(global_batch_size)
    sequences = sequences.to(m)
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        w = m * has_tokens / sequences * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            w = w / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return w
    if loss_agg_mode == "seq-mean-token-mean":
        # verl adds its 1e-8 to the count in the mask's dtype (a bool or integer count becomes the
        # default float dtype): below fp64 it vanishes next to a count of 1 or more.
        if verl_mask_dtype == torch.float64 or (
            not verl_mask_dtype.is_floating_point and torch.get_default_dtype() == torch.float64
        ):
            denominator = counts + 1e-8
        else:
            denominator = (counts.float() + 1e-8).to(m.dtype)
        return m / denominator * has_tokens / sequences * dp_size
    raise ValueError(f"unknown verl loss_agg_mode {loss_agg_mode!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) / max(sum(mask), 1), NaN-safe outside the mask."""
    values, mask = torch.broadcast_tensors(values, mask)
    total = torch.where(mask != 0, values * mask, 0.0)
    if dim is None:
        return total.sum() / mask.sum().clamp(min=1.0)
    return total.sum(dim) / mask.sum(dim).clamp(min=1.0)


# The op contract shared with the native and Triton backends (`fastalign::policy_token_forward`):
# logits [B, T, V], labels [B*T], per-token vectors [B*T] (or [0] when absent).


def policy_token_forward(
    logits, labels, old_logps, ref_logps, advantages, w_pg, w_kl, grad_entropy,
    temperature, logit_scale, softcap, ignore_index, surrogate_id, kl_id, params, with_grad,
):
    """(logps, entropy, grad w.r.t. logits or [0], norm): one pass over each row in the kernels.

    grad = d/dlogits of  sum(w_pg * surrogate + w_kl * kl) + sum(grad_entropy * entropy)."""
    from ..token_objective import KL_ESTIMATORS, SURROGATES
    from .logprobs import token_logprobs_backward, token_logprobs_forward

    logps, entropy, _, _, _, norm = token_logprobs_forward(
        logits, labels, temperature, logit_scale, softcap, ignore_index, True, False, False, False
    )
    if not with_grad:
        return logps, entropy, logits.new_empty(0), norm
    obj = TokenObjective(
        SURROGATES[surrogate_id], *params[:7], kl=KL_ESTIMATORS[kl_id],
        kl_straight_through=bool(params[7]), kl_bias_correction=bool(params[8]),
    )

    def present(t):
        # [0] marks an absent vector, unless there is no token at all: then every vector is [0].
        return t if t.numel() or not labels.numel() else None

    valid = labels != ignore_index
    g = objective_grad(logps, present(old_logps), present(ref_logps), advantages, obj, w_pg, present(w_kl))
    g = torch.where(valid, g, 0.0)
    grad = token_logprobs_backward(
        g, present(grad_entropy), logits, labels, norm, entropy, temperature, logit_scale, softcap, ignore_index
    )
    return logps, entropy, grad, norm


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
