"""The backend override (environment and context manager) and torch.compile through the op."""

from __future__ import annotations

import pytest
import torch

import fastalign
from fastalign.reference import logprobs as reference_logprobs


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("FASTALIGN_BACKEND", raising=False)
    assert fastalign.current_backend() == "auto"


def test_environment_then_context_manager(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", "reference")
    assert fastalign.current_backend() == "reference"
    with fastalign.use_backend("native"):
        assert fastalign.current_backend() == "native"
        with fastalign.use_backend("AUTO"):
            assert fastalign.current_backend() == "auto"
        assert fastalign.current_backend() == "native"
    assert fastalign.current_backend() == "reference"


def counting(monkeypatch, name):
    calls = []
    original = getattr(reference_logprobs, name)

    def wrapper(*args):
        calls.append(name)
        return original(*args)

    monkeypatch.setattr(reference_logprobs, name, wrapper)
    return calls


def test_forced_backend_serves_forward_and_backward(monkeypatch):
    forward = counting(monkeypatch, "token_logprobs_forward")
    backward = counting(monkeypatch, "token_logprobs_backward")
    logits = torch.randn(3, 50, requires_grad=True)
    with fastalign.use_backend("reference"):
        out = fastalign.token_logprobs(logits, torch.tensor([1, 2, 3]))
    out.logps.sum().backward()  # outside the block: still the forward's backend
    assert forward == ["token_logprobs_forward"] and backward == ["token_logprobs_backward"]


def test_environment_variable_reaches_the_op(monkeypatch):
    forward = counting(monkeypatch, "token_logprobs_forward")
    monkeypatch.setenv("FASTALIGN_BACKEND", "reference")
    fastalign.token_logprobs(torch.randn(2, 9), torch.tensor([0, 8]))
    assert forward == ["token_logprobs_forward"]


def test_auto_picks_native_on_cpu(monkeypatch):
    if not fastalign.available_backends("cpu")["native"][0]:
        pytest.skip("native backend not built")
    forward = counting(monkeypatch, "token_logprobs_forward")
    fastalign.token_logprobs(torch.randn(2, 9), torch.tensor([0, 8]))
    assert forward == []


@pytest.mark.parametrize(
    "backend, compiler", [("native", "inductor"), ("native", "aot_eager"), ("reference", "aot_eager")]
)
def test_torch_compile_fullgraph(backend, compiler):
    if backend == "native" and not fastalign.available_backends("cpu")["native"][0]:
        pytest.skip("native backend not built")
    torch._dynamo.reset()

    def loss_fn(logits, labels, mask):
        out = fastalign.token_logprobs(logits[:, :-1], labels[:, 1:], temperature=0.8, mask=mask[:, 1:],
                                       outputs=("entropy", "is_top1"))
        return (out.logps.sum() + 0.1 * out.entropy.sum()) / mask.sum(), out.is_top1

    logits = torch.randn(2, 6, 101, requires_grad=True)
    labels = torch.randint(0, 101, (2, 6))
    mask = torch.rand(2, 6) > 0.2
    with fastalign.use_backend(backend):
        eager_loss, eager_top1 = loss_fn(logits, labels, mask)
        (eager_grad,) = torch.autograd.grad(eager_loss, logits)
        compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)
        loss, top1 = compiled(logits, labels, mask)
        (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(grad, eager_grad)
    assert torch.equal(top1, eager_top1)
