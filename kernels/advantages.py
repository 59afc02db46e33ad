"""Group-relative advantages and REINFORCE++ returns (Triton).

``_group_advantages_kernel``: one program per group. Contiguous groups (``RAGGED`` False) are runs
of ``group_size`` starting at ``pid * group_size``; ragged groups are segments
``offsets[pid]:offsets[pid + 1]`` of a permutation ``order`` that sorts the elements by group id
(one stable sort on the host, shared with the other backends), read through that permutation.
Each program reads its group twice (sum and count, then squared deviations around the mean) and
writes it once; when the group fits one BLOCK, as it does for every contiguous launch, each loop
runs once. Statistics are in float64: a group of equal rewards centres to exactly 0, so
``0 / (0 + eps)`` stays 0 instead of a rounding residue amplified by 1/eps.

``_discounted_returns_kernel``: one program per block of rows, scanning the time axis from the
right one column at a time (the recurrence is sequential in t, parallel across rows). It follows
verl 0.9.1: masked tokens are skipped, the running return carried across them.

``_remax_kernel``: the same walk from the right for ReMax: the reward-to-go of the masked rewards,
accumulated in float64 (torch's CPU ``cumsum`` accumulates float32 in double, so verl's CPU
numbers are met exactly), minus the greedy baseline on the response tokens.

The per-element formula is documented in fastalign/reference/advantages.py.
"""

import torch
import triton
import triton.language as tl

from . import contract
from .target import nvidia_options, warps

SCALE_GROUP_ID = tl.constexpr(contract.SCALE_GROUP)
SCALE_GIVEN_ID = tl.constexpr(contract.SCALE_GIVEN)

# Launch configurations; tests/ops/triton_compile_gate.py compiles every kernel as the launchers call it.
MAX_BLOCK = 1024
GROUP_THREADS = 128
RETURNS_BLOCK_ROWS = 128
RETURNS_THREADS = 128


@triton.jit
def _load_group_block(x_ptr, order_ptr, start, j, length, RAGGED: tl.constexpr):
    # Positions j of a group: rows start + j, or through the sorted permutation for ragged groups.
    inside = j < length
    if RAGGED:
        idx = tl.load(order_ptr + start + j, mask=inside, other=0)
    else:
        idx = start + j
    v = tl.load(x_ptr + idx, mask=inside, other=0.0).to(tl.float64)
    return idx, v, inside


@triton.jit
def _counted(v, inside, VERL: tl.constexpr):
    # verl counts every reward; TRL's nanmean/nanstd leave NaN rewards out.
    if VERL:
        return inside
    else:
        return inside & (v == v)


@triton.jit(do_not_specialize=["group_size", "eps"])
def _group_advantages_kernel(
    x_ptr, order_ptr, offsets_ptr, denom_ptr, out_ptr,
    group_size, eps,
    RAGGED: tl.constexpr, RLOO: tl.constexpr, SCALE: tl.constexpr, VERL: tl.constexpr,
    NAN_TO_ZERO: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if RAGGED:
        start = tl.load(offsets_ptr + pid)
        length = tl.load(offsets_ptr + pid + 1) - start
    else:
        start = pid * group_size
        length = group_size.to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)

    count = tl.zeros([BLOCK], dtype=tl.float64)
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for j0 in range(0, length, BLOCK):
        idx, v, inside = _load_group_block(x_ptr, order_ptr, start, j0 + cols, length, RAGGED)
        counted = _counted(v, inside, VERL)
        count += tl.where(counted, 1.0, 0.0)
        total += tl.where(counted, v, 0.0)
    n = tl.sum(count, axis=0)
    mean = tl.sum(total, axis=0) / n

    m2 = tl.zeros([BLOCK], dtype=tl.float64)
    for j0 in range(0, length, BLOCK):
        idx, v, inside = _load_group_block(x_ptr, order_ptr, start, j0 + cols, length, RAGGED)
        counted = _counted(v, inside, VERL)
        d = tl.where(counted, v - mean, 0.0)
        m2 += d * d
    nan = float("nan")
    std = tl.where(n > 1.0, tl.sqrt(tl.sum(m2, axis=0) / (n - 1.0)), nan)
    if VERL:
        single = length == 1
        mean = tl.where(single, 0.0, mean)
        std = tl.where(single, 1.0, std)
    if SCALE == SCALE_GROUP_ID:
        divisor = std + eps
    elif SCALE == SCALE_GIVEN_ID:
        divisor = tl.load(denom_ptr).to(tl.float64) + eps
    else:
        divisor = 1.0
    loo = n / (n - 1.0)

    for j0 in range(0, length, BLOCK):
        idx, v, inside = _load_group_block(x_ptr, order_ptr, start, j0 + cols, length, RAGGED)
        if RLOO:
            if VERL:
                lone = v
            else:
                lone = tl.zeros_like(v)
            alone = tl.where(length == 1, lone, nan)
            base = tl.where(n > 1.0, loo * (v - mean), alone)
        else:
            base = v - mean
        a = base / divisor
        if NAN_TO_ZERO:
            # torch.nan_to_num(x, nan=0.0) as TRL applies it: NaN -> 0, +-inf -> the dtype's finite extremes.
            if out_ptr.dtype.element_ty == tl.float32:
                limit = 3.4028234663852886e38
            else:
                limit = 1.7976931348623157e308
            a = tl.where(a != a, 0.0, tl.minimum(tl.maximum(a, -limit), limit))
        tl.store(out_ptr + idx, a.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["B", "T", "gamma"])
