"""TRL 1.16's DistillationTrainer end to end: a tiny Llama student (hidden 64) distilled from a wider
teacher (hidden 96) with the same vocabulary, trained a few steps by stock TRL and by TRL patched with
fastalign.integrations.trl (its fused divergence served by fastalign's blocked divergence), from
the same seed: the same loss and entropy logged at every step, for several beta and temperatures.
And GKD's generalized_jsd_loss (experimental GKDTrainer) against TRL's own on logits."""

from __future__ import annotations

import pytest
import tiny_trl
import torch

trl = pytest.importorskip("trl")

from fastalign.integrations import trl as fa_trl  # noqa: E402
from fastalign import linear_divergence  # noqa: E402
from fastalign.integrations.trl import distillation  # noqa: E402

CONFIGS = [
    dict(beta=1.0),
    dict(beta=0.0, temperature=0.8),
    dict(beta=0.5, gradient_accumulation_steps=2, per_device_train_batch_size=2),
    # Softcaps as Gemma's configs carry them (TRL reads each model's final_logit_softcapping).
    dict(beta=0.3, temperature=1.2, student_softcap=8.0, teacher_softcap=5.0),
]


def _trainer(output_dir, config):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    config = dict(config)
    caps = config.pop("student_softcap", None), config.pop("teacher_softcap", None)
    args = DistillationConfig(**tiny_trl.common_args(output_dir, max_completion_length=6, **config))
    student = tiny_trl.causal_lm(seed=0)
    teacher = tiny_trl.causal_lm(seed=1, hidden_size=96, intermediate_size=160)
    for model, cap in zip((student, teacher), caps):
        if cap is not None:
            model.config.final_logit_softcapping = cap
    return DistillationTrainer(model=student, teacher_model=teacher, args=args,
                               train_dataset=Dataset.from_list(tiny_trl.prompt_rows(12)),
                               processing_class=tiny_trl.tokenizer())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_distillation_training_matches_stock_trl(tmp_path, config):
    stock = tiny_trl.train_logs(lambda: _trainer(tmp_path / "stock", config))
    with fa_trl.patched(), tiny_trl.Calls(linear_divergence, "linear_divergence_loss") as calls:
        ours = tiny_trl.train_logs(lambda: _trainer(tmp_path / "ours", config))
    assert calls.count > 0
    assert "entropy" in stock[0]
    tiny_trl.assert_logs_match(stock, ours)


def test_chunked_divergence_gradients_for_any_incoming_gradient():
    """The stand-in's stored gradients serve TRL's uniform incoming gradient; any other (a masked,
    non-compact reduction) is recomputed: both equal TRL's function."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    g = torch.Generator().manual_seed(3)
    hs, ws = torch.randn(7, 12, generator=g), torch.randn(41, 12, generator=g) * 0.5
    ht, wt = torch.randn(7, 20, generator=g), torch.randn(41, 20, generator=g) * 0.5
    for weights in (torch.full((7,), 0.25), torch.linspace(-1.0, 1.0, 7)):
        grads = []
        for fn in (ChunkedDivergenceFunction, distillation.ChunkedDivergence):
            leaves = hs.clone().requires_grad_(), ws.clone().requires_grad_()
            divergence, entropy = fn.apply(leaves[0], leaves[1], None, ht, wt, None, 0.4, 0.9, 1.0, 5.0)
            (divergence * weights).sum().backward()
            grads.append((divergence.detach(), entropy, *(t.grad for t in leaves)))
        for theirs, ours in zip(*grads):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_gkd_generalized_jsd_loss_equals_trl(beta, reduction, with_labels):
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 5, 23, generator=g, requires_grad=True)
    t = torch.randn(2, 5, 23, generator=g)
    labels = torch.randint(0, 23, (2, 5), generator=g) if with_labels else None
    if labels is not None:
        labels[0, :2] = -100
    want = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=0.9, reduction=reduction)
    (want_grad,) = torch.autograd.grad(want, s)
    with fa_trl.patched(trainers="gkd", lm_head=False):
        got = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=0.9, reduction=reduction)
    (got_grad,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    with fa_trl.patched(trainers="gkd", lm_head=False):
        assert GKDTrainer.generalized_jsd_loss.__module__ == distillation.__name__
        with pytest.raises(ValueError, match=r"^reduction: fastalign serves"):
            GKDTrainer.generalized_jsd_loss(s, t, reduction="none")


def _gkd_trainer(output_dir, beta, lmbda):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    # lmbda = 0, seq_kd off: the dataset's completions, no generation (off-policy GKD); lmbda = 1:
    # the student's own sampled completions at every step (on-policy), the same tokens in both runs
    # (the same seed, and models that agree to rounding).
    args = GKDConfig(**tiny_trl.common_args(output_dir), beta=beta, lmbda=lmbda, seq_kd=False, max_length=32,
                     max_new_tokens=6)
    teacher = tiny_trl.causal_lm(seed=1, hidden_size=96, intermediate_size=160)
    return GKDTrainer(model=tiny_trl.causal_lm(seed=0), teacher_model=teacher, args=args,
                      train_dataset=Dataset.from_list(tiny_trl.chat_rows(12)),
                      processing_class=tiny_trl.chat_tokenizer())


@pytest.mark.parametrize(("beta", "lmbda"), [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (0.5, 1.0)])
def test_gkd_training_matches_stock_trl(tmp_path, monkeypatch, beta, lmbda):
    from trl.experimental.gkd import GKDTrainer

    stock = tiny_trl.train_logs(lambda: _gkd_trainer(tmp_path / "stock", beta, lmbda))
    generate, generated = GKDTrainer.generate_on_policy_outputs, []

    def counted(*args, **kwargs):
        generated.append(1)
        return generate(*args, **kwargs)

    monkeypatch.setattr(GKDTrainer, "generate_on_policy_outputs", staticmethod(counted))
    with fa_trl.patched(), tiny_trl.Calls(distillation, "token_divergence") as calls:
        ours = tiny_trl.train_logs(lambda: _gkd_trainer(tmp_path / "ours", beta, lmbda))
    assert calls.count > 0
    assert bool(generated) == (lmbda > 0)
    tiny_trl.assert_logs_match(stock, ours)
