"""The reference backend of `fastalign::policy_token_forward`: the token log-probs of
`reference/logprobs.py`, then the gradient of the objective in the log-probs
(`fastalign.policy_objective.objective_grad`) carried to the logits by the log-prob backward.

The objective's math lives in `fastalign.policy_objective`, the trainers' aggregation in
`fastalign.aggregation`, the masked reductions in `fastalign.masked`; their names stay importable
from here.
"""

from __future__ import annotations

import torch

from ..aggregation import trl_weights, verl_weights
from ..masked import masked_mean, masked_sum
from ..policy_objective import (
    clipped_value_loss,
    kl_penalty,
    log_ratio,
    objective,
    objective_grad,
    sapo_temperature,
    surrogate,
)
from ..token_objective import TokenObjective

# The earlier name of masked_sum.
masked_total = masked_sum

__all__ = [
    "clipped_value_loss", "kl_penalty", "log_ratio", "masked_mean", "masked_total", "objective",
    "objective_grad", "policy_token_forward", "sapo_temperature", "surrogate", "trl_weights", "verl_weights",
]


# The op contract shared with the native and Triton backends (`fastalign::policy_token_forward`):
# logits [B, T, V], labels [B*T], per-token vectors [B*T] (or [0] when absent).


def policy_token_forward(
    logits, labels, old_logps, ref_logps, advantages, w_pg, w_kl, grad_entropy,
    temperature, logit_scale, softcap, ignore_index, surrogate_id, kl_id, params, with_grad,
):
    """(logps, entropy, grad w.r.t. logits or [0], norm): one pass over each row in the kernels.

    grad = d/dlogits of  sum(w_pg * surrogate + w_kl * kl) + sum(grad_entropy * entropy)."""
    from ..token_objective import KL_ESTIMATORS, SURROGATES
    from .logprobs import token_logprobs_backward, token_logprobs_forward

    logps, entropy, _, _, _, norm = token_logprobs_forward(
        logits, labels, temperature, logit_scale, softcap, ignore_index, True, False, False, False
    )
    if not with_grad:
        return logps, entropy, logits.new_empty(0), norm
    obj = TokenObjective(
        SURROGATES[surrogate_id], *params[:7], kl=KL_ESTIMATORS[kl_id],
        kl_straight_through=bool(params[7]), kl_bias_correction=bool(params[8]),
    )

    def present(t):
        # [0] marks an absent vector, unless there is no token at all: then every vector is [0].
        return t if t.numel() or not labels.numel() else None

    valid = labels != ignore_index
    g = objective_grad(logps, present(old_logps), present(ref_logps), advantages, obj, w_pg, present(w_kl))
    g = torch.where(valid, g, 0.0)
    grad = token_logprobs_backward(
        g, present(grad_entropy), logits, labels, norm, entropy, temperature, logit_scale, softcap, ignore_index
    )
    return logps, entropy, grad, norm
