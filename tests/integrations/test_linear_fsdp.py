"""linear_token_logprobs under FSDP2 (`fully_shard`), 2 gloo processes on CPU: called inside the
module's forward (the weight is unsharded there) and outside it (a DTensor weight, gathered), the
loss and every parameter's gradient equal a single process running the whole batch unfused."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VOCAB, WIDTH, ROWS, LENGTH = 61, 16, 4, 5


class Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.body = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, ids):
        return torch.tanh(self.body(self.embed(ids)))


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.lm_head = torch.nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, ids, labels, fused=True):
        import fastalign

        hidden = self.backbone(ids)
        if fused:
            return fastalign.linear_token_logprobs(hidden, self.lm_head.weight, labels).logps
        return fastalign.reference.token_logprobs(self.lm_head(hidden), labels).logps


def batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=gen)
    labels = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=gen)
    labels[1, -2:] = -100
    return ids, labels


def _worker(rank, world, init_file, mode, out_dir):
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = TinyLM()
        fully_shard(model.backbone)
        fully_shard(model)
        ids, labels = batch()
        mine = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
        if mode == "inside":
            logps = model(ids[mine], labels[mine])
        else:  # outside the module's forward: the lm_head weight is a sharded DTensor
            import fastalign

            hidden = model.backbone(ids[mine])
            logps = fastalign.linear_token_logprobs(hidden, model.lm_head.weight, labels[mine]).logps
        loss = -logps.sum() / ROWS * world  # FSDP averages gradients over ranks
        loss.backward()
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        total = loss.detach() / world
        dist.all_reduce(total)
        if rank == 0:
            torch.save({"loss": total, "grads": grads}, os.path.join(out_dir, "result.pt"))
        # Both ranks leave together: a rank tearing gloo down while the other still works on it
        # can abort at exit ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The result is on disk. A worker's interpreter shutdown still aborts now and then under load
    # (a C++ thread of the process group destroyed while joinable); the work is done, so the
    # worker leaves without running the static destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("mode", ["inside", "outside"])
def test_fully_shard_two_processes_matches_one(mode):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_worker, args=(2, init_file, mode, tmp), nprocs=2, join=True)
        result = torch.load(os.path.join(tmp, "result.pt"))
    torch.manual_seed(0)
    model = TinyLM()
    ids, labels = batch()
    loss = -model(ids, labels, fused=False).sum() / ROWS
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
