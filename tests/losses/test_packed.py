"""Packed rows (padding-free batches): DPO, CPO, ORPO, KTO and RRHF from logits `[1, total, V]` with
`cu_seqlens` or `position_ids` equal the same sequences padded to `[B, T, V]` — loss, every metric,
and the gradient of every packed logit — on every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params

import fastalign

V = 13
LENGTHS = [5, 3, 6, 2]  # chosen 0, chosen 1, rejected 0, rejected 1 (KTO: four unpaired sequences)


def padded_and_packed(lengths=LENGTHS, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    rows, width = len(lengths), max(lengths)
    logits = torch.randn(rows, width, V, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    labels = torch.randint(0, V, (rows, width), generator=g).to(DEVICE)
    present = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).to(DEVICE)
    completion = present.clone()
    completion[:, 0] = False  # the prompt's last token
    labels = labels.masked_fill(~present, -100)
    packed = {"logits": logits[present][None], "labels": labels[present][None],
              "completion_mask": completion[present][None].float()}
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
    return {"logits": logits, "labels": labels, "completion_mask": completion.float()}, packed, present, cu, position_ids


def ref_pair():
    return (torch.tensor([-30.0, -20.0], dtype=torch.float64, device=DEVICE),
            torch.tensor([-31.0, -19.0], dtype=torch.float64, device=DEVICE))


CALLS = {
    "dpo": lambda b, **k: fastalign.dpo_loss_from_logits(
        b["logits"], b["labels"], completion_mask=b["completion_mask"], ref_chosen_logps=ref_pair()[0],
        ref_rejected_logps=ref_pair()[1], beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], **k),
    "dpo ld_alpha wpo": lambda b, **k: fastalign.dpo_loss_from_logits(
        b["logits"], b["labels"], completion_mask=b["completion_mask"], ref_chosen_logps=ref_pair()[0],
        ref_rejected_logps=ref_pair()[1], beta=0.1, ld_alpha=0.5, use_weighting=True, **k),
    "simpo": lambda b, **k: fastalign.cpo_loss_from_logits(
        b["logits"], b["labels"], completion_mask=b["completion_mask"], loss_type="simpo", cpo_alpha=0.0, **k),
    "orpo": lambda b, **k: fastalign.orpo_loss_from_logits(
        b["logits"], b["labels"], completion_mask=b["completion_mask"], beta=0.1, **k),
    "kto": lambda b, **k: fastalign.kto_loss_from_logits(
        b["logits"], b["labels"], torch.tensor([-30.0, -20.0, -31.0, -19.0], dtype=torch.float64, device=DEVICE),
        torch.tensor([True, False, True, False], device=DEVICE), completion_mask=b["completion_mask"],
        kl=torch.tensor(0.1, dtype=torch.float64, device=DEVICE), **k),
    "rrhf": lambda b, **k: fastalign.rrhf_loss_from_logits(
        b["logits"], b["labels"], torch.tensor([1.0, 0.5, 2.0, -1.0], device=DEVICE),
        group_index=torch.tensor([0, 1, 0, 1], device=DEVICE), completion_mask=b["completion_mask"],
        length_penalty=0.5, **k),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("described_by", ["cu_seqlens", "position_ids"])
@pytest.mark.parametrize("loss", CALLS)
def test_packed_row_equals_the_padded_batch(loss, described_by, backend):
    # The Triton kernels take no fp64; the same computation either way, in another order only.
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    padded, packed, present, cu, position_ids = padded_and_packed(dtype=dtype)
    padded["logits"].requires_grad_()
    packed["logits"].requires_grad_()
    how = {"cu_seqlens": cu} if described_by == "cu_seqlens" else {"position_ids": position_ids}
    with fastalign.use_backend(backend):
        want = CALLS[loss](padded)
        got = CALLS[loss](packed, **how)
    want.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, **tol)
    assert sorted(got.metrics) == sorted(want.metrics)
    for name, value in want.metrics.items():
        torch.testing.assert_close(got.metrics[name], value, **tol, msg=name)
    torch.testing.assert_close(packed["logits"].grad[0], padded["logits"].grad[present], **tol)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(cu_seqlens=torch.tensor([0, 5, 8, 14])), r"^cu_seqlens: expected increasing boundaries from 0 to the packed length 16"),
        (dict(cu_seqlens=torch.tensor([0, 5, 5, 14, 16])), r"^cu_seqlens: expected increasing boundaries"),
        (dict(cu_seqlens=torch.tensor([0.0, 16.0])), r"^cu_seqlens: expected a 1-d integer tensor"),
        (dict(cu_seqlens=torch.tensor([0, 8, 16]), position_ids=torch.arange(16)), r"^cu_seqlens, position_ids: pass exactly one"),
        (dict(position_ids=torch.arange(15)), r"^position_ids: expected 16 positions"),
        (dict(position_ids=torch.tensor([0, 1, 2, 4] + list(range(12)))), r"^position_ids: within a sequence the positions"),
        (dict(position_ids=torch.arange(1, 17)), r"^position_ids: a packed row starts a sequence"),
        (dict(cu_seqlens=torch.tensor([0, 5, 8, 16])), r"^cu_seqlens / position_ids: a paired loss takes 2B packed sequences"),
    ],
)
def test_bad_packing_is_named(change, match):
    _, packed, *_ = padded_and_packed()
    change = {k: v.to(DEVICE) for k, v in change.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        CALLS["dpo"](packed, **change)


def test_a_packed_call_needs_one_row():
    padded, *_ , cu, _ = padded_and_packed()
    with pytest.raises(ValueError, match=r"^logits: a packed row \(cu_seqlens / position_ids\) is \[1, total, V\]"):
        CALLS["simpo"](padded, cu_seqlens=cu)
