"""Ahead-of-time compile gate for the Triton kernels in kernels/logprobs.py, kernels/policy.py,
kernels/gae.py, kernels/advantages.py and kernels/linear_logprobs.py.

The launchers are called over their whole input space (every logits dtype, softcap on and off,
contiguous and strided vocabulary, every combination of optional outputs and of gradients) with
the kernels swapped for recorders, and each recorded launch is turned into the exact
(signature, constexprs, attributes, options) that Triton's JIT would compile for it on a GPU.
Each distinct one is compiled for sm_80 and sm_90; ``cuobjdump --dump-resource-usage`` then
reports REG, STACK, SHARED and LOCAL per cubin. The gate fails if a kernel does not compile,
spills, or computes a logits address with 32-bit arithmetic (checked on the TTIR, together with a
deliberately 32-bit control kernel that the check must reject).

Spills count as LOCAL > 0 *or* STACK > 0: register spills land in the stack frame, and
cuobjdump reports them under STACK with LOCAL still 0 (a kernel that ``ptxas -v`` reports with
"32 bytes spill stores" shows STACK:32 LOCAL:0). Triton kernels make no calls and keep no local
arrays, so any stack frame is a spill.

Run it as a script with TRITON_INTERPRET unset (``triton.compile`` needs real JIT functions):

    python tests/triton_compile_gate.py [--arch 80 90] [--jobs 2] [--offsets-only] [--verbose]

Exit status 0 when everything passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import importlib.machinery
import importlib.util
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNELS_FILE = REPO / "kernels" / "logprobs.py"
POLICY_KERNELS_FILE = REPO / "kernels" / "policy.py"
GAE_KERNELS_FILE = REPO / "kernels" / "gae.py"
ADVANTAGES_KERNELS_FILE = REPO / "kernels" / "advantages.py"
LINEAR_KERNELS_FILE = REPO / "kernels" / "linear_logprobs.py"
DTYPES = ("float32", "bfloat16", "float16")
# Pointer arguments that address [B, T, V]-sized tensors: their offsets must be 64-bit.
LARGE_POINTERS = ("logits_ptr", "grad_logits_ptr")
STRIDES = ("stride_b", "stride_t", "stride_v")
# The same for kernels/gae.py, whose [B, T] rows pass 2^31 elements at real batch x length sizes.
GAE_LARGE_POINTERS = ("rewards_ptr", "values_ptr", "mask_ptr", "adv_ptr", "ret_ptr")
GAE_STRIDES = ("stride_rb", "stride_rt", "stride_vb", "stride_vt", "stride_mb", "stride_mt")

# Filled in before the worker pool forks, so workers find launches and kernels by index.
_JOBS: list[dict] = []


def _folder_package(folder: Path) -> str:
    """A package made of ``folder`` alone (its __init__ is not run), one per folder: a kernels file
    loaded into it resolves its relative imports (kernels/policy.py's ``from .logprobs import``)
    to the files beside it rather than to an installed fastalign.kernels."""
    name = f"_gate_kernels_{hashlib.sha1(str(folder).encode()).hexdigest()[:12]}"
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        sys.modules[name] = importlib.util.module_from_spec(spec)
    return name


def load_kernels_module(path: Path = KERNELS_FILE):
    """Import a kernels file (kernels/logprobs.py, ...) from this checkout or another copy,
    whatever is installed."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: triton.compile cannot take interpreted kernels")
    path = Path(path).resolve()
    name = f"{_folder_package(path.parent)}.{path.stem}"
    if name in sys.modules:  # already imported by a sibling's relative import
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def kernel_names(module) -> list[str]:
    from triton.runtime.jit import JITFunction

    return sorted(n for n, v in vars(module).items() if isinstance(v, JITFunction) and n.endswith("_kernel"))


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self):
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((args, kwargs))

        return launch


