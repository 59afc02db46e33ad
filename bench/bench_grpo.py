"""grpo_loss: TRL's default GRPO objective (loss_type="dapo", epsilon_high=0.28, beta=0.04 with the
k3 KL and its bias correction, temperature 0.9) from the policy's completion logits, forward +
backward to the logits.

Rows per case (op, pass, shape, dtype):
  eager      the TRL-style path in eager PyTorch: logits / T, log_softmax + gather for the
             log-probs, the entropy TRL logs, then `GRPOTrainer._compute_loss`'s dapo math
  compile    torch.compile of that same function (compiled before timing starts)
  native     fastalign.grpo_loss on the C++ backend: one pass over the logits writes the gradient
  triton     fastalign.grpo_loss on the Triton backend (CUDA only)
Old and reference log-probs come precomputed, as in the trainer. TRL's own trainer and Liger's
fused GRPO loss start from hidden states (the fused linear level), so they have no row here.
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

OP = "grpo_loss"
VOCAB = 32000
TEMPERATURE = 0.9
BETA = 0.04
EPS_LOW, EPS_HIGH = 0.2, 0.28


def trl_style_dapo(logits, labels, mask, advantages, old_logps, ref_logps, num_items_in_batch):
    """GRPOTrainer._compute_loss for loss_type="dapo" (TRL 1.16), from logits, in eager PyTorch."""
    z = logits.float() / TEMPERATURE
    log_probs = z.log_softmax(-1)
    logps = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # logged, not optimized, without an entropy bonus
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
    adv = advantages.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
    per_token_loss = per_token_loss + BETA * kl * coef_1
    loss = (per_token_loss * mask).sum() / num_items_in_batch.clamp(min=1.0)
    return loss, (entropy * mask).sum() / mask.sum()


def _fastalign(logits, labels, mask, advantages, old_logps, ref_logps, num_items_in_batch):
    import fastalign

    out = fastalign.grpo_loss(
        logits, labels, completion_mask=mask, advantages=advantages, old_logps=old_logps, ref_logps=ref_logps,
        num_items_in_batch=num_items_in_batch, loss_type="dapo", epsilon=EPS_LOW, epsilon_high=EPS_HIGH,
        beta=BETA, temperature=TEMPERATURE,
    )
    return out.loss, out.metrics["entropy"]


def _cases() -> list[dict]:
    if os.environ.get("FASTALIGN_BENCH_QUICK") == "1":
        shapes = [(4, 256, VOCAB)]
    else:
        shapes = [(16, 1024, VOCAB)]
    cases = []
    for shape in shapes:
        for dtype in ("bfloat16",):
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
        logits = (torch.randn(rows, length, vocab, generator=gen, device=DEVICE) * 4)
        logits = logits.to(getattr(torch, case["dtype"])).requires_grad_(True)
        labels = torch.randint(0, vocab, (rows, length), generator=gen, device=DEVICE)
        # Completions of different lengths, padding after them.
        ends = torch.randint(length // 2, length + 1, (rows,), generator=gen, device=DEVICE)
        mask = (torch.arange(length, device=DEVICE) < ends.unsqueeze(1)).float()
        with torch.no_grad():
            z = logits.float() / TEMPERATURE
            logps = (z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1))
            del z
        # Old and reference policies near the current one: ratios inside and outside the clip range.
        old = logps + 0.2 * torch.randn(rows, length, generator=gen, device=DEVICE)
        ref = logps + 0.2 * torch.randn(rows, length, generator=gen, device=DEVICE)
        advantages = torch.randn(rows, generator=gen, device=DEVICE)
        n_items = mask.sum()
        with torch.no_grad():
            expected = trl_style_dapo(logits, labels, mask, advantages, old, ref, n_items)[0]
        _INPUTS[key] = (logits, labels, mask, advantages, old, ref, n_items, expected)
    return _INPUTS[key]


def _impl(impl: str, case: dict):
    """(loss function, context factory, label), or a call to not_run() that skips the benchmark."""
    nullctx = contextlib.nullcontext
    if impl == "eager":
        return trl_style_dapo, nullctx, "TRL-style (eager)"
    if impl == "compile":
        return torch.compile(trl_style_dapo, dynamic=False), nullctx, "TRL-style (torch.compile)"
    import fastalign

    available, reason = fastalign.available_backends(DEVICE).get(impl, (False, "no such backend"))
    if not available:
        not_run(case, impl, reason)
    if impl == "triton" and DEVICE != "cuda":
        not_run(case, impl, "CPU runs Triton only under the interpreter; not a performance path")
    return _fastalign, (lambda: fastalign.use_backend(impl)), f"fastalign {impl}"


@pytest.mark.parametrize("case,impl", PARAMS)
def bench_grpo_loss(measure, case, impl):
    logits, labels, mask, advantages, old, ref, n_items, expected = _inputs(case)
    loss_fn, ctx, label = _impl(impl, case)

    def step():
        with ctx():
            loss, _ = loss_fn(logits, labels, mask, advantages, old, ref, n_items)
            (grad,) = torch.autograd.grad(loss, logits)
        harness.sync(DEVICE)
        return grad

    if impl == "compile":
        torch._dynamo.reset()
    with ctx():
        loss = loss_fn(logits, labels, mask, advantages, old, ref, n_items)[0]
    error = (loss.detach().float() - expected.float()).abs().item()
    del loss

    measure(step, case=case, impl=impl, label=label, extra={"max_err_loss": error})
