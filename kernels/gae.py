"""Generalized advantage estimation (Triton): one program per row scans it from the end.

GAE is a first-order linear recurrence along time, ``x_t = a_t * x_{t+1} + b_t``, and the
composition of such affine maps is associative, so each block of BLOCK positions is solved with
one ``tl.associative_scan`` and the value at the block's earliest position is carried into the
next block (a blocked scan: any row length, BLOCK positions in registers at a time). Each block is
loaded in descending time order so the scan runs forward: the combine's operand order is then the
plain left-to-right one, with no reliance on how a reversed scan orders its operands.

verl's masking (MASK_IN_SCAN) carries two recurrences: the next valid value to the right
(``nv_t = m_{t+1} ? v_{t+1} : nv_{t+1}``, written on the positions shifted by one so that the scan
is inclusive) and the advantage itself (``A_t = m_t ? delta_t + gamma*lam*A_{t+1} : A_{t+1}``).
TRL's recurrence is the same with every position valid: ``nv_t = v_{t+1}``, no scan needed.

Whitening takes a second launch: the scan writes each row's valid count, mean and centred sum of
squares (blocks merged with Chan's formula as they pass), and the whitening kernel merges the rows
the same way and normalizes its row.
"""

import torch
import triton
import triton.language as tl

from .target import warps

# tests/ops/triton_compile_gate.py compiles both kernels exactly as the launcher calls them.
# 8 warps over 1024 positions is 4 per thread: with 4 warps the two scans of verl's masking spill
# 8 bytes of stack on sm_80.
SCAN_BLOCK = 1024
SCAN_THREADS = 256
WHITEN_BLOCK = 1024
WHITEN_BLOCK_B = 256
WHITEN_THREADS = 128
# TRL's and verl's masked_whiten: (x - mean) * rsqrt(var + 1e-8).
WHITEN_EPS = tl.constexpr(1e-8)
MASK_DTYPES = (torch.bool, torch.int64)


@triton.jit
def _affine_combine(a_left, b_left, a_right, b_right):
    # Apply the left (earlier in scan order) map first: a_r * (a_l * x + b_l) + b_r.
    return a_right * a_left, a_right * b_left + b_right


@triton.jit
def _last(x, j, BLOCK: tl.constexpr):
    return tl.sum(tl.where(j == BLOCK - 1, x, 0.0), axis=0)