def _launcher_calls(module):
    """Call the launchers on CPU tensors over every option they take (the recorders stand in for
    the kernels, so nothing runs).

    Two vocabulary layouts: contiguous, and every other entry of a wider row (stride(-1) == 2).
    V = 48 keeps the pointers and the non-vocabulary strides 16-aligned, as real shapes are, so
    the recorded specializations are the ones a real launch gets.
    """
    import torch

    B, T, V = 2, 3, 48
    for dtype_name, softcap, strided in itertools.product(DTYPES, (0.0, 30.0), (False, True)):
        dtype = getattr(torch, dtype_name)
        logits = torch.zeros(B, T, 2 * V, dtype=dtype)[..., ::2] if strided else torch.zeros(B, T, V, dtype=dtype)
        labels = torch.zeros(B * T, dtype=torch.int64)
        common = dict(temperature=0.7, logit_scale=0.5 if softcap else 1.0, softcap=softcap, ignore_index=-100)
        for flags in itertools.product((False, True), repeat=4):
            module.token_logprobs_forward(logits, labels, **common, with_entropy=flags[0],
                                          with_log_sum_sq_probs=flags[1], with_mean_logits=flags[2],
                                          with_is_top1=flags[3])
        lse = torch.zeros(B * T)
        for with_logps, with_entropy in itertools.product((False, True), repeat=2):
            module.token_logprobs_backward(torch.ones(B * T) if with_logps else None,
                                           torch.ones(B * T) if with_entropy else None,
                                           logits, labels, lse, torch.zeros(B * T), **common)


def _policy_launcher_calls(module):
    """kernels/policy.py's launcher with a gradient, over every input kind: each logits dtype,
    softcap on and off, contiguous and strided vocabulary, every surrogate and KL estimator, old
    log-probs and an entropy gradient given or not (the surrogate and the estimator are runtime
    arguments and dedupe to the same compilations; should they become constexprs, each gets its
    own). Without a gradient the launcher runs the log-prob forward kernel, whose launches
    _launcher_calls covers (with_entropy=True)."""
    import torch

    B, T, V = 2, 3, 48
    N = B * T
    vector, empty = torch.zeros(N), torch.empty(0)
    params = [0.8, 1.2, 3.0, 3.0, 5.0, 1.0, 1.05, 0.0, 1.0]
    for dtype_name, softcap, strided in itertools.product(DTYPES, (0.0, 30.0), (False, True)):
        dtype = getattr(torch, dtype_name)
        logits = torch.zeros(B, T, 2 * V, dtype=dtype)[..., ::2] if strided else torch.zeros(B, T, V, dtype=dtype)
        labels = torch.zeros(N, dtype=torch.int64)
        for surrogate_id, kl_id, has_old, has_grad_entropy in itertools.product(
            range(3), range(6), (False, True), (False, True)
        ):
            module.policy_token_forward(
                logits, labels, vector if has_old else empty, vector if kl_id else empty, vector, vector,
                vector if kl_id else empty, vector if has_grad_entropy else empty,
                0.7, 0.5 if softcap else 1.0, softcap, -100, surrogate_id, kl_id, params, True,
            )


def _gae_launcher_calls(module):
    """kernels/gae.py's launcher over every input kind: each rewards/values dtype, no mask or a
    bool or int64 mask, both recurrences (verl, trl), with and without whitening, unbiased or not."""
    import torch

    B, T = 2, 48
    for dtype_name, mask_dtype, trl, whiten in itertools.product(
        DTYPES, (None, torch.bool, torch.int64), (False, True), (False, True)
    ):
        dtype = getattr(torch, dtype_name)
        mask = None if mask_dtype is None else torch.ones(B, T, dtype=mask_dtype)
        for unbiased in ((False, True) if whiten else (True,)):
            module.gae_forward(torch.zeros(B, T, dtype=dtype), torch.zeros(B, T, dtype=dtype), mask, 0.99, 0.95,
                               trl, whiten, True, unbiased)


