"""kernels/linear_logprobs.py (log-probs from hidden states and the lm_head weight) against a
float64 oracle: logits = hidden @ weight.T + bias in float64, then the reference log-prob
forward / backward (fastalign.reference.logprobs) on them, and the weight/hidden/bias gradients
by matmuls.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py), so the shapes stay
small; the sizes are chosen to cut through the kernels' tiles: N across several token blocks with
ignored rows in between, V and H not multiples of the vocabulary and K blocks.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from numerics import assert_as_accurate_as_reference

import fastalign
from fastalign.reference import logprobs as reference

_ok, _why = fastalign.available_backends(DEVICE)["triton"]
pytestmark = pytest.mark.skipif(not _ok, reason=f"triton not live on {DEVICE}: {_why}")

IGNORE = -100


def kernels():
    from fastalign import _triton

    return _triton.kernels("linear_logprobs")


# (dtype, N, H, V, softcap, temperature, logit_scale, bias, layout)
CASES = {
    "fp32-plain": (torch.float32, 13, 40, 200, 0.0, 1.0, 1.0, False, "contiguous"),
    "fp32-softcap-bias-weightT": (torch.float32, 37, 16, 37, 5.0, 0.7, 1.3, True, "weight_t"),
    "bf16-bias-strided": (torch.bfloat16, 70, 40, 200, 0.0, 1.5, 0.8, True, "strided"),
    "bf16-softcap": (torch.bfloat16, 5, 16, 37, 3.0, 1.0, 2.0, False, "contiguous"),
    "fp16-softcap-bias-weightT": (torch.float16, 20, 40, 37, 30.0, 0.9, 1.0, True, "weight_t"),
}


def make_inputs(dtype, N, H, V, bias, layout):
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)

    if layout == "strided":
        # Every other hidden row and every other weight column: no stride is 1 but hidden's K.
        hidden = randn(2 * N, H)[::2]
        weight = randn(V, 2 * H, scale=0.4)[:, ::2]
    elif layout == "weight_t":
        hidden = randn(N, H)
        weight = randn(H, V, scale=0.4).t()
    else:
        hidden = randn(N, H)
        weight = randn(V, H, scale=0.4)
    assert (layout == "contiguous") == (hidden.is_contiguous() and weight.is_contiguous())
    b = randn(V, scale=0.5) if bias else torch.empty(0, dtype=dtype, device=DEVICE)

    logits = oracle_logits(hidden, weight, b)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    # Some rows take the argmax, so is_top1 is tested both ways.
    labels[1::3] = logits.argmax(-1)[1::3]
    labels[2::7] = IGNORE
    return hidden, weight, b, labels


def oracle_logits(hidden, weight, bias, dtype=torch.float64):
    logits = hidden.to(dtype) @ weight.to(dtype).T
    return logits + bias.to(dtype) if bias.numel() else logits


def transform_args(softcap, temperature, logit_scale):
    return dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap, ignore_index=IGNORE)


def oracle_forward(hidden, weight, bias, labels, args, dtype=torch.float64):
    logits = oracle_logits(hidden, weight, bias, dtype)
    return reference.token_logprobs_forward(logits[None], labels, **args, with_entropy=True,
                                            with_log_sum_sq_probs=True, with_mean_logits=True, with_is_top1=True)


def oracle_backward(g, g_h, hidden, weight, bias, labels, args, logits_dtype=torch.float64):
    """Gradients by the explicit formula on the logits, then matmuls, all in float64 when
    logits_dtype is float64; otherwise the path of a trainer in that dtype: logits and their
    gradient rounded to it, the matmuls' results too."""
    logits = oracle_logits(hidden, weight, bias, torch.float32 if logits_dtype != torch.float64 else torch.float64)
    logits = logits.to(logits_dtype)
    out = reference.token_logprobs_forward(logits[None], labels, **args, with_entropy=True,
                                           with_log_sum_sq_probs=False, with_mean_logits=False, with_is_top1=False)
    dl = reference.token_logprobs_backward(g, g_h, logits[None], labels, out[5], out[1], **args)[0]
    acc = torch.float64 if logits_dtype == torch.float64 else torch.float32
    dl = dl.to(acc)
    grad_hidden = (dl @ weight.to(acc)).to(logits_dtype)
    grad_weight = (dl.T @ hidden.to(acc)).to(logits_dtype)
    grad_bias = dl.sum(0).to(logits_dtype) if bias.numel() else None
    return grad_hidden, grad_weight, grad_bias


