"""Two (or more) training processes stood in for by threads: accelerate's Accelerator as one of
them, and a runner that calls a step on every one at once. The TRL trainer tests use it to compare
the cross-process reductions of every metric with stock TRL's."""

from __future__ import annotations

import threading

import torch


class ThreadedAccelerator:
    """accelerate's Accelerator as one of `size` processes run as threads: `gather` (and
    `gather_for_metrics`) concatenates every process's tensor along dim 0, a 0-d tensor counting as [1];
    `reduce` sums (or averages) every process's tensor; `pad_across_processes` pads dim 0 to the
    longest process's. `sync_gradients` is the caller's to set (True: an optimizer step's micro-batch)."""

    def __init__(self, rank: int, shared: dict):
        self.rank, self.shared = rank, shared
        self.num_processes = len(shared["slots"])
        self.device = torch.device("cpu")
        self.sync_gradients = True

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = tensor.reshape(1) if tensor.dim() == 0 else tensor
        barrier.wait()
        gathered = torch.cat(list(slots))
        barrier.wait()  # nobody overwrites a slot before every process has read them all
        return gathered

    gather_for_metrics = gather

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        total = self.gather(tensor.unsqueeze(0)).sum(0)
        return total / self.num_processes if reduction == "mean" else total

    def pad_across_processes(self, tensor: torch.Tensor, dim: int = 0, pad_index=0) -> torch.Tensor:
        if dim != 0:
            raise NotImplementedError("the stand-in pads dim 0 only")
        longest = int(self.gather(torch.tensor([tensor.shape[0]])).max())
        padding = tensor.new_full((longest - tensor.shape[0], *tensor.shape[1:]), pad_index)
        return torch.cat([tensor, padding])


def run_as_processes(step, size: int = 2) -> list:
    """`step(accelerator)` on `size` threads at once, one ThreadedAccelerator each; their results in rank order."""
    shared = {"slots": [None] * size, "barrier": threading.Barrier(size, timeout=60)}
    results, errors = [None] * size, []

    def run(rank):
        try:
            results[rank] = step(ThreadedAccelerator(rank, shared))
        except BaseException as error:  # noqa: BLE001 - re-raised below, after the other threads stop
            errors.append(error)
            shared["barrier"].abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
