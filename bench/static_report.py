"""Static performance model of the Triton kernels: `make gpu-report`.

No GPU needed. Each kernel is compiled ahead of time exactly as its launcher launches it (the
compile gate's recording, tests/ops/triton_compile_gate.py) for every target, and its machine code is
read: registers, spills, shared memory and the occupancy they allow, and for the hot loop (the
innermost loop that loads from global memory) the width of its loads, its instructions and its
MUFU (special-function) instructions per element. From those, for the anchor workloads on H100 and
H200, a bandwidth floor (bytes over HBM bandwidth) and an issue floor (instructions over the SMs'
issue rate) — whichever is larger bounds the kernel. TRL's and Liger's Triton kernels for the same
jobs are compiled and read the same way, side by side.

Every figure is an ESTIMATE from the compiled code, not a measurement: the real numbers come from
`make gpu-check` on a GPU.

    python bench/static_report.py [--targets sm_90 ...] [--out bench/results]

writes bench/results/static-<target>.md for each target.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "ops"))

import triton_compile_gate as gate  # noqa: E402

# The GPUs the floors are computed for: SMs, SM clock (GHz), HBM bandwidth (TB/s), dense bf16
# tensor-core throughput (TFLOP/s). H100 SXM and H200 share the SM (132 SMs, 1.98 GHz boost);
# H200's bandwidth is given as its data sheet's 4.8 TB/s and as 4.3 TB/s, the device-to-device copy
# rate measured on one.
GPUS = {
    "H100 SXM": dict(sms=132, ghz=1.98, tbps=3.35, tflops=989.0, l2_mb=50),
    "H200": dict(sms=132, ghz=1.98, tbps=4.8, tflops=989.0, l2_mb=60),
    "H200 (4.3 TB/s measured copy)": dict(sms=132, ghz=1.98, tbps=4.3, tflops=989.0, l2_mb=60),
}
# The GRPO policy kernel's programs per SM at the anchor (its registers allow two of 512 threads).
POLICY_PROGRAMS_PER_SM = 2
# An SM issues one warp instruction per clock on each of its 4 schedulers; its MUFU unit returns
# 16 results per clock (sm_80 and later).
ISSUE_PER_SM_PER_CLOCK = 4
MUFU_PER_SM_PER_CLOCK = 16
# Threads, registers and shared memory per SM, for the occupancy column.
SM_LIMITS = {
    "sm_80": dict(threads=2048, regs=65536, smem=164 * 1024, blocks=32),
    "sm_90": dict(threads=2048, regs=65536, smem=228 * 1024, blocks=32),
    "sm_100": dict(threads=2048, regs=65536, smem=228 * 1024, blocks=32),
    "sm_120": dict(threads=1536, regs=65536, smem=100 * 1024, blocks=32),
}
ANCHOR_ROWS, ANCHOR_VOCAB = 8192, 151936
LINEAR_ANCHOR = dict(N=8192, H=4096, V=131072)


# --------------------------------------------------------------------------------------------
# Reading machine code


@dataclass
class Loop:
    instructions: int  # every instruction of the loop body, rare paths included
    steady: int  # without the blocks a forward branch skips (the rarely taken rescale, ...)
    mufu: int
    steady_mufu: int
    loads: dict[str, int]  # load opcode (with its width) -> count
    elements: float  # logits elements a thread loads per iteration
    mma: int = 0
    remainder: "Loop | None" = None  # the leftover loop of an unrolled one, folded in here


def fold_unroll_remainders(loops: list[Loop]) -> list[Loop]:
    """An unrolled loop compiles to the unrolled body and a loop for the leftover iterations right
    after it: the same loads, a whole fraction of the elements. The leftover runs at most
    (factor - 1) times per sweep, so the unrolled body is the steady state; the leftover is kept on
    it for the record, not counted as a sweep of its own."""
    out: list[Loop] = []
    for loop in loops:
        prev = out[-1] if out else None
        if (prev is not None and prev.remainder is None and not loop.mma and loop.elements > 0
                and set(loop.loads) == set(prev.loads) and prev.elements > loop.elements
                and (prev.elements / loop.elements).is_integer()):
            prev.remainder = loop
            continue
        out.append(loop)
    return out


@dataclass
class Listing:
    instructions: list[str]  # opcode per instruction, in order
    labels: dict[str, int]  # label -> index of the next instruction
    branches: list[tuple[int, str, bool]]  # (index, target label, conditional)


def _sass(cubin: bytes) -> str:
    tool = Path(gate._cuobjdump())
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout


def parse_sass(text: str) -> Listing:
    """cuobjdump's SASS: branch targets are instruction addresses."""
    ops, labels, branches = [], {}, []
    for line in text.splitlines():
        inst = re.match(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);", line)
        if not inst:
            continue
        address, guard, opcode, operands = int(inst.group(1), 16), inst.group(2), inst.group(3), inst.group(4)
        labels[str(address)] = len(ops)
        if opcode == "NOP":
            continue
        target = re.search(r"\b0x([0-9a-f]+)\b", operands)
        if opcode.startswith("BRA") and target:
            branches.append((len(ops), str(int(target.group(1), 16)), guard is not None))
        ops.append(opcode)
    return Listing(ops, labels, branches)


