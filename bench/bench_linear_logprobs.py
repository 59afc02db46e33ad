"""From hidden states + lm_head weight, fwd+bwd, with memory.

linear_token_logprobs (loss = sum(logps) + sum(entropy), gradients to hidden and weight; the
"frozen lm_head" rows, gradients to hidden alone, as PEFT / LoRA training asks):
  eager      unfused: logits = hidden @ weight.T, then fastalign.reference.token_logprobs in eager
  trl        TRL 1.16 `trl.kernels.ChunkedLogProbFunction` (what `add_fused_lm_head` calls; torch path
             on CPU, chunk size 32768 as TRL sets it)
  native     fastalign.linear_token_logprobs: token blocks through ATen matmuls + the C++ row kernels
linear_grpo_loss (TRL's default dapo objective, beta 0.04, from hidden states, [B, 1024] tokens):
  eager      unfused: logits = hidden @ weight.T, then the TRL-style eager objective of bench_grpo.py
  liger      Liger-Kernel `LigerFusedLinearGRPOLoss` (dapo, beta 0.04, use_bias_correction_kl=True as TRL;
             chunk_size 1, its default; compiled=False)
  native     fastalign.grpo_loss(hidden=, weight=), the "blocked" pass: token blocks, the policy pass
             writes the gradient in the forward, three matmul-equivalents
  native-tiled  the same loss through linear_token_logprobs' forward and backward (four
             matmul-equivalents, no [rows, V] buffer); fastalign.policy.LINEAR_POLICY_PASS keeps
             the faster of the two
  triton, triton-tiled  (CUDA) the same two on the Triton backend ("blocked": cuBLAS blocks + the
             Triton policy kernel); linear_token_logprobs' triton row is the tiled Triton kernels
"""

from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch

import harness
from harness import DEVICE, not_run

SEQ = 1024


def _cases() -> list[dict]:
    if os.environ.get("FASTALIGN_BENCH_QUICK") == "1":
        shapes = [(512, 256, 32000)]
    else:
        shapes = [(4096, 1024, 32000), (2048, 512, 151936)]
    cases = []
    for op in ("linear_token_logprobs", "linear_grpo_loss"):
        for shape in shapes:
            group = f"{op} fwd+bwd float32 {'x'.join(map(str, shape))}"
            cases.append({"op": op, "pass": "fwd+bwd", "shape": list(shape), "dtype": "float32", "group": group})
        # A frozen lm_head (PEFT / LoRA): only hidden needs a gradient.
        shape = shapes[0]
        cases.append({"op": op, "pass": "fwd+bwd, frozen lm_head", "shape": list(shape), "dtype": "float32",
                      "group": f"{op} fwd+bwd frozen lm_head float32 {'x'.join(map(str, shape))}", "frozen_head": True})
    return cases


IMPLS = {
    "linear_token_logprobs": ["eager", "trl", "native", "triton"],
    "linear_grpo_loss": ["eager", "liger", "native", "native-tiled", "triton", "triton-tiled"],
}
CASES = _cases()
PARAMS = [
    pytest.param(case, impl, id=f"{case['op']}{'-frozen' if case.get('frozen_head') else ''}-"
                                f"{'x'.join(map(str, case['shape']))}-{impl}")
    for case in CASES
    for impl in IMPLS[case["op"]]
]

_INPUTS: dict = {}


