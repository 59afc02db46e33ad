"""Which implementation serves an op: the override a user sets, and what each device can run.

`FASTALIGN_BACKEND` (environment) or `use_backend(...)` (context manager, which wins) forces one
backend for every op; "auto" picks the fastest live one for the tensor's device. Forcing a backend
is the one-line answer to "is it the kernel?" when a loss curve looks wrong.
"""

from __future__ import annotations

import contextlib
import functools
import contextvars
import os
from collections.abc import Iterator

BACKENDS = ("auto", "reference", "native", "triton")
ENV_VAR = "FASTALIGN_BACKEND"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastalign_backend", default=None)


def _checked(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name.lower()


def current_backend() -> str:
    """The backend forced by `use_backend` or FASTALIGN_BACKEND, else "auto"."""
    forced = _override.get()
    if forced is not None:
        return forced
    env = os.environ.get(ENV_VAR)
    return _checked(env, ENV_VAR) if env else "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run fastalign ops inside the block on `name`: "auto", "reference", "native" or "triton"."""
    token = _override.set(_checked(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def available_backends(device: str = "cpu") -> dict[str, tuple[bool, str]]:
    """For a device type ("cpu", "cuda", ...): backend name -> (live, why or why not)."""
    from . import _native, _triton

    device = str(device).split(":")[0]
    native_ok, native_why = _native.status()
    triton_ok, triton_why = _triton.status(device)
    if device != "cpu":
        native_ok, native_why = False, f"the C++ kernels serve CPU tensors, not {device}"
    return {
        "reference": (True, "pure PyTorch, any device"),
        "native": (native_ok, native_why),
        "triton": (triton_ok, triton_why),
    }


# --- the backend contract -----------------------------------------------------------------------
#
# Every op body calls `resolve(op, ...)` and then the function of that name on the backend it
# names. Each backend provides every op below under the op's own name:
#   reference: `fastalign.reference.<module>` (pure PyTorch, any device, the ground truth);
#   native:    `fastalign._native` (the C++ kernels of fastalign._C, CPU tensors);
#   triton:    `fastalign._triton` (forwards to `fastalign.kernels.<module>`, CUDA tensors, or CPU
#              tensors under TRITON_INTERPRET=1).
# tests/ops/test_backend.py checks that each backend exposes each op.

_FLOATS = ("float32", "bfloat16", "float16")

# op -> (the reference module that holds it, the dtypes the Triton kernels take)
OPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "token_logprobs_forward": ("logprobs", _FLOATS),
    "token_logprobs_backward": ("logprobs", _FLOATS),
    "policy_token_forward": ("policy", _FLOATS),
    "linear_token_logprobs_forward": ("linear_logprobs", _FLOATS),
    "linear_token_logprobs_backward": ("linear_logprobs", _FLOATS),
    "linear_policy_token_forward": ("linear_logprobs", _FLOATS),
    "token_divergence_forward": ("divergence", _FLOATS),
    "token_divergence_backward": ("divergence", _FLOATS),
    "gae_forward": ("gae", _FLOATS),
    "group_advantages_forward": ("advantages", ("float32",)),
    "discounted_returns": ("advantages", ("float32",)),
    "remax_advantages_forward": ("advantages", ("float32",)),
}


@functools.lru_cache(maxsize=None)
def triton_dtypes(op: str) -> tuple:
    """The torch dtypes the Triton kernels of `op` take (looked up once: resolve runs on every call)."""
    import torch

    return tuple(getattr(torch, name) for name in OPS[op][1])


def backend_module(backend: str, op: str):
    """The module whose attribute `op` serves `op` on `backend` ("reference", "native", "triton")."""
    import importlib

    if op not in OPS:
        raise KeyError(f"unknown fastalign op {op!r}; expected one of {', '.join(OPS)}")
    if backend == "reference":
        return importlib.import_module(f"fastalign.reference.{OPS[op][0]}")
    if backend in ("native", "triton"):
        return importlib.import_module(f"fastalign._{backend}")
    raise ValueError(f"backend: expected 'reference', 'native' or 'triton', got {backend!r}")


def resolve(op: str, backend: str | None = None, **tensors) -> tuple[str, object]:
    """(backend name, function) that serves `op` for these tensors, named as the caller's arguments
    (`resolve("gae_forward", rewards=r, values=v)`), so an error names the argument at fault.

    `backend` is "auto" (the fastest live one for the device and dtypes: C++ on CPU, Triton on
    CUDA, the reference otherwise), a forced name, or None for the one in force (`current_backend`).
    A forced backend that cannot serve these tensors raises; "auto" never does.
    """
    from . import _native, _triton

    backend = current_backend() if backend is None else _checked(backend, "backend")
    first = next(iter(tensors.values()))
    device = first.device.type
    takes = triton_dtypes(op)
    dtypes_ok = all(t.dtype in takes for t in tensors.values())
    if backend == "auto":
        if device == "cpu" and _native.status()[0]:
            backend = "native"
        elif device == "cuda" and dtypes_ok and _triton.status("cuda")[0]:
            backend = "triton"
        else:
            backend = "reference"
    elif backend == "native":
        if device != "cpu":
            raise RuntimeError(
                f"fastalign backend 'native' serves CPU tensors; the {', '.join(tensors)} are on {first.device}"
            )
        _native.require()
    elif backend == "triton":
        ok, why = _triton.status(device)
        if not ok:
            raise RuntimeError(f"fastalign backend 'triton' cannot run on {first.device}: {why}")
        if not dtypes_ok:
            got = " and ".join(str(t.dtype) for t in tensors.values())
            names = OPS[op][1]
            names = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
            raise TypeError(f"{'/'.join(tensors)}: the triton backend takes {names}, got {got}")
    return backend, getattr(backend_module(backend, op), op)
