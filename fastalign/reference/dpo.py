"""The DPO family from logits in eager PyTorch, laid out the way TRL 1.16's DPOTrainer computes it:
log_softmax over the vocabulary, gather, masked sums over [2B, T], then each loss type's formula.

This is the ground truth `fastalign.dpo` is tested against and the eager baseline it is timed
against. It shares only the option checks (`dpo_options`) with `fastalign.dpo`: the log-probs and
every formula are written here again, per token where TRL works per token, so that an error in
the shared per-sequence math of `fastalign.dpo` cannot hide in its own ground truth. Formulas
port `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py, TRL 1.16); DPOP follows Pal et al.
2024 (arXiv:2402.13228), which TRL does not implement.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import options_from
from .._deprecation import keyword_only
from ..dpo import DPOOptions, dpo_options
from ..types import LossOutput


def _token_fields(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, with_lssp: bool):
    """Per-token log p(label), mean logit and (optionally) log sum p^2, 0 off the mask; fp32 (fp64 stays)."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    log_p = z.log_softmax(dim=-1)
    index = torch.where(mask, labels, 0).long().unsqueeze(-1)
    logps = torch.where(mask, log_p.gather(-1, index).squeeze(-1), 0.0)
    with torch.no_grad():
        mean_logits = torch.where(mask, z.mean(-1), 0.0)
        lssp = torch.where(mask, torch.logsumexp(2 * log_p, dim=-1), 0.0) if with_lssp else None
    return logps, mean_logits, lssp


