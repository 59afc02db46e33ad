"""File names for benchmark results, one per device model. Standard library only, so that
`report.py` runs where torch is not installed."""

from __future__ import annotations

import re


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def short_cpu_model(name: str) -> str:
    # Vendor strings carry marketing noise that varies between kernels and hypervisors for the
    # same silicon; dropping it keeps one file per CPU model across runs.
    name = re.sub(r"\((R|TM)\)", " ", name, flags=re.I)
    name = re.sub(r"@.*$", " ", name)
    name = re.sub(r"\b\d+-Core\b", " ", name, flags=re.I)
    name = re.sub(r"\b(CPU|Processor|with Radeon.*)\b", " ", name, flags=re.I)
    return " ".join(name.split())


def cpu_slug(model: str, cores: int | None = None) -> str:
    return f"cpu-{slug(short_cpu_model(model))}" + (f"-{cores}c" if cores else "")


def cuda_slug(name: str) -> str:
    return f"cuda-{slug(name)}"
