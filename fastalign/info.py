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
        f"cpu: {cpu_name()} ({torch.get_num_threads()} threads)",
    ]
    devices = ["cpu"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            lines.append(f"cuda:{index}: {torch.cuda.get_device_name(index)}")
        devices.append("cuda")
    else:
        lines.append("cuda: none visible")
    for device in devices:
        lines.append(f"backends for {device} tensors:")
        for name, (ok, why) in available_backends(device).items():
            lines.append(f"  {name:<10} {'live' if ok else 'off '}  {why}")
    return "\n".join(lines)
