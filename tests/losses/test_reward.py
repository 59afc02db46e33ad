"""Bradley–Terry reward-model loss: TRL's own RewardTrainer.compute_loss, a float64 ground truth in
fp32/bf16, properties and argument errors."""

from __future__ import annotations

import collections
import math
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from numerics import assert_as_accurate_as_reference

from fastalign.reward import RewardLoss, bradley_terry_loss, reward_loss

reward_trainer = pytest.importorskip("trl.trainer.reward_trainer")
RewardTrainer = reward_trainer.RewardTrainer

B = 5


def trl_compute_loss(scores: torch.Tensor, margin, center_rewards_coefficient):
    """RewardTrainer.compute_loss on a stand-in model whose head returns `scores` [2B, 1]."""
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        args=types.SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient),
        accelerator=types.SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"attention_mask": torch.ones(2 * B, 3, dtype=torch.long, device=scores.device)}
    if margin is not None:
        inputs["margin"] = margin

    def model(**kwargs):
        return types.SimpleNamespace(logits=scores)

    loss = RewardTrainer.compute_loss(trainer, model, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}


@pytest.mark.parametrize("with_margin", [False, True], ids=["no-margin", "margin"])
@pytest.mark.parametrize("center", [None, 0.01])
def test_equals_trl_compute_loss(with_margin, center):
    scores = torch.randn(2 * B, 1, dtype=torch.float64, device=DEVICE) * 2
    margin = torch.rand(B, dtype=torch.float64, device=DEVICE) if with_margin else None
    trl_leaf = scores.clone().requires_grad_(True)
    want_loss, want_metrics = trl_compute_loss(trl_leaf, margin, center)
    want_loss.backward()
    leaf = scores.clone().requires_grad_(True)
    out = RewardLoss(center_rewards_coefficient=center)(leaf, margin=margin)
    out.loss.backward()
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(leaf.grad, trl_leaf.grad, rtol=1e-12, atol=1e-12)
    assert set(out.metrics) == set(want_metrics)
    for name, value in want_metrics.items():
        assert out.metrics[name].item() == pytest.approx(value, rel=1e-6, abs=1e-7), name


def eager_truth(rewards, margin=None, center=None):
    """TRL's formula, written out, in float64."""
    chosen, rejected = rewards.double().reshape(-1).chunk(2)
    diff = chosen - rejected
    loss = -F.logsigmoid(diff - (0 if margin is None else margin)).mean()
    if center is not None:
        loss = loss + center * ((chosen + rejected) ** 2).mean()
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ["flat", "column"])
def test_matches_float64_truth(dtype, shape):
    scores = (torch.randn(2 * B, device=DEVICE) * 3).to(dtype)
    if shape == "column":
        scores = scores.unsqueeze(-1)
    margin = torch.rand(B, device=DEVICE)
    leaf = scores.clone().requires_grad_(True)
    out = reward_loss(leaf, margin=margin, center_rewards_coefficient=0.05)
    out.loss.backward()
    truth_leaf = scores.double().requires_grad_(True)
    truth = eager_truth(truth_leaf, margin.double(), 0.05)
    truth.backward()
    assert out.loss.dtype == torch.float32 and leaf.grad.dtype == dtype and leaf.grad.shape == scores.shape
    # The loss accumulates in fp32 over the same (possibly bf16-rounded) scores.
    assert out.loss.item() == pytest.approx(truth.item(), rel=1e-6)
    assert_as_accurate_as_reference(leaf.grad, truth_leaf.grad.to(dtype), truth_leaf.grad, "grad")
    for name, value in out.metrics.items():
        assert value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad, name


# Properties -----------------------------------------------------------------------------------------


def test_equal_rewards_without_margin_give_ln2():
    out = reward_loss(torch.full((2 * B,), 1.7))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert out.metrics["accuracy"].item() == 0.0 and out.metrics["margin"].item() == 0.0


