"""Distillation from hidden states + both lm_heads, fwd+bwd, with memory: the mean generalized JSD
(beta 0.5) over the tokens, gradients to the student's hidden states and lm_head weight; a teacher
twice as wide as the student, one vocabulary.

  eager      unfused: both models' logits = hidden @ weight.T, then fastalign.reference.token_divergence
             (plain PyTorch, the trainers' own math as GKD's generalized_jsd_loss writes it)
  trl        TRL 1.16 `trl.kernels.chunked_divergence.ChunkedDivergenceFunction` (what DistillationTrainer
             calls; its torch path on CPU)
  liger      Liger-Kernel `LigerFusedLinearJSDLoss` (weight_hard_loss 0, weight_soft_loss 1, compiled=False)
  native     fastalign.distillation_loss(student_hidden=, ..., teacher_weight=): token blocks through ATen
             matmuls + the C++ divergence kernels
  triton     (CUDA) the same blocks through cuBLAS and the Triton kernels
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

import harness
from harness import DEVICE, not_run

BETA = 0.5


def _cases() -> list[dict]:
    if os.environ.get("FASTALIGN_BENCH_QUICK") == "1":
        shapes = [(512, 256, 512, 32000)]
    else:
        shapes = [(4096, 1024, 2048, 32000), (2048, 512, 1024, 151936)]
    return [{"op": "linear_distillation_jsd", "pass": "fwd+bwd", "shape": list(shape), "dtype": "float32",
             "group": f"linear_distillation_jsd fwd+bwd float32 {'x'.join(map(str, shape))}"} for shape in shapes]


IMPLS = ["eager", "trl", "liger", "native", "triton"]
CASES = _cases()
PARAMS = [pytest.param(case, impl, id=f"{case['op']}-{'x'.join(map(str, case['shape']))}-{impl}")
          for case in CASES for impl in IMPLS]

_INPUTS: dict = {}


def _inputs(case: dict):
    key = tuple(case["shape"])
    if key not in _INPUTS:
        _INPUTS.clear()
        gc.collect()
        n, hs, ht, vocab = case["shape"]
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        _INPUTS[key] = dict(
            student_hidden=torch.randn(n, hs, generator=gen, device=DEVICE).requires_grad_(True),
            student_weight=(torch.randn(vocab, hs, generator=gen, device=DEVICE) / hs**0.5).requires_grad_(True),
            teacher_hidden=torch.randn(n, ht, generator=gen, device=DEVICE),
            teacher_weight=torch.randn(vocab, ht, generator=gen, device=DEVICE) / ht**0.5,
            labels=torch.randint(0, vocab, (n,), generator=gen, device=DEVICE),
        )
    return _INPUTS[key]


_LIGER: dict = {}


def _loss(impl, x):
    hs, ws, ht, wt = x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"]
    if impl == "eager":
        import fastalign

        with fastalign.use_backend("reference"):
            return fastalign.token_divergence(hs @ ws.t(), ht @ wt.t(), beta=BETA).divergence.mean()
    if impl == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        divergence, _ = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, BETA)
        return divergence.mean()
    if impl == "liger":
        loss_fn = _LIGER.get("fn")
        if loss_fn is None:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            loss_fn = _LIGER["fn"] = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA,
                                                             compiled=False)
        return loss_fn(hs, ws, ht, wt, x["labels"])
    import fastalign

    with fastalign.use_backend(impl):
        return fastalign.distillation_loss(student_hidden=hs, student_weight=ws, teacher_hidden=ht, teacher_weight=wt,
                                           beta=BETA).loss


def _check_available(case, impl):
    if impl == "eager":
        return "unfused (eager)"
    if impl == "trl":
        try:
            import trl.kernels.chunked_divergence  # noqa: F401
        except ImportError as exc:
            not_run(case, impl, f"trl not importable: {exc}")
        return "TRL ChunkedDivergenceFunction"
    if impl == "liger":
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except ImportError as exc:
            not_run(case, impl, f"liger-kernel not importable: {exc}")
        return "Liger LigerFusedLinearJSDLoss"
    import fastalign

    available, reason = fastalign.available_backends(DEVICE).get(impl, (False, "no such backend"))
    if not available:
        not_run(case, impl, reason)
    if impl == "triton" and DEVICE != "cuda":
        not_run(case, impl, "CPU runs Triton only under the interpreter; not a performance path")
    return f"fastalign {impl}"


@pytest.mark.parametrize("case,impl", PARAMS)
def bench_distillation(measure, case, impl):
    label = _check_available(case, impl)
    x = _inputs(case)
    wrt = (x["student_hidden"], x["student_weight"])

    def step():
        grads = torch.autograd.grad(_loss(impl, x), wrt)
        harness.sync(DEVICE)
        return grads

    with torch.no_grad():
        value = _loss(impl, x).detach().float()
        expected = _loss("native", x).detach().float()
    measure(step, case=case, impl=impl, label=label, extra={"max_err_loss": (value - expected).abs().item()})
