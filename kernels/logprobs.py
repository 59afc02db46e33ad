"""Per-token log-probabilities, with optional entropy and metrics, over the vocabulary (Triton).

Forward: one program per token row reads the row once, BLOCK entries at a time, and keeps online
statistics relative to the running max ``m``. The partial sums stay per thread (one slot per
16-byte tile row) instead of being reduced across the program every chunk: the only cross-warp
reduction inside the loop is the chunk max, and the accumulators are rescaled only on chunks where
the max grows (a uniform branch, rarely taken once the first chunks are seen). With a contiguous
vocabulary the next chunk's load is issued before the current chunk is reduced, so two chunks of
memory traffic are in flight per program.

Backward: a (rows x vocabulary-blocks) grid; each program reads its block of logits once and
writes its block of the gradient once, from the lse (and entropy) the forward saved.

Transform, as TRL applies it: ``y = x * logit_scale``; ``y = softcap * tanh(y / softcap)`` when
``softcap > 0``; ``z = y / temperature``. The constants are folded on the host in float64 into
at most two multiplies, and both passes use the same folded constants, so the z the backward sees
is bit for bit the z the forward reduced.

Exponentials in base 2: ``exp(z - m)`` is ``exp2(fma(z, log2 e, -hi) - lo)`` with the row's
shift ``m * log2 e`` split into ``hi + lo`` once per chunk (_log2e_split): an FMA, an add and one
MUFU.EX2 per element, where ``tl.exp`` costs a subtraction, a multiply, a range fix-up and the
MUFU. The split keeps it exact where it matters: at z = m the argument is exactly 0, whatever the
magnitude of the logits. The entropy's weighted sum runs over those base-2 exponents and turns
natural (times ln 2) once per row.

Rows whose label equals ``ignore_index`` give 0 for every output (``is_top1`` False, ``lse`` 0)
and a zero gradient row; their logits are not read. A label outside ``[0, V)`` that is not
``ignore_index`` is never dereferenced: its log-prob is NaN (the other statistics are still the
row's), and its gradient row is NaN whenever ``grad_logps`` is given (the entropy gradient alone
does not depend on the label and stays finite).
"""

import torch
import triton
import triton.language as tl

from .target import nvidia_options, warps

# Launch configurations. tests/triton_compile_gate.py compiles every kernel exactly as the
# launchers below call it, so a change here is re-checked for registers and spills there.
# Programs are sized in threads (kernels/target.py turns them into warps or wavefronts).
# Forward: 512 threads over an 8 KiB chunk (4096 entries of 2 bytes, 2048 of fp32) is one
# 16-byte load per thread, and few enough registers for two programs per SM (fp32 at 4096 entries
# held 78 registers, one program per SM).
FWD_BLOCK_BYTES = 8192
FWD_THREADS = 512


def fwd_block(dtype: torch.dtype) -> int:
    """Entries per forward chunk for logits of ``dtype``."""
    return FWD_BLOCK_BYTES // torch.empty(0, dtype=dtype).element_size()
# Backward: no cross-lane work at all, so a smaller block gives more programs to hide latency.
BWD_BLOCK = 2048
BWD_THREADS = 256

# The largest grid a launch may use along axis 1 (CUDA's gridDim.y limit).
_MAX_GRID_Y = 65535

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# log(0) in the entropy sums, clamped so that 0 * log(0) stays 0 (NaN still propagates).
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _log2e_split(m):
    """m * log2(e) as hi + lo, hi its fp32 rounding and lo the exact rest (an FMA gives it)."""
    hi = m * LOG2E
    return hi, tl.fma(m, LOG2E, -hi)


@triton.jit
def _exp2_shifted(z, hi, lo):
    """(exp(z - m), its base-2 exponent) for the split of m: at z = m the exponent is exactly 0."""
    d2 = tl.fma(z, LOG2E, -hi) - lo
    return tl.exp2(d2), d2


@triton.jit
def _tanh(a):
    # No tanh in triton.language, and libdevice's does not run under TRITON_INTERPRET. Near 0 the
    # exponential form 1 - 2 / (e^{2|a|} + 1) loses the low bits to cancellation, so |a| < 0.6
    # uses an odd polynomial a + a^3 P(a^2), fitted for relative error on [0, 0.6]; both branches
    # stay within about 2 ulp of tanh in fp32. NaN falls through the exponential branch as NaN.
    m = tl.abs(a)
    s = m * m
    p = -0.0061154147
    p = p * s + 0.020980079
    p = p * s - 0.05383671
    p = p * s + 0.13332522
    p = p * s - 0.3333332
    small = m + m * s * p
    large = 1.0 - 2.0 / (tl.exp2(m * 2.8853900817779268) + 1.0)  # e^{2m}
    t = tl.where(m < 0.6, small, large)
    return tl.where(a < 0.0, -t, t)


