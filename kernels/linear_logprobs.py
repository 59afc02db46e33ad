"""Per-token log-probs straight from hidden states and the lm_head weight (Triton): the ops
``linear_token_logprobs_forward`` / ``linear_token_logprobs_backward``.

The logits are ``x = hidden @ weight.T + bias`` (fp32 accumulation), transformed as in
``kernels/logprobs.py`` (logit_scale, softcap, temperature), and reduced exactly like its row
kernel; the [N, V] logits never reach global memory, only [BLOCK_N, BLOCK_V] tiles in registers.

Rows whose label is ``ignore_index`` cost no matmul work: the launcher sorts the valid rows to the
front (a stable argsort of the ignore mask, plus their count on the device, so there is no host
sync), and every kernel walks only the first ``count`` entries of that order. Ignored rows keep the
zeros their outputs were allocated with. A label outside ``[0, V)`` is never dereferenced (the
label's logit is picked out of the tiles by comparison): its log-prob is NaN, and with
``grad_logps`` its gradient is NaN, which the matmuls spread to all of grad_weight and grad_bias,
as they do in the reference.

Forward: one program per BLOCK_N valid rows; a loop over BLOCK_V vocabulary tiles computes each
logits tile with ``tl.dot`` over H in BLOCK_K steps and folds it into per-row online statistics
(running max, sum-exp, entropy, sum of squares, sum of z, max before the label, the label's logit).

Backward, ``dz = g * (1[j = label] - p) - gH * p * (log p + H)`` times the transform's chain rule,
by two kernels that each recompute their logits tiles:
  * grad_hidden: one program per BLOCK_N valid rows, looping over the vocabulary; for each tile
    it adds ``dz @ W_tile`` into its own rows of an fp32 buffer, BLOCK_H columns at a time;
  * grad_weight / grad_bias: one program per BLOCK_V vocabulary entries, looping over the valid
    rows; it adds ``dz^T @ h`` into its own rows of an fp32 buffer, and keeps the bias gradient
    (column sums of dz) in registers.
Every program owns the rows it writes, so there are no atomics and the result is deterministic
(run to run, whatever the scheduling); the price is recomputing the logits twice (4 N*V*H
matmul work instead of the 3 of a single kernel with atomic adds) and a read-modify-write of an
fp32 [BLOCK, BLOCK_H] tile per (row block, vocabulary tile) pair, because an accumulator of all H
columns does not fit in registers.
"""

import os

import torch
import triton
import triton.language as tl

from .logprobs import LN2, LOG2E, _log2_prob, _log2e_split, _pre_scale, _transform_constants, _w_scale
from .target import is_amd, nvidia_options

# The interpreter multiplies the raw bits of bf16 operands in tl.dot; fp32 operands are exact.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

# Launch configurations. tests/ops/triton_compile_gate.py compiles every kernel exactly as the
# launchers below call it, so a change here is re-checked for registers and spills there.
# (BLOCK_N, BLOCK_V, BLOCK_K, num_warps) per input dtype. fp32 runs its tl.dot in full precision
# (no tensor cores, the operands staged through registers), hence smaller tiles than 2-byte inputs.
# (A K step of 8 would keep fp32 under 100 registers, but Triton 3.6's tl.dot needs K >= 16.)
FWD_CONFIGS = {
    torch.bfloat16: (64, 128, 32, 8),
    torch.float16: (64, 128, 32, 8),
    torch.float32: (32, 32, 16, 8),
}
BWD_CONFIGS = {
    torch.bfloat16: (64, 64, 32, 8),
    torch.float16: (64, 64, 32, 8),
    torch.float32: (32, 32, 16, 8),
}
# AMD (wavefronts of 64): the grad_weight kernel's 2-byte tile spills VGPRs at 64 x 64 under
# Triton 3.6; half the vocabulary tile fits.
AMD_BWD_CONFIGS = {**BWD_CONFIGS, torch.bfloat16: (64, 32, 32, 8), torch.float16: (64, 32, 32, 8)}
# fp32 tiles hold their operands in registers: ptxas, left to itself, caps some variants at 128
# registers and spills (sm_80 to sm_120); allowed 255 they stay in registers (one program of 256
# threads per SM, which the FMA-bound fp32 path keeps busy).
FP32_MAXNREG = 255