def parse_amdgcn(text: str) -> Listing:
    ops, labels, branches = [], {}, []
    body = text.split(".Lfunc_end")[0]
    for line in body.splitlines():
        label = re.match(r"^(\.LBB\d+_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        inst = re.match(r"^\s+([sv]_\w+|global_\w+|buffer_\w+|flat_\w+|ds_\w+|scratch_\w+)\b(.*)$", line)
        if not inst:
            continue
        opcode = inst.group(1)
        if opcode in ("s_nop", "s_waitcnt") or opcode.startswith("s_set"):
            continue
        if opcode.startswith("s_cbranch") or opcode == "s_branch":
            target = re.search(r"(\.LBB\d+_\d+)", inst.group(2))
            if target:
                branches.append((len(ops), target.group(1), opcode != "s_branch"))
        ops.append(opcode)
    return Listing(ops, labels, branches)


def _is_load(opcode: str) -> bool:
    return opcode.startswith(("LDG", "global_load", "buffer_load"))


def _load_bytes(opcode: str, element_bytes: int) -> float:
    """Bytes one thread loads with this instruction."""
    if opcode.startswith("LDG"):
        width = re.search(r"\.(128|64|U16|S16|U8|S8)\b", opcode)
        return {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}.get(width.group(1) if width else "", 4)
    width = re.search(r"(dwordx4|dwordx3|dwordx2|dword|short|ushort|sshort|ubyte|sbyte|b128|b96|b64|b32|b16|u16|i16)",
                      opcode)
    return {"dwordx4": 16, "b128": 16, "dwordx3": 12, "b96": 12, "dwordx2": 8, "b64": 8, "dword": 4, "b32": 4,
            "short": 2, "ushort": 2, "sshort": 2, "b16": 2, "u16": 2, "i16": 2, "ubyte": 1, "sbyte": 1}.get(
        width.group(1) if width else "", 4)


def _is_mufu(opcode: str) -> bool:
    return opcode.startswith("MUFU") or opcode.startswith(("v_exp_", "v_log_", "v_rcp_", "v_rsq_", "v_sqrt_"))


def _is_mma(opcode: str) -> bool:
    return opcode.startswith(("HMMA", "HGMMA", "UTCHMMA", "UTCMMA", "IMMA", "v_mfma", "v_wmma"))


def hot_loops(listing: Listing, element_bytes: int) -> list[Loop]:
    """The innermost loops that load from global memory, in program order."""
    loops = []
    spans = sorted({(listing.labels[t], i) for i, t, _ in listing.branches if t in listing.labels and listing.labels[t] <= i})
    for start, end in spans:
        if any(s >= start and e <= end and (s, e) != (start, end) and any(_is_load(o) for o in listing.instructions[s:e + 1])
               for s, e in spans):
            continue  # an inner loop carries the loads
        body = listing.instructions[start:end + 1]
        if not any(_is_load(o) for o in body):
            continue
        # Blocks a forward conditional branch inside the loop jumps over: off the steady path.
        skipped = set()
        for i, target, conditional in listing.branches:
            if start <= i < end and conditional and target in listing.labels:
                j = listing.labels[target]
                if i < j <= end:
                    skipped.update(range(i + 1, j))
        steady = [o for k, o in enumerate(body, start) if k not in skipped]
        loads = {}
        for o in body:
            if _is_load(o):
                loads[o] = loads.get(o, 0) + 1
        elements = sum(_load_bytes(o, element_bytes) / element_bytes for o in steady if _is_load(o))
        loops.append(Loop(len(body), len(steady), sum(map(_is_mufu, body)), sum(map(_is_mufu, steady)), loads,
                          elements, sum(map(_is_mma, body))))
    return loops


# --------------------------------------------------------------------------------------------
# What is compiled


@dataclass
class Subject:
    """One kernel at one launch configuration, ours or a peer's."""
    owner: str  # fastalign, TRL, Liger
    job: str  # what it does, for the side-by-side table
    kernel: str
    fn: object
    args: tuple
    kwargs: dict
    element_bytes: int = 2
    per_element: bool = True  # a row kernel over the vocabulary (not a matmul tile loop)
    # Logits rows each hot loop reads per vocabulary position (2: a student's and a teacher's),
    # one number for every loop or one per loop in program order.
    rows: "int | tuple[int, ...]" = 1
    hbm_bytes: float = 0.0  # HBM bytes per logits element (reads + writes) at the anchor shape
    side_by_side: str = ""  # the row of the side-by-side table this kernel belongs to
    note: str = ""
    results: dict = field(default_factory=dict)  # target -> dict


def _pick(recorded, dtype: str, vocab: str | None, **flags):
    """The first recorded launch of this logits dtype and vocabulary whose keyword arguments
    match ``flags``."""
    import torch

    want = getattr(torch, dtype)
    for args, kwargs, v in recorded:
        first = next(a for a in args if isinstance(a, torch.Tensor))
        if first.dtype != want or (vocab is not None and v != vocab):
            continue
        if all(kwargs.get(k) == value for k, value in flags.items()):
            return args, kwargs
    raise LookupError(f"no launch with {dtype} V={vocab} {flags}")


def our_subjects(target: str) -> list[Subject]:
    modules = {f.stem: gate.load_kernels_module(f) for f in (gate.KERNELS_FILE, gate.POLICY_KERNELS_FILE,
                                                               gate.LINEAR_KERNELS_FILE, gate.DIVERGENCE_KERNELS_FILE)}
    rec = {name: gate.record_launches(module, target) for name, module in modules.items()}
    subjects = divergence_subjects(modules["divergence"], rec["divergence"])
    lp, pol, lin = rec["logprobs"], rec["policy"], rec["linear_logprobs"]
    for vocab in ("151936", "50257", "151665/151936"):
        for softcap in (False, True):
            tag = f"V={vocab}{', softcap' if softcap else ''}"
            args, kwargs = _pick(lp["_token_logprobs_fwd_kernel"], "bfloat16", vocab, SOFTCAP=softcap,
                                 VOCAB_CONTIGUOUS=True, WITH_ENTROPY=True)
            anchor = vocab == "151936" and not softcap
            subjects.append(Subject("fastalign", f"log-prob + entropy forward ({tag})", "_token_logprobs_fwd_kernel",
                                    modules["logprobs"]._token_logprobs_fwd_kernel, args, kwargs, hbm_bytes=2,
                                    side_by_side="log-prob + entropy forward" if anchor else ""))
            args, kwargs = _pick(lp["_token_logprobs_bwd_kernel"], "bfloat16", vocab, SOFTCAP=softcap,
                                 VOCAB_CONTIGUOUS=True, HAS_GRAD_LOGPS=True, HAS_GRAD_ENTROPY=True)
            subjects.append(Subject("fastalign", f"log-prob + entropy backward ({tag})", "_token_logprobs_bwd_kernel",
                                    modules["logprobs"]._token_logprobs_bwd_kernel, args, kwargs, hbm_bytes=4,
                                    side_by_side="log-prob + entropy backward" if anchor else ""))
            args, kwargs = _pick(pol["_policy_token_kernel"], "bfloat16", vocab, SOFTCAP=softcap,
                                 VOCAB_CONTIGUOUS=True, HAS_OLD=True, HAS_GRAD_ENTROPY=False)
            subjects.append(Subject("fastalign", f"GRPO policy pass, fwd+bwd in one ({tag})", "_policy_token_kernel",
                                    modules["policy"]._policy_token_kernel, args, kwargs, hbm_bytes=4,
                                    side_by_side="GRPO loss, forward + backward" if anchor else ""))
    args, kwargs = _pick(lp["_token_logprobs_fwd_kernel"], "float32", "151936", SOFTCAP=False,
                         VOCAB_CONTIGUOUS=True, WITH_ENTROPY=True)
    subjects.append(Subject("fastalign", "log-prob + entropy forward (V=151936, fp32)", "_token_logprobs_fwd_kernel",
                            modules["logprobs"]._token_logprobs_fwd_kernel, args, kwargs, element_bytes=4))
    for name, job in (("_linear_logprobs_fwd_kernel", "linear log-prob forward"),
                      ("_linear_logprobs_bwd_hidden_kernel", "linear log-prob backward, grad_hidden"),
                      ("_linear_logprobs_bwd_weight_kernel", "linear log-prob backward, grad_weight")):
        for dtype in ("bfloat16", "float32"):
            args, kwargs = _pick(lin[name], dtype, "128256", SOFTCAP=False)
            subjects.append(Subject("fastalign", f"{job} ({dtype.replace('bfloat16', 'bf16').replace('float32', 'fp32')})",
                                    name, getattr(modules["linear_logprobs"], name), args, kwargs,
                                    element_bytes=2 if dtype == "bfloat16" else 4, per_element=False))
    return subjects


# The distillation jobs: (divergence kind, name) in the side-by-side table; logits tiles in fp32,
# as TRL's and Liger's fused-linear paths hold them.
DISTILLATION_JOBS = ((2, "distillation JSD (beta 0.5), fwd+bwd, fp32 logits tiles"),
                     (0, "distillation forward KL (beta 0), fwd+bwd, fp32 logits tiles"))


def divergence_subjects(module, recorded) -> list[Subject]:
    """kernels/divergence.py: the forward (entropy on, as the trainers log it) and the backward, for
    the JSD and the forward KL, at the anchor vocabulary; both read a student's and a teacher's row.
    HBM bytes per position: the KL forward reads both rows once, the JSD forward twice (the second
    sweep counted from HBM); the backward reads both and writes the student's gradient."""
    subjects = []
    for kind, job in DISTILLATION_JOBS:
        for dtype in ("float32", "bfloat16"):
            size = 4 if dtype == "float32" else 2
            tag = f"{'JSD' if kind == 2 else 'forward KL'}, V=151936, {'fp32' if size == 4 else 'bf16'}"
            flags = dict(S_SOFTCAP=False, T_SOFTCAP=False, S_CONTIGUOUS=True, T_CONTIGUOUS=True)
            args, kwargs = _pick(recorded["_token_divergence_fwd_kernel"], dtype, "151936", KIND=kind,
                                 WITH_ENTROPY=True, **flags)
            sweeps = 1 if kind == 0 else 2
            subjects.append(Subject("fastalign", f"divergence + entropy forward ({tag})", "_token_divergence_fwd_kernel",
                                    module._token_divergence_fwd_kernel, args, kwargs, element_bytes=size,
                                    rows=2 if kind == 0 else (1, 1, 2),
                                    hbm_bytes=2 * size * sweeps, side_by_side=job if size == 4 else ""))
            flags = dict(A_SOFTCAP=False, B_SOFTCAP=False, A_CONTIGUOUS=True, B_CONTIGUOUS=True)
            args, kwargs = _pick(recorded["_token_divergence_bwd_kernel"], dtype, "151936", KIND=kind, **flags)
            subjects.append(Subject("fastalign", f"divergence backward ({tag})", "_token_divergence_bwd_kernel",
                                    module._token_divergence_bwd_kernel, args, kwargs, element_bytes=size, rows=2,
                                    hbm_bytes=3 * size, side_by_side=job if size == 4 else ""))
    return subjects


def _distillation_peer_subjects() -> tuple[list[Subject], list[str]]:
    """TRL's ChunkedDivergenceFunction kernels (_stats_kernel, _jsd_kernel, _backward_kernel) from
    its own forward and backward, and Liger's _jsd_kernel from its jsd_loss_and_grad primitive (the
    one LigerJSD and LigerFusedLinearJSD launch), for the JSD and the forward KL."""
    import torch

    subjects, notes = [], []
    N, H, V = 4, 8, ANCHOR_VOCAB
    try:
        import trl.kernels.chunked_divergence as trl_div

        for kind, job in DISTILLATION_JOBS:
            beta = 0.5 if kind == 2 else 0.0

            def call():
                h = torch.zeros(N, H, requires_grad=True)
                w = torch.zeros(V, H)
                div, _ = trl_div.ChunkedDivergenceFunction.apply(h, w, None, torch.zeros(N, H), torch.zeros(V, H), None,
                                                                 beta)
                div.sum().backward()

            use_triton = trl_div._use_triton
            trl_div._use_triton = lambda device: True  # launch (into the recorders) on CPU tensors
            try:
                rec = _record_peer(trl_div, ["_stats_kernel", "_jsd_kernel", "_backward_kernel"], call)
            finally:
                trl_div._use_triton = use_triton
            # HBM bytes per position: each fold reads both fp32 tiles; the backward also writes the
            # gradient in place of the student's tile.
            for name, nbytes in (("_stats_kernel", 8), ("_jsd_kernel", 8), ("_backward_kernel", 12)):
                fn, launches = rec[name]
                if not launches:
                    continue  # the JSD fold runs only for 0 < beta < 1
                args, kwargs, _ = launches[0]
                subjects.append(Subject("TRL", f"{job.split(',')[0]}: {name}", f"trl {name}", fn, args, kwargs,
                                        element_bytes=4, rows=2, hbm_bytes=nbytes, side_by_side=job))
        notes.append("TRL's distillation kernels run on fp32 logits tiles its GEMMs write chunk by chunk; for the "
                     "JSD it projects both models' hidden states twice (once per fold), which the kernel rows do not "
                     "count.")
    except Exception as exc:
        notes.append(f"TRL's distillation kernels were not compiled: {type(exc).__name__}: {exc}")
    try:
        import liger_kernel.ops.backends._triton.jsd as liger_jsd

        for kind, job in DISTILLATION_JOBS:
            beta = 0.5 if kind == 2 else 0.0

            def call_jsd():
                logps = torch.zeros(N, V)
                liger_jsd.jsd_loss_and_grad_triton(logps.clone(), logps, None, beta, -100, float(N))

            rec = _record_peer(liger_jsd, ["_jsd_kernel"], call_jsd)
            fn, launches = rec["_jsd_kernel"]
            args, kwargs, _ = launches[0]
            # Reads both log-prob rows, writes an fp32 loss tile and the gradient (in place).
            subjects.append(Subject("Liger", f"{job.split(',')[0]}: _jsd_kernel", "liger _jsd_kernel", fn, args, kwargs,
                                    element_bytes=4, rows=2, hbm_bytes=16, side_by_side=job))
        notes.append("Liger's _jsd_kernel takes log-probs: both models' log_softmax and the student's softmax run "
                     "before it (PyTorch, three more passes over each tile), the loss tile's sum and the gradient's "
                     "row sums after it; neither is in its kernel row.")
    except Exception as exc:
        notes.append(f"Liger's JSD kernel was not compiled: {type(exc).__name__}: {exc}")
    return subjects, notes


def _record_peer(module, kernel_names, call) -> dict:
    recorders = {n: gate._Recorder() for n in kernel_names}
    originals = {n: getattr(module, n) for n in kernel_names}
    try:
        for n in kernel_names:
            setattr(module, n, recorders[n])
        call()
    finally:
        for n, fn in originals.items():
            setattr(module, n, fn)
    return {n: (originals[n], r.launches) for n, r in recorders.items()}


def peer_subjects() -> tuple[list[Subject], list[str]]:
    """TRL's and Liger's kernels for the same jobs, recorded from their own launchers on CPU
    tensors (the kernels swapped for recorders), at the anchor vocabulary in bf16."""
    import torch

    subjects, notes = _distillation_peer_subjects()
    B, T, V = 2, 3, ANCHOR_VOCAB
    logits = torch.zeros(B, T, V, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.zeros(B, T, dtype=torch.int64)
    try:
        import trl.kernels.logprob_entropy as trl_lp

        def call():
            lp, ent = trl_lp.selective_log_softmax_and_entropy(logits, labels)
            (lp.sum() + ent.sum()).backward()

        rec = _record_peer(trl_lp, ["_forward_kernel", "_backward_kernel"], call)
        for name, job in (("_forward_kernel", "log-prob + entropy forward (V=151936)"),
                          ("_backward_kernel", "log-prob + entropy backward (V=151936)")):
            fn, launches = rec[name]
            args, kwargs, _ = launches[0]
            subjects.append(Subject("TRL", job, f"trl {name}", fn, args, kwargs,
                                    hbm_bytes=2 if name == "_forward_kernel" else 4,
                                    side_by_side=job.replace(" (V=151936)", "")))
    except Exception as exc:
        notes.append(f"TRL's kernels were not compiled: {type(exc).__name__}: {exc}")
    try:
        import liger_kernel.ops.cross_entropy as liger_ce

        def call_ce():
            liger_ce.cross_entropy_forward(logits.detach().view(B * T, V).clone(), labels.view(-1), None, -100, 0.0,
                                           0.0, "mean", None, False)

        rec = _record_peer(liger_ce, ["liger_cross_entropy_kernel"], call_ce)
        fn, launches = rec["liger_cross_entropy_kernel"]
        args, kwargs, _ = launches[0]
        subjects.append(Subject("Liger", "cross-entropy fwd+bwd in one (no entropy; V=151936)",
                                "liger liger_cross_entropy_kernel", fn, args, kwargs, hbm_bytes=4,
                                side_by_side="cross-entropy / log-prob, forward + backward (no entropy)"))
    except Exception as exc:
        notes.append(f"Liger's cross-entropy kernel was not compiled: {type(exc).__name__}: {exc}")
    try:
        import liger_kernel.ops.grpo_loss as liger_grpo

        def call_grpo():
            # Liger takes the completion logits with one position more than the completion.
            x = torch.zeros(B, T + 1, V, dtype=torch.bfloat16, requires_grad=True)
            old = torch.zeros(B, T)
            out = liger_grpo.GrpoLossFunction.apply(x, old, old, labels, torch.zeros(B), torch.ones(B, T), 1.0, 0.04,
                                                    0.2, 0.28, False, "dapo")
            loss = out[0] if isinstance(out, tuple) else out
            loss.sum().backward()

        rec = _record_peer(liger_grpo, ["_grpo_loss_fwd_kernel", "_grpo_loss_bwd_kernel"], call_grpo)
        for name, job in (("_grpo_loss_fwd_kernel", "GRPO forward (V=151936)"),
                          ("_grpo_loss_bwd_kernel", "GRPO backward (V=151936)")):
            fn, launches = rec[name]
            if not launches:
                notes.append(f"Liger's {name} was not launched by its GRPO function here")
                continue
            args, kwargs, _ = launches[0]
            subjects.append(Subject("Liger", job, f"liger {name}", fn, args, kwargs,
                                    hbm_bytes=2 if "fwd" in name else 4, side_by_side="GRPO loss, forward + backward"))
    except Exception as exc:
        notes.append(f"Liger's GRPO kernels were not compiled: {type(exc).__name__}: {exc}")
    return subjects, notes


# --------------------------------------------------------------------------------------------
# Analysis


def _occupancy(target: str, threads: int, regs: int, smem: int, amdgcn: str | None) -> str:
    if amdgcn is not None:
        found = re.search(r"; Occupancy: (\d+)", amdgcn)
        return f"{found.group(1)} waves/SIMD" if found else "?"
    limits = SM_LIMITS[target]
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = limits["regs"] // (per_warp * (threads // 32))
    by_threads = limits["threads"] // threads
    by_smem = limits["smem"] // smem if smem else limits["blocks"]
    programs = min(by_regs, by_threads, by_smem, limits["blocks"])
    return f"{programs} x {threads} thr"


def analyse(subject: Subject, target: str) -> dict:
    spec = gate.compile_spec(subject.fn, subject.args, subject.kwargs, target)
    compiled = gate.compile_job(dict(fn=subject.fn, spec=spec))
    usage = gate.resource_usage(compiled)
    threads = spec[1].num_warps * gate.gpu_target(target).warp_size
    amd = "hsaco" in compiled.asm
    listing = parse_amdgcn(compiled.asm["amdgcn"]) if amd else parse_sass(_sass(compiled.asm["cubin"]))
    smem = usage["SHARED"] + compiled.metadata.shared
    loops = fold_unroll_remainders(per_position(hot_loops(listing, subject.element_bytes), subject.rows, subject.kernel))
    return dict(regs=usage["REG"], spills=usage["LOCAL"] + usage.get("STACK", 0), smem=smem, threads=threads,
                occupancy=_occupancy(target, threads, usage["REG"], smem, compiled.asm.get("amdgcn") if amd else None),
                loops=loops, total=len(listing.instructions),
                total_mufu=sum(map(_is_mufu, listing.instructions)))


def per_position(loops: list[Loop], rows: "int | tuple[int, ...]", kernel: str) -> list[Loop]:
    """The loops counted per vocabulary position: a loop reading two rows (a student's and a
    teacher's) loads two values for each. ``rows``: one count for every loop, or one per loop."""
    rows = rows if isinstance(rows, tuple) else (rows,) * len(loops)
    if len(rows) != len(loops):
        raise ValueError(f"{kernel}: rows given for {len(rows)} hot loops, the code has {len(loops)}")
    return [dataclasses.replace(loop, elements=loop.elements / n) for loop, n in zip(loops, rows)]


def _per_element(loop: Loop, subject: "Subject | None" = None) -> tuple[float, float] | None:
    if loop.elements <= 0 or loop.mma or (subject is not None and not subject.per_element):
        return None
    return loop.steady / loop.elements, loop.steady_mufu / loop.elements


def _fmt_loads(loads: dict[str, int]) -> str:
    return ", ".join(f"{n}x {o}" for o, n in sorted(loads.items()))


# --------------------------------------------------------------------------------------------
# Floors for the anchor workloads


def _issue_ms(elements: float, inst_per_element: float, gpu: dict) -> float:
    warp_instructions = elements * inst_per_element / 32
    return warp_instructions / (gpu["sms"] * ISSUE_PER_SM_PER_CLOCK * gpu["ghz"] * 1e9) * 1e3


def _mufu_ms(elements: float, mufu_per_element: float, gpu: dict) -> float:
    return elements * mufu_per_element / (gpu["sms"] * MUFU_PER_SM_PER_CLOCK * gpu["ghz"] * 1e9) * 1e3


def _bandwidth_ms(nbytes: float, gpu: dict) -> float:
    return nbytes / (gpu["tbps"] * 1e12) * 1e3


def floors(per_element: dict[str, tuple[float, float]]) -> list[dict]:
    """Anchor workloads: bandwidth, issue and MUFU floors from the per-element counts of the
    kernels that run them (``per_element``: job -> (instructions, MUFU) per element)."""
    E = ANCHOR_ROWS * ANCHOR_VOCAB
    rows = []
    plans = [
        ("log-prob + entropy forward, 8192 x 151936 bf16", 2 * E, ["fwd"]),
        ("log-prob + entropy fwd+bwd, 8192 x 151936 bf16", 6 * E, ["fwd", "bwd"]),
        ("GRPO policy pass (1 kernel), 8192 x 151936 bf16, second sweep from L2", 4 * E, ["policy1", "policy2"]),
        ("GRPO policy pass (1 kernel), 8192 x 151936 bf16, second sweep from HBM", 6 * E, ["policy1", "policy2"]),
        ("GRPO policy pass (1 kernel), 8192 x 151936 bf16, second sweep backwards, LRU-like L2", None,
         ["policy1", "policy2"]),
        ("log-prob + entropy forward, softcap, 8192 x 151936 bf16", 2 * E, ["fwd_softcap"]),
        ("log-prob + entropy forward, V=50257, 8192 rows bf16", 2 * ANCHOR_ROWS * 50257, ["fwd_50257"]),
    ]
    for workload, nbytes, parts in plans:
        if not all(p in per_element for p in parts):
            continue
        if "V=50257" in workload:
            elements = ANCHOR_ROWS * 50257
        else:
            elements = E
        inst = sum(per_element[p][0] for p in parts)
        mufu = sum(per_element[p][1] for p in parts)
        for gpu_name, gpu in GPUS.items():
            moved = nbytes
            if moved is None:
                # Rows in flight outgrow L2; read from its end back, a row's most recent part is
                # found in an LRU-like cache: about L2 / (bytes in flight) of the second sweep.
                in_flight = POLICY_PROGRAMS_PER_SM * gpu["sms"] * ANCHOR_VOCAB * 2
                hit = min(1.0, gpu["l2_mb"] * 1e6 / in_flight)
                moved = (4 + 2 * (1 - hit)) * E
            bw, issue, mu = _bandwidth_ms(moved, gpu), _issue_ms(elements, inst, gpu), _mufu_ms(elements, mufu, gpu)
            bound = max(("bandwidth", bw), ("issue", issue), ("MUFU", mu), key=lambda x: x[1])[0]
            rows.append(dict(workload=workload, gpu=gpu_name, inst=inst, mufu=mufu, bandwidth_ms=bw, issue_ms=issue,
                             mufu_ms=mu, bound=bound, issue_over_bw=issue / bw))
    n, h, v = LINEAR_ANCHOR["N"], LINEAR_ANCHOR["H"], LINEAR_ANCHOR["V"]
    for gpu_name, gpu in GPUS.items():
        flops = 2 * n * h * v
        rows.append(dict(workload=f"fused linear log-probs N={n} H={h} V={v} bf16, fwd+bwd (4 matmul-equivalents)",
                         gpu=gpu_name, tensor_ms=4 * flops / (gpu["tflops"] * 1e12) * 1e3,
                         bandwidth_ms=_bandwidth_ms(2 * (v * h * 3 + n * h * 3), gpu)))
    return rows


# --------------------------------------------------------------------------------------------


def write_report(target: str, subjects: list[Subject], notes: list[str], out: Path) -> Path:
    import triton

    lines = [f"# Static performance report, {target} (ESTIMATES)", "",
             f"Written by `make gpu-report` with Triton {triton.__version__}, no GPU: every number below is read from "
             "compiled code or computed from it, an **estimate**, not a measurement. `make gpu-check` measures on a GPU.",
             "", "Hot loop: the innermost loop that loads logits; its instruction counts are those of the steady path "
             "(blocks a forward branch skips, such as the rarely taken rescale when the running maximum grows, left "
             "out; the full body in parentheses). Elements: vocabulary positions one thread covers per iteration (a "
             "distillation kernel reads a student's and a teacher's row, two values per position). An unrolled loop "
             "is counted by its unrolled body (its leftover loop runs a few times per row at most). A kernel without "
             "such a loop (one block per program) is counted whole.", ""]
    lines += ["| owner | job | kernel | regs | spills | shared B | occupancy | hot-loop loads | instr / elem | "
              "MUFU / elem |", "|---|---|---|---|---|---|---|---|---|---|"]
    per_element = {}
    for s in subjects:
        r = s.results.get(target)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {s.owner} | {s.job} | {s.kernel} | compile failed: {r['error'][:80]} |||||||")
            continue
        cells = []
        for loop in r["loops"]:
            pe = _per_element(loop, s)
            if pe is None:
                cells.append((f"{_fmt_loads(loop.loads)}{f'; {loop.mma} MMA' if loop.mma else ''}",
                              f"{loop.steady} per K-step", ""))
            else:
                unrolled = f", unrolled x{loop.elements / loop.remainder.elements:g}" if loop.remainder else ""
                cells.append((f"{_fmt_loads(loop.loads)} ({loop.elements:g} elem{unrolled})",
                              f"{pe[0]:.1f} ({loop.instructions / loop.elements:.1f})", f"{pe[1]:.2f}"))
        if not r["loops"]:
            elements = _bwd_elements(s)
            cells.append((f"(no loop: one block, {elements:g} elem per thread)",
                           f"{r['total'] / elements:.1f} (whole kernel)", f"{r['total_mufu'] / elements:.2f}"))
        lines.append(f"| {s.owner} | {s.job} | {s.kernel} | {r['regs']} | {r['spills']} | {r['smem']} | {r['occupancy']} | "
                     + " | ".join(" / ".join(c[i] for c in cells) for i in range(3)) + " |")
        key = _floor_key(s)
        if key and r["loops"] and key not in per_element:
            pes = [_per_element(loop) for loop in r["loops"]]
            if key == "policy":
                if len(pes) >= 2 and all(pes[:2]):
                    per_element["policy1"], per_element["policy2"] = pes[0], pes[1]
            elif pes[0]:
                per_element[key] = pes[0]
        if key == "bwd" and not r["loops"] and "bwd" not in per_element:
            elements = _bwd_elements(s)
            per_element["bwd"] = (r["total"] / elements, r["total_mufu"] / elements)
    if target == "sm_90" and per_element:
        lines += ["", "## Anchor workloads on H100 and H200 (ESTIMATES)", "",
                  f"Issue floor: instructions per element x elements / 32 lanes / ({ISSUE_PER_SM_PER_CLOCK} warp "
                  f"instructions per SM per clock x SMs x clock). MUFU floor: {MUFU_PER_SM_PER_CLOCK} results per SM per "
                  "clock. Bandwidth floor: bytes moved / HBM bandwidth. The kernel cannot beat the largest of the three; "
                  "a bandwidth-bound kernel has its issue floor below its bandwidth floor. GPUs: "
                  + "; ".join(f"{k}: {v['sms']} SMs, {v['ghz']} GHz, {v['tbps']} TB/s" for k, v in GPUS.items()) + ".", "",
                  "| workload | GPU | instr / elem | MUFU / elem | bandwidth floor ms | issue floor ms | MUFU floor ms | "
                  "issue / bandwidth | bound |", "|---|---|---|---|---|---|---|---|---|"]
        for row in floors(per_element):
            if "tensor_ms" in row:
                lines.append(f"| {row['workload']} | {row['gpu']} | | | {row['bandwidth_ms']:.3f} | tensor-core floor "
                             f"{row['tensor_ms']:.1f} | | | tensor cores |")
                continue
            lines.append(f"| {row['workload']} | {row['gpu']} | {row['inst']:.1f} | {row['mufu']:.2f} | "
                         f"{row['bandwidth_ms']:.3f} | {row['issue_ms']:.3f} | {row['mufu_ms']:.3f} | "
                         f"{row['issue_over_bw']:.2f} | {row['bound']} |")
    if target == "sm_90":
        lines += side_by_side(subjects, target)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    path = out / f"static-{target}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _kernel_per_element(s: Subject, r: dict) -> tuple[float, float]:
    """(instructions, MUFU) per logits element over all of a kernel's hot loops (each loop sweeps
    every element once), or over the whole kernel when it has none."""
    pes = [_per_element(loop, s) for loop in r["loops"]]
    pes = [p for p in pes if p]
    if pes:
        return sum(p[0] for p in pes), sum(p[1] for p in pes)
    elements = _bwd_elements(s)
    return r["total"] / elements, r["total_mufu"] / elements


def side_by_side(subjects: list[Subject], target: str) -> list[str]:
    """Each job at 8192 x 151936 bf16 on H100: fastalign beside TRL and Liger, from the floors."""
    gpu = GPUS["H100 SXM"]
    elements = ANCHOR_ROWS * ANCHOR_VOCAB
    jobs: dict[str, list] = {}
    for s in subjects:
        r = s.results.get(target)
        if s.side_by_side and r and "error" not in r:
            jobs.setdefault(s.side_by_side, []).append((s, r))
    lines = ["", "## Side by side: the same job at 8192 x 151936 on H100 SXM (ESTIMATES)", "",
             "Logits in bf16 unless the job says otherwise. A job's kernels summed (Liger's GRPO is a forward and a "
             "backward kernel; fastalign's is one), per vocabulary position (a distillation job's two rows, one "
             "position). Bound: the largest of the bandwidth, issue and MUFU floors.", "",
             "| job | owner | kernels | regs | instr / elem | MUFU / elem | HBM bytes / elem | bandwidth floor ms | "
             "issue floor ms | bound ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for job, entries in jobs.items():
        by_owner: dict[str, list] = {}
        for s, r in entries:
            by_owner.setdefault(s.owner, []).append((s, r))
        for owner, items in by_owner.items():
            inst = sum(_kernel_per_element(s, r)[0] for s, r in items)
            mufu = sum(_kernel_per_element(s, r)[1] for s, r in items)
            nbytes = sum(s.hbm_bytes for s, _ in items)
            bw = _bandwidth_ms(nbytes * elements, gpu)
            issue = _issue_ms(elements, inst, gpu)
            bound = max(bw, issue, _mufu_ms(elements, mufu, gpu))
            lines.append(f"| {job} | {owner} | {', '.join(s.kernel for s, _ in items)} | "
                         f"{'/'.join(str(r['regs']) for _, r in items)} | {inst:.1f} | {mufu:.2f} | {nbytes:g} | "
                         f"{bw:.3f} | {issue:.3f} | {bound:.3f} |")
    return lines


def _floor_key(s: Subject) -> str | None:
    if s.owner != "fastalign":
        return None
    if s.job.startswith("log-prob + entropy forward (V=151936)"):
        return "fwd"
    if s.job.startswith("log-prob + entropy forward (V=151936, softcap)"):
        return "fwd_softcap"
    if s.job.startswith("log-prob + entropy forward (V=50257)"):
        return "fwd_50257"
    if s.job.startswith("log-prob + entropy backward (V=151936)"):
        return "bwd"
    if s.job.startswith("GRPO policy pass, fwd+bwd in one (V=151936)"):
        return "policy"
    return None


def _bwd_elements(s: Subject) -> float:
    """Logits one thread of a loop-free (one block per program) kernel handles."""
    block = s.kwargs.get("BLOCK", s.kwargs.get("BLOCK_SIZE", 2048))
    return block / (s.kwargs.get("num_warps", 4) * 32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=list(gate.ALL_TARGETS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    peers, notes = peer_subjects()
    args.out.mkdir(parents=True, exist_ok=True)
    for target in args.targets:
        target = gate.target_name(target)
        subjects = our_subjects(target) + peers
        for s in subjects:
            try:
                s.results[target] = analyse(s, target)
            except Exception as exc:
                s.results[target] = dict(error=f"{type(exc).__name__}: {exc}")
        print(write_report(target, subjects, notes, args.out))
    return 0


if __name__ == "__main__":
    import os

    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