@triton.jit
def _gae_scan_kernel(
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr, stats_ptr,
    T, stride_rb, stride_rt, stride_vb, stride_vt, stride_mb, stride_mt,
    gamma, gamma_lam,
    HAS_MASK: tl.constexpr, MASK_IN_SCAN: tl.constexpr, WITH_STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    r_row = rewards_ptr + row * stride_rb
    v_row = values_ptr + row * stride_vb
    m_row = mask_ptr + row * stride_mb
    out_row = row * T
    nv_carry = 0.0
    adv_carry = 0.0
    n_acc = 0.0
    mean_acc = 0.0
    m2_acc = 0.0
    for k in range(0, tl.cdiv(T, BLOCK)):
        t = T - 1 - k * BLOCK - j
        inside = t >= 0
        t64 = t.to(tl.int64)
        r = tl.load(r_row + t64 * stride_rt, mask=inside, other=0.0).to(tl.float32)
        v = tl.load(v_row + t64 * stride_vt, mask=inside, other=0.0).to(tl.float32)
        next_inside = inside & (t + 1 < T)
        v_next = tl.load(v_row + (t64 + 1) * stride_vt, mask=next_inside, other=0.0).to(tl.float32)
        if HAS_MASK:
            valid = (tl.load(m_row + t64 * stride_mt, mask=inside, other=0) != 0) & inside
        else:
            valid = inside
        if MASK_IN_SCAN:
            valid_next = (tl.load(m_row + (t64 + 1) * stride_mt, mask=next_inside, other=0) != 0) & next_inside
            a_nv = tl.where(valid_next, 0.0, 1.0)
            b_nv = tl.where(valid_next, v_next, 0.0)
            a_nv, b_nv = tl.associative_scan((a_nv, b_nv), 0, _affine_combine)
            next_value = a_nv * nv_carry + b_nv
            nv_carry = _last(next_value, j, BLOCK)
            steps = valid
        else:
            next_value = v_next
            steps = inside
        a = tl.where(steps, gamma_lam, 1.0)
        b = tl.where(steps, r + gamma * next_value - v, 0.0)
        a, b = tl.associative_scan((a, b), 0, _affine_combine)
        adv = a * adv_carry + b
        adv_carry = _last(adv, j, BLOCK)
        tl.store(adv_ptr + out_row + t64, adv, mask=inside)
        tl.store(ret_ptr + out_row + t64, adv + v, mask=inside)
        if WITH_STATS:
            count = tl.sum(valid.to(tl.float32), axis=0)
            block_mean = tl.sum(tl.where(valid, adv, 0.0), axis=0) / tl.maximum(count, 1.0)
            centred = tl.where(valid, adv - block_mean, 0.0)
            block_m2 = tl.sum(centred * centred, axis=0)
            total = n_acc + count
            delta = block_mean - mean_acc
            share = count / tl.maximum(total, 1.0)
            mean_acc += delta * share
            m2_acc += block_m2 + delta * delta * n_acc * share
            n_acc = total
    if WITH_STATS:
        tl.store(stats_ptr + row * 3, n_acc)
        tl.store(stats_ptr + row * 3 + 1, mean_acc)
        tl.store(stats_ptr + row * 3 + 2, m2_acc)


@triton.jit
def _gae_whiten_kernel(
    adv_ptr, mask_ptr, stats_ptr,
    B, T, stride_mb, stride_mt,
    ddof, add_back, zero_masked,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_B)
    # Every program merges the per-row statistics itself: B is a batch size, and this saves a
    # launch and a device-wide barrier.
    n_vec = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_vec = tl.zeros([BLOCK_B], dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        i = (start + rows).to(tl.int64)
        ok = i < B
        n_i = tl.load(stats_ptr + i * 3, mask=ok, other=0.0)
        n_vec += n_i
        s_vec += n_i * tl.load(stats_ptr + i * 3 + 1, mask=ok, other=0.0)
    n = tl.sum(n_vec, axis=0)
    mean = tl.sum(s_vec, axis=0) / n
    m2_vec = tl.zeros([BLOCK_B], dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        i = (start + rows).to(tl.int64)
        ok = i < B
        n_i = tl.load(stats_ptr + i * 3, mask=ok, other=0.0)
        d = tl.load(stats_ptr + i * 3 + 1, mask=ok, other=0.0) - mean
        m2_vec += tl.load(stats_ptr + i * 3 + 2, mask=ok, other=0.0) + n_i * d * d
    var = tl.sum(m2_vec, axis=0) / (n - ddof)
    rstd = 1.0 / tl.sqrt(var + WHITEN_EPS)
    shift = add_back * mean
    cols = tl.arange(0, BLOCK)
    for start in range(0, T, BLOCK):
        t64 = (start + cols).to(tl.int64)
        inside = t64 < T
        x = tl.load(adv_ptr + row * T + t64, mask=inside, other=0.0)
        y = (x - mean) * rstd + shift
        if HAS_MASK:
            valid = tl.load(mask_ptr + row * stride_mb + t64 * stride_mt, mask=inside, other=0) != 0
            y = tl.where(valid | (zero_masked == 0), y, 0.0)
        tl.store(adv_ptr + row * T + t64, y, mask=inside)


def gae_forward(rewards, values, mask, gamma, lam, trl, whiten, shift_mean, unbiased):
    """(advantages, returns), [B, T] fp32, from [B, T] fp32/bf16/fp16 rewards and values (any
    strides) and an optional [B, T] mask; the op layer has checked the arguments."""
    if rewards.dtype != values.dtype:
        rewards, values = rewards.float(), values.float()
    if mask is not None and mask.dtype not in MASK_DTYPES:
        mask = mask != 0
    B, T = rewards.shape
    adv = torch.empty(B, T, dtype=torch.float32, device=rewards.device)
    ret = torch.empty(B, T, dtype=torch.float32, device=rewards.device)
    if B == 0 or T == 0:
        return adv, ret
    stats = torch.empty(B if whiten else 1, 3, dtype=torch.float32, device=rewards.device)
    has_mask = mask is not None
    mask_arg = mask if has_mask else rewards
    stride_mb, stride_mt = mask.stride() if has_mask else (0, 0)
    _gae_scan_kernel[(B,)](
        rewards, values, mask_arg, adv, ret, stats,
        T, rewards.stride(0), rewards.stride(1), values.stride(0), values.stride(1), stride_mb, stride_mt,
        float(gamma), float(gamma * lam),
        HAS_MASK=has_mask, MASK_IN_SCAN=has_mask and not trl, WITH_STATS=whiten, BLOCK=SCAN_BLOCK,
        num_warps=warps(SCAN_THREADS),
        # Pinned off (Triton 3.10 changes the default): each product and sum rounded on its own,
        # as the trainers' eager PyTorch recurrence rounds them.
        enable_fp_fusion=False,
    )
    if whiten:
        _gae_whiten_kernel[(B,)](
            adv, mask_arg, stats,
            B, T, stride_mb, stride_mt,
            1.0 if unbiased else 0.0, 0.0 if shift_mean else 1.0, 1 if trl else 0,
            HAS_MASK=has_mask, BLOCK=WHITEN_BLOCK, BLOCK_B=WHITEN_BLOCK_B, num_warps=warps(WHITEN_THREADS),
            enable_fp_fusion=False,
        )
    return adv, ret
