"""rloo_loss: equal to TRL 1.16's own `RLOOTrainer._compute_loss`, called on a stand-in trainer
that hands it log-probs computed from the same logits.

Loss, gradient w.r.t. the logits and every metric TRL logs are compared at the logits level (on
every backend) and at the log-probs level (what the TRL integration passes)."""

from __future__ import annotations

import collections
import math
import types

import pytest
import torch
from conftest import DEVICE, backend_params

import fastalign
from fastalign import rloo_loss
from fastalign.reference import token_logprobs as reference_token_logprobs

trl_rloo = pytest.importorskip("trl.trainer.rloo_trainer")
RLOOTrainer = trl_rloo.RLOOTrainer

B, T, V = 6, 7, 61
TEMPERATURE = 0.9
# Per-sequence log-ratios and advantages that put every case of the clipped surrogate in the batch:
# high-clipped (r = 1.65, A > 0), inside, low-clipped (r = 0.41, A < 0), inside at eps 0.2 but
# clipped at eps 0.1 (r = 1.16), and r outside the range on the side where the unclipped term wins.
LOG_RATIOS = [0.5, -0.05, -0.9, 0.15, 0.5, -0.9]
ADVANTAGES = [1.0, -0.5, -1.2, 0.7, -0.8, 0.6]


class _Accelerator:
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_compute_loss(logps, entropies, inputs, epsilon=0.2, epsilon_high=None):
    """TRL's `_compute_loss` on a stand-in holding exactly the attributes it reads."""
    trainer = types.SimpleNamespace(
        epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        aux_loss_enabled=False,
        accelerator=_Accelerator(),
        model=types.SimpleNamespace(training=True),
        _metrics={"train": collections.defaultdict(list)},
    )
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropies, None)
    loss = RLOOTrainer._compute_loss(trainer, None, inputs)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def make_batch(dtype=torch.float64):
    """Right-padded completions (one partial, one of a single token); old log-probs summed per
    sequence so that the ratios are exp(LOG_RATIOS)."""
    logits = (torch.randn(B, T, V, device=DEVICE) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    mask = torch.ones(B, T, device=DEVICE, dtype=torch.long)
    mask[2, 4:] = 0
    mask[5, 1:] = 0
    with torch.no_grad():
        logps = reference_token_logprobs(logits.double(), labels, temperature=TEMPERATURE).logps
    summed = (logps * mask).sum(-1)
    old = (summed - torch.tensor(LOG_RATIOS, device=DEVICE, dtype=torch.float64)).float()
    advantages = torch.tensor(ADVANTAGES, device=DEVICE)
    return logits, labels, mask, advantages, old


CONFIGS = [
    dict(),
    dict(epsilon_high=0.28),
    dict(epsilon=0.1, epsilon_high=0.3),
    dict(on_policy=True),
]


def _trl_reference(logits, labels, mask, advantages, old, config):
    """(loss, grad w.r.t. logits, metrics) of TRL's own code, in float64."""
    leaf = logits.clone().requires_grad_()
    fields = reference_token_logprobs(leaf, labels, temperature=TEMPERATURE, outputs=("entropy",))
    if config.get("on_policy"):
        old = (fields.logps * mask).sum(-1).detach()  # TRL recomputes them: the ratio is exactly 1
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long, device=DEVICE),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long, device=DEVICE),
        "completion_ids": labels,
        "completion_mask": mask,
        "advantages": advantages.double(),
        "old_logps": old.double(),
    }
    loss, metrics = trl_compute_loss(fields.logps, fields.entropy, inputs, config.get("epsilon", 0.2),
                                     config.get("epsilon_high"))
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss, grad, metrics


def _options(config):
    return {k: v for k, v in config.items() if k != "on_policy"}