def assert_forward_close(out, truth, labels, valid):
    logps, entropy, lssp, mean_logits, is_top1, norm = out
    t_logps, t_entropy, t_lssp, t_mean, t_top1, t_norm = truth
    # The kernels accumulate exact (upcast) inputs in fp32: fp32-level agreement whatever the dtype.
    for name, value, expected in (("logps", logps, t_logps), ("entropy", entropy, t_entropy),
                                  ("log_sum_sq_probs", lssp, t_lssp), ("mean_logits", mean_logits, t_mean),
                                  ("norm", norm, t_norm)):
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.double(), expected.double(), rtol=2e-5, atol=2e-5, msg=name)
        assert torch.all(value[~valid] == 0), f"{name}: ignored rows are not 0"
    assert is_top1.dtype == torch.bool
    assert torch.equal(is_top1, t_top1)
    assert is_top1.any() and not is_top1[valid].all()


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_float64(case):
    dtype, N, H, V, softcap, temperature, logit_scale, bias, layout = CASES[case]
    hidden, weight, b, labels = make_inputs(dtype, N, H, V, bias, layout)
    args = transform_args(softcap, temperature, logit_scale)
    valid = labels != IGNORE
    out = kernels().linear_token_logprobs_forward(hidden, weight, b, labels, **args, with_entropy=True,
                                                  with_log_sum_sq_probs=True, with_mean_logits=True,
                                                  with_is_top1=True)
    assert_forward_close(out, oracle_forward(hidden, weight, b, labels, args), labels, valid)

    # No optional output: empties, and the same log-probs and normalizers.
    bare = kernels().linear_token_logprobs_forward(hidden, weight, b, labels, **args, with_entropy=False,
                                                   with_log_sum_sq_probs=False, with_mean_logits=False,
                                                   with_is_top1=False)
    assert [t.numel() for t in bare[1:5]] == [0, 0, 0, 0]
    assert bare[4].dtype == torch.bool
    assert torch.equal(bare[0], out[0]) and torch.equal(bare[5], out[5])


@pytest.mark.parametrize("grads", ["logps", "entropy", "both"])
@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_float64(case, grads):
    dtype, N, H, V, softcap, temperature, logit_scale, bias, layout = CASES[case]
    hidden, weight, b, labels = make_inputs(dtype, N, H, V, bias, layout)
    args = transform_args(softcap, temperature, logit_scale)
    valid = labels != IGNORE
    g = torch.randn(N, device=DEVICE) if grads in ("logps", "both") else None
    g_h = torch.randn(N, device=DEVICE) if grads in ("entropy", "both") else None
    k = kernels()
    out = k.linear_token_logprobs_forward(hidden, weight, b, labels, **args, with_entropy=True,
                                          with_log_sum_sq_probs=False, with_mean_logits=False, with_is_top1=False)
    grad_hidden, grad_weight, grad_bias = k.linear_token_logprobs_backward(
        g, g_h, hidden, weight, b, labels, out[5], out[1], **args)
    assert grad_hidden.shape == hidden.shape and grad_hidden.dtype == hidden.dtype
    assert grad_weight.shape == weight.shape and grad_weight.dtype == weight.dtype
    if bias:
        assert grad_bias.shape == b.shape and grad_bias.dtype == b.dtype
    else:
        assert grad_bias.numel() == 0
    assert torch.all(grad_hidden[~valid] == 0), "ignored rows got a gradient"

    as_f64 = lambda t: None if t is None else t.double()  # noqa: E731
    truth = oracle_backward(as_f64(g), as_f64(g_h), hidden, weight, b, labels, args)
    same_dtype = oracle_backward(g, g_h, hidden, weight, b, labels, args, logits_dtype=dtype)
    for name, value, ref, expected in zip(("grad_hidden", "grad_weight", "grad_bias"),
                                          (grad_hidden, grad_weight, grad_bias), same_dtype, truth):
        if expected is None:
            continue
        if dtype == torch.float32:
            scale = float(expected.abs().max())
            torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-5 * (1 + scale), msg=name)
        else:
            assert_as_accurate_as_reference(value, ref, expected, f"{case} {name}")


