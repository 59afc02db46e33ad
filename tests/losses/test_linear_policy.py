"""GRPOLoss / PPOLoss at the hidden-states level (hidden=, weight=, bias=): equal to the same loss
from the materialized logits, for token-local objectives (three matmul-equivalents, gradients
from the forward) and for the two-pass ones (GSPO, entropy mask)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params
from numerics import assert_as_accurate_as_reference

import fastalign

B, T, H, V = 3, 6, 16, 90


def make(dtype=torch.float64):
    hidden = torch.randn(B, T, H, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) * 0.3).to(dtype)
    bias = (torch.randn(V, device=DEVICE) * 0.1).to(dtype)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    mask = torch.ones(B, T, device=DEVICE)
    mask[1, 4:] = 0
    advantages = torch.tensor([0.9, -0.6, 0.3], device=DEVICE)
    with torch.no_grad():
        logps = fastalign.reference.token_logprobs((hidden @ weight.t() + bias).double(), labels).logps.float()
    old = logps + 0.3 * torch.randn(B, T, device=DEVICE)
    ref = logps + 0.3 * torch.randn(B, T, device=DEVICE)
    return hidden, weight, bias, labels, mask, advantages, old, ref


CONFIGS = [
    dict(loss_type="dapo", beta=0.04, epsilon_high=0.28),
    dict(loss_type="grpo", entropy_coef=0.01, beta=0.04),
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="dapo", top_entropy_quantile=0.5),
    dict(convention="verl", loss_type="vanilla", beta=0.01, loss_agg_mode="seq-mean-token-mean"),
]


def grads_of(level, dtype, backend, config, hidden, weight, bias, labels, mask, advantages, old, ref):
    leaves = [t.to(dtype).clone().requires_grad_() for t in (hidden, weight, bias)]
    kwargs = dict(completion_mask=mask, advantages=advantages, old_logps=old, ref_logps=ref,
                  num_items_in_batch=mask.sum(), temperature=0.9, **config)
    with fastalign.use_backend(backend):
        if level == "hidden":
            out = fastalign.grpo_loss(hidden=leaves[0], weight=leaves[1], bias=leaves[2], labels=labels, **kwargs)
        else:
            out = fastalign.grpo_loss(leaves[0] @ leaves[1].t() + leaves[2], labels, **kwargs)
        grads = torch.autograd.grad(out.loss, leaves)
    return out, grads


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_hidden_level_equals_logits_level(backend, dtype, config):
    hidden, weight, bias, *rest = make()
    # The truth starts from the same (rounded) inputs: input rounding is no backend's error.
    inputs = (hidden.to(dtype).double(), weight.to(dtype).double(), bias.to(dtype).double(), *rest)
    truth, truth_grads = grads_of("logits", torch.float64, "reference", config, *inputs)
    ref, ref_grads = grads_of("logits", dtype, "reference", config, *inputs)
    out, out_grads = grads_of("hidden", dtype, backend, config, *inputs)
    # The loss is one fp32 number whose error comes from bf16 logits: the reference's own error is
    # a single random draw, so the slack is half a bf16 ulp rather than a few fp32 ones.
    loss_slack = 4.0 if dtype == torch.float32 else 0.5 * torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
    assert_as_accurate_as_reference(out.loss, ref.loss, truth.loss, "loss", slack_eps=loss_slack)
    for name, g, r, t in zip(("hidden", "weight", "bias"), out_grads, ref_grads, truth_grads):
        assert g.dtype == dtype
        assert_as_accurate_as_reference(g, r, t, f"grad {name}", slack_eps=8.0)
    assert out.metrics.keys() == truth.metrics.keys()


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_policy_pass_over_several_token_blocks(monkeypatch, dtype, softcap):
    """The C++ path's token blocks (each block's gradient written over its logits buffer, the buffer
    reused by the next block, masked tokens skipped) equal one block holding every token."""
    if DEVICE != "cpu":
        pytest.skip("token blocks are the CPU path's")
    from fastalign import linear_blocked

    hidden, weight, bias, *rest = make()
    inputs = (hidden.to(dtype), weight.to(dtype), bias.to(dtype), *rest)
    config = dict(loss_type="dapo", beta=0.04, entropy_coef=0.01, softcap=softcap)
    whole, whole_grads = grads_of("hidden", dtype, "native", config, *inputs)
    monkeypatch.setattr(linear_blocked, "BLOCK_ELEMENTS", V * 4)
    monkeypatch.setattr(linear_blocked, "MIN_BLOCK_ROWS", 1)
    parts, part_grads = grads_of("hidden", dtype, "native", config, *inputs)
    torch.testing.assert_close(parts.loss, whole.loss, rtol=0, atol=0)
    for a, b in zip(part_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-2, atol=1e-12)


@pytest.mark.parametrize("mode", ["blocked", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_policy_passes(monkeypatch, mode, dtype):
    """The Triton backend's two ways to a token-local objective from hidden states, each checked to
    run: "blocked" (cuBLAS blocks + the policy kernel writing the gradient over each block's
    logits, three matmul-equivalents) and "tiled" (the tiled kernels' forward and backward)."""
    ok, why = fastalign.available_backends(DEVICE)["triton"]
    if not ok:
        pytest.skip(f"triton not live on {DEVICE}: {why}")
    from fastalign import _triton, linear_blocked

    monkeypatch.setattr(fastalign.policy, "LINEAR_POLICY_PASS", mode)
    monkeypatch.setattr(_triton, "POLICY_BLOCK_ELEMENTS", V * 4)
    monkeypatch.setattr(_triton, "POLICY_MIN_BLOCK_ROWS", 1)
    calls = []
    blocked = linear_blocked.linear_policy_token_forward
    monkeypatch.setattr(linear_blocked, "linear_policy_token_forward", lambda *a, **k: calls.append(k) or blocked(*a, **k))
    hidden, weight, bias, *rest = make()
    inputs = (hidden.to(dtype).double(), weight.to(dtype).double(), bias.to(dtype).double(), *rest)
    config = dict(loss_type="dapo", beta=0.04, entropy_coef=0.01, epsilon_high=0.28)
    truth, truth_grads = grads_of("logits", torch.float64, "reference", config, *inputs)
    ref, ref_grads = grads_of("logits", dtype, "reference", config, *inputs)
    out, out_grads = grads_of("hidden", dtype, "triton", config, *inputs)
    assert len(calls) == (1 if mode == "blocked" else 0)
    if calls:
        assert calls[0]["rows_per_block"] == 4  # several blocks: 18 tokens, 4 per block
    loss_slack = 4.0 if dtype == torch.float32 else 0.5 * torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
    assert_as_accurate_as_reference(out.loss, ref.loss, truth.loss, "loss", slack_eps=loss_slack)
    for name, g, r, t in zip(("hidden", "weight", "bias"), out_grads, ref_grads, truth_grads):
        assert_as_accurate_as_reference(g, r, t, f"grad {name}", slack_eps=8.0)


def test_unknown_linear_policy_pass(monkeypatch):
    ok, why = fastalign.available_backends(DEVICE)["triton"]
    if not ok:
        pytest.skip(f"triton not live on {DEVICE}: {why}")
    from fastalign import _triton

    monkeypatch.setattr(fastalign.policy, "LINEAR_POLICY_PASS", "fused")
    hidden, weight, bias, labels, mask, advantages, old, _ = make(torch.float32)
    with pytest.raises(ValueError, match=r"FASTALIGN_LINEAR_POLICY: expected 'blocked' or 'tiled', got 'fused'"):
        with fastalign.use_backend("triton"):
            fastalign.grpo_loss(hidden=hidden, weight=weight, labels=labels, completion_mask=mask,
                                advantages=advantages, old_logps=old, num_items_in_batch=mask.sum())


def test_ppo_from_hidden_states():
    hidden, weight, bias, labels, mask, advantages, old, ref = make(torch.float32)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    out = fastalign.ppo_loss(hidden=leaves[0], weight=leaves[1], labels=labels, completion_mask=mask,
                             advantages=advantages, old_logps=old, ref_logps=ref, kl_coef=0.01, dual_clip=3.0)
    grads = torch.autograd.grad(out.loss, leaves)
    leaves2 = [t.clone().requires_grad_() for t in (hidden, weight)]
    out2 = fastalign.ppo_loss(leaves2[0] @ leaves2[1].t(), labels, completion_mask=mask, advantages=advantages,
                              old_logps=old, ref_logps=ref, kl_coef=0.01, dual_clip=3.0)
    grads2 = torch.autograd.grad(out2.loss, leaves2)
    torch.testing.assert_close(out.loss, out2.loss)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_hidden_level_errors():
    hidden, weight, bias, labels, mask, advantages, old, _ = make(torch.float32)
    base = dict(completion_mask=mask, advantages=advantages, old_logps=old, num_items_in_batch=mask.sum())
    with pytest.raises(ValueError, match=r"weight: expected the lm_head weight \[V, H\]"):
        fastalign.grpo_loss(hidden=hidden, labels=labels, **base)
    with pytest.raises(ValueError, match=r"weight: expected shape \[V, 16\]"):
        fastalign.grpo_loss(hidden=hidden, weight=weight[:, :8], labels=labels, **base)
    with pytest.raises(ValueError, match=r"weight / bias: the lm_head's weight and bias go with hidden="):
        fastalign.grpo_loss(hidden @ weight.t(), labels, weight=weight, **base)
    with pytest.raises(ValueError, match=r"logits / hidden / logps: pass exactly one input level"):
        fastalign.grpo_loss(hidden @ weight.t(), labels, hidden=hidden, weight=weight, **base)
    with pytest.raises(ValueError, match=r"labels: required with hidden"):
        fastalign.grpo_loss(hidden=hidden, weight=weight, **base)
    with pytest.raises(ValueError, match=r"hidden: expected shape \[B, T, H\]"):
        fastalign.grpo_loss(hidden=hidden[0], weight=weight, labels=labels, **base)


@pytest.mark.parametrize("backend", backend_params())
def test_dpo_from_hidden_states(backend):
    pairs, length, width, vocab = 2, 7, 16, 80
    hidden = torch.randn(2 * pairs, length, width, device=DEVICE)
    weight = torch.randn(vocab, width, device=DEVICE) * 0.3
    bias = torch.randn(vocab, device=DEVICE) * 0.1
    labels = torch.randint(0, vocab, (2 * pairs, length), device=DEVICE)
    mask = torch.ones(2 * pairs, length, device=DEVICE)
    mask[:, :2] = 0
    ref_chosen, ref_rejected = torch.randn(pairs, device=DEVICE) - 30, torch.randn(pairs, device=DEVICE) - 30
    loss_fn = fastalign.DPOLoss(beta=0.1, loss_type=["sigmoid", "sft"], use_weighting=True)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with fastalign.use_backend(backend):
        out = loss_fn(hidden=leaves[0], weight=leaves[1], bias=leaves[2], labels=labels, completion_mask=mask,
                      ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
        grads = torch.autograd.grad(out.loss, leaves)
    leaves2 = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out2 = loss_fn(leaves2[0] @ leaves2[1].t() + leaves2[2], labels, mask, ref_chosen, ref_rejected)
    grads2 = torch.autograd.grad(out2.loss, leaves2)
    torch.testing.assert_close(out.loss, out2.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert out.metrics.keys() == out2.metrics.keys()
    with pytest.raises(ValueError, match="logits / hidden: pass either logits= or hidden="):
        loss_fn(hidden @ weight.t(), labels, hidden=hidden, weight=weight)
    with pytest.raises(ValueError, match="hidden / weight: the hidden-states level needs both"):
        loss_fn(hidden=hidden, labels=labels)
