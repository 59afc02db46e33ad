"""RLOO's policy loss as TRL 1.16's `RLOOTrainer._compute_loss` writes it (the ground truth).

One PPO-clip surrogate per *sequence*, its ratio comparing completion log-probs summed over the
counted tokens:

    s_b = sum_t mask[b, t] * logp[b, t]      r_b = exp(s_b - old_b)
    loss = mean_b max(-A_b * r_b, -A_b * clamp(r_b, 1 - eps_low, 1 + eps_high))

GRPO's sequence level (GSPO) takes the *mean* token log-ratio instead, so the two objectives
differ as soon as a completion has more than one token. The clipped surrogate is the one of
`reference.policy.surrogate`, applied to the [B, 1] ratio with a weight of 1/B per sequence.
"""

from __future__ import annotations

import torch


def summed_logps(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B]: the log-prob of each completion, sum over the counted tokens (an inf/NaN at an
    uncounted position never leaks in, where TRL's `logps * mask` would carry it)."""
    logps, mask = torch.broadcast_tensors(logps, mask)
    return torch.where(mask != 0, logps * mask, 0.0).sum(-1)


def log_ratio(logps: torch.Tensor, old_logps: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """[B, 1]: log(pi(y) / pi_old(y)) of each completion; `old_logps` [B, 1] are already summed.
    Without them, s - sg(s): a ratio of 1 that keeps the on-policy gradient."""
    s = summed_logps(logps, mask).unsqueeze(-1)
    return s - (s.detach() if old_logps is None else old_logps)


def sequence_weights(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1]: 1/B per sequence, TRL's `.mean()` over the batch (a completion without a counted
    token still counts, as in TRL)."""
    b = mask.shape[0]
    dtype = torch.float64 if mask.dtype == torch.float64 else torch.float32
    return torch.full((b, 1), 1.0 / max(b, 1), dtype=dtype, device=mask.device)
