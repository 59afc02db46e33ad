"""rrhf_loss: RRHF from the policy's logits (`fastalign.rrhf_loss_from_logits`), forward + backward to
the logits, for prompts of k = 4 responses with rewards.

Rows per case (op, pass, shape, dtype):
  eager      fastalign.reference.rrhf.rrhf_loss_from_logits: log_softmax over [N, T, V], gather, masked
             sums, then the ranking and SFT terms per prompt, the way the released RRHF trainer
             computes them: the ratio baseline
  compile    torch.compile of that same reference (compiled before timing starts)
  native     fastalign.rrhf_loss_from_logits on the C++ backend: one pass over the logits forward, one backward
  triton     fastalign.rrhf_loss_from_logits on the Triton backend (CUDA only)
Neither TRL nor Liger-Kernel has an RRHF loss, so there is no trainer row.
"""

from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch

import harness
from harness import DEVICE, not_run

pytestmark = pytest.mark.headline

OP = "rrhf_loss"
VOCAB = 32000  # Llama-2 / Mistral
RESPONSES = 4  # k per prompt
PROMPT = 64  # leading positions outside the response


def _cases() -> list[dict]:
    if os.environ.get("FASTALIGN_BENCH_QUICK") == "1":
        shapes = [(RESPONSES, 128, VOCAB)]
    else:
        shapes = [(2 * RESPONSES, 512, VOCAB)]  # two prompts of k = 4 responses, T = 512
    cases = []
    for shape in shapes:
        for dtype in ("float32", "bfloat16"):
            group = f"{OP} fwd+bwd {dtype} {'x'.join(map(str, shape))}"
            cases.append({"op": OP, "pass": "fwd+bwd", "shape": list(shape), "dtype": dtype, "group": group})
    return cases


IMPLS = ["eager", "compile", "native", "triton"]
CASES = _cases()
PARAMS = [
    pytest.param(case, impl, id=f"{case['pass']}-{case['dtype']}-{'x'.join(map(str, case['shape']))}-{impl}")
    for case in CASES
    for impl in IMPLS
]

_INPUTS: dict = {}


def _inputs(case: dict):
    key = (tuple(case["shape"]), case["dtype"])
    if key not in _INPUTS:
        _INPUTS.clear()
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        rows, length, vocab = case["shape"]
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        logits = torch.randn(rows, length, vocab, generator=gen, device=DEVICE) * 4
        logits = logits.to(getattr(torch, case["dtype"])).requires_grad_(True)
        labels = torch.randint(0, vocab, (rows, length), generator=gen, device=DEVICE)
        labels[:, :PROMPT] = -100
        # Responses of different lengths, padding after them.
        ends = torch.randint(length // 2, length + 1, (rows,), generator=gen, device=DEVICE)
        labels[torch.arange(length, device=DEVICE) >= ends.unsqueeze(1)] = -100
        rewards = torch.randn(rows, generator=gen, device=DEVICE)
        from fastalign.reference import rrhf as reference

        with torch.no_grad():
            expected = reference.rrhf_loss_from_logits(logits, labels, rewards, group_size=RESPONSES).loss
        _INPUTS[key] = (logits, labels, rewards, expected)
    return _INPUTS[key]


def _impl(impl: str, case: dict):
    """(loss function, context factory, label), or a call to not_run() that skips the benchmark."""
    from fastalign.reference import rrhf as reference

    nullctx = contextlib.nullcontext
    if impl == "eager":
        return reference.rrhf_loss_from_logits, nullctx, "reference (eager)"
    if impl == "compile":
        return torch.compile(reference.rrhf_loss_from_logits, dynamic=False), nullctx, "reference (torch.compile)"
    import fastalign

    available, reason = fastalign.available_backends(DEVICE).get(impl, (False, "no such backend"))
    if not available:
        not_run(case, impl, reason)
    if impl == "triton" and DEVICE != "cuda":
        not_run(case, impl, "CPU runs Triton only under the interpreter; not a performance path")
    return fastalign.rrhf_loss_from_logits, (lambda: fastalign.use_backend(impl)), f"fastalign {impl}"


@pytest.mark.parametrize("case,impl", PARAMS)
def bench_rrhf_loss(measure, case, impl):
    logits, labels, rewards, expected = _inputs(case)
    loss_fn, ctx, label = _impl(impl, case)

    def step():
        with ctx():
            out = loss_fn(logits, labels, rewards, group_size=RESPONSES)
            (grad,) = torch.autograd.grad(out.loss, logits)
        harness.sync(DEVICE)
        return grad

    if impl == "compile":
        torch._dynamo.reset()
    with ctx():
        loss = loss_fn(logits, labels, rewards, group_size=RESPONSES).loss
    error = (loss.detach().float() - expected.float()).abs().item()
    del loss

    measure(step, case=case, impl=impl, label=label, extra={"max_err_loss": error})
