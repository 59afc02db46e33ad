"""The per-token policy objective that the fused kernels differentiate, as plain parameters.

Every token-level policy loss fastalign serves (PPO, GRPO and its family, both conventions)
is, per completion token with log-prob l, old log-prob o, reference log-prob q, advantage A:

    loss = sum_t  w_pg[t] * surrogate(l, o, A)  +  w_kl[t] * kl(l, q)  -  w_entropy[t] * H[t]

with per-token weights that depend on the mask and the aggregation only (never on l). The
kernels receive this description (`TokenObjective`) plus the three weight vectors; the loss
value and the metrics are computed from their log-probs by `fastalign.policy_objective`, the
one place the math is written as the trainers write it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._triton import contract

# By kernel id, and the order of the kernels' float parameters (kernels/contract.py).
SURROGATES = contract().SURROGATES
KL_ESTIMATORS = contract().KL_ESTIMATORS
OBJECTIVE_PARAMS = contract().OBJECTIVE_PARAMS


@dataclass(frozen=True)
class TokenObjective:
    """surrogate:
        "clip":  max(-A * min(r, delta), -A * clamp(r, ratio_low, ratio_high)), and for A < 0
                 min(that, -A * dual_clip)  (PPO / GRPO / DAPO / Dr.GRPO; TRL's delta, verl's c)
        "cispo": -sg(clamp(r, ratio_low, ratio_high)) * A * l
        "sapo":  -sigmoid(tau * (r - 1)) * 4 / tau * A,   tau = tau_pos if A > 0 else tau_neg
    r = exp(clamp(l - o, -log_ratio_clamp, log_ratio_clamp)); without old log-probs o = sg(l).
    kl: k1 = l - q, abs = |l - q|, k2 = (l - q)^2 / 2, k3 = e^(q-l) - (q-l) - 1 (TRL, unclamped),
        low_var_kl = verl's k3 (q - l clamped to +-20, the estimate to [-10, 10]);
        kl_straight_through: value of `kl`, gradient of k2 (verl's "k3+"-style names);
        kl_bias_correction: the KL term times r (TRL's use_bias_correction_kl).
    """

    surrogate: str = "clip"
    ratio_low: float = 0.8
    ratio_high: float = 1.2
    delta: float = math.inf
    dual_clip: float = math.inf
    log_ratio_clamp: float = math.inf
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    kl: str = "none"
    kl_straight_through: bool = False
    kl_bias_correction: bool = False

    def kernel_args(self) -> tuple[int, int, list[float]]:
        """(surrogate id, kl id, float parameters) in the order every kernel reads them
        (kernels/contract.py)."""
        params = [float(getattr(self, name)) for name in OBJECTIVE_PARAMS]
        return SURROGATES.index(self.surrogate), KL_ESTIMATORS.index(self.kl), params


# verl's kl_penalty names ("k3" is its clamped low-variance estimator; "kl", "mse" are k1, k2).
VERL_KL_ALIASES = {"kl": "k1", "mse": "k2", "k3": "low_var_kl"}


def kl_estimator_name(name: object, convention: str) -> str:
    """The estimator `name` means under `convention`, with a "+" suffix kept (straight-through)."""
    valid = tuple(k for k in KL_ESTIMATORS if k != "none")
    aliases = VERL_KL_ALIASES if convention == "verl" else {}
    choices = valid + tuple(aliases)
    base = name[:-1] if isinstance(name, str) and name.endswith("+") else name
    if base not in choices:
        listed = ", ".join(repr(k) for k in choices)
        raise ValueError(f"kl_estimator: expected one of {listed} (optionally with a '+' suffix); got {name!r}")
    suffix = "+" if name.endswith("+") else ""
    return aliases.get(base, base) + suffix
