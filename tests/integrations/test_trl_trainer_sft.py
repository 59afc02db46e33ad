"""SFTTrainer end to end: its loss is the fused LM head's log-probs, so fastalign's LM head alone
(no loss replacement) serves it. A tiny Llama trained a few steps by stock TRL 1.16 and by TRL
patched with fastalign.integrations.trl, from the same seed, logs the same loss, entropy and token
accuracy at every step."""

from __future__ import annotations

import pytest
import tiny_trl
import torch

trl = pytest.importorskip("trl")

from fastalign.integrations import trl as fa_trl  # noqa: E402
from fastalign.integrations.trl.lm_head import FastalignChunkedLogProb  # noqa: E402

CONFIGS = [
    dict(data="text"),
    dict(data="prompt_completion"),  # completion-only loss: prompt tokens are -100 labels
    dict(data="prompt_completion", loss_type="dft", gradient_accumulation_steps=2, per_device_train_batch_size=2),
]


def sft_rows(n: int, data: str, seed: int = 0) -> list[dict]:
    rng = torch.Generator().manual_seed(seed)
    if data == "text":
        return [{"text": tiny_trl.sentence(rng, 4, 12)} for _ in range(n)]
    # Completions start with a space: TRL joins prompt and completion as strings.
    return [{"prompt": tiny_trl.sentence(rng, 3, 7), "completion": " " + tiny_trl.sentence(rng, 2, 6)}
            for _ in range(n)]


def _trainer(output_dir, config):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    config = dict(config)
    data = config.pop("data")
    args = SFTConfig(**tiny_trl.common_args(output_dir, **config))
    return SFTTrainer(model=tiny_trl.causal_lm(seed=0), args=args, train_dataset=Dataset.from_list(sft_rows(12, data)),
                      processing_class=tiny_trl.tokenizer())


@pytest.fixture
def lm_head_rows(monkeypatch):
    """The rows each call of fastalign's LM head got."""
    rows = []
    apply = FastalignChunkedLogProb.apply

    def counting(hidden, *args, **kwargs):
        rows.append(hidden.shape[0])
        return apply(hidden, *args, **kwargs)

    monkeypatch.setattr(FastalignChunkedLogProb, "apply", staticmethod(counting))
    return rows


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sft_training_matches_stock_trl(tmp_path, config, lm_head_rows):
    stock = tiny_trl.train_logs(lambda: _trainer(tmp_path / "stock", config))
    assert not lm_head_rows
    with fa_trl.patched(trainers=()):
        ours = tiny_trl.train_logs(lambda: _trainer(tmp_path / "fastalign", config))
    assert not fa_trl.is_patched()
    assert len(lm_head_rows) == 3 * config.get("gradient_accumulation_steps", 1) and all(lm_head_rows)
    tiny_trl.assert_logs_match(stock, ours)
    assert {"loss", "entropy", "mean_token_accuracy", "num_tokens"} <= set(ours[0])
