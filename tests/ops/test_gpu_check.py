"""`make gpu-check`'s script runs end to end before any GPU is at hand: its dry run exercises every
step (environment, every op against float64, the 2^31 comparison, kernel registers, timings, the
test-suite call and the report) on CPU under the Triton interpreter with tiny shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, TRITON_INTERPRET="1", FASTALIGN_DISABLE_NATIVE="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    return proc, out


def test_dry_run_passes_every_check(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    report = json.loads((out / "dry-run.json").read_text())
    sections = {c["section"] for c in report["checks"]}
    for section in ("token_logprobs", "grpo_loss", "linear_token_logprobs", "gae", "group_advantages",
                    "reinforce_plus_plus_advantages", "remax_advantages", "2^31", "kernels", "tests"):
        assert section in sections, sections
    assert all(c["ok"] for c in report["checks"])
    # Gradients were compared too, not only forward values.
    assert any("grad" in c["name"] for c in report["checks"] if c["section"] == "token_logprobs")
    assert {t["impl"] for t in report["timings"]} >= {"fastalign triton", "eager PyTorch", "torch copy_"}
    assert "passed" in report["tests"]["summary"]


def test_dry_run_writes_the_markdown_report(dry_run):
    _, out = dry_run
    text = (out / "dry-run.md").read_text()
    for heading in ("## Environment", "## Checks against float64", "## Compiled kernels", "## Anchor workloads",
                    "## Test suite on the device"):
        assert heading in text


def test_a_failed_comparison_fails_the_run(tmp_path):
    """The comparison the checks rest on rejects a wrong value (the run cannot pass vacuously)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import torch

        import gpu_check

        report = gpu_check.Report(tmp_path / "r.md", tmp_path / "r.json")
        truth = torch.linspace(-3, 3, 50, dtype=torch.float64)
        good = truth.float()
        assert gpu_check._compare(report, "s", "good", good, good, truth)
        assert not gpu_check._compare(report, "s", "bad", good + 1e-3, good, truth)
        assert [c.ok for c in report.checks] == [True, False]
    finally:
        sys.path.remove(str(SCRIPT.parent))