_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _dot(a, b, acc):
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        # TF32 would cost fp32 inputs 13 mantissa bits, far more than the reference loses. (tf32x3
        # splits the operands in registers and spilled at every tile size tried.)
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows, cols, H,
    stride_hn, stride_hk, stride_wv, stride_wk,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    has_bias,
):
    """Raw logits x[BLOCK_N, BLOCK_V] of the (in-bounds, int64) rows and vocabulary entries."""
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    h_base = hidden_ptr + rows[:, None] * stride_hn
    w_base = weight_ptr + cols[None, :] * stride_wv
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        h_ptrs = h_base + k[None, :] * stride_hk
        w_ptrs = w_base + k[:, None] * stride_wk
        a = tl.load(h_ptrs, mask=k[None, :] < H, other=0.0)
        b = tl.load(w_ptrs, mask=k[:, None] < H, other=0.0)
        acc = _dot(a, b, acc)
    if has_bias:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    return acc


@triton.jit
def _tile_dz(
    x, cols, v_ok, n_ok, label, shift, log_s, g_logp, g_h, entropy, in_scale, out_scale, grad_scale,
    has_grad_logps, has_grad_entropy, SOFTCAP: tl.constexpr,
):
    """d loss / d x for a logits tile, 0 outside the valid rows and the vocabulary. Exponentials
    in base 2 from the rows' normalizers, as in kernels/logprobs.py's backward (log_p below is
    log2 p): log2 p = (u - shift) * factor log2(e) - log_s log2(e)."""
    u = _pre_scale(x, in_scale, SOFTCAP)
    hi, lo = _log2e_split(log_s)
    log_p = _log2_prob(u, shift[:, None], hi[:, None], lo[:, None], _w_scale(in_scale, out_scale, SOFTCAP) * LOG2E)
    p = tl.exp2(log_p)
    dz = tl.zeros(x.shape, dtype=tl.float32)
    if has_grad_logps:
        dz += g_logp[:, None] * (tl.where(cols[None, :] == label[:, None], 1.0, 0.0) - p)
    if has_grad_entropy:
        # p (log p + H) = ln 2 * p (log2 p + H log2 e).
        # p = 0 where log_p = -inf; the clamp keeps 0 * -inf at 0 (NaN logits stay NaN through p).
        dz -= (g_h * LN2)[:, None] * p * (tl.maximum(log_p, -_FLT_MAX) + (entropy * LOG2E)[:, None])
    if SOFTCAP:
        dz = dz * (1.0 - u * u)
    dz = dz * grad_scale
    # Padding rows and columns hold duplicated (clamped) logits: they must not contribute.
    return tl.where(n_ok[:, None] & v_ok[None, :], dz, 0.0)


@triton.jit
def _row_grads(
    rows, n_ok, V, labels_ptr, norm_ptr, entropy_ptr, grad_logps_ptr, grad_entropy_ptr,
    has_grad_logps, has_grad_entropy,
):
    label = tl.load(labels_ptr + rows)
    shift = tl.load(norm_ptr + 2 * rows)
    log_s = tl.load(norm_ptr + 2 * rows + 1)
    g_logp = log_s
    g_h = log_s
    entropy = log_s
    if has_grad_logps:
        g_logp = tl.load(grad_logps_ptr + rows)
        # A label outside the vocabulary has a NaN log-prob; its gradient says so too.
        g_logp = tl.where((label >= 0) & (label < V), g_logp, float("nan"))
        g_logp = tl.where(n_ok, g_logp, 0.0)
    if has_grad_entropy:
        g_h = tl.load(grad_entropy_ptr + rows)
        entropy = tl.load(entropy_ptr + rows)
    return label, shift, log_s, g_logp, g_h, entropy


