"""RLOOTrainer end to end: a tiny Llama trained a few steps by stock TRL 1.16 and by TRL patched
with fastalign.integrations.trl, from the same seed, logs the same loss and metrics at every step.

num_iterations=2 reuses each generation batch for a second step, after an update, so the
sequence ratios there differ from 1 and the clipping metrics have something to count."""

from __future__ import annotations

import pytest
import tiny_trl
import torch

trl = pytest.importorskip("trl")

from fastalign.integrations import trl as fa_trl  # noqa: E402

# learning_rate=1e-4: after one update some sequence ratios leave the clip range and some stay in,
# so the second iteration runs both branches of the clipped surrogate.
CONFIGS = [
    dict(beta=0.0, num_iterations=2, learning_rate=1e-4),
    # RLOO's default beta (0.05): the reference model is loaded from the policy's saved path. Two
    # optimizer steps: the first iteration over the generation batch, then the second.
    dict(num_iterations=2, gradient_accumulation_steps=2, max_steps=2, epsilon_high=0.28, learning_rate=1e-4,
         normalize_advantages=True),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_trl.saved_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


def _trainer(model_dir, output_dir, config):
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    args = RLOOConfig(**tiny_trl.common_args(output_dir, **config), num_generations=4, max_completion_length=8,
                      temperature=1.0)
    torch.manual_seed(0)
    return RLOOTrainer(model=model_dir, reward_funcs=tiny_trl.length_reward, args=args,
                       train_dataset=Dataset.from_list(tiny_trl.prompt_rows(16)),
                       processing_class=tiny_trl.tokenizer())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_rloo_training_matches_stock_trl(model_dir, tmp_path, config):
    stock = tiny_trl.train_logs(lambda: _trainer(model_dir, tmp_path / "stock", config))
    with fa_trl.patched(trainers=("rloo",)):
        ours = tiny_trl.train_logs(lambda: _trainer(model_dir, tmp_path / "fastalign", config))
    assert not fa_trl.is_patched()
    tiny_trl.assert_logs_match(stock, ours)
    assert "entropy" in ours[0] and "clip_ratio/region_mean" in ours[0]
    assert ("kl" in ours[0]) == (config.get("beta", 0.05) != 0)
    # The second iteration over a generation batch clipped some sequences, not all.
    assert any(0 < step["clip_ratio/region_mean"] < 1 for step in stock)


def test_unserved_option_fails_at_construction(model_dir, tmp_path):
    with fa_trl.patched(trainers=("rloo",)), pytest.raises(ValueError, match=r"RLOOConfig.epsilon: .*\(0, 1\)"):
        _trainer(model_dir, tmp_path, dict(beta=0.0, epsilon=1.0))


def test_unpatch_restores_stock_trl():
    from trl.trainer.rloo_trainer import RLOOTrainer

    compute_loss, init = RLOOTrainer.__dict__["_compute_loss"], RLOOTrainer.__dict__["__init__"]
    fa_trl.patch(trainers=("rloo",))
    try:
        assert RLOOTrainer.__dict__["_compute_loss"] is not compute_loss
    finally:
        fa_trl.unpatch()
    assert RLOOTrainer.__dict__["_compute_loss"] is compute_loss and RLOOTrainer.__dict__["__init__"] is init
