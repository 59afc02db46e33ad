"""The scripts in examples/ run as a user would run them (a fresh interpreter, a couple of steps)
and print what their docstrings promise: one finite line per step, from fastalign."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STEPS = 2


# Runs a script with some top-level packages made unimportable, as on a machine without them.
RUN_WITHOUT = """
import runpy, sys
hidden = set(sys.argv[1].split(","))
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_example(name: str, without: tuple[str, ...] = ()) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    script = [str(EXAMPLES / name), "--steps", str(STEPS)]
    command = [sys.executable, "-c", RUN_WITHOUT, ",".join(without), *script] if without else [sys.executable, *script]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def step_lines(output: str, prefix: str) -> list[dict[str, float]]:
    """Each `<prefix> N: name=value ...` line as {name: value}, in order."""
    lines = [line for line in output.splitlines() if re.match(rf"{prefix} \d+: ", line)]
    return [{k: float(v) for k, v in re.findall(r"(\S+)=(\S+)", line)} for line in lines]


def assert_steps(output: str, prefix: str, names: tuple[str, ...]) -> list[dict[str, float]]:
    steps = step_lines(output, prefix)
    assert len(steps) == STEPS, f"expected {STEPS} '{prefix} N:' lines in:\n{output}"
    for step in steps:
        for name in names:
            assert name in step and math.isfinite(step[name]), f"{name} missing or not finite in {step}"
    return steps


@pytest.mark.parametrize(
    "name,trainer,names",
    [
        ("dpo_trl.py", "DPOTrainer", ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen")),
        ("grpo_trl.py", "GRPOTrainer", ("loss", "reward", "entropy")),
    ],
)
def test_trl_example(name, trainer, names):
    pytest.importorskip("trl")
    output = run_example(name)
    assert re.search(rf"{trainer}._compute_loss is fastalign\.integrations\.trl\.\w+\.compute_loss", output), output
    assert_steps(output, "step", names)


def test_plain_pytorch_example():
    # It claims to need no trainer library: it must run where none is installed.
    output = run_example("plain_pytorch.py", without=("transformers", "trl", "datasets", "verl"))
    dpo = assert_steps(output, "dpo step", ("loss", "rewards/margins", "rewards/accuracies"))
    assert_steps(output, "grpo step", ("reward", "loss", "entropy", "clip_ratio/region_mean"))
    # Policy and reference start equal (loss ln 2); one optimizer step on even-vs-odd preferences
    # must already favour the chosen completions.
    assert abs(dpo[0]["loss"] - math.log(2)) < 1e-4
    assert dpo[1]["rewards/margins"] > 0 and dpo[1]["loss"] < math.log(2)


def test_reward_ensemble_example():
    pytest.importorskip("datasets")
    output = run_example("reward_ensemble_cleaning.py")
    clean = assert_steps(output, "clean step", ("flagged", "precision", "recall", "agreement"))
    picks = assert_steps(output, "best_of_n step", ("mean", "min", "mean_minus_std", "oracle", "hacked_mean",
                                                     "hacked_min", "hacked_mean_minus_std"))
    tables = assert_steps(output, "dataset step", ("rows", "kept", "same_as_tensors"))
    for flags, best, table in zip(clean, picks, tables):
        # The ensemble finds most flipped labels, and most of what it flags was flipped.
        assert flags["recall"] > 0.7 and flags["precision"] > 0.5, flags
        # The conservative reductions never pick the hack that one model loves; the mean sometimes does.
        assert best["hacked_min"] == best["hacked_mean_minus_std"] == 0 < best["hacked_mean"], best
        assert best["mean"] < min(best["min"], best["mean_minus_std"]) <= best["oracle"], best
        # The Dataset path drops exactly the pairs the tensor call flags.
        assert table["same_as_tensors"] == 1 and table["rows"] - table["kept"] == flags["flagged"], table
    # Only torch is needed: without datasets the Dataset part is skipped, the rest still runs.
    bare = run_example("reward_ensemble_cleaning.py", without=("datasets", "transformers", "trl", "verl"))
    assert "dataset step" not in bare
    assert_steps(bare, "clean step", ("flagged",))
    assert_steps(bare, "best_of_n step", ("mean",))
