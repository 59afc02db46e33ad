"""pytest wiring for `bench/`: thread count, machine description, the `measure` fixture.

Every benchmark goes through `measure`, so warm-up, synchronisation and the memory probe are the
same for every implementation in a row of the table.
"""

from __future__ import annotations

import os
import time

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


_START = None


def pytest_configure(config):
    global _START
    if DEVICE == "cpu":
        torch.set_num_threads(harness.cpu_count())
    _START = harness.cpu_snapshot()


def pytest_benchmark_update_machine_info(config, machine_info):
    info = harness.device_info(DEVICE)
    info.update(
        peak_memory_method=harness.peak_memory_method(DEVICE),
        min_rounds=ROUNDS,
        max_rounds=MAX_ROUNDS,
        warmup=WARMUP,
        others_busy=harness.others_busy_fraction(_START, harness.cpu_snapshot()),
    )
    machine_info["fastalign"] = info


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastalign_not_run"] = harness.NOT_RUN


@pytest.fixture
def measure(benchmark):
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

    return run
