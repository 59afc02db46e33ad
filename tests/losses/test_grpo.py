"""GRPO family, convention="trl": equal to TRL 1.16's own `GRPOTrainer._compute_loss`, called on a
stand-in trainer (tests/support/grpo_cases.py) that hands it log-probs computed from the same logits.

Loss, gradient w.r.t. the logits and every metric TRL logs are compared, on every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params
from grpo_cases import (
    CONFIGS, TEMPERATURE, B, T, V, assert_metrics_equal, loss_inputs, make_batch, split_config, trl_compute_loss,
)

import fastalign
from fastalign.grpo import grpo_loss
from fastalign.reference import token_logprobs as reference_token_logprobs

pytest.importorskip("trl.trainer.grpo_trainer")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_equals_trl_compute_loss(config, backend):
    if backend == "native" and not fastalign.available_backends("cpu")["native"][0]:
        pytest.skip("native backend not built")
    options, extras = split_config(config)
    logits, labels, mask, advantages, old, ref = make_batch()
    n_items = mask.sum()

    trl_logits = logits.clone().requires_grad_()
    fields = reference_token_logprobs(trl_logits, labels, temperature=TEMPERATURE, outputs=("entropy",))
    inputs, ours = loss_inputs(options, extras, labels, mask, advantages, old, ref, n_items)
    trl_loss, trl_metrics = trl_compute_loss(
        options, fields.logps, fields.entropy, {k: (v.double() if v.is_floating_point() else v)
                                                for k, v in inputs.items()}
    )
    (trl_grad,) = torch.autograd.grad(trl_loss, trl_logits)

    our_logits = logits.clone().requires_grad_()
    with fastalign.use_backend(backend):
        out = grpo_loss(our_logits, labels, temperature=TEMPERATURE, **options, **ours)
        (grad,) = torch.autograd.grad(out.loss, our_logits)
    assert float(out.loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-5, atol=1e-7)
    assert_metrics_equal(out.metrics, trl_metrics, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS[:11], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_logps_level_equals_logits_level(config):
    options, extras = split_config(config)
    logits, labels, mask, advantages, old, ref = make_batch(torch.float32)
    _, ours = loss_inputs(options, extras, labels, mask, advantages, old, ref, mask.sum())
    leaf = logits.clone().requires_grad_()
    out = grpo_loss(leaf, labels, temperature=TEMPERATURE, **options, **ours)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    leaf2 = logits.clone().requires_grad_()
    fields = fastalign.token_logprobs(leaf2, labels, temperature=TEMPERATURE, mask=mask, outputs=("entropy",))
    out2 = grpo_loss(logps=fields.logps, entropies=fields.entropy, **options, **ours)
    (grad2,) = torch.autograd.grad(out2.loss, leaf2)
    torch.testing.assert_close(out.loss, out2.loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad, grad2, rtol=1e-5, atol=1e-8)
    assert out.metrics.keys() == out2.metrics.keys()


VERL_CONFIGS = [
    dict(convention="verl", loss_type="vanilla", beta=0.01, kl_estimator="low_var_kl", entropy_coef=0.01),
    dict(convention="verl", loss_type="vanilla", loss_agg_mode="seq-mean-token-sum-norm", beta=0.01,
         kl_estimator="k3+"),
    dict(convention="verl", loss_type="gspo", loss_agg_mode="seq-mean-token-mean"),
    dict(convention="verl", loss_type="sapo", beta=0.01, kl_estimator="abs"),
    dict(convention="verl", loss_type="cispo", epsilon_high=0.28),
]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS + VERL_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gradient_matches_float64_truth(backend, dtype, config):
    from numerics import assert_as_accurate_as_reference

    options, extras = split_config(config)
    logits64, labels, mask, advantages, old, ref = make_batch(torch.float64)
    _, ours = loss_inputs(options, extras, labels, mask, advantages, old, ref, mask.sum())

    def run(logits, which):
        leaf = logits.clone().requires_grad_()
        with fastalign.use_backend(which):
            out = grpo_loss(leaf, labels, temperature=TEMPERATURE, **options, **ours)
            (grad,) = torch.autograd.grad(out.loss, leaf)
        return out.loss, grad

    truth_loss, truth_grad = run(logits64, "reference")
    ref_loss, ref_grad = run(logits64.to(dtype), "reference")
    loss, grad = run(logits64.to(dtype), backend)
    assert grad.dtype == dtype
    # VESPO's loss value reads each log-prob twice, in -A * l and through phi's summed log-ratio: a
    # last-bit difference between backends' log-probs moves a whole sequence's term (phi is
    # detached, so the gradient has no such path).
    ratio = 1.001 if options["loss_type"] == "vespo" else 1.0
    assert_as_accurate_as_reference(loss, ref_loss, truth_loss, "loss", ratio=ratio)
    assert_as_accurate_as_reference(grad, ref_grad, truth_grad, "grad")


def test_on_policy_ratio_is_one_with_the_policy_gradient():
    """Without old log-probs the ratio is 1 and the gradient is -A * dlogp (TRL's logp.detach())."""
    logits, labels, mask, advantages, _, _ = make_batch(torch.float32)
    leaf = logits.clone().requires_grad_()
    out = grpo_loss(leaf, labels, completion_mask=mask, advantages=advantages, loss_type="bnpo")
    (grad,) = torch.autograd.grad(out.loss, leaf)
    leaf2 = logits.clone().requires_grad_()
    logps = fastalign.token_logprobs(leaf2, labels, mask=mask).logps
    manual = -(advantages[:, None] * logps * mask).sum() / mask.sum()
    (grad2,) = torch.autograd.grad(manual, leaf2)
    torch.testing.assert_close(grad, grad2, rtol=1e-5, atol=1e-8)
    assert float(out.metrics["clip_ratio/region_mean"]) == 0.0


@pytest.mark.parametrize("backend", backend_params())
def test_all_masked_rows_and_batch_are_finite(backend):
    logits, labels, mask, advantages, old, ref = make_batch(torch.float32)
    mask[0] = 0
    leaf = logits.clone().requires_grad_()
    with fastalign.use_backend(backend):
        out = grpo_loss(leaf, labels, completion_mask=mask, advantages=advantages, old_logps=old, ref_logps=ref,
                        beta=0.04, loss_type="grpo")
        (grad,) = torch.autograd.grad(out.loss, leaf)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
        assert grad[0].abs().max() == 0
        none = torch.zeros_like(mask)
        out = grpo_loss(leaf, labels, completion_mask=none, advantages=advantages, old_logps=old, ref_logps=ref,
                        beta=0.04, loss_type="dapo", num_items_in_batch=0)
        (grad,) = torch.autograd.grad(out.loss, leaf)
    assert float(out.loss.detach()) == 0.0 and grad.abs().max() == 0


@pytest.mark.parametrize("backend", backend_params())
def test_beta_zero_needs_no_reference_and_matches_beta_zero_with_one(backend):
    logits, labels, mask, advantages, old, ref = make_batch(torch.float32)
    with fastalign.use_backend(backend):
        a = grpo_loss(logits, labels, completion_mask=mask, advantages=advantages, old_logps=old,
                      num_items_in_batch=mask.sum())
        b = grpo_loss(logits, labels, completion_mask=mask, advantages=advantages, old_logps=old, ref_logps=ref,
                      num_items_in_batch=mask.sum())
    assert float(a.loss) == float(b.loss) and "kl" not in a.metrics


def test_no_grad_and_frozen_logits_skip_the_gradient():
    logits, labels, mask, advantages, old, _ = make_batch(torch.float32)
    with torch.no_grad():
        out = grpo_loss(logits.requires_grad_(), labels, completion_mask=mask, advantages=advantages, old_logps=old,
                        num_items_in_batch=mask.sum())
    assert not out.loss.requires_grad
    frozen = grpo_loss(logits.detach(), labels, completion_mask=mask, advantages=advantages, old_logps=old,
                       num_items_in_batch=mask.sum())
    torch.testing.assert_close(out.loss, frozen.loss)


def test_scaled_backward_and_module():
    logits, labels, mask, advantages, old, ref = make_batch(torch.float32)
    loss_fn = fastalign.GRPOLoss(loss_type="dapo", epsilon_high=0.28, beta=0.04, temperature=TEMPERATURE)
    leaf = logits.clone().requires_grad_()
    out = loss_fn(logits=leaf, labels=labels, completion_mask=mask, advantages=advantages, old_logps=old,
                  ref_logps=ref, num_items_in_batch=mask.sum())
    (3 * out.loss).backward()
    leaf2 = logits.clone().requires_grad_()
    out2 = loss_fn(logits=leaf2, labels=labels, completion_mask=mask, advantages=advantages, old_logps=old,
                   ref_logps=ref, num_items_in_batch=mask.sum())
    out2.loss.backward()
    torch.testing.assert_close(leaf.grad, 3 * leaf2.grad)
    # Accumulates into an existing .grad like any autograd leaf.
    out3 = loss_fn(logits=leaf2, labels=labels, completion_mask=mask, advantages=advantages, old_logps=old,
                   ref_logps=ref, num_items_in_batch=mask.sum())
    out3.loss.backward()
    torch.testing.assert_close(leaf.grad, 1.5 * leaf2.grad)


def test_strided_logits_view_is_read_in_place():
    logits, labels, mask, advantages, old, _ = make_batch(torch.float32)
    padded = torch.cat([logits, torch.randn(B, 1, V, device=DEVICE)], dim=1).requires_grad_()
    view = padded[:, :-1]
    out = grpo_loss(view, labels, completion_mask=mask, advantages=advantages, old_logps=old,
                    num_items_in_batch=mask.sum())
    out.loss.backward()
    leaf = logits.clone().requires_grad_()
    ref_out = grpo_loss(leaf, labels, completion_mask=mask, advantages=advantages, old_logps=old,
                        num_items_in_batch=mask.sum())
    ref_out.loss.backward()
    torch.testing.assert_close(padded.grad[:, :-1], leaf.grad)
    assert padded.grad[:, -1].abs().max() == 0


def test_torch_compile_fullgraph_matches_eager():
    logits, labels, mask, advantages, old, ref = make_batch(torch.float32)

    def loss_of(leaf):
        return grpo_loss(leaf, labels, completion_mask=mask, advantages=advantages, old_logps=old, ref_logps=ref,
                         beta=0.04, num_items_in_batch=mask.sum(), temperature=TEMPERATURE).loss

    torch._dynamo.reset()
    compiled = torch.compile(loss_of, fullgraph=True)
    leaf = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(compiled(leaf), leaf)
    leaf2 = logits.clone().requires_grad_()
    (grad2,) = torch.autograd.grad(loss_of(leaf2), leaf2)
    torch.testing.assert_close(grad, grad2)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_wide_rows_with_masked_vocabulary_chunks(backend, softcap):
    """Rows wider than one kernel chunk, a whole chunk of -inf logits (vocabulary masking) and a
    label in the last, partial chunk: the gradient the forward writes equals the reference's."""
    rows, width = 3, 4500
    logits = torch.randn(2, rows, width, device=DEVICE) * 3
    logits[:, :, :2048] = float("-inf")
    logits[0, 1, 3000:] = float("-inf")
    labels = torch.tensor([[4400, 2100, 2500], [2049, 4499, 3000]], device=DEVICE)
    mask = torch.ones(2, rows, device=DEVICE)
    advantages = torch.tensor([0.8, -1.1], device=DEVICE)
    old = torch.full((2, rows), -8.0, device=DEVICE)
    ref = torch.full((2, rows), -7.5, device=DEVICE)
    kwargs = dict(completion_mask=mask, advantages=advantages, old_logps=old, ref_logps=ref, beta=0.04,
                  loss_type="grpo", entropy_coef=0.01, temperature=TEMPERATURE, softcap=softcap)

    def run(which):
        leaf = logits.clone().requires_grad_()
        with fastalign.use_backend(which):
            out = grpo_loss(leaf, labels, **kwargs)
            (grad,) = torch.autograd.grad(out.loss, leaf)
        return out.loss, grad

    ref_loss, ref_grad = run("reference")
    loss, grad = run(backend)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert grad[:, :, :2048].abs().max() == 0


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_vllm_importance_sampling_ratio_matches_trl(mode):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, the importance-sampling block."""
    _, _, mask, _, old, _ = make_batch(torch.float32)
    sampling = old + 0.4 * torch.randn_like(old)
    sampling[0, 1] = float("nan")
    clip_min, clip_max = 0.5, 1.5
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        expected = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        expected = ratio.masked_fill((ratio < clip_min) | (ratio > clip_max), value=0.0)
    got = fastalign.vllm_importance_sampling_ratio(old, sampling, completion_mask=mask, mode=mode, clip_min=clip_min,
                                                   clip_max=clip_max)
    torch.testing.assert_close(got, expected)
    with pytest.warns(DeprecationWarning, match="pass completion_mask=, mode=, clip_min=, clip_max= by keyword"):
        by_position = fastalign.vllm_importance_sampling_ratio(old, sampling, mask, mode, clip_min, clip_max)
    torch.testing.assert_close(by_position, expected)
    with pytest.raises(ValueError, match="mode: expected one of"):
        fastalign.vllm_importance_sampling_ratio(old, sampling, completion_mask=mask, mode="token")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_ratios_at_the_clip_edges_both_advantage_signs(backend, loss_type):
    """Ratios just inside and just outside 1 - eps_low and 1 + eps_high (and far outside), each with
    a positive and a negative advantage: every backend's gradient equals the reference's."""
    logits, labels, mask, _, _, ref = make_batch(torch.float32)
    with torch.no_grad():
        logps = fastalign.token_logprobs(logits, labels, temperature=TEMPERATURE).logps
    ratios = torch.tensor([0.8 - 1e-3, 0.8 + 1e-3, 1.28 - 1e-3, 1.28 + 1e-3, 1.0, 0.05, 20.0], device=DEVICE)
    old = logps - torch.log(ratios).repeat(B, 1)[:, :T]
    advantages = torch.tensor([[1.0], [-1.0], [0.5], [-2.0]], device=DEVICE).expand(B, T).contiguous()
    options = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28 if loss_type != "cispo" else 1.1,
                   beta=0.04, num_items_in_batch=mask.sum(), temperature=TEMPERATURE)

    def run(which):
        leaf = logits.clone().requires_grad_()
        with fastalign.use_backend(which):
            out = grpo_loss(leaf, labels, completion_mask=mask, advantages=advantages, old_logps=old,
                            ref_logps=ref, **options)
            (grad,) = torch.autograd.grad(out.loss, leaf)
        return out, grad

    ref_out, ref_grad = run("reference")
    out, grad = run(backend)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    for name, value in ref_out.metrics.items():
        torch.testing.assert_close(out.metrics[name], value, rtol=1e-5, atol=1e-6, equal_nan=True)
