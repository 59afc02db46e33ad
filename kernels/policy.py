"""Token-level policy objective fused with its vocabulary pass (Triton): the op
``policy_token_forward`` (ground truth: ``fastalign/reference/policy.py``).

A token-level policy loss (PPO/GRPO clip, CISPO, SAPO, with a KL penalty and an entropy bonus)
depends on the logits only through each token's log-prob and entropy, so its gradient can be
written in the forward pass. One program per token row:

1. reads the row once from HBM, folding it into online max / sum-exp / entropy statistics (the
   chunk math of ``kernels/logprobs.py``), and stores logp, entropy and the row normalizer;
2. turns (logp, old, ref, advantage, w_pg, w_kl) into the coefficient g = d loss / d logp, the
   formula of ``objective_grad``;
3. reads the row again, now from L2, and writes the gradient once:
   ``dz_j = g * (1[j = label] - p_j) - gH * p_j * (log p_j + H)`` times the transform's chain rule.

The logits thus cross HBM once and the gradient once, instead of a forward read, a backward read
and a write. Rows whose label is ``ignore_index`` give 0 and a zero gradient row without reading
their logits. An out-of-range label is never dereferenced: NaN log-prob and a NaN gradient row.
Without a gradient the op is the log-prob forward with entropy, and runs that kernel.
"""

import torch
import triton
import triton.language as tl

from . import contract
from .logprobs import (
    LN2,
    LOG2E,
    fwd_block,
    FWD_THREADS,
    _check_inputs,
    _fwd_finish,
    _fwd_full_chunks,
    _fwd_remainder,
    _pre_scale,
    _log2_prob,
    _log2e_split,
    _w_scale,
    _store_norm,
    _forward_operands,
)
from .logprobs import token_logprobs_forward
from .target import nvidia_arch, nvidia_options, warps

# tests/ops/triton_compile_gate.py compiles the kernel exactly as the launcher below calls it.
# The first sweep is the log-prob forward's loop with its launch shape (512 threads, 8 KiB chunks).
# The second runs in the same program, hence with the same 512 threads, over 2048-wide chunks: 4
# entries per thread. With 4096 (8 per thread) the softcap chain rule and the entropy term pushed
# sm_80's 2-byte variants past 64 registers and ptxas spilled 8 bytes to stay there; at 2048 every
# contiguous-vocabulary variant fits in 64 registers, two programs per SM.
THREADS = FWD_THREADS
# The ids of kernels/contract.py as compile-time constants of the kernels.
SURROGATE_CLIP_ID = tl.constexpr(contract.SURROGATE_CLIP)
SURROGATE_CISPO_ID = tl.constexpr(contract.SURROGATE_CISPO)
KL_NONE_ID = tl.constexpr(contract.KL_NONE)
KL_K1_ID = tl.constexpr(contract.KL_K1)
KL_ABS_ID = tl.constexpr(contract.KL_ABS)
KL_K2_ID = tl.constexpr(contract.KL_K2)
KL_K3_ID = tl.constexpr(contract.KL_K3)
GRAD_BLOCK = 2048

_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _clamp(x, lo, hi):
    # torch.clamp's order, max then min; selects keep a NaN x NaN, where min/max would drop it.
    y = tl.where(x < lo, lo, x)
    return tl.where(y > hi, hi, y)


