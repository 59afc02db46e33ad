"""Bad input to token_logprobs fails early with an error that names the argument."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_params

import fastalign

V = 13


def call(backend=None, logits=None, labels=None, **kwargs):
    logits = torch.randn(2, 3, V) if logits is None else logits
    labels = torch.randint(0, V, (2, 3)) if labels is None else labels
    if backend is None:
        return fastalign.token_logprobs(logits, labels, **kwargs)
    with fastalign.use_backend(backend):
        return fastalign.token_logprobs(logits, labels, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"logits": torch.tensor(1.0)}, ValueError, "logits: .*at least 1 dimension"),
        ({"logits": torch.randint(0, 5, (2, 3, V))}, TypeError, "logits: expected a float"),
        ({"logits": [[0.0] * V]}, TypeError, "logits: expected a torch.Tensor"),
        ({"logits": torch.randn(2, 3, 0), "labels": torch.zeros(2, 3, dtype=torch.long)}, ValueError, "logits: .*empty"),
        ({"labels": torch.randint(0, V, (2, 4))}, ValueError, r"labels: expected shape \(2, 3\)"),
        ({"labels": torch.randint(0, V, (6,))}, ValueError, "labels: expected shape"),
        ({"labels": torch.rand(2, 3)}, TypeError, "labels: expected an int64 or int32"),
        ({"labels": torch.zeros(2, 3, dtype=torch.bool)}, TypeError, "labels: expected an int64 or int32"),
        ({"labels": torch.zeros(2, 3, dtype=torch.long, device="meta")}, ValueError, "labels: expected a tensor on cpu"),
        ({"temperature": 0.0}, ValueError, "temperature: expected a finite number > 0"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": math.inf}, ValueError, "temperature"),
        ({"temperature": math.nan}, ValueError, "temperature"),
        ({"temperature": "hot"}, TypeError, "temperature: expected a number"),
        ({"logit_scale": math.nan}, ValueError, "logit_scale"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index: expected an int"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, "mask: expected shape"),
        ({"outputs": ("entropy", "perplexity")}, ValueError, "outputs: unknown field.*perplexity"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        call(**kwargs)


@pytest.mark.parametrize("backend", backend_params("cpu"))
@pytest.mark.parametrize("bad", [V, V + 1000, -1, -101])
def test_label_out_of_range_is_a_value_error_on_cpu(backend, bad):
    labels = torch.randint(0, V, (2, 3))
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=rf"labels: every value must lie in \[0, {V}\).*found {bad}"):
        call(backend, labels=labels)


def test_ignore_index_outside_the_vocabulary_is_fine():
    labels = torch.randint(0, V, (2, 3))
    labels[0, 0] = -100
    assert call(labels=labels).logps[0, 0].item() == 0.0


def test_unknown_backend():
    with pytest.raises(ValueError, match="use_backend.*unknown backend 'cuda'.*auto, reference, native, triton"):
        with fastalign.use_backend("cuda"):
            pass


def test_unknown_backend_in_environment(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTALIGN_BACKEND: unknown backend 'fast'"):
        call()


def test_forcing_native_on_a_non_cpu_tensor():
    # Meta tensors never reach an op body (they take the fake implementation), so ask the resolver.
    from fastalign.backend import resolve

    with pytest.raises(RuntimeError, match="backend 'native' serves CPU tensors; the logits are on meta"):
        resolve("token_logprobs_forward", "native", logits=torch.empty(2, V, device="meta"))


def test_forcing_triton_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(fastalign._triton, "status", lambda device: (False, "no triton here"))
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on cpu: no triton here"):
        call("triton")


def test_forcing_triton_with_float64():
    if not fastalign.available_backends("cpu")["triton"][0]:
        pytest.skip("triton not live on cpu")
    with pytest.raises(TypeError, match="logits: the triton backend takes float32, bfloat16 or float16"):
        call("triton", logits=torch.randn(2, 3, V, dtype=torch.float64))


def _cuda_contract_modules():
    """The backends that serve CUDA tensors, called through the op contract directly (no CPU check)."""
    from fastalign.reference import logprobs as reference_logprobs

    modules = [pytest.param(reference_logprobs, id="reference")]
    ok, why = fastalign.available_backends("cpu")["triton"]
    triton_mark = () if ok else pytest.mark.skip(reason=why)
    modules.append(pytest.param("triton", id="triton", marks=triton_mark))
    return modules


@pytest.mark.parametrize("module", _cuda_contract_modules())
def test_label_out_of_range_gives_nan_without_reading_out_of_bounds(module):
    # What CUDA callers get: no device sync to raise, a NaN log-prob and gradient for that row.
    if module == "triton":
        from fastalign import _triton

        module = _triton.kernels("logprobs")
    logits = torch.randn(1, 3, V)
    labels = torch.tensor([2, V + 5, -100])
    out = module.token_logprobs_forward(logits, labels, 1.0, 1.0, 0.0, -100, True, False, False, False)
    logps, entropy, norm = out[0], out[1], out[5]
    assert torch.isfinite(logps[0]) and torch.isnan(logps[1]) and logps[2] == 0
    grad = module.token_logprobs_backward(torch.ones(3), None, logits, labels, norm, None, 1.0, 1.0, 0.0, -100)
    assert torch.isfinite(grad[0, 0]).all() and torch.isnan(grad[0, 1]).all() and (grad[0, 2] == 0).all()