def test_swapping_chosen_and_rejected_flips_margin():
    chosen, rejected = torch.randn(B), torch.randn(B)
    forward = bradley_terry_loss(chosen, rejected)
    swapped = bradley_terry_loss(rejected, chosen)
    torch.testing.assert_close(swapped.metrics["margin"], -forward.metrics["margin"])
    torch.testing.assert_close(swapped.metrics["accuracy"], 1 - forward.metrics["accuracy"])
    for name in ("min_reward", "mean_reward", "max_reward"):
        torch.testing.assert_close(swapped.metrics[name], forward.metrics[name])
    # -logsigmoid(d) - (-logsigmoid(-d)) = -d: the two losses differ by the mean margin.
    torch.testing.assert_close(swapped.loss - forward.loss, forward.metrics["margin"])


def test_margin_shifts_the_difference():
    chosen, rejected = torch.randn(B), torch.randn(B)
    with_margin = bradley_terry_loss(chosen, rejected, margin=0.5)
    shifted = bradley_terry_loss(chosen - 0.5, rejected)
    torch.testing.assert_close(with_margin.loss, shifted.loss)
    tensor_margin = bradley_terry_loss(chosen, rejected, margin=torch.full((B,), 0.5))
    torch.testing.assert_close(tensor_margin.loss, with_margin.loss)
    # TRL's margin metric is the raw difference, whatever the target margin.
    torch.testing.assert_close(with_margin.metrics["margin"], (chosen - rejected).mean())


def test_centering_term_only_adds_the_mean_square():
    chosen, rejected = torch.randn(B), torch.randn(B)
    plain = bradley_terry_loss(chosen, rejected)
    centred = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.1)
    torch.testing.assert_close(centred.loss - plain.loss, 0.1 * ((chosen + rejected) ** 2).mean())


def test_gradcheck_float64():
    scores = torch.randn(2 * B, 1, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(B, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda s: reward_loss(s, margin=margin, center_rewards_coefficient=0.3).loss, (scores,)
    )


# Errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rewards, error, match",
    [
        (torch.randn(5), ValueError, "rewards: a paired loss takes 2B rows.*got 5"),
        (torch.randn(4, 2), ValueError, r"rewards: expected the scores as \[2B\] or \[2B, 1\].*\(4, 2\)"),
        (torch.randn(4, 1, 1), ValueError, r"rewards: expected the scores as .*\(4, 1, 1\)"),
        (torch.tensor(1.0), ValueError, r"rewards: expected the scores as .*got shape \(\)"),
        (torch.randn(0), ValueError, "rewards: the batch is empty"),
        (torch.arange(4), TypeError, "rewards: expected a floating-point tensor"),
        ([0.0, 1.0], TypeError, "rewards: expected a torch.Tensor"),
    ],
)
def test_bad_rewards(rewards, error, match):
    with pytest.raises(error, match=match):
        reward_loss(rewards)
    with pytest.raises(error, match=match):
        RewardLoss()(rewards)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"margin": torch.zeros(3)}, ValueError, r"margin: expected shape \(2,\)"),
        ({"margin": torch.zeros(2, 1)}, ValueError, "margin: expected a 1-d tensor"),
        ({"margin": math.nan}, ValueError, "margin: expected a finite number"),
        ({"margin": "0.5"}, TypeError, "margin: expected a number"),
        ({"center_rewards_coefficient": -0.01}, ValueError, "center_rewards_coefficient: expected a number >= 0"),
        ({"center_rewards_coefficient": math.inf}, ValueError, "center_rewards_coefficient"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        reward_loss(torch.randn(4), **kwargs)
    with pytest.raises(error, match=match):
        bradley_terry_loss(torch.randn(2), torch.randn(2), **kwargs)


def test_chosen_rejected_length_mismatch():
    with pytest.raises(ValueError, match=r"rejected_rewards: expected shape \(3,\) \(that of chosen_rewards\)"):
        bradley_terry_loss(torch.randn(3), torch.randn(2))
    with pytest.raises(ValueError, match="chosen_rewards: expected a 1-d tensor"):
        bradley_terry_loss(torch.randn(3, 1), torch.randn(3))
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        RewardLoss(center_rewards_coefficient=-1.0)