def _discounted_returns_kernel(r_ptr, m_ptr, out_ptr, B, T, gamma, BLOCK_ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    live = rows < B
    base = rows * T
    running = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for k in range(0, T):
        t = T - 1 - k
        r = tl.load(r_ptr + base + t, mask=live, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + base + t, mask=live, other=0.0).to(tl.float32)
        # verl 0.9.1's scan (compute_reinforce_plus_plus_outcome_advantage): a masked token returns 0
        # and passes the running return on unchanged; written as verl writes it so fractional masks
        # match too.
        new = r + gamma * running
        tl.store(out_ptr + base + t, new * m, mask=live)
        running = new * m + running * (1.0 - m)


@triton.jit(do_not_specialize=["B", "T"])
def _remax_kernel(r_ptr, m_ptr, b_ptr, adv_ptr, ret_ptr, B, T, BLOCK_ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    live = rows < B
    base = rows * T
    baseline = tl.load(b_ptr + rows, mask=live, other=0.0).to(tl.float32)
    running = tl.zeros([BLOCK_ROWS], dtype=tl.float64)
    for k in range(0, T):
        t = T - 1 - k
        r = tl.load(r_ptr + base + t, mask=live, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + base + t, mask=live, other=0.0).to(tl.float32)
        # verl: (rewards * mask) rounded in float32, then the reverse cumsum.
        running += (r * m).to(tl.float64)
        ret = running.to(tl.float32)
        tl.store(ret_ptr + base + t, ret, mask=live)
        tl.store(adv_ptr + base + t, ret - baseline * m, mask=live)


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 for the triton backend, got {t.dtype}")


def group_advantages_forward(
    values: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    rloo: bool,
    scale: int,
    denom: torch.Tensor,
    eps: float,
    verl: bool,
    nan_to_zero: bool,
) -> torch.Tensor:
    """One advantage per element of ``values`` ([N] float32), in one launch; see the module doc."""
    _check_float("values", values)
    values = values.contiguous()
    n = values.numel()
    out = torch.empty_like(values)
    if n == 0:
        return out
    ragged = order.numel() > 0
    if ragged:
        n_groups = offsets.numel() - 1
        order, offsets = order.contiguous(), offsets.contiguous()
        # Ragged segments loop over BLOCK-wide chunks; size the block to the mean group.
        block = min(MAX_BLOCK, triton.next_power_of_2(max(1, -(-n // max(n_groups, 1)))))
    else:
        if group_size <= 0 or n % group_size != 0:
            raise ValueError(f"group_size {group_size} does not divide {n}")
        n_groups = n // group_size
        block = min(MAX_BLOCK, triton.next_power_of_2(group_size))
        order = offsets = values  # unused pointers: keeps the signature the same in every case
    if scale != contract.SCALE_GIVEN:
        denom = values
    _group_advantages_kernel[(n_groups,)](
        values, order, offsets, denom, out, group_size, float(eps),
        RAGGED=ragged, RLOO=bool(rloo), SCALE=int(scale), VERL=bool(verl), NAN_TO_ZERO=bool(nan_to_zero),
        BLOCK=max(block, 16), num_warps=warps(GROUP_THREADS),
        # Triton 3.6's ptxas left one sm_90 variant at 32 registers with an 8-byte spill; 64 is room.
        **nvidia_options(maxnreg=64),
        # Pinned off (Triton 3.10 changes the default): (r - mean) / (std + eps) rounded step by
        # step, as the trainers' eager PyTorch computes it.
        enable_fp_fusion=False,
    )
    return out


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE++ returns for ``rewards`` [B, T] float32 with the response ``mask`` [B, T]."""
    _check_float("rewards", rewards)
    rewards = rewards.contiguous()
    mask = mask.to(torch.float32).contiguous()
    B, T = rewards.shape
    out = torch.empty_like(rewards)
    if B == 0 or T == 0:
        return out
    _discounted_returns_kernel[(triton.cdiv(B, RETURNS_BLOCK_ROWS),)](
        rewards, mask, out, B, T, float(gamma), BLOCK_ROWS=RETURNS_BLOCK_ROWS, num_warps=warps(RETURNS_THREADS),
        # Pinned off: each product and sum rounded on its own, as verl's eager PyTorch rounds them,
        # so the scan does not drift from verl's returns by an FMA's rounding per step.
        enable_fp_fusion=False,
    )
    return out


def remax_advantages_forward(
    rewards: torch.Tensor, mask: torch.Tensor, baselines: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax advantages and returns for ``rewards`` [B, T] float32, ``mask`` [B, T], ``baselines`` [B]."""
    _check_float("rewards", rewards)
    rewards = rewards.contiguous()
    mask = mask.to(torch.float32).contiguous()
    baselines = baselines.to(torch.float32).contiguous()
    B, T = rewards.shape
    advantages, returns = torch.empty_like(rewards), torch.empty_like(rewards)
    if B == 0 or T == 0:
        return advantages, returns
    _remax_kernel[(triton.cdiv(B, RETURNS_BLOCK_ROWS),)](
        rewards, mask, baselines, advantages, returns, B, T, BLOCK_ROWS=RETURNS_BLOCK_ROWS,
        num_warps=warps(RETURNS_THREADS),
        # Pinned off: returns - baseline * mask rounded step by step, as verl's eager PyTorch does.
        enable_fp_fusion=False,
    )
    return advantages, returns
