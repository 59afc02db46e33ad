"""RLOO's policy loss as TRL 1.16's `RLOOTrainer._compute_loss` writes it: one PPO-clip
surrogate per *sequence*, its ratio comparing completion log-probs summed over the counted tokens:

    s_b = sum_t mask[b, t] * logp[b, t]      r_b = exp(s_b - old_b)
    loss = mean_b max(-A_b * r_b, -A_b * clamp(r_b, 1 - eps_low, 1 + eps_high))

The math lives in `fastalign.policy_objective` (`sequence_log_ratio`, `surrogate`) and
`fastalign.aggregation` (`sequence_mean_weights`); the earlier names stay importable from here.
"""

from __future__ import annotations

import torch

from ..aggregation import sequence_mean_weights as sequence_weights
from ..masked import masked_sum
from ..policy_objective import sequence_log_ratio as log_ratio

__all__ = ["log_ratio", "sequence_weights", "summed_logps"]


def summed_logps(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B]: the log-prob of each completion, summed over the counted tokens."""
    return masked_sum(logps, mask, dim=-1)
