"""convention="verl" (GRPO family and PPO) against verl's own loss functions (verl 0.9.1,
tests/support/verl_policy.py), and PPO convention="trl" against TRL's PPOTrainer loss lines: loss,
gradient and metrics."""

from __future__ import annotations

import pytest
import peers
import torch
from conftest import DEVICE, backend_params

import fastalign

peers.require("verl")
import verl_policy as verl  # noqa: E402
from fastalign.reference import token_logprobs as reference_token_logprobs

B, T, V = 4, 7, 53


def make_batch():
    logits = (torch.randn(B, T, V, device=DEVICE) * 2).double()
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    mask = torch.ones(B, T, dtype=torch.float64, device=DEVICE)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    with torch.no_grad():
        logps = reference_token_logprobs(logits, labels).logps
    old = logps + 0.3 * torch.randn(B, T, device=DEVICE, dtype=torch.float64)
    old[0, :2] -= 1.5
    old[2, :2] += 1.5
    ref = logps + 0.3 * torch.randn(B, T, device=DEVICE, dtype=torch.float64)
    adv = torch.randn(B, T, device=DEVICE, dtype=torch.float64)
    return logits, labels, mask, adv, old, ref


def _verl_actor(mode, agg_mode, logps, entropy, mask, adv, old, ref, *, kl_coef, kl_type, entropy_coef, is_weights,
                agg):
    kwargs = dict(rollout_is_weights=is_weights, **agg)
    if mode == "vanilla":
        pg, metrics = verl.policy_loss_vanilla(old, logps, adv, mask, agg_mode, 0.2, 0.28, 3.0, **kwargs)
    elif mode == "gspo":
        pg, metrics = verl.policy_loss_gspo(old, logps, adv, mask, agg_mode, 0.2, 0.28, **kwargs)
    elif mode == "sapo":
        pg, metrics = verl.policy_loss_sapo(old, logps, adv, mask, agg_mode, 1.0, 1.05, **kwargs)
    else:
        pg, metrics = verl.policy_loss_cispo(old, logps, adv, mask, agg_mode, 0.2, 0.28, **kwargs)
    metrics = dict(metrics, **{"actor/pg_loss": pg})
    loss = pg
    if entropy_coef:
        entropy_loss = verl.agg_loss(entropy, mask, agg_mode, **agg)
        loss = loss - entropy_coef * entropy_loss
        metrics["actor/entropy_loss"] = entropy_loss
    if kl_coef:
        kl_loss = verl.agg_loss(verl.kl_penalty(logps, ref, kl_type), mask, agg_mode, **agg)
        loss = loss + kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss
        metrics["kl_coef"] = torch.tensor(kl_coef)
    return loss, metrics


CASES = [
    ("vanilla", "token-mean", dict()),
    ("vanilla", "seq-mean-token-mean", dict(kl_coef=0.01, kl_type="low_var_kl")),
    ("vanilla", "seq-mean-token-sum", dict(kl_coef=0.01, kl_type="k3+", entropy_coef=0.01)),
    ("vanilla", "seq-mean-token-sum-norm", dict(kl_coef=0.01, kl_type="abs")),
    ("vanilla", "token-sum", dict(kl_coef=0.01, kl_type="k1", is_weights=True)),
    ("vanilla", "token-mean", dict(dp=2, kl_coef=0.01, kl_type="mse")),
    ("vanilla", "seq-mean-token-mean", dict(dp=2, entropy_coef=0.02)),
    ("gspo", "seq-mean-token-mean", dict(kl_coef=0.01, kl_type="low_var_kl")),
    ("gspo", "token-mean", dict(is_weights=True)),
    ("sapo", "token-mean", dict(kl_coef=0.01, kl_type="low_var_kl", entropy_coef=0.01)),
    ("cispo", "token-mean", dict(kl_coef=0.01, kl_type="k2")),
]