def test_out_of_range_label_is_nan_without_reading_out_of_bounds():
    N, H, V = 9, 16, 37
    hidden, weight = torch.randn(N, H, device=DEVICE), torch.randn(V, H, device=DEVICE)
    bias = torch.randn(V, device=DEVICE)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[2], labels[5], labels[7] = V, -3, IGNORE
    args = transform_args(0.0, 1.0, 1.0)
    k = kernels()
    out = k.linear_token_logprobs_forward(hidden, weight, bias, labels, **args, with_entropy=True,
                                          with_log_sum_sq_probs=True, with_mean_logits=True, with_is_top1=True)
    bad = torch.zeros(N, dtype=torch.bool)
    bad[[2, 5]] = True
    assert torch.isnan(out[0][bad]).all() and torch.isfinite(out[0][~bad]).all()
    assert not out[4][bad].any()
    # The row's other statistics are still the row's.
    truth = oracle_forward(hidden, weight, bias, labels, args)
    for i in (1, 2, 3, 5):
        torch.testing.assert_close(out[i].double(), truth[i], rtol=2e-5, atol=2e-5)

    # The entropy gradient does not depend on the label: finite.
    g_h = torch.randn(N, device=DEVICE)
    grads = k.linear_token_logprobs_backward(None, g_h, hidden, weight, bias, labels, out[5], out[1], **args)
    expected = oracle_backward(None, g_h.double(), hidden, weight, bias, labels, args)
    for value, ref in zip(grads, expected):
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value.double(), ref, rtol=1e-4, atol=1e-5)
    # With a log-prob gradient the bad rows are NaN, and the matmuls carry it into every weight row.
    g = torch.randn(N, device=DEVICE)
    grads = k.linear_token_logprobs_backward(g, None, hidden, weight, bias, labels, out[5], out[1], **args)
    expected = oracle_backward(g.double(), None, hidden, weight, bias, labels, args)
    assert torch.isnan(grads[0][bad]).all() and torch.isfinite(grads[0][~bad]).all()
    for value, ref in zip(grads, expected):
        torch.testing.assert_close(value.double(), ref, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_all_rows_ignored_gives_zeros():
    N, H, V = 6, 16, 37
    hidden, weight = torch.randn(N, H, device=DEVICE), torch.randn(V, H, device=DEVICE)
    bias = torch.randn(V, device=DEVICE)
    labels = torch.full((N,), IGNORE, device=DEVICE)
    args = transform_args(0.0, 1.0, 1.0)
    k = kernels()
    out = k.linear_token_logprobs_forward(hidden, weight, bias, labels, **args, with_entropy=True,
                                          with_log_sum_sq_probs=True, with_mean_logits=True, with_is_top1=True)
    for t in out:
        assert not t.any()
    grads = k.linear_token_logprobs_backward(torch.ones(N, device=DEVICE), torch.ones(N, device=DEVICE), hidden, weight, bias, labels,
                                             out[5], out[1], **args)
    for t in grads:
        assert not t.any()


def test_argument_checks():
    k = kernels()
    hidden, weight = torch.randn(4, 16, device=DEVICE), torch.randn(37, 16, device=DEVICE)
    labels = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    empty = torch.empty(0, device=DEVICE)
    args = dict(temperature=1.0, logit_scale=1.0, softcap=0.0, ignore_index=IGNORE, with_entropy=False,
                with_log_sum_sq_probs=False, with_mean_logits=False, with_is_top1=False)
    with pytest.raises(TypeError, match="share one dtype"):
        k.linear_token_logprobs_forward(hidden, weight.bfloat16(), empty, labels, **args)
    with pytest.raises(TypeError, match="float32, bfloat16"):
        k.linear_token_logprobs_forward(hidden.double(), weight.double(), empty, labels, **args)
    with pytest.raises(ValueError, match="does not match hidden size"):
        k.linear_token_logprobs_forward(hidden, weight[:, :8], empty, labels, **args)
    with pytest.raises(ValueError, match="labels must be"):
        k.linear_token_logprobs_forward(hidden, weight, empty, labels[:3], **args)
    with pytest.raises(ValueError, match="labels must be"):
        k.linear_token_logprobs_forward(hidden, weight, empty, labels.int(), **args)
    with pytest.raises(ValueError, match="bias must be"):
        k.linear_token_logprobs_forward(hidden, weight, torch.zeros(36, device=DEVICE), labels, **args)
    with pytest.raises(ValueError, match="temperature"):
        k.linear_token_logprobs_forward(hidden, weight, empty, labels, **{**args, "temperature": 0.0})
