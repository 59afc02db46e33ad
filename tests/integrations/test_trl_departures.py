"""Where fastalign departs from TRL on purpose, the departure is documented (README, docstrings) and
pinned here, so that it cannot change unannounced."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import fastalign

B2, T, V = 4, 6, 13


@pytest.mark.parametrize("loss", ["cpo", "orpo"])
def test_logits_metrics_average_the_completion_tokens_not_every_position(loss):
    # TRL's CPO and ORPO trainers log logits/chosen as the mean of the whole logits tensor, prompt
    # and padding included; fastalign averages each counted completion token's vocabulary mean, as
    # TRL's DPO trainer does.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B2, T, V, generator=g).to(DEVICE)
    labels = torch.randint(0, V, (B2, T), generator=g).to(DEVICE)
    mask = torch.ones(B2, T, device=DEVICE)
    mask[:, :2] = 0  # the prompt
    logits[:, :2] += 5.0  # prompt positions that would move an every-position mean
    fn = fastalign.cpo_loss_from_logits if loss == "cpo" else fastalign.orpo_loss_from_logits
    out = fn(logits, labels, completion_mask=mask)
    per_token = logits.mean(-1)
    chosen = (per_token[:2] * mask[:2]).sum() / mask[:2].sum()
    rejected = (per_token[2:] * mask[2:]).sum() / mask[2:].sum()
    torch.testing.assert_close(out.metrics["logits/chosen"], chosen)
    torch.testing.assert_close(out.metrics["logits/rejected"], rejected)
    assert abs(float(out.metrics["logits/chosen"]) - float(logits[:2].mean())) > 1.0  # TRL's value differs


def test_kto_clamps_a_given_kl_estimate_at_zero():
    # Documented on kto_loss's `kl`: a given estimate is clamped at 0, as TRL clamps its own.
    args = (torch.tensor([-3.0, -4.0]), torch.tensor([-3.5, -3.5]), torch.tensor([True, False]))
    negative = fastalign.kto_loss(*args, kl=-0.7)
    zero = fastalign.kto_loss(*args, kl=0.0)
    torch.testing.assert_close(negative.loss, zero.loss)
    assert float(negative.metrics["kl"]) == 0.0
