"""pytest wiring for `bench/`: thread count, machine description, the `measure` fixture, and the
row log.

Every benchmark goes through `measure`, so warm-up, synchronisation and the memory probe are the
same for every implementation in a row of the table.

`--bench-rows PATH` appends each row to a JSON-lines file the moment it is measured and prints a
line per row (name, median, elapsed), so a run that is stopped or fails keeps what it measured and
`bench/report.py PATH` turns that into the table.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import harness
from harness import DEVICE


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


# Rounds per row: at least ROUNDS, more for fast rows until about ROUND_BUDGET_S of timed calls.
# One fwd+bwd of the eager reference takes over a second on a 2-core CPU, so slow rows get the
# minimum and the suite stays within minutes; the fast rows, whose ratios matter most, are the
# ones most shaken by a busy machine and get the extra rounds. FASTALIGN_BENCH_ROUNDS fixes it.
_FIXED_ROUNDS = _int_env("FASTALIGN_BENCH_ROUNDS", 0)
ROUNDS = _FIXED_ROUNDS or (20 if DEVICE == "cuda" else 5)
MAX_ROUNDS = _FIXED_ROUNDS or (200 if DEVICE == "cuda" else 30)
ROUND_BUDGET_S = 2.0 if DEVICE == "cuda" else 1.5
WARMUP = _int_env("FASTALIGN_BENCH_WARMUP", 3 if DEVICE == "cuda" else 1)


class RowLog:
    """The JSON-lines record of a run (`bench/report.py` reads it) and a progress line per row.

    Records, one per line, each flushed as it is written: {"kind": "run", "planned": N,
    "machine_info", "commit_info", "datetime"}; {"kind": "benchmark", ...} per measured row, in
    pytest-benchmark's JSON layout; {"kind": "not_run", ...} per row this machine cannot run;
    {"kind": "end", "exitstatus", "others_busy"} when the session ends, absent if it was killed.
    """

    def __init__(self, path: str, config):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._file = open(path, "w")  # one run per file: a rerun must not mix with the last one
        self._config = config
        self._start = time.monotonic()
        self._planned = 0
        self._done = 0
        self._medians: dict[str, tuple[str, float, int]] = {}
        self._not_run_written = 0

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def start(self, planned: int, **header) -> None:
        self._planned = planned
        self._write({"kind": "run", "planned": planned, **header})
        # The first row can take a minute (inputs, compilation): say at once what is coming.
        self._say(f"{planned} benchmarks; each is printed as it finishes and kept in {self._path}")

    def _say(self, line: str) -> None:
        # Looked up here: pytest registers its terminal reporter after this conftest's configure.
        self._config.pluginmanager.get_plugin("terminalreporter").write_line(line, flush=True)

    def benchmark(self, nodeid: str, row: dict) -> None:
        self._write({"kind": "benchmark", **row})
        x = row["extra_info"]
        shape = "×".join(map(str, x.get("shape", [])))
        name = f"{x.get('op', row['group'])} {x.get('pass', '')} {x.get('dtype', '')} {shape} · {x['label']}"
        self._medians[nodeid] = (" ".join(name.split()), row["stats"]["median"], row["stats"]["rounds"])

    def progress(self, report) -> None:
        for entry in harness.NOT_RUN[self._not_run_written:]:
            self._write({"kind": "not_run", **entry})
        self._not_run_written = len(harness.NOT_RUN)
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self._done += 1
            elapsed = int(time.monotonic() - self._start)
            where = f"[{self._done:>{len(str(self._planned))}}/{self._planned} {elapsed // 60:>3}:{elapsed % 60:02}]"
            test = report.nodeid.split("::")[-1]
            if report.skipped:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                line = f"{test}: not run ({reason.removeprefix('Skipped: ')})"
            elif report.failed:
                line = f"{test}: FAILED (traceback at the end)"
            elif report.nodeid in self._medians:
                name, median, rounds = self._medians[report.nodeid]
                line = f"{name}: median {median * 1e3:.4g} ms of {rounds} rounds, {report.duration:.1f} s"
            else:
                line = f"{test}: passed without a measurement"
            self._say(f"{where} {line}")

    def finish(self, exitstatus: int, others_busy: float | None) -> None:
        self._write({"kind": "end", "exitstatus": exitstatus, "others_busy": others_busy})
        self._file.close()


_START = None
_ROWS: RowLog | None = None


def pytest_addoption(parser):
    parser.addoption("--bench-rows", metavar="PATH",
                     help="append each finished benchmark to this JSON-lines file and print a line per row")


def _stop_like_ctrl_c(signum, frame):
    # `timeout` and `kill` send SIGTERM: end the way Ctrl-C does, so the session finishes and the
    # row log is closed before the report is made from it.
    raise KeyboardInterrupt


def pytest_configure(config):
    global _START, _ROWS
    if DEVICE == "cpu":
        torch.set_num_threads(harness.cpu_count())
    _START = harness.cpu_snapshot()
    path = config.getoption("--bench-rows")
    if path:
        _ROWS = RowLog(path, config)
        signal.signal(signal.SIGTERM, _stop_like_ctrl_c)


def _machine_info() -> dict:
    info = harness.device_info(DEVICE)
    info.update(
        peak_memory_method=harness.peak_memory_method(DEVICE),
        min_rounds=ROUNDS,
        max_rounds=MAX_ROUNDS,
        warmup=WARMUP,
    )
    return info


def pytest_collection_finish(session):
    if _ROWS is not None:
        from pytest_benchmark.utils import get_commit_info

        _ROWS.start(
            planned=len(session.items),
            machine_info={"fastalign": _machine_info()},
            commit_info=get_commit_info(),
            datetime=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        )


def pytest_report_teststatus(report, config):
    # The row log prints a line per benchmark; pytest's ., s and F would only break into it. The
    # summary at the end still counts and lists every outcome.
    if _ROWS is not None and (report.when == "call" or not report.passed):
        category = "error" if report.failed and report.when != "call" else report.outcome
        return category, "", category.upper()
    return None


def pytest_runtest_logreport(report):
    if _ROWS is not None:
        _ROWS.progress(report)


def pytest_sessionfinish(session, exitstatus):
    if _ROWS is not None:
        _ROWS.finish(int(exitstatus), harness.others_busy_fraction(_START, harness.cpu_snapshot()))


def pytest_benchmark_update_machine_info(config, machine_info):
    info = _machine_info()
    info["others_busy"] = harness.others_busy_fraction(_START, harness.cpu_snapshot())
    machine_info["fastalign"] = info


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastalign_not_run"] = harness.NOT_RUN


@pytest.fixture
def measure(benchmark, request):
    """Times `step` with pytest-benchmark, then records its peak memory.

    `step` must synchronise the device itself before returning. `warmup` (default: `step`) runs
    first, outside the timed region: it is where torch.compile compiles. A second untimed call
    sizes the number of rounds and counts as the first of the WARMUP warm-up calls.
    """

    def run(step, *, case: dict, impl: str, label: str, warmup=None, extra=None):
        (warmup or step)()
        start = time.perf_counter()
        step()
        once = time.perf_counter() - start
        rounds = max(ROUNDS, min(MAX_ROUNDS, int(ROUND_BUDGET_S / max(once, 1e-9))))
        benchmark.group = case["group"]
        benchmark.extra_info.update({k: v for k, v in case.items() if k != "group"})
        benchmark.extra_info.update(impl=impl, label=label, device=DEVICE, **(extra or {}))
        before = harness.cpu_snapshot()
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=max(WARMUP - 1, 0), iterations=1)
        busy = harness.others_busy_fraction(before, harness.cpu_snapshot())
        benchmark.extra_info["others_busy"] = None if busy is None else round(busy, 3)
        peak = harness.measure_peak_mib(step, DEVICE)
        benchmark.extra_info["peak_mem_mib"] = None if peak is None else round(peak, 1)
        if _ROWS is not None:
            _ROWS.benchmark(request.node.nodeid, benchmark.stats.as_dict(include_data=False))

    return run