@pytest.mark.parametrize("mode,agg_mode,extra", CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_grpo_equals_verl_actor_loss(mode, agg_mode, extra, backend):
    if backend == "native" and not fastalign.available_backends("cpu")["native"][0]:
        pytest.skip("native backend not built")
    logits, labels, mask, adv, old, ref = make_batch()
    kl_coef = extra.get("kl_coef", 0.0)
    entropy_coef = extra.get("entropy_coef", 0.0)
    is_weights = torch.rand(B, T, dtype=torch.float64) + 0.5 if extra.get("is_weights") else None
    agg = {}
    if extra.get("dp"):
        agg = dict(dp_size=2, batch_num_tokens=mask.sum() * 2, global_batch_size=2 * B)
    leaf = logits.clone().requires_grad_()
    fields = reference_token_logprobs(leaf, labels, outputs=("entropy",))
    theirs, their_metrics = _verl_actor(
        mode, agg_mode, fields.logps, fields.entropy, mask, adv, old, ref, kl_coef=kl_coef,
        kl_type=extra.get("kl_type", "low_var_kl"), entropy_coef=entropy_coef, is_weights=is_weights, agg=agg,
    )
    (their_grad,) = torch.autograd.grad(theirs, leaf)

    leaf2 = logits.clone().requires_grad_()
    with fastalign.use_backend(backend):
        out = fastalign.grpo_loss(
            leaf2, labels, completion_mask=mask, advantages=adv, old_logps=old, ref_logps=ref, convention="verl",
            loss_type=mode, epsilon=0.2, epsilon_high=0.28, loss_agg_mode=agg_mode, beta=kl_coef,
            kl_estimator=extra.get("kl_type", "low_var_kl"), entropy_coef=entropy_coef,
            importance_sampling_ratio=is_weights, dp_size=agg.get("dp_size", 1),
            batch_num_tokens=agg.get("batch_num_tokens"), global_batch_size=agg.get("global_batch_size"),
        )
        (grad,) = torch.autograd.grad(out.loss, leaf2)
    torch.testing.assert_close(out.loss.detach().double(), theirs.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, their_grad, rtol=1e-5, atol=1e-8)
    assert set(out.metrics) == set(their_metrics)
    for name, value in their_metrics.items():
        assert float(out.metrics[name]) == pytest.approx(float(value.detach()), rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_ppo_equals_verl_actor_and_critic(dual_clip, agg_mode, backend):
    if backend == "native" and not fastalign.available_backends("cpu")["native"][0]:
        pytest.skip("native backend not built")
    logits, labels, mask, adv, old, ref = make_batch()
    values = torch.randn(B, T, dtype=torch.float64)
    returns = values + 0.5 * torch.randn(B, T, dtype=torch.float64)
    vpreds = (values + 0.4 * torch.randn(B, T, dtype=torch.float64)).requires_grad_()
    leaf = logits.clone().requires_grad_()
    fields = reference_token_logprobs(leaf, labels, outputs=("entropy",))
    c = dual_clip if dual_clip is not None else float("inf")
    pg, pg_metrics = verl.policy_loss_vanilla(old, fields.logps, adv, mask, agg_mode, 0.2, 0.2, c)
    kl = verl.agg_loss(verl.kl_penalty(fields.logps, ref, "low_var_kl"), mask, agg_mode)
    entropy_loss = verl.agg_loss(fields.entropy, mask, agg_mode)
    vf_loss, vf_clipfrac = verl.value_loss(vpreds, returns, values, mask, 0.2, agg_mode)
    theirs = pg + 0.01 * kl - 0.02 * entropy_loss + 0.5 * vf_loss
    their_grad, their_vgrad = torch.autograd.grad(theirs, (leaf, vpreds))

    leaf2 = logits.clone().requires_grad_()
    vpreds2 = vpreds.detach().clone().requires_grad_()
    loss_fn = fastalign.PPOLoss(epsilon=0.2, dual_clip=dual_clip, kl_coef=0.01, kl_estimator="k3", entropy_coef=0.02,
                                vf_coef=0.5, value_clip=0.2, loss_agg_mode=agg_mode)
    with fastalign.use_backend(backend):
        out = loss_fn(leaf2, labels, completion_mask=mask, advantages=adv, old_logps=old, ref_logps=ref,
                      vpreds=vpreds2, values=values, returns=returns)
        grad, vgrad = torch.autograd.grad(out.loss, (leaf2, vpreds2))
    torch.testing.assert_close(out.loss.detach().double(), theirs.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, their_grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(vgrad, their_vgrad)
    assert float(out.metrics["pg_loss"]) == pytest.approx(float(pg.detach()), rel=1e-5)
    assert float(out.metrics["clipfrac"]) == pytest.approx(float(pg_metrics["actor/pg_clipfrac"]), abs=1e-6)
    assert float(out.metrics["ppo_kl"]) == pytest.approx(float(pg_metrics["actor/ppo_kl"]), rel=1e-5)
    lower = 0.0 if dual_clip is None else float(pg_metrics["actor/pg_clipfrac_lower"])
    assert float(out.metrics["pg_clipfrac_lower"]) == pytest.approx(lower, abs=1e-6)
    assert float(out.metrics["vf_loss"]) == pytest.approx(float(vf_loss), rel=1e-5)
    assert float(out.metrics["vf_clipfrac"]) == pytest.approx(float(vf_clipfrac), abs=1e-6)


def test_ppo_equals_trl_ppo_trainer_loss():
    """TRL PPOTrainer (0.x; removed in 1.x): pg_loss = masked_mean(max(pg1, pg2)), vf_loss =
    0.5 * masked_mean(max(vf1, vf2), value mask), loss = pg_loss + vf_coef * vf_loss."""
    logits, labels, mask, adv, old, _ = make_batch()
    values = torch.randn(B, T, dtype=torch.float64)
    returns = values + 0.5 * torch.randn(B, T, dtype=torch.float64)
    vpreds = values + 0.4 * torch.randn(B, T, dtype=torch.float64)
    value_mask = mask.clone()
    value_mask[1, 5] = 1  # TRL's padding_mask_p1 keeps one more position for the value head

    def masked_mean(x, m):
        return (x * m).sum() / m.sum()

    leaf = logits.clone().requires_grad_()
    new_logprobs = reference_token_logprobs(leaf, labels).logps
    vp = vpreds.clone().requires_grad_()
    vpredclipped = torch.clamp(vp, values - 0.2, values + 0.2)
    vf_losses1 = torch.square(vp - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), value_mask)
    logprobs_diff = new_logprobs - old
    ratio = torch.exp(logprobs_diff)
    pg_losses = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 0.8, 1.2)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    theirs = pg_loss + 0.1 * vf_loss
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
    their_grad, their_vgrad = torch.autograd.grad(theirs, (leaf, vp))

    leaf2 = logits.clone().requires_grad_()
    vp2 = vpreds.clone().requires_grad_()
    out = fastalign.ppo_loss(leaf2, labels, completion_mask=mask, advantages=adv, old_logps=old, vpreds=vp2,
                             values=values, returns=returns, value_mask=value_mask, convention="trl", epsilon=0.2,
                             value_clip=0.2, vf_coef=0.1)
    grad, vgrad = torch.autograd.grad(out.loss, (leaf2, vp2))
    torch.testing.assert_close(out.loss.detach().double(), theirs.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, their_grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(vgrad, their_vgrad)
    assert float(out.metrics["clipfrac"]) == pytest.approx(float(pg_clipfrac), abs=1e-6)
    assert float(out.metrics["approx_kl"]) == pytest.approx(float(masked_mean(0.5 * logprobs_diff**2, mask)), rel=1e-5)


def test_ppo_logps_level_without_value_head():
    logits, labels, mask, adv, old, _ = make_batch()
    leaf = logits.clone().requires_grad_()
    logps = fastalign.token_logprobs(leaf, labels, mask=mask).logps
    out = fastalign.ppo_loss(logps=logps, completion_mask=mask, advantages=adv, old_logps=old, dual_clip=3.0)
    out.loss.backward()
    leaf2 = logits.clone().requires_grad_()
    out2 = fastalign.ppo_loss(leaf2, labels, completion_mask=mask, advantages=adv, old_logps=old, dual_clip=3.0)
    out2.loss.backward()
    torch.testing.assert_close(leaf.grad, leaf2.grad)
    assert "vf_loss" not in out.metrics


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("convention", ["verl", "trl"])
def test_ppo_gradient_matches_float64_truth(backend, dtype, convention):
    from numerics import assert_as_accurate_as_reference

    logits64, labels, mask, adv, old, ref = make_batch()
    options = dict(convention=convention, epsilon=0.2, kl_coef=0.01, kl_estimator="k2", entropy_coef=0.01)
    if convention == "verl":
        options.update(dual_clip=3.0, kl_estimator="low_var_kl", loss_agg_mode="seq-mean-token-mean")

    def run(logits, which):
        leaf = logits.clone().requires_grad_()
        with fastalign.use_backend(which):
            out = fastalign.ppo_loss(leaf, labels, completion_mask=mask, advantages=adv, old_logps=old,
                                     ref_logps=ref, **options)
            (grad,) = torch.autograd.grad(out.loss, leaf)
        return out.loss, grad

    truth_loss, truth_grad = run(logits64, "reference")
    ref_loss, ref_grad = run(logits64.to(dtype), "reference")
    loss, grad = run(logits64.to(dtype), backend)
    assert_as_accurate_as_reference(loss, ref_loss, truth_loss, "loss")
    assert_as_accurate_as_reference(grad, ref_grad, truth_grad, "grad")


def test_rollout_is_weights_is_the_deprecated_name_of_importance_sampling_ratio():
    g = torch.Generator().manual_seed(3)
    logps = -torch.rand(2, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    common = dict(logps=logps, completion_mask=mask, advantages=torch.randn(2, generator=g, dtype=torch.float64),
                  old_logps=logps - 0.1)
    weights = torch.rand(2, 5, generator=g, dtype=torch.float64)
    want = fastalign.ppo_loss(**common, importance_sampling_ratio=weights)
    with pytest.warns(DeprecationWarning, match="rollout_is_weights= is deprecated; pass importance_sampling_ratio="):
        got = fastalign.ppo_loss(**common, rollout_is_weights=weights)
    assert torch.equal(got.loss, want.loss)
    assert not torch.equal(want.loss, fastalign.ppo_loss(**common).loss)
    with pytest.raises(ValueError, match="rollout_is_weights / importance_sampling_ratio"):
        fastalign.ppo_loss(**common, rollout_is_weights=weights, importance_sampling_ratio=weights)
