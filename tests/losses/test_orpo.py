"""ORPO: TRL's own ORPOTrainer code, a float64 eager ground truth on every backend, properties,
empty completions and argument errors."""

from __future__ import annotations

import math
import os
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, backend_params
from trl_batches import paired_trainer_batch
from numerics import assert_as_accurate_as_reference

import fastalign
from fastalign.orpo import ORPOLoss, log1mexp, orpo_loss, orpo_loss_from_logits

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
ORPOTrainer = orpo_trainer.ORPOTrainer

B, T, V = 2, 6, 97


def trl_trainer(beta: float, device=DEVICE) -> types.SimpleNamespace:
    """The ORPOTrainer attributes `get_batch_loss_metrics` and what it calls read."""
    trainer = types.SimpleNamespace(
        beta=beta,
        accelerator=types.SimpleNamespace(device=device, gather_for_metrics=lambda x: x),
        is_encoder_decoder=False,
        padding_value=0,
        aux_loss_enabled=False,
        concatenated_inputs=ORPOTrainer.concatenated_inputs,
        get_batch_logps=ORPOTrainer.get_batch_logps,
    )
    trainer.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, trainer)
    trainer.concatenated_forward = types.MethodType(ORPOTrainer.concatenated_forward, trainer)
    return trainer


def make_batch(dtype=torch.float64, length=T + 1):
    return paired_trainer_batch(B, V, length, dtype)


def our_inputs(batch, logits):
    """What orpo_loss_from_logits takes for TRL's batch: shifted logits, next tokens and the two masks."""
    keys = ("input_ids", "attention_mask", "labels")
    cat = {k: torch.cat((batch[f"chosen_{k}"], batch[f"rejected_{k}"])) for k in keys}
    return (logits[:, :-1], cat["input_ids"][:, 1:]), {
        "completion_mask": cat["labels"][:, 1:] != -100,
        "attention_mask": cat["attention_mask"][:, 1:],
    }


# TRL's own code ---------------------------------------------------------------------------------