@triton.jit
def _linear_logprobs_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, order_ptr, count_ptr,
    logps_ptr, norm_ptr, entropy_ptr, log_sum_sq_probs_ptr, mean_logits_ptr, is_top1_ptr,
    V, H, stride_hn, stride_hk, stride_wv, stride_wk,
    in_scale, out_scale, w_sign,
    has_bias, with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1,
    SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    count = tl.load(count_ptr)
    start = tl.program_id(0) * BLOCK_N
    if start >= count:
        return
    in_scale = tl.cast(in_scale, tl.float32)
    out_scale = tl.cast(out_scale, tl.float32)
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < count
    # Padding rows read row order[0] again (in bounds, no mask in the K loop); never stored.
    rows = tl.load(order_ptr + tl.where(n_ok, offs_n, 0))
    label = tl.load(labels_ptr + rows)

    # The sweep runs on w = u * w_sign (u: x, or tanh's value under softcap), with z = w * w_scale
    # and w_scale >= 0, so that the row's largest z is its largest w (kernels/logprobs.py).
    w_sign = tl.cast(w_sign, tl.float32)
    w_scale = tl.abs(_w_scale(in_scale, out_scale, SOFTCAP))
    w_log2e = w_scale * LOG2E
    m = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
    max_before = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
    w_label = tl.zeros([BLOCK_N], dtype=tl.float32)
    s_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    h_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    q_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    w_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        v_ok = cols < V
        x = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, tl.minimum(cols, V - 1), H,
                         stride_hn, stride_hk, stride_wv, stride_wk,
                         BLOCK_N, BLOCK_V, BLOCK_K, has_bias)
        w = _pre_scale(x, in_scale, SOFTCAP) * w_sign
        # After the transform: softcap maps the padding to a finite number.
        w = tl.where(v_ok[None, :], w, -float("inf"))
        is_label = cols[None, :] == label[:, None]
        w_label += tl.sum(tl.where(is_label, w, 0.0), axis=1)
        if with_is_top1:
            before = tl.where(cols[None, :] < label[:, None], w, -float("inf"))
            max_before = tl.maximum(max_before, tl.max(before, axis=1))

        m_new = tl.maximum(m, tl.max(w, axis=1))
        # While a row's max is -inf its accumulators are 0; shifting by 0 instead of -inf keeps
        # exp(-inf - -inf) and -inf * 0 (both NaN) out of them.
        m_shift = tl.where(m_new > -float("inf"), m_new, 0.0)
        # In base 2: (m - m') * w_scale log2(e).
        shift2 = tl.where(m > -float("inf"), (m - m_shift) * w_log2e, 0.0)
        r = tl.where(m > -float("inf"), tl.exp2(shift2), 0.0)
        if with_entropy:
            # sum e'(z - m') = r * (sum e (z - m) + (m - m') * sum e), in units of log2(e)
            h_acc = r * (h_acc + shift2 * s_acc)
        if with_log_sum_sq_probs:
            q_acc = q_acc * (r * r)
        s_acc = s_acc * r
        m = m_new

        # exp(z - m) in base 2, (w - m) exact for close logits.
        d = (w - m_shift[:, None]) * w_log2e
        e = tl.exp2(d)
        s_acc += tl.sum(e, axis=1)
        if with_entropy:
            # e = 0 where d = -inf; the clamp keeps 0 * -inf from turning into NaN.
            h_acc += tl.sum(e * tl.maximum(d, -_FLT_MAX), axis=1)
        if with_log_sum_sq_probs:
            q_acc += tl.sum(e * e, axis=1)
        if with_mean_logits:
            w_acc += tl.sum(tl.where(v_ok[None, :], w, 0.0), axis=1)

    log_s = tl.log(s_acc)
    # The shift in u (w's sign undone), 0 where the max is not finite, as the reference's.
    finite = (m > -float("inf")) & (m < float("inf"))
    tl.store(norm_ptr + 2 * rows, tl.where(finite, m * w_sign, 0.0), mask=n_ok)
    tl.store(norm_ptr + 2 * rows + 1, log_s, mask=n_ok)
    in_range = (label >= 0) & (label < V)
    # (w - max w) * w_scale - log s rather than z - lse: exact when z is the max, whatever the
    # logits' magnitude.
    tl.store(logps_ptr + rows, tl.where(in_range, (w_label - m) * w_scale - log_s, float("nan")), mask=n_ok)
    if with_entropy:
        # The entropy sum is in units of log2(e).
        tl.store(entropy_ptr + rows, log_s - (h_acc / s_acc) * LN2, mask=n_ok)
    if with_log_sum_sq_probs:
        tl.store(log_sum_sq_probs_ptr + rows, tl.log(q_acc) - 2.0 * log_s, mask=n_ok)
    if with_mean_logits:
        tl.store(mean_logits_ptr + rows, w_acc * w_scale / V, mask=n_ok)
    if with_is_top1:
        # First argmax: at least the max, and strictly above everything before it.
        top1 = in_range & (w_label >= m) & (w_label > max_before)
        tl.store(is_top1_ptr + rows, top1.to(tl.int8), mask=n_ok)


