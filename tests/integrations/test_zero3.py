"""DeepSpeed ZeRO-3 (DeepSpeed's CPU accelerator, 2 gloo processes): the lm_head is partitioned to
numel 0 on each rank, and fastalign reads it from hidden states anyway — linear_token_logprobs
gathers it for the forward and again for its backward, the GRPO loss gathers it for its forward
(its weight gradient comes out there), DPO goes through linear_token_logprobs. One training step's
loss and every parameter's gradient (DeepSpeed's full gradient, averaged over the ranks) equal one
process running both ranks' halves."""

from __future__ import annotations

import os
import socket
import sys
import tempfile

import peers
import torch
import torch.multiprocessing as mp

peers.require("deepspeed")

VOCAB, WIDTH, ROWS, LENGTH = 23, 8, 4, 5
LOSSES = ("linear_token_logprobs", "grpo", "dpo")


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(WIDTH, WIDTH)
        self.lm_head = torch.nn.Linear(WIDTH, VOCAB)

    def forward(self, x, labels, mask, loss):
        # The loss runs inside the model's forward, where ZeRO-3's hooks are armed (as TRL's trainers do).
        import fastalign

        hidden = torch.tanh(self.body(x))
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if loss == "linear_token_logprobs":
            out = fastalign.linear_token_logprobs(hidden, weight, labels, bias=bias, mask=mask, outputs=("entropy",))
            return -(out.logps.sum() - 0.1 * out.entropy.sum()) / mask.sum()
        if loss == "grpo":
            advantages = torch.linspace(-1.0, 1.0, labels.shape[0])
            return fastalign.grpo_loss(hidden=hidden, weight=weight, bias=bias, labels=labels, completion_mask=mask,
                                       advantages=advantages, loss_type="grpo").loss
        chosen_ref = torch.full((labels.shape[0] // 2,), -40.0)
        return fastalign.DPOLoss(beta=0.1)(hidden=hidden, weight=weight, bias=bias, labels=labels,
                                           completion_mask=mask, ref_chosen_logps=chosen_ref,
                                           ref_rejected_logps=chosen_ref - 1).loss


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, LENGTH, WIDTH, generator=g)
    labels = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g)
    mask = torch.ones(ROWS, LENGTH)
    mask[1, 3:] = 0
    return x, labels, mask


def _worker(rank, world, port, out_dir):
    # DeepSpeed reads the launcher's variables (else it looks for MPI); its CPU accelerator, gloo.
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        import fastalign.linear_logprobs as linear

        # What the backward reads: the parameter itself, gathered again (not a copy kept since the forward).
        seen = []
        backward = linear.linear_token_logprobs_backward

        def spy(*args):
            weight = args[3]
            seen.append((hasattr(weight, "ds_id"), str(getattr(weight, "ds_status", None)), tuple(weight.shape)))
            return backward(*args)

        linear.linear_token_logprobs_backward = spy
        x, labels, mask = batch()
        mine = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
        results = {}
        for loss_name in LOSSES:
            torch.manual_seed(0)
            config = {"train_micro_batch_size_per_gpu": ROWS // world, "zero_optimization": {"stage": 3},
                      "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}}
            engine, *_ = deepspeed.initialize(model=TinyLM(), config=config)
            partitioned = engine.module.lm_head.weight.numel() == 0
            loss = engine(x[mine], labels[mine], mask[mine], loss_name)
            engine.backward(loss)
            grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}
            total = loss.detach().clone()
            dist.all_reduce(total)
            results[loss_name] = {"loss": total / world, "grads": grads, "partitioned": partitioned,
                                  "backward_read": list(seen)}
            seen.clear()
            engine.destroy()
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the result is on disk; see test_linear_fsdp.py


def test_zero3_step_matches_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, port, tmp), nprocs=2, join=True)
        results = torch.load(os.path.join(tmp, "result.pt"))
    x, labels, mask = batch()
    for loss_name in LOSSES:
        torch.manual_seed(0)
        model = TinyLM()
        halves = [model(x[r * ROWS // 2:(r + 1) * ROWS // 2], labels[r * ROWS // 2:(r + 1) * ROWS // 2],
                        mask[r * ROWS // 2:(r + 1) * ROWS // 2], loss_name) for r in range(2)]
        loss = sum(halves) / 2
        loss.backward()
        got = results[loss_name]
        assert got["partitioned"], "the lm_head was not partitioned: ZeRO-3 did not run"
        if loss_name != "grpo":  # GRPO's weight gradient comes out of its forward: no backward read
            assert got["backward_read"] == [(True, "ZeroParamStatus.AVAILABLE", (VOCAB, WIDTH))], got["backward_read"]
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6, msg=loss_name)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=f"{loss_name}: {name}")