def test_log1mexp_equals_trl():
    x = -torch.logspace(-12, 2, 200, dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), orpo_trainer.log1mexp(x), rtol=0, atol=0)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_equals_trl_odds_ratio_loss(beta):
    chosen_sums = -torch.rand(6, dtype=torch.float64) * 30 - 0.01
    rejected_sums = -torch.rand(6, dtype=torch.float64) * 30 - 0.01
    chosen_n, rejected_n = torch.randint(1, 12, (6,)).double(), torch.randint(1, 12, (6,)).double()
    nll_sums, nll_n = chosen_sums - 10, chosen_n + 4
    out = orpo_loss(chosen_sums, rejected_sums, chosen_n, rejected_n, nll_sums, nll_n, beta=beta)
    losses, chosen_rewards, rejected_rewards, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
        trl_trainer(beta), chosen_sums / chosen_n, rejected_sums / rejected_n
    )
    # TRL runs the odds ratio in fp32 whatever the input dtype.
    want = -nll_sums.sum() / nll_n.sum() - losses.mean().double()
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.metrics["log_odds_ratio"], ratio.float())
    torch.testing.assert_close(out.metrics["log_odds_chosen"], log_odds.float())
    torch.testing.assert_close(out.metrics["rewards/chosen"], chosen_rewards.mean().float())
    torch.testing.assert_close(out.metrics["rewards/rejected"], rejected_rewards.mean().float())


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_equals_trl_get_batch_loss_metrics(beta):
    """The whole trainer step: TRL's NLL over prompt and completion, the averaged completion
    log-probs, loss, gradient and every metric but logits/* (completion tokens here, see cpo.py)."""
    batch, logits = make_batch()
    trl_leaf = logits.clone().requires_grad_(True)

    def model(*args, **kwargs):
        return types.SimpleNamespace(logits=trl_leaf)

    want_loss, want_metrics = ORPOTrainer.get_batch_loss_metrics(trl_trainer(beta), model, batch)
    want_loss.backward()

    leaf = logits.clone().requires_grad_(True)
    args, masks = our_inputs(batch, leaf)
    out = orpo_loss_from_logits(*args, **masks, beta=beta)
    out.loss.backward()
    # TRL's odds ratio runs in fp32 even for fp64 logits; its NLL and log-probs stay in fp64.
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(leaf.grad, trl_leaf.grad, rtol=1e-6, atol=1e-8)
    assert set(want_metrics) == set(out.metrics)
    for name, value in want_metrics.items():
        if not name.startswith("logits/"):
            assert out.metrics[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name


# Every backend against a float64 eager ground truth ------------------------------------------------


def eager_from_logits(logits, labels, completion_mask, attention_mask, beta=0.1):
    """log_softmax -> gather -> masked sums in float64 for both token sets, then the same math."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    tokens = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    nll_mask = attention_mask.bool()
    completion = nll_mask & completion_mask.bool()
    sums = (tokens * completion).sum(-1)
    counts = completion.sum(-1).double()
    nll_sums = (tokens * nll_mask).sum(-1).chunk(2)[0]
    nll_counts = nll_mask.sum(-1).double().chunk(2)[0]
    out = orpo_loss(*sums.chunk(2), *counts.chunk(2), nll_sums, nll_counts, beta=beta)
    mean_logits = logits.double().mean(-1)
    for half, name in zip((0, 1), ("logits/chosen", "logits/rejected")):
        m = completion.chunk(2)[half]
        out.metrics[name] = (mean_logits.chunk(2)[half][m].sum() / m.sum()).float()
    return out


def loss_and_grad(fn, logits, *args, **kwargs):
    leaf = logits.detach().clone().requires_grad_(True)
    out = fn(leaf, *args, **kwargs)
    out.loss.backward()
    return out, leaf.grad


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_from_logits_matches_float64_truth(backend, dtype):
    batch, full = make_batch(dtype)
    (logits, labels), masks = our_inputs(batch, full)
    truth, truth_grad = loss_and_grad(eager_from_logits, logits, labels, **masks, beta=0.3)
    with fastalign.use_backend("reference"):
        ref, ref_grad = loss_and_grad(orpo_loss_from_logits, logits, labels, **masks, beta=0.3)
    with fastalign.use_backend(backend):
        got, got_grad = loss_and_grad(ORPOLoss(beta=0.3), logits, labels, **masks)
    assert got.loss.dtype == torch.float32 and got_grad.dtype == dtype
    assert abs(ref.loss.item() - truth.loss.item()) <= 1e-5 * (1 + abs(truth.loss.item()))
    assert_as_accurate_as_reference(got.loss, ref.loss, truth.loss, "loss")
    assert_as_accurate_as_reference(got_grad, ref_grad, truth_grad, "grad")
    assert set(got.metrics) == set(truth.metrics)
    for name, value in got.metrics.items():
        assert value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad, name
        assert_as_accurate_as_reference(value, ref.metrics[name], truth.metrics[name], name)


def test_attention_mask_defaults_to_every_labelled_token():
    batch, full = make_batch(torch.float32)
    (logits, labels), masks = our_inputs(batch, full)
    labels = labels.masked_fill(masks["attention_mask"] == 0, -100)
    with_mask = orpo_loss_from_logits(logits, labels, **masks)
    without = orpo_loss_from_logits(logits, labels, completion_mask=masks["completion_mask"])
    torch.testing.assert_close(without.loss, with_mask.loss)


# Properties -----------------------------------------------------------------------------------------


def test_identical_chosen_and_rejected_give_nll_plus_beta_ln2():
    logps, n = -torch.rand(4) * 10 - 1, torch.full((4,), 3.0)
    nll_sums, nll_n = logps - 5, n + 2
    out = orpo_loss(logps, logps, n, n, nll_sums, nll_n, beta=0.5)
    nll = (-nll_sums.sum() / nll_n.sum()).item()
    assert out.metrics["log_odds_chosen"].item() == 0.0
    assert out.loss.item() == pytest.approx(nll + 0.5 * math.log(2), rel=1e-6)


def test_swapping_chosen_and_rejected_flips_log_odds():
    chosen, rejected = -torch.rand(5) * 10 - 0.1, -torch.rand(5) * 10 - 0.1
    n = torch.randint(1, 5, (5,))
    nll = (chosen, n)
    forward = orpo_loss(chosen, rejected, n, n, *nll).metrics
    swapped = orpo_loss(rejected, chosen, n, n, *nll).metrics
    torch.testing.assert_close(swapped["log_odds_chosen"], -forward["log_odds_chosen"])
    torch.testing.assert_close(swapped["rewards/margins"], -forward["rewards/margins"])


def test_gradcheck_float64():
    chosen = (-torch.rand(3, dtype=torch.float64) * 5 - 0.05).requires_grad_(True)
    rejected = (-torch.rand(3, dtype=torch.float64) * 5 - 0.05).requires_grad_(True)
    n = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64)
    nll = (chosen.detach() - 1, n + 1)
    def loss(c, r):
        return orpo_loss(c, r, n, n, *nll, beta=0.4).loss

    assert torch.autograd.gradcheck(loss, (chosen, rejected))


# Empty completions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("row", [0, B], ids=["chosen", "rejected"])
def test_pair_with_empty_completion_drops_out_of_odds_ratio(backend, row):
    batch, full = make_batch(torch.float32)
    (logits, labels), masks = our_inputs(batch, full)
    masks["completion_mask"] = masks["completion_mask"].clone()
    masks["completion_mask"][row] = False
    leaf = logits.detach().clone().requires_grad_(True)
    with fastalign.use_backend(backend):
        out = orpo_loss_from_logits(leaf, labels, **masks)
        out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.metrics.values())
    assert torch.isfinite(leaf.grad).all()
    # Pair 0 contributes only through the NLL (chosen row); the rejected row 0 + B gets no gradient.
    assert torch.equal(leaf.grad[B], torch.zeros_like(leaf.grad[B]))
    # What is left equals the pair-1 odds ratio over B plus the NLL, computed directly.
    tokens = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    nll_mask = masks["attention_mask"].bool()
    completion = nll_mask & masks["completion_mask"]
    avg = (tokens * completion).sum(-1) / completion.sum(-1).clamp(min=1)
    log_odds = (avg[1] - avg[B + 1]) - (torch.log1p(-avg[1].exp()) - torch.log1p(-avg[B + 1].exp()))
    nll = -(tokens * nll_mask)[:B].sum() / nll_mask[:B].sum()
    want = nll - 0.1 * F.logsigmoid(log_odds) / B
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(log_odds.item() / B, rel=1e-5)


def test_empty_nll_set_gives_zero_nll():
    ones = torch.ones(2)
    out = orpo_loss(-ones, -2 * ones, ones, ones, torch.zeros(2), torch.zeros(2))
    assert out.metrics["nll_loss"].item() == 0.0 and torch.isfinite(out.loss)


# Errors -----------------------------------------------------------------------------------------------

GOOD = (-torch.ones(2), -torch.ones(2), torch.ones(2), torch.ones(2), -torch.ones(2), torch.ones(2))


@pytest.mark.parametrize(
    "beta, error", [(0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError), (None, TypeError)]
)
def test_bad_beta(beta, error):
    with pytest.raises(error, match="beta"):
        orpo_loss(*GOOD, beta=beta)
    with pytest.raises(error, match="beta"):
        ORPOLoss(beta=beta)


@pytest.mark.parametrize(
    "position, value, match",
    [
        (1, -torch.ones(3), r"rejected_logps: expected shape \(2,\) \(that of chosen_logps\)"),
        (3, torch.ones(1), r"rejected_num_tokens: expected shape \(2,\)"),
        (4, -torch.ones(3), "chosen_nll_logps: expected shape"),
        (5, torch.ones(2, 2), "chosen_nll_num_tokens: expected a 1-d tensor"),
        (0, -torch.ones(2, 1), "chosen_logps: expected a 1-d tensor"),
    ],
)
def test_bad_sequence_tensors(position, value, match):
    args = list(GOOD)
    args[position] = value
    with pytest.raises(ValueError, match=match):
        orpo_loss(*args)


def test_bad_logits_and_masks():
    logits, labels = torch.randn(4, T, V), torch.randint(0, V, (4, T))
    mask = torch.ones(4, T, dtype=torch.bool)
    with pytest.raises(ValueError, match="logits: a paired loss takes 2B rows.*got 5"):
        orpo_loss_from_logits(torch.randn(5, T, V), torch.randint(0, V, (5, T)), completion_mask=mask[:1].expand(5, T))
    with pytest.raises(TypeError, match="completion_mask: expected a torch.Tensor"):
        orpo_loss_from_logits(logits, labels, completion_mask=None)
    with pytest.raises(ValueError, match=r"completion_mask: expected shape \(4, 6\)"):
        orpo_loss_from_logits(logits, labels, completion_mask=mask[:, 1:])
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(4, 6\)"):
        ORPOLoss()(logits, labels, completion_mask=mask, attention_mask=mask[:2])
    with pytest.raises(ValueError, match=r"labels: expected shape \(4, 6\)"):
        orpo_loss_from_logits(logits, labels[:, 1:], completion_mask=mask)
