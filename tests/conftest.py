"""Test set-up: the device and the backends under test.

Without an NVIDIA GPU the Triton kernels run on CPU tensors under Triton's interpreter, which has
to be switched on before triton is first imported, hence before torch is.
"""

import os
import shutil


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


if "TRITON_INTERPRET" not in os.environ and not _has_nvidia_gpu():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import fastalign  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def live_backends(device: str = DEVICE) -> list[str]:
    table = fastalign.available_backends(device)
    return [name for name, (ok, _) in table.items() if ok]


def backend_params(device: str = DEVICE):
    """Every backend, the dead ones as skips that say why."""
    table = fastalign.available_backends(device)
    return [
        pytest.param(name, marks=() if ok else pytest.mark.skip(reason=f"{name} not live on {device}: {why}"))
        for name, (ok, why) in table.items()
    ]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
