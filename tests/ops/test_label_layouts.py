"""Labels in any layout: strided, sliced and expanded int64 label tensors (what `labels[:, ::2]`,
`labels.expand(...)` or a `reshape(-1)` of a view give) reach every op that takes labels, on every
backend, with the results of the same labels made contiguous."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params

import fastalign
from fastalign.grpo import grpo_loss

V, H = 37, 16


def layouts(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of ``labels`` ([B, T]) that are not contiguous, each with the values of ``labels``."""
    B, T = labels.shape
    wide = torch.full((B, 2 * T), -7, dtype=labels.dtype, device=labels.device)
    wide[:, ::2] = labels
    transposed = labels.t().contiguous().t()
    row = labels[:1]
    views = {"every_second_column": wide[:, ::2], "transposed": transposed, "expanded": row.expand(B, T)}
    assert not any(v.is_contiguous() for v in views.values())
    return views


def make(B=3, T=5, dtype=torch.float32):
    logits = torch.randn(B, T, V, device=DEVICE, dtype=dtype)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[1, 2] = -100
    return logits, labels


@pytest.mark.parametrize("backend", backend_params())
def test_token_logprobs(backend):
    logits, labels = make()
    with fastalign.use_backend(backend):
        for name, view in layouts(labels).items():
            got = fastalign.token_logprobs(logits, view, outputs=("entropy",))
            want = fastalign.token_logprobs(logits, view.contiguous(), outputs=("entropy",))
            torch.testing.assert_close(got.logps, want.logps, msg=name)
            torch.testing.assert_close(got.entropy, want.entropy, msg=name)


@pytest.mark.parametrize("backend", backend_params())
def test_linear_token_logprobs(backend):
    _, labels = make()
    hidden = torch.randn(3, 5, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE) / H**0.5
    with fastalign.use_backend(backend):
        for name, view in layouts(labels).items():
            got = fastalign.linear_token_logprobs(hidden, weight, view).logps
            want = fastalign.linear_token_logprobs(hidden, weight, view.contiguous()).logps
            torch.testing.assert_close(got, want, msg=name)


@pytest.mark.parametrize("backend", backend_params())
def test_grpo_loss_and_its_gradient(backend):
    logits, labels = make()
    labels[1, 2] = 0  # GRPO takes every completion token's label
    mask = torch.ones(3, 5, device=DEVICE)
    advantages = torch.randn(3, device=DEVICE)
    old = torch.randn(3, 5, device=DEVICE) * 0.1 - 3.0
    with fastalign.use_backend(backend):
        for name, view in layouts(labels).items():
            results = []
            for lab in (view, view.contiguous()):
                leaf = logits.clone().requires_grad_()
                out = grpo_loss(leaf, lab, completion_mask=mask, advantages=advantages, old_logps=old,
                                num_items_in_batch=mask.sum())
                results.append((out.loss.detach(), torch.autograd.grad(out.loss, leaf)[0]))
            torch.testing.assert_close(results[0], results[1], msg=name)


@pytest.mark.parametrize("backend", backend_params())
def test_int32_labels_in_a_strided_view(backend):
    logits, labels = make()
    view = layouts(labels.to(torch.int32))["every_second_column"]
    with fastalign.use_backend(backend):
        got = fastalign.token_logprobs(logits, view).logps
        want = fastalign.token_logprobs(logits, labels).logps
    torch.testing.assert_close(got, want)
