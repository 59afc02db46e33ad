"""Packaging: the install layout, `python -m fastalign info`, and import without _C or Triton."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import fastalign

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_python(code: str, env_extra: dict[str, str] | None = None, pythonpath: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "FASTALIGN_BACKEND"}
    env.update(env_extra or {})
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    # cwd: `python -c` puts the working directory first on sys.path, and a checkout holds fastalign/.
    cwd = pythonpath or "/"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def test_kernels_installed_as_a_subpackage():
    spec = importlib.util.find_spec("fastalign.kernels")
    assert spec is not None and spec.origin is not None
    assert pathlib.Path(spec.origin).parent.name == "kernels"


def test_native_extension_is_built():
    ok, why = fastalign.available_backends("cpu")["native"]
    assert ok, why


def test_info_lists_every_backend():
    proc = subprocess.run([sys.executable, "-m", "fastalign", "info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for word in ("torch", "triton", "reference", "native", "backends for cpu tensors"):
        assert word in proc.stdout, (word, proc.stdout)


def test_info_is_the_default_command():
    bare = subprocess.run([sys.executable, "-m", "fastalign"], capture_output=True, text=True, timeout=300)
    assert bare.returncode == 0, bare.stderr
    assert "backends for cpu tensors" in bare.stdout, bare.stdout
    wrong = subprocess.run([sys.executable, "-m", "fastalign", "bogus"], capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr, wrong.stderr


@pytest.fixture
def package_without_extension(tmp_path):
    """A copy of the Python sources laid out as installed (kernels/ as fastalign.kernels, whose
    contract.py fastalign reads at import) with no compiled fastalign._C."""
    skip = shutil.ignore_patterns("*.so", "__pycache__")
    shutil.copytree(ROOT / "fastalign", tmp_path / "fastalign", ignore=skip)
    shutil.copytree(ROOT / "kernels", tmp_path / "fastalign" / "kernels", ignore=skip)
    return str(tmp_path)


def test_import_and_compute_without_the_extension(package_without_extension):
    code = (
        "import sys\n"
        "# the checkout's editable-install finder would still supply fastalign._C from the checkout\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import torch, fastalign\n"
        "assert fastalign.__file__.startswith(%r), fastalign.__file__\n"
        "ok, why = fastalign.available_backends('cpu')['native']\n"
        "assert not ok and 'not built' in why, why\n"
        "out = fastalign.token_logprobs(torch.randn(2, 5), torch.tensor([1, 4]))\n"
        "assert torch.isfinite(out.logps).all()\n"
        "from fastalign.info import report\n"
        "print(report())\n"
    ) % package_without_extension
    proc = run_python(code, pythonpath=package_without_extension)
    assert proc.returncode == 0, proc.stderr
    assert "native     off   fastalign._C is not built" in proc.stdout


def test_import_without_triton():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # as if triton were not installed\n"
        "import torch, fastalign\n"
        "ok, why = fastalign.available_backends('cuda')['triton']\n"
        "assert not ok and 'triton is not installed' in why, why\n"
        "with fastalign.use_backend('reference'):\n"
        "    fastalign.token_logprobs(torch.randn(2, 5), torch.tensor([1, 4]))\n"
        "from fastalign.info import report\n"
        "print(report())\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "triton not installed" in proc.stdout


def test_native_can_be_disabled_for_debugging():
    proc = run_python(
        "import fastalign; print(fastalign.available_backends('cpu')['native'])",
        env_extra={"FASTALIGN_DISABLE_NATIVE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "(False, 'disabled by FASTALIGN_DISABLE_NATIVE=1')" in proc.stdout


def test_regular_install_builds_the_extension(tmp_path):
    # `pip install --no-build-isolation .` (not editable): _C compiled, kernels/ as fastalign.kernels.
    target = tmp_path / "site"
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # ninja from the venv
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", str(ROOT),
         "--target", str(target)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list((target / "fastalign").glob("_C*.so")), "fastalign._C was not built"
    assert (target / "fastalign" / "kernels" / "logprobs.py").exists()
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import torch, fastalign, fastalign.kernels\n"
        f"assert fastalign.__file__.startswith({str(target)!r}), fastalign.__file__\n"
        "ok, why = fastalign.available_backends('cpu')['native']\n"
        "assert ok, why\n"
        "x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)\n"
        "with fastalign.use_backend('native'):\n"
        "    out = fastalign.token_logprobs(x, torch.tensor([0, 5, 39]), outputs=('entropy',))\n"
        "assert torch.autograd.gradcheck(lambda t: fastalign.token_logprobs(t, torch.tensor([0, 5, 39])).logps, (x,))\n"
    )
    proc = run_python(code, pythonpath=str(target))
    assert proc.returncode == 0, proc.stderr
