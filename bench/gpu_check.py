"""One-shot check of fastalign on a GPU: `make gpu-check`. Run it first on any new GPU.

In one short run (about 8 minutes on one GPU, `--budget` seconds at most) it
  (a) records the software and the device (versions, clocks, SMs, L2) and, once the kernels have
      run, each compiled Triton kernel's registers, spills and shared memory as the driver loaded it;
  (b) checks every op against a float64 reference on the device: bf16 and fp32, softcap, strided
      views, an odd vocabulary (50257) and one sliced out of a padded row (151665 of 151936),
      ignored / out-of-range labels, all -inf and NaN rows, a logits tensor of more than 2^31
      elements (its last rows bit for bit equal to the same rows run alone), and the bf16
      tensor-core linear path twice, bit for bit;
  (c) runs the test suite on the device (tests that need TRL, Liger or the C++ backend skip);
  (d) times the anchor workloads with CUDA events beside eager PyTorch and, when they import,
      TRL's and Liger's kernels, with the device's measured copy bandwidth as the yardstick;
  (e) writes bench/results/cuda-<gpu>.md and .json, section by section, so that a run cut short
      still leaves what it found.

It needs only what a bare GPU machine has: torch, triton, pytest. No C++ build (the Makefile sets
FASTALIGN_DISABLE_NATIVE=1) and no install: fastalign is imported from this checkout, its
kernels/ folder served as fastalign.kernels.

`--dry-run` runs every step on CPU under the Triton interpreter with tiny shapes and writes to
build/gpu-check/ (`make test` runs it), so the script is known to work before a GPU is at hand.
Exit status: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANCHOR_ROWS, ANCHOR_VOCAB = 8192, 151936
LINEAR_ANCHOR = (8192, 4096, 131072)


@dataclass
class Check:
    section: str
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    path_md: Path
    path_json: Path
    started: float = field(default_factory=time.perf_counter)
    environment: list[tuple[str, str]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    kernels: list[dict] = field(default_factory=list)
    timings: list[dict] = field(default_factory=list)
    tests: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def check(self, section: str, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(section, name, bool(ok), detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {section}: {name}{' - ' + detail if detail else ''}", flush=True)
        return ok

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self) -> None:
        self.path_md.parent.mkdir(parents=True, exist_ok=True)
        self.path_md.write_text(self.markdown())
        self.path_json.write_text(json.dumps(dict(
            environment=self.environment, checks=[c.__dict__ for c in self.checks], kernels=self.kernels,
            timings=self.timings, tests=self.tests, notes=self.notes, seconds=round(self.elapsed(), 1),
        ), indent=1))

    def markdown(self) -> str:
        lines = ["# fastalign on " + dict(self.environment).get("device", "?"), ""]
        lines += [f"Written by `make gpu-check` ({'all checks passed' if not self.failed else f'{len(self.failed)} check(s) FAILED'}, "
                  f"{self.elapsed():.0f} s).", "", "## Environment", ""]
        lines += [f"- {k}: {v}" for k, v in self.environment]
        lines += ["", "## Checks against float64", "", "| section | check | result | detail |", "|---|---|---|---|"]
        lines += [f"| {c.section} | {c.name} | {'pass' if c.ok else '**FAIL**'} | {c.detail} |" for c in self.checks]
        lines += ["", "## Compiled kernels (as loaded by the driver)", ""]
        if self.kernels:
            lines += ["| kernel | variant | warps | registers | spills | shared bytes |", "|---|---|---|---|---|---|"]
            lines += [f"| {k['kernel']} | {k['variant']} | {k['num_warps']} | {k['n_regs']} | {k['n_spills']} | {k['shared']} |"
                      for k in self.kernels]
        else:
            lines.append("(none recorded: the kernels ran under the interpreter)")
        lines += ["", "## Anchor workloads", ""]
        if self.timings:
            lines += ["| workload | implementation | median ms | GB/s | of copy bandwidth | TFLOP/s | peak extra MiB |",
                      "|---|---|---|---|---|---|---|"]
            for t in self.timings:
                lines.append(f"| {t['workload']} | {t['impl']} | {t['ms']:.3f} | {_fmt(t.get('gbps'))} | "
                             f"{_fmt(t.get('of_copy'), '{:.0%}')} | {_fmt(t.get('tflops'))} | {_fmt(t.get('peak_mib'), '{:.0f}')} |")
        lines += ["", "## Test suite on the device", ""]
        for key, value in self.tests.items():
            if isinstance(value, list):
                lines += [f"- {key}:"] + [f"  - `{item}`" for item in value]
            else:
                lines.append(f"- {key}: {value}")
        if not self.tests:
            lines.append("(not run)")
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _fmt(value, spec: str = "{:.1f}") -> str:
    return "" if value is None else spec.format(value)


# --------------------------------------------------------------------------------------------
# Setup


def _import_fastalign(dry_run: bool):
    """fastalign from this checkout (kernels/ served as fastalign.kernels), never an installed copy."""
    if dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests" / "support"))
    import fastalign

    if Path(fastalign.__file__).resolve().parent != REPO / "fastalign":
        raise RuntimeError(f"imported fastalign from {fastalign.__file__}, not from {REPO}")
    return fastalign


def environment(report: Report, device: str) -> None:
    import torch

    import fastalign

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    env = [("python", platform.python_version()), ("torch", torch.__version__), ("triton", triton_version),
           ("fastalign", fastalign.__version__), ("FASTALIGN_DISABLE_NATIVE", os.environ.get("FASTALIGN_DISABLE_NATIVE", "")),
           ("backends", ", ".join(f"{n}: {'live' if ok else 'off'}" for n, (ok, _) in fastalign.available_backends(device).items()))]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env += [("device", props.name), ("cuda runtime", str(torch.version.cuda or torch.version.hip)),
                ("compute capability", f"{props.major}.{props.minor}"), ("SMs", str(props.multi_processor_count)),
                ("memory GiB", f"{props.total_memory / 2**30:.1f}"),
                ("L2 MB", f"{getattr(props, 'L2_cache_size', 0) / 1e6:.1f}")]
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,"
                 "power.limit,temperature.gpu,persistence_mode", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20)
            env.append(("nvidia-smi (driver, sm clock, max sm, mem clock, max mem, power limit, temp, persistence)",
                        smi.stdout.strip() or smi.stderr.strip()))
        except (OSError, subprocess.SubprocessError) as exc:
            env.append(("nvidia-smi", f"unavailable: {exc}"))
    else:
        from fastalign.info import cpu_name

        env += [("device", f"CPU {cpu_name()} (dry run under the Triton interpreter)")]
    report.environment = env


# --------------------------------------------------------------------------------------------
# (b) Correctness against float64


def _compare(report: Report, section: str, name: str, value, reference, truth, slack_eps: float = 4.0) -> bool:
    """`value` (Triton) against float64 `truth`, allowed the error of `reference` (the reference
    backend in the same dtype) plus slack: the tests' rule (tests/support/numerics.py)."""
    from numerics import assert_as_accurate_as_reference, max_error

    try:
        assert_as_accurate_as_reference(value, reference, truth, name, slack_eps)
    except AssertionError as exc:
        return report.check(section, name, False, str(exc).splitlines()[0])
    return report.check(section, name, True, f"max error {max_error(value, truth):.2e}")


