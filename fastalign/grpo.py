"""GRPO and its family (Dr.GRPO, DAPO, BNPO, CISPO, SAPO, GSPO, LUSPO, VESPO) from logits or log-probs.

convention="trl" is TRL 1.16's `GRPOTrainer._compute_loss` (loss types, `delta`, `beta` with the
k3 KL and `use_bias_correction_kl`, GSPO via `importance_sampling_level="sequence"`, VESPO's Gamma
sequence weight (`fastalign/vespo.py`), the vLLM importance-sampling ratio, `top_entropy_quantile`,
the entropy bonus, off-policy sequence masking, the per-type normalizers) and its logged metrics.
convention="verl" is verl's actor loss: `compute_policy_loss_vanilla` (dual-clip), `_gspo`, `_sapo`,
`_cispo`, aggregated by `agg_loss` (token-mean, token-sum, seq-mean-token-mean, seq-mean-token-sum,
seq-mean-token-sum-norm with `dp_size` and global counts), plus its KL loss (`kl_penalty`) and
entropy loss, with verl's metric names.

From logits, a token-level objective runs in one pass over the vocabulary (forward kernel writes
the logits gradient); GSPO, the entropy-quantile mask and off-policy masking need all log-probs
first and take two passes (see `fastalign/policy.py`); so does VESPO with old log-probs (its weight
sums each completion's log-ratios), while on-policy VESPO's weight is known before the pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._checks import check_flag, check_gather, check_positive_finite
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
from . import option_docs
from .policy_layout import LAYOUT_DOC, laid_out, policy_on_sequences
from ._checks import options_from
from ._deprecation import keyword_only
from .aggregation import trl_weights, verl_weights
from .grpo_metrics import grpo_metrics
from .token_objective import TokenObjective, kl_estimator_name
from .types import LossOutput
from .vespo import gamma_weights

TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
VERL_LOSS_TYPES = ("vanilla", "gspo", "cispo", "sapo")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class GRPOOptions:
    loss_type: str
    convention: str
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    beta: float
    kl_estimator: str
    use_bias_correction_kl: bool
    importance_sampling_level: str
    sapo_temperature_pos: float
    sapo_temperature_neg: float
    vespo_k_pos: float
    vespo_lambda_pos: float
    vespo_k_neg: float
    vespo_lambda_neg: float
    top_entropy_quantile: float
    entropy_coef: float
    off_policy_mask_threshold: float | None
    max_completion_length: int | None
    gradient_accumulation_steps: int
    num_processes: int
    steps_per_generation: int | None
    loss_agg_mode: str
    dp_size: int
    loss_scale_factor: float | None
    clip_ratio_c: float
    transform: tuple[float, float, float | None]

    def objective(self) -> TokenObjective:
        kl = self.kl_estimator if self.beta != 0 else "none"
        straight = kl.endswith("+")
        kl = kl.rstrip("+")
        low, high = 1 - self.epsilon_low, 1 + self.epsilon_high
        trl = self.convention == "trl"
        sequence = self.importance_sampling_level == "sequence"
        if self.loss_type == "cispo":
            surrogate = "cispo"
            if trl:  # TRL caps the ratio at epsilon_high itself (ScaleRL's eps_max), with no lower bound
                low, high = -math.inf, self.epsilon_high
        elif self.loss_type == "sapo":
            surrogate = "sapo"
        elif self.loss_type == "vespo":
            # -phi * A * l: CISPO's detached weight on A * l with the ratio clamped to exactly 1, and
            # phi in the policy weights (the ratio itself stays for the KL's bias correction).
            surrogate = "cispo"
            low = high = 1.0
        else:
            surrogate = "clip"
        return TokenObjective(
            surrogate=surrogate,
            ratio_low=low,
            ratio_high=high,
            delta=self.delta if self.delta is not None else math.inf,
            dual_clip=self.clip_ratio_c if (not trl and self.loss_type == "vanilla") else math.inf,
            # verl clamps the token log-ratio to +-20 in every loss but GSPO (which clamps its own).
            log_ratio_clamp=20.0 if (not trl and not sequence) else math.inf,
            tau_pos=self.sapo_temperature_pos,
            tau_neg=self.sapo_temperature_neg,
            kl=kl,
            kl_straight_through=straight,
            kl_bias_correction=trl and self.use_bias_correction_kl and kl != "none",
        )


def grpo_options(
    loss_type: str = "dapo",
    *,
    convention: str = "trl",
    epsilon: float = 0.2,
    epsilon_low: float | None = None,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    kl_estimator: str | None = None,
    use_bias_correction_kl: bool = True,
    importance_sampling_level: str = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    top_entropy_quantile: float = 1.0,
    entropy_coef: float = 0.0,
    off_policy_mask_threshold: float | None = None,
    max_completion_length: int | None = None,
    gradient_accumulation_steps: int = 1,
    num_processes: int = 1,
    steps_per_generation: int | None = None,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    clip_ratio_c: float = 3.0,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> GRPOOptions:
    """Checks every option once (at construction for `GRPOLoss`) and names the bad one.

    convention="trl" takes TRL's names (`loss_type`, `epsilon`, `epsilon_high`, `delta`, `beta`,
    ...); convention="verl" takes verl's loss modes as `loss_type` ("vanilla", "gspo", "cispo",
    "sapo"), `loss_agg_mode`, `clip_ratio_c` (dual-clip), `dp_size`, and `beta` as `kl_loss_coef`
    with `kl_estimator` as `kl_loss_type`.

    Options:
        {options}
    """
    check_choice("convention", convention, ("trl", "verl"))
    valid = TRL_LOSS_TYPES if convention == "trl" else VERL_LOSS_TYPES
    if loss_type not in valid:
        raise ValueError(
            f"loss_type: expected one of {', '.join(repr(v) for v in valid)} for convention={convention!r}; "
            f"got {loss_type!r}"
        )
    # verl's CISPO clamps the ratio to [1 - clip_ratio_low, 1 + clip_ratio_high] with any positive
    # bounds (its example runs clip_ratio_low=10: no lower bound); the other modes take ranges in (0, 1).
    check_range = check_positive_finite if (convention, loss_type) == ("verl", "cispo") else check_epsilon
    epsilon = check_range("epsilon", epsilon)
    epsilon_low = epsilon if epsilon_low is None else check_range("epsilon_low", epsilon_low)
    if epsilon_high is None:
        epsilon_high = epsilon
    elif convention == "verl" and loss_type == "cispo":
        epsilon_high = check_range("epsilon_high", epsilon_high)
    elif convention == "trl" and loss_type == "cispo":
        epsilon_high = check_optional_positive("epsilon_high", epsilon_high)  # an absolute cap, e.g. 5.0
    else:
        epsilon_high = check_epsilon("epsilon_high", epsilon_high)
    delta = check_optional_positive("delta", delta)
    if delta is not None and convention == "verl":
        raise ValueError("delta: TRL's two-sided clipping; with convention='verl' use loss_type='vanilla' and clip_ratio_c")
    beta = check_nonnegative("beta", beta)
    if kl_estimator is None:
        kl_estimator = "k3" if convention == "trl" else "low_var_kl"
    kl_estimator = kl_estimator_name(kl_estimator, convention)
    check_choice("importance_sampling_level", importance_sampling_level, ("token", "sequence"))
    if convention == "verl":
        if importance_sampling_level == "sequence" and loss_type != "gspo":
            raise ValueError("importance_sampling_level: verl's sequence-level ratio is loss_type='gspo'")
        if loss_type == "gspo":
            importance_sampling_level = "sequence"
    if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo"):
        raise ValueError(f"importance_sampling_level: 'sequence' is not defined for loss_type={loss_type!r}")
    sapo_temperature_pos = check_optional_positive("sapo_temperature_pos", sapo_temperature_pos)
    sapo_temperature_neg = check_optional_positive("sapo_temperature_neg", sapo_temperature_neg)
    vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg = (
        check_nonnegative(name, value) for name, value in (
            ("vespo_k_pos", vespo_k_pos), ("vespo_lambda_pos", vespo_lambda_pos),
            ("vespo_k_neg", vespo_k_neg), ("vespo_lambda_neg", vespo_lambda_neg))
    )
    if isinstance(top_entropy_quantile, bool) or not isinstance(top_entropy_quantile, (int, float)):
        raise TypeError(f"top_entropy_quantile: expected a number in (0, 1], got {type(top_entropy_quantile).__name__}")
    if not 0 < top_entropy_quantile <= 1:
        raise ValueError(f"top_entropy_quantile: expected a value in (0, 1], got {top_entropy_quantile!r}")
    if convention == "verl" and top_entropy_quantile < 1:
        raise ValueError("top_entropy_quantile: a TRL option; not part of verl's actor loss")
    entropy_coef = check_nonnegative("entropy_coef", entropy_coef)
    off_policy_mask_threshold = check_optional_positive("off_policy_mask_threshold", off_policy_mask_threshold)
    if convention == "verl" and off_policy_mask_threshold is not None:
        raise ValueError("off_policy_mask_threshold: a TRL option; not part of verl's actor loss")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("max_completion_length: required for loss_type='dr_grpo' (its normalizer is B * L_max)")
    if max_completion_length is not None:
        check_count("max_completion_length", max_completion_length)
    check_count("gradient_accumulation_steps", gradient_accumulation_steps)
    check_count("num_processes", num_processes)
    if steps_per_generation is not None:
        check_count("steps_per_generation", steps_per_generation)
    check_choice("loss_agg_mode", loss_agg_mode, AGG_MODES)
    check_count("dp_size", dp_size)
    loss_scale_factor = check_optional_positive("loss_scale_factor", loss_scale_factor)
    if isinstance(clip_ratio_c, bool) or not isinstance(clip_ratio_c, (int, float)):
        raise TypeError(f"clip_ratio_c: expected a number > 1, got {type(clip_ratio_c).__name__}")
    if not clip_ratio_c > 1:
        raise ValueError(f"clip_ratio_c: the dual-clip bound must be > 1, got {clip_ratio_c!r}")
    return GRPOOptions(
        loss_type, convention, epsilon_low, epsilon_high, delta, beta, kl_estimator,
        check_flag("use_bias_correction_kl", use_bias_correction_kl),
        importance_sampling_level, sapo_temperature_pos, sapo_temperature_neg,
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg, float(top_entropy_quantile),
        entropy_coef, off_policy_mask_threshold, max_completion_length, gradient_accumulation_steps,
        num_processes, steps_per_generation, loss_agg_mode, dp_size, loss_scale_factor, float(clip_ratio_c),
        check_transform(temperature, logit_scale, softcap),
    )


def _weights(o: GRPOOptions, mask, num_items_in_batch, batch_num_tokens, global_batch_size, pg: bool,
             mask_dtype: torch.dtype | None = None):
    if o.convention == "trl":
        return trl_weights(
            mask, o.loss_type, max_completion_length=o.max_completion_length,
            num_items_in_batch=num_items_in_batch, num_processes=o.num_processes,
            gradient_accumulation_steps=o.gradient_accumulation_steps,
            steps_per_generation=o.steps_per_generation,
        )
    # verl's SAPO aggregates its policy term by seq-mean-token-mean whatever the configured mode.
    mode = "seq-mean-token-mean" if (pg and o.loss_type == "sapo") else o.loss_agg_mode
    return verl_weights(
        mask, mode, dp_size=o.dp_size, batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size, loss_scale_factor=o.loss_scale_factor, verl_mask_dtype=mask_dtype,
    )


def _high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float, gather=None) -> torch.Tensor:
    """TRL's get_high_entropy_mask: tokens at or above the (1 - q) quantile of the counted tokens'
    entropies, pooled over every process when `gather` is given."""
    pool = entropies[mask.bool()].float()
    if gather is not None:
        pool = gather(pool)
    if pool.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(pool, 1 - quantile)
    return ((entropies * mask) >= threshold) & mask.bool()


def grpo_loss(
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
    importance_sampling_ratio: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    batch_num_tokens: torch.Tensor | float | None = None,
    global_batch_size: torch.Tensor | float | None = None,
    options: GRPOOptions | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sequence_group: object = None,
    vocab_group: object = None,
    **option_kwargs,
) -> LossOutput:
    """The GRPO-family loss and the trainer's metrics.

    Inputs: `logits` [B, T, V] with `labels` [B, T] (the completion ids); or `hidden` [B, T, H]
    with the lm_head `weight` [V, H] (and `bias`) and `labels`, the logits never materialized; or
    `logps` [B, T] (with `entropies` [B, T] for the entropy metric, bonus or mask). `completion_mask` [B, T];
    `advantages` [B] or [B, T]; `old_logps` [B, T] (None: on-policy, ratio 1 with its gradient);
    `ref_logps` [B, T] (required when beta > 0); `importance_sampling_ratio` [B, T] or [B, 1]
    (TRL's vLLM correction, already truncated or masked; "vespo" folds its log into each sequence's
    weight instead of multiplying the token losses, summed over every position as TRL does, so it
    must be 1 off the completion mask, as `vllm_importance_sampling_ratio` makes it);
    `sampling_logps` (off-policy masking; defaults to old_logps); `num_items_in_batch` (TRL's
    dapo/cispo/vespo normalizer);
    `batch_num_tokens` / `global_batch_size` (verl's global counts, required when dp_size > 1).
    `gather` (convention="trl", several processes): a function returning every process's tensor
    concatenated along dim 0 (lengths may differ), e.g. `fastalign.integrations.trl.gather_for(accelerator)`;
    the entropy quantile and the metrics are then global, as TRL's trainer computes them. Without
    it they are this process's.
    {layout}

    Options (`options=grpo_options(...)`, or these as keywords):
        {options}
    """
    o = options_from(options, option_kwargs, GRPOOptions, grpo_options)
    check_gather(gather)
    if laid_out(cu_seqlens, position_ids, sequence_group, vocab_group):
        return policy_on_sequences(
            grpo_loss, logits=logits, labels=labels, hidden=hidden, weight=weight, bias=bias, logps=logps,
            entropies=entropies, completion_mask=completion_mask, transform=o.transform, cu_seqlens=cu_seqlens,
            position_ids=position_ids, sequence_group=sequence_group, vocab_group=vocab_group,
            token_inputs=dict(old_logps=old_logps, ref_logps=ref_logps, sampling_logps=sampling_logps),
            token_or_sequence_inputs=dict(advantages=advantages, importance_sampling_ratio=importance_sampling_ratio),
            num_items_in_batch=num_items_in_batch, batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size, options=o, gather=gather,
        )
    check_total("num_items_in_batch", num_items_in_batch, zero_ok=True)
    check_total("batch_num_tokens", batch_num_tokens, zero_ok=False)
    check_total("global_batch_size", global_batch_size, zero_ok=False)
    needs = [n for n, on in (("top_entropy_quantile < 1", o.top_entropy_quantile < 1),
                             ("entropy_coef != 0", o.entropy_coef != 0)) if on]
    lm_head = (hidden, weight, bias) if (hidden is not None or weight is not None or bias is not None) else None
    x = policy_token_inputs(
        logits=logits, labels=labels, logps=logps, entropies=entropies, completion_mask=completion_mask,
        advantages=advantages, old_logps=old_logps, ref_logps=ref_logps, transform=o.transform,
        lm_head=lm_head, kl_name="beta",
        kl_weight=o.beta, entropy_needed_by=" or ".join(needs) or None,
    )
    shape, device, transform, like, mask, mask_f = x.shape, x.device, x.transform, x.like, x.mask, x.mask_f
    adv, old_logps, ref_logps, entropies = x.advantages, x.old_logps, x.ref_logps, x.entropies
    if importance_sampling_ratio is not None:
        importance_sampling_ratio = as_float(
            check_tokens("importance_sampling_ratio", importance_sampling_ratio, shape, device, per_sequence=True),
            like,
        )
    if sampling_logps is not None:
        if o.off_policy_mask_threshold is None:
            raise ValueError("sampling_logps: only used with off_policy_mask_threshold")
        sampling_logps = as_float(check_tokens("sampling_logps", sampling_logps, shape, device), like)
    if o.convention == "trl" and o.loss_type in ("dapo", "cispo", "vespo") and num_items_in_batch is None:
        raise ValueError(
            f"num_items_in_batch: required for loss_type={o.loss_type!r} (the global count of completion tokens "
            "that normalizes the loss; TRL passes it to compute_loss)"
        )
    if o.convention == "verl" and o.dp_size > 1:
        if o.loss_agg_mode == "token-mean" and batch_num_tokens is None:
            raise ValueError("batch_num_tokens: required when dp_size > 1 with loss_agg_mode='token-mean'")
        if o.loss_agg_mode.startswith("seq-mean") and global_batch_size is None:
            raise ValueError(f"global_batch_size: required when dp_size > 1 with loss_agg_mode={o.loss_agg_mode!r}")

    obj = o.objective()
    w = _weights(o, mask_f, num_items_in_batch, batch_num_tokens, global_batch_size, pg=True, mask_dtype=mask.dtype)
    w_other = w if o.convention == "trl" else _weights(o, mask_f, None, batch_num_tokens, global_batch_size, pg=False,
                                                       mask_dtype=mask.dtype)
    vespo = o.loss_type == "vespo"
    # VESPO folds the vLLM ratio into its sequence weight rather than into the token weights.
    w_pg = w if (importance_sampling_ratio is None or vespo) else w * importance_sampling_ratio
    w_kl = o.beta * w_other if o.beta != 0 else None

    def vespo_phi(log_ratio_tokens):
        return gamma_weights(adv, log_ratio_tokens, mask_f, importance_sampling_ratio, o.vespo_k_pos,
                             o.vespo_lambda_pos, o.vespo_k_neg, o.vespo_lambda_neg)

    state = {"phi": None}
    if vespo and old_logps is None:
        # On-policy every token log-ratio is 0 (TRL's logps - logps.detach()): phi is known before
        # any log-prob, so the objective stays token-local and runs in the fused pass.
        state["phi"] = vespo_phi(torch.zeros(shape, dtype=mask_f.dtype, device=device))
        w_pg = w_pg * state["phi"]

    def entropy_weights(effective_mask):
        if o.entropy_coef == 0:
            return None
        if o.convention == "trl":
            return o.entropy_coef * effective_mask / effective_mask.sum().clamp(min=1.0) / o.gradient_accumulation_steps
        return o.entropy_coef * w_other

    def adjust(logps_, entropies_):
        weights = w_pg
        if vespo and old_logps is not None:
            state["phi"] = vespo_phi(logps_.detach() - old_logps)
            weights = weights * state["phi"]
        effective = mask_f
        if o.top_entropy_quantile < 1:
            keep = _high_entropy_mask(entropies_.detach(), mask_f, o.top_entropy_quantile, gather).to(mask_f.dtype)
            weights = weights * keep
            effective = mask_f * keep
        if o.off_policy_mask_threshold is not None:
            weights = weights * _off_policy_keep(logps_.detach(), old_logps, sampling_logps, adv, mask_f,
                                                 o.off_policy_mask_threshold)
        log_ratio_ = None
        if o.importance_sampling_level == "sequence":
            log_ratio_ = _sequence_log_ratio(logps_, old_logps, mask_f, o.convention)
        state["w_pg"] = weights
        return weights, entropy_weights(effective), log_ratio_

    token_local = (
        o.importance_sampling_level == "token" and o.top_entropy_quantile == 1 and o.off_policy_mask_threshold is None
        and not (vespo and old_logps is not None)
    )
    pieces, token_logps, token_entropies = run_objective(
        logits=logits, labels=labels, lm_head=lm_head, logps=logps, entropies=entropies, mask=mask, old_logps=old_logps,
        ref_logps=ref_logps, advantages=adv, obj=obj, w_pg=w_pg, w_kl=w_kl,
        w_entropy=entropy_weights(mask_f), transform=transform,
        adjust=None if (token_local and logps is None) else adjust,
    )
    # The policy weights the loss ran with (the entropy and off-policy masks, phi) for its metrics.
    metrics = grpo_metrics(o, obj, pieces, token_logps, old_logps, token_entropies, mask_f, adv,
                           state.get("w_pg", w_pg), w_kl, entropy_weights(mask_f), gather, vespo_phi=state["phi"])
    return LossOutput(pieces["loss"], metrics)


def _off_policy_keep(logps, old_logps, sampling_logps, adv, mask, threshold):
    """TRL's get_off_policy_mask: drop sequences with A < 0 whose mean KL to the sampler exceeds the threshold."""
    sampling = sampling_logps if sampling_logps is not None else (old_logps if old_logps is not None else logps)
    kl = torch.nan_to_num(sampling - logps, nan=0.0)
    mean_kl = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((adv >= 0) | (mean_kl <= threshold)).to(mask.dtype)


def _sequence_log_ratio(logps, old_logps, mask, convention):
    """GSPO's log-ratio: TRL uses the sequence mean itself ([B, 1]); verl keeps a per-token
    sg(mean) + logp - sg(logp), clamped at 10 (compute_policy_loss_gspo)."""
    token = logps - (logps.detach() if old_logps is None else old_logps)
    # Selected, not multiplied: padding may hold NaN or inf (0 * NaN would poison the sequence).
    token = torch.where(mask != 0, token, 0.0)
    mean = (token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    if convention == "trl":
        return mean.unsqueeze(-1)
    return (logps - logps.detach() + mean.detach().unsqueeze(-1)).clamp(max=10.0)


class GRPOLoss(torch.nn.Module):
    """`grpo_loss` with its options fixed (and checked) at construction.

    >>> loss_fn = GRPOLoss(loss_type="dapo", epsilon_high=0.28, beta=0.04)
    >>> out = loss_fn(logits=logits, labels=ids, completion_mask=mask, advantages=adv,
    ...               ref_logps=ref, num_items_in_batch=n)

    Options:
        {options}
    """

    def __init__(self, loss_type: str = "dapo", **options):
        super().__init__()
        self.options = grpo_options(loss_type, **options)

    def forward(self, logits=None, labels=None, **inputs) -> LossOutput:
        return grpo_loss(logits, labels, options=self.options, **inputs)


option_docs.document(option_docs.GRPO, grpo_options, grpo_options, grpo_loss, GRPOLoss, layout=LAYOUT_DOC)

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@keyword_only("completion_mask", "mode", "clip_min", "clip_max")
def vllm_importance_sampling_ratio(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    *,
    completion_mask: torch.Tensor,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> torch.Tensor:
    """TRL's vLLM importance-sampling correction (GRPOTrainer._generate_and_score_completions):
    exp(old - sampling) per token ([B, T]) or per sequence ([B, 1], the sum over the completion),
    clamped to [clip_min, clip_max] ("*_truncate") or set to 0 outside it ("*_mask"). NaN sampling
    log-probs (tokens vLLM could not score) count as no correction. Pass the result to
    `grpo_loss(importance_sampling_ratio=...)`."""
    check_choice("mode", mode, IS_MODES)
    if not isinstance(old_logps, torch.Tensor):
        raise TypeError(f"old_logps: expected a torch.Tensor [B, T], got {type(old_logps).__name__}")
    if old_logps.dim() != 2:
        raise ValueError(f"old_logps: expected per-token log-probs [B, T], got shape {tuple(old_logps.shape)}")
    if not old_logps.is_floating_point():
        raise TypeError(f"old_logps: expected a floating-point tensor, got {old_logps.dtype}")
    shape = old_logps.shape
    sampling_logps = check_tokens("sampling_logps", sampling_logps, shape, old_logps.device)
    mask = check_tokens("completion_mask", completion_mask, shape, old_logps.device, floating=False)
    # Ratios are positive: a bound below 0 or a NaN one would clip nothing, or everything, silently.
    clip_min = None if clip_min is None else check_nonnegative("clip_min", clip_min)
    clip_max = check_optional_positive("clip_max", clip_max)
    if clip_min is not None and clip_max is not None and clip_min > clip_max:
        raise ValueError(f"clip_min: expected a bound <= clip_max={clip_max}, got {clip_min}")
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = clip_min if clip_min is not None else -math.inf
    high = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
