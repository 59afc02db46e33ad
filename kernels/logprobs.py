"""Per-token log-probabilities, with optional entropy and metrics, over the vocabulary (Triton).

Forward: one program per token row reads the row once, BLOCK entries at a time, and keeps online
statistics relative to a running max. Each thread keeps its own (one slot per 16-byte tile row:
its max, sum-exp and entropy sum), rescaled every chunk by a factor that is 1 unless the slot's
max grew, and the slots are merged once, at the end of the row: no communication between threads
inside the loop at all. With a contiguous vocabulary the loads run two chunks ahead of the math,
so two chunks of memory traffic are in flight per program.

Backward: a (rows x vocabulary-blocks) grid; each program reads its block of logits once and
writes its block of the gradient once, from the row normalizer (and entropy) the forward saved.

The normalizer of a row is ``(shift, log_s)`` (``norm``, [N, 2]), as in
``fastalign/reference/logprobs.py``: ``u`` is x without softcap and tanh's value with it, ``z = u *
factor``, shift is u at the row's largest z (0 where that is not finite) and log p = (u - shift) *
factor - log_s. A difference of close logits is exact, so the largest probabilities of a row keep
their precision at any magnitude, where ``z - lse`` with both rounded loses ``|z| * 6e-8``.

Transform, as TRL applies it: ``y = x * logit_scale``; ``y = softcap * tanh(y / softcap)`` when
``softcap > 0``; ``z = y / temperature``. The constants are folded on the host in float64 into
at most two multiplies (tanh's own factor 2 log2(e) included), and both passes use the same
folded constants.

Exponentials in base 2, on w, where z = w * w_scale: w is x itself without softcap (the scale
is folded into the exponent's constant, and a negative one moved onto the logits by the
launcher), tanh's value with it. ``exp(z - m)`` is ``exp2((w - max w) * w_scale log2 e)``: an
add, a multiply and one MUFU.EX2 per element, where ``tl.exp`` of z costs a multiply, a
subtraction, a multiply, a range fix-up and the MUFU. The difference is taken before any scaling,
which keeps it exact where it matters: at the max the argument is exactly 0, and close to it the
difference of two logits is exact, whatever the magnitude of the logits (up to fp32's limit). The
entropy's weighted sum runs over those base-2 exponents and turns natural (times ln 2) once per row.

Rows whose label equals ``ignore_index`` give 0 for every output (``is_top1`` False, ``norm`` 0)
and a zero gradient row; their logits are not read. A label outside ``[0, V)`` that is not
``ignore_index`` is never dereferenced: its log-prob is NaN (the other statistics are still the
row's), and its gradient row is NaN whenever ``grad_logps`` is given (the entropy gradient alone
does not depend on the label and stays finite).
"""

import math

import torch
import triton
import triton.language as tl

from .target import nvidia_arch, nvidia_options, warps

# Launch configurations. tests/ops/triton_compile_gate.py compiles every kernel exactly as the
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
def _scaled_split(m, scale):
    """m * scale as hi + lo, hi its fp32 rounding and lo the exact rest (an FMA gives it)."""
    hi = m * scale
    return hi, tl.fma(m, scale, -hi)


@triton.jit
def _log2e_split(m):
    return _scaled_split(m, LOG2E)


