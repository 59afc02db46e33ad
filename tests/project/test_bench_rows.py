"""`make bench` keeps every row the moment it is measured: bench/conftest.py's row log, a progress
line per row, and bench/report.py's tables from a log that a stop, a failure or a kill cut short."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

# Three rows through the real `measure` fixture, a row this machine cannot run, and a failure.
FAKE_BENCH = '''
import pytest
import torch

from harness import not_run


def case(op):
    return {"op": op, "pass": "fwd", "shape": [4, 8], "dtype": "float32", "group": op}


@pytest.mark.parametrize("impl", ["eager", "native"])
def bench_small(measure, impl):
    x = torch.ones(4, 8)
    measure(lambda: x.sum(), case=case("token_logprobs"), impl=impl, label=f"{impl} label")


def bench_linear(measure):
    x = torch.ones(4, 8)
    measure(lambda: x.sum(), case=case("linear_token_logprobs"), impl="native", label="native label")


def bench_missing(measure):
    not_run(case("token_logprobs"), "triton", "no GPU here")


def bench_broken(measure):
    raise RuntimeError("this benchmark fails")
'''


def _load_report():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


report = _load_report()


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """The bench/ plumbing run on FAKE_BENCH: (the row log, pytest's output)."""
    root = tmp_path_factory.mktemp("bench")
    for name in ("conftest.py", "harness.py", "naming.py", "pytest.ini"):
        shutil.copy(BENCH / name, root / name)
    (root / "bench_fake.py").write_text(FAKE_BENCH)
    rows = root / "out" / "rows.jsonl"
    env = {**os.environ, "FASTALIGN_BENCH_ROUNDS": "2", "FASTALIGN_BENCH_DEVICE": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(root), "-q", "--benchmark-quiet", f"--bench-rows={rows}"],
        cwd=root, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the broken benchmark fails the run
    return rows, proc.stdout


def test_each_row_is_logged_with_a_progress_line(fake_run):
    rows, output = fake_run
    records = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["run", "benchmark", "benchmark", "benchmark", "not_run", "end"]
    assert records[0]["planned"] == 5 and records[0]["machine_info"]["fastalign"]["type"] == "cpu"
    assert records[-1]["exitstatus"] == 1
    assert all(r["stats"]["rounds"] == 2 for r in records if r["kind"] == "benchmark")
    assert f"5 benchmarks; each is printed as it finishes and kept in {rows}" in output
    progress = [line for line in output.splitlines() if line.startswith("[")]
    assert len(progress) == 5, output
    assert "token_logprobs fwd float32 4×8 · eager label: median" in progress[0]
    assert "bench_missing: not run (triton: no GPU here)" in progress[3]
    assert "bench_broken: FAILED" in progress[4]


def test_report_from_a_failed_run_splits_suites_and_says_it_is_partial(fake_run, tmp_path):
    rows, _ = fake_run
    assert report.main([str(rows), "--out-dir", str(tmp_path), "--name", "m", "--no-chart"]) == 0
    main, linear = (tmp_path / "m.md").read_text(), (tmp_path / "m-linear.md").read_text()
    assert "| token_logprobs |" in main and "| linear_token_logprobs |" not in main
    assert "| linear_token_logprobs |" in linear and "| token_logprobs |" not in linear
    assert "not run: triton (no GPU here)" in main and "no GPU here" not in linear
    for text in (main, linear):
        assert "**Partial run**: the run had failures after 4 of 5 benchmarks" in text
    # The rows written next to the table load again as a run of their own.
    again = report.load(tmp_path / "m-linear.json")
    assert [r["op"] for r in again["rows"]] == ["linear_token_logprobs"]


def test_report_from_a_log_cut_off_mid_line(fake_run, tmp_path):
    rows, _ = fake_run
    lines = rows.read_text().splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])  # killed while writing
    run = report.load(cut)
    assert [r["label"] for r in run["rows"]] == ["eager label"]
    assert "the run was cut off after 1 of 5 benchmarks" in report.render(run)


def test_report_of_a_finished_run_has_no_partial_note(fake_run, tmp_path):
    rows, _ = fake_run
    records = [json.loads(line) for line in rows.read_text().splitlines()]
    records[-1]["exitstatus"] = 0
    done = tmp_path / "done.jsonl"
    done.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "Partial run" not in report.render(report.load(done))


def test_report_still_reads_pytest_benchmark_json():
    run = report.load(BENCH / "results" / "cpu-amd-epyc-2c-trainer.json")
    assert {r["op"] for r in run["rows"]} == {"dpo_train_step", "grpo_train_step"}
    assert "Partial run" not in report.render(run)