def _assert_metrics_equal(ours: dict, theirs: dict, atol: float = 1e-6):
    assert set(ours) == set(theirs), f"metric names differ: {sorted(ours)} vs {sorted(theirs)}"
    for name, value in theirs.items():
        mine = float(ours[name])
        if math.isnan(value):
            assert math.isnan(mine), name
        else:
            assert mine == pytest.approx(value, abs=atol, rel=1e-5), name


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("backend", backend_params())
def test_equals_trl_compute_loss_from_logits(config, backend):
    logits, labels, mask, advantages, old = make_batch()
    trl_loss, trl_grad, trl_metrics = _trl_reference(logits, labels, mask, advantages, old, config)
    if not config.get("on_policy"):
        # The batch exercises both clip sides, so the metrics below can disagree.
        assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0

    # Triton kernels take float32 at most; the others run TRL's float64.
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-5, atol=1e-7)
    leaf = logits.to(dtype).requires_grad_()
    with fastalign.use_backend(backend):
        out = rloo_loss(leaf, labels, completion_mask=mask, advantages=advantages,
                        old_logps=None if config.get("on_policy") else old, temperature=TEMPERATURE,
                        **_options(config))
        (grad,) = torch.autograd.grad(out.loss, leaf)
    assert float(out.loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=tol["rtol"], abs=tol["atol"])
    torch.testing.assert_close(grad.double(), trl_grad, **tol)
    assert grad.abs().max() > 0
    _assert_metrics_equal(out.metrics, trl_metrics, atol=1e-5 if dtype == torch.float32 else 1e-6)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_trl_compute_loss_from_logps(config, dtype):
    """What the TRL integration passes: TRL's per-token log-probs and entropies, summed old log-probs."""
    logits, labels, mask, advantages, old = make_batch()
    trl_loss, trl_grad, trl_metrics = _trl_reference(logits, labels, mask, advantages, old, config)

    leaf = logits.to(dtype).requires_grad_()
    fields = reference_token_logprobs(leaf, labels, temperature=TEMPERATURE, outputs=("entropy",))
    out = rloo_loss(logps=fields.logps, entropies=fields.entropy, completion_mask=mask, advantages=advantages,
                    old_logps=None if config.get("on_policy") else old, **_options(config))
    (grad,) = torch.autograd.grad(out.loss, leaf)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    assert float(out.loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=tol["rtol"], abs=tol["atol"])
    torch.testing.assert_close(grad.double(), trl_grad, **tol)
    _assert_metrics_equal(out.metrics, trl_metrics, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_hidden_states_level_equals_logits_level(backend):
    _, labels, mask, advantages, old = make_batch()
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-8)
    hidden = torch.randn(B, T, 16, device=DEVICE, dtype=dtype)
    weight = torch.randn(V, 16, device=DEVICE, dtype=dtype) * 0.5
    bias = torch.randn(V, device=DEVICE, dtype=dtype)
    kwargs = dict(completion_mask=mask, advantages=advantages, old_logps=old, epsilon_high=0.28,
                  temperature=TEMPERATURE)

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with fastalign.use_backend(backend):
        out = rloo_loss(hidden=leaves[0], weight=leaves[1], bias=leaves[2], labels=labels, **kwargs)
    grads = torch.autograd.grad(out.loss, leaves)
    plain = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    expected = rloo_loss(plain[0] @ plain[1].t() + plain[2], labels, **kwargs)
    expected_grads = torch.autograd.grad(expected.loss, plain)
    torch.testing.assert_close(out.loss, expected.loss, **tol)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **tol)
    _assert_metrics_equal(out.metrics, {k: float(v) for k, v in expected.metrics.items()})


def test_sum_not_mean_sets_the_ratio():
    """The ratio is exp of the summed log-ratio: with every token's log-prob shifted by d, a
    sequence of n tokens has r = exp(n d) (GRPO's sequence level would give exp(d))."""
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], device=DEVICE)
    logps = torch.full((2, 4), -1.0, device=DEVICE, dtype=torch.float64, requires_grad=True)
    old = ((logps.detach() - 0.1) * mask).sum(-1)
    advantages = torch.tensor([1.0, 1.0], device=DEVICE)
    out = rloo_loss(logps=logps, completion_mask=mask, advantages=advantages, old_logps=old, epsilon_high=1.0)
    ratios = torch.exp(torch.tensor([0.4, 0.2], dtype=torch.float64))
    torch.testing.assert_close(out.loss, -ratios.mean().to(out.loss))
    (grad,) = torch.autograd.grad(out.loss, logps)
    torch.testing.assert_close(grad, -(ratios[:, None] / 2 * mask).to(grad))


def test_gather_makes_the_metrics_global():
    """Two processes, simulated: each one's gather hands back both halves, so the metrics equal
    the whole batch's while the loss stays this process's."""
    logits, labels, mask, advantages, old = make_batch(torch.float32)
    fields = reference_token_logprobs(logits, labels, temperature=TEMPERATURE, outputs=("entropy",))

    def run(rows, gather=None):
        return rloo_loss(logps=fields.logps[rows], entropies=fields.entropy[rows], completion_mask=mask[rows],
                         advantages=advantages[rows], old_logps=old[rows], gather=gather)

    first, second = slice(0, 2), slice(2, B)  # unequal lengths, as gather_for allows
    sent = []
    run(second, gather=lambda t: sent.append(t) or t)
    received = iter(sent)
    out = run(first, gather=lambda t: torch.cat([t, next(received)]))
    whole = run(slice(0, B))
    _assert_metrics_equal(out.metrics, {k: float(v) for k, v in whole.metrics.items()})
    torch.testing.assert_close(out.loss, run(first).loss)
    assert float(run(first).metrics["clip_ratio/low_mean"]) != float(whole.metrics["clip_ratio/low_mean"])


