"""token_divergence: the reference against TRL's own divergences (GKD's generalized_jsd_loss and
the DistillationTrainer's ChunkedDivergenceFunction), gradcheck of every divergence for both
models, every backend against a float64 truth (dtypes, strides, transforms, masks, -inf and NaN
logits), and the argument errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, backend_params
from numerics import assert_as_accurate_as_reference
from peers import require

import fastalign
from fastalign import token_divergence

DIVERGENCES = ["jsd", "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "tv"]


def pair(n=6, v=37, dtype=torch.float64, scale=(3.0, 2.0), seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * scale[0]
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * scale[1]
    return s.to(DEVICE, dtype), t.to(DEVICE, dtype)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_reference_equals_trl_gkd_generalized_jsd(beta, temperature):
    GKDTrainer = require("trl.experimental.gkd").GKDTrainer
    s, t = pair()
    labels = torch.randint(0, 5, (1, 6))
    labels[0, 2] = -100
    want = GKDTrainer.generalized_jsd_loss(s[None], t[None], labels=labels, beta=beta, temperature=temperature,
                                           reduction="sum")
    with fastalign.use_backend("reference"):
        got = token_divergence(s, t, beta=beta, temperature=temperature, labels=labels[0]).divergence
    torch.testing.assert_close(got.sum(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "transform",
    [{}, dict(temperature=0.8, student_logit_scale=0.5, teacher_logit_scale=1.7),
     dict(student_softcap=4.0, teacher_softcap=2.5, temperature=1.3, student_logit_scale=2.0)],
)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_reference_equals_trl_chunked_divergence(beta, transform):
    """TRL's DistillationTrainer kernel (its torch path on CPU), from hidden states through an
    identity lm_head, so that its logits are ours: divergence, entropy and student gradient."""
    ChunkedDivergenceFunction = require("trl.kernels.chunked_divergence").ChunkedDivergenceFunction
    s, t = pair(dtype=torch.float32)
    eye = torch.eye(s.shape[-1])
    leaf = s.clone().requires_grad_()
    trl_args = (transform.get("temperature", 1.0), transform.get("student_logit_scale", 1.0),
                transform.get("student_softcap"), transform.get("teacher_logit_scale", 1.0),
                transform.get("teacher_softcap"))
    want, want_entropy = ChunkedDivergenceFunction.apply(leaf, eye, None, t, eye, None, beta, *trl_args)
    want.sum().backward()
    ours = s.double().requires_grad_()
    with fastalign.use_backend("reference"):
        got = token_divergence(ours, t.double(), beta=beta, outputs=("entropy",), **transform)
    got.divergence.sum().backward()
    torch.testing.assert_close(got.divergence.float(), want, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(got.entropy.float(), want_entropy, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(ours.grad.float(), leaf.grad, rtol=2e-5, atol=2e-7)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_gradcheck_student_and_teacher(divergence):
    s, t = pair(n=3, v=7)
    s, t = s.cpu().requires_grad_(), t.cpu().requires_grad_()
    mask = torch.tensor([True, False, True])

    def f(a, b):
        return token_divergence(a, b, divergence=divergence, beta=0.3, skew=0.2, temperature=0.8,
                                student_softcap=3.0, teacher_logit_scale=-0.5, mask=mask).divergence

    with fastalign.use_backend("reference"):
        assert torch.autograd.gradcheck(f, (s, t))


def test_hand_computed_values():
    """p_s = (1/2, 1/2), p_t = (1, 0) in the limit: forward KL = log 2 ... checked on finite logits."""
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # p_t = (3/4, 1/4)
    p_s, p_t = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.75, 0.25], dtype=torch.float64)
    m = 0.5 * p_s + 0.5 * p_t
    want = {
        "forward_kl": (p_t * (p_t / p_s).log()).sum(),
        "reverse_kl": (p_s * (p_s / p_t).log()).sum(),
        "jsd": 0.5 * (p_t * (p_t / m).log()).sum() + 0.5 * (p_s * (p_s / m).log()).sum(),
        "tv": torch.tensor(0.25, dtype=torch.float64),
        "skew_forward_kl": (p_t * (p_t / (0.2 * p_t + 0.8 * p_s)).log()).sum(),
        "skew_reverse_kl": (p_s * (p_s / (0.2 * p_s + 0.8 * p_t)).log()).sum(),
    }
    for name, value in want.items():
        for backend in ("reference", "native"):
            with fastalign.use_backend(backend):
                got = token_divergence(s, t, divergence=name, beta=0.5, skew=0.2).divergence
            torch.testing.assert_close(got[0], value, rtol=1e-12, atol=1e-14, msg=f"{name} on {backend}")


def _run(backend, s, t, divergence, kwargs, teacher_grad=True):
    leaf_s = s.clone().requires_grad_()
    leaf_t = t.clone().requires_grad_(teacher_grad)
    with fastalign.use_backend(backend):
        out = token_divergence(leaf_s, leaf_t, divergence=divergence, outputs=("entropy",), **kwargs)
    weight = torch.linspace(-1.0, 2.0, out.divergence.numel(), dtype=torch.float64, device=s.device)
    (out.divergence.double().reshape(-1) * weight).sum().backward()
    return out.divergence, out.entropy, leaf_s.grad, leaf_t.grad


CASES = {
    "plain beta 0.5": dict(beta=0.5),
    "forward kl by beta 0": dict(beta=0.0),
    "reverse kl by beta 1": dict(beta=1.0, temperature=0.6),
    "transforms": dict(beta=0.2, skew=0.3, temperature=0.9, student_softcap=6.0, student_logit_scale=1.5,
                       teacher_logit_scale=-0.8),
    "teacher softcap": dict(beta=0.7, teacher_softcap=3.0, temperature=1.4),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_backend_as_accurate_as_reference(divergence, case, dtype, backend):
    kwargs = dict(CASES[case])
    g = torch.Generator().manual_seed(3)
    # A strided view of the student (a trainer's logits[:, :-1]), -inf entries in both and a
    # vocabulary that is not a multiple of any block.
    base = (torch.randn(2, 5, 2600, generator=g, dtype=torch.float64) * 3).to(DEVICE)
    s64 = base[:, :-1]
    t64 = (torch.randn(2, 4, 2600, generator=g, dtype=torch.float64) * 2).to(DEVICE)
    s64[0, 1, :300] = float("-inf")
    t64[0, 1, :300] = float("-inf")
    t64[1, 2, 7:90] = float("-inf")
    mask = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    mask[1, 0] = False
    kwargs["mask"] = mask
    truth = _run("reference", s64, t64, divergence, kwargs)
    base_d = base.to(dtype)
    s, t = base_d[:, :-1], t64.to(dtype)
    reference = _run("reference", s, t, divergence, kwargs)
    got = _run(backend, s, t, divergence, kwargs)
    # Rows where the divergence is infinite (a teacher zero under the student's mass, reverse
    # directions) have no gradient to compare; their values still must match.
    finite = torch.isfinite(truth[0])
    for i, name in enumerate(("divergence", "entropy")):
        assert_as_accurate_as_reference(got[i], reference[i], truth[i], name, slack_eps=8.0)
    for i, name in ((2, "student grad"), (3, "teacher grad")):
        assert_as_accurate_as_reference(got[i][finite], reference[i][finite], truth[i][finite], name, slack_eps=8.0)
    assert bool((got[2][~mask] == 0).all()) and bool((got[0][~mask] == 0).all())


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_kl_maxima_moving_across_blocks(divergence, temperature, backend):
    # The KLs are read once per row with sums rebased as either model's running maximum moves:
    # rows whose maxima climb block by block (by different amounts for the two models), jump far
    # enough that the earlier mass underflows, start with a whole block of -inf in one model, or
    # sit at |z| ~ 1e4.
    V = 5000
    g = torch.Generator().manual_seed(11)
    s = torch.randn(6, V, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, V, generator=g, dtype=torch.float64) * 3
    ramp = torch.arange(V, dtype=torch.float64) / 1000
    s[0] += 7 * ramp
    t[0] += 15 * ramp
    s[1] -= 10 * ramp
    t[1, 2500:] += 200.0
    s[2, :2100] = float("-inf")
    t[3, :2100] = float("-inf")
    s[3, 4000:] += 60.0
    s[4] += 1e4
    t[4] += 1e4 + 40 * ramp
    t[5, :4500] = float("-inf")
    s[5, 4990:] = float("-inf")
    s, t = s.to(DEVICE), t.to(DEVICE)
    kwargs = dict(temperature=temperature)
    truth = _run("reference", s[None], t[None], divergence, kwargs)
    s32, t32 = s.float()[None], t.float()[None]
    reference = _run("reference", s32, t32, divergence, kwargs)
    got = _run(backend, s32, t32, divergence, kwargs)
    assert not bool(torch.isfinite(truth[0]).all()) and bool(torch.isfinite(truth[0]).any())
    finite = torch.isfinite(truth[0])
    for i, name in enumerate(("divergence", "entropy")):
        assert_as_accurate_as_reference(got[i], reference[i], truth[i], name, slack_eps=8.0)
    for i, name in ((2, "student grad"), (3, "teacher grad")):
        assert_as_accurate_as_reference(got[i][finite], reference[i][finite], truth[i][finite], name, slack_eps=8.0)


@pytest.mark.parametrize("backend", backend_params())
def test_nan_and_empty_rows(backend):
    dtype = torch.float32
    s, t = pair(n=4, v=300, dtype=dtype)
    s[0, 5] = float("nan")
    t[1, :] = float("-inf")  # no distribution: NaN
    s[2, :] = float("-inf")
    with fastalign.use_backend(backend):
        out = token_divergence(s, t, beta=0.4, outputs=("entropy",))
    assert out.divergence[:3].isnan().all() and torch.isfinite(out.divergence[3])
    assert out.entropy[0].isnan() and out.entropy[2].isnan() and torch.isfinite(out.entropy[1])
    with fastalign.use_backend(backend):
        empty = token_divergence(s[:0], t[:0])
    assert empty.divergence.shape == (0,)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, t: token_divergence(s, t[:, :-1]), r"^teacher_logits: expected shape \(6, 37\)"),
        (lambda s, t: token_divergence(s.long(), t), r"^student_logits: expected floating-point logits"),
        (lambda s, t: token_divergence(s, [1.0]), r"^teacher_logits: expected a torch.Tensor"),
        (lambda s, t: token_divergence(s, t, divergence="js"), r"^divergence: expected one of"),
        (lambda s, t: token_divergence(s, t, beta=1.5), r"^beta: the JSD interpolation must lie in \[0, 1\]"),
        (lambda s, t: token_divergence(s, t, divergence="skew_forward_kl", skew=1.0), r"^skew: "),
        (lambda s, t: token_divergence(s, t, temperature=0.0), r"^temperature"),
        (lambda s, t: token_divergence(s, t, student_softcap=-1.0), r"^student_softcap"),
        (lambda s, t: token_divergence(s, t, teacher_logit_scale=0.0), r"^teacher_logit_scale: must be nonzero"),
        (lambda s, t: token_divergence(s, t, mask=torch.ones(5)), r"^mask: expected shape \(6,\)"),
        (lambda s, t: token_divergence(s, t, labels=torch.ones(6, 1)), r"^labels: expected shape \(6,\)"),
        (lambda s, t: token_divergence(s, t, outputs=("entropy", "kl")), r"^outputs: unknown field"),
    ],
)
def test_bad_arguments_are_named(call, match):
    s, t = pair()
    with pytest.raises((ValueError, TypeError), match=match):
        call(s, t)


def _trl_chunked_loss(s, t, mask, beta, num_items_in_batch=None, **transform):
    """TRL's DistillationTrainer loss (`_chunked_divergence_loss`) on logits through identity heads."""
    trl_loss = require("trl.trainer.distillation_trainer")._chunked_divergence_loss
    eye = torch.eye(s.shape[-1], dtype=s.dtype)
    return trl_loss(s, t, eye, eye, mask, beta, num_items_in_batch=num_items_in_batch, **transform)


