"""`python -m fastalign info`: versions, devices, and which backends are live and why not."""

from __future__ import annotations

import platform

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _torch_build() -> str:
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip} (AMD GPUs appear as cuda devices)"
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda}"
    return "CPU only"


def _triton_target() -> str:
    """The GPU the Triton kernels compile for (NVIDIA sm_XX, or AMD gfx* under a ROCm build of
    torch, whose devices are also called cuda)."""
    from . import _triton

    ok, why = _triton.status("cuda")
    if not ok:
        return f"none ({why})"
    from .kernels import target

    return target.describe()


def report() -> str:
    from . import __version__, _triton
    from .backend import available_backends, current_backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"fastalign {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}",
        f"TRITON_INTERPRET={'1' if _triton.interpreting() else 'unset'}; backend override: {current_backend()}",
        f"torch build: {_torch_build()}",
        f"cpu: {cpu_name()} ({torch.get_num_threads()} threads)",
    ]
    devices = ["cpu"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            lines.append(f"cuda:{index}: {torch.cuda.get_device_name(index)}")
        devices.append("cuda")
        lines.append(f"triton target: {_triton_target()}")
    else:
        lines.append("cuda: none visible")
    for device in devices:
        lines.append(f"backends for {device} tensors:")
        for name, (ok, why) in available_backends(device).items():
            lines.append(f"  {name:<10} {'live' if ok else 'off '}  {why}")
    return "\n".join(lines)