# kernels/advantages.py: the [B] rewards (read through the sort permutation) and the [B, T] token arrays.
ADVANTAGES_LARGE_POINTERS = ("x_ptr", "order_ptr", "out_ptr", "r_ptr", "m_ptr")


def _advantages_launcher_calls(module):
    """kernels/advantages.py's launchers: every flag combination of the group kernel for small and
    large contiguous groups and for ragged segments, and the returns kernel. N = 64 keeps the
    pointers 16-aligned, as real batches are."""
    import torch

    n = 64
    values, order, offsets = torch.zeros(n), torch.arange(n), torch.tensor([0, 5, n])
    empty = torch.empty(0, dtype=torch.int64)
    for rloo, scale, verl, nan_to_zero in itertools.product((False, True), (0, 1, 2), (False, True), (False, True)):
        for layout in ((empty, empty, 16), (empty, empty, n), (order, offsets, 0)):
            module.group_advantages_forward(values, *layout, rloo, scale, torch.ones(1), 1e-4, verl, nan_to_zero)
    module.discounted_returns(torch.zeros(4, 48), torch.ones(4, 48), 0.99)


# kernels/linear_logprobs.py: hidden [N, H] and weight [V, H] (V * H passes 2^31 for a 150k x 16k
# head) and the fp32 gradient buffers of the same shapes.
LINEAR_LARGE_POINTERS = ("hidden_ptr", "weight_ptr", "grad_hidden_ptr", "grad_weight_ptr")
LINEAR_STRIDES = ("stride_hn", "stride_hk", "stride_wv", "stride_wk")


def _linear_launcher_calls(module):
    """kernels/linear_logprobs.py's launchers over every input kind: each dtype, softcap on and off,
    bias (in the weight's dtype) or none, a contiguous weight and a transposed view of a [H, V]
    tensor (stride(0) == 1), every combination of optional outputs and of gradients (the bias,
    the optional outputs and the gradients are runtime flags and dedupe to the same compilations;
    should they become constexprs, each gets its own). H = 48 (not a multiple of the K block) and
    V = 64 keep the pointers and strides 16-aligned, as real shapes are."""
    import torch

    N, H, V = 6, 48, 64
    labels = torch.zeros(N, dtype=torch.int64)
    for dtype_name, softcap, has_bias, transposed in itertools.product(
        DTYPES, (0.0, 30.0), (False, True), (False, True)
    ):
        dtype = getattr(torch, dtype_name)
        hidden = torch.zeros(N, H, dtype=dtype)
        weight = torch.zeros(H, V, dtype=dtype).t() if transposed else torch.zeros(V, H, dtype=dtype)
        bias = torch.zeros(V, dtype=dtype) if has_bias else torch.empty(0, dtype=dtype)
        common = dict(temperature=0.7, logit_scale=0.5 if softcap else 1.0, softcap=softcap, ignore_index=-100)
        for flags in itertools.product((False, True), repeat=4):
            module.linear_token_logprobs_forward(hidden, weight, bias, labels, **common, with_entropy=flags[0],
                                                 with_log_sum_sq_probs=flags[1], with_mean_logits=flags[2],
                                                 with_is_top1=flags[3])
        lse = torch.zeros(N)
        for with_logps, with_entropy in itertools.product((False, True), repeat=2):
            if with_logps or with_entropy:
                module.linear_token_logprobs_backward(torch.ones(N) if with_logps else None,
                                                      torch.ones(N) if with_entropy else None,
                                                      hidden, weight, bias, labels, lse, torch.zeros(N), **common)


# Which launcher calls and which offset rules go with a kernels file, by its name.
LAUNCHERS = {
    "logprobs": _launcher_calls,
    "policy": _policy_launcher_calls,
    "gae": _gae_launcher_calls,
    "advantages": _advantages_launcher_calls,
    "linear_logprobs": _linear_launcher_calls,
}
OFFSET_RULES = {
    "logprobs": (LARGE_POINTERS, STRIDES),
    "policy": (LARGE_POINTERS, STRIDES),
    "gae": (GAE_LARGE_POINTERS, GAE_STRIDES),
    "advantages": (ADVANTAGES_LARGE_POINTERS, ()),
    "linear_logprobs": (LINEAR_LARGE_POINTERS, LINEAR_STRIDES),
}


