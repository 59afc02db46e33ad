"""group_advantages: GRPO advantages for 4,096 prompts x 16 completions, against the trainers' own code.

Rows (op group_advantages, pass fwd, shape [prompts, completions], float32):
  eager    fastalign.reference (vectorized PyTorch: index_add over group ids), eager
  trl      TRL 1.16 GRPOTrainer's vectorized block (view(-1, G), nanmean, trl nanstd, nan_to_num)
  verl     verl compute_grpo_outcome_advantage's per-group Python loop (dict of lists), ported
           (verl is not a dependency); it gets the group ids as a uid tensor, as verl does
  native   fastalign's C++ backend: one parallel pass over the groups
  triton   fastalign's Triton backend (CUDA only)
TRL's and verl's forms differ in NaN handling and epsilon; each row is checked against the
matching fastalign call before timing.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch

import harness
from harness import DEVICE, not_run

# The README's main table and chart are these rows, so a plain `make bench` (the headline set) times them.
pytestmark = pytest.mark.headline

OP = "group_advantages"
PROMPTS, G = (256, 16) if os.environ.get("FASTALIGN_BENCH_QUICK") == "1" else (4096, 16)
CASE = {"op": OP, "pass": "fwd", "shape": [PROMPTS, G], "dtype": "float32",
        "group": f"{OP} fwd float32 {PROMPTS}x{G}"}
IMPLS = ["eager", "trl", "verl", "native", "triton"]

_INPUTS: dict = {}


def _inputs():
    if not _INPUTS:
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        rewards = (torch.rand(PROMPTS * G, generator=gen, device=DEVICE) > 0.5).float()
        rewards += 0.1 * torch.randn(PROMPTS * G, generator=gen, device=DEVICE)
        index = torch.arange(PROMPTS * G, device=DEVICE) // G
        _INPUTS.update(rewards=rewards, index=index)
    return _INPUTS["rewards"], _INPUTS["index"]


def _trl(rewards, index):
    from trl.trainer.utils import nanstd

    grouped = rewards.view(-1, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(G, dim=0)
    std = nanstd(grouped, dim=1).repeat_interleave(G, dim=0)
    return torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)


def _verl(rewards, index, epsilon=1e-6):
    scores = rewards.clone()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    bsz = scores.shape[0]
    for i in range(bsz):
        id2score[index[i].item()].append(scores[i])
    for idx, vals in id2score.items():
        if len(vals) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            stacked = torch.stack(vals)
            id2mean[idx], id2std[idx] = torch.mean(stacked), torch.std(stacked)
    for i in range(bsz):
        idx = index[i].item()
        scores[i] = (scores[i] - id2mean[idx]) / (id2std[idx] + epsilon)
    return scores


def _fastalign(backend: str, convention: str):
    import fastalign

    def fn(rewards, index):
        with fastalign.use_backend(backend):
            if convention == "verl":
                return fastalign.group_advantages(rewards, group_index=index, convention="verl")
            return fastalign.group_advantages(rewards, group_size=G)

    return fn


def _impl(impl: str):
    if impl == "trl":
        try:
            import trl.trainer.utils  # noqa: F401
        except Exception as exc:  # noqa: BLE001  TRL missing or broken: the row just goes away
            not_run(CASE, impl, f"TRL not importable ({type(exc).__name__}: {exc})")
        return _trl, "trl GRPOTrainer (vectorized torch)", _fastalign("reference", "trl")
    if impl == "verl":
        return _verl, "verl GRPO loop (ported)", _fastalign("reference", "verl")
    if impl == "eager":
        return _fastalign("reference", "trl"), "fastalign reference (eager)", None
    import fastalign

    available, reason = fastalign.available_backends(DEVICE).get(impl, (False, "no such backend"))
    if not available:
        not_run(CASE, impl, reason)
    if impl == "triton" and DEVICE != "cuda":
        not_run(CASE, impl, "CPU runs Triton only under the interpreter; not a performance path")
    return _fastalign(impl, "trl"), f"fastalign {impl}", None


@pytest.mark.parametrize("impl", IMPLS)
def bench_group_advantages(measure, impl):
    rewards, index = _inputs()
    fn, label, check = _impl(impl)

    def step():
        with torch.no_grad():
            out = fn(rewards, index)
        harness.sync(DEVICE)
        return out

    got = step()
    want = (check or _fastalign("reference", "trl"))(rewards, index)
    err = float((got.double() - want.double()).abs().max())
    measure(step, case=CASE, impl=impl, label=label, extra={"max_err": err})
