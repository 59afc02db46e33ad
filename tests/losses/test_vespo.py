"""VESPO (loss_type="vespo", arXiv 2602.10693) against TRL 1.16: the Gamma weight against TRL's
own `GRPOTrainer.get_gamma_weights` (a staticmethod, called directly), the loss against a port of
`GRPOTrainer._compute_loss`'s vespo branch (per_token_loss = -phi * A * logp over the
num_items_in_batch normalizer, the vLLM ratio folded into phi, `vespo/phi_seq_mean` as TRL's
global_masked_mean logs it), and every input level grpo_loss takes equal to the log-prob level."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE

import fastalign
from fastalign.vespo import gamma_weights

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
get_gamma_weights = grpo_trainer.GRPOTrainer.get_gamma_weights

PARAMS = st.sampled_from([
    dict(k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0),  # TRL's defaults
    dict(k_pos=0.5, lambda_pos=0.0, k_neg=0.0, lambda_neg=7.5),  # lambda 0 floors at 1e-4
    dict(k_pos=6.0, lambda_pos=1.0, k_neg=1.5, lambda_neg=0.25),
])


@st.composite
def batches(draw):
    """A padded batch as a trainer builds it: both advantage signs (and 0), per-sequence or
    per-token advantages, log-ratios from tiny to past TRL's +-20 clamp, rows without a counted
    token, a vLLM ratio that is absent, per token (0 where the sampler's window masks it, up to
    1e12) or per sequence, float32 or float64."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    b, t = draw(st.integers(1, 5)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).to(draw(st.sampled_from([torch.long, torch.float32])))
    adv = torch.randn(b, generator=g).mul(draw(st.sampled_from([1e-3, 1.0, 50.0])))
    adv[torch.rand(b, generator=g) < 0.2] = 0.0
    if draw(st.booleans()):
        adv = adv[:, None] * (1 + torch.rand(b, t, generator=g))  # per token, same sign along a row
    else:
        adv = adv[:, None]
    log_ratio = torch.randn(b, t, generator=g) * draw(st.sampled_from([1e-3, 0.3, 3.0, 30.0]))
    logps = -torch.rand(b, t, generator=g) * 5
    kind = draw(st.sampled_from([None, "token", "token", "sequence"]))
    ratio = None
    if kind == "token":
        ratio = torch.exp(torch.randn(b, t, generator=g) * draw(st.sampled_from([0.1, 2.0, 15.0])))
        ratio[torch.rand(b, t, generator=g) < 0.15] = 0.0  # token_mask's rejected tokens
        ratio = torch.where(mask != 0, ratio, 1.0)  # TRL's ratio is 1 off the completion
    elif kind == "sequence":
        ratio = torch.exp(torch.randn(b, 1, generator=g) * 3)
    cast = lambda x: None if x is None else x.to(DEVICE, dtype)  # noqa: E731
    return cast(adv), cast(log_ratio), mask.to(DEVICE), cast(ratio), cast(logps), draw(PARAMS)


@settings(max_examples=40, deadline=None)
@given(case=batches())
def test_gamma_weights_equal_trl_get_gamma_weights(case):
    """phi = exp(lambda + k log w - lambda w) of TRL's get_gamma_weights, clamps and NaN rule included."""
    adv, log_ratio, mask, ratio, _, params = case
    # TRL multiplies the padding by the mask: it may hold any finite value (or an infinity, clamped first).
    log_ratio = torch.where(mask != 0, log_ratio, -math.inf)
    want = get_gamma_weights(adv, log_ratio, mask, ratio, **params)
    got = gamma_weights(adv, log_ratio, mask, ratio, **params)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)
    assert not got.requires_grad


def _trl_vespo_branch(logps, old, adv, mask, ratio, n_items, params, ga=1, spg=1, processes=1):
    """GRPOTrainer._compute_loss, loss_type="vespo", beta=0, on one process: the loss and the
    vespo/phi_seq_mean it logs (global_masked_mean: per sequence when phi is [B, 1])."""
    phi = get_gamma_weights(adv, logps - old, mask, ratio, **params)
    per_token_loss = -phi * adv * logps
    normalizer = n_items.clamp(min=1.0) / processes * ga / spg
    loss = (per_token_loss * mask).sum() / normalizer
    if phi.shape[1] == 1:
        phi_mean = phi.sum() / max(phi.shape[0], 1)
    else:
        phi_mean = (phi * mask).sum() / mask.sum().float().clamp(min=1.0)
    return loss, phi_mean


