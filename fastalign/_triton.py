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
def _import_status() -> tuple[bool, str]:
    try:
        import triton
    except ImportError as exc:
        return False, f"triton is not installed ({exc}); `pip install triton`"
    where = ""
    try:
        importlib.import_module("fastalign.kernels.logprobs")
    except ModuleNotFoundError as exc:
        if exc.name != "fastalign.kernels" or not _checkout_kernels():
            return False, f"fastalign.kernels failed to import: {exc}"
        try:
            importlib.import_module("fastalign.kernels.logprobs")
        except ImportError as exc2:
            return False, f"fastalign.kernels (the checkout's kernels/) failed to import: {exc2}"
        where = ", kernels from the source checkout"
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
