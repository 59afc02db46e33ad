"""`pip install .` without --no-build-isolation runs setup.py where torch is missing: it must
stop with the one-line fix, not a traceback."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

# What an isolated build environment looks like to setup.py: setuptools importable, torch not.
HIDE_TORCH_AND_RUN_SETUP = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
sys.argv = ["setup.py", "egg_info", "--egg-base", sys.argv[1]]
runpy.run_path("setup.py", run_name="__main__")
"""


def test_setup_without_torch_names_the_fix(tmp_path):
    proc = subprocess.run([sys.executable, "-c", HIDE_TORCH_AND_RUN_SETUP, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "install torch first" in lines[0] and "pip install --no-build-isolation ." in lines[0], lines[0]


def test_setup_with_torch_gets_past_the_check(tmp_path):
    # The same command with torch visible reaches setuptools: the check only fires without torch.
    code = HIDE_TORCH_AND_RUN_SETUP.replace("sys.meta_path.insert(0, NoTorch())\n", "")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "install torch first" not in proc.stderr
    assert list(tmp_path.glob("*.egg-info/PKG-INFO"))
