"""CPO / SimPO / AlphaPO: TRL's own CPOTrainer code, a float64 eager ground truth on every backend,
properties, empty completions and argument errors."""

from __future__ import annotations

import math
import os
import types

import pytest
import torch
from conftest import DEVICE, backend_params
from trl_batches import paired_trainer_batch
from numerics import assert_as_accurate_as_reference

import fastalign
from fastalign.cpo import CPOLoss, cpo_loss, cpo_loss_from_logits

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
CPOTrainer = cpo_trainer.CPOTrainer

B, T, V = 2, 6, 97
CONFIGS = {
    "sigmoid": {"loss_type": "sigmoid"},
    "sigmoid-smoothing": {"loss_type": "sigmoid", "label_smoothing": 0.2, "beta": 0.3},
    "hinge": {"loss_type": "hinge", "beta": 0.05},
    "ipo": {"loss_type": "ipo", "beta": 0.5},
    "simpo": {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.7},
    "simpo-no-nll": {"loss_type": "simpo", "beta": 2.0, "cpo_alpha": 0.0},
    "alphapo": {"loss_type": "alphapo", "beta": 2.5, "alpha": 0.25, "label_smoothing": 0.1},
    "sigmoid-alpha": {"loss_type": "sigmoid", "alpha": -0.05, "cpo_alpha": 0.5},
}


def trl_attributes(config: dict) -> dict:
    """The CPOTrainer attributes `cpo_loss` and `concatenated_forward` read, as CPOConfig sets them."""
    loss_type = config.get("loss_type", "sigmoid")
    alphapo = loss_type == "alphapo"
    return {
        "beta": config.get("beta", 0.1),
        "label_smoothing": config.get("label_smoothing", 0.0),
        "loss_type": "simpo" if alphapo else loss_type,
        "cpo_alpha": config.get("cpo_alpha", 0.0 if alphapo else 1.0),
        "simpo_gamma": config.get("simpo_gamma", 0.5),
        "alpha": config.get("alpha", 0.0),
    }


def trl_trainer(config: dict, device=DEVICE) -> types.SimpleNamespace:
    trainer = types.SimpleNamespace(
        **trl_attributes(config),
        accelerator=types.SimpleNamespace(device=device, gather_for_metrics=lambda x: x),
        is_encoder_decoder=False,
        pad_token_id=0,
        aux_loss_enabled=False,
        concatenated_inputs=CPOTrainer.concatenated_inputs,
        get_batch_logps=CPOTrainer.get_batch_logps,
    )
    trainer.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, trainer)
    trainer.concatenated_forward = types.MethodType(CPOTrainer.concatenated_forward, trainer)
    return trainer


def make_batch(dtype=torch.float64, length=T + 1):
    return paired_trainer_batch(B, V, length, dtype)


def concatenated_labels(batch):
    return torch.cat((batch["chosen_labels"], batch["rejected_labels"]))


# TRL's own code ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_equals_trl_cpo_loss(config):
    chosen_sums = -torch.rand(5, dtype=torch.float64) * 30
    rejected_sums = -torch.rand(5, dtype=torch.float64) * 30
    chosen_n = torch.randint(1, 12, (5,)).double()
    rejected_n = torch.randint(1, 12, (5,)).double()
    options = CONFIGS[config]
    out = cpo_loss(chosen_sums, rejected_sums, chosen_n, rejected_n, **options)
    trainer = trl_trainer(options)
    averaged = trainer.loss_type in ("ipo", "simpo")
    chosen = chosen_sums / chosen_n if averaged else chosen_sums
    rejected = rejected_sums / rejected_n if averaged else rejected_sums
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    nll = -chosen_sums.sum() / chosen_n.sum()
    want = losses.mean() + trainer.cpo_alpha * nll
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.metrics["rewards/chosen"], chosen_rewards.mean().float())
    torch.testing.assert_close(out.metrics["rewards/margins"], (chosen_rewards - rejected_rewards).mean().float())