def _run_backend(backend: str, fn, *tensors):
    """fn(*tensors) on a backend with gradients w.r.t. every float tensor: (outputs, grads)."""
    import torch

    import fastalign

    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    with fastalign.use_backend(backend):
        outputs = fn(*leaves)
        grads = [None] * len(leaves)
        if outputs["weighted"]:
            scalar = sum((o.float() * w).nansum() for o, w in outputs["weighted"])
            grads = torch.autograd.grad(scalar, [t for t in leaves if t.requires_grad], allow_unused=True)
    return {k: v.detach() for k, v in outputs.items() if k != "weighted"}, [None if g is None else g.detach() for g in grads]


def _check_three_ways(report: Report, section: str, label: str, fn, tensors, slack_eps: float = 4.0) -> None:
    """Triton vs float64 truth vs the reference backend in the same dtype, outputs and gradients."""
    f64 = [t.double() if t.is_floating_point() else t for t in tensors]
    out_t, grads_t = _run_backend("triton", fn, *tensors)
    out_r, grads_r = _run_backend("reference", fn, *tensors)
    out_x, grads_x = _run_backend("reference", fn, *f64)
    for key in out_t:
        _compare(report, section, f"{label} {key}", out_t[key], out_r[key], out_x[key], slack_eps)
    for i, (gt, gr, gx) in enumerate(zip(grads_t, grads_r, grads_x)):
        if gx is not None:
            _compare(report, section, f"{label} grad[{i}]", gt, gr, gx, slack_eps)