@triton.jit
def _objective_grad(
    l, o, q, a, w_pg, w_kl,
    ratio_low, ratio_high, delta, dual_clip, log_ratio_clamp, tau_pos, tau_neg,
    surrogate_id, kl_id, kl_straight_through, kl_bias_correction,
    HAS_OLD: tl.constexpr,
):
    # d loss / d l, operation for operation as objective_grad in fastalign/reference/policy.py
    # writes it, so the same IEEE corner cases (inf * 0, NaN) come out the same. Masks multiply
    # as 0.0 / 1.0, as torch's bool tensors do. The surrogate and the estimator are runtime
    # values: this is a few dozen scalar instructions per row, uniform branches cost nothing next
    # to the row's sweeps, and as constexprs they would multiply the compiled variants by 18.
    if HAS_OLD:
        lr = l - o
    else:
        # Without old log-probs the ratio is pi / sg(pi): 1, with the on-policy gradient.
        lr = tl.zeros_like(l)
    in_clamp = tl.where(tl.abs(lr) <= log_ratio_clamp, 1.0, 0.0)
    r = tl.exp(_clamp(lr, -log_ratio_clamp, log_ratio_clamp))
    if surrogate_id == SURROGATE_CLIP_ID:
        d1 = -a * r * in_clamp * tl.where(r <= delta, 1.0, 0.0)
        d2 = -a * r * in_clamp * tl.where((r >= ratio_low) & (r <= ratio_high), 1.0, 0.0)
        loss1 = -a * tl.where(r > delta, delta, r)
        loss2 = -a * _clamp(r, ratio_low, ratio_high)
        # Ties split the gradient evenly, as torch.maximum's does.
        d = tl.where(loss1 > loss2, d1, tl.where(loss2 > loss1, d2, 0.5 * (d1 + d2)))
        loss3 = -a * dual_clip
        best = tl.maximum(loss1, loss2, propagate_nan=tl.PropagateNan.ALL)
        dual = tl.where(loss3 < best, 0.0, tl.where(loss3 > best, d, 0.5 * d))
        # An infinite dual_clip means none.
        d = tl.where((a < 0) & (tl.abs(dual_clip) < float("inf")), dual, d)
    elif surrogate_id == SURROGATE_CISPO_ID:  # the clamped ratio is a detached weight on A * l
        d = -_clamp(r, ratio_low, ratio_high) * a
    else:  # sapo
        tau = tl.where(a > 0, tau_pos, tau_neg)
        s = 1.0 / (1.0 + tl.exp(-(tau * (r - 1.0))))
        d = -4.0 * a * s * (1.0 - s) * r * in_clamp
    # A zero weight (a padded or ignored token) contributes 0 even where d is inf or NaN.
    grad = tl.where(w_pg != 0, d * w_pg, 0.0)
    if kl_id != KL_NONE_ID:
        diff = l - q
        x = q - l
        if kl_id == KL_K1_ID:
            value = diff
            dk = tl.full(diff.shape, 1.0, tl.float32)
        elif kl_id == KL_ABS_ID:  # sign(0) = 0, sign(NaN) = NaN
            value = tl.abs(diff)
            dk = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, diff))
        elif kl_id == KL_K2_ID:
            value = 0.5 * (diff * diff)
            dk = diff
        elif kl_id == KL_K3_ID:
            ex = tl.exp(x)
            value = ex - x - 1.0
            dk = 1.0 - ex
        else:  # low_var_kl: the clamps pass no gradient outside their bounds
            xc = _clamp(x, -20.0, 20.0)
            ex = tl.exp(xc)
            raw = ex - xc - 1.0
            value = _clamp(raw, -10.0, 10.0)
            dk = (1.0 - ex) * tl.where(tl.abs(x) <= 20.0, 1.0, 0.0) * tl.where(tl.abs(raw) <= 10.0, 1.0, 0.0)
        # The two options: one select each.
        dk = tl.where(kl_straight_through != 0, diff, dk)
        # d(kl * r)/dl with r = exp(l - o); on-policy r = 1 and dr/dl = 1.
        dk = tl.where(kl_bias_correction != 0, (dk + value * in_clamp) * r, dk)
        grad = grad + tl.where(w_kl != 0, dk * w_kl, 0.0)
    return grad