@pytest.mark.parametrize("config", CONFIGS)
def test_equals_trl_get_batch_loss_metrics(config):
    """The whole trainer step: TRL's concatenated_forward (its NLL included) on the same logits,
    loss, gradient and every metric but logits/* (defined on completion tokens here, see cpo.py)."""
    batch, logits = make_batch()
    trl_leaf = logits.clone().requires_grad_(True)

    def model(*args, **kwargs):
        return types.SimpleNamespace(logits=trl_leaf)

    want_loss, want_metrics = CPOTrainer.get_batch_loss_metrics(trl_trainer(CONFIGS[config]), model, batch)
    want_loss.backward()

    leaf = logits.clone().requires_grad_(True)
    out = cpo_loss_from_logits(leaf[:, :-1], concatenated_labels(batch)[:, 1:], **CONFIGS[config])
    out.loss.backward()
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(leaf.grad, trl_leaf.grad, rtol=1e-9, atol=1e-12)
    assert set(want_metrics) == set(out.metrics)
    for name, value in want_metrics.items():
        if not name.startswith("logits/"):
            assert out.metrics[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name


# Every backend against a float64 eager ground truth ------------------------------------------------


def eager_from_logits(logits, labels, completion_mask=None, **options):
    """log_softmax -> gather -> masked sums in float64, then the same per-sequence math."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    tokens = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = labels != -100
    if completion_mask is not None:
        mask &= completion_mask.bool()
    sums = torch.where(mask, tokens, 0.0).sum(-1)
    counts = mask.sum(-1).double()
    out = cpo_loss(*sums.chunk(2), *counts.chunk(2), **options)
    mean_logits = logits.double().mean(-1)
    for half, name in zip((0, 1), ("logits/chosen", "logits/rejected")):
        m = mask.chunk(2)[half]
        out.metrics[name] = (mean_logits.chunk(2)[half][m].sum() / m.sum()).float()
    return out


def loss_and_grad(fn, logits, *args, **kwargs):
    leaf = logits.detach().clone().requires_grad_(True)
    out = fn(leaf, *args, **kwargs)
    out.loss.backward()
    return out, leaf.grad


def check_against_truth(fn, truth_fn, backend, logits, *args, **kwargs):
    truth, truth_grad = loss_and_grad(truth_fn, logits, *args, **kwargs)
    with fastalign.use_backend("reference"):
        ref, ref_grad = loss_and_grad(fn, logits, *args, **kwargs)
    with fastalign.use_backend(backend):
        got, got_grad = loss_and_grad(fn, logits, *args, **kwargs)
    assert got.loss.dtype == torch.float32 and got.loss.dim() == 0
    assert got_grad.dtype == logits.dtype and got_grad.shape == logits.shape
    # The reference itself: fp32 accumulation over the same (possibly bf16-rounded) logits.
    assert abs(ref.loss.item() - truth.loss.item()) <= 1e-5 * (1 + abs(truth.loss.item()))
    assert_as_accurate_as_reference(got.loss, ref.loss, truth.loss, "loss")
    assert_as_accurate_as_reference(got_grad, ref_grad, truth_grad, "grad")
    assert set(got.metrics) == set(truth.metrics)
    for name, value in got.metrics.items():
        assert value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad, name
        assert_as_accurate_as_reference(value, ref.metrics[name], truth.metrics[name], name)
    return got, got_grad


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", ["sigmoid-smoothing", "hinge", "ipo", "simpo", "alphapo"])
def test_from_logits_matches_float64_truth(backend, dtype, config):
    batch, full = make_batch(dtype)
    logits, labels = full[:, :-1], concatenated_labels(batch)[:, 1:]
    check_against_truth(cpo_loss_from_logits, eager_from_logits, backend, logits, labels, **CONFIGS[config])


@pytest.mark.parametrize("backend", backend_params())
def test_completion_mask_equals_ignore_index(backend):
    batch, full = make_batch(torch.float32)
    labels = concatenated_labels(batch)[:, 1:]
    ids = torch.cat((batch["chosen_input_ids"], batch["rejected_input_ids"]))[:, 1:]
    with fastalign.use_backend(backend):
        by_labels = cpo_loss_from_logits(full[:, :-1], labels, loss_type="simpo")
        by_mask = CPOLoss(loss_type="simpo")(full[:, :-1], ids, completion_mask=labels != -100)
    torch.testing.assert_close(by_mask.loss, by_labels.loss)
    for name in by_labels.metrics:
        torch.testing.assert_close(by_mask.metrics[name], by_labels.metrics[name])


# Properties -----------------------------------------------------------------------------------------


def test_identical_chosen_and_rejected_give_ln2():
    logps = -torch.rand(4) * 10
    counts = torch.full((4,), 3.0)
    out = cpo_loss(logps, logps, counts, counts, cpo_alpha=0.0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["rewards/margins"].item() == 0.0
    assert out.metrics["rewards/accuracies"].item() == 0.0


@pytest.mark.parametrize("config", ["sigmoid", "hinge", "ipo", "simpo", "alphapo"])
def test_swapping_chosen_and_rejected_flips_margins(config):
    chosen, rejected = -torch.rand(6) * 20, -torch.rand(6) * 20
    chosen_n, rejected_n = torch.randint(1, 9, (6,)), torch.randint(1, 9, (6,))
    options = {k: v for k, v in CONFIGS[config].items() if k != "cpo_alpha"} | {"cpo_alpha": 0.0}
    forward = cpo_loss(chosen, rejected, chosen_n, rejected_n, **options).metrics
    swapped = cpo_loss(rejected, chosen, rejected_n, chosen_n, **options).metrics
    torch.testing.assert_close(swapped["rewards/margins"], -forward["rewards/margins"])
    torch.testing.assert_close(swapped["rewards/accuracies"], 1 - forward["rewards/accuracies"])
    torch.testing.assert_close(swapped["rewards/chosen"], forward["rewards/rejected"])


def test_simpo_is_length_normalised():
    chosen, rejected = -torch.rand(3) * 20, -torch.rand(3) * 20
    chosen_n, rejected_n = torch.tensor([4.0, 5.0, 6.0]), torch.tensor([7.0, 2.0, 3.0])
    once = cpo_loss(chosen, rejected, chosen_n, rejected_n, loss_type="simpo")
    twice = cpo_loss(2 * chosen, 2 * rejected, 2 * chosen_n, 2 * rejected_n, loss_type="simpo")
    torch.testing.assert_close(twice.loss, once.loss)


def test_alphapo_tends_to_log_prob_rewards():
    chosen, rejected = -torch.rand(5, dtype=torch.float64) * 3, -torch.rand(5, dtype=torch.float64) * 3
    n = torch.ones(5, dtype=torch.float64)
    plain = cpo_loss(chosen, rejected, n, n, loss_type="simpo", cpo_alpha=0.0, beta=2.0)
    shaped = cpo_loss(chosen, rejected, n, n, loss_type="alphapo", alpha=1e-7, beta=2.0)
    torch.testing.assert_close(shaped.loss, plain.loss, rtol=1e-6, atol=1e-8)


def test_gradcheck_float64():
    chosen = (-torch.rand(3, dtype=torch.float64) * 5).requires_grad_(True)
    rejected = (-torch.rand(3, dtype=torch.float64) * 5).requires_grad_(True)
    n = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64)
    for options in ({"loss_type": "sigmoid", "label_smoothing": 0.1}, {"loss_type": "alphapo", "alpha": 0.3},
                    {"loss_type": "ipo"}, {"loss_type": "hinge", "beta": 2.0}):
        def loss(c, r, options=options):
            return cpo_loss(c, r, n, n, **options).loss

        assert torch.autograd.gradcheck(loss, (chosen, rejected))


# Empty completions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_fully_masked_completion_is_probability_one(backend, loss_type):
    batch, full = make_batch(torch.float32)
    labels = concatenated_labels(batch)[:, 1:].clone()
    labels[0] = -100  # the first chosen completion is empty
    leaf = full[:, :-1].detach().clone().requires_grad_(True)
    with fastalign.use_backend(backend):
        out = cpo_loss_from_logits(leaf, labels, loss_type=loss_type)
        out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.metrics.values())
    assert torch.isfinite(leaf.grad).all() and torch.equal(leaf.grad[0], torch.zeros_like(leaf.grad[0]))
    want = eager_from_logits(full[:, :-1], labels, loss_type=loss_type)
    torch.testing.assert_close(out.loss.double(), want.loss, rtol=1e-5, atol=1e-6)


def test_all_chosen_completions_empty_give_zero_nll():
    logps = torch.zeros(2)
    out = cpo_loss(logps, -torch.rand(2) * 5, torch.zeros(2), torch.full((2,), 3.0), loss_type="simpo")
    assert out.metrics["nll_loss"].item() == 0.0 and torch.isfinite(out.loss)
    assert out.metrics["logps/chosen"].item() == 0.0


# Errors -----------------------------------------------------------------------------------------------

GOOD = (torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"loss_type": "kto_pair"}, ValueError,
         "loss_type: expected one of 'sigmoid', 'hinge', 'ipo', 'simpo', 'alphapo'; got 'kto_pair'"),
        ({"beta": 0.0}, ValueError, "beta: expected a finite number > 0"),
        ({"beta": -0.1}, ValueError, "beta"),
        ({"beta": math.nan}, ValueError, "beta"),
        ({"beta": "0.1"}, TypeError, "beta"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, ValueError, "label_smoothing: loss_type='hinge'"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, ValueError, "label_smoothing: loss_type='ipo'"),
        ({"label_smoothing": 1.5}, ValueError, r"label_smoothing: expected a number in \[0, 1\]"),
        ({"loss_type": "sigmoid", "simpo_gamma": 1.0}, ValueError, "simpo_gamma: only loss_type"),
        ({"loss_type": "alphapo", "cpo_alpha": 1.0}, ValueError, "cpo_alpha: loss_type='alphapo' has no NLL"),
        ({"cpo_alpha": -1.0}, ValueError, "cpo_alpha: expected a number >= 0"),
        ({"alpha": math.inf}, ValueError, "alpha: expected a finite number"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        cpo_loss(*GOOD, **kwargs)
    with pytest.raises(error, match=match):
        CPOLoss(**kwargs)


@pytest.mark.parametrize(
    "position, value, error, match",
    [
        (1, torch.zeros(3), ValueError, r"rejected_logps: expected shape \(2,\) \(that of chosen_logps\)"),
        (2, torch.ones(3), ValueError, r"chosen_num_tokens: expected shape \(2,\)"),
        (3, torch.ones(1), ValueError, "rejected_num_tokens: expected shape"),
        (0, torch.zeros(2, 1), ValueError, r"chosen_logps: expected a 1-d tensor"),
        (0, torch.zeros(2, dtype=torch.long), TypeError, "chosen_logps: expected a floating-point tensor"),
        (0, [0.0, 0.0], TypeError, "chosen_logps: expected a torch.Tensor"),
        (2, torch.ones(2, dtype=torch.bool), TypeError, "chosen_num_tokens: expected a float or integer"),
    ],
)
def test_bad_sequence_tensors(position, value, error, match):
    args = list(GOOD)
    args[position] = value
    with pytest.raises(error, match=match):
        cpo_loss(*args)


def test_empty_batch():
    with pytest.raises(ValueError, match="chosen_logps: the batch is empty"):
        cpo_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0))


def test_bad_logits_and_masks():
    logits, labels = torch.randn(4, T, V), torch.randint(0, V, (4, T))
    with pytest.raises(ValueError, match="logits: a paired loss takes 2B rows.*got 3"):
        cpo_loss_from_logits(logits[:3], labels[:3])
    with pytest.raises(ValueError, match=r"logits: expected \[2B, T, V\]"):
        cpo_loss_from_logits(logits[0], labels[0])
    with pytest.raises(ValueError, match=r"labels: expected shape \(4, 6\)"):
        cpo_loss_from_logits(logits, labels[:, :-1])
    with pytest.raises(ValueError, match=r"completion_mask: expected shape \(4, 6\)"):
        CPOLoss()(logits, labels, completion_mask=torch.ones(4, T - 1))
    with pytest.raises(ValueError, match="loss_type"):
        cpo_loss_from_logits(logits, labels, loss_type="dpo")
    with pytest.raises(ValueError, match="completion_mask: expected a tensor on cpu"):
        cpo_loss_from_logits(logits, labels, completion_mask=torch.ones(4, T, device="meta"))
