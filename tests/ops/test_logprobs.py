"""token_logprobs on every live backend against a float64 ground truth."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, backend_params
from numerics import assert_as_accurate_as_reference

import fastalign
from fastalign import reference
from fastalign.logprobs import _as_rows

ALL_FIELDS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
FLOAT_FIELDS = ("logps", "entropy", "log_sum_sq_probs", "mean_logits")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTIONS = {
    "plain": {},
    "temperature": {"temperature": 0.7},
    "softcap": {"softcap": 30.0, "logit_scale": 0.5, "temperature": 0.9},
    "scale": {"logit_scale": 2.0},
    # The forward sweeps need a non-negative scale and negate the logits for a negative one.
    "negative_scale": {"logit_scale": -1.5, "temperature": 0.8},
    "negative_scale_softcap": {"logit_scale": -0.5, "softcap": 20.0},
    "zero_scale": {"logit_scale": 0.0},
}


def run(fn, logits, labels, grads=None, **kwargs):
    """Fields and d(sum(logps * g1) + sum(entropy * g2))/dlogits through `fn`."""
    leaf = logits.detach().clone().requires_grad_(True)
    out = fn(leaf, labels, outputs=ALL_FIELDS, **kwargs)
    fields = {name: getattr(out, name) for name in ("logps",) + ALL_FIELDS}
    if grads is None:
        grads = (torch.randn_like(out.logps, dtype=torch.float64), torch.randn_like(out.logps, dtype=torch.float64))
    loss = (out.logps.double() * grads[0]).sum() + (out.entropy.double() * grads[1]).sum()
    loss.backward()
    return fields, leaf.grad, grads


def on_backend(backend):
    def call(*args, **kwargs):
        with fastalign.use_backend(backend):
            return fastalign.token_logprobs(*args, **kwargs)

    return call


def check_against_truth(backend, logits, labels, **kwargs):
    truth, truth_grad, grads = run(reference.token_logprobs, logits.double(), labels, **kwargs)
    ref, ref_grad, _ = run(reference.token_logprobs, logits, labels, grads, **kwargs)
    got, got_grad, _ = run(on_backend(backend), logits, labels, grads, **kwargs)
    for name in FLOAT_FIELDS:
        assert got[name].dtype == torch.float32, name
        assert got[name].shape == labels.shape, name
        assert_as_accurate_as_reference(got[name], ref[name], truth[name], name)
    assert got["is_top1"].dtype == torch.bool
    assert torch.equal(got["is_top1"], ref["is_top1"])
    assert got_grad.dtype == logits.dtype and got_grad.shape == logits.shape
    assert_as_accurate_as_reference(got_grad, ref_grad, truth_grad, "grad")
    return got, got_grad


def make_inputs(shape, vocab, dtype, scale=3.0, ignore_fraction=0.2):
    logits = (torch.randn(*shape, vocab, device=DEVICE) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, device=DEVICE)
    labels[torch.rand(shape, device=DEVICE) < ignore_fraction] = -100
    return logits, labels


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", OPTIONS)
def test_matches_float64_truth(backend, dtype, option):
    logits, labels = make_inputs((2, 9), 1003, dtype)
    check_against_truth(backend, logits, labels, **OPTIONS[option])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shifted_view_is_read_in_place(backend, dtype):
    # What trainers pass: logits[:, :-1] of a [B, T, V] model output, labels[:, 1:].
    full, ids = make_inputs((3, 8), 1003, dtype)
    logits, labels = full[:, :-1], ids[:, 1:]
    assert not logits.is_contiguous()
    assert _as_rows(logits).data_ptr() == full.data_ptr()
    check_against_truth(backend, logits, labels, temperature=0.8)


@pytest.mark.parametrize("backend", backend_params())
def test_vocab_stride_not_one(backend):
    base, labels = make_inputs((4,), 517, torch.float32)
    logits = base.t().contiguous().t()  # same values, stride(-1) == 4
    assert logits.stride(-1) != 1
    check_against_truth(backend, logits, labels)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vocab_not_multiple_of_any_block(backend, dtype):
    logits, labels = make_inputs((2, 3), 32003, dtype)
    labels[0, 0] = 32002  # the last column
    check_against_truth(backend, logits, labels, temperature=0.7)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_magnitude_logits(backend, dtype):
    logits, labels = make_inputs((2, 5), 1003, dtype, scale=1e4)
    check_against_truth(backend, logits, labels)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_all_minus_inf_but_one(backend, dtype):
    vocab = 700
    logits = torch.full((4, vocab), -math.inf, device=DEVICE, dtype=dtype)
    labels = torch.tensor([0, 699, 350, 5], device=DEVICE)
    logits[0, 0] = 2.0
    logits[1, 699] = -3.0
    logits[2, 350] = 1e4
    logits[3, 5] = 1.0  # row 3: a second finite entry, so p = (0.5, 0.5)
    logits[3, 600] = 1.0
    got, got_grad = check_against_truth(backend, logits, labels)
    assert torch.equal(got["logps"][:3], torch.zeros(3, device=DEVICE))
    assert torch.equal(got["entropy"][:3], torch.zeros(3, device=DEVICE))
    assert got["logps"][3].item() == pytest.approx(-math.log(2), abs=1e-6)
    assert got["entropy"][3].item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.isfinite(got_grad).all()
    assert got["is_top1"].tolist() == [True, True, True, True]


@pytest.mark.parametrize("backend", backend_params())
def test_fully_ignored_batch(backend):
    logits = torch.randn(2, 3, 257, device=DEVICE, requires_grad=True)
    labels = torch.full((2, 3), -100, device=DEVICE)
    with fastalign.use_backend(backend):
        out = fastalign.token_logprobs(logits, labels, outputs=ALL_FIELDS)
    for name in FLOAT_FIELDS:
        assert torch.equal(getattr(out, name), torch.zeros(2, 3, device=DEVICE)), name
    assert not out.is_top1.any()
    (out.logps.sum() + out.entropy.sum()).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", backend_params())
def test_mask_and_custom_ignore_index(backend):
    logits, labels = make_inputs((3, 6), 301, torch.float32, ignore_fraction=0.0)
    mask = torch.rand(3, 6, device=DEVICE) > 0.3
    with fastalign.use_backend(backend):
        masked = fastalign.token_logprobs(logits, labels, mask=mask, outputs=("entropy",))
        relabelled = fastalign.token_logprobs(logits, labels.masked_fill(~mask, 7777), ignore_index=7777)
    want = reference.token_logprobs(logits, labels, outputs=("entropy",))
    torch.testing.assert_close(masked.logps, torch.where(mask, want.logps, 0.0))
    torch.testing.assert_close(masked.entropy, torch.where(mask, want.entropy, 0.0))
    torch.testing.assert_close(relabelled.logps, masked.logps)


@pytest.mark.parametrize("backend", backend_params())
def test_nan_in_nan_out(backend):
    logits, labels = make_inputs((3,), 129, torch.float32, ignore_fraction=0.0)
    logits[1, 17] = math.nan
    with fastalign.use_backend(backend):
        out = fastalign.token_logprobs(logits, labels, outputs=ALL_FIELDS)
    assert torch.isnan(out.logps[1]) and torch.isnan(out.entropy[1])
    assert torch.isfinite(out.logps[[0, 2]]).all() and torch.isfinite(out.entropy[[0, 2]]).all()


@pytest.mark.parametrize("backend", backend_params())
def test_int32_labels_and_odd_ranks(backend):
    vocab = 211
    with fastalign.use_backend(backend):
        logits, labels = make_inputs((2, 3, 4), vocab, torch.float32, ignore_fraction=0.0)
        four_d = fastalign.token_logprobs(logits, labels.int())
        flat = fastalign.token_logprobs(logits.reshape(-1, vocab), labels.reshape(-1))
        torch.testing.assert_close(four_d.logps.reshape(-1), flat.logps)
        single = fastalign.token_logprobs(logits[0, 0, 0], labels[0, 0, 0])
        assert single.logps.shape == ()
        torch.testing.assert_close(single.logps, flat.logps[0])
        empty = fastalign.token_logprobs(logits[:0], labels[:0], outputs=("entropy",))
        assert empty.logps.shape == (0, 3, 4) and empty.entropy.shape == (0, 3, 4)


@pytest.mark.parametrize("backend", backend_params())
def test_unrequested_fields_are_none_and_entropy_gradient_is_real(backend):
    logits, labels = make_inputs((5,), 97, torch.float32, ignore_fraction=0.0)
    with fastalign.use_backend(backend):
        only = fastalign.token_logprobs(logits, labels)
        assert only.entropy is None and only.is_top1 is None and only.mean_logits is None
        leaf = logits.clone().requires_grad_(True)
        fastalign.token_logprobs(leaf, labels, outputs=("entropy",)).entropy.sum().backward()
    want = logits.clone().requires_grad_(True)
    reference.token_logprobs(want, labels, outputs=("entropy",)).entropy.sum().backward()
    assert leaf.grad.abs().max() > 0
    torch.testing.assert_close(leaf.grad, want.grad)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("option", OPTIONS)
def test_gradcheck_float64(backend, option):
    if backend == "native" and not fastalign.available_backends("cpu")["native"][0]:
        pytest.skip("native backend not built")
    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 3))
    labels[1, 2] = -100

    def f(x):
        with fastalign.use_backend(backend):
            out = fastalign.token_logprobs(x, labels, outputs=("entropy",), **OPTIONS[option])
        return out.logps, out.entropy

    assert torch.autograd.gradcheck(f, (logits,))


def test_properties_of_the_reference():
    # Uniform logits: every log-prob is -log V, the entropy log V, sum p^2 = 1/V.
    vocab = 64
    logits = torch.zeros(3, vocab)
    labels = torch.tensor([0, 5, 63])
    out = reference.token_logprobs(logits, labels, outputs=ALL_FIELDS)
    torch.testing.assert_close(out.logps, torch.full((3,), -math.log(vocab)))
    torch.testing.assert_close(out.entropy, torch.full((3,), math.log(vocab)))
    torch.testing.assert_close(out.log_sum_sq_probs, torch.full((3,), -math.log(vocab)))
    # All tied: only label 0 is the first argmax.
    assert out.is_top1.tolist() == [True, False, False]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_rows_that_start_off_16_byte_boundaries(backend, dtype):
    """Rows of more than two forward chunks of an odd vocabulary read through logits[:, :-1], so
    row starts fall anywhere within 16 bytes: the vector chunks begin at each row's first
    boundary and the masked remainder covers the head and the tail (labels placed in both)."""
    full, ids = make_inputs((2, 5), 2 * 4096 + 1003, dtype)
    logits, labels = full[:, :-1], ids[:, 1:].clone()
    V = logits.shape[-1]
    labels[0, 0], labels[0, 1], labels[1, 0], labels[1, 1] = 0, 3, V - 1, V - 900
    check_against_truth(backend, logits, labels, temperature=0.9)
    check_against_truth(backend, logits, labels, softcap=30.0, logit_scale=0.5)