@triton.jit
def _transform(x, in_scale, out_scale, SOFTCAP: tl.constexpr):
    # Returns z (and tanh's value, which the backward's chain rule needs; x's own z otherwise).
    if SOFTCAP:
        t = _tanh(x * in_scale)
        return t * out_scale, t
    else:
        z = x * in_scale
        return z, z


@triton.jit
def _fwd_chunk(
    x, cols, first, last, in_vocab, label, in_scale, out_scale,
    m, max_before, s_acc, h_acc, q_acc, z_acc,
    with_log_sum_sq_probs, with_mean_logits, with_is_top1,
    SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, MASKED: tl.constexpr,
):
    # Folds one chunk of raw logits x, vocabulary entries cols (all within [first, last)), into the
    # running statistics; with MASKED only where in_vocab. The metrics that only feed logging
    # (log_sum_sq_probs, mean_logits, is_top1) are runtime flags: a uniform branch per chunk costs
    # next to nothing, their accumulators one register each, and the forward then compiles to 4
    # variants per dtype instead of 64.
    z, _t = _transform(x.to(tl.float32), in_scale, out_scale, SOFTCAP)
    if MASKED:
        # After the transform: softcap maps the padding to a finite number.
        z = tl.where(in_vocab, z, -float("inf"))

    chunk_max = tl.max(tl.max(z, axis=1), axis=0)
    if with_is_top1:
        # Only the chunk that straddles the label needs an elementwise mask.
        if last <= label:
            max_before = tl.maximum(max_before, chunk_max)
        elif first < label:
            before = tl.where(cols < label, z, -float("inf"))
            max_before = tl.maximum(max_before, tl.max(tl.max(before, axis=1), axis=0))

    if chunk_max > m:
        # While m is -inf every accumulator is still 0 (all e were 0); rescaling would compute
        # exp(-inf - -inf) and (-inf) * 0, both NaN, so the first finite max skips it.
        if m > -float("inf"):
            r = tl.exp(m - chunk_max)
            if WITH_ENTROPY:
                # sum e'(z - m') = r * (sum e (z - m) + (m - m') * sum e), in units of log2(e)
                h_acc = r * (h_acc + ((m - chunk_max) * LOG2E) * s_acc)
            if with_log_sum_sq_probs:
                q_acc = q_acc * (r * r)
            s_acc = s_acc * r
        m = chunk_max

    # A chunk that is all -inf while m is still -inf must give e = 0, not exp(-inf + inf) = NaN.
    hi, lo = _log2e_split(tl.where(m > -float("inf"), m, 0.0))
    e, d2 = _exp2_shifted(z, hi, lo)
    s_acc += tl.sum(e, axis=1)
    if WITH_ENTROPY:
        # Accumulated as sum e * (z - m) * log2(e) (ln 2 comes back once per row). e = 0 where
        # d2 = -inf; clamping d2 keeps 0 * -inf from turning into NaN. NaN logits still reach the
        # sums through e (and s) itself.
        h_acc += tl.sum(e * tl.maximum(d2, -_FLT_MAX), axis=1)
    if with_log_sum_sq_probs:
        q_acc += tl.sum(e * e, axis=1)
    if with_mean_logits:
        if MASKED:
            z_acc += tl.sum(tl.where(in_vocab, z, 0.0), axis=1)
        else:
            z_acc += tl.sum(z, axis=1)
    return m, max_before, s_acc, h_acc, q_acc, z_acc