@triton.jit
def _linear_logprobs_bwd_hidden_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, order_ptr, count_ptr,
    norm_ptr, entropy_ptr, grad_logps_ptr, grad_entropy_ptr, grad_hidden_ptr,
    V, H, stride_hn, stride_hk, stride_wv, stride_wk,
    in_scale, out_scale, grad_scale, has_bias, has_grad_logps, has_grad_entropy,
    SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    count = tl.load(count_ptr)
    start = tl.program_id(0) * BLOCK_N
    if start >= count:
        return
    in_scale = tl.cast(in_scale, tl.float32)
    out_scale = tl.cast(out_scale, tl.float32)
    grad_scale = tl.cast(grad_scale, tl.float32)
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < count
    rows = tl.load(order_ptr + tl.where(n_ok, offs_n, 0))
    label, shift, log_s, g_logp, g_h, entropy = _row_grads(
        rows, n_ok, V, labels_ptr, norm_ptr, entropy_ptr, grad_logps_ptr, grad_entropy_ptr,
        has_grad_logps, has_grad_entropy)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    # grad_hidden is a fresh contiguous fp32 [N, H] buffer.
    out_base = grad_hidden_ptr + rows[:, None] * H

    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        v_ok = cols < V
        cols_in = tl.minimum(cols, V - 1)
        x = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols_in, H,
                         stride_hn, stride_hk, stride_wv, stride_wk,
                         BLOCK_N, BLOCK_V, BLOCK_K, has_bias)
        dz = _tile_dz(x, cols, v_ok, n_ok, label, shift, log_s, g_logp, g_h, entropy, in_scale, out_scale, grad_scale,
                      has_grad_logps, has_grad_entropy, SOFTCAP)
        dz = dz.to(weight_ptr.dtype.element_ty)
        w_base = weight_ptr + cols_in[:, None] * stride_wv
        for k0 in range(0, H, BLOCK_K):
            k = k0 + offs_k
            out_ptrs = out_base + k[None, :]
            w = tl.load(w_base + k[None, :] * stride_wk, mask=k[None, :] < H, other=0.0)
            out_mask = n_ok[:, None] & (k[None, :] < H)
            acc = tl.load(out_ptrs, mask=out_mask, other=0.0)
            tl.store(out_ptrs, _dot(dz, w, acc), mask=out_mask)
        # The accumulator tile is loaded in one register layout and stored from another, so the
        # next vocabulary tile's threads read elements other threads wrote: the stores must be
        # visible to the whole program first (a barrier orders them; nothing else guarantees it).
        tl.debug_barrier()