def _stem(module) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def record_launches(module) -> dict[str, list[tuple[tuple, dict]]]:
    names = kernel_names(module)
    originals = {n: getattr(module, n) for n in names}
    recorders = {n: _Recorder() for n in names}
    try:
        for n in names:
            setattr(module, n, recorders[n])
        LAUNCHERS[_stem(module)](module)
    finally:
        for n, fn in originals.items():
            setattr(module, n, fn)
    return {n: r.launches for n, r in recorders.items()}


def compile_spec(kernel, args, kwargs, arch: int):
    """What Triton's JIT would hand to ``triton.compile`` for this launch on an sm_<arch> GPU.

    Uses the JIT's own argument binder and ``_pack_args`` (internal Triton APIs, as of 3.8/3.9), so
    types, constexprs, the int-1 and divisible-by-16 specializations and the options (num_warps,
    enable_fp_fusion, ...) are exactly those of a real launch rather than a hand-kept copy.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return target, options, signature, constexprs, attrs


def check_64bit_offsets(ttir: str, large_pointers=LARGE_POINTERS, strides=STRIDES) -> list[str]:
    """Problems with address arithmetic in a kernel's TTIR; empty when every offset into a large
    tensor is 64-bit.

    Two rules: (1) every ``tt.addptr`` on a large pointer argument, directly or on its splat, adds
    an i64 offset; (2) every use of a 32-bit stride argument is a sign extension to i64 (a stride
    multiplied in i32 overflows once row * stride passes 2^31).
    """
    problems = []
    header = re.search(r"tt\.func public @\w+\((.*?)\) attributes", ttir, re.S)
    if header is None:
        return ["no kernel signature found in the TTIR"]
    arg_types = dict(re.findall(r"%(\w+): (\S+)", header.group(1)))
    present = [p for p in large_pointers if p in arg_types]
    if not present:
        return [f"none of {large_pointers} is an argument"]
    uses = 0
    for ptr in present:
        bases = {ptr} | set(re.findall(rf"%([\w.]+) = tt\.splat %{ptr}\b", ttir))
        for base in bases:
            for offset_type in re.findall(rf"tt\.addptr %{re.escape(base)}, %[\w.]+ : [^,]+, ([^\s]+)", ttir):
                uses += 1
                if not re.fullmatch(r"i64|tensor<[\dx]+xi64>", offset_type):
                    problems.append(f"%{ptr} + offset of type {offset_type}")
    if uses == 0:
        problems.append(f"no tt.addptr on {present}: the check would be vacuous")
    for stride in strides:
        if arg_types.get(stride) != "i32":
            continue
        for line in re.findall(rf"^.*%{stride}\b(?!\().*$", ttir, re.M):
            if "tt.func" in line:
                continue
            if not re.search(rf"arith\.extsi %{stride} : i32 to i64", line):
                problems.append(f"32-bit use of %{stride}: {line.strip()[:120]}")
    return problems


def _control_kernel():
    """A kernel whose row offset is computed in 32 bits: the offset check must reject it."""
    import triton
    import triton.language as tl

    @triton.jit
    def _row_offset_in_32_bits(logits_ptr, out_ptr, stride_t, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        tl.store(out_ptr + cols, tl.load(logits_ptr + row * stride_t + cols))

    return _row_offset_in_32_bits


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if not {"REG", "SHARED", "LOCAL"} <= usage.keys():
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    return {k: int(v) for k, v in usage.items()}


def _run_job(index: int) -> dict:
    import triton
    from triton.compiler import ASTSource

    job = _JOBS[index]
    result = {k: job[k] for k in ("kernel", "arch", "dtype", "flags", "num_warps")}
    start = time.perf_counter()
    try:
        spec = job["spec"]
        target, options, signature, constexprs, attrs = spec
        compiled = triton.compile(ASTSource(job["fn"], signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        result.update(_resource_usage(compiled.asm["cubin"]))
        result["dynamic_shared"] = compiled.metadata.shared
        result["offset_problems"] = check_64bit_offsets(compiled.asm["ttir"], *job["offset_rules"])
    except Exception as e:  # reported per kernel; the gate fails on it
        result["error"] = f"{type(e).__name__}: {e}"
    result["seconds"] = time.perf_counter() - start
    return result


def _describe(kernel, constexprs: dict) -> str:
    """The constexprs of a variant, e.g. ``SOFTCAP,WITH_ENTROPY,BLOCK=4096`` (False flags left out)."""
    flags = []
    for path, value in sorted(constexprs.items()):
        name = kernel.arg_names[path[0]]
        if isinstance(value, bool):
            if value:
                flags.append(name)
        else:
            flags.append(f"{name}={value}")
    return ",".join(flags) or "-"


def build_jobs(module, arches) -> tuple[list[dict], list[str]]:
    """One compile job per distinct (kernel, arch, specialization, options), and any problems with
    the enumeration itself."""
    launches = record_launches(module)
    jobs = []
    problems = []
    for name, recorded in launches.items():
        kernel = getattr(module, name)
        if not recorded:
            problems.append(f"{name}: never launched by the enumerated launcher calls")
            continue
        # Every boolean constexpr must be seen both ways, or the enumeration is missing an input.
        seen = collections.defaultdict(set)
        for args, kwargs in recorded:
            for k, v in kwargs.items():
                if isinstance(v, bool) and k in kernel.arg_names:
                    seen[k].add(v)
        for p in kernel.params:
            if p.is_constexpr and len(seen.get(p.name, ())) == 1:
                problems.append(f"{name}: constexpr {p.name} is only ever {seen[p.name]} in the launches")
        for arch in arches:
            distinct = {}
            for args, kwargs in recorded:
                spec = compile_spec(kernel, args, kwargs, arch)
                target, options, signature, constexprs, attrs = spec
                key = (repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                       repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
                if key in distinct:
                    continue
                # The dtype of the first pointer argument: the logits, or the rewards.
                dtype = next(t for t in signature.values() if isinstance(t, str) and t.startswith("*")).lstrip("*")
                distinct[key] = dict(kernel=name, fn=kernel, arch=arch, dtype=dtype, flags=_describe(kernel, constexprs),
                                     num_warps=options.num_warps, spec=spec, offset_rules=OFFSET_RULES[_stem(module)])
            jobs.extend(distinct.values())
    return jobs, problems


def _pool(jobs_count: int):
    methods = multiprocessing.get_all_start_methods()
    # fork: workers inherit the imported kernels and the job list instead of re-importing torch.
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    return concurrent.futures.ProcessPoolExecutor(max_workers=jobs_count, mp_context=context)


def check_offsets_only(modules, arch: int = 90) -> list[str]:
    """Compile one launch per kernel plus the 32-bit control; return the problems found."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    problems = []
    launches = [(module, name, recorded) for module in modules for name, recorded in record_launches(module).items()]
    for module, name, recorded in launches:
        kernel = getattr(module, name)
        for args, kwargs in recorded[:1] + recorded[-1:]:
            target, options, signature, constexprs, attrs = compile_spec(kernel, args, kwargs, arch)
            ttir = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__).asm["ttir"]
            found = check_64bit_offsets(ttir, *OFFSET_RULES[_stem(module)])
            problems += [f"{name}: {p}" for p in found]
            print(f"{name} [{_describe(kernel, constexprs)}]: "
                  + ("64-bit offsets" if not found else f"{len(found)} problem(s)"))
    control = _control_kernel()
    ttir = triton.compile(
        ASTSource(control, {"logits_ptr": "*bf16", "out_ptr": "*bf16", "stride_t": "i32", "BLOCK": "constexpr"},
                  {"BLOCK": 128}),
        target=GPUTarget("cuda", arch, 32)).asm["ttir"]
    found = check_64bit_offsets(ttir)
    print(f"control kernel with a 32-bit row offset: {'rejected' if found else 'NOT rejected'}"
          + "".join(f"\n    {p}" for p in found))
    if not found:
        problems.append("the offset check accepted the 32-bit control kernel")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--offsets-only", action="store_true",
                        help="only check 64-bit address arithmetic (one launch per kernel and the control)")
    parser.add_argument("--verbose", action="store_true", help="one line per compiled variant")
    parser.add_argument("--kernels", type=Path, nargs="+",
                        default=[KERNELS_FILE, POLICY_KERNELS_FILE, GAE_KERNELS_FILE, ADVANTAGES_KERNELS_FILE,
                                 LINEAR_KERNELS_FILE],
                        help="the kernels files to check (named logprobs.py, policy.py, gae.py, advantages.py "
                             "or linear_logprobs.py)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    modules = [load_kernels_module(path) for path in args.kernels]

    if args.offsets_only:
        problems = check_offsets_only(modules, args.arch[-1])
        for p in problems:
            print("FAIL", p)
        return 1 if problems else 0

    jobs, problems = [], []
    for module in modules:
        module_jobs, module_problems = build_jobs(module, args.arch)
        jobs += module_jobs
        problems += module_problems
    _JOBS[:] = jobs
    print(f"{len(jobs)} compilations ({', '.join(f'sm_{a}' for a in args.arch)}) on {args.jobs} processes")
    with _pool(args.jobs) as pool:
        results = list(pool.map(_run_job, range(len(jobs)), chunksize=4))

    failures = []
    groups = collections.defaultdict(list)
    for r in results:
        where = f"{r['kernel']} sm_{r['arch']} {r['dtype']} [{r['flags']}]"
        if "error" in r:
            failures.append(f"{where}: compile failed: {r['error']}")
            continue
        if r["LOCAL"] > 0 or r.get("STACK", 0) > 0:
            failures.append(f"{where}: spills, LOCAL={r['LOCAL']} STACK={r.get('STACK', 0)} REG={r['REG']}")
        for p in r["offset_problems"]:
            failures.append(f"{where}: {p}")
        groups[(r["kernel"], r["arch"], r["dtype"], r["num_warps"])].append(r)
        if args.verbose:
            print(f"  {where}: REG={r['REG']} SHARED={r['SHARED']}+{r['dynamic_shared']} "
                  f"LOCAL={r['LOCAL']} STACK={r.get('STACK', 0)} ({r['seconds']:.2f}s)")

    print(f"{'kernel':<28} {'arch':<6} {'dtype':<6} {'warps':>5} {'variants':>8} {'REG':>9} "
          f"{'SHARED(static+dyn)':>19} {'LOCAL':>5} {'STACK':>5}")
    for (kernel, arch, dtype, warps), rs in sorted(groups.items()):
        regs = [r["REG"] for r in rs]
        shared = max(r["SHARED"] + r["dynamic_shared"] for r in rs)
        print(f"{kernel:<28} sm_{arch:<3} {dtype:<6} {warps:>5} {len(rs):>8} {min(regs):>4}-{max(regs):<4} "
              f"{'max ' + str(shared):>19} {max(r['LOCAL'] for r in rs):>5} {max(r.get('STACK', 0) for r in rs):>5}")
    compile_seconds = sum(r["seconds"] for r in results)
    print(f"compiled {len(results)} variants in {time.perf_counter() - started:.1f}s wall "
          f"({compile_seconds:.1f}s of compilation)")

    failures = problems + failures
    if failures:
        print(f"FAIL: {len(failures)} problem(s)")
        for f in failures:
            print("  " + f)
        return 1
    print("OK: every kernel compiles for every launch configuration, no spills, 64-bit offsets")
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