@triton.jit
def _fwd_full_chunks(
    logits_ptr, row_off, V, stride_v, label, in_scale, out_scale,
    with_log_sum_sq_probs, with_mean_logits, with_is_top1,
    SOFTCAP: tl.constexpr, VOCAB_CONTIGUOUS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    """The forward sweep over the full BLOCK-sized chunks of the row that starts at element
    ``row_off`` of ``logits_ptr``. Returns the running statistics, the chunk layout and where the
    chunks began and ended (``head``, ``head + body``); the caller folds the rest of the row in
    with _fwd_remainder (the policy kernel loads its per-token inputs in between).

    With a contiguous vocabulary the chunks start at the row's first 16-byte boundary (``head``
    entries in), so every load is a 16-byte vector load whatever V and the row stride are: an
    odd vocabulary (GPT-2's 50257) or a slice of a padded one costs what an aligned one does."""
    VEC: tl.constexpr = 128 // logits_ptr.dtype.element_ty.primitive_bitwidth
    m = -float("inf")
    max_before = -float("inf")
    s_acc = tl.zeros([BLOCK // VEC], dtype=tl.float32)
    h_acc = tl.zeros([BLOCK // VEC], dtype=tl.float32)
    q_acc = tl.zeros([BLOCK // VEC], dtype=tl.float32)
    z_acc = tl.zeros([BLOCK // VEC], dtype=tl.float32)

    # A chunk is a [BLOCK // VEC, VEC] tile, VEC entries (16 bytes) per tile row: a thread owns
    # whole tile rows, so the per-thread accumulators above are [BLOCK // VEC] and the
    # sum(axis=1) of a chunk needs no communication between threads.
    cols0 = tl.arange(0, BLOCK // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    if VOCAB_CONTIGUOUS:
        # The tensor starts 16-byte aligned (Triton specializes on it); the row may not.
        head = tl.minimum((VEC - row_off % VEC) % VEC, V)
        body = ((V - head) // BLOCK) * BLOCK
        body_ptr = logits_ptr + tl.multiple_of(row_off + head, VEC)
        # Full chunks are loaded two chunks ahead of the math. ptxas issues a prefetch only once
        # the registers it overwrites have been read, i.e. after the chunk about to be reduced
        # has arrived; with a distance of 2 the next chunk's load is still outstanding then, so
        # a program keeps two chunks in flight (with a distance of 1 it would be one). body is
        # a multiple of BLOCK, so each prefetch's mask is all-or-nothing per 16-byte group and
        # the loads stay vectorized.
        x_next = tl.load(body_ptr + cols0, mask=cols0 < body)
        x_after = tl.load(body_ptr + BLOCK + cols0, mask=BLOCK + cols0 < body)
        for start in range(0, body, BLOCK):
            x = x_next
            x_next = x_after
            x_after = tl.load(body_ptr + (start + 2 * BLOCK) + cols0, mask=start + 2 * BLOCK + cols0 < body)
            first = head + start
            m, max_before, s_acc, h_acc, q_acc, z_acc = _fwd_chunk(
                x, first + cols0, first, first + BLOCK, cols0 < BLOCK, label, in_scale, out_scale,
                m, max_before, s_acc, h_acc, q_acc, z_acc,
                with_log_sum_sq_probs, with_mean_logits, with_is_top1,
                SOFTCAP, WITH_ENTROPY, False,
            )
    else:
        # A strided vocabulary is read entry by entry (no vector loads) with a 64-bit address
        # per entry; without the prefetch the registers stay clear of spilling. The stride can
        # be as large as B * T, so index * stride_v is computed in 64 bits.
        head = 0
        body = (V // BLOCK) * BLOCK
        row_ptr = logits_ptr + row_off
        for start in range(0, body, BLOCK):
            x = tl.load(row_ptr + (start + cols0).to(tl.int64) * stride_v)
            m, max_before, s_acc, h_acc, q_acc, z_acc = _fwd_chunk(
                x, start + cols0, start, start + BLOCK, cols0 < BLOCK, label, in_scale, out_scale,
                m, max_before, s_acc, h_acc, q_acc, z_acc,
                with_log_sum_sq_probs, with_mean_logits, with_is_top1,
                SOFTCAP, WITH_ENTROPY, False,
            )
    return m, max_before, s_acc, h_acc, q_acc, z_acc, cols0, head, body


@triton.jit
def _fwd_remainder_chunk(
    logits_ptr, row_off, V, stride_v, label, in_scale, out_scale,
    m, max_before, s_acc, h_acc, q_acc, z_acc, j, head, body,
    with_log_sum_sq_probs, with_mean_logits, with_is_top1,
    SOFTCAP: tl.constexpr, VOCAB_CONTIGUOUS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    # Entries j of what _fwd_full_chunks left: the tail after its chunks, then the head before.
    tail = V - head - body
    cols = tl.where(j < tail, head + body + j, j - tail)
    in_vocab = j < V - body
    row_ptr = logits_ptr + row_off
    if VOCAB_CONTIGUOUS:
        x = tl.load(row_ptr + cols, mask=in_vocab, other=0.0)
    else:
        x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=in_vocab, other=0.0)
    return _fwd_chunk(
        x, cols, 0, V, in_vocab, label, in_scale, out_scale,
        m, max_before, s_acc, h_acc, q_acc, z_acc,
        with_log_sum_sq_probs, with_mean_logits, with_is_top1,
        SOFTCAP, WITH_ENTROPY, True,
    )


@triton.jit
def _fwd_remainder(
    logits_ptr, row_off, V, stride_v, label, in_scale, out_scale,
    m, max_before, s_acc, h_acc, q_acc, z_acc, cols0, head, body,
    with_log_sum_sq_probs, with_mean_logits, with_is_top1,
    SOFTCAP: tl.constexpr, VOCAB_CONTIGUOUS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    """Folds in the entries _fwd_full_chunks left (the tail, and the head of fewer than 16 bytes)
    in one masked chunk; in two when together they pass BLOCK (a head of a few entries and a tail
    of almost a chunk, rarely)."""
    if body < V:
        m, max_before, s_acc, h_acc, q_acc, z_acc = _fwd_remainder_chunk(
            logits_ptr, row_off, V, stride_v, label, in_scale, out_scale,
            m, max_before, s_acc, h_acc, q_acc, z_acc, cols0, head, body,
            with_log_sum_sq_probs, with_mean_logits, with_is_top1,
            SOFTCAP, VOCAB_CONTIGUOUS, WITH_ENTROPY,
        )
    if body + BLOCK < V:
        m, max_before, s_acc, h_acc, q_acc, z_acc = _fwd_remainder_chunk(
            logits_ptr, row_off, V, stride_v, label, in_scale, out_scale,
            m, max_before, s_acc, h_acc, q_acc, z_acc, BLOCK + cols0, head, body,
            with_log_sum_sq_probs, with_mean_logits, with_is_top1,
            SOFTCAP, VOCAB_CONTIGUOUS, WITH_ENTROPY,
        )
    return m, max_before, s_acc, h_acc, q_acc, z_acc


@triton.jit(do_not_specialize=["T", "stride_v", "ignore_index"])
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr,
    logps_ptr, lse_ptr, entropy_ptr, log_sum_sq_probs_ptr, mean_logits_ptr, is_top1_ptr,
    T, V, stride_b, stride_t, stride_v,
    in_scale, out_scale, ignore_index,
    with_log_sum_sq_probs, with_mean_logits, with_is_top1,
    SOFTCAP: tl.constexpr, VOCAB_CONTIGUOUS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # 64-bit from the start: rows * strides passes 2^31 at real sizes.
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(logps_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        if with_log_sum_sq_probs:
            tl.store(log_sum_sq_probs_ptr + row, 0.0)
        if with_mean_logits:
            tl.store(mean_logits_ptr + row, 0.0)
        if with_is_top1:
            tl.store(is_top1_ptr + row, 0)
        return

    # Traced callers may pass Python floats as fp64; the math stays in fp32.
    in_scale = tl.cast(in_scale, tl.float32)
    out_scale = tl.cast(out_scale, tl.float32)
    b = row // T
    row_off = b * stride_b + (row - b * T) * stride_t
    row_ptr = logits_ptr + row_off

    m, max_before, s_acc, h_acc, q_acc, z_acc, cols0, head, body = _fwd_full_chunks(
        logits_ptr, row_off, V, stride_v, label, in_scale, out_scale,
        with_log_sum_sq_probs, with_mean_logits, with_is_top1,
        SOFTCAP, VOCAB_CONTIGUOUS, WITH_ENTROPY, BLOCK,
    )
    m, max_before, s_acc, h_acc, q_acc, z_acc = _fwd_remainder(
        logits_ptr, row_off, V, stride_v, label, in_scale, out_scale,
        m, max_before, s_acc, h_acc, q_acc, z_acc, cols0, head, body,
        with_log_sum_sq_probs, with_mean_logits, with_is_top1,
        SOFTCAP, VOCAB_CONTIGUOUS, WITH_ENTROPY, BLOCK,
    )

    s = tl.sum(s_acc, axis=0)
    log_s = tl.log(s)
    tl.store(lse_ptr + row, m + log_s)

    in_range = (label >= 0) & (label < V)
    if VOCAB_CONTIGUOUS:
        label_ptr = row_ptr + label
    else:
        label_ptr = row_ptr + label * stride_v
    # Masked, so an out-of-range label is never dereferenced.
    x_label = tl.load(label_ptr, mask=in_range, other=0.0).to(tl.float32)
    z_label, _t = _transform(x_label, in_scale, out_scale, SOFTCAP)
    # (z - m) - log s rather than z - lse: exact when z is the max, whatever the logits' magnitude.
    tl.store(logps_ptr + row, tl.where(in_range, (z_label - m) - log_s, float("nan")))

    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, log_s - (tl.sum(h_acc, axis=0) / s) * LN2)
    if with_log_sum_sq_probs:
        tl.store(log_sum_sq_probs_ptr + row, tl.log(tl.sum(q_acc, axis=0)) - 2.0 * log_s)
    if with_mean_logits:
        tl.store(mean_logits_ptr + row, tl.sum(z_acc, axis=0) / V)
    if with_is_top1:
        # First argmax: at least the max, and strictly above everything before it.
        top1 = in_range & (z_label >= m) & (z_label > max_before)
        tl.store(is_top1_ptr + row, top1.to(tl.int8))


@triton.jit(do_not_specialize=["T", "stride_v", "ignore_index"])
def _token_logprobs_bwd_kernel(
    logits_ptr, labels_ptr, lse_ptr, entropy_ptr, grad_logps_ptr, grad_entropy_ptr, grad_logits_ptr,
    T, V, stride_b, stride_t, stride_v,
    in_scale, out_scale, grad_scale, ignore_index,
    SOFTCAP: tl.constexpr, VOCAB_CONTIGUOUS: tl.constexpr,
    HAS_GRAD_LOGPS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = cols < V
    # The gradient is a fresh contiguous [B, T, V] tensor.
    out_ptrs = grad_logits_ptr + row * V + cols
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(out_ptrs, tl.zeros([BLOCK], dtype=grad_logits_ptr.dtype.element_ty), mask=in_vocab)
        return

    in_scale = tl.cast(in_scale, tl.float32)
    out_scale = tl.cast(out_scale, tl.float32)
    grad_scale = tl.cast(grad_scale, tl.float32)
    b = row // T
    row_ptr = logits_ptr + b * stride_b + (row - b * T) * stride_t
    if VOCAB_CONTIGUOUS:
        ptrs = row_ptr + cols
    else:
        # The stride can be as large as B * T: index * stride_v in 64 bits.
        ptrs = row_ptr + cols.to(tl.int64) * stride_v
    x = tl.load(ptrs, mask=in_vocab, other=0.0).to(tl.float32)
    z, t = _transform(x, in_scale, out_scale, SOFTCAP)
    hi, lo = _log2e_split(tl.load(lse_ptr + row))
    p, log_p2 = _exp2_shifted(z, hi, lo)

    dz = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_GRAD_LOGPS:
        g_logp = tl.load(grad_logps_ptr + row)
        # A label outside the vocabulary has a NaN log-prob; its gradient says so too.
        g_logp = tl.where((label >= 0) & (label < V), g_logp, float("nan"))
        dz += g_logp * (tl.where(cols == label, 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        # p (log p + H) = ln 2 * p (log2 p + H log2 e): the base change rides on the row's scalars.
        g_h = tl.load(grad_entropy_ptr + row) * LN2
        entropy2 = tl.load(entropy_ptr + row) * LOG2E
        # p = 0 where log_p = -inf; the clamp keeps 0 * -inf at 0 (NaN logits stay NaN through p).
        dz -= g_h * p * (tl.maximum(log_p2, -_FLT_MAX) + entropy2)
    # Chain rule back through the transform: dz/dx = (1 - tanh^2) * logit_scale / temperature.
    if SOFTCAP:
        dz = dz * (1.0 - t * t)
    dz = dz * grad_scale
    tl.store(out_ptrs, dz.to(grad_logits_ptr.dtype.element_ty), mask=in_vocab)


def _transform_constants(temperature: float, logit_scale: float, softcap: float) -> tuple[float, float]:
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap > 0.0:
        return logit_scale / softcap, softcap / temperature
    return logit_scale / temperature, 1.0


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int]:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    B, T, V = logits.shape
    if labels.shape != (B * T,) or labels.dtype != torch.int64 or (B * T > 1 and labels.stride(0) != 1):
        raise ValueError(
            f"labels must be a contiguous int64 tensor of shape [{B * T}], got {labels.dtype} "
            f"{tuple(labels.shape)} with strides {labels.stride()}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels on {labels.device}, logits on {logits.device}")
    return B, T, V


def token_logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
    with_entropy: bool,
    with_log_sum_sq_probs: bool,
    with_mean_logits: bool,
    with_is_top1: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs of ``labels`` under ``logits`` ([B, T, V], any strides, read in place).

    Returns ``(logps, entropy, log_sum_sq_probs, mean_logits, is_top1, lse)``, each of shape
    ``[B * T]`` (float32; ``is_top1`` bool); an output that was not asked for is an empty tensor
    of shape ``[0]``. ``softcap == 0`` means no softcap.
    """
    B, T, V = _check_inputs(logits, labels)
    N = B * T
    device = logits.device

    def f32(flag: bool = True) -> torch.Tensor:
        return torch.empty(N if flag else 0, dtype=torch.float32, device=device)

    logps, lse = f32(), f32()
    entropy, log_sum_sq_probs, mean_logits = f32(with_entropy), f32(with_log_sum_sq_probs), f32(with_mean_logits)
    is_top1 = torch.empty(N if with_is_top1 else 0, dtype=torch.bool, device=device)
    if N == 0:
        return logps, entropy, log_sum_sq_probs, mean_logits, is_top1, lse

    in_scale, out_scale = _transform_constants(temperature, logit_scale, softcap)
    stride_b, stride_t, stride_v = logits.stride()
    _token_logprobs_fwd_kernel[(N,)](
        logits, labels,
        logps, lse, entropy, log_sum_sq_probs, mean_logits, is_top1,
        T, V, stride_b, stride_t, stride_v,
        in_scale, out_scale, ignore_index,
        bool(with_log_sum_sq_probs), bool(with_mean_logits), bool(with_is_top1),
        SOFTCAP=softcap > 0.0,
        VOCAB_CONTIGUOUS=stride_v == 1,
        WITH_ENTROPY=bool(with_entropy),
        BLOCK=fwd_block(logits.dtype),
        num_warps=warps(FWD_THREADS),
        # A strided vocabulary keeps a 64-bit address per entry live; left to itself ptxas holds
        # such variants to the register count of three programs per SM on sm_120 (40) and spills.
        **nvidia_options(maxnreg=None if stride_v == 1 else 128),
        # Pinned: Triton 3.10 turns FMA contraction off by default.
        enable_fp_fusion=True,
    )
    return logps, entropy, log_sum_sq_probs, mean_logits, is_top1, lse


def token_logprobs_backward(
    grad_logps: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    temperature: float,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits`` ([B, T, V], contiguous, ``logits.dtype``) of
    ``sum(grad_logps * logps) + sum(grad_entropy * entropy)``; ``None`` gradients count as zero.

    ``lse`` (and ``entropy`` when ``grad_entropy`` is given) are the forward's outputs.
    """
    B, T, V = _check_inputs(logits, labels)
    N = B * T
    if (grad_logps is None and grad_entropy is None) or N == 0 or V == 0:
        return torch.zeros((B, T, V), dtype=logits.dtype, device=logits.device)
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the forward's entropy")
    n_blocks = triton.cdiv(V, BWD_BLOCK)
    if n_blocks > _MAX_GRID_Y:
        raise ValueError(f"vocabulary of {V} entries needs {n_blocks} blocks, more than the grid allows")

    has_grad_logps, has_grad_entropy = grad_logps is not None, grad_entropy is not None
    lse = lse.contiguous()
    # Unused pointer arguments get lse, which keeps the kernel signature the same in every case.
    grad_logps = lse if grad_logps is None else grad_logps.to(torch.float32).contiguous()
    if grad_entropy is None:
        grad_entropy = entropy = lse
    else:
        grad_entropy = grad_entropy.to(torch.float32).contiguous()
        entropy = entropy.contiguous()
    grad_logits = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    in_scale, out_scale = _transform_constants(temperature, logit_scale, softcap)
    stride_b, stride_t, stride_v = logits.stride()
    _token_logprobs_bwd_kernel[(N, n_blocks)](
        logits, labels, lse, entropy, grad_logps, grad_entropy, grad_logits,
        T, V, stride_b, stride_t, stride_v,
        in_scale, out_scale, logit_scale / temperature, ignore_index,
        SOFTCAP=softcap > 0.0,
        VOCAB_CONTIGUOUS=stride_v == 1,
        HAS_GRAD_LOGPS=has_grad_logps,
        HAS_GRAD_ENTROPY=has_grad_entropy,
        BLOCK=BWD_BLOCK,
        num_warps=warps(BWD_THREADS),
        enable_fp_fusion=True,
    )
    return grad_logits