@triton.jit
def _linear_logprobs_bwd_weight_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, order_ptr, count_ptr,
    norm_ptr, entropy_ptr, grad_logps_ptr, grad_entropy_ptr, grad_weight_ptr, grad_bias_ptr,
    V, H, stride_hn, stride_hk, stride_wv, stride_wk,
    in_scale, out_scale, grad_scale, has_bias, has_grad_logps, has_grad_entropy,
    SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    count = tl.load(count_ptr)
    in_scale = tl.cast(in_scale, tl.float32)
    out_scale = tl.cast(out_scale, tl.float32)
    grad_scale = tl.cast(grad_scale, tl.float32)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = cols < V
    cols_in = tl.minimum(cols, V - 1)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    # grad_weight is a fresh contiguous fp32 [V, H] buffer.
    out_base = grad_weight_ptr + cols[:, None] * H
    grad_bias = tl.zeros([BLOCK_V], dtype=tl.float32)

    for start in range(0, count, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < count
        rows = tl.load(order_ptr + tl.where(n_ok, offs_n, 0))
        label, shift, log_s, g_logp, g_h, entropy = _row_grads(
            rows, n_ok, V, labels_ptr, norm_ptr, entropy_ptr, grad_logps_ptr, grad_entropy_ptr,
            has_grad_logps, has_grad_entropy)
        x = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols_in, H,
                         stride_hn, stride_hk, stride_wv, stride_wk,
                         BLOCK_N, BLOCK_V, BLOCK_K, has_bias)
        dz = _tile_dz(x, cols, v_ok, n_ok, label, shift, log_s, g_logp, g_h, entropy, in_scale, out_scale, grad_scale,
                      has_grad_logps, has_grad_entropy, SOFTCAP)
        if has_bias:
            grad_bias += tl.sum(dz, axis=0)
        dz_t = tl.trans(dz.to(hidden_ptr.dtype.element_ty))
        h_base = hidden_ptr + rows[:, None] * stride_hn
        for k0 in range(0, H, BLOCK_K):
            k = k0 + offs_k
            out_ptrs = out_base + k[None, :]
            h = tl.load(h_base + k[None, :] * stride_hk, mask=k[None, :] < H, other=0.0)
            out_mask = v_ok[:, None] & (k[None, :] < H)
            acc = tl.load(out_ptrs, mask=out_mask, other=0.0)
            tl.store(out_ptrs, _dot(dz_t, h, acc), mask=out_mask)
        # As in the grad_hidden kernel: the next row block reads what other threads stored.
        tl.debug_barrier()
    if has_bias:
        tl.store(grad_bias_ptr + cols, grad_bias, mask=v_ok)


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_linear_inputs(hidden, weight, bias, labels) -> tuple[int, int, int]:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    N, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {H}")
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one dtype of float32, bfloat16, float16; "
                        f"got {hidden.dtype} and {weight.dtype}")
    if bias is not None and bias.numel() != 0:
        if bias.shape != (V,) or bias.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"bias must be a float tensor of shape [{V}] or empty, got {bias.dtype} {tuple(bias.shape)}")
        if bias.device != weight.device:
            raise ValueError(f"bias on {bias.device}, weight on {weight.device}")
    if labels.shape != (N,) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 tensor of shape [{N}], got {labels.dtype} {tuple(labels.shape)}")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(f"hidden on {hidden.device}, weight on {weight.device}, labels on {labels.device}")
    if V == 0:
        raise ValueError("weight has an empty vocabulary")
    return N, H, V