def check_token_logprobs(report: Report, device: str, small: bool) -> None:
    import torch

    import fastalign

    B, T = (2, 5) if small else (4, 192)
    vocabs = [("48", 48, 48), ("53", 53, 53), ("40 of 48", 40, 48)] if small else \
        [("32000", 32000, 32000), ("50257", 50257, 50257), ("151665 of 151936", 151665, 151936)]
    fields = ("entropy", "log_sum_sq_probs", "mean_logits")
    for (vocab_label, V, width), dtype, softcap in [(v, d, s) for v in vocabs for d in (torch.bfloat16, torch.float32)
                                                   for s in (None, 30.0)]:
        full = torch.randn(B, T + 1, width, device=device, dtype=torch.float32).mul_(3).to(dtype)
        # A trainer's view: the last position dropped (strided rows) and the vocabulary sliced.
        logits = full[:, :-1, :V]
        labels = torch.randint(0, V, (B, T), device=device)
        labels[0, 1] = -100
        # Vocabulary masking and the rows that test the corner cases: all -inf, and a NaN.
        logits[1, 0, : V // 3] = -float("inf")
        logits[0, 2, :] = -float("inf")
        logits[1, 3, V // 2] = float("nan")
        weights = torch.randn(B, T, device=device), torch.randn(B, T, device=device)

        def fn(x, labels=labels, softcap=softcap):
            out = fastalign.token_logprobs(x, labels, temperature=0.7, logit_scale=0.5 if softcap else 1.0,
                                           softcap=softcap, outputs=fields + ("is_top1",))
            result = {"logps": out.logps, "entropy": out.entropy, "log_sum_sq_probs": out.log_sum_sq_probs,
                      "mean_logits": out.mean_logits}
            result["weighted"] = [(out.logps, weights[0]), (out.entropy, weights[1])]
            return result

        name = f"V={vocab_label} {str(dtype).removeprefix('torch.')}{' softcap' if softcap else ''}"
        _check_three_ways(report, "token_logprobs", name, fn, [logits])

        # is_top1 against the float64 argmax, on the rows whose maximum is unique and finite.
        with fastalign.use_backend("triton"):
            top1 = fastalign.token_logprobs(logits, labels, outputs=("is_top1",)).is_top1
        x64 = logits.double()
        expected = x64.argmax(-1) == labels
        finite = torch.isfinite(x64).all(-1) & (labels >= 0)
        report.check("token_logprobs", f"{name} is_top1", torch.equal(top1[finite], expected[finite]))

    # An out-of-range label reaching the kernel (the Python front end refuses one in a CPU tensor;
    # on CUDA it does not synchronize to look): NaN there, the other rows as without it, and no
    # read out of bounds.
    from fastalign import _triton

    launcher = _triton.kernels("logprobs").token_logprobs_forward
    V = 48 if small else 50257
    logits = torch.randn(2, 4, V, device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, V, (8,), device=device)
    bad_labels = labels.clone()
    bad_labels[6] = V + 7
    bad_labels[0] = -5
    good = launcher(logits, labels, 1.0, 1.0, 0.0, -100, True, False, False, False)
    bad = launcher(logits, bad_labels, 1.0, 1.0, 0.0, -100, True, False, False, False)
    others = torch.ones(8, dtype=torch.bool, device=device)
    others[6] = others[0] = False
    report.check("token_logprobs", "out-of-range labels give NaN, other rows untouched",
                 bool(bad[0][6].isnan()) and bool(bad[0][0].isnan()) and torch.equal(bad[0][others], good[0][others])
                 and torch.equal(bad[1], good[1]))


def check_large_tensor(report: Report, device: str, small: bool) -> None:
    """More than 2^31 logits: the last rows (whose offsets pass 2^31) equal, bit for bit, the same
    rows run on their own, forward and gradient, for token_logprobs and the fused policy pass."""
    import torch

    V = 151936 if not small else 64
    rows = (2**31 // V + 64) if not small else 40
    logits = torch.empty(1, rows, V, device=device, dtype=torch.bfloat16)
    logits.normal_(0, 2)
    labels = torch.randint(0, V, (rows,), device=device)
    tail = slice(rows - 48, rows)
    detail = f"[{rows}, {V}] bf16 = {rows * V / 2**31:.2f} x 2^31 elements"
    import fastalign

    def run(x, y):
        x = x.detach().requires_grad_(True)
        out = fastalign.token_logprobs(x, y, outputs=("entropy",))
        (out.logps.sum() + out.entropy.sum()).backward()
        return out.logps.detach(), out.entropy.detach(), x.grad

    with fastalign.use_backend("triton"):
        big = run(logits, labels[None])
        part = logits[:, tail].contiguous()
        alone = run(part, labels[None, tail].contiguous())
        report.check("2^31", "token_logprobs forward, last rows", torch.equal(big[0][:, tail], alone[0])
                     and torch.equal(big[1][:, tail], alone[1]), detail)
        report.check("2^31", "token_logprobs backward, last rows", torch.equal(big[2][:, tail], alone[2]), detail)
        del big, alone
        ops = torch.ops.fastalign
        adv = torch.randn(rows, device=device)
        w = torch.full((rows,), 1.0 / rows, device=device)
        empty = torch.empty(0, device=device)
        params = [0.8, 1.28, 3.0, float("inf"), 20.0, 1.0, 1.05, 0.0, 1.0]
        pol = ops.policy_token_forward(logits, labels, empty, empty, adv, w, empty, empty, 1.0, 1.0, 0.0, -100,
                                       0, 0, params, True)
        pol_part = ops.policy_token_forward(part, labels[tail].contiguous(), empty, empty, adv[tail].contiguous(),
                                            w[tail].contiguous(), empty, empty, 1.0, 1.0, 0.0, -100, 0, 0, params, True)
        report.check("2^31", "policy pass (GRPO clip), last rows' log-probs and gradient",
                     torch.equal(pol[0][tail], pol_part[0]) and torch.equal(pol[2][:, tail], pol_part[2]), detail)
    del logits, pol, pol_part


def check_policy(report: Report, device: str, small: bool) -> None:
    import torch

    import fastalign

    B, T, V = (2, 6, 48) if small else (4, 256, 32000)
    H = 32 if small else 1024
    for dtype in (torch.bfloat16, torch.float32):
        logits = (torch.randn(B, T, V, device=device) * 2).to(dtype)
        labels = torch.randint(0, V, (B, T), device=device)
        mask = torch.ones(B, T, device=device)
        mask[1, -2:] = 0
        adv = torch.randn(B, device=device)
        old = torch.randn(B, T, device=device) * 0.1 - 5
        ref = torch.randn(B, T, device=device) * 0.1 - 5
        for loss_type in ("dapo", "grpo", "dr_grpo"):
            def fn(x, loss_type=loss_type):
                out = fastalign.grpo_loss(x, labels, completion_mask=mask, advantages=adv, old_logps=old, ref_logps=ref,
                                          loss_type=loss_type, beta=0.04, epsilon_high=0.28, temperature=0.9,
                                          num_items_in_batch=mask.sum(), max_completion_length=T)
                return {"loss": out.loss, "weighted": [(out.loss, 1.0)]}

            _check_three_ways(report, "grpo_loss", f"{loss_type} {str(dtype).removeprefix('torch.')}", fn, [logits])

        hidden = torch.randn(B, T, H, device=device).to(dtype)
        weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype)

        def fn_hidden(h, w):
            out = fastalign.grpo_loss(hidden=h, weight=w, labels=labels, completion_mask=mask, advantages=adv,
                                      old_logps=old, ref_logps=ref, loss_type="dapo", beta=0.04,
                                      num_items_in_batch=mask.sum())
            return {"loss": out.loss, "weighted": [(out.loss, 1.0)]}

        _check_three_ways(report, "grpo_loss", f"from hidden states {str(dtype).removeprefix('torch.')}", fn_hidden,
                          [hidden, weight], slack_eps=16.0)


def check_linear(report: Report, device: str, small: bool) -> None:
    import torch

    import fastalign

    N, H, V = (24, 32, 80) if small else (2048, 1024, 32000)
    for dtype, softcap in ((torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, 30.0)):
        hidden = torch.randn(N, H, device=device).to(dtype)
        weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype)
        labels = torch.randint(0, V, (N,), device=device)
        labels[::7] = -100
        weights = torch.randn(N, device=device), torch.randn(N, device=device)

        def fn(h, w, softcap=softcap):
            out = fastalign.linear_token_logprobs(h, w, labels, softcap=softcap, temperature=0.8,
                                                  outputs=("entropy", "log_sum_sq_probs", "mean_logits"))
            return {"logps": out.logps, "entropy": out.entropy, "log_sum_sq_probs": out.log_sum_sq_probs,
                    "mean_logits": out.mean_logits,
                    "weighted": [(out.logps, weights[0]), (out.entropy, weights[1])]}

        from fastalign import _triton

        # Both of the Triton backend's ways (FASTALIGN_LINEAR_LOGPROBS): "blocked", the default,
        # and "fused", the matmul inside the Triton kernels.
        for mode in ("blocked", "fused"):
            saved, _triton.LINEAR_LOGPROBS_PASS = _triton.LINEAR_LOGPROBS_PASS, mode
            try:
                name = f"{str(dtype).removeprefix('torch.')}{' softcap' if softcap else ''}" + \
                    (", fused kernels" if mode == "fused" else "")
                # The matmul's rounding differs from the reference's cuBLAS order: a wider slack.
                _check_three_ways(report, "linear_token_logprobs", name, fn, [hidden, weight], slack_eps=16.0)
                if dtype == torch.bfloat16 and softcap is None:
                    first = _run_backend("triton", fn, hidden, weight)
                    second = _run_backend("triton", fn, hidden, weight)
                    same = all(torch.equal(first[0][k], second[0][k]) for k in first[0]) and \
                        all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
                    report.check("linear_token_logprobs", f"bf16 {mode} path run twice: bitwise equal", same)
            finally:
                _triton.LINEAR_LOGPROBS_PASS = saved


def check_advantages(report: Report, device: str, small: bool) -> None:
    import torch

    import fastalign

    B, T = (6, 9) if small else (512, 1024)
    rewards = torch.randn(B, T, device=device)
    values = torch.randn(B, T, device=device)
    mask = torch.rand(B, T, device=device) > 0.2
    for semantics in ("verl", "trl"):
        def fn(r, v, semantics=semantics):
            out = fastalign.gae(r, v, mask, 0.99, 0.95, convention=semantics)
            return {"advantages": out.advantages, "returns": out.returns, "weighted": []}

        _check_three_ways(report, "gae", semantics, lambda r, v, fn=fn: fn(r, v), [rewards, values])

    scores = torch.randn(B * 4, device=device)
    scores[3] = float("nan")
    for estimator, convention in (("grpo", "trl"), ("rloo", "trl"), ("grpo", "verl"), ("dr_grpo", "trl")):
        def fn_adv(s, estimator=estimator, convention=convention):
            return {"advantages": fastalign.group_advantages(s, group_size=4, estimator=estimator, convention=convention),
                    "weighted": []}

        _check_three_ways(report, "group_advantages", f"{estimator} {convention}", fn_adv, [scores])

    def fn_rpp(r):
        adv, ret = fastalign.reinforce_plus_plus_advantages(r, mask.float(), gamma=0.99)
        return {"advantages": adv, "returns": ret, "weighted": []}

    _check_three_ways(report, "reinforce_plus_plus_advantages", "gamma 0.99", fn_rpp, [rewards])

    baselines = torch.randn(B, device=device)

    def fn_remax(r, b):
        adv, ret = fastalign.advantages._remax(r, b, mask.float(), None, None)
        return {"advantages": adv, "returns": ret, "weighted": []}

    _check_three_ways(report, "remax_advantages", "token-level rewards", fn_remax, [rewards, baselines])


def kernel_registers(report: Report) -> None:
    """Registers, spills and shared memory of every Triton kernel variant compiled in this process,
    as the driver loaded it."""
    import importlib

    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return
    for module_name in ("logprobs", "policy", "linear_logprobs", "gae", "advantages"):
        module = importlib.import_module(f"fastalign.kernels.{module_name}")
        for name, fn in sorted(vars(module).items()):
            if not isinstance(fn, JITFunction) or not name.endswith("_kernel"):
                continue
            for caches in getattr(fn, "device_caches", {}).values():
                cache = caches[0] if isinstance(caches, tuple) else caches
                for compiled in cache.values():
                    try:
                        compiled._init_handles()
                    except Exception:
                        pass
                    meta = compiled.metadata
                    constants = getattr(compiled.src, "constants", {}) if hasattr(compiled, "src") else {}
                    variant = ",".join(f"{k}={v}" for k, v in sorted(
                        ((fn.arg_names[k[0]] if isinstance(k, tuple) else str(k)), v) for k, v in constants.items()
                        if isinstance(v, (bool, int)) and not isinstance(v, type(None)))) or "-"
                    report.kernels.append(dict(kernel=name, variant=variant[:120], num_warps=meta.num_warps,
                                               n_regs=getattr(compiled, "n_regs", None),
                                               n_spills=getattr(compiled, "n_spills", None), shared=meta.shared))
    spilled = [k for k in report.kernels if k["n_spills"]]
    report.check("kernels", "no compiled variant spills", not spilled,
                 f"{len(report.kernels)} variants" + (f"; spilling: {[k['kernel'] for k in spilled]}" if spilled else ""))


# --------------------------------------------------------------------------------------------
# (d) Anchor workloads


class _Timer:
    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn, reps: int) -> tuple[float, float | None]:
        """Median milliseconds over reps (after one warm-up), and the peak memory above the start in MiB."""
        import torch

        fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times), None


