"""GRPOTrainer end to end: a tiny Llama trained a few steps by stock TRL 1.16 and by TRL patched
with fastalign.integrations.trl, from the same seed, logs the same loss and metrics at every step."""

from __future__ import annotations

import grpo_cases
import pytest
import tiny_trl
import torch

from fastalign import reference as fastalign_reference

trl = pytest.importorskip("trl")

from fastalign.integrations import trl as fa_trl  # noqa: E402

CONFIGS = [
    dict(loss_type="grpo"),
    dict(loss_type="grpo", beta=0.04, gradient_accumulation_steps=2, num_iterations=2),
    dict(loss_type="dr_grpo", beta=0.04),
    dict(loss_type="dapo", epsilon_high=0.28, gradient_accumulation_steps=2, num_iterations=2),
    dict(loss_type="dapo", importance_sampling_level="sequence", num_iterations=2),  # GSPO
    dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.01, num_iterations=2),
    # VESPO with old log-probs (a second iteration): phi from each completion's summed log-ratio.
    dict(loss_type="vespo", beta=0.04, gradient_accumulation_steps=2, num_iterations=2),
    # The fused LM head reads softcapping and the logit scale from the model's config.
    dict(loss_type="dapo", beta=0.04, num_iterations=2, model=dict(final_logit_softcapping=3.0, logit_scale=0.7)),
]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Saved tiny models by config overrides, each saved once."""
    cache = {}

    def saved(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            cache[key] = tiny_trl.saved_causal_lm(tmp_path_factory.mktemp("tiny-llama"), **overrides)
        return cache[key]

    return saved


@pytest.fixture(scope="module")
def model_dir(saved_models):
    return saved_models()


def _trainer(model_dir, output_dir, config):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(**tiny_trl.common_args(output_dir, **config), num_generations=4, max_completion_length=8,
                      temperature=1.0)
    torch.manual_seed(0)
    return GRPOTrainer(model=model_dir, reward_funcs=tiny_trl.length_reward, args=args,
                       train_dataset=Dataset.from_list(tiny_trl.prompt_rows(16)),
                       processing_class=tiny_trl.tokenizer())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_grpo_training_matches_stock_trl(saved_models, tmp_path, config):
    config = dict(config)
    model_dir = saved_models(**config.pop("model", {}))
    stock = tiny_trl.train_logs(lambda: _trainer(model_dir, tmp_path / "stock", config))
    from fastalign.integrations.trl import grpo

    with fa_trl.patched(trainers=("grpo",)), tiny_trl.lm_head_calls() as heads, tiny_trl.Calls(grpo, "grpo_loss") as losses:
        ours = tiny_trl.train_logs(lambda: _trainer(model_dir, tmp_path / "fastalign", config))
    assert not fa_trl.is_patched()
    assert heads.count > 0 and losses.count > 0
    tiny_trl.assert_logs_match(stock, ours)
    assert "entropy" in ours[0]
    assert ("clip_ratio/region_mean" in ours[0]) == (config["loss_type"] not in ("cispo", "vespo"))
    assert ("vespo/phi_seq_mean" in ours[0]) == (config["loss_type"] == "vespo")


@pytest.mark.parametrize("config,match", [
    # A loss type TRL does not know either (TRL itself fails at its first loss).
    (dict(loss_type="future_loss"), r"GRPOConfig.loss_type='future_loss': fastalign serves"),
    (dict(loss_type="vespo", vespo_k_neg=-1.0), r"GRPOConfig.vespo_k_neg: expected a finite number >= 0"),
    (dict(use_adaptive_entropy=True, entropy_coef_min=-0.1), r"GRPOConfig.entropy_coef_min: expected a finite"),
], ids=["unknown-loss-type", "vespo-negative-k", "negative-coefficient-floor"])
def test_unserved_option_fails_at_construction(model_dir, tmp_path, config, match):
    with fa_trl.patched(trainers=("grpo",)), pytest.raises(ValueError, match=match):
        _trainer(model_dir, tmp_path, config)
    _trainer(model_dir, tmp_path, config)  # stock TRL builds it


def test_unpatch_restores_stock_trl():
    import trl.trainer.utils as trl_utils
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.grpo_trainer import GRPOTrainer

    compute_loss, init = GRPOTrainer.__dict__["_compute_loss"], GRPOTrainer.__dict__["__init__"]
    use_triton = trl_utils._use_triton
    fa_trl.patch(trainers=("grpo",))
    try:
        assert trl_utils._ChunkedLogProbFunction is not ChunkedLogProbFunction
        assert GRPOTrainer.__dict__["_compute_loss"] is not compute_loss
        with pytest.raises(RuntimeError, match="already patched"):
            fa_trl.patch()
    finally:
        fa_trl.unpatch()
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert trl_utils._use_triton is use_triton
    assert GRPOTrainer.__dict__["_compute_loss"] is compute_loss and GRPOTrainer.__dict__["__init__"] is init


def test_lm_head_only_patch_leaves_losses_stock():
    import trl.trainer.utils as trl_utils
    from trl.trainer.grpo_trainer import GRPOTrainer

    compute_loss = GRPOTrainer.__dict__["_compute_loss"]
    with fa_trl.patched(losses=False):
        assert GRPOTrainer.__dict__["_compute_loss"] is compute_loss
        assert trl_utils._ChunkedLogProbFunction.__name__ == "FastalignChunkedLogProb"
    with fa_trl.patched(lm_head=False, trainers=("grpo",)):
        assert trl_utils._ChunkedLogProbFunction.__name__ == "ChunkedLogProbFunction"
        assert GRPOTrainer.__dict__["_compute_loss"] is not compute_loss


def test_fused_lm_head_fields_equal_trl_function():
    """The stand-in answers TRL's call with TRL's five outputs (values, dtypes, None for fields not asked)."""
    from trl.kernels import ChunkedLogProbFunction

    from fastalign.integrations.trl.lm_head import FastalignChunkedLogProb

    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(9, 8), torch.randn(37, 8), torch.randn(37)
    labels = torch.randint(0, 37, (9,))
    for outputs in (("log_probs",), ("log_probs", "entropy", "is_top1"),
                    ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        args = (hidden, weight, bias, labels, 0.8, 4096, 4.0, 0.5, outputs)
        theirs, ours = ChunkedLogProbFunction.apply(*args), FastalignChunkedLogProb.apply(*args)
        for name, a, b in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"), theirs, ours):
            if a is None:
                assert b is None, name
            else:
                assert b.dtype == a.dtype, name
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", range(len(grpo_cases.CONFIGS)), ids=lambda i: f"config{i}")
def test_compute_loss_equals_trl_for_every_option(index):
    """The replacement `_compute_loss` against TRL's on the same stand-in trainer, for every option
    the trainer passes on (delta, off-policy masking, the vLLM importance-sampling ratio, every
    loss type, GSPO, the entropy mask and bonus, accumulation): loss, gradient and metrics."""
    from fastalign.integrations.trl import grpo

    config = grpo_cases.CONFIGS[index]
    options, extras = grpo_cases.split_config(config)
    logits, labels, mask, advantages, old, ref = grpo_cases.make_batch()
    inputs, _ = grpo_cases.loss_inputs(options, extras, labels, mask, advantages, old, ref, mask.sum())
    inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    results = []
    for compute_loss in (None, grpo.compute_loss):
        leaf = logits.clone().requires_grad_()
        fields = fastalign_reference.token_logprobs(leaf, labels, temperature=grpo_cases.TEMPERATURE,
                                                    outputs=("entropy",))
        loss, metrics = grpo_cases.trl_compute_loss(options, fields.logps, fields.entropy, inputs, compute_loss)
        (grad,) = torch.autograd.grad(loss, leaf)
        results.append((loss.detach(), grad, metrics))
    (theirs, their_grad, their_metrics), (ours, our_grad, our_metrics) = results
    torch.testing.assert_close(ours.to(theirs.dtype), theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-7)
    grpo_cases.assert_metrics_equal(our_metrics, their_metrics, atol=1e-6)


def test_trainer_built_before_patch_switches_too(model_dir, tmp_path):
    """TRL looks the LM head and the loss method up at call time: patching after construction counts."""
    from fastalign.integrations.trl import grpo

    config = dict(loss_type="dapo", beta=0.04, num_iterations=2, max_steps=2)
    stock = tiny_trl.train_logs(lambda: _trainer(model_dir, tmp_path / "stock", config))
    trainer = _trainer(model_dir, tmp_path / "fastalign", config)
    with fa_trl.patched(), tiny_trl.lm_head_calls() as heads, tiny_trl.Calls(grpo, "grpo_loss") as losses:
        ours = tiny_trl.train_logs(lambda: trainer)
    assert heads.count > 0 and losses.count > 0
    tiny_trl.assert_logs_match(stock, ours)
