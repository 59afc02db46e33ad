"""Every loss from logits also takes the policy's hidden states and lm_head (`hidden=`, `weight=`,
`bias=`), the logits never materialized, with the results of the materialized logits. A
`HiddenStates` passed as `logits`, the earlier spelling, gives the same with a DeprecationWarning."""

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
    bias = (0.1 * torch.randn(V, generator=g, dtype=torch.float32)).to(DEVICE)
    labels = torch.randint(0, V, (B2, T), generator=g).to(DEVICE)
    labels[0, 0] = -100
    mask = torch.ones(B2, T, device=DEVICE)
    mask[1, :2] = 0
    return hidden, weight, bias, labels, mask


_, _, _, LABELS, MASK = batch()
POLICY_LABELS = LABELS.clamp(min=0)  # the policy losses leave tokens out through the mask, not -100
REF = torch.linspace(-12.0, -9.0, B2 // 2, device=DEVICE)
KTO = dict(ref_logps=torch.zeros(B2, device=DEVICE), desirable=torch.tensor([True, False, True, False], device=DEVICE),
           completion_mask=MASK, kl=0.1)
ADV = torch.tensor([1.0, -0.5, 0.25, -1.0], device=DEVICE)
OLD = torch.full((B2, T), -2.5, device=DEVICE)
POLICY = dict(labels=POLICY_LABELS, completion_mask=MASK, advantages=ADV)

# name -> a call taking the policy input level as keywords: logits=, or hidden=, weight=, bias=.
LOSSES = {
    "dpo": lambda **x: fastalign.dpo_loss_from_logits(labels=LABELS, completion_mask=MASK, ref_chosen_logps=REF,
                                                      ref_rejected_logps=REF - 1, **x),
    "dpo_module": lambda **x: fastalign.DPOLoss(loss_type=["sigmoid", "sft"], use_weighting=True)(
        labels=LABELS, completion_mask=MASK, ref_chosen_logps=REF, ref_rejected_logps=REF - 1, **x),
    "cpo": lambda **x: fastalign.cpo_loss_from_logits(labels=LABELS, completion_mask=MASK, **x),
    "simpo": lambda **x: fastalign.cpo_loss_from_logits(labels=LABELS, completion_mask=MASK, loss_type="simpo",
                                                        cpo_alpha=0.0, **x),
    "cpo_module": lambda **x: fastalign.CPOLoss()(labels=LABELS, completion_mask=MASK, **x),
    "orpo": lambda **x: fastalign.orpo_loss_from_logits(labels=LABELS, completion_mask=MASK, **x),
    "orpo_module": lambda **x: fastalign.ORPOLoss()(labels=LABELS, completion_mask=MASK, **x),
    "kto": lambda **x: fastalign.kto_loss_from_logits(labels=LABELS, **KTO, **x),
    "kto_module": lambda **x: fastalign.KTOLoss()(labels=LABELS, **KTO, **x),
    "grpo": lambda **x: fastalign.grpo_loss(**POLICY, old_logps=OLD, num_items_in_batch=12, **x),
    "grpo_module": lambda **x: fastalign.GRPOLoss(loss_type="grpo")(**POLICY, old_logps=OLD, **x),
    "ppo": lambda **x: fastalign.ppo_loss(**POLICY, old_logps=OLD, **x),
    "ppo_module": lambda **x: fastalign.PPOLoss(convention="trl")(**POLICY, old_logps=OLD, **x),
    "rloo": lambda **x: fastalign.rloo_loss(**POLICY, old_logps=OLD.sum(-1), **x),
    "rloo_module": lambda **x: fastalign.RLOOLoss(epsilon_high=0.28)(**POLICY, **x),
    "rrhf": lambda **x: fastalign.rrhf_loss_from_logits(labels=LABELS, rewards=ADV, group_size=2,
                                                        completion_mask=MASK, **x),
    "rrhf_module": lambda **x: fastalign.RRHFLoss(sft_reduction="mean")(labels=LABELS, rewards=ADV, group_size=2,
                                                                        completion_mask=MASK, **x),
}
# The losses that took a HiddenStates as their logits before they took hidden=.
TOOK_HIDDEN_STATES = [name for name in LOSSES if not name.startswith(("grpo", "ppo", "rloo", "rrhf"))]


def assert_same(a, b, **tol):
    torch.testing.assert_close(a.loss, b.loss, **tol)
    assert a.metrics.keys() == b.metrics.keys()
    for name in b.metrics:
        torch.testing.assert_close(a.metrics[name], b.metrics[name], msg=name, equal_nan=True, **tol)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss", LOSSES)
def test_hidden_equals_materialized_logits(backend, loss):
    hidden, weight, bias, _, _ = batch()
    fused = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    plain = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with fastalign.use_backend(backend):
        via_hidden = LOSSES[loss](hidden=fused[0], weight=fused[1], bias=fused[2])
        via_logits = LOSSES[loss](logits=plain[0] @ plain[1].T + plain[2])
    # fp32 (the Triton backend's widest): the fused matmul sums in another order.
    tol = dict(rtol=1e-4, atol=1e-5)
    assert_same(via_hidden, via_logits, **tol)
    for a, b in zip(torch.autograd.grad(via_hidden.loss, fused), torch.autograd.grad(via_logits.loss, plain)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("loss", TOOK_HIDDEN_STATES)
def test_hidden_states_as_logits_is_deprecated_and_gives_the_same(loss):
    hidden, weight, bias, _, _ = batch()
    with pytest.warns(DeprecationWarning, match=r"^logits: passing HiddenStates\(hidden, weight, bias\) as logits "
                                                r"is deprecated; pass hidden=, weight=, bias= instead"):
        old = LOSSES[loss](logits=HiddenStates(hidden, weight, bias))
    assert_same(old, LOSSES[loss](hidden=hidden, weight=weight, bias=bias), rtol=0, atol=0)


@pytest.mark.parametrize("loss", LOSSES)
def test_logits_and_hidden_together_or_half_a_head_are_named(loss):
    hidden, weight, _, _, _ = batch()
    with pytest.raises(ValueError, match=r"^logits / hidden"):
        LOSSES[loss](logits=hidden @ weight.T, hidden=hidden, weight=weight)
    with pytest.raises(ValueError, match=r"^(hidden / weight|logits / hidden / logps|weight)\b"):
        LOSSES[loss](hidden=hidden)
    with pytest.raises(ValueError, match=r"^(hidden / weight|logits / hidden / logps|weight / bias)\b"):
        LOSSES[loss](weight=weight)
