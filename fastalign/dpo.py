"""The DPO family of preference losses: the per-sequence math once, and the input levels that feed it.

- `dpo_loss`: from per-sequence log-prob sums the caller already has (`policy_chosen_logps`, ...);
- `dpo_loss_from_logits`: from `[2B, T, V]` logits (B chosen rows, then B rejected), one pass over
  the vocabulary forward and one backward;
- `DPOLoss`: the `nn.Module` form of `dpo_loss_from_logits`, options checked once when it is built.

All of them end in `dpo_from_sequences(pairs, options)`, which sees only per-sequence tensors ([B]
sums over each completion and token counts, in `DPOPairs`): a level that starts from hidden states
and the `lm_head` weight reduces its per-token output with `pairs_from_tokens` and calls it
unchanged.

Every formula is TRL 1.16's `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py; each loss
type is its branch of that method's `loss_type` loop), except DPOP (Pal et al. 2024,
arXiv:2402.13228), which TRL lacks.

Options follow one convention (as GRPO's): `dpo_options(...)` checks them into a `DPOOptions`;
every function takes them as keywords or as `options=` (not both), and `DPOLoss(**options)`
checks them once. Their descriptions live in `fastalign.option_docs.DPO`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import option_docs
from ._checks import (
    check_finite,
    check_ignore_index,
    check_positive_finite,
    check_sequence_values,
    options_from,
    policy_logits,
)
from ._deprecation import keyword_only, parameter_names
from .sequence import completion_logits_metrics, sequence_logprobs
from .types import HiddenStates, LossOutput, TokenLogprobs

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
) -> LossOutput:
    if not isinstance(logits, (torch.Tensor, HiddenStates)) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected [2B, T, V] (B chosen rows, then B rejected rows), got {shape}")
    rows = logits.shape[0]
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
    seq = sequence_logprobs(logits, labels, completion_mask=completion_mask, ignore_index=ignore_index, outputs=outputs)
    ref_token_logps = None
    if ref_logits is not None:
        with torch.no_grad():
            ref_token_logps = sequence_logprobs(
                ref_logits, labels, completion_mask=completion_mask, ignore_index=ignore_index
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
    logits = policy_logits(logits, hidden, weight, bias, labels)
    return _dpo_from_logits(
        options, logits, labels, completion_mask, ref_chosen_logps, ref_rejected_logps, ref_logits, ignore_index
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
    ) -> LossOutput:
        return dpo_loss_from_logits(
            logits, labels, completion_mask=completion_mask, ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps, ref_logits=ref_logits, hidden=hidden, weight=weight, bias=bias,
            ignore_index=self.ignore_index, options=self.options,
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


option_docs.document(option_docs.DPO, dpo_options, dpo_options, dpo_loss, dpo_loss_from_logits, DPOLoss, empty=_EMPTY)