@settings(max_examples=40, deadline=None)
@given(case=batches(), on_policy=st.booleans(), accumulation=st.sampled_from([(1, 1), (2, 4)]))
def test_loss_gradient_and_metric_equal_trl_vespo_branch(case, on_policy, accumulation):
    adv, log_ratio, mask, ratio, logps, params = case
    ga, spg = accumulation
    old = logps.detach() if on_policy else logps - log_ratio
    n_items = mask.sum().to(logps.dtype) * 2
    leaf = logps.clone().requires_grad_()
    want, want_phi = _trl_vespo_branch(leaf, old, adv, mask, ratio, n_items, params, ga, spg)
    (want_grad,) = torch.autograd.grad(want, leaf)
    leaf = logps.clone().requires_grad_()
    out = fastalign.grpo_loss(
        logps=leaf, completion_mask=mask, advantages=adv, old_logps=None if on_policy else old,
        importance_sampling_ratio=ratio, num_items_in_batch=n_items, loss_type="vespo",
        gradient_accumulation_steps=ga, steps_per_generation=spg, **{f"vespo_{k}": v for k, v in params.items()},
    )
    (grad,) = torch.autograd.grad(out.loss, leaf)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out.metrics["vespo/phi_seq_mean"], want_phi.float(), rtol=1e-5, atol=1e-7)
    assert not any(name.startswith(("clip_ratio", "cispo")) for name in out.metrics)


def _level_inputs(level, dtype):
    g = torch.Generator().manual_seed(3)
    b, t, h, v = 3, 6, 8, 40
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    adv = torch.tensor([0.8, -1.1, 0.4], dtype=torch.float64)
    with torch.no_grad():
        logps = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, labels[..., None])[..., 0]
    old = logps + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ratio = torch.where(mask != 0, torch.rand(b, t, generator=g, dtype=torch.float64) + 0.5, 1.0)
    to = lambda x: x.to(DEVICE, dtype)  # noqa: E731
    source = dict(hidden=to(hidden), weight=to(weight)) if level == "hidden" else dict(logits=to(hidden @ weight.t()))
    return source, labels.to(DEVICE), mask.to(DEVICE), to(adv), to(old), to(ratio)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("on_policy", [True, False], ids=["on-policy-fused", "old-logps-two-pass"])
@pytest.mark.parametrize("level", ["logits", "hidden"])
def test_every_input_level_equals_the_logps_level(level, on_policy, backend):
    """From logits or hidden states (on-policy: phi known up front, the fused pass; with old
    log-probs: the two passes), the loss, gradient and metrics of the log-prob level."""
    if backend == "native" and not fastalign.available_backends("cpu")["native"][0]:
        pytest.skip("native backend not built")
    # float32, as trainers call it (from logits the per-token inputs are taken in float32).
    source, labels, mask, adv, old, ratio = _level_inputs(level, torch.float32)
    options = dict(completion_mask=mask, advantages=adv, old_logps=None if on_policy else old,
                   importance_sampling_ratio=ratio, num_items_in_batch=mask.sum(), loss_type="vespo",
                   beta=0.04, ref_logps=old + 0.1, vespo_k_pos=1.5)
    leaves = {k: x.clone().requires_grad_() for k, x in source.items()}
    with fastalign.use_backend(backend):
        out = fastalign.grpo_loss(labels=labels, **leaves, **options)
        grads = torch.autograd.grad(out.loss, list(leaves.values()))
    ref_leaves = {k: x.clone().requires_grad_() for k, x in source.items()}
    logits = ref_leaves["logits"] if level == "logits" else ref_leaves["hidden"] @ ref_leaves["weight"].t()
    fields = fastalign.reference.token_logprobs(logits, labels, outputs=("entropy",))
    want = fastalign.grpo_loss(logps=fields.logps, entropies=fields.entropy, **options)
    want_grads = torch.autograd.grad(want.loss, list(ref_leaves.values()))
    # fp32 rounding (the hidden level's own matmul blocks) only.
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-8)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)
    assert out.metrics.keys() == want.metrics.keys()
    for name, value in want.metrics.items():
        torch.testing.assert_close(out.metrics[name], value, rtol=1e-6, atol=1e-9, msg=name)


def test_phi_weighs_each_sequence_as_its_importance_weight_says():
    """phi(w) = e^lambda w^k e^(-lambda w) with TRL's default (k, lambda) per advantage sign, phi(1) = 1,
    and a sequence's whole gradient scaled by it: -phi * A * dlogp / N, the vLLM ratio counted in w."""
    logps = torch.full((3, 2), -1.0, device=DEVICE, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 2, device=DEVICE)
    adv = torch.tensor([1.0, 1.0, -1.0], device=DEVICE, dtype=torch.float64)
    old = torch.tensor([[-1.0, -1.0], [-1.2, -1.0], [-1.0, -1.0]], device=DEVICE, dtype=torch.float64)
    ratio = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 1.0]], device=DEVICE, dtype=torch.float64)
    out = fastalign.grpo_loss(logps=logps, completion_mask=mask, advantages=adv, old_logps=old,
                              importance_sampling_ratio=ratio, loss_type="vespo", num_items_in_batch=6)
    (grad,) = torch.autograd.grad(out.loss, logps)
    w = torch.tensor([1.0, math.exp(0.2), 2.0], dtype=torch.float64)
    k, lam = torch.tensor([2.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([3.0, 3.0, 2.0], dtype=torch.float64)
    phi = torch.exp(lam) * w**k * torch.exp(-lam * w)
    assert float(phi[0]) == pytest.approx(1.0)
    want = (-phi * adv.cpu() / 6)[:, None].expand(3, 2)
    torch.testing.assert_close(grad.cpu(), want, rtol=1e-12, atol=0)
    assert float(out.metrics["vespo/phi_seq_mean"]) == pytest.approx(float(phi.mean()), rel=1e-6)
