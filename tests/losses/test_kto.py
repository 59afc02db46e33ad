"""KTO / unpaired APO-zero: TRL's own KTOTrainer._compute_loss, a float64 eager ground truth on every
backend, properties, one-sided batches, empty completions and argument errors."""

from __future__ import annotations

import collections
import math
import types

import pytest
import torch
from conftest import DEVICE, backend_params
from numerics import assert_as_accurate_as_reference

import fastalign
from fastalign.kto import KTOLoss, kl_baseline, kto_loss, kto_loss_from_logits
from fastalign.sequence import sequence_logprobs

kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")
KTOTrainer = kto_trainer.KTOTrainer

B, T, V = 4, 6, 97
DESIRABLE = [True, False, True, True]
CONFIGS = {
    "kto": {"loss_type": "kto"},
    "kto-weighted": {"loss_type": "kto", "beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.7},
    "apo_zero_unpaired": {"loss_type": "apo_zero_unpaired", "beta": 0.2, "undesirable_weight": 2.0},
}


class FakeCausalLM:
    """Stands in for a model with TRL's fused LM head: per-token log-probs, entropy and mean logits of
    fixed logits, chosen by which input_ids tensor the trainer passes."""

    def __init__(self, *pairs):
        self.pairs = pairs  # (input_ids, logits [B, L, V])

    def __call__(self, input_ids, labels, fused_lm_head, **kwargs):
        assert fused_lm_head
        logits = next(z for ids, z in self.pairs if ids is input_ids)[:, :-1]
        targets = labels[:, 1:]
        logp = torch.log_softmax(logits, dim=-1)
        valid = targets != -100
        tokens = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return types.SimpleNamespace(
            log_probs=torch.where(valid, tokens, 0.0), entropy=torch.where(valid, entropy, 0.0),
            mean_logits=logits.mean(-1),
        )


def trl_trainer(config: dict) -> types.SimpleNamespace:
    """The KTOTrainer attributes `_compute_loss` reads (reference log-probs precomputed, one process)."""
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device=torch.device(DEVICE), gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        calculate_KL=config.get("loss_type", "kto") != "apo_zero_unpaired",
        loss_type=config.get("loss_type", "kto"),
        beta=config.get("beta", 0.1),
        desirable_weight=config.get("desirable_weight", 1.0),
        undesirable_weight=config.get("undesirable_weight", 1.0),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    return trainer


def make_batch(dtype=torch.float64, desirable=DESIRABLE, length=T + 1):
    """A KTOTrainer batch (prompt of 2 tokens, right padding, mismatched KL rows) and logits for both."""
    def sequences():
        ids = torch.randint(1, V, (B, length), device=DEVICE)
        attention = torch.ones(B, length, dtype=torch.long, device=DEVICE)
        attention[1, -2:] = 0
        completion = attention.clone()
        completion[:, :2] = 0
        return ids.masked_fill(attention == 0, 0), attention, completion

    ids, attention, completion = sequences()
    kl_ids, kl_attention, kl_completion = sequences()
    batch = {
        "input_ids": ids, "attention_mask": attention, "completion_mask": completion,
        "KL_input_ids": kl_ids, "KL_attention_mask": kl_attention, "KL_completion_mask": kl_completion,
        "label": torch.tensor(desirable, device=DEVICE),
        "ref_logps": -torch.rand(B, device=DEVICE, dtype=torch.float64) * 5 - 12,
    }
    logits = (torch.randn(B, length, V, device=DEVICE) * 2).to(dtype)
    kl_logits = (torch.randn(B, length, V, device=DEVICE) * 2).to(dtype)
    return batch, logits, kl_logits


def policy_kl_logps(batch, kl_logits):
    with torch.no_grad():
        return sequence_logprobs(kl_logits[:, :-1], batch["KL_input_ids"][:, 1:],
                                 completion_mask=batch["KL_completion_mask"][:, 1:]).logps


def our_call(batch, logits, kl_logits, config, ref_kl_logps=None):
    kwargs = dict(config)
    if config.get("loss_type", "kto") == "kto":
        kwargs.update(kl_logps=policy_kl_logps(batch, kl_logits), ref_kl_logps=ref_kl_logps)
    return (logits[:, :-1], batch["input_ids"][:, 1:], batch["ref_logps"], batch["label"]), {
        "completion_mask": batch["completion_mask"][:, 1:], **kwargs,
    }


# TRL's own code ---------------------------------------------------------------------------------


@pytest.mark.parametrize("desirable", [DESIRABLE, [True] * B, [False] * B], ids=["mixed", "desirable", "undesirable"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kl_sign", [1.0, -1.0], ids=["kl-positive", "kl-clamped"])
def test_equals_trl_compute_loss(config, desirable, kl_sign):
    """The whole KTOTrainer step on the same logits: loss, gradient and every metric TRL logs.
    TRL leaves a one-sided batch's missing metrics out; they are NaN here."""
    batch, logits, kl_logits = make_batch(desirable=desirable)
    # ref_KL_logps below (or above) the policy's, so the mean KL is positive (or clamped to 0).
    batch["ref_KL_logps"] = policy_kl_logps(batch, kl_logits) - kl_sign * (torch.rand(B, dtype=torch.float64) + 0.5)
    trl_leaf = logits.clone().requires_grad_(True)
    trainer = trl_trainer(CONFIGS[config])
    model = FakeCausalLM((batch["input_ids"], trl_leaf), (batch["KL_input_ids"], kl_logits))
    want_loss = KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    want_loss.backward()
    want_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}

    leaf = logits.clone().requires_grad_(True)
    args, kwargs = our_call(batch, leaf, kl_logits, CONFIGS[config], batch["ref_KL_logps"])
    out = kto_loss_from_logits(*args, **kwargs)
    out.loss.backward()
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(leaf.grad, trl_leaf.grad, rtol=1e-9, atol=1e-12)
    if kl_sign < 0 and config != "apo_zero_unpaired":
        assert out.metrics["kl"].item() == 0.0
    for name, value in out.metrics.items():
        if name in want_metrics:
            assert value.item() == pytest.approx(want_metrics[name], rel=1e-5, abs=1e-6), name
        else:
            assert math.isnan(value.item()), name
    assert set(want_metrics) <= set(out.metrics)


# Every backend against a float64 eager ground truth ------------------------------------------------


def eager_from_logits(logits, labels, ref_logps, desirable, completion_mask, **options):
    """log_softmax -> gather -> masked sums in float64, then the same per-sequence math."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    tokens = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    mask = completion_mask.bool()
    out = kto_loss(torch.where(mask, tokens, 0.0).sum(-1), ref_logps, desirable, **options)
    entropy = -(logp.exp() * logp).sum(-1)
    mean_logits = logits.double().mean(-1)
    out.metrics["entropy"] = entropy[mask].mean().float()
    for group, name in ((desirable, "logits/chosen"), (~desirable, "logits/rejected")):
        m = mask & group.unsqueeze(-1)
        out.metrics[name] = (mean_logits[m].sum() / m.sum()).float()
    return out


def loss_and_grad(fn, logits, *args, **kwargs):
    leaf = logits.detach().clone().requires_grad_(True)
    out = fn(leaf, *args, **kwargs)
    out.loss.backward()
    return out, leaf.grad


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", ["kto-weighted", "apo_zero_unpaired"])
def test_from_logits_matches_float64_truth(backend, dtype, config):
    batch, full, kl_full = make_batch(dtype)
    ref_kl = policy_kl_logps(batch, kl_full) - 0.3
    args, kwargs = our_call(batch, full, kl_full, CONFIGS[config], ref_kl)
    logits, rest = args[0], args[1:]
    truth, truth_grad = loss_and_grad(eager_from_logits, logits, *rest, **kwargs)
    with fastalign.use_backend("reference"):
        ref, ref_grad = loss_and_grad(kto_loss_from_logits, logits, *rest, **kwargs)
    module = KTOLoss(**CONFIGS[config])
    module_kwargs = {k: v for k, v in kwargs.items() if k not in CONFIGS[config]}
    with fastalign.use_backend(backend):
        got, got_grad = loss_and_grad(module, logits, *rest, **module_kwargs)
    assert got.loss.dtype == torch.float32 and got_grad.dtype == dtype
    assert abs(ref.loss.item() - truth.loss.item()) <= 1e-5 * (1 + abs(truth.loss.item()))
    assert_as_accurate_as_reference(got.loss, ref.loss, truth.loss, "loss")
    assert_as_accurate_as_reference(got_grad, ref_grad, truth_grad, "grad")
    assert set(got.metrics) == set(truth.metrics)
    for name, value in got.metrics.items():
        assert value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad, name
        assert_as_accurate_as_reference(value, ref.metrics[name], truth.metrics[name], name)


# Properties -----------------------------------------------------------------------------------------


def test_policy_equal_to_reference_gives_half_weighted():
    """policy = reference: every log-ratio and z are 0, so each loss is 1 - sigmoid(0) = 1/2 (times its
    weight) and every reward is 0."""
    logps = -torch.rand(B) * 20
    desirable = torch.tensor(DESIRABLE)
    out = kto_loss(logps, logps, desirable, kl_logps=logps, ref_kl_logps=logps, desirable_weight=1.5,
                   undesirable_weight=0.5)
    want = (1.5 * desirable.sum() + 0.5 * (~desirable).sum()) / B / 2
    assert out.loss.item() == pytest.approx(want.item(), abs=1e-7)
    for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert out.metrics[name].item() == 0.0, name
    apo = kto_loss(logps, logps, desirable, loss_type="apo_zero_unpaired")
    assert apo.loss.item() == pytest.approx(0.5, abs=1e-7)


def test_kl_baseline_is_detached_and_clamped():
    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    assert kl_baseline(policy, torch.tensor([-4.0, -4.5])).item() == pytest.approx(0.25)
    assert kl_baseline(policy, torch.tensor([-1.0, -2.0])).item() == 0.0
    assert not kl_baseline(policy, torch.tensor([-4.0, -4.5])).requires_grad
    logps, ref = torch.tensor([-3.0, -4.5], requires_grad=True), torch.tensor([-4.0, -4.5])
    out = kto_loss(logps, ref, torch.tensor([True, False]), kl_logps=logps, ref_kl_logps=ref)
    out.loss.backward()
    # Log-ratios (1, 0), z = 0.5; only the log-ratios carry the gradient, z is a constant.
    beta, z, x = 0.1, torch.tensor(0.5), torch.tensor([1.0, 0.0])
    sig = torch.sigmoid
    want = torch.stack([
        -beta * sig(-beta * (x[0] - z)) * sig(beta * (x[0] - z)),
        beta * sig(-beta * (z - x[1])) * sig(beta * (z - x[1])),
    ]) / 2
    assert out.metrics["kl"].item() == pytest.approx(0.5)
    torch.testing.assert_close(logps.grad, want)


def test_precomputed_kl_equals_kl_logps():
    logps, ref = -torch.rand(B) * 20, -torch.rand(B) * 20
    kl_logps, ref_kl = -torch.rand(B) * 20, -torch.rand(B) * 20 - 3
    desirable = torch.tensor(DESIRABLE)
    by_logps = kto_loss(logps, ref, desirable, kl_logps=kl_logps, ref_kl_logps=ref_kl)
    by_value = kto_loss(logps, ref, desirable, kl=(kl_logps - ref_kl).mean())
    by_float = kto_loss(logps, ref, desirable, kl=float((kl_logps - ref_kl).mean()))
    torch.testing.assert_close(by_value.loss, by_logps.loss)
    torch.testing.assert_close(by_float.loss, by_logps.loss)
    clamped = kto_loss(logps, ref, desirable, kl=-3.0)
    assert clamped.metrics["kl"].item() == 0.0


def test_flipping_every_label_flips_margins_for_apo_zero():
    logps, ref = -torch.rand(B) * 20, -torch.rand(B) * 20
    desirable = torch.tensor([True, False, True, False])
    out = kto_loss(logps, ref, desirable, loss_type="apo_zero_unpaired")
    flipped = kto_loss(logps, ref, ~desirable, loss_type="apo_zero_unpaired")
    torch.testing.assert_close(flipped.metrics["rewards/margins"], -out.metrics["rewards/margins"])
    # apo-zero: desirable 1 - sigmoid(x) and undesirable sigmoid(x) sum to 1 for every completion.
    assert (out.loss + flipped.loss).item() == pytest.approx(1.0, abs=1e-6)


def test_one_sided_batch_has_a_loss_and_nan_metrics_for_the_missing_group():
    logps, ref = -torch.rand(B) * 20, -torch.rand(B) * 20
    out = kto_loss(logps, ref, torch.ones(B, dtype=torch.bool), kl=0.2)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(out.metrics["rewards/chosen"])
    for name in ("rewards/rejected", "logps/rejected", "rewards/margins"):
        assert math.isnan(out.metrics[name].item()), name


def test_integer_labels_are_accepted():
    logps, ref = -torch.rand(B) * 20, -torch.rand(B) * 20
    as_bool = kto_loss(logps, ref, torch.tensor(DESIRABLE), kl=0.1)
    as_int = kto_loss(logps, ref, torch.tensor(DESIRABLE).long(), kl=0.1)
    torch.testing.assert_close(as_int.loss, as_bool.loss)


# Empty completions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
def test_fully_masked_completion_counts_as_log_prob_zero(backend):
    batch, full, kl_full = make_batch(torch.float32)
    batch["completion_mask"][0] = 0
    args, kwargs = our_call(batch, full, kl_full, CONFIGS["kto"], policy_kl_logps(batch, kl_full) - 1)
    leaf = args[0].detach().clone().requires_grad_(True)
    with fastalign.use_backend(backend):
        out = kto_loss_from_logits(leaf, *args[1:], **kwargs)
        out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(leaf.grad).all()
    assert torch.equal(leaf.grad[0], torch.zeros_like(leaf.grad[0]))
    want = eager_from_logits(args[0], *args[1:], **kwargs)
    torch.testing.assert_close(out.loss.double(), want.loss, rtol=1e-5, atol=1e-6)


# Errors -----------------------------------------------------------------------------------------------

LOGPS, REF, LABELS = -torch.ones(B), -torch.ones(B), torch.tensor(DESIRABLE)
KL = {"kl_logps": -torch.ones(B), "ref_kl_logps": -torch.ones(B)}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"loss_type": "kto_pair"}, ValueError,
         "loss_type: expected one of 'kto', 'apo_zero_unpaired'; got 'kto_pair'"),
        ({"beta": 0.0}, ValueError, "beta: expected a finite number > 0"),
        ({"beta": -2.0}, ValueError, "beta"),
        ({"desirable_weight": -1.0}, ValueError, "desirable_weight: expected a number >= 0"),
        ({"undesirable_weight": math.nan}, ValueError, "undesirable_weight"),
        ({"desirable_weight": 0.0, "undesirable_weight": 0.0}, ValueError,
         "desirable_weight, undesirable_weight: both"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        kto_loss(LOGPS, REF, LABELS, **KL, **kwargs)
    with pytest.raises(error, match=match):
        KTOLoss(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "kl_logps: loss_type='kto' needs the KL baseline"),
        ({"kl_logps": -torch.ones(B)}, "ref_kl_logps: loss_type='kto' needs the KL baseline"),
        ({**KL, "kl": 0.1}, "kl: pass either the estimate kl or kl_logps"),
        ({"kl_logps": -torch.ones(1), "ref_kl_logps": -torch.ones(1)}, "kl_logps: the KL baseline needs at least 2"),
        ({"kl_logps": -torch.ones(3), "ref_kl_logps": -torch.ones(2)}, r"ref_kl_logps: expected shape \(3,\)"),
        ({"kl": torch.ones(2)}, "kl: expected a single floating-point value"),
        ({"kl": math.inf}, "kl: expected a finite number"),
        ({**KL, "loss_type": "apo_zero_unpaired"}, "kl_logps: loss_type='apo_zero_unpaired' has no KL baseline"),
        ({"kl": 0.0, "loss_type": "apo_zero_unpaired"}, "kl: loss_type='apo_zero_unpaired' has no KL baseline"),
    ],
)
def test_bad_kl_baseline(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kto_loss(LOGPS, REF, LABELS, **kwargs)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((LOGPS, -torch.ones(3), LABELS), ValueError, r"ref_logps: expected shape \(4,\) \(that of policy_logps\)"),
        ((LOGPS, REF, LABELS[:3]), ValueError, r"desirable: expected shape \(4,\)"),
        ((LOGPS, REF, torch.ones(B)), TypeError, "desirable: expected a bool"),
        ((LOGPS, REF, DESIRABLE), TypeError, "desirable: expected a torch.Tensor"),
        ((LOGPS.unsqueeze(0), REF, LABELS), ValueError, "policy_logps: expected a 1-d tensor"),
        ((torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool)), ValueError,
         "policy_logps: the batch is empty"),
    ],
)
def test_bad_sequence_tensors(args, error, match):
    with pytest.raises(error, match=match):
        kto_loss(*args, kl=0.0)


def test_bad_logits_inputs():
    logits, labels = torch.randn(B, T, V), torch.randint(0, V, (B, T))
    with pytest.raises(ValueError, match=r"logits: expected \[B, T, V\]"):
        kto_loss_from_logits(logits[0], labels[0], REF, LABELS, kl=0.0)
    with pytest.raises(ValueError, match=r"ref_logps: expected shape \(4,\)"):
        kto_loss_from_logits(logits, labels, REF[:2], LABELS, kl=0.0)
    with pytest.raises(ValueError, match=r"completion_mask: expected shape \(4, 6\)"):
        KTOLoss()(logits, labels, REF, LABELS, completion_mask=torch.ones(B, T + 1), kl=0.0)
    with pytest.raises(ValueError, match="kl_logps: loss_type='kto' needs"):
        KTOLoss()(logits, labels, REF, LABELS)
