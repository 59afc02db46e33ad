"""The GPU a launch goes to, for the few launch options that differ between vendors.

NVIDIA runs 32-lane warps and takes ``maxnreg``; AMD runs 64-lane wavefronts (a ROCm build of
torch calls its devices ``cuda`` too, so HIP tensors reach these kernels) and refuses ``maxnreg``.
The row kernels size their programs in threads, not warps, so that a chunk maps onto the same
number of lanes on both: 16 warps of 32 on NVIDIA, 8 wavefronts of 64 on AMD.

``forced`` is set by the compile gate (tests/ops/triton_compile_gate.py) while it records launches
for a target it compiles for without having that GPU.
"""

from __future__ import annotations

import functools

forced = None  # a triton GPUTarget, while the compile gate records launches


@functools.lru_cache(maxsize=1)
def _active():
    try:
        from triton.runtime import driver

        return driver.active.get_current_target()
    except Exception:  # no GPU driver: the interpreter, which takes no vendor options
        return None


def current():
    """The GPUTarget launches compile for, or None under the interpreter."""
    return forced if forced is not None else _active()


def is_amd() -> bool:
    target = current()
    return target is not None and target.backend == "hip"


def warps(threads: int) -> int:
    """num_warps for a program of ``threads`` threads (warps of 32 lanes, wavefronts of 64)."""
    target = current()
    lanes = 32 if target is None else target.warp_size
    return max(1, threads // lanes)


def nvidia_arch() -> int | None:
    """The compute capability launches compile for (90 for sm_90), None off NVIDIA."""
    target = current()
    return target.arch if target is not None and target.backend == "cuda" else None


def nvidia_options(**options) -> dict:
    """Launch options only NVIDIA's compiler takes; none elsewhere."""
    target = current()
    return options if target is not None and target.backend == "cuda" else {}


def describe() -> str:
    """The target as `python -m fastalign info` prints it."""
    target = current()
    if target is None:
        return "none (no GPU driver; the interpreter when TRITON_INTERPRET=1)"
    return f"{target.backend} {target.arch} (warp size {target.warp_size})"
