"""VESPO's sequence weight (Variational Sequence-Level Soft Policy Optimization, arXiv 2602.10693),
as TRL 1.16's `GRPOTrainer.get_gamma_weights` computes it for `loss_type="vespo"`.

Each completion's importance weight w = pi(y) / pi_old(y) (times the vLLM sampler's correction)
scales its policy gradient by the Gamma-shaped

    phi(w) = e^lambda * w^k * e^(-lambda * w),   phi(1) = 1,

with (k, lambda) = (k_pos, lambda_pos) where the advantage is >= 0, (k_neg, lambda_neg) elsewhere:
a soft trust region in place of clipping. phi is a detached weight; the loss is
-phi * A * log pi per token (`fastalign.grpo_loss(loss_type="vespo")`).
"""

from __future__ import annotations

import math

import torch

# TRL clamps log w below at log(1e-8), the bound of the paper's implementation, and at 20 above.
LOG_WEIGHT_MIN = math.log(1e-8)
LOG_WEIGHT_MAX = 20.0
TOKEN_LOG_RATIO_CLAMP = 20.0


@torch.no_grad()
def gamma_weights(
    advantages: torch.Tensor,
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    importance_sampling_ratio: torch.Tensor | None,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
) -> torch.Tensor:
    """phi(w) [B, 1] ([B, T] for per-token advantages), without gradient.

    log w = sum over the counted tokens of the token log-ratios clamped to +-20, plus the sum of
    log(importance_sampling_ratio) clamped to [log(1e-8), 20] over every position (TRL sums the
    vLLM ratio unmasked: it is 1 off the completion, as TRL's trainer and
    `fastalign.vllm_importance_sampling_ratio` make it), then clamped to [log(1e-8), 20]. lambda is
    floored at 1e-4; a phi that is NaN or infinite counts as 0. Padding is selected out, not
    multiplied by 0, so a NaN or inf log-prob there leaves the sequence's weight alone.
    """
    token = torch.where(mask != 0, log_ratio.clamp(-TOKEN_LOG_RATIO_CLAMP, TOKEN_LOG_RATIO_CLAMP), 0.0)
    log_w = (token * mask).sum(-1, keepdim=True)
    if importance_sampling_ratio is not None:
        log_is = torch.log(importance_sampling_ratio).clamp(LOG_WEIGHT_MIN, LOG_WEIGHT_MAX)
        log_w = log_w + log_is.sum(-1, keepdim=True)
    log_w = log_w.clamp(LOG_WEIGHT_MIN, LOG_WEIGHT_MAX)
    w = torch.exp(log_w)
    # torch.where on Python numbers, as TRL writes it (the default dtype's k and lambda).
    nonnegative = advantages >= 0
    k = torch.where(nonnegative, k_pos, k_neg)
    lam = torch.where(nonnegative, lambda_pos, lambda_neg).clamp(min=1e-4)
    log_phi = lam + k * log_w - lam * w
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
