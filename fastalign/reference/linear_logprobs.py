"""Token log-probs from hidden states and the lm_head weight, unfused: logits = hidden @ weight.T
+ bias in the input dtype (what the model's lm_head computes), then the token log-prob math of
`fastalign.reference.logprobs` on them. The ground truth of the fused op, and its op contract:

    linear_token_logprobs_forward(hidden [N, H], weight [V, H], bias [V] or [0], labels [N], ...)
        -> the six outputs of token_logprobs_forward
    linear_token_logprobs_backward(grad_logps, grad_entropy, hidden, weight, bias, labels, norm, entropy, ...)
        -> (grad_hidden [N, H], grad_weight [V, H], grad_bias [V] or [0])
"""

from __future__ import annotations

import torch

from . import logprobs as token_reference


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[N, V] logits as the model's nn.Linear forms them, in the input dtype."""
    logits = hidden @ weight.t()
    return logits + bias if bias.numel() else logits


def linear_token_logprobs_forward(
    hidden, weight, bias, labels, temperature, logit_scale, softcap, ignore_index,
    with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1,
):
    logits = lm_head_logits(hidden, weight, bias).unsqueeze(0)
    return token_reference.token_logprobs_forward(
        logits, labels, temperature, logit_scale, softcap, ignore_index,
        with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1,
    )


def linear_token_logprobs_backward(
    grad_logps, grad_entropy, hidden, weight, bias, labels, norm, entropy, temperature, logit_scale, softcap,
    ignore_index, need_hidden=True, need_weight=True,
):
    """(grad_hidden, grad_weight, grad_bias); the ones not needed come back as [0], uncomputed."""
    logits = lm_head_logits(hidden, weight, bias).unsqueeze(0)
    grad_logits = token_reference.token_logprobs_backward(
        grad_logps, grad_entropy, logits, labels, norm, entropy, temperature, logit_scale, softcap, ignore_index
    )[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    g = grad_logits.to(acc)
    grad_hidden = (g @ weight.to(acc)).to(hidden.dtype) if need_hidden else hidden.new_empty(0)
    grad_weight = (g.t() @ hidden.to(acc)).to(weight.dtype) if need_weight else weight.new_empty(0)
    grad_bias = g.sum(0).to(bias.dtype) if bias.numel() and need_weight else bias.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


def linear_policy_token_forward(
    hidden, weight, bias, labels, old_logps, ref_logps, advantages, w_pg, w_kl, grad_entropy,
    temperature, logit_scale, softcap, ignore_index, surrogate_id, kl_id, params, with_grad,
    need_hidden=True, need_weight=True,
):
    """`policy_token_forward` on hidden @ weight.T + bias: (logps, entropy, grad_hidden,
    grad_weight, grad_bias, norm), the gradients of the policy objective ([0] without with_grad, or
    without need_hidden / need_weight)."""
    from .policy import policy_token_forward

    logits = lm_head_logits(hidden, weight, bias).unsqueeze(0)
    logps, entropy, grad_logits, norm = policy_token_forward(
        logits, labels, old_logps, ref_logps, advantages, w_pg, w_kl, grad_entropy,
        temperature, logit_scale, softcap, ignore_index, surrogate_id, kl_id, params, with_grad,
    )
    if not with_grad:
        # Three distinct [0] tensors: a custom op's outputs may not alias one another.
        return logps, entropy, hidden.new_empty(0), weight.new_empty(0), bias.new_empty(0), norm
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    g = grad_logits[0].to(acc)
    grad_hidden = (g @ weight.to(acc)).to(hidden.dtype) if need_hidden else hidden.new_empty(0)
    grad_weight = (g.t() @ hidden.to(acc)).to(weight.dtype) if need_weight else weight.new_empty(0)
    grad_bias = g.sum(0).to(bias.dtype) if bias.numel() and need_weight else bias.new_empty(0)
    return logps, entropy, grad_hidden, grad_weight, grad_bias, norm
