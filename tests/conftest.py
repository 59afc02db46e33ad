"""Test set-up: the device and the backends under test, for every group under tests/.

Without an NVIDIA GPU the Triton kernels run on CPU tensors under Triton's interpreter, which has
to be switched on before triton is first imported, hence before torch is.

tests/support/ goes on sys.path here, so that a test in any group imports its helpers as top-level
modules (`from numerics import ...`, `import tiny_trl`); this file itself is `conftest`
(`from conftest import DEVICE, backend_params`).
"""

import os
import shutil
import sys
from pathlib import Path

SUPPORT = str(Path(__file__).resolve().parent / "support")
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)


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


try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
else:
    # The same examples on every run (CI and local alike): a property test that fails once fails
    # every time, and the suite's run time is fixed. HYPOTHESIS_PROFILE=explore searches anew.
    settings.register_profile(
        "fixed", derandomize=True, deadline=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile("explore", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))
