"""Context parallelism: every sequence's tokens split over 2 and 4 gloo processes on CPU (uneven
slices), each rank passing its slice with `sequence_group=`. The loss and every metric on each
rank, and the gradient of each rank's logits put side by side, equal one process running the whole
sequences: the preference losses (DPO with LD weighting and WPO, SimPO, ORPO, KTO), the GRPO family
(TRL's per-sequence and token aggregations, GSPO in both conventions, verl's seq-mean-token-mean),
PPO with its value loss, RLOO, and packed rows split over the group."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

B, T, V, H = 4, 9, 13, 6
TOKEN_KEYS = ("logits", "hidden", "labels", "mask", "old", "ref", "token_adv", "vpreds", "values", "returns")


def batch():
    g = torch.Generator().manual_seed(3)
    b = {
        "logits": torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2,
        "hidden": torch.randn(B, T, H, generator=g, dtype=torch.float64),
        "labels": torch.randint(0, V, (B, T), generator=g),
        "mask": (torch.rand(B, T, generator=g) > 0.25).double(),
        "old": torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1 - 2.6,
        "ref": torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1 - 2.6,
        "token_adv": torch.randn(B, T, generator=g, dtype=torch.float64),
        "vpreds": torch.randn(B, T, generator=g, dtype=torch.float64),
        "values": torch.randn(B, T, generator=g, dtype=torch.float64),
        "returns": torch.randn(B, T, generator=g, dtype=torch.float64),
        "adv": torch.randn(B, generator=g, dtype=torch.float64),
        "weight": torch.randn(V, H, generator=g, dtype=torch.float64),
    }
    b["mask"][1, :] = 0  # a sequence with no counted token
    b["mask"][2, 5:] = 0  # one that ends inside the first rank's slices at 4 ranks
    b["seq_old"] = (b["old"] * b["mask"]).sum(-1)
    b["pref_labels"] = b["labels"].masked_fill(b["mask"] == 0, -100)
    return b


def packed(b):
    """The same four sequences packed into one row (lengths 9, 4, 6, 9)."""
    lengths = [9, 4, 6, 9]
    present = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    out = {k: (v[present][None] if k in TOKEN_KEYS or k == "pref_labels" else v) for k, v in b.items()}
    out["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return out


def calls():
    import fastalign

    ref_pair = torch.tensor([-30.0, -20.0], dtype=torch.float64), torch.tensor([-31.0, -19.0], dtype=torch.float64)
    kto_ref = torch.tensor([-30.0, -20.0, -31.0, -19.0], dtype=torch.float64)
    return {
        "dpo sigmoid+sft": lambda b, **k: fastalign.dpo_loss_from_logits(
            b["logits"], b["pref_labels"], ref_chosen_logps=ref_pair[0], ref_rejected_logps=ref_pair[1], beta=0.1,
            loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], **k),
        "dpo ld_alpha wpo": lambda b, **k: fastalign.dpo_loss_from_logits(
            b["logits"], b["pref_labels"], ref_chosen_logps=ref_pair[0], ref_rejected_logps=ref_pair[1], beta=0.1,
            ld_alpha=0.5, use_weighting=True, **k),
        "simpo from hidden": lambda b, **k: fastalign.cpo_loss_from_logits(
            hidden=b["hidden"], weight=b["weight"], labels=b["pref_labels"], loss_type="simpo", cpo_alpha=0.0, **k),
        "orpo": lambda b, **k: fastalign.orpo_loss_from_logits(
            b["logits"], b["pref_labels"], completion_mask=b["mask"], beta=0.1, **k),
        "kto": lambda b, **k: fastalign.kto_loss_from_logits(
            b["logits"], b["pref_labels"], kto_ref, torch.tensor([True, False, True, False]),
            kl=torch.tensor(0.1, dtype=torch.float64), **k),
        "rrhf": lambda b, **k: fastalign.rrhf_loss_from_logits(
            b["logits"], b["pref_labels"], torch.tensor([1.0, 0.5, 2.0, -1.0], dtype=torch.float64),
            group_index=torch.tensor([0, 1, 0, 1]), completion_mask=b["mask"], length_penalty=0.5, **k),
        "grpo trl dapo": lambda b, **k: fastalign.grpo_loss(
            b["logits"], b["labels"], completion_mask=b["mask"], advantages=b["adv"], old_logps=b["old"],
            ref_logps=b["ref"], beta=0.04, num_items_in_batch=20.0, **k),
        "grpo trl grpo top entropy": lambda b, **k: fastalign.grpo_loss(
            b["logits"], b["labels"], completion_mask=b["mask"], advantages=b["adv"], old_logps=b["old"],
            loss_type="grpo", top_entropy_quantile=0.4, **k),
        "gspo trl": lambda b, **k: fastalign.grpo_loss(
            b["logits"], b["labels"], completion_mask=b["mask"], advantages=b["adv"], old_logps=b["old"],
            loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4, **k),
        "gspo verl from hidden": lambda b, **k: fastalign.grpo_loss(
            hidden=b["hidden"], weight=b["weight"], labels=b["labels"], completion_mask=b["mask"],
            advantages=b["adv"], old_logps=b["old"], convention="verl", loss_type="gspo",
            loss_agg_mode="seq-mean-token-mean", **k),
        "grpo verl token advantages": lambda b, **k: fastalign.grpo_loss(
            b["logits"], b["labels"], completion_mask=b["mask"], advantages=b["token_adv"], old_logps=b["old"],
            ref_logps=b["ref"], convention="verl", loss_type="vanilla", loss_agg_mode="seq-mean-token-mean",
            beta=0.001, **k),
        "ppo with values": lambda b, **k: fastalign.ppo_loss(
            b["logits"], b["labels"], completion_mask=b["mask"], advantages=b["token_adv"], old_logps=b["old"],
            vpreds=b["vpreds"], values=b["values"], returns=b["returns"], **k),
        "rloo": lambda b, **k: fastalign.rloo_loss(
            b["logits"], b["labels"], completion_mask=b["mask"], advantages=b["adv"], old_logps=b["seq_old"], **k),
    }


PACKED = ("dpo ld_alpha wpo", "kto", "rrhf", "grpo trl grpo top entropy", "gspo verl from hidden")
GRAD_KEYS = ("logits", "hidden", "vpreds")


def run_case(name, b, **layout):
    """(loss, metrics, gradients) of one call; the per-token inputs that take gradients are leaves."""
    b = dict(b)
    for key in GRAD_KEYS:
        b[key] = b[key].detach().clone().requires_grad_()
    out = calls()[name](b, **layout)
    out.loss.backward()
    grads = {k: b[k].grad for k in GRAD_KEYS if b[k].grad is not None}
    return out.loss.detach(), {k: v.detach() for k, v in out.metrics.items()}, grads


def _slice(b, rank, world):
    """This rank's slice of every per-token tensor (uneven: T split as tensor_split does)."""
    def part(v):
        return v.tensor_split(world, dim=1)[rank]
    return {k: (part(v) if k in TOKEN_KEYS or k == "pref_labels" else v) for k, v in b.items()}


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        results = {}
        full = batch()
        for name in calls():
            layouts = [("split", full, {})] + ([("packed split", packed(full), "packed")] if name in PACKED else [])
            for how, b, extra in layouts:
                kwargs = {"sequence_group": group}
                if extra == "packed":
                    kwargs["cu_seqlens"] = b["cu_seqlens"]
                loss, metrics, grads = run_case(name, _slice(b, rank, world), **kwargs)
                parts = [None] * world
                dist.all_gather_object(parts, (loss, metrics, grads))
                results[(name, how)] = parts
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the result is on disk; see test_linear_fsdp.py for why no interpreter shutdown


