"""Packed rows for the policy losses: GRPO (TRL and verl conventions, GSPO, VESPO with the vLLM
ratio, per-token advantages),
PPO with its value loss, and RLOO on `[1, total, V]` logits (or hidden states, or log-probs) with
`cu_seqlens` or `position_ids` equal the same sequences padded to `[S, T, V]`: loss, every metric,
and the gradient of every packed logit."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params

import fastalign

V, H = 11, 6
LENGTHS = [4, 2, 5]


def batches(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    rows, width = len(LENGTHS), max(LENGTHS)
    present = torch.arange(width)[None] < torch.tensor(LENGTHS)[:, None]

    def per_token(*extra, scale=1.0):
        return (torch.randn(rows, width, *extra, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)

    padded = {
        "logits": per_token(V), "hidden": per_token(H),
        "labels": torch.randint(0, V, (rows, width), generator=g).to(DEVICE),
        "completion_mask": (present & (torch.rand(rows, width, generator=g) > 0.2)).to(DEVICE).float(),
        "old_logps": per_token(scale=0.1) - 2.5, "ref_logps": per_token(scale=0.1) - 2.5,
        "token_advantages": per_token(), "vpreds": per_token(), "values": per_token(), "returns": per_token(),
    }
    padded["logps"] = padded["old_logps"] + per_token(scale=0.05)
    padded["entropies"] = per_token().abs()
    sequence_old_logps = (padded["old_logps"] * padded["completion_mask"]).sum(-1)
    present = present.to(DEVICE)
    packed = {k: v[present][None] for k, v in padded.items()}
    padded["sequence_old_logps"] = packed["sequence_old_logps"] = sequence_old_logps
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    advantages = torch.randn(rows, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    # TRL's vLLM ratio is 1 wherever the completion mask is 0, padding included (VESPO sums its log
    # over every position): the packed row's padding must read as 1 too.
    ratio = (0.6 + 0.8 * torch.rand(rows, width, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    padded["is_ratio"] = torch.where(padded["completion_mask"] != 0, ratio, 1.0)
    packed["is_ratio"] = padded["is_ratio"][present][None]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], device=DEVICE)
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None].to(DEVICE)
    return padded, packed, present, weight, advantages, cu, position_ids


def level(b, at, weight):
    if at == "logits":
        return dict(logits=b["logits"], labels=b["labels"])
    if at == "hidden":
        return dict(hidden=b["hidden"], weight=weight, labels=b["labels"])
    return dict(logps=b["logps"], entropies=b["entropies"])


CALLS = {
    "grpo trl dapo": lambda b, adv, **k: fastalign.grpo_loss(
        **k, completion_mask=b["completion_mask"], advantages=adv, old_logps=b["old_logps"], ref_logps=b["ref_logps"],
        loss_type="dapo", beta=0.04, num_items_in_batch=9.0),
    "grpo trl grpo": lambda b, adv, **k: fastalign.grpo_loss(
        **k, completion_mask=b["completion_mask"], advantages=adv, old_logps=b["old_logps"], loss_type="grpo",
        entropy_coef=0.01),
    "gspo trl": lambda b, adv, **k: fastalign.grpo_loss(
        **k, completion_mask=b["completion_mask"], advantages=adv, old_logps=b["old_logps"], loss_type="grpo",
        importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4),
    "grpo trl top entropy": lambda b, adv, **k: fastalign.grpo_loss(
        **k, completion_mask=b["completion_mask"], advantages=adv, old_logps=b["old_logps"], loss_type="bnpo",
        top_entropy_quantile=0.5),
    "vespo trl, vLLM ratio": lambda b, adv, **k: fastalign.grpo_loss(
        **k, completion_mask=b["completion_mask"], advantages=adv, old_logps=b["old_logps"],
        importance_sampling_ratio=b["is_ratio"], loss_type="vespo", num_items_in_batch=9.0),
    "grpo verl seq-mean-token-mean, token advantages": lambda b, adv, **k: fastalign.grpo_loss(
        **k, completion_mask=b["completion_mask"], advantages=b["token_advantages"], old_logps=b["old_logps"],
        ref_logps=b["ref_logps"], convention="verl", loss_type="vanilla", loss_agg_mode="seq-mean-token-mean",
        beta=0.001),
    "ppo with values": lambda b, adv, **k: fastalign.ppo_loss(
        **k, completion_mask=b["completion_mask"], advantages=b["token_advantages"], old_logps=b["old_logps"],
        vpreds=b["vpreds"], values=b["values"], returns=b["returns"], loss_agg_mode="seq-mean-token-sum"),
    "rloo": lambda b, adv, **k: fastalign.rloo_loss(
        **k, completion_mask=b["completion_mask"], advantages=adv,
        old_logps=b["sequence_old_logps"]),
}


def check_equal(got, want, tol):
    torch.testing.assert_close(got.loss, want.loss, **tol)
    assert sorted(got.metrics) == sorted(want.metrics)
    for name, value in want.metrics.items():
        torch.testing.assert_close(got.metrics[name], value, **tol, msg=name)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss", CALLS)
def test_packed_policy_row_equals_the_padded_batch(loss, backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    # The padded batch goes through the fused policy pass, which keeps its per-token statistics in fp32; the
    # packed row through token_logprobs and the fp64 objective.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-6, atol=1e-8)
    padded, packed, present, weight, adv, cu, _ = batches(dtype)
    for b in (padded, packed):
        b["logits"].requires_grad_()
        b["vpreds"].requires_grad_()
    with fastalign.use_backend(backend):
        want = CALLS[loss](padded, adv, **level(padded, "logits", weight))
        got = CALLS[loss](packed, adv, cu_seqlens=cu, **level(packed, "logits", weight))
    (want.loss + 0).backward()
    got.loss.backward()
    check_equal(got, want, tol)
    torch.testing.assert_close(packed["logits"].grad[0], padded["logits"].grad[present], **tol)
    if "ppo" in loss:
        torch.testing.assert_close(packed["vpreds"].grad[0], padded["vpreds"].grad[present], **tol)


@pytest.mark.parametrize("at", ["hidden", "logps"])
@pytest.mark.parametrize("loss", ["grpo trl dapo", "gspo trl", "vespo trl, vLLM ratio", "rloo"])
def test_packed_policy_row_at_other_levels(loss, at):
    padded, packed, present, weight, adv, _, position_ids = batches()
    key = "hidden" if at == "hidden" else "logps"
    for b in (padded, packed):
        b[key].requires_grad_()
    want = CALLS[loss](padded, adv, **level(padded, at, weight))
    got = CALLS[loss](packed, adv, position_ids=position_ids, **level(packed, at, weight))
    want.loss.backward()
    got.loss.backward()
    # From hidden states the padded batch takes the fused pass (fp32 aggregation weights).
    tol = dict(rtol=2e-6, atol=1e-8) if at == "hidden" else dict(rtol=1e-12, atol=1e-12)
    check_equal(got, want, tol)
    torch.testing.assert_close(packed[key].grad[0], padded[key].grad[present], **tol)


def test_packed_policy_inputs_are_checked_in_the_packed_shape():
    _, packed, _, weight, adv, cu, _ = batches()
    with pytest.raises(ValueError, match=r"^old_logps: expected shape \(1, 11\)"):
        CALLS["grpo trl dapo"](dict(packed, old_logps=packed["old_logps"][:, :-1]), adv, cu_seqlens=cu,
                               **level(packed, "logits", weight))
    with pytest.raises(ValueError, match=r"^advantages: expected shape \(3, 5\) or \(3,\)"):
        CALLS["grpo trl dapo"](packed, adv[:2], cu_seqlens=cu, **level(packed, "logits", weight))
    with pytest.raises(ValueError, match=r"^labels: a packed row \(cu_seqlens / position_ids\) is \[1, total\]"):
        padded, *_ = batches()
        CALLS["rloo"](padded, adv, cu_seqlens=cu, **level(padded, "logits", weight))
