"""Tensor parallelism measured on CPU: per-rank peak memory, bytes sent and step time of the
log-prob + entropy stage (forward + backward) for TP = 1, 2, 4 gloo processes:
`python bench/scaling.py [--tp 1 2 4] [--out bench/results/scaling-<cpu>.md]`.

Two ways, as in `bench/scale_model.py` (which projects them to a 70B model):
  logits  vocabulary-parallel `token_logprobs` on each rank's fp32 logits slice [N, V/TP];
  hidden  `linear_token_logprobs(process_group=)` on hidden [N, H] and the lm_head's rows [V/TP, H].
Bytes sent count the collectives the way the model does (ring: an all-gather sends a rank's part
to the R - 1 others, an all-reduce 2 (R - 1) / R of its buffer), read from the calls themselves.
Peak memory is the rank's extra resident memory during one step (VmHWM, bench/harness.py).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


class SentBytes:
    """Counts the bytes this rank sends in all_gather and all_reduce while installed."""

    def __init__(self):
        self.sent = 0.0
        self.calls = 0
        self._saved = {}

    def __enter__(self):
        world = dist.get_world_size()
        gather, reduce = dist.all_gather, dist.all_reduce

        def all_gather(outputs, tensor, *args, **kwargs):
            self.sent += (world - 1) * tensor.numel() * tensor.element_size()
            self.calls += 1
            return gather(outputs, tensor, *args, **kwargs)

        def all_reduce(tensor, *args, **kwargs):
            self.sent += 2 * (world - 1) / world * tensor.numel() * tensor.element_size()
            self.calls += 1
            return reduce(tensor, *args, **kwargs)

        self._saved = {"all_gather": gather, "all_reduce": reduce}
        dist.all_gather, dist.all_reduce = all_gather, all_reduce
        return self

    def __exit__(self, *exc):
        dist.all_gather, dist.all_reduce = self._saved["all_gather"], self._saved["all_reduce"]


def _step(way, tokens, vocab, hidden_size, rank, world):
    import fastalign

    g = torch.Generator().manual_seed(0)
    sizes = [t.numel() for t in torch.arange(vocab).tensor_split(world)]
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    group = dist.group.WORLD if world > 1 else None
    if way == "logits":
        local = torch.randn(tokens, sizes[rank], generator=torch.Generator().manual_seed(rank + 1))
        leaf = local.requires_grad_()

        def step():
            out = fastalign.token_logprobs(leaf, labels, outputs=("entropy",), process_group=group)
            (out.logps.sum() + out.entropy.sum()).backward()
            leaf.grad = None
    else:
        h = torch.randn(tokens, hidden_size, generator=g).requires_grad_()
        w = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5)[rows].clone().requires_grad_()

        def step():
            out = fastalign.linear_token_logprobs(h, w, labels, outputs=("entropy",), process_group=group)
            (out.logps.sum() + out.entropy.sum()).backward()
            h.grad = w.grad = None
    return step


def _worker(rank, world, port, tokens, vocab, hidden_size, out_dir):
    import harness

    torch.set_num_threads(1)  # one core per rank, as one GPU per rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = []
        for way in ("logits", "hidden"):
            step = _step(way, tokens, vocab, hidden_size, rank, world)
            step()  # warm-up
            dist.barrier()
            with SentBytes() as counter:
                step()
            times = []
            for _ in range(3):
                dist.barrier()
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            peak = harness.measure_peak_mib(step, "cpu")
            rows.append({"way": way, "rank": rank, "sent": counter.sent, "collectives": counter.calls,
                         "ms": 1000 * statistics.median(times), "peak_mib": peak})
        parts = [None] * world
        dist.all_gather_object(parts, rows)
        if rank == 0:
            torch.save([r for p in parts for r in p], os.path.join(out_dir, "rows.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def measure(world: int, tokens: int, vocab: int, hidden_size: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, port, tokens, vocab, hidden_size, tmp), nprocs=world, join=True)
        return torch.load(os.path.join(tmp, "rows.pt"))


def report(results: dict[int, list[dict]], tokens: int, vocab: int, hidden_size: int) -> str:
    from scale_model import Setup, fastalign_hidden

    lines = [f"# Tensor parallelism on CPU: N = {tokens}, V = {vocab}, H = {hidden_size}, fp32", "",
             "Per rank (the largest over ranks), log-probs + entropy, forward + backward. `bench/scaling.py`.", "",
             "| TP | way | step ms | peak extra MiB | sent per step MiB | collectives |",
             "|---:|---|---:|---:|---:|---:|"]
    for world, rows in sorted(results.items()):
        for way in ("logits", "hidden"):
            mine = [r for r in rows if r["way"] == way]
            peak = [r["peak_mib"] for r in mine if r["peak_mib"] is not None]
            lines.append(f"| {world} | {way} | {max(r['ms'] for r in mine):.1f} | "
                         f"{max(peak):.0f} | {max(r['sent'] for r in mine) / 2**20:.3f} | {mine[0]['collectives']} |"
                         if peak else
                         f"| {world} | {way} | {max(r['ms'] for r in mine):.1f} | n/a | "
                         f"{max(r['sent'] for r in mine) / 2**20:.3f} | {mine[0]['collectives']} |")
    model = Setup(hidden=hidden_size, vocab=vocab, tokens=tokens, tp=max(results), act_bytes=4)
    lines += ["", f"`bench/scale_model.py`'s bytes for the hidden-states way at TP = {model.tp}: "
              f"{fastalign_hidden(model)['sent'] / 2**20:.3f} MiB sent (plus 8 bytes per other rank for the "
              "slice sizes). Its memory terms are the GPU's blocks (128M values); on CPU the blocks hold 8M "
              "values and the backward runs in (token x column) tiles, so the hidden-states way's peak here "
              "is smaller than the model's. The logits way's peak is its gradient, N x V/TP x 4 bytes, as modelled.",
              "", "On 2 cores, 4 ranks share 2 cores: the step times at TP = 4 measure oversubscription, not scaling."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    results = {world: measure(world, args.tokens, args.vocab, args.hidden) for world in args.tp}
    text = report(results, args.tokens, args.vocab, args.hidden)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
