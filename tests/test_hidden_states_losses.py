"""`HiddenStates` (hidden states and the lm_head, logits never materialized) is accepted wherever a
loss takes `logits`, with the results of the materialized logits."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params

import fastalign
from fastalign.types import HiddenStates

B2, T, H, V = 4, 5, 8, 11


def batch():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B2, T, H, generator=g, dtype=torch.float32).to(DEVICE)
    weight = torch.randn(V, H, generator=g, dtype=torch.float32).to(DEVICE)
    labels = torch.randint(0, V, (B2, T), generator=g).to(DEVICE)
    labels[0, 0] = -100
    mask = torch.ones(B2, T, device=DEVICE)
    mask[1, :2] = 0
    return hidden, weight, labels, mask


LOSSES = {
    "cpo": lambda x, labels, mask: fastalign.cpo_loss_from_logits(x, labels, completion_mask=mask),
    "simpo": lambda x, labels, mask: fastalign.cpo_loss_from_logits(x, labels, completion_mask=mask,
                                                                   loss_type="simpo", cpo_alpha=0.0),
    "orpo": lambda x, labels, mask: fastalign.orpo_loss_from_logits(x, labels, completion_mask=mask),
    "kto": lambda x, labels, mask: fastalign.kto_loss_from_logits(
        x, labels, ref_logps=torch.zeros(B2, device=DEVICE),
        desirable=torch.tensor([True, False, True, False], device=DEVICE), completion_mask=mask, kl=0.1),
    "cpo_module": lambda x, labels, mask: fastalign.CPOLoss()(x, labels, completion_mask=mask),
    "orpo_module": lambda x, labels, mask: fastalign.ORPOLoss()(x, labels, completion_mask=mask),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss", LOSSES)
def test_hidden_states_equal_materialized_logits(backend, loss):
    hidden, weight, labels, mask = batch()
    a, b = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    with fastalign.use_backend(backend):
        via_hidden = LOSSES[loss](HiddenStates(a, weight), labels, mask)
        via_logits = LOSSES[loss](b @ weight.T, labels, mask)
    # fp32 (the Triton backend's widest): the fused matmul sums in another order.
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(via_hidden.loss, via_logits.loss, **tol)
    assert via_hidden.metrics.keys() == via_logits.metrics.keys()
    for name in via_logits.metrics:
        torch.testing.assert_close(via_hidden.metrics[name], via_logits.metrics[name], msg=name, equal_nan=True, **tol)
    torch.testing.assert_close(torch.autograd.grad(via_hidden.loss, a)[0], torch.autograd.grad(via_logits.loss, b)[0],
                               **tol)