def test_uncounted_positions_never_leak():
    """An inf log-prob where the mask is 0 changes nothing (TRL's logps * mask would give NaN)."""
    logits, labels, mask, advantages, old = make_batch(torch.float32)
    logps = reference_token_logprobs(logits, labels).logps
    kwargs = dict(completion_mask=mask, advantages=advantages, old_logps=old)
    clean = rloo_loss(logps=logps, **kwargs)
    dirty = rloo_loss(logps=logps.masked_fill(mask == 0, float("-inf")), **kwargs)
    torch.testing.assert_close(dirty.loss, clean.loss)
    assert "entropy" not in clean.metrics  # no entropies given at the log-probs level


def test_module_checks_at_construction_and_equals_function():
    logits, labels, mask, advantages, old = make_batch(torch.float32)
    loss_fn = fastalign.RLOOLoss(epsilon=0.1, epsilon_high=0.3, temperature=TEMPERATURE)
    kwargs = dict(completion_mask=mask, advantages=advantages, old_logps=old)
    out = loss_fn(logits=logits, labels=labels, **kwargs)
    expected = rloo_loss(logits, labels, epsilon=0.1, epsilon_high=0.3, temperature=TEMPERATURE, **kwargs)
    torch.testing.assert_close(out.loss, expected.loss)
    with pytest.raises(ValueError, match=r"epsilon: expected a clipping range in \(0, 1\), got 1.5"):
        fastalign.RLOOLoss(epsilon=1.5)
    with pytest.raises(ValueError, match=r"temperature: expected a finite number > 0"):
        fastalign.RLOOLoss(temperature=0.0)


def _error_cases():
    b, t = B, T
    return [
        (dict(old_logps=torch.zeros(b, t)), ValueError,
         rf"old_logps: expected shape \({b},\) or \({b}, 1\), the rollout's completion log-probs summed per sequence"),
        (dict(old_logps=torch.zeros(b, dtype=torch.long)), TypeError, r"old_logps: expected a floating-point tensor"),
        (dict(old_logps=[0.0] * b), TypeError, r"old_logps: expected a torch.Tensor, got list"),
        (dict(advantages=torch.zeros(b, t)), ValueError, rf"advantages: expected shape \({b},\) or \({b}, 1\)"),
        (dict(advantages=torch.zeros(b + 1)), ValueError, r"advantages: expected shape"),
        (dict(completion_mask=torch.ones(b, t + 1)), ValueError, r"completion_mask: expected shape"),
        (dict(epsilon=0.0), ValueError, r"epsilon: expected a clipping range in \(0, 1\)"),
        (dict(epsilon_high=-0.1), ValueError, r"epsilon_high: expected a finite number > 0"),
        (dict(epsilon_high=True), TypeError, r"epsilon_high: expected a number"),
        (dict(entropies=torch.zeros(b, t + 1)), ValueError, r"entropies: expected shape"),
        (dict(logits=torch.zeros(b, t, V)), ValueError, r"logits / hidden / logps: pass exactly one input level"),
        (dict(labels=torch.zeros(b, t, dtype=torch.long)), ValueError, r"labels: only used with logits"),
        (dict(logps=torch.zeros(b, t, dtype=torch.long)), ValueError, r"logps: expected a float tensor"),
    ]


@pytest.mark.parametrize("change, error, match", _error_cases())
def test_input_errors_name_the_argument(change, error, match):
    kwargs = dict(logps=torch.zeros(B, T), completion_mask=torch.ones(B, T), advantages=torch.zeros(B),
                  old_logps=torch.zeros(B))
    kwargs.update(change)
    with pytest.raises(error, match=match):
        rloo_loss(**{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})


def test_entropies_only_with_logps():
    logits, labels, mask, advantages, old = make_batch(torch.float32)
    with pytest.raises(ValueError, match=r"entropies: only used with logps"):
        rloo_loss(logits, labels, entropies=torch.zeros(B, T, device=DEVICE), completion_mask=mask,
                  advantages=advantages, old_logps=old)
