"""Plumbing shared by the benchmarks: which device, how to name it, peak memory, machine load.

FASTALIGN_BENCH_DEVICE=cpu forces the CPU rows on a machine that has a GPU.
"""

from __future__ import annotations

import gc
import os
import time

import torch

import naming
from fastalign.info import cpu_name


def cpu_count() -> int:
    # Containers and taskset restrict the usable cores below os.cpu_count().
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def bench_device() -> str:
    forced = os.environ.get("FASTALIGN_BENCH_DEVICE")
    if forced:
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_info(device: str) -> dict:
    """What the report needs to name the machine and explain where the numbers come from."""
    info = {"type": device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device == "cuda":
        name = torch.cuda.get_device_name()
        info.update(name=name, slug=naming.cuda_slug(name), cuda=torch.version.cuda)
    else:
        model = cpu_name()
        name = naming.short_cpu_model(model)
        info.update(name=name, slug=naming.cpu_slug(model, cpu_count()), cores=cpu_count())
    for pkg in ("triton", "trl", "fastalign"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # a missing or half-installed peer must not stop the run
            info[pkg] = None
    return info


DEVICE = bench_device()

# Benchmarks that could not run on this machine, with why; the report lists them under the table.
NOT_RUN: list[dict] = []


def not_run(case: dict, impl: str, reason: str):
    """Skips the current benchmark and keeps the reason for the report's footnotes."""
    import pytest

    NOT_RUN.append({**{k: v for k, v in case.items() if k != "group"}, "impl": impl, "reason": reason})
    pytest.skip(f"{impl}: {reason}")


# --- how busy the machine was with other work --------------------------------------------------
#
# On a shared box other jobs steal cores mid-run and medians move by 2x. /proc/stat counts busy
# time for the whole machine; subtracting this process's and its children's CPU time (the
# torch.compile workers are children) leaves what everything else used.


def _own_cpu_seconds() -> float:
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, ..., utime (12th), stime (13th), cutime, cstime.
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = sum(int(x) for x in fields[11:15]) / tick
    total = 0.0
    for pid, seconds in cpu.items():
        p = pid
        while p and p != me and p in parent:
            p = parent[p]
        if p == me:
            total += seconds
    return total


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall seconds, machine-wide busy CPU seconds, this process tree's CPU seconds)."""
    try:
        with open("/proc/stat") as f:
            jiffies = [int(x) for x in f.readline().split()[1:]]
        idle = jiffies[3] + jiffies[4]  # idle + iowait
        busy = (sum(jiffies[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is in user already
        return time.monotonic(), busy, _own_cpu_seconds()
    except (OSError, ValueError, IndexError):
        return None


def others_busy_fraction(start, end) -> float | None:
    """Share of the machine's cores that other processes kept busy between two snapshots."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    others = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, others / ((end[0] - start[0]) * os.cpu_count()))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --- peak memory -------------------------------------------------------------------------------
#
# CPU: Linux keeps a per-process RSS high-water mark (VmHWM) that writing "5" to
# /proc/self/clear_refs resets to the current RSS, so HWM minus RSS-before is the extra resident
# memory the call needed at its worst moment, outputs included. glibc keeps freed blocks below its
# (adaptive, up to 32 MiB) mmap threshold resident for reuse; a call served from them would look
# free, so the heap is trimmed first and reused pages then fault in and count. Where the proc files
# are missing or read-only the probe reports None.


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its caching is not ours to undo
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_RSS_PROBE_OK: bool | None = None


def rss_probe_works() -> bool:
    """Checks once, with a known allocation, that the HWM reset does what the CPU probe assumes."""
    global _RSS_PROBE_OK
    if _RSS_PROBE_OK is None:
        ok = False
        try:
            gc.collect()
            _trim_heap()
            if _reset_hwm():
                before = _status_kib("VmRSS")
                buf = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
                del buf
                grown = _status_kib("VmHWM") - before
                ok = 60 << 10 <= grown <= 80 << 10
        except (OSError, KeyError, ValueError):
            ok = False
        _RSS_PROBE_OK = ok
    return _RSS_PROBE_OK


def peak_memory_method(device: str) -> str | None:
    if device == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "VmHWM after clear_refs" if rss_probe_works() else None


def measure_peak_mib(fn, device: str) -> float | None:
    """Extra memory one call of `fn` needs at its peak, in MiB; None where it cannot be measured."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del result
        return peak / 2**20
    if not rss_probe_works():
        return None
    _trim_heap()
    _reset_hwm()
    base = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM") - base
    del result
    return max(peak, 0) / 1024
