"""The reference equals TRL's own math (TRL 1.16), and every backend equals TRL's fused LM head."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params

import fastalign
from fastalign import reference

trl_utils = pytest.importorskip("trl.trainer.utils")
trl_kernels = pytest.importorskip("trl.kernels")

FIELDS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reference_equals_selective_log_softmax(dtype, temperature):
    logits = (torch.randn(3, 7, 509, device=DEVICE) * 2).to(dtype)
    labels = torch.randint(0, 509, (3, 7), device=DEVICE)
    want = trl_utils.selective_log_softmax(logits, labels, temperature=temperature)
    got = reference.token_logprobs(logits, labels, temperature=temperature).logps
    # TRL runs bf16 log_softmax in bf16; fastalign accumulates in fp32, so compare at bf16 precision.
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    torch.testing.assert_close(got, want.float(), **tol)


def test_reference_equals_entropy_from_logits():
    logits = torch.randn(4, 5, 300, device=DEVICE) * 3
    labels = torch.randint(0, 300, (4, 5), device=DEVICE)
    want = trl_utils.entropy_from_logits(logits)
    got = reference.token_logprobs(logits, labels, outputs=("entropy",)).entropy
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reference_equals_selective_log_softmax_and_entropy_gradients():
    logits = torch.randn(6, 211, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 211, (6,), device=DEVICE)
    logps, entropy = trl_utils.selective_log_softmax_and_entropy(logits, labels, temperature=0.9)
    (want,) = torch.autograd.grad(logps.sum() + entropy.sum(), logits)
    out = reference.token_logprobs(logits, labels, temperature=0.9, outputs=("entropy",))
    (got,) = torch.autograd.grad(out.logps.sum() + out.entropy.sum(), logits)
    torch.testing.assert_close(out.logps, logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 1.0, "softcap": None, "logit_scale": 1.0},
        {"temperature": 0.7, "softcap": None, "logit_scale": 1.0},
        {"temperature": 0.9, "softcap": 30.0, "logit_scale": 0.5},
    ],
    ids=["plain", "temperature", "softcap-scale"],
)
def test_every_field_equals_trl_fused_lm_head(backend, options):
    n, hidden_size, vocab = 12, 16, 1003
    hidden = torch.randn(n, hidden_size, device=DEVICE, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, device=DEVICE) / hidden_size**0.5 * 4
    targets = torch.randint(0, vocab, (n,), device=DEVICE)
    targets[3] = int((hidden[3] @ weight.T).argmax())  # at least one top-1 hit
    want = trl_kernels.ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, options["temperature"], 256, options["softcap"], options["logit_scale"], FIELDS
    )
    (want_grad,) = torch.autograd.grad(want[0].sum() + want[1].sum(), hidden)
    with fastalign.use_backend(backend):
        got = fastalign.token_logprobs(hidden @ weight.T, targets, outputs=FIELDS, **options)
    (got_grad,) = torch.autograd.grad(got.logps.sum() + got.entropy.sum(), hidden)
    for name, value in zip(("logps",) + FIELDS, want):
        if name == "is_top1":
            assert torch.equal(got.is_top1, value), name
        else:
            torch.testing.assert_close(getattr(got, name), value, atol=2e-5, rtol=2e-5, msg=name)
    assert got.is_top1.any()
    torch.testing.assert_close(got_grad, want_grad, atol=2e-5, rtol=2e-5)
