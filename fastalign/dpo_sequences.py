"""The DPO family from per-sequence log-probs: the options (`dpo_options` -> `DPOOptions`), the
pairs (`DPOPairs`: [B] sums over each completion, token counts), each loss type's per-pair loss and
TRL's metrics (`dpo_from_sequences`). Every input level of `fastalign.dpo` ends here.

Every formula is TRL 1.16's `DPOTrainer._compute_loss` (each loss type is its branch of that
method's `loss_type` loop), except DPOP (Pal et al. 2024, arXiv:2402.13228), which TRL lacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_finite, check_positive_finite, check_sequence_values
from .types import LossOutput

LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL's DPOTrainer.__init__: the f-DPO reparameterization leaves a beta * log Z(x) term that cancels
# only in the chosen - rejected score difference, so only the losses built on it generalize.
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
LABEL_SMOOTHING_LOSS_TYPES = frozenset({"exo_pair", "robust", "aot", "aot_unpaired"})
# Loss types that divide by the number of completion tokens.
LENGTH_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm", "sft"})
# The only loss type that never looks at the reference model.
POLICY_ONLY_LOSS_TYPES = frozenset({"sft"})

METRIC_NAMES = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
)


@dataclass(frozen=True)
class DPOOptions:
    """Checked DPO options, built by `dpo_options(...)`; `loss_types` and `loss_weights` are tuples."""

    beta: float
    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...]
    label_smoothing: float
    f_divergence_type: str
    f_alpha_divergence_coef: float
    use_weighting: bool
    ld_alpha: float | None
    discopop_tau: float
    dpop_lambda: float
    reference_free: bool

    @property
    def needs_reference(self) -> bool:
        """Whether reference log-probs must be passed (they are optional for sft alone, unused when reference_free)."""
        return not self.reference_free and not POLICY_ONLY_LOSS_TYPES.issuperset(self.loss_types)

    @property
    def needs_num_tokens(self) -> bool:
        return self.use_weighting or bool(LENGTH_LOSS_TYPES.intersection(self.loss_types))


def _as_tuple(name: str, value: object, items: str) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name}: expected a list of {items}, got {type(value).__name__} {value!r}")
    return tuple(value)


def dpo_options(
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    use_weighting: bool = False,
    ld_alpha: float | None = None,
    discopop_tau: float = 0.05,
    dpop_lambda: float = 0.0,
    reference_free: bool = False,
) -> DPOOptions:
    """Checks the options once (each error names its option) and returns them as `DPOOptions`,
    for `options=` of `dpo_loss` and `dpo_loss_from_logits`.

    Options:
        {options}
    """
    beta = check_positive_finite("beta", beta)
    loss_types = (loss_type,) if isinstance(loss_type, str) else _as_tuple("loss_type", loss_type, "loss type names")
    if not loss_types:
        raise ValueError(f"loss_type: expected one of {', '.join(LOSS_TYPES)} or a list of them, got an empty list")
    unknown = [name for name in loss_types if name not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"loss_type: unknown {unknown}; expected any of {', '.join(LOSS_TYPES)}")
    if loss_weights is None:
        weights = (1.0,) * len(loss_types)
    else:
        weights = tuple(check_finite("loss_weights", w) for w in _as_tuple("loss_weights", loss_weights, "numbers"))
        if len(weights) != len(loss_types):
            raise ValueError(
                f"loss_weights: expected one weight per loss type ({len(loss_types)} for {list(loss_types)}), "
                f"got {len(weights)}"
            )
    label_smoothing = check_finite("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing}")
    if label_smoothing > 0 and not LABEL_SMOOTHING_LOSS_TYPES.intersection(loss_types):
        # TRL 1.16 accepts it and silently ignores it; a cDPO user would think it applies.
        raise ValueError(
            f"label_smoothing: only {', '.join(sorted(LABEL_SMOOTHING_LOSS_TYPES))} use it, and loss_type is "
            f"{list(loss_types)} (TRL 1.16's sigmoid loss has no label smoothing; 'robust' models noisy labels)"
        )
    if "exo_pair" in loss_types and label_smoothing == 0.0:
        # log(label_smoothing) enters the EXO loss (TRL's dpo_config / DPOTrainer.__init__ check).
        raise ValueError("label_smoothing: the 'exo_pair' loss needs label_smoothing > 0 (the EXO paper uses 1e-3)")
    if "robust" in loss_types and label_smoothing >= 0.5:
        # The robust loss divides by 1 - 2 * label_smoothing: at 0.5 and above it is undefined or flips sign.
        raise ValueError(f"label_smoothing: the 'robust' loss needs a value in [0, 0.5), got {label_smoothing}")
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(
            f"f_divergence_type: unknown {f_divergence_type!r}; expected one of {', '.join(F_DIVERGENCES)}"
        )
    if f_divergence_type != "reverse_kl" and not F_DIVERGENCE_LOSS_TYPES.issuperset(loss_types):
        raise ValueError(
            f"f_divergence_type: {f_divergence_type!r} is defined only for the loss types "
            f"{', '.join(sorted(F_DIVERGENCE_LOSS_TYPES))}; loss_type is {list(loss_types)} "
            "(use f_divergence_type='reverse_kl' with the others)"
        )
    f_alpha_divergence_coef = check_finite("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if not isinstance(use_weighting, bool):
        raise TypeError(f"use_weighting: expected a bool, got {type(use_weighting).__name__}")
    if use_weighting and {"aot", "aot_unpaired"}.intersection(loss_types):
        raise ValueError(
            "use_weighting: WPO weights are per pair, and the 'aot' / 'aot_unpaired' losses sort the batch, "
            "which breaks the pairing; they cannot be combined"
        )
    if ld_alpha is not None:
        ld_alpha = check_finite("ld_alpha", ld_alpha)
        if not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha: expected a value in [0, 1] or None, got {ld_alpha}")
    discopop_tau = check_positive_finite("discopop_tau", discopop_tau)
    dpop_lambda = check_finite("dpop_lambda", dpop_lambda)
    if dpop_lambda < 0:
        raise ValueError(f"dpop_lambda: expected a value >= 0, got {dpop_lambda}")
    if dpop_lambda > 0 and "sigmoid" not in loss_types:
        raise ValueError(f"dpop_lambda: the DPOP penalty modifies the 'sigmoid' loss; loss_type is {list(loss_types)}")
    if not isinstance(reference_free, bool):
        raise TypeError(f"reference_free: expected a bool, got {type(reference_free).__name__}")
    return DPOOptions(
        beta=beta, loss_types=loss_types, loss_weights=weights, label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        use_weighting=use_weighting, ld_alpha=ld_alpha, discopop_tau=discopop_tau, dpop_lambda=dpop_lambda,
        reference_free=reference_free,
    )


class DPOPairs(NamedTuple):
    """Per-sequence inputs of the DPO math: every field is [B] (chosen row b pairs with rejected row b).

    chosen_logps / rejected_logps: sum of the policy's token log-probs over the completion (all of
        it, also under LD-DPO), differentiable.
    ref_chosen_logps / ref_rejected_logps: the reference's, as TRL precomputes them (already
        LD-weighted under ld_alpha); None when not given.
    chosen_num_tokens / rejected_num_tokens: completion token counts (ipo, sigmoid_norm, sft, WPO).
    chosen_tail_logps / rejected_tail_logps: the policy's sum over the tail, the completion tokens
        past the length of the shorter completion of the pair (LD-DPO).
    chosen_log_sum_sq_probs / rejected_log_sum_sq_probs: sum over the completion of log sum_v p_v^2
        (WPO).
    chosen_length / rejected_length: what ipo and sigmoid_norm divide by, if not the token counts.
        TRL 1.16 counts the unshifted completion mask there: one more than the scored tokens when
        a completion starts at the first position (no prompt token before it). The TRL
        integration passes that count, to match it.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    chosen_num_tokens: torch.Tensor | None = None
    rejected_num_tokens: torch.Tensor | None = None
    chosen_tail_logps: torch.Tensor | None = None
    rejected_tail_logps: torch.Tensor | None = None
    chosen_log_sum_sq_probs: torch.Tensor | None = None
    rejected_log_sum_sq_probs: torch.Tensor | None = None
    chosen_length: torch.Tensor | None = None
    rejected_length: torch.Tensor | None = None


