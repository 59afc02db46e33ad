"""RewardTrainer end to end: a tiny Llama sequence classifier trained a few steps by stock TRL 1.16
and by TRL patched with fastalign.integrations.trl, from the same seed, logs the same loss and
metrics at every step; evaluation logs the same metrics. And, with two processes stood in for by two
threads, the same cross-process reductions of every metric."""

from __future__ import annotations

import collections
import types

import pytest
import tiny_trl
import torch
from threaded_accelerator import run_as_processes

trl = pytest.importorskip("trl")

import fastalign.integrations.trl.reward as fa_reward  # noqa: E402
from fastalign.integrations import trl as fa_trl  # noqa: E402

CONFIGS = [
    dict(),
    dict(center_rewards_coefficient=0.01),
    dict(margin=True),
    dict(margin=True, center_rewards_coefficient=0.05, per_device_train_batch_size=2, gradient_accumulation_steps=2),
]


def _trainer(output_dir, config, eval_rows=0):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    config = dict(config)
    margin = config.pop("margin", False)
    args = RewardConfig(**tiny_trl.common_args(output_dir, **config))
    return RewardTrainer(model=tiny_trl.sequence_classifier(seed=0), args=args,
                         train_dataset=Dataset.from_list(tiny_trl.reward_rows(12, margin)),
                         eval_dataset=Dataset.from_list(tiny_trl.reward_rows(eval_rows, margin, seed=1)) if eval_rows else None,
                         processing_class=tiny_trl.tokenizer())


@pytest.fixture
def reward_loss_calls(monkeypatch):
    """The `margin` each call of fastalign's reward loss by the patched trainer got."""
    margins = []

    def recording(*args, **kwargs):
        margins.append(kwargs.get("margin"))
        return reward_loss(*args, **kwargs)

    reward_loss = fa_reward.reward_loss
    monkeypatch.setattr(fa_reward, "reward_loss", recording)
    return margins


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_reward_training_matches_stock_trl(tmp_path, config, reward_loss_calls):
    stock = tiny_trl.train_logs(lambda: _trainer(tmp_path / "stock", config))
    assert not reward_loss_calls
    with fa_trl.patched(trainers=("reward",)):
        ours = tiny_trl.train_logs(lambda: _trainer(tmp_path / "fastalign", config))
    assert not fa_trl.is_patched()
    assert len(reward_loss_calls) == 3 * config.get("gradient_accumulation_steps", 1)
    # The margin column reached the loss (and only when the dataset has one).
    assert all((margin is not None) == config.get("margin", False) for margin in reward_loss_calls)
    tiny_trl.assert_logs_match(stock, ours)
    assert {"accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens"} <= set(ours[0])


def test_reward_evaluation_matches_stock_trl(tmp_path, reward_loss_calls):
    def evaluate(output_dir):
        metrics = _trainer(output_dir, dict(margin=True), eval_rows=8).evaluate()
        # Wall-clock entries (runtime, throughput, model preparation time) are not the math.
        return [{k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second", "_time"))}]

    stock = evaluate(tmp_path / "stock")
    with fa_trl.patched(trainers=("reward",)):
        ours = evaluate(tmp_path / "fastalign")
    assert reward_loss_calls and "eval_accuracy" in ours[0]
    tiny_trl.assert_logs_match(stock, ours)


def test_unserved_option_fails_at_construction(tmp_path):
    with fa_trl.patched(trainers=("reward",)), pytest.raises(
        ValueError, match=r"RewardConfig\.center_rewards_coefficient: expected a number >= 0"
    ):
        _trainer(tmp_path, dict(center_rewards_coefficient=-0.1))


def test_unpatch_restores_stock_trl():
    from trl.trainer.reward_trainer import RewardTrainer

    compute_loss, init = RewardTrainer.__dict__["compute_loss"], RewardTrainer.__dict__["__init__"]
    with fa_trl.patched(trainers=("reward",)):
        assert RewardTrainer.__dict__["compute_loss"] is fa_reward.compute_loss
    assert RewardTrainer.__dict__["compute_loss"] is compute_loss and RewardTrainer.__dict__["__init__"] is init


@pytest.mark.parametrize("with_margin", [False, True], ids=["no-margin", "margin"])
def test_two_process_reductions_match_stock_trl(with_margin):
    from trl.trainer.reward_trainer import RewardTrainer

    def step(compute_loss):
        def run(accelerator):
            gen = torch.Generator().manual_seed(accelerator.rank)
            # Process 1's scores are wider spread and shifted: both extremes and the means are not process 0's.
            scores = torch.randn(8, 1, generator=gen) * (1 + 2 * accelerator.rank) + accelerator.rank
            ones = torch.ones(8, 5, dtype=torch.long)
            inputs = {"input_ids": ones, "attention_mask": ones}
            if with_margin:
                inputs["margin"] = torch.rand(4, generator=gen)
            trainer = types.SimpleNamespace(
                model=types.SimpleNamespace(training=True), accelerator=accelerator,
                args=types.SimpleNamespace(center_rewards_coefficient=0.01),
                _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
                _total_train_tokens=0, _tp_size=1,
            )
            loss = compute_loss(trainer, lambda **kwargs: types.SimpleNamespace(logits=scores), inputs)
            return loss.item(), {name: values[-1] for name, values in trainer._metrics["train"].items()}
        return run

    stock = run_as_processes(step(RewardTrainer.compute_loss))
    ours = run_as_processes(step(fa_reward.compute_loss))
    assert stock[0][1] == stock[1][1], "stock TRL's metrics differ between processes"
    for (stock_loss, stock_metrics), (our_loss, our_metrics) in zip(stock, ours):
        assert our_loss == pytest.approx(stock_loss, rel=1e-6)
        tiny_trl.assert_logs_match([stock_metrics], [our_metrics], rtol=1e-6, atol=1e-6)
    # Process 0 alone logs other values, so the match above is a match of the reductions.
    alone = run_as_processes(step(RewardTrainer.compute_loss), size=1)[0][1]
    for name in ("min_reward", "mean_reward", "max_reward", "margin", "num_tokens"):
        assert alone[name] != pytest.approx(stock[0][1][name]), name