@triton.jit
def _grad_chunk(
    x, cols, label, m, hi, lo2, entropy, g, g_h, in_scale, w_log2e, grad_scale,
    SOFTCAP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
):
    # The formula of token_logprobs_backward in fastalign/reference/logprobs.py for one chunk, with
    # the exponentials in base 2 and on w, as the first sweep took them (kernels/logprobs.py,
    # _fwd_chunk): log2 p = (w - m) w_log2e - log2 s, with hi + lo2 = log2 s split exactly. The
    # caller passes g_h * ln 2 and the entropy times log2(e), so that p (log p + H) costs nothing
    # for the base change.
    w = _pre_scale(x.to(tl.float32), in_scale, SOFTCAP)
    log_p = _log2_prob(w, m, hi, lo2, w_log2e)
    p = tl.exp2(log_p)
    dz = g * (tl.where(cols == label, 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        # p = 0 where log_p = -inf; the clamp keeps 0 * -inf at 0 (NaN logits stay NaN through p).
        dz -= g_h * p * (tl.maximum(log_p, -_FLT_MAX) + entropy)
    # Chain rule back through the transform: dz/dx = (1 - tanh^2) * logit_scale / temperature,
    # with w = tanh's value under softcap.
    if SOFTCAP:
        dz = dz * (1.0 - w * w)
    return dz * grad_scale


@triton.jit
def _grad_remainder_chunk(
    row_ptr, out_row, j, head, body, V, stride_v, label, m, hi, lo2, entropy, g, g_h, in_scale, w_log2e,
    grad_scale, SOFTCAP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, VOCAB_CONTIGUOUS: tl.constexpr,
):
    # Entries j of what the second sweep's chunks left: the tail after them, then the head before.
    tail = V - head - body
    cols = tl.where(j < tail, head + body + j, j - tail)
    in_vocab = j < V - body
    if VOCAB_CONTIGUOUS:
        x = tl.load(row_ptr + cols, mask=in_vocab, other=0.0)
    else:
        x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=in_vocab, other=0.0)
    dz = _grad_chunk(x, cols, label, m, hi, lo2, entropy, g, g_h, in_scale, w_log2e, grad_scale,
                     SOFTCAP, HAS_GRAD_ENTROPY)
    tl.store(out_row + cols, dz.to(out_row.dtype.element_ty), mask=in_vocab)


@triton.jit(do_not_specialize=["T", "stride_v", "ignore_index", "surrogate_id", "kl_id"])
def _policy_token_kernel(
    logits_ptr, labels_ptr,
    old_ptr, ref_ptr, adv_ptr, w_pg_ptr, w_kl_ptr, grad_entropy_ptr,
    logps_ptr, entropy_ptr, norm_ptr, grad_logits_ptr,
    T, V, stride_b, stride_t, stride_v,
    in_scale, out_scale, grad_scale, ignore_index,
    ratio_low, ratio_high, delta, dual_clip, log_ratio_clamp, tau_pos, tau_neg,
    surrogate_id, kl_id, kl_straight_through, kl_bias_correction,
    HAS_OLD: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr, VOCAB_CONTIGUOUS: tl.constexpr, ALIGNED_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, GRAD_BLOCK: tl.constexpr,
):
    VEC: tl.constexpr = 128 // logits_ptr.dtype.element_ty.primitive_bitwidth
    # 64-bit from the start: rows * strides passes 2^31 at real sizes.
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(logps_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(norm_ptr + 2 * row, 0.0)
        tl.store(norm_ptr + 2 * row + 1, 0.0)
        # The gradient is a fresh contiguous [B, T, V] tensor.
        out_row = grad_logits_ptr + row * V
        cols = tl.arange(0, GRAD_BLOCK)
        zeros = tl.zeros([GRAD_BLOCK], dtype=grad_logits_ptr.dtype.element_ty)
        for start in range(0, V, GRAD_BLOCK):
            tl.store(out_row + start + cols, zeros, mask=start + cols < V)
        return

    # Traced callers may pass Python floats as fp64; the math stays in fp32.
    in_scale = tl.cast(in_scale, tl.float32)
    out_scale = tl.cast(out_scale, tl.float32)
    grad_scale = tl.cast(grad_scale, tl.float32)
    b = row // T
    row_off = b * stride_b + (row - b * T) * stride_t
    row_ptr = logits_ptr + row_off

    # Sweep 1: the forward loop of _token_logprobs_fwd_kernel, with entropy and no metrics.
    w_scale = _w_scale(in_scale, out_scale, SOFTCAP)
    w_log2e = w_scale * LOG2E
    m, max_before, s_acc, h_acc, q_acc, z_acc, cols0, head, body = _fwd_full_chunks(
        logits_ptr, row_off, V, stride_v, label, in_scale, w_log2e,
        False, False, False,
        SOFTCAP, VOCAB_CONTIGUOUS, True, BLOCK,
    )
    # The per-token inputs, loaded here so that their latency hides behind the tail chunk and the
    # reductions. Loaded before the sweep they would be live across its loop, where ptxas (13.x,
    # --regAllocOptLevel=2) has been seen to spill one of them rather than take a register.
    # Without a KL estimator ref_ptr and w_kl_ptr point at the advantages: loaded, never used.
    a = tl.load(adv_ptr + row)
    w_pg = tl.load(w_pg_ptr + row)
    q = tl.load(ref_ptr + row)
    w_kl = tl.load(w_kl_ptr + row)
    if HAS_OLD:
        o = tl.load(old_ptr + row)
    else:
        o = a
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row)
    else:
        g_h = 0.0
    m, max_before, s_acc, h_acc, q_acc, z_acc = _fwd_remainder(
        logits_ptr, row_off, V, stride_v, label, in_scale, w_log2e,
        m, max_before, s_acc, h_acc, q_acc, z_acc, cols0, head, body,
        False, False, False,
        SOFTCAP, VOCAB_CONTIGUOUS, True, BLOCK,
    )
    m_w, m, max_before, s, h, _q, _z = _fwd_finish(
        m, max_before, s_acc, h_acc, q_acc, z_acc, w_scale, w_log2e, False, False, False, True,
    )
    log_s = tl.log(s)
    # The sweep's entropy sum is in units of log2(e) (kernels/logprobs.py).
    entropy = log_s - (h / s) * LN2
    _store_norm(norm_ptr, row, m_w, log_s)
    tl.store(entropy_ptr + row, entropy)
    in_range = (label >= 0) & (label < V)
    if VOCAB_CONTIGUOUS:
        label_ptr = row_ptr + label
    else:
        label_ptr = row_ptr + label * stride_v
    # Masked, so an out-of-range label is never dereferenced.
    x_label = tl.load(label_ptr, mask=in_range, other=0.0).to(tl.float32)
    # As the forward: z - m from w, rounded once (kernels/logprobs.py).
    logp = tl.where(in_range, (_pre_scale(x_label, in_scale, SOFTCAP) - m_w) * w_scale - log_s, float("nan"))
    tl.store(logps_ptr + row, logp)

    g = _objective_grad(
        logp, o, q, a, w_pg, w_kl,
        tl.cast(ratio_low, tl.float32), tl.cast(ratio_high, tl.float32), tl.cast(delta, tl.float32),
        tl.cast(dual_clip, tl.float32), tl.cast(log_ratio_clamp, tl.float32),
        tl.cast(tau_pos, tl.float32), tl.cast(tau_neg, tl.float32),
        surrogate_id, kl_id, kl_straight_through, kl_bias_correction,
        HAS_OLD,
    )
    # A label outside the vocabulary has a NaN log-prob; its gradient row says so too.
    g = tl.where(in_range, g, float("nan"))
    # The second sweep's scalars, base 2: log2 p = (w - m) w_log2e - (hi + lo2) with m the row's
    # max of w (0 where that is -inf, as in the first sweep) and hi + lo2 = log s log2(e) split
    # exactly (at the row maximum log p stays the forward's -log s).
    m_shift = tl.where(m_w > -float("inf"), m_w, 0.0)
    hi, lo2 = _log2e_split(log_s)
    entropy2 = entropy * LOG2E
    g_h2 = g_h * LN2
    # In range it fits in 32 bits, and out of range g is NaN whatever the one-hot says.
    label32 = tl.where(in_range, label, -1).to(tl.int32)

    # Sweep 2: the same row again, from its end back to its start, and the gradient written once.
    # Backwards, it reads first what sweep 1 read last: at large V the rows in flight outgrow L2
    # (about 80 MB at V = 151936 with two programs per SM against H100's 50 MB), and an LRU-like
    # cache then still holds the row's recent end, where a second pass from the start would find
    # its oldest part evicted first, and the rest after it. Addresses are formed only now: anything
    # held across the first sweep's loop is a register taken from it, and ptxas answers a few such
    # with a spill.
    out_off = row * V
    out_row = grad_logits_ptr + out_off
    cols = tl.arange(0, GRAD_BLOCK)
    if VOCAB_CONTIGUOUS:
        # Chunks from the row's first 16-byte boundary, as in sweep 1 (head entries in); when the
        # gradient rows share the logits rows' alignment (contiguous logits) the stores are
        # 16-byte vectors too.
        body = ((V - head) // GRAD_BLOCK) * GRAD_BLOCK
    else:
        head = 0
        body = (V // GRAD_BLOCK) * GRAD_BLOCK
    # What the chunks leave, the tail and then the head, first, in a masked chunk (two only when
    # together they pass GRAD_BLOCK).
    if body < V:
        _grad_remainder_chunk(row_ptr, out_row, cols, head, body, V, stride_v, label32, m_shift, hi, lo2, entropy2,
                              g, g_h2, in_scale, w_log2e, grad_scale, SOFTCAP, HAS_GRAD_ENTROPY, VOCAB_CONTIGUOUS)
    if body + GRAD_BLOCK < V:
        _grad_remainder_chunk(row_ptr, out_row, GRAD_BLOCK + cols, head, body, V, stride_v, label32, m_shift, hi, lo2,
                              entropy2, g, g_h2, in_scale, w_log2e, grad_scale, SOFTCAP, HAS_GRAD_ENTROPY,
                              VOCAB_CONTIGUOUS)
    if VOCAB_CONTIGUOUS:
        in_ptr = logits_ptr + tl.multiple_of(row_off + head, VEC)
        if ALIGNED_GRAD:
            out_ptr = grad_logits_ptr + tl.multiple_of(out_off + head, VEC)
        else:
            out_ptr = out_row + head
        # One chunk ahead: an L2 read needs less in flight than the first sweep's HBM read.
        last = body - GRAD_BLOCK
        x_next = tl.load(in_ptr + last + cols, mask=last + cols >= 0)
        for i in range(0, body, GRAD_BLOCK):
            start = last - i
            x = x_next
            x_next = tl.load(in_ptr + (start - GRAD_BLOCK) + cols, mask=start - GRAD_BLOCK + cols >= 0)
            dz = _grad_chunk(x, head + start + cols, label32, m_shift, hi, lo2, entropy2, g, g_h2, in_scale,
                             w_log2e, grad_scale, SOFTCAP, HAS_GRAD_ENTROPY)
            tl.store(out_ptr + start + cols, dz.to(grad_logits_ptr.dtype.element_ty))
    else:
        for i in range(0, body, GRAD_BLOCK):
            start = body - GRAD_BLOCK - i
            x = tl.load(row_ptr + (start + cols).to(tl.int64) * stride_v)
            dz = _grad_chunk(x, start + cols, label32, m_shift, hi, lo2, entropy2, g, g_h2, in_scale, w_log2e,
                             grad_scale, SOFTCAP, HAS_GRAD_ENTROPY)
            tl.store(out_row + start + cols, dz.to(grad_logits_ptr.dtype.element_ty))


def _same_alignment(logits: torch.Tensor, V: int) -> bool:
    """Whether row (b, t) of ``logits`` and row b * T + t of a contiguous [B, T, V] tensor of its
    dtype start at the same offset within 16 bytes, for every b and t."""
    B, T, _ = logits.shape
    vec = 16 // logits.element_size()
    stride_b, stride_t, stride_v = logits.stride()
    return (stride_v == 1 and (stride_t - V) % vec == 0 and (B == 1 or (stride_b - T * V) % vec == 0)
            and logits.data_ptr() % 16 == 0)


def _per_token(name: str, t: torch.Tensor, n: int, device, optional: bool) -> torch.Tensor | None:
    """``t`` as a contiguous float32 [n] vector; None for an optional one given as [0]."""
    if optional and t.numel() == 0:
        return None
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}]{' or [0]' if optional else ''}, got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} on {t.device}, logits on {device}")
    return t.to(torch.float32).contiguous()