# --- the per-sequence math -------------------------------------------------------------------------


def _f_divergence_scores(options: DPOOptions, logratios: torch.Tensor) -> torch.Tensor:
    """f'(pi / pi_ref) as a function of the log-ratio (the `f_divergence_type` branches of TRL's `_compute_loss`)."""
    kind = options.f_divergence_type
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        alpha = options.f_alpha_divergence_coef
        if abs(alpha - 1.0) < 1e-6:  # the alpha -> 1 limit is log t: reverse KL
            return logratios
        # TRL clamps the exponent at 80 for fp32/bf16 log-ratios; fastalign's are fp32 (fp64).
        return (torch.exp(((alpha - 1.0) * logratios).clamp(max=80.0)) - 1.0) / (alpha - 1.0)
    return logratios


def _smoothed_sigmoid(logits: torch.Tensor, smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - smoothing) - F.logsigmoid(-logits) * smoothing


def _per_sequence_loss(loss_type: str, options: DPOOptions, s: dict) -> torch.Tensor:
    """One loss type's [B] loss; `s` holds the [B] quantities `dpo_from_sequences` derived."""
    beta, eps = options.beta, options.label_smoothing
    if loss_type == "sigmoid":
        delta = s["delta_score"]
        if options.dpop_lambda > 0:
            # DPOP (Pal et al. 2024, Eq. 3): lambda * max(0, log pi_ref(y_w) - log pi(y_w)) inside the logit.
            delta = delta - options.dpop_lambda * torch.relu(-s["chosen_logratios"])
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * s["delta_score"])
    if loss_type == "ipo":  # scores averaged per token (TRL's length normalization), Eq. 17
        delta = s["chosen_scores"] / s["chosen_norm_len"] - s["rejected_scores"] / s["rejected_norm_len"]
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":  # EXO, Eq. 16: KL(softmax(beta * scores) || [1 - eps, eps])
        logit = beta * s["delta_score"]
        return (
            torch.sigmoid(logit) * (F.logsigmoid(logit) - math.log1p(-eps))
            + torch.sigmoid(-logit) * (F.logsigmoid(-logit) - math.log(eps))
        )
    if loss_type == "nca_pair":
        chosen, rejected = beta * s["chosen_logratios"], beta * s["rejected_logratios"]
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    if loss_type == "robust":  # unbiased under a label-flip rate eps
        logit = beta * s["delta_score"]
        return (-(1 - eps) * F.logsigmoid(logit) + eps * F.logsigmoid(-logit)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * s["chosen_logratios"]) - F.logsigmoid(-beta * s["rejected_logratios"])
    if loss_type == "sppo_hard":  # P = 1 for the winner, 0 for the loser
        return (s["chosen_logratios"] - 0.5 / beta) ** 2 + (s["rejected_logratios"] + 0.5 / beta) ** 2
    if loss_type == "aot":  # sorted policy margins against sorted reference margins
        policy = torch.sort(s["chosen_logps"] - s["rejected_logps"], dim=0).values
        reference = torch.sort(s["ref_chosen_logps"] - s["ref_rejected_logps"], dim=0).values
        return _smoothed_sigmoid(beta * (policy - reference), eps)
    if loss_type == "aot_unpaired":  # sorted chosen ratios against sorted rejected ratios
        chosen = torch.sort(s["chosen_logratios"], dim=0).values
        rejected = torch.sort(s["rejected_logratios"], dim=0).values
        return _smoothed_sigmoid(beta * (chosen - rejected), eps)
    if loss_type == "apo_zero":  # APO, Eq. 7
        return 1 - torch.sigmoid(beta * s["chosen_logratios"]) + torch.sigmoid(beta * s["rejected_logratios"])
    if loss_type == "apo_down":  # APO, Eq. 8
        chosen, rejected = s["chosen_logratios"], s["rejected_logratios"]
        return torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))
    if loss_type == "discopop":  # DiscoPOP, Eq. 5: logistic/exponential mix gated by the margin
        logit = beta * s["delta_score"]
        gate = torch.sigmoid(logit / options.discopop_tau)
        # gate * exp(-logit) as one exponential: TRL's product overflows to 0 * inf = NaN for a large
        # negative margin, where the true value is finite (0 for tau < 1).
        return -F.logsigmoid(logit) * (1 - gate) + torch.exp(F.logsigmoid(logit / options.discopop_tau) - logit)
    if loss_type == "sft":  # token mean over every chosen completion of the batch
        total = s["chosen_full_logps"].sum() / s["chosen_num_tokens"].sum().clamp(min=1)
        return (-total).expand(s["chosen_full_logps"].shape[0])
    if loss_type == "sigmoid_norm":
        delta = s["chosen_scores"] / s["chosen_norm_len"] - s["rejected_scores"] / s["rejected_norm_len"]
        return -F.logsigmoid(beta * delta)
    raise ValueError(f"loss_type: unknown {loss_type!r}; expected any of {', '.join(LOSS_TYPES)}")