def _sequence_logps(per_token: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """Sum over the completion; under LD-DPO the shared part plus ld_alpha times the tail, where the
    shared part is as long as the pair's shorter completion (TRL `_compute_loss`, the ld_alpha branch)."""
    if ld_alpha is None:
        return per_token.sum(dim=1)
    position = mask.long().cumsum(dim=1)
    chosen_len, rejected_len = mask.long().sum(dim=1).chunk(2, dim=0)
    shared_len = torch.cat([torch.minimum(chosen_len, rejected_len)] * 2).unsqueeze(1)
    shared = (position > 0) & (position <= shared_len)
    tail = position > shared_len
    return (per_token * shared).sum(dim=1) + ld_alpha * (per_token * tail).sum(dim=1)


def _scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    # f'(t) at t = pi / pi_ref (f-DPO), as TRL's f_divergence_type branches.
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    t = torch.clamp((alpha - 1.0) * logratios, max=80.0)
    return (torch.exp(t) - 1.0) * (1.0 / (alpha - 1.0))


@keyword_only("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
def dpo_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    completion_mask: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    ignore_index: int = -100,
    options: DPOOptions | None = None,
    **option_kwargs,
) -> LossOutput:
    """The reference of `fastalign.dpo_loss_from_logits` from logits: the same arguments (the options
    as `options=dpo_options(...)` or keywords), the same result, plain autograd.

    Unlike `fastalign.dpo_loss_from_logits` it materializes [2B, T, V] fp32 log-probabilities (and their
    gradient); it checks the options but only the shapes the math itself needs.
    """
    o = options_from(options, option_kwargs, DPOOptions, dpo_options)
    if logits.dim() != 3 or logits.shape[0] % 2 or logits.shape[0] == 0:
        raise ValueError(f"logits: expected [2B, T, V] with B >= 1, got {tuple(logits.shape)}")
    mask = labels != ignore_index
    if completion_mask is not None:
        mask = mask & (completion_mask != 0)
    per_token_logps, mean_logits, lssp = _token_fields(logits, labels, mask, o.use_weighting)
    logps = _sequence_logps(per_token_logps, mask, o.ld_alpha)
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)

    if ref_logits is not None:
        with torch.no_grad():
            ref_token, _, _ = _token_fields(ref_logits, labels, mask, False)
            ref_chosen_logps, ref_rejected_logps = _sequence_logps(ref_token, mask, o.ld_alpha).chunk(2, dim=0)
    elif o.reference_free:
        ref_chosen_logps, ref_rejected_logps = torch.zeros_like(chosen_logps), torch.zeros_like(rejected_logps)
    has_reference = ref_chosen_logps is not None
    if o.needs_reference and not has_reference:
        raise ValueError(f"ref_chosen_logps: loss_type {list(o.loss_types)} needs reference log-probs")

    lengths = mask.sum(dim=1).to(per_token_logps.dtype)
    chosen_len, rejected_len = lengths.clamp(min=1).chunk(2, dim=0)
    chosen_mask, rejected_mask = mask.chunk(2, dim=0)
    chosen_token_logps = per_token_logps.chunk(2, dim=0)[0]

    if has_reference:
        ref_chosen_logps = ref_chosen_logps.to(chosen_logps.dtype)
        ref_rejected_logps = ref_rejected_logps.to(chosen_logps.dtype)
        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps
        chosen_scores = _scores(chosen_logratios, o.f_divergence_type, o.f_alpha_divergence_coef)
        rejected_scores = _scores(rejected_logratios, o.f_divergence_type, o.f_alpha_divergence_coef)
        delta_score = chosen_scores - rejected_scores

    beta, eps = o.beta, o.label_smoothing
    loss = 0.0
    for kind, weight in zip(o.loss_types, o.loss_weights):
        if kind == "sigmoid":
            margin = delta_score
            if o.dpop_lambda > 0:
                margin = margin - o.dpop_lambda * torch.clamp(ref_chosen_logps - chosen_logps, min=0)
            term = -F.logsigmoid(beta * margin)
        elif kind == "hinge":
            term = torch.relu(1 - beta * delta_score)
        elif kind == "ipo":
            term = (chosen_scores / chosen_len - rejected_scores / rejected_len - 1 / (2 * beta)) ** 2
        elif kind == "exo_pair":
            x = beta * delta_score
            term = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
            term = term + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps))
        elif kind == "nca_pair":
            rc, rr = beta * chosen_logratios, beta * rejected_logratios
            term = -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
        elif kind == "robust":
            x = beta * delta_score
            term = ((1 - eps) * -F.logsigmoid(x) - eps * -F.logsigmoid(-x)) / (1 - 2 * eps)
        elif kind == "bco_pair":
            term = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
        elif kind == "sppo_hard":
            term = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif kind in ("aot", "aot_unpaired"):
            if kind == "aot":
                a, b = chosen_logps - rejected_logps, ref_chosen_logps - ref_rejected_logps
            else:
                a, b = chosen_logratios, rejected_logratios
            d = beta * (torch.sort(a, dim=0)[0] - torch.sort(b, dim=0)[0])
            term = -(1 - eps) * F.logsigmoid(d) - eps * F.logsigmoid(-d)
        elif kind == "apo_zero":
            term = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
        elif kind == "apo_down":
            term = torch.sigmoid(beta * chosen_logratios) + (
                1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
            )
        elif kind == "discopop":
            x = beta * delta_score
            gate = torch.sigmoid(x / o.discopop_tau)
            # gate * exp(-x) as one exponential, finite where the product is 0 * inf.
            term = (1 - gate) * -F.logsigmoid(x) + torch.exp(F.logsigmoid(x / o.discopop_tau) - x)
        elif kind == "sft":
            chosen_tokens = chosen_mask.sum().clamp(min=1)
            term = (-(chosen_token_logps * chosen_mask).sum() / chosen_tokens).repeat(chosen_logps.shape[0])
        else:  # sigmoid_norm
            term = -F.logsigmoid(beta * (chosen_scores / chosen_len - rejected_scores / rejected_len))
        if o.use_weighting:
            with torch.no_grad():
                log_weight = ((per_token_logps - lssp) * mask).sum(dim=1) / lengths.clamp(min=1)
                chosen_w, rejected_w = torch.exp(log_weight).chunk(2, dim=0)
            term = term * (chosen_w * rejected_w)
        loss = loss + weight * term.mean()

    metrics = {}
    if has_reference:
        chosen_rewards = (beta * chosen_logratios).detach()
        rejected_rewards = (beta * rejected_logratios).detach()
        metrics["rewards/chosen"] = chosen_rewards.mean()
        metrics["rewards/rejected"] = rejected_rewards.mean()
        metrics["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float().mean()
        metrics["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
    metrics["logps/chosen"] = chosen_logps.detach().mean()
    metrics["logps/rejected"] = rejected_logps.detach().mean()
    chosen_mean_logits, rejected_mean_logits = mean_logits.chunk(2, dim=0)
    metrics["logits/chosen"] = chosen_mean_logits.sum() / chosen_mask.sum().clamp(min=1)
    metrics["logits/rejected"] = rejected_mean_logits.sum() / rejected_mask.sum().clamp(min=1)
    return LossOutput(loss=loss, metrics={k: v.float() for k, v in metrics.items()})
