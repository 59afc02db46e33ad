"""Each loss's options, described once.

A loss's options builder (`dpo_options`, ...), its functions and its module all list the same
options; `document` writes the list into each of their docstrings, in these words and with the
builder's defaults, where the docstring has a `{options}` line. A table that names an option the
builder lacks, or misses one it has, fails at import, so the docs cannot drift from the code.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable

WIDTH = 100

DPO = {
    "beta": "the KL coefficient (> 0); IPO's tau.",
    "loss_type": 'one of, or a list of, "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", '
                 '"sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm" '
                 "(TRL 1.16's DPOTrainer losses).",
    "loss_weights": "one weight per loss type (None: 1.0 each); the loss is their weighted sum.",
    "label_smoothing": "epsilon of exo_pair (> 0 required), robust (< 0.5) and aot/aot_unpaired; an error for "
                       "loss types that do not use it.",
    "f_divergence_type": '"reverse_kl" (DPO), "forward_kl", "js_divergence", "alpha_divergence" (f-DPO); other '
                         "than reverse_kl only for sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft.",
    "f_alpha_divergence_coef": 'alpha of "alpha_divergence".',
    "use_weighting": "WPO: each pair's loss times exp(mean over the completion of log p - log sum_v p_v^2) of "
                     "chosen times rejected, without gradient. Not with aot or aot_unpaired. An sft term is "
                     "weighted like the others (TRL 1.16 fails on that combination).",
    "ld_alpha": "LD-DPO, in [0, 1]: tokens past the shorter completion of the pair count alpha times.",
    "discopop_tau": 'the temperature of "discopop" (> 0).',
    "dpop_lambda": "DPOP (Pal et al. 2024): subtracts lambda * max(0, log pi_ref(y_w) - log pi(y_w)) from the "
                   'sigmoid loss\'s margin; needs "sigmoid" in loss_type.',
    "reference_free": "take the reference log-probs as 0 (an implicit uniform reference).",
}

CPO = {
    "beta": "inverse temperature (> 0); for \"ipo\", TRL's regularisation strength tau.",
    "loss_type": '"sigmoid" (CPO), "hinge", "ipo", "simpo" or "alphapo" (SimPO without the NLL term; set '
                 "`alpha`).",
    "label_smoothing": 'in [0, 1]; "sigmoid", "simpo" and "alphapo" only.',
    "cpo_alpha": 'weight of the NLL on the chosen completions (>= 0); None: 1, or 0 for "alphapo".',
    "simpo_gamma": 'SimPO\'s target margin ("simpo" and "alphapo" only); None: 0.5.',
    "alpha": "AlphaPO's reward shape; 0 uses the log-probs as rewards.",
}

ORPO = {
    "beta": "weight of the odds-ratio term (> 0; TRL's ORPOConfig.beta, the paper's lambda).",
}

KTO = {
    "beta": "the scale of the implied rewards beta * (log pi - log pi_ref) (> 0).",
    "loss_type": '"kto" or "apo_zero_unpaired".',
    "desirable_weight": "weight of the desirable completions' losses (>= 0; not both weights 0).",
    "undesirable_weight": "weight of the undesirable completions' losses (>= 0).",
}

RRHF = {
    "rank_weight": "weight of the ranking term (>= 0; the released training script's rrhf_weight, 100 there).",
    "sft_weight": "weight of the SFT term on each prompt's best response (>= 0; not both weights 0).",
    "length_penalty": "the exponent of the response length that divides each log-prob sum (>= 0; 1: the "
                      "token mean, 0: the sum).",
    "sft_reduction": '"sum" (the paper\'s Eq. 3: the best response\'s log-prob sum) or "mean" (over its tokens).',
}

REWARD = {
    "center_rewards_coefficient": "weight (>= 0) of the mean squared sum of each pair's scores, which pulls "
                                  "the rewards towards mean 0; None for none.",
}

RLOO = {
    "epsilon": "the clipping range below 1, in (0, 1): the ratio is clipped to [1 - epsilon, 1 + epsilon_high].",
    "epsilon_high": "the range above 1 (any number > 0); None: epsilon, as TRL's RLOOConfig.",
    "temperature": "logits are divided by it (> 0), after logit_scale and softcap, as TRL's fused LM head "
                   "applies the sampling temperature.",
    "logit_scale": "multiplies the logits first (a model's logit_scale).",
    "softcap": "cap * tanh(z / cap) after the scale (Gemma's final_logit_softcapping); None: off.",
}


_TRANSFORM = {
    "temperature": "logits are divided by it (> 0), after logit_scale and softcap, as the trainers apply the "
                   "sampling temperature.",
    "logit_scale": "multiplies the logits first (a model's logit_scale).",
    "softcap": "cap * tanh(z / cap) after the scale (Gemma's final_logit_softcapping); None: off.",
}

GRPO = {
    "loss_type": 'convention="trl": TRL 1.16 GRPOTrainer\'s "grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", '
                 '"luspo", "vespo" (-phi(w) * A * log pi with VESPO\'s Gamma weight phi of each completion\'s '
                 'importance weight w, normalized as dapo); convention="verl": verl\'s policy loss modes "vanilla" '
                 '(dual-clip), "gspo", "cispo", "sapo".',
    "convention": '"trl" (TRL\'s names, normalizers and metrics) or "verl" (verl\'s actor loss and metrics).',
    "epsilon": "the clipping range below and above 1, in (0, 1) (verl's cispo: any positive bound).",
    "epsilon_low": "the range below 1; None: epsilon (verl's clip_ratio_low).",
    "epsilon_high": "the range above 1; None: epsilon (DAPO's clip-higher; TRL's cispo: an absolute cap on the "
                    "ratio, e.g. 5.0).",
    "delta": "TRL's two-sided clipping: the unclipped ratio is capped at delta (> 1); None: off. TRL only.",
    "beta": "the KL coefficient (>= 0; verl's kl_loss_coef); 0: no KL term and no ref_logps needed.",
    "kl_estimator": 'the KL estimator: "k1", "abs", "k2", "k3" (TRL\'s, unclamped) or "low_var_kl" (verl\'s '
                    'clamped k3); verl also takes "kl", "mse", and "k3" for low_var_kl; a "+" suffix takes the '
                    'k2 gradient (straight-through). None: "k3" for TRL, "low_var_kl" for verl.',
    "use_bias_correction_kl": "TRL's use_bias_correction_kl: the KL term times the importance ratio.",
    "importance_sampling_level": '"token" or "sequence" (GSPO: the mean token log-ratio of each completion). '
                                 '"vespo" weighs each completion by its summed log-ratio either way; "sequence" '
                                 "then changes only the KL term's bias correction, as in TRL (which advises "
                                 '"token").',
    "sapo_temperature_pos": "SAPO's temperature where the advantage is positive (> 0).",
    "sapo_temperature_neg": "SAPO's temperature elsewhere (> 0).",
    "vespo_k_pos": "VESPO's power k in phi(w) = e^lambda * w^k * e^(-lambda * w) where the advantage is >= 0 "
                   "(>= 0): how hard a completion with w < 1 is down-weighted.",
    "vespo_lambda_pos": "VESPO's decay lambda where the advantage is >= 0 (>= 0; floored at 1e-4 as TRL does): "
                        "how hard a completion with w > 1 is down-weighted.",
    "vespo_k_neg": "VESPO's k where the advantage is < 0 (>= 0).",
    "vespo_lambda_neg": "VESPO's lambda where the advantage is < 0 (>= 0; floored at 1e-4).",
    "top_entropy_quantile": "in (0, 1]: only the tokens whose entropy is in the top quantile get a policy "
                            "gradient (TRL); 1: all.",
    "entropy_coef": "the entropy bonus's weight (>= 0; verl's entropy_coeff).",
    "off_policy_mask_threshold": "TRL's off-policy sequence masking: a sequence with a negative advantage whose "
                                 "mean log-ratio to the sampler exceeds it gets no gradient; None: off.",
    "max_completion_length": 'the L_max of "dr_grpo"\'s normalizer B * L_max (required there).',
    "gradient_accumulation_steps": "TRL's gradient accumulation steps (the loss is scaled as TRL scales it).",
    "num_processes": "TRL's number of processes (dapo/cispo/vespo's normalizer).",
    "steps_per_generation": "TRL's steps per generation (dapo/cispo/vespo's normalizer); None: "
                            "gradient_accumulation_steps.",
    "loss_agg_mode": 'verl\'s loss_agg_mode: "token-mean", "token-sum", "seq-mean-token-mean", '
                     '"seq-mean-token-sum", "seq-mean-token-sum-norm".',
    "dp_size": "verl's data-parallel size (with batch_num_tokens= / global_batch_size= when > 1).",
    "loss_scale_factor": 'the divisor of "seq-mean-token-sum-norm"; None: the sequence length T.',
    "clip_ratio_c": 'verl\'s dual-clip bound c (> 1) of "vanilla".',
    **_TRANSFORM,
}

PPO = {
    "convention": '"verl" (compute_policy_loss_vanilla + compute_value_loss, the log-ratio clamped to +-20) or '
                  '"trl" (TRL PPOTrainer: no dual-clip, no clamp).',
    "epsilon": "the clipping range below and above 1, in (0, 1).",
    "epsilon_low": "the range below 1; None: epsilon.",
    "epsilon_high": "the range above 1; None: epsilon.",
    "dual_clip": "verl's clip_ratio_c (> 1): the dual-clip bound for negative advantages; None: off.",
    "kl_coef": "the KL penalty's weight (>= 0); 0: no KL term and no ref_logps needed.",
    "kl_estimator": 'as grpo_options\'s: "k1"/"kl", "abs", "k2"/"mse", "k3"/"low_var_kl", with "+" for the '
                    "straight-through gradient.",
    "entropy_coef": "the entropy bonus's weight (>= 0).",
    "vf_coef": "the value loss's weight (>= 0).",
    "value_clip": "TRL's / verl's cliprange_value (> 0); None: the unclipped squared error.",
    "loss_agg_mode": "verl's loss_agg_mode, for the policy and the value loss.",
    "dp_size": "verl's data-parallel size (with batch_num_tokens= / global_batch_size= when > 1).",
    "loss_scale_factor": 'the divisor of "seq-mean-token-sum-norm"; None: the sequence length T.',
    **_TRANSFORM,
}


def options_list(descriptions: dict[str, str], builder: Callable) -> str:
    """`name (default): description`, one option a paragraph, in the builder's order."""
    parameters = inspect.signature(builder).parameters
    missing = sorted(set(parameters) - set(descriptions))
    unknown = sorted(set(descriptions) - set(parameters))
    if missing or unknown:
        raise ValueError(f"option docs of {builder.__name__}: undescribed {missing}, not options {unknown}")
    paragraphs = []
    for name, parameter in parameters.items():
        text = f"{name} ({parameter.default!r}): {descriptions[name]}"
        paragraphs.append(textwrap.fill(text, WIDTH - 8, subsequent_indent="    "))
    return "\n".join(paragraphs)


def document(descriptions: dict[str, str], builder: Callable, *targets: object, **sections: str) -> None:
    """Fills each target's docstring: the `{options}` line with the options list, and a `{name}`
    line with `sections[name]`, each re-indented to its line. Without docstrings (python -OO)
    there is nothing to fill."""
    sections = {"options": options_list(descriptions, builder), **sections}
    for target in targets:
        doc = target.__doc__
        if doc is None:
            continue
        if "{options}" not in doc:
            raise ValueError(f"{target.__qualname__}: its docstring has no {{options}} line")
        lines = []
        for line in doc.split("\n"):
            key = line.strip()
            if key.startswith("{") and key.endswith("}") and key[1:-1] in sections:
                indent = line[: len(line) - len(line.lstrip())]
                lines += [indent + part if part else "" for part in sections[key[1:-1]].split("\n")]
            else:
                lines.append(line)
        target.__doc__ = "\n".join(lines)
