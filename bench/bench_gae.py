"""gae: advantages and returns from per-token rewards and values, whitened, as PPO trainers do it
once per step under no_grad.

Rows per case (op, pass, shape, dtype):
  eager    verl's loop (verl.trainer.ppo.core_algos.compute_gae_advantage_return: a Python loop over
           time, masked carries, then masked_whiten): the ratio baseline
  trl      TRL's PPOTrainer loop (unmasked recurrence, masked_whiten, masked_fill)
  native   fastalign.gae on the C++ backend, verl semantics (one call: scan and whitening)
  native-trl  the same with semantics="trl": the like-for-like row for TRL's loop
  triton   fastalign.gae on the Triton backend (CUDA only)
verl is not a dependency and TRL 1.16 no longer ships its PPO trainer, so both loops are ported
here statement for statement (tests/ops/test_gae.py checks the same ports against fastalign).
The mask is right padding: completions of different lengths, as a rollout batch has.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from harness import DEVICE, not_run

# The README's main table and chart are these rows, so a plain `make bench` (the headline set) times them.
pytestmark = pytest.mark.headline

OP = "gae"
GAMMA, LAM = 1.0, 0.95


def _cases() -> list[dict]:
    shape = (64, 1024) if os.environ.get("FASTALIGN_BENCH_QUICK") == "1" else (256, 4096)
    group = f"{OP} fwd float32 {'x'.join(map(str, shape))}"
    return [{"op": OP, "pass": "fwd", "shape": list(shape), "dtype": "float32", "group": group}]


IMPLS = ["eager", "trl", "native", "native-trl", "triton"]
CASES = _cases()
PARAMS = [
    pytest.param(case, impl, id=f"{case['pass']}-{case['dtype']}-{'x'.join(map(str, case['shape']))}-{impl}")
    for case in CASES
    for impl in IMPLS
]


def _masked_mean(values, mask, eps):
    return (values * mask).sum() / (mask.sum() + eps)


def _masked_whiten(values, mask, eps):
    # masked_whiten of verl (eps = 1e-8 in the mean's count) and of TRL (eps = 0), unbiased.
    mean = _masked_mean(values, mask, eps)
    var = _masked_mean((values - mean) ** 2, mask, eps)
    mask_sum = mask.sum()
    var = var * (mask_sum / (mask_sum - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8)


def _verl_loop(rewards, values, mask):
    with torch.no_grad():
        nextvalues = 0
        lastgaelam = 0
        advantages_reversed = []
        for t in reversed(range(rewards.shape[-1])):
            delta = rewards[:, t] + GAMMA * nextvalues - values[:, t]
            lastgaelam_ = delta + GAMMA * LAM * lastgaelam
            nextvalues = values[:, t] * mask[:, t] + (1 - mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * mask[:, t] + (1 - mask[:, t]) * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
        return _masked_whiten(advantages, mask, 1e-8), returns


def _trl_loop(rewards, values, mask):
    with torch.no_grad():
        padding_mask = mask == 0
        lastgaelam = 0
        advantages_reversed = []
        gen_length = rewards.shape[1]
        for t in reversed(range(gen_length)):
            nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
            delta = rewards[:, t] + GAMMA * nextvalues - values[:, t]
            lastgaelam = delta + GAMMA * LAM * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], axis=1)
        returns = advantages + values
        advantages = _masked_whiten(advantages, ~padding_mask, 0.0)
        return torch.masked_fill(advantages, padding_mask, 0), returns


_INPUTS: dict = {}


def _inputs(case: dict):
    key = tuple(case["shape"])
    if key not in _INPUTS:
        _INPUTS.clear()
        rows, length = case["shape"]
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        rewards = torch.randn(rows, length, generator=gen, device=DEVICE) * 0.01
        values = torch.randn(rows, length, generator=gen, device=DEVICE)
        ends = torch.randint(length // 4, length + 1, (rows,), generator=gen, device=DEVICE)
        mask = (torch.arange(length, device=DEVICE) < ends[:, None]).float()
        _INPUTS[key] = (rewards, values, mask)
    return _INPUTS[key]


def _impl(impl: str, case: dict):
    """(fn(rewards, values, mask) -> (advantages, returns), context factory, label)."""
    if impl == "eager":
        return _verl_loop, contextlib.nullcontext, "verl loop (eager)"
    if impl == "trl":
        return _trl_loop, contextlib.nullcontext, "TRL PPO loop (eager)"
    import fastalign

    backend, _, semantics = impl.partition("-")
    semantics = semantics or "verl"
    available, reason = fastalign.available_backends(DEVICE).get(backend, (False, "no such backend"))
    if not available:
        not_run(case, impl, reason)
    if backend == "triton" and DEVICE != "cuda":
        not_run(case, impl, "CPU runs Triton only under the interpreter; not a performance path")

    def fn(rewards, values, mask):
        return fastalign.gae(rewards, values, mask, GAMMA, LAM, convention=semantics)

    return fn, lambda: fastalign.use_backend(backend), f"fastalign {backend} ({semantics} semantics)"


@pytest.mark.parametrize("case,impl", PARAMS)
def bench_gae(measure, case, impl):
    import harness

    rewards, values, mask = _inputs(case)
    fn, ctx, label = _impl(impl, case)

    def step():
        with ctx():
            out = fn(rewards, values, mask)
        harness.sync(DEVICE)
        return out

    adv, _ = step()
    # TRL's loop gives other advantages by design (no mask in its recurrence): its own semantics
    # are the sanity check for its row.
    expected, _ = (_trl_loop if impl.endswith("trl") else _verl_loop)(rewards, values, mask)
    err = (adv.double() - expected.double()).abs().max().item()
    measure(step, case=case, impl=impl, label=label, extra={"max_err_loss": err})