def _run(world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "rendezvous"), tmp), nprocs=world, join=True)
        return torch.load(os.path.join(tmp, "result.pt"))


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_losses_equal_one_process(world):
    results = _run(world)
    full = batch()
    checked = 0
    for (name, how), parts in results.items():
        b = packed(full) if how == "packed split" else full
        extra = {"cu_seqlens": b["cu_seqlens"]} if how == "packed split" else {}
        want_loss, want_metrics, want_grads = run_case(name, b, **extra)
        # From logits one process keeps a policy loss's per-token inputs and statistics in fp32; split,
        # the loss runs at its log-prob level, in the log-probs' fp64.
        policy = any(name.startswith(p) for p in ("grpo", "gspo", "ppo", "rloo"))
        tol = dict(rtol=2e-6, atol=1e-8) if policy else dict(rtol=1e-12, atol=1e-12)
        for rank, (loss, metrics, grads) in enumerate(parts):
            where = f"{name} ({how}), rank {rank} of {world}"
            torch.testing.assert_close(loss, want_loss, **tol, msg=lambda m: f"{where}: {m}")
            assert sorted(metrics) == sorted(want_metrics), where
            for key, value in want_metrics.items():
                torch.testing.assert_close(metrics[key], value, rtol=1e-6, atol=1e-7, msg=f"{where}: {key}")
        for key, want in want_grads.items():
            got = torch.cat([grads[key] for _, _, grads in parts], dim=1)
            torch.testing.assert_close(got, want, **tol, msg=f"{name} ({how}): grad {key}")
        checked += 1
    assert checked == len(calls()) + len(PACKED)


def test_sequence_group_is_checked():
    import fastalign

    b = batch()
    with pytest.raises(ValueError, match=r"^sequence_group: torch.distributed is not initialized"):
        fastalign.grpo_loss(b["logits"], b["labels"], completion_mask=b["mask"], advantages=b["adv"],
                            loss_type="grpo", sequence_group=object())
    with pytest.raises(ValueError, match=r"^sequence_group: torch.distributed is not initialized"):
        calls()["dpo sigmoid+sft"](b, sequence_group=object())
