"""dpo_loss: the DPO sigmoid loss from the policy's logits (`fastalign.dpo_loss_from_logits`), forward +
backward to the logits.

Rows per case (op, pass, shape, dtype):
  eager      fastalign.reference.dpo.dpo_loss_from_logits: log_softmax over [2B, T, V], gather, masked sums,
             then the loss, the way TRL's DPOTrainer computes it from logits: the ratio baseline
  compile    torch.compile of that same reference (one graph, compiled before timing starts)
  native     fastalign.dpo_loss_from_logits on the C++ backend: one pass over the logits forward, one backward
  triton     fastalign.dpo_loss_from_logits on the Triton backend (CUDA only)
The reference log-probs come precomputed (TRL's precompute_ref_log_probs), so every row times the
policy's step alone. TRL's own trainer computes log-probs in a fused LM head from hidden states, not
from logits, so it has no row here; Liger-Kernel's DPO loss also starts from hidden states.
"""

from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch

import harness
from harness import DEVICE, not_run

# The README's main table and chart are these rows, so a plain `make bench` (the headline set) times them.
pytestmark = pytest.mark.headline

OP = "dpo_loss"
VOCAB = 32000  # Llama-2 / Mistral
PROMPT = 64  # leading positions outside the completion


def _cases() -> list[dict]:
    if os.environ.get("FASTALIGN_BENCH_QUICK") == "1":
        shapes = [(2 * 2, 128, VOCAB)]
    else:
        shapes = [(2 * 4, 512, VOCAB)]
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
        completion_mask = torch.ones(rows, length, dtype=torch.long, device=DEVICE)
        completion_mask[:, :PROMPT] = 0
        # Completions of different lengths, padding after them.
        ends = torch.randint(length // 2, length + 1, (rows,), generator=gen, device=DEVICE)
        completion_mask[torch.arange(length, device=DEVICE) >= ends.unsqueeze(1)] = 0
        from fastalign import reference
        from fastalign.reference import dpo as reference_dpo

        with torch.no_grad():
            # A reference model close to the policy: the log-ratios stay in the range training sees.
            policy = reference.token_logprobs(logits, labels, mask=completion_mask).logps.sum(-1)
            ref = policy + torch.randn(rows, generator=gen, device=DEVICE) * 5
            ref_chosen, ref_rejected = ref.chunk(2)
            expected = reference_dpo.dpo_loss_from_logits(
                logits, labels, completion_mask=completion_mask, ref_chosen_logps=ref_chosen,
                ref_rejected_logps=ref_rejected,
            ).loss
        _INPUTS[key] = (logits, labels, completion_mask, ref_chosen, ref_rejected, expected)
    return _INPUTS[key]


def _impl(impl: str, case: dict):
    """(loss function, context factory, label), or a call to not_run() that skips the benchmark."""
    from fastalign.reference import dpo as reference

    nullctx = contextlib.nullcontext
    if impl == "eager":
        return reference.dpo_loss_from_logits, nullctx, "reference (eager)"
    if impl == "compile":
        return torch.compile(reference.dpo_loss_from_logits, dynamic=False), nullctx, "reference (torch.compile)"
    import fastalign

    available, reason = fastalign.available_backends(DEVICE).get(impl, (False, "no such backend"))
    if not available:
        not_run(case, impl, reason)
    if impl == "triton" and DEVICE != "cuda":
        not_run(case, impl, "CPU runs Triton only under the interpreter; not a performance path")
    return fastalign.dpo_loss_from_logits, (lambda: fastalign.use_backend(impl)), f"fastalign {impl}"


@pytest.mark.parametrize("case,impl", PARAMS)
def bench_dpo_loss(measure, case, impl):
    logits, labels, completion_mask, ref_chosen, ref_rejected, expected = _inputs(case)
    loss_fn, ctx, label = _impl(impl, case)

    def step():
        with ctx():
            out = loss_fn(logits, labels, completion_mask=completion_mask, ref_chosen_logps=ref_chosen,
                          ref_rejected_logps=ref_rejected)
            (grad,) = torch.autograd.grad(out.loss, logits)
        harness.sync(DEVICE)
        return grad

    if impl == "compile":
        torch._dynamo.reset()
    with ctx():
        loss = loss_fn(logits, labels, completion_mask=completion_mask, ref_chosen_logps=ref_chosen,
                       ref_rejected_logps=ref_rejected).loss
    error = (loss.detach().float() - expected.float()).abs().item()
    del loss

    measure(step, case=case, impl=impl, label=label, extra={"max_err_loss": error})
