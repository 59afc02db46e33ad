"""DPOTrainer end to end: a tiny Llama trained a few steps by stock TRL 1.16 and by TRL patched
with fastalign.integrations.trl, from the same seed, logs the same loss and metrics at every step."""

from __future__ import annotations

import pytest
import tiny_trl

trl = pytest.importorskip("trl")

from fastalign.integrations import trl as fa_trl  # noqa: E402


def _rows(empty_prompts=False):
    rows = tiny_trl.preference_rows(16)
    if empty_prompts:
        # Every other completion starts at the first position, which no causal LM scores: TRL's ipo
        # still counts it in the length it divides by.
        for row in rows[::2]:
            row["prompt"] = ""
    return rows


CASES = {
    "sigmoid": (dict(), False),
    "ipo-empty-prompts": (dict(loss_type="ipo"), True),
    "mpo": (dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                 gradient_accumulation_steps=2), False),
    "precompute": (dict(precompute_ref_log_probs=True), False),
    "wpo": (dict(use_weighting=True, beta=0.5), False),
    "ld": (dict(ld_alpha=0.3, loss_type=["sigmoid", "sigmoid_norm"]), False),
    "robust-alpha": (dict(loss_type="robust", label_smoothing=0.2, f_divergence_type="alpha_divergence",
                          f_alpha_divergence_coef=0.3), False),
}


def _trainer(output_dir, config, empty_prompts=False, eval_rows=0, **trainer_kwargs):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**tiny_trl.common_args(output_dir, **config))
    # A model built from a config has no path to load a reference from: pass one. With the policy's
    # weights the rewards are exactly 0 at the first step on both sides; precomputed reference log-probs
    # come from other batches, so they would be 0 only up to rounding, and rewards/accuracies would
    # count rounding ties: that reference gets other weights.
    ref_seed = 1 if config.get("precompute_ref_log_probs") else 0
    ref_model = tiny_trl.causal_lm(seed=ref_seed)
    rows = _rows(empty_prompts)
    return DPOTrainer(model=tiny_trl.causal_lm(), ref_model=ref_model, args=args,
                      train_dataset=Dataset.from_list(rows),
                      eval_dataset=Dataset.from_list(rows[:eval_rows]) if eval_rows else None,
                      processing_class=tiny_trl.tokenizer(), **trainer_kwargs)


@pytest.mark.parametrize("case", CASES)
def test_dpo_training_matches_stock_trl(tmp_path, case):
    config, empty_prompts = CASES[case]
    stock = tiny_trl.train_logs(lambda: _trainer(tmp_path / "stock", config, empty_prompts))
    with fa_trl.patched(trainers=("dpo",)):
        ours = tiny_trl.train_logs(lambda: _trainer(tmp_path / "fastalign", config, empty_prompts))
    assert not fa_trl.is_patched()
    tiny_trl.assert_logs_match(stock, ours)
    for name in ("entropy", "num_tokens", "logits/chosen", "mean_token_accuracy", "rewards/margins", "logps/chosen"):
        assert name in ours[0], name
    # The policy moved away from the reference, so the comparison is not of constants.
    assert ours[-1]["rewards/margins"] != 0.0


def test_evaluation_matches_stock_trl(tmp_path):
    # Eval mode; with `compute_metrics`, Trainer.prediction_step asks the loss for the logits too
    # (`return_outputs=True`).
    def compute_metrics(prediction):
        return {"mean_logit": float(prediction.predictions.mean())}

    def evaluate(output_dir):
        config = dict(loss_type=["sigmoid", "sft"], per_device_eval_batch_size=3)
        metrics = _trainer(output_dir, config, eval_rows=6, compute_metrics=compute_metrics).evaluate()
        return [{k: v for k, v in metrics.items()
                 if k not in tiny_trl.NOT_MATH and not k.endswith(("_runtime", "_per_second"))}]

    stock = evaluate(tmp_path / "stock")
    with fa_trl.patched(trainers=("dpo",)):
        ours = evaluate(tmp_path / "fastalign")
    tiny_trl.assert_logs_match(stock, ours)
    assert {"eval_rewards/accuracies", "eval_logits/rejected", "eval_mean_logit"} <= set(ours[0])


def test_gather_hook_gives_the_metrics_of_every_process():
    # What the trainer logs with 2 processes: each process's metrics over both processes' pairs. The
    # second process's contributions are recorded first, then handed to the first process's gathers.
    import torch

    from fastalign.dpo import dpo_from_sequences, dpo_options, pairs_from_tokens
    from fastalign.types import TokenLogprobs

    gen = torch.Generator().manual_seed(0)
    pairs, length = 4, 7
    mask = torch.rand(2 * pairs, length, generator=gen) > 0.3
    logps = torch.where(mask, -3 * torch.rand(2 * pairs, length, generator=gen), 0.0)
    ref_logps = torch.where(mask, logps + 0.2 * torch.randn(2 * pairs, length, generator=gen), 0.0)
    mean_logits = torch.where(mask, torch.randn(2 * pairs, length, generator=gen), 0.0)
    options = dpo_options(loss_type=["sigmoid", "ipo"], ld_alpha=0.5)

    def metrics(rows, gather=None):
        token = TokenLogprobs(logps[rows], mean_logits=mean_logits[rows])
        seqs, logits_metrics = pairs_from_tokens(token, mask[rows], options, ref_logps[rows], gather)
        return {**logits_metrics, **dpo_from_sequences(seqs, options, gather).metrics}

    whole = metrics(torch.arange(2 * pairs))
    sent = []
    metrics(torch.tensor([2, 3, 6, 7]), gather=lambda t: sent.append(t) or t)  # pairs 2, 3: chosen, rejected rows
    received = iter(sent)
    first = metrics(torch.tensor([0, 1, 4, 5]), gather=lambda t: torch.cat([t, next(received)]))
    assert next(received, None) is None and set(first) == set(whole)
    for name, value in whole.items():
        torch.testing.assert_close(first[name], value, msg=name)
    assert metrics(torch.tensor([0, 1, 4, 5]))["rewards/margins"] != whole["rewards/margins"]


def test_unserved_option_fails_at_construction(tmp_path):
    # TRL 1.16 ignores label smoothing for the sigmoid loss; fastalign refuses it rather than drop it silently.
    with fa_trl.patched(trainers=("dpo",)), pytest.raises(ValueError, match=r"DPOConfig\.label_smoothing: only"):
        _trainer(tmp_path, dict(label_smoothing=0.1))


def test_unpatch_restores_stock_dpo_trainer():
    from trl.trainer.dpo_trainer import DPOTrainer

    compute_loss, init = DPOTrainer.__dict__["_compute_loss"], DPOTrainer.__dict__["__init__"]
    with fa_trl.patched(trainers=("dpo",)):
        assert DPOTrainer.__dict__["_compute_loss"] is not compute_loss
    assert DPOTrainer.__dict__["_compute_loss"] is compute_loss and DPOTrainer.__dict__["__init__"] is init