@triton.jit
def _tanh_scaled(a2):
    # tanh(a) from a2 = 2 a log2(e) (the factor rides on the host-folded scale), with
    # E = e^{-2|a|} in (0, 1]: sign(a) (1 - E) / (1 + E), the division as (1 - E) rsqrt((1 + E)^2).
    # Two MUFU operations and five others, no branch, no overflow (E never exceeds 1); NaN stays
    # NaN. The absolute error stays within a few 1e-7 for every a (on GPUs the MUFU
    # approximations included): softcap * tanh is only compared, exponentiated and summed in
    # absolute terms, so that is what counts. The form 1 - 2 / (e^{2a} + 1), one add cheaper, errs
    # about 4e-7 near 0 (30x in a softcapped logit: more than the fp32 reference's own error).
    e = tl.exp2(-tl.abs(a2))
    d = 1.0 + e
    t = (1.0 - e) * tl.math.rsqrt(d * d)
    # t >= 0: OR-ing in a2's sign bit is copysign in one instruction.
    bits = t.to(tl.uint32, bitcast=True) | (a2.to(tl.uint32, bitcast=True) & 0x80000000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store_norm(norm_ptr, row, m_w, log_s):
    # The shift is 0 where the max is not finite (a row of -inf, or NaN), as the reference's.
    finite = (m_w > -float("inf")) & (m_w < float("inf"))
    tl.store(norm_ptr + 2 * row, tl.where(finite, m_w, 0.0))
    tl.store(norm_ptr + 2 * row + 1, log_s)


@triton.jit
def _log2_prob(u, shift, hi, lo, factor_log2e):
    """log2 p of u (x, or tanh's value under softcap) from its row's normalizer (shift, log s),
    with hi + lo = log s * log2(e) split exactly (_log2e_split, once per row): (u - shift) *
    factor log2(e) - hi - lo. Every backward sweep takes its exponent here."""
    return tl.fma(u - shift, factor_log2e, -hi) - lo


@triton.jit
def _pre_scale(x, in_scale, SOFTCAP: tl.constexpr):
    # The forward's w, with z = w * w_scale (_w_scale): tanh's value with softcap, x itself
    # without. The sweep keeps its running max in w and folds w_scale into the exponent's
    # constant, so neither the scale nor the softcap's outer multiply costs an instruction per
    # entry. w_scale is never negative (the launchers see to it), so z = w * w_scale is monotone
    # in w and the max of z is the max of w times w_scale, exactly.
    if SOFTCAP:
        return _tanh_scaled(x * in_scale)
    else:
        return x


@triton.jit
def _w_scale(in_scale, out_scale, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        return out_scale
    else:
        return in_scale


@triton.jit
def _fwd_chunk(
    x, cols, first, last, in_vocab, label, in_scale, w_log2e,
    m, max_before, s_acc, h_acc, q_acc, z_acc,
    with_log_sum_sq_probs, with_mean_logits, with_is_top1,
    SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, MASKED: tl.constexpr,
):
    # Folds one chunk of raw logits x, vocabulary entries cols (all within [first, last)), into the
    # running statistics; with MASKED only where in_vocab. Everything runs on w (_pre_scale), with
    # w_log2e = w_scale * log2(e) turning it into base-2 exponents.
    #
    # The statistics are per tile row (one slot per 16-byte row, all of it in one thread), each
    # relative to its own running max m: s = sum 2^((w - m) w_log2e), h = sum 2^(..) (w - m)
    # w_log2e, q = sum 2^(2 (..)). Slots share nothing until the row is done (_fwd_finish): a
    # max shared by the program would cost a reduction across warps (shuffles, two barriers) per
    # chunk. A slot's rescale when its max grows is computed every chunk instead, as a multiply by
    # 2^((m - m') w_log2e) that is 1 when nothing changed: a few instructions per 8 entries. The
    # metrics that only feed logging (log_sum_sq_probs, mean_logits, is_top1) are runtime flags:
    # a uniform branch per chunk costs next to nothing, their accumulators one register each, and
    # the forward then compiles to 4 variants per dtype instead of 64.
    w = _pre_scale(x.to(tl.float32), in_scale, SOFTCAP)
    if MASKED:
        # After the transform: softcap maps the padding to a finite number.
        w = tl.where(in_vocab, w, -float("inf"))

    row_max = tl.max(w, axis=1)
    if with_is_top1:
        # Only the chunk that straddles the label needs an elementwise mask.
        if last <= label:
            max_before = tl.maximum(max_before, row_max)
        elif first < label:
            max_before = tl.maximum(max_before, tl.max(tl.where(cols < label, w, -float("inf")), axis=1))

    m_new = tl.maximum(m, row_max)
    # The rescale's exponent, base 2. While a slot's max is -inf its sums are 0 (or NaN, kept):
    # -inf - -inf is NaN and -inf - m' is -inf, and both clamp to -FLT_MAX, where 2^x = 0 and the
    # entropy's x * s stays 0 * finite.
    r2 = tl.maximum((m - m_new) * w_log2e, -_FLT_MAX)
    r = tl.exp2(r2)
    if WITH_ENTROPY:
        # sum e' d' = sum e r (d + (m - m') w_log2e) = r (h + r2 s)
        h_acc = r * (h_acc + r2 * s_acc)
    if with_log_sum_sq_probs:
        q_acc = q_acc * (r * r)
    s_acc = s_acc * r
    m = m_new

    # A slot that is all -inf while m is still -inf must give e = 0, not 2^(-inf + inf) = NaN.
    m_shift = tl.where(m > -float("inf"), m, 0.0)
    # (w - m) w_log2e: exactly 0 at the slot's max and exact for logits close to it, whatever the
    # logits' magnitude (up to fp32's limit: w itself is never scaled, so w log2 e may overflow).
    d2 = (w - m_shift[:, None]) * w_log2e
    if MASKED:
        # The padding's -inf times a zero scale would be NaN.
        d2 = tl.where(in_vocab, d2, -float("inf"))
    e = tl.exp2(d2)
    s_acc += tl.sum(e, axis=1)
    if WITH_ENTROPY:
        # Accumulated in units of log2(e) (ln 2 comes back once per row). e = 0 where d2 = -inf;
        # clamping d2 keeps 0 * -inf from turning into NaN. NaN logits still reach the sums
        # through e (and s) itself.
        h_acc += tl.sum(e * tl.maximum(d2, -_FLT_MAX), axis=1)
    if with_log_sum_sq_probs:
        q_acc += tl.sum(e * e, axis=1)
    if with_mean_logits:
        if MASKED:
            z_acc += tl.sum(tl.where(in_vocab, w, 0.0), axis=1)
        else:
            z_acc += tl.sum(w, axis=1)
    return m, max_before, s_acc, h_acc, q_acc, z_acc


@triton.jit
def _fwd_finish(m, max_before, s_acc, h_acc, q_acc, z_acc, w_scale, w_log2e,
                with_log_sum_sq_probs, with_mean_logits, with_is_top1, WITH_ENTROPY: tl.constexpr):
    """The per-slot statistics of a row, merged relative to the row's max: returns (max of w, m,
    max_before, s, h, q, logit sum) with m, max_before and the logit sum in z, s = sum exp(z - m),
    h = sum exp(z - m) (z - m) log2(e) and q = sum exp(z - m)^2 (q, h and the logit sum only where
    asked for)."""
    m_w = tl.max(m, axis=0)
    # Each slot's sums move from its own max to the row's; a slot still at -inf (all -inf, or NaN
    # only) gets r = 0 and passes its 0 or NaN on, as in _fwd_chunk.
    r2 = tl.maximum((m - m_w) * w_log2e, -_FLT_MAX)
    r = tl.exp2(r2)
    s = tl.sum(s_acc * r, axis=0)
    h = 0.0
    if WITH_ENTROPY:
        h = tl.sum(r * (h_acc + r2 * s_acc), axis=0)
    q = 0.0
    if with_log_sum_sq_probs:
        q = tl.sum(q_acc * (r * r), axis=0)
    z_sum = 0.0
    if with_mean_logits:
        z_sum = tl.sum(z_acc, axis=0) * w_scale
    before = -float("inf")
    if with_is_top1:
        # z = w * w_scale rounds monotonically: the max of the products is the product of the max.
        # Nothing before the label stays -inf, also when w_scale is 0.
        before_w = tl.max(max_before, axis=0)
        before = tl.where(before_w > -float("inf"), before_w * w_scale, -float("inf"))
    return m_w, m_w * w_scale, before, s, h, q, z_sum


@triton.jit
def _fwd_full_chunks(
    logits_ptr, row_off, V, stride_v, label, in_scale, w_log2e,
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
    m = tl.full([BLOCK // VEC], -float("inf"), dtype=tl.float32)
    max_before = tl.full([BLOCK // VEC], -float("inf"), dtype=tl.float32)
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
        # the loads stay vectorized. Unrolled three times: the prefetch rotates three register
        # sets, which a rolled loop pays for with a move per register per chunk (about one
        # instruction per entry); unrolled, the rotation is renaming.
        x_next = tl.load(body_ptr + cols0, mask=cols0 < body)
        x_after = tl.load(body_ptr + BLOCK + cols0, mask=BLOCK + cols0 < body)
        for start in tl.range(0, body, BLOCK, loop_unroll_factor=3):
            x = x_next
            x_next = x_after
            x_after = tl.load(body_ptr + (start + 2 * BLOCK) + cols0, mask=start + 2 * BLOCK + cols0 < body)
            first = head + start
            m, max_before, s_acc, h_acc, q_acc, z_acc = _fwd_chunk(
                x, first + cols0, first, first + BLOCK, cols0 < BLOCK, label, in_scale, w_log2e,
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
                x, start + cols0, start, start + BLOCK, cols0 < BLOCK, label, in_scale, w_log2e,
                m, max_before, s_acc, h_acc, q_acc, z_acc,
                with_log_sum_sq_probs, with_mean_logits, with_is_top1,
                SOFTCAP, WITH_ENTROPY, False,
            )
    return m, max_before, s_acc, h_acc, q_acc, z_acc, cols0, head, body


@triton.jit
def _fwd_remainder_chunk(
    logits_ptr, row_off, V, stride_v, label, in_scale, w_log2e,
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
        x, cols, 0, V, in_vocab, label, in_scale, w_log2e,
        m, max_before, s_acc, h_acc, q_acc, z_acc,
        with_log_sum_sq_probs, with_mean_logits, with_is_top1,
        SOFTCAP, WITH_ENTROPY, True,
    )


@triton.jit
def _fwd_remainder(
    logits_ptr, row_off, V, stride_v, label, in_scale, w_log2e,
    m, max_before, s_acc, h_acc, q_acc, z_acc, cols0, head, body,
    with_log_sum_sq_probs, with_mean_logits, with_is_top1,
    SOFTCAP: tl.constexpr, VOCAB_CONTIGUOUS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    """Folds in the entries _fwd_full_chunks left (the tail, and the head of fewer than 16 bytes)
    in one masked chunk; in two when together they pass BLOCK (a head of a few entries and a tail
    of almost a chunk, rarely)."""
    if body < V:
        m, max_before, s_acc, h_acc, q_acc, z_acc = _fwd_remainder_chunk(
            logits_ptr, row_off, V, stride_v, label, in_scale, w_log2e,
            m, max_before, s_acc, h_acc, q_acc, z_acc, cols0, head, body,
            with_log_sum_sq_probs, with_mean_logits, with_is_top1,
            SOFTCAP, VOCAB_CONTIGUOUS, WITH_ENTROPY,
        )
    if body + BLOCK < V:
        m, max_before, s_acc, h_acc, q_acc, z_acc = _fwd_remainder_chunk(
            logits_ptr, row_off, V, stride_v, label, in_scale, w_log2e,
            m, max_before, s_acc, h_acc, q_acc, z_acc, BLOCK + cols0, head, body,
            with_log_sum_sq_probs, with_mean_logits, with_is_top1,
            SOFTCAP, VOCAB_CONTIGUOUS, WITH_ENTROPY,
        )
    return m, max_before, s_acc, h_acc, q_acc, z_acc


@triton.jit(do_not_specialize=["T", "stride_v", "ignore_index"])
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr,
    logps_ptr, norm_ptr, entropy_ptr, log_sum_sq_probs_ptr, mean_logits_ptr, is_top1_ptr,
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
        tl.store(norm_ptr + 2 * row, 0.0)
        tl.store(norm_ptr + 2 * row + 1, 0.0)
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

    w_scale = _w_scale(in_scale, out_scale, SOFTCAP)
    w_log2e = w_scale * LOG2E
    m, max_before, s_acc, h_acc, q_acc, z_acc, cols0, head, body = _fwd_full_chunks(
        logits_ptr, row_off, V, stride_v, label, in_scale, w_log2e,
        with_log_sum_sq_probs, with_mean_logits, with_is_top1,
        SOFTCAP, VOCAB_CONTIGUOUS, WITH_ENTROPY, BLOCK,
    )
    m, max_before, s_acc, h_acc, q_acc, z_acc = _fwd_remainder(
        logits_ptr, row_off, V, stride_v, label, in_scale, w_log2e,
        m, max_before, s_acc, h_acc, q_acc, z_acc, cols0, head, body,
        with_log_sum_sq_probs, with_mean_logits, with_is_top1,
        SOFTCAP, VOCAB_CONTIGUOUS, WITH_ENTROPY, BLOCK,
    )
    m_w, m, max_before, s, h, q, z_sum = _fwd_finish(
        m, max_before, s_acc, h_acc, q_acc, z_acc, w_scale, w_log2e,
        with_log_sum_sq_probs, with_mean_logits, with_is_top1, WITH_ENTROPY,
    )
    log_s = tl.log(s)
    _store_norm(norm_ptr, row, m_w, log_s)

    in_range = (label >= 0) & (label < V)
    if VOCAB_CONTIGUOUS:
        label_ptr = row_ptr + label
    else:
        label_ptr = row_ptr + label * stride_v
    # Masked, so an out-of-range label is never dereferenced.
    x_label = tl.load(label_ptr, mask=in_range, other=0.0).to(tl.float32)
    w_label = _pre_scale(x_label, in_scale, SOFTCAP)
    z_label = w_label * w_scale
    # (w - max w) * w_scale - log s rather than z - lse: exact when z is the max, whatever the
    # logits' magnitude, and z - m rounded once, as the sum's exponents are (d2 in _fwd_chunk).
    tl.store(logps_ptr + row, tl.where(in_range, (w_label - m_w) * w_scale - log_s, float("nan")))

    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, log_s - (h / s) * LN2)
    if with_log_sum_sq_probs:
        tl.store(log_sum_sq_probs_ptr + row, tl.log(q) - 2.0 * log_s)
    if with_mean_logits:
        tl.store(mean_logits_ptr + row, z_sum / V)
    if with_is_top1:
        # First argmax: at least the max, and strictly above everything before it.
        top1 = in_range & (z_label >= m) & (z_label > max_before)
        tl.store(is_top1_ptr + row, top1.to(tl.int8))


@triton.jit(do_not_specialize=["T", "stride_v", "ignore_index"])
def _token_logprobs_bwd_kernel(
    logits_ptr, labels_ptr, norm_ptr, entropy_ptr, grad_logps_ptr, grad_entropy_ptr, grad_logits_ptr,
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
    # u and its factor: z = u * factor (without softcap the factor is logit_scale / T, any sign).
    u = _pre_scale(x, in_scale, SOFTCAP)
    hi, lo = _log2e_split(tl.load(norm_ptr + 2 * row + 1))
    log_p2 = _log2_prob(u, tl.load(norm_ptr + 2 * row), hi, lo, _w_scale(in_scale, out_scale, SOFTCAP) * LOG2E)
    p = tl.exp2(log_p2)

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
        dz = dz * (1.0 - u * u)
    dz = dz * grad_scale
    tl.store(out_ptrs, dz.to(grad_logits_ptr.dtype.element_ty), mask=in_vocab)


def _transform_constants(temperature: float, logit_scale: float, softcap: float) -> tuple[float, float]:
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap > 0.0:
        # tanh's argument arrives times 2 log2(e) (_tanh_scaled).
        return 2.0 * math.log2(math.e) * logit_scale / softcap, softcap / temperature
    return logit_scale / temperature, 1.0


def _fwd_maxnreg(logits: torch.Tensor) -> int | None:
    # A strided vocabulary keeps a 64-bit address per entry live; left to itself ptxas holds such
    # variants to the register count of three programs per SM on sm_120 (40) and spills. The
    # unrolled contiguous loop over 2-byte logits, left to itself, takes 94 registers on sm_90
    # (hoisting loads), one program per SM; held to 64 it runs two, unspilled, at the same
    # instruction count on sm_80 to sm_90. On sm_100 (fp16 with softcap) and sm_120 64 spills:
    # there ptxas chooses (one program per SM, as before the unrolling). fp32 fits three programs
    # per SM unforced.
    if logits.stride(-1) != 1:
        return 128
    arch = nvidia_arch()
    return 64 if logits.element_size() == 2 and arch is not None and 80 <= arch < 100 else None


def _forward_operands(logits: torch.Tensor, temperature: float, logit_scale: float, softcap: float):
    """(logits, in_scale, out_scale, negated) for the forward sweeps, which need a scale of w that
    is not negative (_pre_scale). Without softcap a negative logit_scale (no model has one, but it
    is valid) is moved onto the logits: z = (-x) * (-scale) exactly, at the cost of a negated copy."""
    in_scale, out_scale = _transform_constants(temperature, logit_scale, softcap)
    if softcap == 0.0 and in_scale < 0.0:
        return logits.neg(), -in_scale, out_scale, True
    return logits, in_scale, out_scale, False


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

    Returns ``(logps, entropy, log_sum_sq_probs, mean_logits, is_top1, norm)``, each of shape
    ``[B * T]`` (float32; ``is_top1`` bool; ``norm`` [B * T, 2], the rows' normalizers for the
    backward); an output that was not asked for is an empty tensor of shape ``[0]``.
    ``softcap == 0`` means no softcap.
    """
    B, T, V = _check_inputs(logits, labels)
    N = B * T
    device = logits.device

    def f32(flag: bool = True) -> torch.Tensor:
        return torch.empty(N if flag else 0, dtype=torch.float32, device=device)

    logps, norm = f32(), torch.empty((N, 2), dtype=torch.float32, device=device)
    entropy, log_sum_sq_probs, mean_logits = f32(with_entropy), f32(with_log_sum_sq_probs), f32(with_mean_logits)
    is_top1 = torch.empty(N if with_is_top1 else 0, dtype=torch.bool, device=device)
    if N == 0:
        return logps, entropy, log_sum_sq_probs, mean_logits, is_top1, norm

    logits, in_scale, out_scale, negated = _forward_operands(logits, temperature, logit_scale, softcap)
    stride_b, stride_t, stride_v = logits.stride()
    _token_logprobs_fwd_kernel[(N,)](
        logits, labels,
        logps, norm, entropy, log_sum_sq_probs, mean_logits, is_top1,
        T, V, stride_b, stride_t, stride_v,
        in_scale, out_scale, ignore_index,
        bool(with_log_sum_sq_probs), bool(with_mean_logits), bool(with_is_top1),
        SOFTCAP=softcap > 0.0,
        VOCAB_CONTIGUOUS=stride_v == 1,
        WITH_ENTROPY=bool(with_entropy),
        BLOCK=fwd_block(logits.dtype),
        num_warps=warps(FWD_THREADS),
        **nvidia_options(maxnreg=_fwd_maxnreg(logits)),
        # Pinned: Triton 3.10 turns FMA contraction off by default.
        enable_fp_fusion=True,
    )
    if negated:  # the kernel saw -x: its max of -x is the shift's negative
        norm[:, 0].neg_()
    return logps, entropy, log_sum_sq_probs, mean_logits, is_top1, norm


def token_logprobs_backward(
    grad_logps: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    norm: torch.Tensor,
    entropy: torch.Tensor | None,
    temperature: float,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits`` ([B, T, V], contiguous, ``logits.dtype``) of
    ``sum(grad_logps * logps) + sum(grad_entropy * entropy)``; ``None`` gradients count as zero.

    ``norm`` [B * T, 2] (and ``entropy`` when ``grad_entropy`` is given) are the forward's outputs.
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

    if norm.shape != (N, 2):
        raise ValueError(f"norm must be the forward's [{N}, 2] normalizer, got {tuple(norm.shape)}")
    has_grad_logps, has_grad_entropy = grad_logps is not None, grad_entropy is not None
    norm = norm.to(torch.float32).contiguous()
    # Unused pointer arguments get norm, which keeps the kernel signature the same in every case.
    grad_logps = norm if grad_logps is None else grad_logps.to(torch.float32).contiguous()
    if grad_entropy is None:
        grad_entropy = entropy = norm
    else:
        grad_entropy = grad_entropy.to(torch.float32).contiguous()
        entropy = entropy.contiguous()
    grad_logits = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    in_scale, out_scale = _transform_constants(temperature, logit_scale, softcap)
    stride_b, stride_t, stride_v = logits.stride()
    _token_logprobs_bwd_kernel[(N, n_blocks)](
        logits, labels, norm, entropy, grad_logps, grad_entropy, grad_logits,
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
