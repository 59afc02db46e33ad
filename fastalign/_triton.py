"""Finds the Triton kernels (`fastalign.kernels`) and whether they can run on a device."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _checkout_kernels() -> bool:
    """Serves the top-level kernels/ folder as ``fastalign.kernels`` when fastalign is imported
    from a source checkout rather than installed (an install maps that folder there itself), so
    the Triton backend also runs straight from a copy of the repository, as on a machine where
    nothing can be installed."""
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "__init__.py").is_file() or not (folder / "logprobs.py").is_file():
        return False
    spec = importlib.util.spec_from_file_location(
        "fastalign.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastalign.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules["fastalign.kernels"]
        raise
    return True


@functools.lru_cache(maxsize=None)
def _kernels_package() -> str:
    """Makes `fastalign.kernels` importable (installed, or the checkout's kernels/ folder); returns
    "" or ", kernels from the source checkout". Imports no kernel, so needs no Triton."""
    try:
        importlib.import_module("fastalign.kernels")
    except ModuleNotFoundError as exc:
        if exc.name != "fastalign.kernels" or not _checkout_kernels():
            raise
        return ", kernels from the source checkout"
    return ""


def contract():
    """`fastalign.kernels.contract`: the ids and parameter order fastalign passes to the kernels."""
    _kernels_package()
    return importlib.import_module("fastalign.kernels.contract")


@functools.lru_cache(maxsize=None)
def _import_status() -> tuple[bool, str]:
    try:
        import triton
    except ImportError as exc:
        return False, f"triton is not installed ({exc}); `pip install triton`"
    try:
        where = _kernels_package()
        importlib.import_module("fastalign.kernels.logprobs")
    except ImportError as exc:
        return False, f"fastalign.kernels failed to import: {exc}"
    return True, f"triton {triton.__version__}{where}"


def status(device: str) -> tuple[bool, str]:
    ok, why = _import_status()
    if not ok:
        return ok, why
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device is visible to torch"
        return True, why
    if device == "cpu":
        if interpreting():
            return True, f"{why}, interpreter (TRITON_INTERPRET=1): for testing, slow"
        return False, "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
    return False, f"the Triton kernels serve CUDA tensors, not {device}"


def kernels(module: str = "logprobs"):
    ok, why = _import_status()
    if not ok:
        raise RuntimeError(f"fastalign backend 'triton' is not available: {why}")
    return importlib.import_module(f"fastalign.kernels.{module}")


# The backend contract (fastalign/backend.py): one function per op, under the op's name, each
# forwarding to the kernels module that holds it (imported on first call, so that importing
# fastalign never imports triton).


def _forward_to(module: str, op: str):
    def call(*args, **kwargs):
        return getattr(kernels(module), op)(*args, **kwargs)

    call.__name__ = call.__qualname__ = op
    call.__doc__ = f"`fastalign.kernels.{module}.{op}`"
    return call


token_logprobs_forward = _forward_to("logprobs", "token_logprobs_forward")
token_logprobs_backward = _forward_to("logprobs", "token_logprobs_backward")
policy_token_forward = _forward_to("policy", "policy_token_forward")
token_divergence_forward = _forward_to("divergence", "token_divergence_forward")
token_divergence_backward = _forward_to("divergence", "token_divergence_backward")
gae_forward = _forward_to("gae", "gae_forward")
group_advantages_forward = _forward_to("advantages", "group_advantages_forward")
discounted_returns = _forward_to("advantages", "discounted_returns")
remax_advantages_forward = _forward_to("advantages", "remax_advantages_forward")

# Logits per block of the blocked passes from hidden states: 128M values (256 MiB in bf16; 1024
# tokens at V = 131072), at least 256 tokens. Each block adds its weight-gradient product into
# the fp32 [V, H] accumulator, a read and a write of V * H * 8 bytes (4 GiB at V = 131072,
# H = 4096: about 1 ms on an H200), so blocks of a few hundred tokens would spend more time
# there than in the product itself (0.27 TFLOP per 256 tokens: about 0.4 ms).
POLICY_BLOCK_ELEMENTS = 128 * 1024 * 1024
POLICY_MIN_BLOCK_ROWS = 256

# How the Triton backend computes linear_token_logprobs: "blocked" (default: blocks of tokens
# through cuBLAS GEMMs and the Triton row kernels, the forward one GEMM, the backward three) or
# "fused" (kernels/linear_logprobs.py: the matmul inside the Triton kernels, no [rows, V] block
# at all, but on an H200 2.6x slower than an unfused cuBLAS forward and 14x slower in forward +
# backward, measured in bench/results/cuda-nvidia-h200.md).
LINEAR_LOGPROBS_PASS = os.environ.get("FASTALIGN_LINEAR_LOGPROBS", "blocked")


def _linear_logprobs_blocked() -> bool:
    if LINEAR_LOGPROBS_PASS not in ("blocked", "fused"):
        raise ValueError(
            f"FASTALIGN_LINEAR_LOGPROBS: expected 'blocked' or 'fused', got {LINEAR_LOGPROBS_PASS!r}"
        )
    return LINEAR_LOGPROBS_PASS == "blocked"


def _rows_per_block(weight) -> int:
    return max(POLICY_MIN_BLOCK_ROWS, POLICY_BLOCK_ELEMENTS // max(weight.shape[0], 1))


def linear_token_logprobs_forward(
    hidden, weight, bias, labels, temperature, logit_scale, softcap, ignore_index,
    with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1,
):
    """Blocks of tokens through cuBLAS and the Triton row kernel (``fastalign.linear_blocked``), or
    with FASTALIGN_LINEAR_LOGPROBS=fused ``fastalign.kernels.linear_logprobs``'s fused kernel."""
    linear = kernels("linear_logprobs")
    args = (hidden, weight, bias, labels, temperature, logit_scale, softcap, ignore_index,
            with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1)
    if not _linear_logprobs_blocked():
        return linear.linear_token_logprobs_forward(*args)
    from .linear_blocked import linear_token_logprobs_forward as blocked

    linear.check_linear_inputs(hidden, weight, bias, labels)
    return blocked(*args, row_forward=kernels("logprobs").token_logprobs_forward,
                   rows_per_block=_rows_per_block(weight))


def linear_token_logprobs_backward(
    grad_logps, grad_entropy, hidden, weight, bias, labels, norm, entropy, temperature, logit_scale, softcap,
    ignore_index, need_hidden=True, need_weight=True,
):
    """Blocks of whole rows: the logits again, the Triton row gradient, two GEMMs
    (``fastalign.linear_blocked``); or the fused kernels with FASTALIGN_LINEAR_LOGPROBS=fused."""
    linear = kernels("linear_logprobs")
    args = (grad_logps, grad_entropy, hidden, weight, bias, labels, norm, entropy, temperature, logit_scale,
            softcap, ignore_index, need_hidden, need_weight)
    if not _linear_logprobs_blocked():
        return linear.linear_token_logprobs_backward(*args)
    from .linear_blocked import linear_token_logprobs_backward_by_rows as blocked

    linear.check_linear_inputs(hidden, weight, bias, labels)
    return blocked(*args, row_backward=kernels("logprobs").token_logprobs_backward,
                   rows_per_block=_rows_per_block(weight))


def linear_policy_token_forward(
    hidden, weight, bias, labels, old_logps, ref_logps, advantages, w_pg, w_kl, grad_entropy,
    temperature, logit_scale, softcap, ignore_index, surrogate_id, kl_id, params, with_grad,
    need_hidden=True, need_weight=True,
):
    """The "blocked" policy pass (``fastalign.policy.LINEAR_POLICY_PASS``) on the Triton backend:
    blocks of tokens through cuBLAS matmuls (``fastalign.linear_blocked``) and the Triton policy
    kernel, which writes each block's gradient over its logits."""
    from .linear_blocked import linear_policy_token_forward as blocked

    kernels("linear_logprobs").check_linear_inputs(hidden, weight, bias, labels)
    policy = kernels("policy")

    def policy_pass(logits, inputs, with_grad):
        logps, entropy, _, norm = policy.policy_token_forward(
            logits, *inputs, with_grad, grad_out=logits if with_grad else None
        )
        return logps, entropy, norm

    return blocked(
        hidden, weight, bias, labels, old_logps, ref_logps, advantages, w_pg, w_kl, grad_entropy,
        temperature, logit_scale, softcap, ignore_index, surrogate_id, kl_id, params, with_grad,
        need_hidden, need_weight, policy_pass=policy_pass, rows_per_block=_rows_per_block(weight),
    )
