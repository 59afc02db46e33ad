"""token_logprobs: per-token log-probs + entropy from logits, against the usual ways to get them.

Rows per case (op, pass, shape, dtype):
  eager          fastalign.reference.token_logprobs in eager PyTorch: the ratio baseline
  compile        torch.compile of that same reference (compiled before timing starts)
  plain          the bare three lines (log_softmax, gather, -(p * log p).sum) without the
                 reference's ignore_index / -inf / NaN handling, eager
  plain-compile  torch.compile of those three lines
  trl            TRL's selective_log_softmax_and_entropy: torch path on CPU, Triton kernel on CUDA
  native         fastalign's C++ backend
  triton         fastalign's Triton backend (CUDA only; on CPU it exists only under the
                 interpreter, which is a correctness tool, not a performance path)
The plain rows are there because the reference's edge-case handling costs time of its own (up to
about 2x the bare math in eager on CPU): a ratio against the reference alone would flatter the
kernels.
Liger-Kernel has no selective log-softmax / entropy op to compare with, so it has no row here.

"fwd+bwd" is what a policy-gradient step costs: loss = logps.sum() + entropy.sum(), gradient to the
logits. "fwd" is the no-grad pass a trainer makes for reference-model or old-policy log-probs.
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

OP = "token_logprobs"
VOCAB_SMALL = 32000  # Llama-2 / Mistral
VOCAB_LARGE = 151936  # Qwen2 / Qwen3


def _cases() -> list[dict]:
    if os.environ.get("FASTALIGN_BENCH_QUICK") == "1":
        sizes = [((256, VOCAB_SMALL), "float32"), ((256, VOCAB_SMALL), "bfloat16")]
    else:
        sizes = [((2048, VOCAB_SMALL), "float32"), ((2048, VOCAB_SMALL), "bfloat16")]
        if DEVICE == "cuda":
            sizes += [((8192, VOCAB_LARGE), "bfloat16"), ((4096, VOCAB_LARGE), "float32")]
    cases = []
    for shape, dtype in sizes:
        # fwd+bwd and fwd of one shape sit next to each other so they share the input tensors.
        for pass_ in ("fwd+bwd", "fwd"):
            if pass_ == "fwd" and dtype == "float32" and shape[1] == VOCAB_LARGE:
                continue  # the bf16 row of that shape already shows the forward pass
            group = f"{OP} {pass_} {dtype} {'x'.join(map(str, shape))}"
            cases.append({"op": OP, "pass": pass_, "shape": list(shape), "dtype": dtype, "group": group})
    return cases


IMPLS = ["eager", "compile", "plain", "plain-compile", "trl", "native", "triton"]
CASES = _cases()
PARAMS = [
    pytest.param(case, impl, id=f"{case['pass']}-{case['dtype']}-{'x'.join(map(str, case['shape']))}-{impl}")
    for case in CASES
    for impl in IMPLS
]

# --- inputs: built once per (shape, dtype) and dropped when the next case needs its memory -------

_INPUTS: dict = {}


def _inputs(case: dict):
    key = (tuple(case["shape"]), case["dtype"])
    if key not in _INPUTS:
        _INPUTS.clear()
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        n, v = case["shape"]
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        # Spread like a trained LM head's output rather than unit-variance noise.
        logits = torch.randn(n, v, generator=gen, device=DEVICE) * 4
        logits = logits.to(getattr(torch, case["dtype"])).requires_grad_(True)
        labels = torch.randint(0, v, (n,), generator=gen, device=DEVICE)
        with torch.no_grad():
            expected = _eager(logits, labels)
        _INPUTS[key] = (logits, labels, expected)
    return _INPUTS[key]


# --- implementations: each returns (logps, entropy) and a context to run the whole step in ------


def _eager(logits, labels):
    from fastalign import reference

    out = reference.token_logprobs(logits, labels, outputs=("entropy",))
    return out.logps, out.entropy


def _plain(logits, labels):
    log_p = torch.log_softmax(logits.float(), dim=-1)
    logps = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logps, entropy


def _fastalign_backend(name: str):
    import fastalign

    def fn(logits, labels):
        out = fastalign.token_logprobs(logits, labels, outputs=("entropy",))
        return out.logps, out.entropy

    # The backward pass runs inside the same override, so a backend that is chosen at backward
    # time cannot silently fall back to another one.
    return fn, lambda: fastalign.use_backend(name)


def _impl(impl: str, case: dict):
    """(forward, context factory, label), or a call to not_run() that skips the benchmark."""
    nullctx = contextlib.nullcontext
    if impl == "eager":
        return _eager, nullctx, "reference (eager)"
    if impl == "compile":
        # Static shapes: with automatic dynamic shapes a later case would get a generic kernel.
        return torch.compile(_eager, dynamic=False), nullctx, "reference (torch.compile)"
    if impl == "plain":
        return _plain, nullctx, "plain torch (eager)"
    if impl == "plain-compile":
        return torch.compile(_plain, dynamic=False), nullctx, "plain torch (torch.compile)"
    if impl == "trl":
        try:
            if DEVICE == "cuda":
                from trl.kernels import selective_log_softmax_and_entropy as fn

                return fn, nullctx, "trl (triton)"
            from trl.trainer.utils import selective_log_softmax_and_entropy as fn
        except Exception as exc:  # noqa: BLE001  TRL missing or broken: the row just goes away
            not_run(case, impl, f"TRL not importable ({type(exc).__name__}: {exc})")
        return fn, nullctx, "trl (torch)"
    import fastalign

    available, reason = fastalign.available_backends(DEVICE).get(impl, (False, "no such backend"))
    if not available:
        not_run(case, impl, reason)
    if impl == "triton" and DEVICE != "cuda":
        not_run(case, impl, "CPU runs Triton only under the interpreter; not a performance path")
    fn, ctx = _fastalign_backend(impl)
    return fn, ctx, f"fastalign {impl}"


def _max_err(got, want) -> float:
    got = got.detach().float()
    want = want.detach().float()
    diff = (got - want).abs()
    # -inf - -inf is NaN but means the two agree.
    diff = torch.where(got == want, torch.zeros_like(diff), diff)
    return diff.max().item()


@pytest.mark.parametrize("case,impl", PARAMS)
def bench_token_logprobs(measure, case, impl):
    logits, labels, expected = _inputs(case)
    forward, ctx, label = _impl(impl, case)
    backward = case["pass"] == "fwd+bwd"

    def step():
        with ctx():
            if backward:
                logps, entropy = forward(logits, labels)
                (out,) = torch.autograd.grad(logps.sum() + entropy.sum(), logits)
            else:
                with torch.no_grad():
                    out, _ = forward(logits, labels)
        harness.sync(DEVICE)
        return out

    if impl.endswith("compile"):
        # Drop graphs compiled for earlier cases: they only count against the recompile limit.
        torch._dynamo.reset()
    # Sanity numbers for the report (a kernel that is fast because it is wrong gets flagged).
    # Same grad mode as the timed step, so a compiled function compiles the graph it will run.
    with ctx(), torch.set_grad_enabled(backward):
        logps, entropy = forward(logits, labels)
    errors = {"max_err_logps": _max_err(logps, expected[0]), "max_err_entropy": _max_err(entropy, expected[1])}
    del logps, entropy

    measure(step, case=case, impl=impl, label=label, extra=errors)
