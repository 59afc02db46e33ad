"""README.md works as written: every ```python block runs, its links resolve, and its benchmark
instructions name the paths the Makefile writes.

The blocks run in reading order of their dependencies: a block before the shared toy tensors (the
block that sets `B, T, V, H`) must run on its own; every block after it runs after that block, in
a fresh namespace, as the README says."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TEXT = README.read_text()


def _blocks(language: str) -> list[tuple[int, str]]:
    """(first line of the code in README.md, code) of every ```<language> block."""
    found = []
    for match in re.finditer(rf"^```{language}\n(.*?)^```", TEXT, re.M | re.S):
        found.append((TEXT.count("\n", 0, match.start()) + 2, match.group(1)))
    return found


PYTHON = _blocks("python")
PRELUDES = [line for line, code in PYTHON if re.search(r"^B, T, V, H = ", code, re.M)]


def _compiled(line: int, code: str):
    # Padded so that a traceback points at the README's own line numbers.
    return compile("\n" * (line - 1) + code, str(README), "exec")


def test_one_shared_prelude():
    assert len(PRELUDES) == 1, f"expected one block that sets `B, T, V, H`, found them at lines {PRELUDES}"


@pytest.fixture
def trl_restored():
    yield
    import sys

    trl = sys.modules.get("fastalign.integrations.trl")
    if trl is not None and trl.is_patched():
        trl.unpatch()


# The blocks run as module "readme": a deprecated fastalign name used in the README is an error.
@pytest.mark.filterwarnings("error::DeprecationWarning:readme")
@pytest.mark.parametrize("line,code", PYTHON, ids=[f"README.md:{line}" for line, _ in PYTHON])
def test_python_block_runs(line, code, trl_restored):
    if "fastalign.integrations.trl" in code:
        pytest.importorskip("trl", reason="the TRL drop-in needs trl (the [trl] extra)")
    namespace = {"__name__": "readme"}
    prelude = [(l, c) for l, c in PYTHON if l in PRELUDES]
    if PRELUDES and line > PRELUDES[0]:
        exec(_compiled(*prelude[0]), namespace)
    exec(_compiled(line, code), namespace)


@pytest.mark.parametrize("line,code", PYTHON, ids=[f"README.md:{line}" for line, _ in PYTHON])
def test_no_ellipsis_for_arguments(line, code):
    dots = [node.lineno for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Constant) and node.value is ...]
    assert not dots, f"README.md:{line + dots[0] - 1}: `...` in place of real arguments"


def _slug(heading: str) -> str:
    # GitHub's anchors: lower case, punctuation dropped, spaces to hyphens.
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    anchors = {_slug(h) for h in re.findall(r"^#+ (.*)$", TEXT, re.M)}
    for target in re.findall(r"\]\(([^)]+)\)", TEXT):
        if target.startswith("#"):
            assert target[1:] in anchors, f"README link {target} has no heading"
        elif "://" not in target:
            assert (ROOT / target).exists(), f"README link {target} names no file"


def test_named_paths_exist():
    # Paths in backticks (`bench/bench_grpo.py`) that a move or rename would leave dangling;
    # placeholders such as `bench/bench_<op>.py` or `static-*.md` are not paths.
    named = re.findall(r"`((?:fastalign|kernels|csrc|tests|bench|examples)/[\w/.-]*)`", TEXT)
    missing = sorted({path for path in named if not (ROOT / path).exists()})
    assert not missing, f"README names paths that do not exist: {missing}"


def test_benchmark_paths_are_the_makefiles():
    makefile = (ROOT / "Makefile").read_text()
    rows = re.search(r"^BENCH_ROWS := (\S+)", makefile, re.M).group(1)
    assert rows in TEXT, f"the README does not say that make bench logs its rows to {rows}"
    for line in TEXT.splitlines():
        if "BENCH_ARGS=" in line or "FASTALIGN_BENCH_QUICK=1" in line:
            assert "bench/results" not in line, f"narrowed runs write to build/bench/, not bench/results/: {line}"
