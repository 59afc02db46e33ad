"""Finds the Triton kernels (`fastalign.kernels`) and whether they can run on a device."""

from __future__ import annotations

import functools
import importlib
import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _import_status() -> tuple[bool, str]:
    try:
        import triton
    except ImportError as exc:
        return False, f"triton is not installed ({exc}); `pip install triton`"
    try:
        importlib.import_module("fastalign.kernels.logprobs")
    except ImportError as exc:
        return False, f"fastalign.kernels failed to import: {exc}"
    return True, f"triton {triton.__version__}"


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
