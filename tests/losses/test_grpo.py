"""GRPO family, convention="trl": equal to TRL 1.16's own `GRPOTrainer._compute_loss`, called on a
stand-in trainer that hands it log-probs computed from the same logits.

Loss, gradient w.r.t. the logits and every metric TRL logs are compared, on every backend."""

from __future__ import annotations

import collections
import math
import types

import pytest
import torch
from conftest import DEVICE, backend_params

import fastalign
from fastalign.grpo import grpo_loss
from fastalign.reference import token_logprobs as reference_token_logprobs

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
GRPOTrainer = trl_grpo.GRPOTrainer

B, T, V = 4, 7, 61
TEMPERATURE = 0.9


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def trl_compute_loss(config: dict, logps, entropies, inputs, compute_loss=None):
    """TRL's `_compute_loss` (or `compute_loss`, a replacement with its signature) on a stand-in
    holding exactly the attributes it reads."""
    ga = config.get("gradient_accumulation_steps", 1)
    epsilon = config.get("epsilon", 0.2)
    trainer = types.SimpleNamespace(
        loss_type=config.get("loss_type", "dapo"),
        beta=config.get("beta", 0.0),
        epsilon_low=epsilon,
        epsilon_high=config.get("epsilon_high", epsilon),
        importance_sampling_level=config.get("importance_sampling_level", "token"),
        top_entropy_quantile=config.get("top_entropy_quantile", 1.0),
        off_policy_mask_threshold=config.get("off_policy_mask_threshold"),
        use_vllm="importance_sampling_ratio" in inputs,
        vllm_importance_sampling_correction=True,
        aux_loss_enabled=False,
        entropy_coef=config.get("entropy_coef", 0.0),
        _entropy_bonus_enabled=config.get("entropy_coef", 0.0) != 0,
        use_adaptive_entropy=False,
        max_completion_length=config.get("max_completion_length"),
        current_gradient_accumulation_steps=ga,
        accelerator=_Accelerator(),
        model=types.SimpleNamespace(training=True),
        args=types.SimpleNamespace(
            use_bias_correction_kl=config.get("use_bias_correction_kl", True),
            delta=config.get("delta"),
            sapo_temperature_pos=config.get("sapo_temperature_pos", 1.0),
            sapo_temperature_neg=config.get("sapo_temperature_neg", 1.05),
            steps_per_generation=config.get("steps_per_generation", ga),
        ),
        _metrics={"train": collections.defaultdict(list)},
    )
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropies, None)
    trainer.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, trainer)
    trainer.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
    loss = (compute_loss or GRPOTrainer._compute_loss)(trainer, None, inputs)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def make_batch(dtype=torch.float64, advantages_scale=1.0, drift=0.3):
    """A right-padded completion batch; old/ref log-probs drift from the policy's so that ratios
    land inside and far outside the clip range; advantages of both signs."""
    logits = (torch.randn(B, T, V, device=DEVICE) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    mask = torch.ones(B, T, device=DEVICE, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    with torch.no_grad():
        logps = reference_token_logprobs(logits.double(), labels, temperature=TEMPERATURE).logps.float()
    old = logps + drift * torch.randn(B, T, device=DEVICE)
    old[0, :3] = logps[0, :3] - 1.5  # ratio e^1.5: far above 1 + eps
    old[3, :2] = logps[3, :2] + 1.5  # far below 1 - eps
    ref = logps + 0.2 * torch.randn(B, T, device=DEVICE)
    advantages = torch.tensor([1.0, -0.5, 0.7, -1.2], device=DEVICE) * advantages_scale
    return logits, labels, mask, advantages, old, ref


CONFIGS = [
    dict(loss_type="grpo"),
    dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False),
    dict(loss_type="grpo", beta=0.04, delta=1.5),
    dict(loss_type="bnpo", beta=0.04),
    dict(loss_type="dr_grpo", max_completion_length=9, gradient_accumulation_steps=2),
    dict(loss_type="dapo", epsilon_high=0.28),
    dict(loss_type="dapo", epsilon_high=0.28, beta=0.04, gradient_accumulation_steps=2, steps_per_generation=4),
    dict(loss_type="dapo", beta=0.04, on_policy=True),
    dict(loss_type="cispo", epsilon_high=5.0, beta=0.02),
    dict(loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
    dict(loss_type="luspo", beta=0.04),
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.04),
    dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.01),
    dict(loss_type="grpo", entropy_coef=0.05, beta=0.04),
    dict(loss_type="dapo", off_policy_mask_threshold=0.05, sampling=True),
    dict(loss_type="dapo", is_ratio="token"),
    dict(loss_type="grpo", is_ratio="sequence", beta=0.04),
]


