"""The Triton kernels compile for real GPUs (NVIDIA sm_80, sm_90, sm_100, sm_120; AMD gfx942,
gfx90a) without spills, with 64-bit addressing, under the Triton installed here and under Triton
3.6 (what a GPU machine may have).

Each test runs tests/ops/triton_compile_gate.py in a subprocess with TRITON_INTERPRET removed from the
environment: under the interpreter ``triton.jit`` returns objects ``triton.compile`` cannot take,
and this process may already have imported triton that way. These run the gate's fast subset
(``--quick``: the heaviest variant per kernel, dtype and alignment class on every target);
``make gate`` compiles every variant.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

GATE = Path(__file__).with_name("triton_compile_gate.py")
REPO = Path(__file__).resolve().parents[2]
KERNELS_DIR = REPO / "kernels"
# A second Triton, installed there by `make test` (pip install --target), for the gate's run
# under the version a lent GPU machine has.
OLD_TRITON = REPO / "build" / "triton-3.6"
OLD_TRITON_VERSION = "3.6.0"


def _run_gate(*args: str, timeout: float = 900, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, str(GATE), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _report(proc: subprocess.CompletedProcess) -> str:
    return f"gate exited with {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr[-4000:]}"


KERNELS = ("_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel", "_policy_token_kernel",
           "_gae_scan_kernel", "_gae_whiten_kernel", "_group_advantages_kernel", "_discounted_returns_kernel",
           "_remax_kernel",
           "_linear_logprobs_fwd_kernel", "_linear_logprobs_bwd_hidden_kernel", "_linear_logprobs_bwd_weight_kernel",
           "_token_divergence_fwd_kernel", "_token_divergence_bwd_kernel")
TARGETS = ("sm_80", "sm_90", "sm_100", "sm_120", "gfx942", "gfx90a")


def _assert_gate_passed(proc: subprocess.CompletedProcess, triton_version: str | None = None) -> None:
    assert proc.returncode == 0, _report(proc)
    assert "no spills" in proc.stdout, _report(proc)
    if triton_version is not None:
        assert f"triton {triton_version}" in proc.stdout, _report(proc)
    # Each kernel on each target took part (a launcher table that lost one would pass vacuously).
    table = proc.stdout.split("kernel ", 1)[-1]
    for kernel in KERNELS:
        for target in TARGETS:
            assert re.search(rf"^{kernel}\s+{target}\s", table, re.M), f"{kernel} {target} missing\n" + _report(proc)


def test_every_kernel_compiles_without_spills_on_every_target():
    _assert_gate_passed(_run_gate("--quick"))


def test_every_kernel_compiles_without_spills_under_triton_3_6():
    if not (OLD_TRITON / "triton" / "__init__.py").is_file():
        if os.environ.get("FASTALIGN_REQUIRE_OLD_TRITON") == "1":
            pytest.fail(f"Triton {OLD_TRITON_VERSION} is not installed in {OLD_TRITON} (`make test` installs it)")
        pytest.skip(f"Triton {OLD_TRITON_VERSION} is not installed in {OLD_TRITON} (`make test` installs it)")
    _assert_gate_passed(_run_gate("--quick", pythonpath=OLD_TRITON), OLD_TRITON_VERSION)


def test_row_offsets_are_64_bit():
    proc = _run_gate("--offsets-only")
    assert proc.returncode == 0, _report(proc)
    # The check is not vacuous: the gate's own 32-bit control kernel was rejected.
    assert "control kernel with a 32-bit row offset: rejected" in proc.stdout, _report(proc)


@pytest.mark.parametrize(
    "file, original, mutated, expected",
    [
        # The row index left in 32 bits: b * stride_b and row * V overflow past 2^31 elements.
        ("logprobs.py", "row = tl.program_id(0).to(tl.int64)", "row = tl.program_id(0)", "offset of type i32"),
        # A strided vocabulary indexed in 32 bits: index * stride_v overflows past 2^31 elements.
        ("logprobs.py", ".to(tl.int64) * stride_v", " * stride_v", "32-bit use of %stride_v"),
        # The same two in the fused policy kernel, which also writes the [B, T, V] gradient.
        ("policy.py", "row = tl.program_id(0).to(tl.int64)", "row = tl.program_id(0)", "offset of type i32"),
        ("policy.py", ".to(tl.int64) * stride_v", " * stride_v", "32-bit use of %stride_v"),
        # Hidden-state log-probs: a vocabulary index in 32 bits times the weight's row stride
        # (V * H passes 2^31 for large heads), and grad_weight's row offset in 32 bits.
        ("linear_logprobs.py", "cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)", "cols = v0 + tl.arange(0, BLOCK_V)",
         "32-bit use of %stride_wv"),
        ("linear_logprobs.py", "tl.program_id(0).to(tl.int64) * BLOCK_V", "tl.program_id(0) * BLOCK_V",
         "%grad_weight_ptr + offset of type tensor<"),
    ],
)
def test_offset_check_catches_32_bit_arithmetic_in_the_kernels(tmp_path, file, original, mutated, expected):
    source = (KERNELS_DIR / file).read_text()
    assert original in source, f"{original!r} no longer in {file}; update this test"
    # The kernels files beside it too: policy.py imports its sweep helpers from logprobs.py.
    for sibling in KERNELS_DIR.glob("*.py"):
        (tmp_path / sibling.name).write_text(sibling.read_text())
    copy = tmp_path / file
    copy.write_text(source.replace(original, mutated))
    proc = _run_gate("--offsets-only", "--kernels", str(copy))
    assert proc.returncode == 1, _report(proc)
    assert expected in proc.stdout, _report(proc)