@pytest.mark.parametrize("num_items_in_batch", [None, 17])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_loss_equals_trl_distillation_trainer(beta, num_items_in_batch):
    s, t = pair(n=8, v=29, dtype=torch.float32)
    s, t = s.view(2, 4, 29), t.view(2, 4, 29)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]])
    leaf = s.clone().requires_grad_()
    loss, entropy_sum, n_valid = _trl_chunked_loss(leaf, t, mask, beta, num_items_in_batch, temperature=0.9,
                                                   student_final_logit_softcapping=5.0)
    loss.backward()
    ours = s.clone().requires_grad_()
    out = fastalign.distillation_loss(ours, t, completion_mask=mask, beta=beta, temperature=0.9, student_softcap=5.0,
                                      num_items_in_batch=num_items_in_batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["entropy"], entropy_sum / n_valid, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.grad, leaf.grad, rtol=1e-5, atol=1e-7)


def test_distillation_loss_reductions_and_errors():
    s, t = pair(n=4, v=11)
    mask = torch.tensor([1, 0, 1, 1])
    per_token = token_divergence(s, t, mask=mask).divergence
    torch.testing.assert_close(fastalign.distillation_loss(s, t, completion_mask=mask, reduction="sum").loss,
                               per_token.sum())
    torch.testing.assert_close(fastalign.distillation_loss(s, t, completion_mask=mask).loss, per_token.sum() / 3)
    empty = fastalign.distillation_loss(s, t, completion_mask=torch.zeros(4))
    assert empty.loss.item() == 0.0 and empty.metrics["entropy"].item() == 0.0
    with pytest.raises(ValueError, match=r"^reduction: expected one of"):
        fastalign.distillation_loss(s, t, reduction="batchmean")
    with pytest.raises(ValueError, match=r"^num_items_in_batch: expected a finite number > 0"):
        fastalign.distillation_loss(s, t, num_items_in_batch=0)
    with pytest.raises(ValueError, match=r"^num_items_in_batch: only used with reduction='mean'"):
        fastalign.distillation_loss(s, t, reduction="sum", num_items_in_batch=3)
    with pytest.raises(ValueError, match=r"^beta: "):
        fastalign.DistillationLoss(beta=2.0)
    with pytest.raises(ValueError, match=r"^student_softcap"):
        fastalign.DistillationLoss(student_softcap=0.0)
    module = fastalign.DistillationLoss(beta=0.0, temperature=0.5)
    torch.testing.assert_close(module(s, t).loss, fastalign.distillation_loss(s, t, beta=0.0, temperature=0.5).loss)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def divergence_cases(draw):
    """(student, teacher [B, T, V] in some layout, options) with extreme values drawn in."""
    B, T = draw(st.integers(0, 3)), draw(st.integers(1, 4))
    V = draw(st.sampled_from([1, 2, 3, 7, 16, 31, 127, 300]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    layout = draw(st.sampled_from(["contiguous", "shifted", "strided_vocab", "transposed"]))
    magnitude = draw(st.sampled_from([0.1, 3.0, 30.0]))
    offset = draw(st.sampled_from([0.0, 0.0, 1e4]))  # |z| ~ 1e4: differences of close values stay exact
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def logits():
        x = torch.randn(B, T + 1, 2 * V, generator=g) * magnitude + offset
        if layout == "shifted":
            return x[:, :-1, :V]
        if layout == "strided_vocab":
            return x[:, :T, ::2]
        if layout == "transposed":
            return x[:, :T, :V].transpose(0, 1).contiguous().transpose(0, 1)
        return x[:, :T, :V].contiguous()

    s, t = logits(), logits()
    if draw(st.booleans()) and B and V > 1:
        s[0, 0, : V // 2] = float("-inf")
        t[0, 0, : V // 2] = float("-inf")
    if offset:  # fp16 cannot hold 1e4 + small differences: only the wide dtypes take the offset
        dtype = draw(st.sampled_from([torch.float32]))
    options = dict(
        divergence=draw(st.sampled_from(DIVERGENCES)), beta=draw(st.sampled_from([0.0, 0.3, 1.0])),
        skew=draw(st.sampled_from([0.0, 0.5])), temperature=draw(st.sampled_from([1.0, 0.6])),
        student_softcap=draw(st.sampled_from([None, 20.0])) if not offset else None,
        teacher_logit_scale=draw(st.sampled_from([1.0, -0.7])) if not offset else 1.0,
    )
    mask = (torch.rand(B, T, generator=g) > 0.3) if draw(st.booleans()) else None
    return s.to(DEVICE, dtype), t.to(DEVICE, dtype), mask if mask is None else mask.to(DEVICE), options


@settings(max_examples=60)
@given(case=divergence_cases())
def test_property_backends_agree_with_float64(case):
    s, t, mask, options = case
    options = dict(options)
    divergence = options.pop("divergence")
    truth = _run("reference", s.double(), t.double(), divergence, dict(options, mask=mask))
    for backend in [b for b in ("native", "triton") if fastalign.available_backends(DEVICE)[b][0]]:
        reference = _run("reference", s, t, divergence, dict(options, mask=mask))
        got = _run(backend, s, t, divergence, dict(options, mask=mask))
        finite = torch.isfinite(truth[0])
        for i, name in ((0, "divergence"), (1, "entropy")):
            assert_as_accurate_as_reference(got[i], reference[i], truth[i], f"{backend} {name}", slack_eps=16.0)
        for i, name in ((2, "student grad"), (3, "teacher grad")):
            assert_as_accurate_as_reference(got[i][finite], reference[i][finite], truth[i][finite],
                                            f"{backend} {name}", slack_eps=16.0)
    # Divergences are >= 0 up to rounding, and 0 (with no gradient) where the two models agree.
    assert bool((truth[0][torch.isfinite(truth[0])] >= -1e-12).all())


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_models_give_zero(divergence, backend):
    s, _ = pair(n=5, v=300, dtype=torch.float32)
    with fastalign.use_backend(backend):
        leaf = s.clone().requires_grad_()
        out = token_divergence(leaf, s, divergence=divergence, beta=0.4, skew=0.3)
        out.divergence.sum().backward()
    assert float(out.divergence.abs().max()) < 1e-6
    assert float(leaf.grad.abs().max()) < 1e-6
