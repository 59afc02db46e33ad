"""Loads fastalign._C, the compiled C++ CPU kernels, and says why when it cannot."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=None)
def status() -> tuple[bool, str]:
    """(loaded, reason): loads the library once; `import fastalign` never fails for want of it."""
    if os.environ.get("FASTALIGN_DISABLE_NATIVE") == "1":
        return False, "disabled by FASTALIGN_DISABLE_NATIVE=1"
    try:
        spec = importlib.util.find_spec("fastalign._C")
    except (ImportError, ValueError) as exc:  # pragma: no cover - broken installs
        return False, f"fastalign._C cannot be located: {exc}"
    if spec is None or spec.origin is None:
        return False, (
            "fastalign._C is not built; install with `pip install --no-build-isolation .` "
            "(or `python setup.py build_ext --inplace` in a checkout)"
        )
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as exc:
        return False, f"fastalign._C failed to load from {spec.origin}: {exc}"
    return True, f"C++ kernels ({cpu_capability()}) from {os.path.basename(spec.origin)}"


def cpu_capability() -> str:
    return torch.ops.fastalign_cpu.cpu_capability()


def require() -> None:
    ok, why = status()
    if not ok:
        raise RuntimeError(f"fastalign backend 'native' is not available: {why}")


# The backend contract (fastalign/backend.py): one function per op, under the op's name.


def _forward_to_library(op: str):
    def call(*args):
        require()
        return getattr(torch.ops.fastalign_cpu, op)(*args)

    call.__name__ = call.__qualname__ = op
    call.__doc__ = f"`torch.ops.fastalign_cpu.{op}` (csrc/cpu/)"
    return call


def _forward_to_blocked(op: str):
    def call(*args):
        require()
        from . import linear_blocked

        return getattr(linear_blocked, op)(*args)

    call.__name__ = call.__qualname__ = op
    call.__doc__ = f"`fastalign.linear_blocked.{op}`: ATen matmuls in blocks of tokens and the C++ row kernels"
    return call


token_logprobs_forward = _forward_to_library("token_logprobs_forward")
token_logprobs_backward = _forward_to_library("token_logprobs_backward")
policy_token_forward = _forward_to_library("policy_token_forward")
token_divergence_forward = _forward_to_library("token_divergence_forward")
token_divergence_backward = _forward_to_library("token_divergence_backward")
gae_forward = _forward_to_library("gae_forward")
group_advantages_forward = _forward_to_library("group_advantages_forward")
linear_token_logprobs_forward = _forward_to_blocked("linear_token_logprobs_forward")
linear_token_logprobs_backward = _forward_to_blocked("linear_token_logprobs_backward")
linear_policy_token_forward = _forward_to_blocked("linear_policy_token_forward")


def discounted_returns(rewards, mask, gamma):
    require()
    # The C++ kernel reads the mask in the rewards' dtype.
    return torch.ops.fastalign_cpu.discounted_returns(rewards, mask.to(rewards.dtype), gamma)


def remax_advantages_forward(rewards, mask, baselines):
    require()
    return torch.ops.fastalign_cpu.remax_advantages_forward(rewards, mask.to(rewards.dtype), baselines)
