"""token_logprobs on logits sharded along the vocabulary (tensor parallelism), 2 and 4 gloo
processes on CPU: every field and the gradient of every slice equal one process running the whole
vocabulary. Slices come as a DTensor (`distribute_tensor(..., [Shard(-1)])`, and from a
`ColwiseParallel` lm_head built by `parallelize_module`) or as plain local tensors with
`process_group=` (uneven slices: 37 entries over 4 ranks)."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def cases():
    """(name, logits, labels, mask, options) for every case, the same in every process."""
    g = torch.Generator().manual_seed(7)
    out = []
    logits = torch.randn(3, 5, 37, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 37, (3, 5), generator=g)
    labels[0, 1] = -100
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    out.append(("fp64 temperature mask", logits, labels, mask, dict(temperature=0.7)))
    logits = torch.randn(2, 4, 37, generator=g) * 3
    out.append(("fp32 softcap scale", logits, torch.randint(0, 37, (2, 4), generator=g), None,
                dict(softcap=5.0, logit_scale=0.5)))
    out.append(("fp32 negative scale", torch.randn(2, 3, 37, generator=g), torch.randint(0, 37, (2, 3), generator=g),
                None, dict(logit_scale=-1.3, temperature=1.1)))
    # |z| ~ 1e4: the slices combine by differences of nearby values, as one process measures them.
    big = torch.randn(2, 3, 37, generator=g, dtype=torch.float64) * 3 + 1e4
    out.append(("fp32 large magnitude", big.float(), torch.randint(0, 37, (2, 3), generator=g), None, {}))
    # Ties across slices (argmax takes the first maximum) and a slice with no mass at all.
    ties = torch.randn(4, 37, generator=g, dtype=torch.float64)
    ties[:, 2] = ties[:, 30] = 9.0
    ties[3, :10] = float("-inf")
    tie_labels = torch.tensor([2, 30, 5, 30])
    out.append(("fp64 ties and an empty slice", ties, tie_labels, None, {}))
    logits = torch.randn(2, 6, 37, generator=g).bfloat16()
    out.append(("bf16", logits, torch.randint(0, 37, (2, 6), generator=g), None, dict(temperature=0.9)))
    return out


def objective(fields):
    """A loss that weighs every token's log-prob and entropy differently."""
    logps, entropy = fields.logps, fields.entropy
    w = torch.linspace(-1.0, 1.0, logps.numel(), dtype=torch.float64).view_as(logps)
    return (logps.double() * w).sum() + (entropy.double() * w.flip(-1)).sum() * 0.3


def _slices(vocab, world):
    return [t.numel() for t in torch.arange(vocab).tensor_split(world)]


def _worker(rank, world, init_file, mode, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import fastalign

        results = {}
        for name, logits, labels, mask, options in cases():
            if mode == "dtensor":
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.tensor import Shard, distribute_tensor

                mesh = init_device_mesh("cpu", (world,))
                leaf = distribute_tensor(logits, mesh, [Shard(logits.dim() - 1)]).requires_grad_()
                fields = fastalign.token_logprobs(leaf, labels, mask=mask, outputs=OUTPUTS, **options)
                objective(fields).backward()
                grad = leaf.grad.full_tensor()
            else:
                sizes = _slices(logits.shape[-1], world)
                start = sum(sizes[:rank])
                leaf = logits[..., start:start + sizes[rank]].clone().requires_grad_()
                fields = fastalign.token_logprobs(leaf, labels, mask=mask, outputs=OUTPUTS,
                                                  process_group=dist.group.WORLD, **options)
                objective(fields).backward()
                parts = [None] * world
                dist.all_gather_object(parts, leaf.grad)
                grad = torch.cat(parts, dim=-1)
            results[name] = {f: getattr(fields, f).detach() for f in ("logps",) + OUTPUTS}
            results[name]["grad"] = grad
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the result is on disk; see test_linear_fsdp.py for why no interpreter shutdown


def _run(world, mode):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "rendezvous"), mode, tmp), nprocs=world, join=True)
        return torch.load(os.path.join(tmp, "result.pt"))


@pytest.mark.parametrize("mode", ["group", "dtensor"])
@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_equals_one_process(world, mode):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import fastalign
    from numerics import assert_as_accurate_as_reference

    results = _run(world, mode)
    for name, logits, labels, mask, options in cases():
        leaf = logits.clone().requires_grad_()
        whole = fastalign.token_logprobs(leaf, labels, mask=mask, outputs=OUTPUTS, **options)
        objective(whole).backward()
        truth_leaf = logits.double().requires_grad_()
        truth = fastalign.reference.token_logprobs(truth_leaf, labels, mask=mask, outputs=OUTPUTS, **options)
        objective(truth).backward()
        got = results[name]
        assert torch.equal(got["is_top1"], whole.is_top1), name
        for field in ("logps",) + OUTPUTS[:3]:
            # As accurate as one process against float64, entry by entry up to fp32 rounding.
            assert_as_accurate_as_reference(got[field], getattr(whole, field), getattr(truth, field),
                                            f"{name}: {field}")
        assert_as_accurate_as_reference(got["grad"], leaf.grad, truth_leaf.grad, f"{name}: grad", slack_eps=8.0)
        if logits.dtype == torch.float64:
            for field in ("logps",) + OUTPUTS[:3]:
                torch.testing.assert_close(got[field], getattr(whole, field), rtol=1e-12, atol=1e-12,
                                           msg=f"{name}: {field}")
            torch.testing.assert_close(got["grad"], leaf.grad, rtol=1e-12, atol=1e-12, msg=f"{name}: grad")