def _inputs(case: dict):
    key = tuple(case["shape"])
    if key not in _INPUTS:
        _INPUTS.clear()
        gc.collect()
        n, width, vocab = case["shape"]
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        hidden = torch.randn(n, width, generator=gen, device=DEVICE).requires_grad_(True)
        weight = (torch.randn(vocab, width, generator=gen, device=DEVICE) / width**0.5).requires_grad_(True)
        labels = torch.randint(0, vocab, (n,), generator=gen, device=DEVICE)
        rows = max(1, n // SEQ)
        length = n // rows
        mask = torch.ones(rows, length, device=DEVICE)
        with torch.no_grad():
            from fastalign import linear_token_logprobs

            logps = linear_token_logprobs(hidden, weight, labels).logps.view(rows, length)
        old = logps + 0.2 * torch.randn(rows, length, generator=gen, device=DEVICE)
        ref = logps + 0.2 * torch.randn(rows, length, generator=gen, device=DEVICE)
        advantages = torch.randn(rows, generator=gen, device=DEVICE)
        _INPUTS[key] = dict(hidden=hidden, weight=weight, labels=labels, mask=mask, old=old, ref=ref,
                            advantages=advantages, rows=rows, length=length)
    return _INPUTS[key]


def _logprobs_step(impl, x):
    hidden, weight, labels = x["hidden"], x["weight"], x["labels"]
    if impl == "eager":
        from fastalign import reference

        out = reference.token_logprobs(hidden @ weight.t(), labels, outputs=("entropy",))
        logps, entropy = out.logps, out.entropy
    elif impl == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        logps, entropy, *_ = ChunkedLogProbFunction.apply(
            hidden, weight, None, labels, 1.0, 32768, None, 1.0, ("entropy",)
        )
    else:
        import fastalign

        with fastalign.use_backend(_backend(impl)):
            out = fastalign.linear_token_logprobs(hidden, weight, labels, outputs=("entropy",))
        logps, entropy = out.logps, out.entropy
    return logps.sum() + entropy.sum()


_LIGER: dict = {}


def _grpo_step(impl, x):
    from bench_grpo import BETA, EPS_HIGH, EPS_LOW, trl_style_dapo

    hidden, weight, labels = x["hidden"], x["weight"], x["labels"]
    rows, length = x["rows"], x["length"]
    mask, adv, old, ref = x["mask"], x["advantages"], x["old"], x["ref"]
    if impl == "eager":
        logits = (hidden @ weight.t()).view(rows, length, -1)
        return trl_style_dapo(logits, labels.view(rows, length), mask, adv, old, ref, mask.sum())[0]
    if impl == "liger":
        loss_fn = _LIGER.get("fn")
        if loss_fn is None:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            loss_fn = _LIGER["fn"] = LigerFusedLinearGRPOLoss(
                beta=BETA, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type="dapo", temperature=0.9,
                use_bias_correction_kl=True, compiled=False,
            )
        out = loss_fn(hidden.view(rows, length, -1), weight, labels.view(rows, length), mask, adv,
                      ref_per_token_logps=ref, old_per_token_logps=old, num_items_in_batch=mask.sum())
        return out[0] if isinstance(out, tuple) else out
    import fastalign

    with fastalign.use_backend(_backend(impl)), _policy_pass(impl):
        return fastalign.grpo_loss(
            hidden=hidden.view(rows, length, -1), weight=weight, labels=labels.view(rows, length),
            completion_mask=mask, advantages=adv, old_logps=old, ref_logps=ref, num_items_in_batch=mask.sum(),
            loss_type="dapo", epsilon=EPS_LOW, epsilon_high=EPS_HIGH, beta=BETA, temperature=0.9,
        ).loss


def _backend(impl: str) -> str:
    return impl.split("-")[0]


@contextlib.contextmanager
def _policy_pass(impl: str):
    """*-tiled: the four-matmul way to a token-local objective (fastalign.policy.LINEAR_POLICY_PASS)."""
    import fastalign.policy

    saved = fastalign.policy.LINEAR_POLICY_PASS
    fastalign.policy.LINEAR_POLICY_PASS = "tiled" if impl.endswith("-tiled") else "blocked"
    try:
        yield
    finally:
        fastalign.policy.LINEAR_POLICY_PASS = saved


def _check_available(case, impl):
    if impl in ("eager",):
        return "unfused (eager)"
    if impl == "trl":
        try:
            import trl.kernels.chunked_logprob  # noqa: F401
        except ImportError as exc:
            not_run(case, impl, f"trl not importable: {exc}")
        return "TRL ChunkedLogProbFunction"
    if impl == "liger":
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except ImportError as exc:
            not_run(case, impl, f"liger-kernel not importable: {exc}")
        return "Liger LigerFusedLinearGRPOLoss"
    import fastalign

    available, reason = fastalign.available_backends(DEVICE).get(_backend(impl), (False, "no such backend"))
    if not available:
        not_run(case, impl, reason)
    if impl.startswith("triton") and DEVICE != "cuda":
        not_run(case, impl, "CPU runs Triton only under the interpreter; not a performance path")
    return f"fastalign {impl}"


@pytest.mark.parametrize("case,impl", PARAMS)
def bench_linear(measure, case, impl):
    label = _check_available(case, impl)
    x = _inputs(case)
    wrt = (x["hidden"], x["weight"])
    if case.get("frozen_head"):
        x = dict(x, weight=x["weight"].detach())
        wrt = (x["hidden"],)
    loss_of = _logprobs_step if case["op"] == "linear_token_logprobs" else _grpo_step

    def step():
        loss = loss_of(impl, x)
        grads = torch.autograd.grad(loss, wrt)
        harness.sync(DEVICE)
        return grads

    with torch.no_grad():
        value = loss_of(impl, x).detach().float()
        expected = loss_of("eager", x).detach().float()
    measure(step, case=case, impl=impl, label=label, extra={"max_err_loss": (value - expected).abs().item()})
