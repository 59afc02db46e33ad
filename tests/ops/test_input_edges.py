"""Inputs at the edges: empty batches and dims, labels outside the vocabulary or equal to the
ignore index where a mask counts them. Each gives a defined result or an error naming the argument,
on every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params
from label_rules import refused_or_nan

import fastalign
from fastalign.grpo import grpo_loss
from fastalign.ppo import ppo_loss
from fastalign.rloo import rloo_loss

V, H = 11, 8


def policy_batch(B=2, T=4):
    logits = torch.randn(B, T, V, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    mask = torch.ones(B, T, device=DEVICE)
    return logits, labels, mask


def run_grpo(logits, labels, mask, **kw):
    B = labels.shape[0]
    return grpo_loss(logits, labels, completion_mask=mask, advantages=torch.ones(B, device=DEVICE),
                     old_logps=torch.full(labels.shape, -2.0, device=DEVICE), num_items_in_batch=mask.sum(), **kw)


def run_ppo(logits, labels, mask):
    return ppo_loss(logits, labels, completion_mask=mask, advantages=torch.ones(labels.shape, device=DEVICE),
                    old_logps=torch.full(labels.shape, -2.0, device=DEVICE))


def run_rloo(logits, labels, mask):
    B = labels.shape[0]
    return rloo_loss(logits, labels, completion_mask=mask, advantages=torch.ones(B, device=DEVICE),
                     old_logps=torch.full((B,), -8.0, device=DEVICE))


POLICY_LOSSES = {"grpo": run_grpo, "ppo": run_ppo, "rloo": run_rloo}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss", POLICY_LOSSES)
def test_policy_loss_on_an_empty_batch_names_the_input(backend, loss):
    logits = torch.randn(0, 4, V, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, 4, dtype=torch.long, device=DEVICE)
    with fastalign.use_backend(backend), pytest.raises(ValueError, match=r"^logits: the batch is empty"):
        POLICY_LOSSES[loss](logits, labels, torch.ones(0, 4, device=DEVICE))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss", POLICY_LOSSES)
@pytest.mark.parametrize("bad", [-100, V, -1])
def test_policy_loss_refuses_a_label_the_mask_counts_outside_the_vocabulary(backend, loss, bad):
    # -100 is token_logprobs' ignore index; in a policy loss completion_mask leaves tokens out, and
    # a -100 the mask counts used to get log-prob 0 and no gradient while still counting.
    logits, labels, mask = policy_batch()
    labels[1, 2] = bad
    with fastalign.use_backend(backend):
        refused_or_nan(lambda: POLICY_LOSSES[loss](logits, labels, mask), rf"^labels: .*found {bad} at position \(1, 2\)")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss", POLICY_LOSSES)
def test_a_label_the_mask_leaves_out_may_be_anything(backend, loss):
    logits, labels, mask = policy_batch()
    clean = POLICY_LOSSES[loss](logits, labels, mask * torch.tensor([1.0, 1.0, 0.0, 1.0], device=DEVICE))
    labels[:, 2] = torch.tensor([-100, 10**6], device=DEVICE)
    mask[:, 2] = 0
    with fastalign.use_backend(backend):
        out = POLICY_LOSSES[loss](logits, labels, mask)
    torch.testing.assert_close(out.loss, clean.loss)


@pytest.mark.parametrize("backend", backend_params())
def test_grpo_from_hidden_states_refuses_an_out_of_range_label(backend):
    hidden = torch.randn(2, 4, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE)
    labels = torch.randint(0, V, (2, 4), device=DEVICE)
    labels[0, 3] = V
    with fastalign.use_backend(backend):
        refused_or_nan(lambda: grpo_loss(hidden=hidden, weight=weight, labels=labels,
                                         completion_mask=torch.ones(2, 4, device=DEVICE),
                                         advantages=torch.ones(2, device=DEVICE), num_items_in_batch=8), r"^labels: ")


@pytest.mark.parametrize("backend", backend_params())
def test_linear_token_logprobs_refuses_an_out_of_range_label(backend):
    hidden = torch.randn(2, 3, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE)
    labels = torch.randint(0, V, (2, 3), device=DEVICE)
    labels[1, 1] = V + 4
    with fastalign.use_backend(backend):
        out = refused_or_nan(lambda: fastalign.linear_token_logprobs(hidden, weight, labels),
                             r"^labels: every value must lie in \[0, 11\)", nan_in=lambda out: out.logps[1, 1])
    if out is not None:  # on a GPU the other tokens are untouched
        assert torch.isfinite(out.logps.flatten()[torch.arange(6, device=DEVICE) != 4]).all()
    labels[1, 1] = -100  # the ignore index is fine
    with fastalign.use_backend(backend):
        assert fastalign.linear_token_logprobs(hidden, weight, labels).logps[1, 1] == 0


@pytest.mark.parametrize("backend", backend_params())
def test_an_empty_dim_in_a_non_contiguous_input_gives_the_empty_result(backend):
    logits = torch.randn(2, 2, 0, 5, device=DEVICE).transpose(0, 1)
    labels = torch.zeros(2, 2, 0, dtype=torch.long, device=DEVICE)
    with fastalign.use_backend(backend):
        out = fastalign.token_logprobs(logits, labels, outputs=("entropy",))
    assert out.logps.shape == (2, 2, 0) and out.entropy.shape == (2, 2, 0)
    hidden = torch.randn(2, 0, 3, H, device=DEVICE).transpose(0, 1)
    with fastalign.use_backend(backend):
        out = fastalign.linear_token_logprobs(hidden, torch.randn(V, H, device=DEVICE),
                                              torch.zeros(0, 2, 3, dtype=torch.long, device=DEVICE))
    assert out.logps.shape == (0, 2, 3)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("level", ["logits", "hidden"])
def test_a_second_derivative_through_a_one_pass_policy_loss_is_refused(backend, level):
    # The gradient is written by the forward pass: differentiating it again must not silently drop
    # the loss's term (a Hessian-vector product through grpo_loss + 0.5 |x|^2 used to return x).
    _, labels, mask = policy_batch()
    if level == "logits":
        x = torch.randn(2, 4, V, device=DEVICE, requires_grad=True)
        inputs = dict(logits=x, labels=labels)
    else:
        x = torch.randn(2, 4, H, device=DEVICE, requires_grad=True)
        inputs = dict(hidden=x, weight=torch.randn(V, H, device=DEVICE), labels=labels)
    with fastalign.use_backend(backend):
        out = grpo_loss(**inputs, completion_mask=mask, advantages=torch.ones(2, device=DEVICE),
                        old_logps=torch.full((2, 4), -2.0, device=DEVICE), num_items_in_batch=mask.sum())
        total = out.loss + 0.5 * (x * x).sum()
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(total, x, create_graph=True)
        torch.autograd.grad(total, x)  # first order as usual


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_label_whose_own_logit_is_minus_inf_has_log_prob_minus_inf(backend, dtype, temperature):
    logits = torch.randn(2, 3, V, device=DEVICE).to(dtype)
    labels = torch.randint(0, V, (2, 3), device=DEVICE)
    logits[0, 1, labels[0, 1]] = -float("inf")
    with fastalign.use_backend(backend):
        out = fastalign.token_logprobs(logits, labels, temperature=temperature, outputs=("entropy",))
    assert out.logps[0, 1] == -float("inf")
    assert torch.isfinite(out.logps.flatten()[[0, 2, 3, 4, 5]]).all() and torch.isfinite(out.entropy).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_discopop_stays_finite_for_a_large_negative_margin(dtype):
    # TRL's gate * exp(-x) is 0 * inf = NaN here; the true value is finite: for tau < 1 the
    # exponential term vanishes and the loss is the logistic one, -logsigmoid(x).
    policy = torch.tensor([-10.0, -10.0], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-12.0, -12.0], dtype=dtype, requires_grad=True)
    ref_c, ref_r = torch.tensor([-10.0, -10.0], dtype=dtype), torch.tensor([-5000.0, -5.0], dtype=dtype)
    out = fastalign.dpo_loss(policy, rejected, ref_c, ref_r, beta=0.1, loss_type="discopop", discopop_tau=0.05)
    assert torch.isfinite(out.loss)
    margin = 0.1 * ((policy - ref_c) - (rejected - ref_r)).detach()
    expected0 = -torch.nn.functional.logsigmoid(margin[0])  # x = -498.8: the logistic part alone
    def product_form(m):  # as TRL writes it
        return -torch.nn.functional.logsigmoid(m) * (1 - torch.sigmoid(m / 0.05)) + torch.sigmoid(m / 0.05) * torch.exp(-m)

    if dtype == torch.float32:
        assert torch.isnan(product_form(margin[0]))
    expected = torch.stack([expected0.double(), product_form(margin[1].double())]).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(out.loss, policy)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_a_frozen_lm_head_gets_no_weight_gradient_computed(backend, frozen, monkeypatch):
    # PEFT / LoRA training freezes the lm_head: its [V, H] gradient (a matmul and an fp32 buffer) must
    # not be computed only to be dropped. The backend is asked for exactly what autograd needs.
    from fastalign import linear_blocked
    from fastalign.reference import linear_logprobs as reference_linear

    name = "linear_token_logprobs_backward"
    if backend == "triton":  # its default "blocked" way (FASTALIGN_LINEAR_LOGPROBS)
        impl, name = linear_blocked, "linear_token_logprobs_backward_by_rows"
    else:
        impl = reference_linear if backend == "reference" else linear_blocked
    asked = []
    original = getattr(impl, name)

    def spy(*args, **kwargs):
        asked.append(args[-2:])
        return original(*args, **kwargs)

    monkeypatch.setattr(impl, name, spy)
    hidden = torch.randn(2, 3, H, device=DEVICE, requires_grad=frozen != "hidden")
    weight = torch.randn(V, H, device=DEVICE, requires_grad=frozen != "weight")
    bias = torch.randn(V, device=DEVICE, requires_grad=frozen != "weight")
    labels = torch.randint(0, V, (2, 3), device=DEVICE)
    with fastalign.use_backend(backend):
        out = fastalign.linear_token_logprobs(hidden, weight, labels, bias=bias, outputs=("entropy",))
        (out.logps.sum() + out.entropy.sum()).backward()
    assert asked == [(frozen != "hidden", frozen != "weight")]
    full_h, full_w, full_b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    with fastalign.use_backend(backend):
        out = fastalign.linear_token_logprobs(full_h, full_w, labels, bias=full_b, outputs=("entropy",))
        (out.logps.sum() + out.entropy.sum()).backward()
    if frozen == "weight":
        assert weight.grad is None and bias.grad is None
        torch.testing.assert_close(hidden.grad, full_h.grad)
    else:
        assert hidden.grad is None
        torch.testing.assert_close(weight.grad, full_w.grad)
        torch.testing.assert_close(bias.grad, full_b.grad)


@pytest.mark.parametrize("backend", backend_params())
def test_grpo_from_hidden_states_with_a_frozen_lm_head_skips_its_gradient(backend, monkeypatch):
    # The one-pass policy objective forms its gradients in the forward: with the lm_head frozen it
    # forms grad_hidden alone, equal to that of the full pass.
    from fastalign import _triton, linear_blocked
    from fastalign.reference import linear_logprobs as reference_linear

    impl = _triton if backend == "triton" else (
        reference_linear if backend == "reference" else linear_blocked)
    asked = []
    original = impl.linear_policy_token_forward

    def spy(*args, **kwargs):
        asked.append(args[18:20])
        return original(*args, **kwargs)

    monkeypatch.setattr(impl, "linear_policy_token_forward", spy)
    labels = torch.randint(0, V, (2, 4), device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE)
    results = []
    for train_head in (False, True):
        hidden = torch.randn(2, 4, H, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()
        w = weight.clone().requires_grad_(train_head)
        with fastalign.use_backend(backend):
            out = grpo_loss(hidden=hidden, weight=w, labels=labels, completion_mask=torch.ones(2, 4, device=DEVICE),
                            advantages=torch.tensor([1.0, -0.5], device=DEVICE),
                            old_logps=torch.full((2, 4), -2.0, device=DEVICE), num_items_in_batch=8)
            out.loss.backward()
        results.append(hidden.grad)
        assert (w.grad is not None) == train_head
    assert asked == [(True, False), (True, True)]
    torch.testing.assert_close(results[0], results[1])