def dpo_from_sequences(
    pairs: DPOPairs, options: DPOOptions, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> LossOutput:
    """The DPO-family loss and TRL's metrics from per-sequence quantities: the math every input level shares.

    `pairs` must carry what `options` needs (`check_pairs` says what is missing); the loss is the sum
    over `options.loss_types` of weight * mean over pairs, in fp32 (fp64 for fp64 inputs).
    `gather` (several processes): a function returning every process's tensor concatenated along
    dim 0, e.g. `fastalign.integrations.trl.gather_for(accelerator)`; the metrics are then means
    over every process's pairs, as TRL's trainer logs them. Without it they are this process's.
    The loss stays this process's either way.
    """
    acc = torch.float64 if pairs.chosen_logps.dtype == torch.float64 else torch.float32

    def up(value: torch.Tensor | None) -> torch.Tensor | None:
        return None if value is None else value.to(acc)

    chosen_full, rejected_full = up(pairs.chosen_logps), up(pairs.rejected_logps)
    chosen_logps, rejected_logps = chosen_full, rejected_full
    if options.ld_alpha is not None:
        # LD-DPO (the `ld_alpha` branch of TRL's `_compute_loss`): shared + alpha * tail, i.e. the full sum
        # less (1 - alpha) * tail.
        chosen_logps = chosen_full - (1 - options.ld_alpha) * up(pairs.chosen_tail_logps)
        rejected_logps = rejected_full - (1 - options.ld_alpha) * up(pairs.rejected_tail_logps)
    if options.reference_free:
        # An implicit reference that gives every completion the same probability (TRL < 1.0's reference_free).
        ref_chosen, ref_rejected = torch.zeros_like(chosen_logps), torch.zeros_like(rejected_logps)
    else:
        ref_chosen, ref_rejected = up(pairs.ref_chosen_logps), up(pairs.ref_rejected_logps)
    s = {
        "chosen_logps": chosen_logps, "rejected_logps": rejected_logps, "chosen_full_logps": chosen_full,
        "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected,
    }
    if options.needs_num_tokens:
        s["chosen_num_tokens"] = up(pairs.chosen_num_tokens)
        # An empty completion counts as one token, as TRL's clamp(min=1): its sums are 0, so 0 / 1 = 0.
        # ipo and sigmoid_norm divide by `chosen_length` where given (TRL's unshifted count, see DPOPairs).
        s["chosen_len"] = s["chosen_num_tokens"].clamp(min=1)
        s["rejected_len"] = up(pairs.rejected_num_tokens).clamp(min=1)
        s["chosen_norm_len"], s["rejected_norm_len"] = s["chosen_len"], s["rejected_len"]
        if pairs.chosen_length is not None:
            s["chosen_norm_len"] = up(pairs.chosen_length).clamp(min=1)
            s["rejected_norm_len"] = up(pairs.rejected_length).clamp(min=1)
    has_reference = ref_chosen is not None
    if has_reference:
        s["chosen_logratios"] = chosen_logps - ref_chosen
        s["rejected_logratios"] = rejected_logps - ref_rejected
        s["chosen_scores"] = _f_divergence_scores(options, s["chosen_logratios"])
        s["rejected_scores"] = _f_divergence_scores(options, s["rejected_logratios"])
        s["delta_score"] = s["chosen_scores"] - s["rejected_scores"]

    weights = None
    if options.use_weighting:
        # WPO (TRL's `use_weighting` branch, Eq. 2 of the paper): exp of each sequence's mean of log p - log sum p^2,
        # chosen times rejected, as a constant.
        with torch.no_grad():
            chosen_w = torch.exp((chosen_full - up(pairs.chosen_log_sum_sq_probs)) / s["chosen_len"])
            rejected_w = torch.exp((rejected_full - up(pairs.rejected_log_sum_sq_probs)) / s["rejected_len"])
            weights = chosen_w * rejected_w

    loss = torch.zeros((), dtype=acc, device=chosen_logps.device)
    for loss_type, loss_weight in zip(options.loss_types, options.loss_weights):
        per_sequence = _per_sequence_loss(loss_type, options, s)
        if weights is not None:
            per_sequence = per_sequence * weights
        loss = loss + per_sequence.mean() * loss_weight

    # Metrics (as the end of TRL's `_compute_loss` logs them): rewards are beta * log-ratio (not the
    # f-divergence score); means over the pairs of every process when `gather` is given (TRL gathers
    # each per-pair value).
    per_pair = [chosen_logps.detach(), rejected_logps.detach()]
    if has_reference:
        per_pair += [options.beta * s["chosen_logratios"].detach(), options.beta * s["rejected_logratios"].detach()]
    per_pair = torch.stack(per_pair, dim=1)
    if gather is not None:
        per_pair = gather(per_pair)  # one collective for all of them
    metrics = {}
    if has_reference:
        chosen_rewards, rejected_rewards = per_pair[:, 2], per_pair[:, 3]
        metrics["rewards/chosen"] = chosen_rewards.mean()
        metrics["rewards/rejected"] = rejected_rewards.mean()
        metrics["rewards/accuracies"] = (chosen_rewards > rejected_rewards).to(acc).mean()
        metrics["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
    metrics["logps/chosen"] = per_pair[:, 0].mean()
    metrics["logps/rejected"] = per_pair[:, 1].mean()
    return LossOutput(loss=loss, metrics={k: v.float() for k, v in metrics.items()})


# --- checks shared by the input levels ------------------------------------------------------------


def _check_reference_given(options: DPOOptions, given: bool, how: str) -> None:
    if options.reference_free and given:
        raise ValueError(f"{how}: reference log-probs were passed with reference_free=True, which takes them as 0")
    if options.needs_reference and not given:
        raise ValueError(
            f"{how}: loss_type {list(options.loss_types)} needs the reference model's log-probs "
            "(or reference_free=True for an implicit uniform reference)"
        )


def check_pairs(pairs: DPOPairs, options: DPOOptions) -> None:
    """Raises a ValueError/TypeError naming the argument if `pairs` does not fit `options`."""
    chosen = pairs.chosen_logps
    if not isinstance(chosen, torch.Tensor):
        raise TypeError(f"policy_chosen_logps: expected a torch.Tensor, got {type(chosen).__name__}")
    if chosen.dim() != 1 or chosen.shape[0] == 0:
        raise ValueError(f"policy_chosen_logps: expected shape [B] with B >= 1, got {tuple(chosen.shape)}")
    if not chosen.is_floating_point():
        raise TypeError(f"policy_chosen_logps: expected a floating-point tensor, got {chosen.dtype}")
    like = "policy_chosen_logps"
    check_sequence_values("policy_rejected_logps", pairs.rejected_logps, chosen, like)
    given = pairs.ref_chosen_logps is not None, pairs.ref_rejected_logps is not None
    if given[0] != given[1]:
        missing = "ref_rejected_logps" if given[0] else "ref_chosen_logps"
        raise ValueError(f"{missing}: the reference log-probs come in pairs; pass both or neither")
    _check_reference_given(options, given[0], "ref_chosen_logps/ref_rejected_logps")
    if given[0]:
        check_sequence_values("ref_chosen_logps", pairs.ref_chosen_logps, chosen, like)
        check_sequence_values("ref_rejected_logps", pairs.ref_rejected_logps, chosen, like)
    required = []
    if options.needs_num_tokens:
        length_types = sorted(LENGTH_LOSS_TYPES.intersection(options.loss_types))
        why = "WPO weighting" if options.use_weighting else f"loss_type {length_types}"
        required += [("chosen_num_tokens", pairs.chosen_num_tokens, why, True),
                     ("rejected_num_tokens", pairs.rejected_num_tokens, why, True)]
    if options.ld_alpha is not None:
        required += [("chosen_tail_logps", pairs.chosen_tail_logps, "ld_alpha (LD-DPO)", False),
                     ("rejected_tail_logps", pairs.rejected_tail_logps, "ld_alpha (LD-DPO)", False)]
    if options.use_weighting:
        required += [("chosen_log_sum_sq_probs", pairs.chosen_log_sum_sq_probs, "use_weighting (WPO)", False),
                     ("rejected_log_sum_sq_probs", pairs.rejected_log_sum_sq_probs, "use_weighting (WPO)", False)]
    for name, value, why, counts in required:
        if value is None:
            raise ValueError(f"{name}: required by {why}")
        check_sequence_values(name, value, chosen, like, counts=counts)