def policy_token_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    w_pg: torch.Tensor,
    w_kl: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
    surrogate_id: int,
    kl_id: int,
    params: list[float],
    with_grad: bool,
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logps, entropy, grad, norm)`` for logits [B, T, V] (any strides, read in place) and labels [B * T].

    ``grad`` ([B, T, V], contiguous, ``logits.dtype``; ``[0]`` without ``with_grad``) is the
    gradient w.r.t. the logits of ``sum(w_pg * surrogate + w_kl * kl) + sum(grad_entropy * entropy)``
    for the objective described by ``surrogate_id``, ``kl_id`` and ``params``
    (``TokenObjective.kernel_args``). ``old_logps``, ``ref_logps``, ``w_kl`` and ``grad_entropy``
    are [B * T] or [0] when absent; ``ref_logps`` and ``w_kl`` are needed with a KL estimator.
    ``grad_out`` (contiguous [B, T, V], ``logits.dtype``) receives the gradient instead of a new
    tensor; it may be ``logits`` itself, since each program reads a chunk of its row before
    writing that chunk's gradient.
    """
    if not with_grad:
        logps, entropy, _, _, _, norm = token_logprobs_forward(
            logits, labels, temperature, logit_scale, softcap, ignore_index, True, False, False, False
        )
        return logps, entropy, logits.new_empty(0), norm

    B, T, V = _check_inputs(logits, labels)
    N = B * T
    device = logits.device
    if surrogate_id not in range(len(contract.SURROGATES)):
        raise ValueError(f"surrogate_id must be the id of one of {contract.SURROGATES} (kernels/contract.py), got {surrogate_id}")
    if kl_id not in range(len(contract.KL_ESTIMATORS)):
        raise ValueError(f"kl_id must be the id of one of {contract.KL_ESTIMATORS} (kernels/contract.py), got {kl_id}")
    if len(params) != len(contract.OBJECTIVE_PARAMS):
        raise ValueError(f"params must hold {len(contract.OBJECTIVE_PARAMS)} values {contract.OBJECTIVE_PARAMS}, got {len(params)}")
    advantages = _per_token("advantages", advantages, N, device, optional=False)
    w_pg = _per_token("w_pg", w_pg, N, device, optional=False)
    old_logps = _per_token("old_logps", old_logps, N, device, optional=True)
    grad_entropy = _per_token("grad_entropy", grad_entropy, N, device, optional=True)
    if kl_id != contract.KL_NONE:
        ref_logps = _per_token("ref_logps", ref_logps, N, device, optional=True)
        w_kl = _per_token("w_kl", w_kl, N, device, optional=True)
        if ref_logps is None or w_kl is None:
            raise ValueError("a KL estimator needs ref_logps and w_kl of shape [B * T]")
    else:
        ref_logps = w_kl = None

    logps = torch.empty(N, dtype=torch.float32, device=device)
    entropy = torch.empty(N, dtype=torch.float32, device=device)
    norm = torch.empty((N, 2), dtype=torch.float32, device=device)
    if grad_out is None:
        grad = torch.empty((B, T, V), dtype=logits.dtype, device=device)
    elif grad_out.shape != (B, T, V) or grad_out.dtype != logits.dtype or not grad_out.is_contiguous():
        raise ValueError(
            f"grad_out must be a contiguous {logits.dtype} tensor of shape {(B, T, V)}, got "
            f"{grad_out.dtype} {tuple(grad_out.shape)}"
        )
    else:
        grad = grad_out
    if N == 0:
        return logps, entropy, grad, norm

    def given(t: torch.Tensor | None) -> torch.Tensor:
        # An absent vector is never read: advantages stands in and keeps the signature fixed.
        return advantages if t is None else t

    # The second sweep reads the same (possibly negated) logits with the same scale: z is unchanged,
    # and grad_scale is the derivative with respect to the caller's logits.
    logits, in_scale, out_scale, negated = _forward_operands(logits, temperature, logit_scale, softcap)
    ratio_low, ratio_high, delta, dual_clip, log_ratio_clamp, tau_pos, tau_neg, straight, bias = map(float, params)
    stride_b, stride_t, stride_v = logits.stride()
    _policy_token_kernel[(N,)](
        logits, labels,
        given(old_logps), given(ref_logps), advantages, w_pg, given(w_kl), given(grad_entropy),
        logps, entropy, norm, grad,
        T, V, stride_b, stride_t, stride_v,
        in_scale, out_scale, logit_scale / temperature, ignore_index,
        ratio_low, ratio_high, delta, dual_clip, log_ratio_clamp, tau_pos, tau_neg,
        int(surrogate_id), int(kl_id), float(straight != 0.0), float(bias != 0.0),
        HAS_OLD=old_logps is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None,
        SOFTCAP=softcap > 0.0,
        VOCAB_CONTIGUOUS=stride_v == 1,
        # Every gradient row (offset row * V) starts at the same place within 16 bytes as its
        # logits row: the second sweep's stores are then vectors too.
        ALIGNED_GRAD=_same_alignment(logits, V),
        BLOCK=fwd_block(logits.dtype),
        GRAD_BLOCK=GRAD_BLOCK,
        num_warps=warps(THREADS),
        # Left to itself ptxas holds some variants to 64 registers (two programs of 512 threads per
        # SM) and spills 8-24 bytes: the strided-vocabulary ones, which keep a 64-bit address per
        # entry live (sm_80), and several on sm_120 (Triton 3.6). Allowing 128 keeps them in
        # registers. Every other variant is left at ptxas's choice (45 registers on sm_90): an
        # explicit limit makes ptxas spend registers more freely.
        **nvidia_options(maxnreg=128 if stride_v != 1 or nvidia_arch() == 120 else None),
        # Pinned: Triton 3.10 turns FMA contraction off by default.
        enable_fp_fusion=True,
    )
    if negated:  # the kernel saw -x (kernels/logprobs.py)
        norm[:, 0].neg_()
    return logps, entropy, grad, norm
