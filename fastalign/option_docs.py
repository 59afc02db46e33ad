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
