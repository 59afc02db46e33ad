"""Which implementation serves an op: the override a user sets, and what each device can run.

`FASTALIGN_BACKEND` (environment) or `use_backend(...)` (context manager, which wins) forces one
backend for every op; "auto" picks the fastest live one for the tensor's device. Forcing a backend
is the one-line answer to "is it the kernel?" when a loss curve looks wrong.
"""

from __future__ import annotations

import contextlib
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