def _peers():
    """TRL's and Liger's entry points, where they import."""
    peers = {}
    try:
        from trl.kernels import selective_log_softmax_and_entropy

        peers["trl"] = selective_log_softmax_and_entropy
    except Exception:
        pass
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        peers["liger_ce"] = liger_cross_entropy
    except Exception:
        pass
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        peers["liger_grpo"] = LigerFusedLinearGRPOLoss
    except Exception:
        pass
    return peers


def anchor_workloads(report: Report, device: str, small: bool) -> None:
    import torch
    import torch.nn.functional as F

    import fastalign

    timer = _Timer(device)
    reps = 3 if small else 10
    N, V = (64, 1000) if small else (ANCHOR_ROWS, ANCHOR_VOCAB)
    logits = torch.randn(1, N, V, device=device).to(torch.bfloat16)
    labels = torch.randint(0, V, (1, N), device=device)
    nbytes = logits.numel() * logits.element_size()

    copy_dst = torch.empty_like(logits)
    copy_ms, _ = timer(lambda: copy_dst.copy_(logits), reps)
    copy_gbps = 2 * nbytes / copy_ms / 1e6
    del copy_dst
    report.timings.append(dict(workload=f"copy [{N}, {V}] bf16", impl="torch copy_", ms=copy_ms, gbps=copy_gbps, of_copy=1.0))

    def add(workload, impl, fn, moved_bytes=None, flops=None):
        try:
            ms, peak = timer(fn, reps)
        except Exception as exc:  # a peer that fails here is a note, not a failed check
            report.notes.append(f"{workload} / {impl}: {type(exc).__name__}: {str(exc)[:200]}")
            return
        gbps = None if moved_bytes is None else moved_bytes / ms / 1e6
        report.timings.append(dict(workload=workload, impl=impl, ms=ms, gbps=gbps,
                                   of_copy=None if gbps is None else gbps / copy_gbps,
                                   tflops=None if flops is None else flops / ms / 1e9, peak_mib=peak))

    peers = _peers()
    fwd = f"log-prob + entropy fwd [{N}, {V}] bf16"
    fwdbwd = f"log-prob + entropy fwd+bwd [{N}, {V}] bf16"

    def ours(backward: bool):
        x = logits.detach().requires_grad_(backward)
        with fastalign.use_backend("triton"):
            out = fastalign.token_logprobs(x, labels, outputs=("entropy",))
            if backward:
                (out.logps.sum() + out.entropy.sum()).backward()

    def eager(backward: bool):
        x = logits.detach().requires_grad_(backward)
        logp = F.log_softmax(x.float(), -1)
        lp = logp.gather(-1, labels[..., None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        if backward:
            (lp.sum() + ent.sum()).backward()

    add(fwd, "fastalign triton", lambda: ours(False), nbytes)
    add(fwd, "eager PyTorch", lambda: eager(False), nbytes)
    add(fwdbwd, "fastalign triton", lambda: ours(True), 3 * nbytes)
    add(fwdbwd, "eager PyTorch", lambda: eager(True), 3 * nbytes)
    if "trl" in peers:
        def trl(backward: bool):
            x = logits.detach().requires_grad_(backward)
            lp, ent = peers["trl"](x, labels)
            if backward:
                (lp.sum() + ent.sum()).backward()

        add(fwd, "TRL selective_log_softmax_and_entropy", lambda: trl(False), nbytes)
        add(fwdbwd, "TRL selective_log_softmax_and_entropy", lambda: trl(True), 3 * nbytes)
    if "liger_ce" in peers:
        def liger_ce():
            x = logits.detach().view(N, V).requires_grad_(True)
            peers["liger_ce"](x, labels.view(N)).backward()

        add(fwdbwd, "Liger cross-entropy (no entropy)", liger_ce, 3 * nbytes)

    mask = torch.ones(1, N, device=device)
    adv = torch.randn(1, device=device)
    old = torch.randn(1, N, device=device) * 0.1 - 5
    ref = torch.randn(1, N, device=device) * 0.1 - 5

    def grpo():
        x = logits.detach().requires_grad_(True)
        with fastalign.use_backend("triton"):
            out = fastalign.grpo_loss(x, labels, completion_mask=mask, advantages=adv, old_logps=old, ref_logps=ref,
                                      loss_type="dapo", beta=0.04, epsilon_high=0.28, num_items_in_batch=mask.sum())
            out.loss.backward()

    add(f"GRPO policy pass fwd+bwd [{N}, {V}] bf16", "fastalign triton", grpo, 2 * nbytes)
    del logits

    n, h, v = (32, 64, 256) if small else LINEAR_ANCHOR
    hidden = torch.randn(n, h, device=device).to(torch.bfloat16)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(torch.bfloat16)
    lin_labels = torch.randint(0, v, (n,), device=device)
    flops = 2 * n * h * v

    def linear(backward: bool, mode: str = "blocked"):
        from fastalign import _triton

        hh = hidden.detach().requires_grad_(backward)
        ww = weight.detach().requires_grad_(backward)
        saved, _triton.LINEAR_LOGPROBS_PASS = _triton.LINEAR_LOGPROBS_PASS, mode
        try:
            with fastalign.use_backend("triton"):
                out = fastalign.linear_token_logprobs(hh, ww, lin_labels, outputs=("entropy",))
                if backward:
                    (out.logps.sum() + out.entropy.sum()).backward()
        finally:
            _triton.LINEAR_LOGPROBS_PASS = saved

    def linear_eager(backward: bool):
        hh = hidden.detach().requires_grad_(backward)
        ww = weight.detach().requires_grad_(backward)
        logp = F.log_softmax((hh @ ww.t()).float(), -1)
        lp = logp.gather(-1, lin_labels[:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        if backward:
            (lp.sum() + ent.sum()).backward()

    lin = f"linear log-prob + entropy N={n} H={h} V={v} bf16"
    # "blocked" (the default: cuBLAS GEMMs per block of tokens) and "fused" (the matmul inside the
    # Triton kernels), FASTALIGN_LINEAR_LOGPROBS. TFLOP/s counts the 3 GEMMs of the unfused way (model FLOPs):
    # both fused ways recompute the logits in backward, a 4th.
    add(lin + " fwd", "fastalign triton", lambda: linear(False), flops=flops)
    add(lin + " fwd", "fastalign triton, fused kernels", lambda: linear(False, "fused"), flops=flops)
    add(lin + " fwd", "unfused eager", lambda: linear_eager(False), flops=flops)
    add(lin + " fwd+bwd", "fastalign triton", lambda: linear(True), flops=3 * flops)
    add(lin + " fwd+bwd", "fastalign triton, fused kernels", lambda: linear(True, "fused"), flops=3 * flops)
    add(lin + " fwd+bwd", "unfused eager", lambda: linear_eager(True), flops=3 * flops)
    lin_mask = torch.ones(1, n, device=device)
    lin_adv = torch.randn(1, device=device)

    def linear_grpo():
        hh = hidden.detach()[None].requires_grad_(True)
        ww = weight.detach().requires_grad_(True)
        with fastalign.use_backend("triton"):
            out = fastalign.grpo_loss(hidden=hh, weight=ww, labels=lin_labels[None], completion_mask=lin_mask,
                                      advantages=lin_adv, loss_type="dapo", num_items_in_batch=lin_mask.sum())
            out.loss.backward()

    add(lin.replace("log-prob + entropy", "GRPO") + " fwd+bwd", "fastalign triton", linear_grpo, flops=3 * flops)
    if "liger_grpo" in peers:
        loss_fn = peers["liger_grpo"](beta=0.0, loss_type="dapo", use_ref_model=False, compiled=False)

        def liger_grpo():
            hh = hidden.detach()[None].requires_grad_(True)
            ww = weight.detach().requires_grad_(True)
            loss = loss_fn(hh, ww, lin_labels[None], lin_mask, lin_adv)
            (loss[0] if isinstance(loss, tuple) else loss).backward()

        add(lin.replace("log-prob + entropy", "GRPO") + " fwd+bwd", "Liger LigerFusedLinearGRPOLoss", liger_grpo,
            flops=3 * flops)
    if not peers:
        report.notes.append("TRL and Liger did not import: their rows are missing (bring their wheels along to add them).")


# --------------------------------------------------------------------------------------------
# (c) The test suite on the device


# The suite on a GPU machine, in shards run side by side (its 16 CPUs otherwise idle while one
# pytest process waits on small kernels): sequentially it outlasted the run's budget.
TEST_SHARDS = (
    ("ops", ["tests/ops"]),
    ("losses", ["tests/losses"]),
    ("integrations", ["tests/integrations"]),
)
# Multi-process, example and compile-gate tests need CPUs and TRL, not the GPU; tests/project
# (packaging, README, bench harness) checks the CPU install, which this run does not make.
TEST_IGNORES = ("--ignore=tests/integrations/test_trl_distributed.py", "--ignore=tests/integrations/test_linear_fsdp.py",
                "--ignore=tests/ops/test_triton_compile.py", "--ignore=tests/ops/test_gpu_check.py")


def _pytest_summary(output: str) -> dict[str, int]:
    """{"passed": n, "failed": n, ...} from pytest's last summary line."""
    lines = [line for line in output.splitlines()
             if re.search(r"\b(passed|failed|errors?|skipped|deselected|xfailed)\b.* in [\d.]+s", line)]
    if not lines:
        return {}
    return {word.rstrip("s") if word.startswith("error") else word: int(n)
            for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", lines[-1])}


def test_suite(report: Report, seconds: float, dry_run: bool) -> None:
    if dry_run:
        # The suite is what `make test` already runs; here only the call and the parsing are tried.
        shards = (("backend", ["tests/ops/test_backend.py::test_default_is_auto",
                               "tests/ops/test_backend.py::test_environment_then_context_manager"]),)
    else:
        shards = TEST_SHARDS
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if not dry_run:
        env.pop("TRITON_INTERPRET", None)
    started = time.perf_counter()
    procs = []
    for name, selection in shards:
        command = [sys.executable, "-m", "pytest", *selection, *TEST_IGNORES, "-q", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors", "-rfE", "--tb=short"]
        log = open(report.path_md.parent / f"gpu-check-tests-{name}.log", "w")
        procs.append((name, command, log, subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                                           stderr=subprocess.STDOUT, text=True)))
    totals: dict[str, int] = {}
    failures, timed_out, all_ok = [], [], True
    for name, command, log, proc in procs:
        try:
            code = proc.wait(timeout=max(seconds - (time.perf_counter() - started), 10))
        except subprocess.TimeoutExpired:
            # SIGINT: pytest stops and still prints its summary and the failures so far.
            proc.send_signal(2)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            code, timed_out = None, timed_out + [name]
        log.close()
        output = Path(log.name).read_text()
        for key, n in _pytest_summary(output).items():
            totals[key] = totals.get(key, 0) + n
        failures += [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
        all_ok = all_ok and code == 0
    summary = ", ".join(f"{n} {key}" for key, n in totals.items()) or "(no summary line)"
    report.tests = {"command": "pytest " + " | ".join(" ".join(sel) for _, sel in shards) + " (side by side)",
                    "seconds": round(time.perf_counter() - started, 1), "summary": summary,
                    "timed out": timed_out, "failures": failures[:60]}
    report.check("tests", "test suite on the device", all_ok and not timed_out,
                 summary + (f" (timed out: {', '.join(timed_out)})" if timed_out else ""))


# --------------------------------------------------------------------------------------------


STEPS = (
    ("token_logprobs", check_token_logprobs),
    ("policy", check_policy),
    ("linear", check_linear),
    ("advantages", check_advantages),
    ("2^31", check_large_tensor),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--out", type=Path, help="folder for the report (default bench/results, build/gpu-check for a dry run)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run")
    parser.add_argument("--skip", nargs="*", default=[], help="steps to leave out: checks, timings, tests")
    args = parser.parse_args(argv)

    _import_fastalign(args.dry_run)
    import torch

    from naming import cuda_slug  # bench/naming.py

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device visible: run with --dry-run to exercise the script on CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    name = "dry-run" if args.dry_run else cuda_slug(torch.cuda.get_device_name(0))
    out = args.out or (REPO / "build" / "gpu-check" if args.dry_run else REPO / "bench" / "results")
    report = Report(out / f"{name}.md", out / f"{name}.json")
    environment(report, device)
    report.write()
    torch.manual_seed(0)

    if "checks" not in args.skip:
        for label, step in STEPS:
            try:
                step(report, device, args.dry_run)
            except Exception as exc:
                report.check(label, "step ran to the end", False, f"{type(exc).__name__}: {str(exc)[:300]}")
                traceback.print_exc()
            if device == "cuda":
                torch.cuda.empty_cache()
            report.write()
        kernel_registers(report)
        report.write()
    if "timings" not in args.skip:
        try:
            anchor_workloads(report, device, args.dry_run)
        except Exception as exc:
            report.check("timings", "anchor workloads ran", False, f"{type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc()
        if device == "cuda":
            torch.cuda.empty_cache()
        report.write()
    if "tests" not in args.skip:
        test_suite(report, args.budget - report.elapsed() - 15, args.dry_run)
    report.write()
    print(f"report: {report.path_md} ({len(report.checks)} checks, {len(report.failed)} failed, {report.elapsed():.0f} s)")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