def _valid_rows(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The row indices with the valid rows first (in order), and how many there are, on the device."""
    ignored = labels == ignore_index
    order = torch.argsort(ignored.to(torch.int8), stable=True)
    count = (~ignored).sum(dtype=torch.int32).reshape(1)
    return order, count


def _common(hidden, weight, bias, config):
    block_n, block_v, block_k, num_warps = config
    return dict(
        V=weight.shape[0], H=hidden.shape[1],
        stride_hn=hidden.stride(0), stride_hk=hidden.stride(1),
        stride_wv=weight.stride(0), stride_wk=weight.stride(1),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps,
        **nvidia_options(maxnreg=FP32_MAXNREG if hidden.dtype == torch.float32 else None),
        # Pinned: Triton 3.10 turns FMA contraction off by default.
        enable_fp_fusion=True,
    )


def linear_token_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
    with_entropy: bool,
    with_log_sum_sq_probs: bool,
    with_mean_logits: bool,
    with_is_top1: bool,
):
    """Per-token log-probs of ``labels`` under ``hidden @ weight.T + bias`` without materializing it.

    Returns ``(logps, entropy, log_sum_sq_probs, mean_logits, is_top1, norm)``, each ``[N]`` (fp32;
    ``is_top1`` bool; ``norm`` [N, 2], kernels/logprobs.py); an output not asked for is an empty
    ``[0]`` tensor. ``bias`` may be empty.
    """
    N, H, V = check_linear_inputs(hidden, weight, bias, labels)
    device = hidden.device

    def f32(flag: bool = True) -> torch.Tensor:
        return torch.zeros(N if flag else 0, dtype=torch.float32, device=device)

    logps, norm = f32(), torch.zeros((N, 2), dtype=torch.float32, device=device)
    entropy, log_sum_sq_probs, mean_logits = f32(with_entropy), f32(with_log_sum_sq_probs), f32(with_mean_logits)
    is_top1 = torch.zeros(N if with_is_top1 else 0, dtype=torch.bool, device=device)
    if N == 0 or H == 0:
        if N and H == 0:
            raise ValueError("hidden has an empty hidden dimension")
        return logps, entropy, log_sum_sq_probs, mean_logits, is_top1, norm

    in_scale, out_scale = _transform_constants(temperature, logit_scale, softcap)
    w_sign = -1.0 if softcap == 0.0 and in_scale < 0.0 else 1.0
    order, count = _valid_rows(labels, ignore_index)
    has_bias = bias is not None and bias.numel() != 0
    config = FWD_CONFIGS[hidden.dtype]
    _linear_logprobs_fwd_kernel[(triton.cdiv(N, config[0]),)](
        # Without a bias the weight stands in for its pointer (never read): the same pointer dtype
        # with and without, hence one compilation for both.
        hidden, weight, bias if has_bias else weight, labels, order, count,
        logps, norm, entropy, log_sum_sq_probs, mean_logits, is_top1,
        **_common(hidden, weight, bias, config),
        in_scale=in_scale, out_scale=out_scale, w_sign=w_sign,
        has_bias=has_bias, with_entropy=bool(with_entropy), with_log_sum_sq_probs=bool(with_log_sum_sq_probs),
        with_mean_logits=bool(with_mean_logits), with_is_top1=bool(with_is_top1),
        SOFTCAP=softcap > 0.0,
    )
    return logps, entropy, log_sum_sq_probs, mean_logits, is_top1, norm


def linear_token_logprobs_backward(
    grad_logps: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    norm: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
    need_hidden: bool = True,
    need_weight: bool = True,
):
    """Gradients of ``sum(grad_logps * logps) + sum(grad_entropy * entropy)`` w.r.t. hidden, weight
    and bias (``None`` gradients count as zero): ``(grad_hidden, grad_weight, grad_bias)`` in the
    inputs' dtypes, ``grad_bias`` empty when ``bias`` is. ``norm`` (and ``entropy`` when
    ``grad_entropy`` is given) are the forward's outputs. Without ``need_hidden`` (``need_weight``)
    grad_hidden (grad_weight and grad_bias) is neither computed nor allocated and comes back empty:
    a frozen lm_head costs no weight-gradient kernel and no [V, H] accumulator.
    """
    N, H, V = check_linear_inputs(hidden, weight, bias, labels)
    device = hidden.device
    has_bias = bias is not None and bias.numel() != 0
    # fp32 accumulators, each row owned by one program; cast to the input dtypes at the end.
    grad_hidden = torch.zeros((N, H) if need_hidden else (0,), dtype=torch.float32, device=device)
    grad_weight = torch.zeros((V, H) if need_weight else (0,), dtype=torch.float32, device=device)
    grad_bias = torch.zeros(V if has_bias and need_weight else 0, dtype=torch.float32, device=device)

    def result():
        return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
                grad_bias.to(bias.dtype) if has_bias else torch.empty(0, dtype=hidden.dtype, device=device))

    if (grad_logps is None and grad_entropy is None) or N == 0 or H == 0:
        return result()
    if grad_entropy is not None and (entropy is None or entropy.numel() != N):
        raise ValueError("grad_entropy needs the forward's entropy")
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
        entropy = entropy.to(torch.float32).contiguous()
    labels = labels.contiguous()
    order, count = _valid_rows(labels, ignore_index)
    in_scale, out_scale = _transform_constants(temperature, logit_scale, softcap)
    config = (AMD_BWD_CONFIGS if is_amd() else BWD_CONFIGS)[hidden.dtype]
    common = dict(
        **_common(hidden, weight, bias, config),
        in_scale=in_scale, out_scale=out_scale, grad_scale=logit_scale / temperature,
        has_bias=has_bias, has_grad_logps=has_grad_logps, has_grad_entropy=has_grad_entropy,
        SOFTCAP=softcap > 0.0,
    )
    bias_arg = bias if has_bias else weight
    if need_hidden:
        _linear_logprobs_bwd_hidden_kernel[(triton.cdiv(N, config[0]),)](
            hidden, weight, bias_arg, labels, order, count,
            norm, entropy, grad_logps, grad_entropy, grad_hidden,
            **common,
        )
    if need_weight:
        _linear_logprobs_bwd_weight_kernel[(triton.cdiv(V, config[1]),)](
            hidden, weight, bias_arg, labels, order, count,
            norm, entropy, grad_logps, grad_entropy, grad_weight, grad_bias if has_bias else norm,
            **common,
        )
    return result()
