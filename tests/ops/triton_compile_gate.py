"""Ahead-of-time compile gate for the Triton kernels in kernels/logprobs.py, kernels/policy.py,
kernels/gae.py, kernels/advantages.py and kernels/linear_logprobs.py.

The launchers are called over their whole input space (every logits dtype, softcap on and off,
the vocabulary sizes users run, contiguous, sliced and strided vocabulary, every combination of
optional outputs and of gradients) with the kernels swapped for recorders, and each recorded
launch is turned into the exact (signature, constexprs, attributes, options) that Triton's JIT
would compile for it on a GPU. Each distinct one is compiled for every target of ALL_TARGETS:
NVIDIA sm_80, sm_90, sm_100, sm_120 (``cuobjdump --dump-resource-usage`` reports REG, STACK,
SHARED and LOCAL per cubin) and AMD gfx942, gfx90a (the AMDGPU metadata gives VGPRs, LDS, scratch
and spill counts). The gate fails if a kernel does not compile, spills, or computes a logits
address with 32-bit arithmetic (checked on the TTIR, together with a deliberately 32-bit control
kernel that the check must reject).

Spills count as LOCAL > 0 *or* STACK > 0: register spills land in the stack frame, and
cuobjdump reports them under STACK with LOCAL still 0 (a kernel that ``ptxas -v`` reports with
"32 bytes spill stores" shows STACK:32 LOCAL:0). Triton kernels make no calls and keep no local
arrays, so any stack frame is a spill. On AMD, scratch memory or a VGPR/SGPR spill count.

Run it as a script with TRITON_INTERPRET unset (``triton.compile`` needs real JIT functions):

    python tests/ops/triton_compile_gate.py [--targets sm_80 sm_90 sm_100 sm_120 gfx942 gfx90a] [--quick]
                                        [--jobs N] [--offsets-only] [--verbose]

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

REPO = Path(__file__).resolve().parents[2]
KERNELS_FILE = REPO / "kernels" / "logprobs.py"
POLICY_KERNELS_FILE = REPO / "kernels" / "policy.py"
GAE_KERNELS_FILE = REPO / "kernels" / "gae.py"
ADVANTAGES_KERNELS_FILE = REPO / "kernels" / "advantages.py"
LINEAR_KERNELS_FILE = REPO / "kernels" / "linear_logprobs.py"
DIVERGENCE_KERNELS_FILE = REPO / "kernels" / "divergence.py"
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


# The vocabularies users run, as (label, V, row width). Triton specializes a launch on whether V
# and the row strides are multiples of 16, so these fall into distinct compilations: multiples of
# 16 (Llama 2's 32000, Llama 3's 128256, Qwen2's 151936, Gemma 3's 262144), an odd vocabulary
# (GPT-2's 50257), and a vocabulary sliced out of a padded row (Qwen2.5's 151665 tokens of a
# 151936-wide head), whose row stride is aligned while V is not.
VOCABS = (
    ("32000", 32000, 32000),
    ("50257", 50257, 50257),
    ("128256", 128256, 128256),
    ("151936", 151936, 151936),
    ("151665/151936", 151665, 151936),
    ("262144", 262144, 262144),
)
# The vocabulary the launcher calls are being made for (None for kernels without one).
_current_vocab: str | None = None


def _vocab_logits(dtype, vocab, strided, B=2, T=3):
    """[B, T, V] logits of a vocabulary from VOCABS: contiguous rows (or V entries of a wider row),
    or with strided=True every other entry of a row twice as wide."""
    import torch

    global _current_vocab
    label, V, width = vocab
    _current_vocab = label
    if strided:
        return torch.empty(B, T, 2 * V, dtype=dtype)[..., ::2]
    return torch.empty(B, T, width, dtype=dtype)[..., :V]


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self):
        self.launches: list[tuple[tuple, dict, str | None]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((_light(args), {k: _light(v) for k, v in kwargs.items()}, _current_vocab))

        return launch


_STAND_INS: dict = {}


def _light(value):
    """A launch argument as the compiler sees it: a tensor only through its dtype and the alignment
    of its address, so a small aligned tensor of the same dtype stands in (thousands of recorded
    launches must not keep their vocabulary-sized tensors alive)."""
    import torch

    if isinstance(value, tuple):
        return tuple(_light(v) for v in value)
    if isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0:
        if value.dtype not in _STAND_INS:
            _STAND_INS[value.dtype] = torch.empty(16, dtype=value.dtype)
        return _STAND_INS[value.dtype]
    return value


def _launcher_calls(module):
    """Call the launchers on CPU tensors over every option they take (the recorders stand in for
    the kernels, so nothing runs).

    Every vocabulary of VOCABS, in two layouts: as it comes (contiguous rows, or a slice of a
    padded row), and every other entry of a wider row (stride(-1) == 2).
    """
    import torch

    B, T = 2, 3
    for dtype_name, softcap, strided, vocab in itertools.product(DTYPES, (0.0, 30.0), (False, True), VOCABS):
        dtype = getattr(torch, dtype_name)
        logits = _vocab_logits(dtype, vocab, strided, B, T)
        labels = torch.zeros(B * T, dtype=torch.int64)
        common = dict(temperature=0.7, logit_scale=0.5 if softcap else 1.0, softcap=softcap, ignore_index=-100)
        for flags in itertools.product((False, True), repeat=4):
            module.token_logprobs_forward(logits, labels, **common, with_entropy=flags[0],
                                          with_log_sum_sq_probs=flags[1], with_mean_logits=flags[2],
                                          with_is_top1=flags[3])
        norm = torch.zeros(B * T, 2)
        for with_logps, with_entropy in itertools.product((False, True), repeat=2):
            module.token_logprobs_backward(torch.ones(B * T) if with_logps else None,
                                           torch.ones(B * T) if with_entropy else None,
                                           logits, labels, norm, torch.zeros(B * T), **common)


def _policy_launcher_calls(module):
    """kernels/policy.py's launcher with a gradient, over every input kind: each logits dtype,
    softcap on and off, contiguous and strided vocabulary, every surrogate and KL estimator, old
    log-probs and an entropy gradient given or not (the surrogate and the estimator are runtime
    arguments and dedupe to the same compilations; should they become constexprs, each gets its
    own). Without a gradient the launcher runs the log-prob forward kernel, whose launches
    _launcher_calls covers (with_entropy=True)."""
    import torch

    B, T = 2, 3
    N = B * T
    vector, empty = torch.zeros(N), torch.empty(0)
    params = [0.8, 1.2, 3.0, 3.0, 5.0, 1.0, 1.05, 0.0, 1.0]
    for dtype_name, softcap, strided, vocab in itertools.product(DTYPES, (0.0, 30.0), (False, True), VOCABS):
        dtype = getattr(torch, dtype_name)
        logits = _vocab_logits(dtype, vocab, strided, B, T)
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

    global _current_vocab
    _current_vocab = None
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

    global _current_vocab
    _current_vocab = None
    n = 64
    values, order, offsets = torch.zeros(n), torch.arange(n), torch.tensor([0, 5, n])
    empty = torch.empty(0, dtype=torch.int64)
    for rloo, scale, verl, nan_to_zero in itertools.product((False, True), (0, 1, 2), (False, True), (False, True)):
        for layout in ((empty, empty, 16), (empty, empty, n), (order, offsets, 0)):
            module.group_advantages_forward(values, *layout, rloo, scale, torch.ones(1), 1e-4, verl, nan_to_zero)
    module.discounted_returns(torch.zeros(4, 48), torch.ones(4, 48), 0.99)
    module.remax_advantages_forward(torch.zeros(4, 48), torch.ones(4, 48), torch.zeros(4))


# kernels/linear_logprobs.py: hidden [N, H] and weight [V, H] (V * H passes 2^31 for a 150k x 16k
# head) and the fp32 gradient buffers of the same shapes.
LINEAR_LARGE_POINTERS = ("hidden_ptr", "weight_ptr", "grad_hidden_ptr", "grad_weight_ptr")
LINEAR_STRIDES = ("stride_hn", "stride_hk", "stride_wv", "stride_wk")


def _linear_launcher_calls(module):
    """kernels/linear_logprobs.py's launchers over every input kind: each dtype, softcap on and off,
    bias (in the weight's dtype) or none, a contiguous weight and a transposed view of a [H, V]
    tensor (stride(0) == 1), every combination of optional outputs and of gradients (the bias,
    the optional outputs and the gradients are runtime flags and dedupe to the same compilations;
    should they become constexprs, each gets its own), for every vocabulary of VOCABS. H = 48 (not
    a multiple of the K block) keeps the hidden pointers and strides 16-aligned, as real shapes are;
    a transposed weight's stride is V, aligned or not."""
    import torch

    global _current_vocab
    N, H = 6, 48
    labels = torch.zeros(N, dtype=torch.int64)
    for dtype_name, softcap, has_bias, transposed, (label, V, _) in itertools.product(
        DTYPES, (0.0, 30.0), (False, True), (False, True), VOCABS
    ):
        _current_vocab = label
        dtype = getattr(torch, dtype_name)
        hidden = torch.zeros(N, H, dtype=dtype)
        weight = torch.empty(H, V, dtype=dtype).t() if transposed else torch.empty(V, H, dtype=dtype)
        bias = torch.empty(V, dtype=dtype) if has_bias else torch.empty(0, dtype=dtype)
        common = dict(temperature=0.7, logit_scale=0.5 if softcap else 1.0, softcap=softcap, ignore_index=-100)
        for flags in itertools.product((False, True), repeat=4):
            module.linear_token_logprobs_forward(hidden, weight, bias, labels, **common, with_entropy=flags[0],
                                                 with_log_sum_sq_probs=flags[1], with_mean_logits=flags[2],
                                                 with_is_top1=flags[3])
        norm = torch.zeros(N, 2)
        for with_logps, with_entropy in itertools.product((False, True), repeat=2):
            if with_logps or with_entropy:
                module.linear_token_logprobs_backward(torch.ones(N) if with_logps else None,
                                                      torch.ones(N) if with_entropy else None,
                                                      hidden, weight, bias, labels, norm, torch.zeros(N), **common)


DIVERGENCE_LARGE_POINTERS = ("s_ptr", "t_ptr", "a_ptr", "b_ptr", "out_ptr")
DIVERGENCE_STRIDES = ("s_sb", "s_st", "s_sv", "t_sb", "t_st", "t_sv", "a_sb", "a_st", "a_sv", "b_sb", "b_st", "b_sv")


def _divergence_launcher_calls(module):
    """kernels/divergence.py's launchers over every input kind: each dtype, every divergence kind,
    softcap on either model, contiguous and strided vocabularies, the entropy asked or not."""
    import torch

    B, T = 2, 3
    N = B * T
    valid, ones, stats = torch.ones(N, dtype=torch.bool), torch.ones(N), torch.zeros(N, 6)
    for dtype_name, caps, strided, vocab in itertools.product(
        DTYPES, ((0.0, 0.0), (30.0, 0.0), (0.0, 30.0)), ((False, False), (True, False), (False, True)), VOCABS
    ):
        dtype = getattr(torch, dtype_name)
        student = _vocab_logits(dtype, vocab, strided[0], B, T)
        teacher = _vocab_logits(dtype, vocab, strided[1], B, T)
        transform = (0.7, 1.0, caps[0], 1.0, caps[1])
        for kind, with_entropy in itertools.product(range(4), (False, True)):
            module.token_divergence_forward(student, teacher, valid, kind, 0.3, 0.3, 0.7, *transform, with_entropy)
        for kind in range(4):
            module.token_divergence_backward(ones, student, teacher, valid, stats, kind, 0.3, 0.3, 0.7, *transform)


# Which launcher calls and which offset rules go with a kernels file, by its name.
LAUNCHERS = {
    "logprobs": _launcher_calls,
    "policy": _policy_launcher_calls,
    "gae": _gae_launcher_calls,
    "advantages": _advantages_launcher_calls,
    "linear_logprobs": _linear_launcher_calls,
    "divergence": _divergence_launcher_calls,
}
OFFSET_RULES = {
    "logprobs": (LARGE_POINTERS, STRIDES),
    "policy": (LARGE_POINTERS, STRIDES),
    "gae": (GAE_LARGE_POINTERS, GAE_STRIDES),
    "advantages": (ADVANTAGES_LARGE_POINTERS, ()),
    "linear_logprobs": (LINEAR_LARGE_POINTERS, LINEAR_STRIDES),
    "divergence": (DIVERGENCE_LARGE_POINTERS, DIVERGENCE_STRIDES),
}


def _stem(module) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def _target_module(module):
    """The kernels/target.py beside a loaded kernels file, if that file uses it."""
    return sys.modules.get(module.__name__.rsplit(".", 1)[0] + ".target")


def record_launches(module, target: str = "sm_90") -> dict[str, list[tuple[tuple, dict, str | None]]]:
    """Every launch the module's launchers make over their input space, as they make it for a GPU
    of ``target`` (kernels/target.py answers the launchers' questions about the device)."""
    names = kernel_names(module)
    originals = {n: getattr(module, n) for n in names}
    recorders = {n: _Recorder() for n in names}
    target_module = _target_module(module)
    try:
        if target_module is not None:
            target_module.forced = gpu_target(target)
        for n in names:
            setattr(module, n, recorders[n])
        LAUNCHERS[_stem(module)](module)
    finally:
        for n, fn in originals.items():
            setattr(module, n, fn)
        if target_module is not None:
            target_module.forced = None
    return {n: r.launches for n, r in recorders.items()}


# Every target users run: NVIDIA Ampere, Hopper, Blackwell datacenter and consumer parts, and
# AMD MI300 (gfx942) and MI250 (gfx90a), whose wavefronts are 64 lanes wide.
ALL_TARGETS = ("sm_80", "sm_90", "sm_100", "sm_120", "gfx942", "gfx90a")


def target_name(name) -> str:
    """``sm_90`` for 90, "90" or "sm_90"; AMD names (``gfx942``) as they are."""
    name = str(name)
    if name.startswith("gfx"):
        return name
    return "sm_" + name.removeprefix("sm_")


def gpu_target(name):
    from triton.backends.compiler import GPUTarget

    name = target_name(name)
    if name.startswith("gfx"):
        return GPUTarget("hip", name, 64)
    return GPUTarget("cuda", int(name.removeprefix("sm_")), 32)


def compile_spec(kernel, args, kwargs, target):
    """What Triton's JIT would hand to ``triton.compile`` for this launch on a GPU of ``target``
    (a name from ALL_TARGETS).

    Uses the JIT's own argument binder and ``_pack_args`` (internal Triton APIs, as of 3.6 to 3.9),
    so types, constexprs, the int-1 and divisible-by-16 specializations and the options
    (num_warps, enable_fp_fusion, ...) are exactly those of a real launch rather than a hand-kept
    copy.
    """
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = gpu_target(target)
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


def _amd_resource_usage(amdgcn: str) -> dict[str, int]:
    """The AMDGPU metadata of a compiled kernel, in the gate's terms: REG (VGPRs), SGPR, SHARED
    (LDS bytes), LOCAL (scratch bytes per lane) and STACK (VGPRs spilled to scratch). SGPRs that
    spill are kept in VGPR lanes, not memory (SGPR_SPILL, reported, not a failure); once the lanes
    run out they too go to scratch, and LOCAL says so."""
    def field(pattern: str) -> int:
        found = re.search(pattern, amdgcn, re.M)
        if found is None:
            raise RuntimeError(f"no {pattern!r} in the AMDGPU assembly")
        return int(found.group(1))

    return {
        "REG": field(r"^\s*\.vgpr_count:\s+(\d+)"),
        "SGPR": field(r"^\s*\.sgpr_count:\s+(\d+)"),
        "SHARED": field(r"^\s*\.group_segment_fixed_size:\s+(\d+)"),
        "LOCAL": field(r"^\s*\.private_segment_fixed_size:\s+(\d+)"),
        "STACK": field(r"^\s*\.vgpr_spill_count:\s+(\d+)"),
        "SGPR_SPILL": field(r"^\s*\.sgpr_spill_count:\s+(\d+)"),
    }


def resource_usage(compiled) -> dict[str, int]:
    """REG, SHARED, LOCAL and STACK of a compiled kernel, NVIDIA or AMD."""
    if "hsaco" in compiled.asm:
        return _amd_resource_usage(compiled.asm["amdgcn"])
    return _resource_usage(compiled.asm["cubin"])


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


def compile_job(job: dict):
    """Compile one job; Triton's CompiledKernel (asm by stage, metadata)."""
    import triton
    from triton.compiler import ASTSource

    target, options, signature, constexprs, attrs = job["spec"]
    return triton.compile(ASTSource(job["fn"], signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def _run_job(index: int) -> dict:
    job = _JOBS[index]
    result = {k: job[k] for k in ("kernel", "target", "dtype", "flags", "num_warps", "vocabs")}
    start = time.perf_counter()
    try:
        compiled = compile_job(job)
        result.update(resource_usage(compiled))
        result["dynamic_shared"] = compiled.metadata.shared
        result["offset_problems"] = check_64bit_offsets(compiled.asm["ttir"], *job["offset_rules"])
    except Exception as e:  # reported per kernel; the gate fails on it
        result["error"] = f"{type(e).__name__}: {e}"
    result["seconds"] = time.perf_counter() - start
    return result


def _describe(kernel, constexprs: dict, attrs: dict | None = None) -> str:
    """The constexprs of a variant, e.g. ``SOFTCAP,WITH_ENTROPY,BLOCK=4096`` (False flags left out),
    then the integer arguments Triton specialized as multiples of 16 (``V%16``)."""
    flags = []
    for path, value in sorted(constexprs.items()):
        name = kernel.arg_names[path[0]]
        if isinstance(value, bool):
            if value:
                flags.append(name)
        else:
            flags.append(f"{name}={value}")
    if attrs:
        pointers = {p.name for p in kernel.params if p.name.endswith("_ptr")}
        for path, values in sorted(attrs.items()):
            name = kernel.arg_names[path[0]]
            if name not in pointers and any(v[0] == "tt.divisibility" for v in values):
                flags.append(f"{name}%16")
    return ",".join(flags) or "-"


def _flag_count(constexprs: dict) -> int:
    return sum(1 for v in constexprs.values() if v is True)


def build_jobs(module, targets, quick: bool = False) -> tuple[list[dict], list[str]]:
    """One compile job per distinct (kernel, target, specialization, options), and any problems
    with the enumeration itself.

    ``quick``: per kernel, dtype and alignment class (which of V and the strides Triton saw as
    multiples of 16), only the variant with the most constexpr features switched on: the
    heaviest on registers, as a rule.
    """
    # Launch options can differ by target (warp size, per-architecture limits): one recording each.
    recordings = {target: record_launches(module, target) for target in targets}
    jobs = []
    problems = []
    for name, recorded in next(iter(recordings.values())).items():
        kernel = getattr(module, name)
        if not recorded:
            problems.append(f"{name}: never launched by the enumerated launcher calls")
            continue
        # Every boolean constexpr must be seen both ways, or the enumeration is missing an input.
        seen = collections.defaultdict(set)
        for args, kwargs, _ in recorded:
            for k, v in kwargs.items():
                if isinstance(v, bool) and k in kernel.arg_names:
                    seen[k].add(v)
        for p in kernel.params:
            if p.is_constexpr and len(seen.get(p.name, ())) == 1:
                problems.append(f"{name}: constexpr {p.name} is only ever {seen[p.name]} in the launches")
        # FMA contraction chosen per kernel: Triton 3.10 flips the default, and results must not
        # move with the Triton version.
        if any("enable_fp_fusion" not in kwargs for _, kwargs, _ in recorded):
            problems.append(f"{name}: a launch leaves enable_fp_fusion to Triton's default")
        for target in targets:
            distinct = {}
            for args, kwargs, vocab in recordings[target][name]:
                spec = compile_spec(kernel, args, kwargs, target)
                _, options, signature, constexprs, attrs = spec
                key = (repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                       repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
                if key in distinct:
                    if vocab is not None:
                        distinct[key]["vocabs"].add(vocab)
                    continue
                # The dtype of the first pointer argument: the logits, or the rewards.
                dtype = next(t for t in signature.values() if isinstance(t, str) and t.startswith("*")).lstrip("*")
                distinct[key] = dict(kernel=name, fn=kernel, target=target_name(target), dtype=dtype,
                                     flags=_describe(kernel, constexprs, attrs), num_warps=options.num_warps,
                                     spec=spec, offset_rules=OFFSET_RULES[_stem(module)],
                                     vocabs=set() if vocab is None else {vocab},
                                     alignment=repr(sorted(attrs.items())), weight=_flag_count(constexprs))
            chosen = list(distinct.values())
            if quick:
                heaviest = {}
                for job in chosen:
                    group = (job["dtype"], job["alignment"])
                    if group not in heaviest or job["weight"] > heaviest[group]["weight"]:
                        heaviest[group] = job
                chosen = list(heaviest.values())
            jobs.extend(chosen)
    return jobs, problems


def _pool(jobs_count: int):
    methods = multiprocessing.get_all_start_methods()
    # fork: workers inherit the imported kernels and the job list instead of re-importing torch.
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    return concurrent.futures.ProcessPoolExecutor(max_workers=jobs_count, mp_context=context)


def check_offsets_only(modules, target: str = "sm_90") -> list[str]:
    """Compile one launch per kernel plus the 32-bit control; return the problems found."""
    import triton
    from triton.compiler import ASTSource

    problems = []
    launches = [(module, name, recorded) for module in modules for name, recorded in record_launches(module).items()]
    for module, name, recorded in launches:
        kernel = getattr(module, name)
        for args, kwargs, _ in recorded[:1] + recorded[-1:]:
            spec = compile_spec(kernel, args, kwargs, target)
            constexprs = spec[3]
            ttir = compile_job(dict(fn=kernel, spec=spec)).asm["ttir"]
            found = check_64bit_offsets(ttir, *OFFSET_RULES[_stem(module)])
            problems += [f"{name}: {p}" for p in found]
            print(f"{name} [{_describe(kernel, constexprs)}]: "
                  + ("64-bit offsets" if not found else f"{len(found)} problem(s)"))
    control = _control_kernel()
    ttir = triton.compile(
        ASTSource(control, {"logits_ptr": "*bf16", "out_ptr": "*bf16", "stride_t": "i32", "BLOCK": "constexpr"},
                  {"BLOCK": 128}),
        target=gpu_target(target)).asm["ttir"]
    found = check_64bit_offsets(ttir)
    print(f"control kernel with a 32-bit row offset: {'rejected' if found else 'NOT rejected'}"
          + "".join(f"\n    {p}" for p in found))
    if not found:
        problems.append("the offset check accepted the 32-bit control kernel")
    return problems


def _vocab_coverage(jobs: list[dict], targets) -> list[str]:
    """Every kernel that takes a vocabulary was compiled for every vocabulary of VOCABS on each
    target (as the variant it maps to)."""
    covered = collections.defaultdict(set)
    for job in jobs:
        covered[(job["kernel"], job["target"])] |= job["vocabs"]
    problems = []
    wanted = {label for label, _, _ in VOCABS}
    for (kernel, target), vocabs in sorted(covered.items()):
        if vocabs and vocabs != wanted:
            problems.append(f"{kernel} {target}: no compilation for vocabularies {sorted(wanted - vocabs)}")
    return problems


def run_gate(targets, kernels_files, jobs_count: int = 2, quick: bool = False, verbose: bool = False) -> int:
    started = time.perf_counter()
    modules = [load_kernels_module(path) for path in kernels_files]
    targets = [target_name(t) for t in targets]
    jobs, problems = [], []
    for module in modules:
        module_jobs, module_problems = build_jobs(module, targets, quick)
        jobs += module_jobs
        problems += module_problems
    problems += _vocab_coverage(jobs, targets)
    _JOBS[:] = jobs
    print(f"{len(jobs)} compilations ({', '.join(targets)}{', quick' if quick else ''}) on {jobs_count} processes")
    with _pool(jobs_count) as pool:
        results = list(pool.map(_run_job, range(len(jobs)), chunksize=4))

    failures = []
    groups = collections.defaultdict(list)
    for r in results:
        where = f"{r['kernel']} {r['target']} {r['dtype']} [{r['flags']}]"
        if "error" in r:
            failures.append(f"{where}: compile failed: {r['error']}")
            continue
        if r["LOCAL"] > 0 or r.get("STACK", 0) > 0:
            failures.append(f"{where}: spills, LOCAL={r['LOCAL']} STACK={r.get('STACK', 0)} REG={r['REG']}")
        for p in r["offset_problems"]:
            failures.append(f"{where}: {p}")
        groups[(r["kernel"], r["target"], r["dtype"], r["num_warps"])].append(r)
        if verbose:
            vocabs = f" V={'|'.join(sorted(r['vocabs']))}" if r["vocabs"] else ""
            print(f"  {where}{vocabs}: REG={r['REG']} SHARED={r['SHARED']}+{r['dynamic_shared']} "
                  f"LOCAL={r['LOCAL']} STACK={r.get('STACK', 0)} ({r['seconds']:.2f}s)")

    print(f"{'kernel':<34} {'target':<7} {'dtype':<5} {'warps':>5} {'variants':>8} {'REG':>9} "
          f"{'SHARED(static+dyn)':>19} {'LOCAL':>5} {'STACK':>5}")
    for (kernel, target, dtype, warps), rs in sorted(groups.items()):
        regs = [r["REG"] for r in rs]
        shared = max(r["SHARED"] + r["dynamic_shared"] for r in rs)
        print(f"{kernel:<34} {target:<7} {dtype:<5} {warps:>5} {len(rs):>8} {min(regs):>4}-{max(regs):<4} "
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=list(ALL_TARGETS),
                        help=f"targets to compile for (default: all of {' '.join(ALL_TARGETS)})")
    parser.add_argument("--quick", action="store_true",
                        help="only the heaviest variant per kernel, dtype and alignment class (make test); "
                             "without it every variant (make gate)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--offsets-only", action="store_true",
                        help="only check 64-bit address arithmetic (one launch per kernel and the control)")
    parser.add_argument("--verbose", action="store_true", help="one line per compiled variant")
    parser.add_argument("--kernels", type=Path, nargs="+",
                        default=[KERNELS_FILE, POLICY_KERNELS_FILE, GAE_KERNELS_FILE, ADVANTAGES_KERNELS_FILE,
                                 LINEAR_KERNELS_FILE, DIVERGENCE_KERNELS_FILE],
                        help="the kernels files to check (named logprobs.py, policy.py, gae.py, advantages.py, "
                             "linear_logprobs.py or divergence.py)")
    args = parser.parse_args(argv)

    import warnings

    import triton

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    print(f"triton {triton.__version__}")
    if args.offsets_only:
        modules = [load_kernels_module(path) for path in args.kernels]
        problems = check_offsets_only(modules, "sm_90")
        for p in problems:
            print("FAIL", p)
        return 1 if problems else 0
    return run_gate(args.targets, args.kernels, args.jobs, args.quick, args.verbose)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