def _split(config):
    options = dict(config)
    extras = {key: options.pop(key, None) for key in ("on_policy", "sampling", "is_ratio")}
    return options, extras


def _inputs(config, extras, labels, mask, advantages, old, ref, n_items):
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long, device=DEVICE),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long, device=DEVICE),
        "completion_ids": labels,
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": n_items,
    }
    ours = {"completion_mask": mask, "advantages": advantages, "num_items_in_batch": n_items}
    if not extras["on_policy"]:
        inputs["old_per_token_logps"] = old
        ours["old_logps"] = old
    if config.get("beta", 0):
        inputs["ref_per_token_logps"] = ref
        ours["ref_logps"] = ref
    if extras["sampling"]:
        sampling = old + 0.1 * torch.randn_like(old)
        inputs["sampling_per_token_logps"] = sampling
        ours["sampling_logps"] = sampling
    if extras["is_ratio"] == "token":
        ratio = torch.rand(B, T, device=DEVICE) + 0.5
        inputs["importance_sampling_ratio"] = ours["importance_sampling_ratio"] = ratio
    elif extras["is_ratio"] == "sequence":
        ratio = torch.rand(B, 1, device=DEVICE) + 0.5
        inputs["importance_sampling_ratio"] = ours["importance_sampling_ratio"] = ratio
    return inputs, ours


def _assert_metrics_equal(ours: dict, theirs: dict, atol: float):
    assert set(ours) == set(theirs), f"metric names differ: {sorted(ours)} vs {sorted(theirs)}"
    for name, value in theirs.items():
        mine = float(ours[name])
        if math.isnan(value):
            assert math.isnan(mine), name
        else:
            assert mine == pytest.approx(value, abs=atol, rel=1e-5), name


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_equals_trl_compute_loss(config, backend):
    if backend == "native" and not fastalign.available_backends("cpu")["native"][0]:
        pytest.skip("native backend not built")
    options, extras = _split(config)
    logits, labels, mask, advantages, old, ref = make_batch()
    n_items = mask.sum()

    trl_logits = logits.clone().requires_grad_()
    fields = reference_token_logprobs(trl_logits, labels, temperature=TEMPERATURE, outputs=("entropy",))
    inputs, ours = _inputs(options, extras, labels, mask, advantages, old, ref, n_items)
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
    _assert_metrics_equal(out.metrics, trl_metrics, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS[:11], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_logps_level_equals_logits_level(config):
    options, extras = _split(config)
    logits, labels, mask, advantages, old, ref = make_batch(torch.float32)
    _, ours = _inputs(options, extras, labels, mask, advantages, old, ref, mask.sum())
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

    options, extras = _split(config)
    logits64, labels, mask, advantages, old, ref = make_batch(torch.float64)
    _, ours = _inputs(options, extras, labels, mask, advantages, old, ref, mask.sum())

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
    assert_as_accurate_as_reference(loss, ref_loss, truth_loss, "loss")
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
    got = fastalign.vllm_importance_sampling_ratio(old, sampling, mask, mode, clip_min, clip_max)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="mode: expected one of"):
        fastalign.vllm_importance_sampling_ratio(old, sampling, mask, "token")


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
