"""`gae`: generalized advantage estimation (advantages and returns) as one reverse scan per row,
with the trainers' masked whitening fused behind it.

Registered as the torch.library op `fastalign::gae_forward` (with a fake implementation, so
torch.compile traces through it). The op is forward-only: trainers compute advantages under
`torch.no_grad()` and treat them as constants, so no autograd formula is registered and the inputs
are detached before the op sees them. The op body picks its backend at run time: Triton for CUDA
tensors, the C++ kernels for CPU tensors, the reference PyTorch otherwise or when forced.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._checks import FLOAT_DTYPES, check_token_mask
from ._deprecation import renamed_option
from .backend import resolve

CONVENTIONS = ("verl", "trl")
SEMANTICS = CONVENTIONS  # the earlier name


class GAEOutput(NamedTuple):
    advantages: torch.Tensor
    returns: torch.Tensor


def _acc_dtype(rewards: torch.Tensor, values: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32


def _check_whiten_count(rewards: torch.Tensor, mask: torch.Tensor | None, unbiased: bool) -> None:
    # The trainers raise here too; counting the mask synchronizes a GPU once per call.
    ddof = 1 if unbiased else 0
    n = rewards.numel() if mask is None else int(mask.count_nonzero())
    if n <= ddof:
        raise ValueError(
            f"mask: whitening needs at least {ddof + 1} valid position(s) in the batch "
            f"({'unbiased' if unbiased else 'biased'} variance), got {n}"
        )


@torch.library.custom_op("fastalign::gae_forward", mutates_args=())
def gae_forward(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    gamma: float,
    lam: float,
    trl: bool,
    whiten: bool,
    shift_mean: bool,
    unbiased: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, values [B, T] (any strides), mask [B, T] or None -> (advantages, returns) [B, T]."""
    backend, forward = resolve("gae_forward", rewards=rewards, values=values)
    if whiten and backend != "native":
        _check_whiten_count(rewards, mask, unbiased)  # the C++ kernel counts while it scans
    return forward(rewards, values, mask, gamma, lam, trl, whiten, shift_mean, unbiased)


@gae_forward.register_fake
def _(rewards, values, mask, gamma, lam, trl, whiten, shift_mean, unbiased):
    acc = _acc_dtype(rewards, values)
    return rewards.new_empty(rewards.shape, dtype=acc), rewards.new_empty(rewards.shape, dtype=acc)


def _check_unit_interval(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number in [0, 1], got {type(value).__name__}")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value}")
    return float(value)


def _check_gae_args(rewards, values, mask, gamma, lam, convention, whiten, shift_mean, unbiased):
    for name, x in (("rewards", rewards), ("values", values)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a float32, bfloat16, float16 or float64 tensor, got {x.dtype}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected shape [B, T] (rank 2), got rank {rewards.dim()} {tuple(rewards.shape)}")
    if values.shape != rewards.shape:
        raise ValueError(f"values: expected shape {tuple(rewards.shape)} (that of rewards), got {tuple(values.shape)}")
    if values.device != rewards.device:
        raise ValueError(f"values: expected a tensor on {rewards.device} (that of rewards), got {values.device}")
    if mask is not None:
        check_token_mask("mask", mask, rewards, "rewards", optional=True)
    gamma = _check_unit_interval("gamma", gamma)
    lam = _check_unit_interval("lam", lam)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {', '.join(repr(c) for c in CONVENTIONS)}; got {convention!r}")
    for name, flag in (("whiten", whiten), ("shift_mean", shift_mean), ("unbiased", unbiased)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    return gamma, lam


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    gamma: float,
    lam: float,
    *,
    convention: str = "verl",
    whiten: bool = True,
    shift_mean: bool = True,
    unbiased: bool = True,
    semantics: str | None = None,
) -> GAEOutput:
    """Generalized advantage estimation over token rows, as PPO trainers compute it.

    Args:
        rewards: `[B, T]` per-token rewards, float32/bfloat16/float16/float64, any strides.
        values: `[B, T]` value estimates, same shape and device (any float dtype).
        mask: `[B, T]` bool, integer or float (nonzero = valid token), or None (all valid). Values
            other than 0 and 1 count as valid, not as weights.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].
        convention: how masked positions enter the recurrence.
            "verl" (`verl.trainer.ppo.core_algos.compute_gae_advantage_return`): the scan steps
            over masked tokens. With `nv` the value of the next valid token (0 past the end) and
            `A` the advantage carried from the right, at each t from T-1 down to 0:
            `delta = r_t + gamma*nv - v_t`; if valid: `A = delta + gamma*lam*A`, `nv = v_t`;
            the advantage at t is `A` (a masked token repeats the carried advantage, an
            all-masked row is 0).
            "trl" (TRL's PPOTrainer): no mask in the recurrence, `nv = v_{t+1}` (0 at T-1),
            `A = delta + gamma*lam*A` at every t; after whitening, masked advantages are set to 0
            as the trainer does (`masked_fill(advantages, ~mask, 0)`).
        whiten: whiten the advantages over every valid token of the batch (trainers' default).
        shift_mean: as `masked_whiten(shift_mean=...)`; False adds the mean back after scaling.
        unbiased: Bessel-corrected variance (both trainers' choice) or the biased one.
        semantics: the earlier name of `convention` (deprecated).

    Returns:
        GAEOutput(advantages, returns): `[B, T]` fp32 (fp64 when an input is fp64).
        `returns = advantages + values`, with the advantages before whitening.

    Whitening is `(A - mean) * rsqrt(var + 1e-8)` (the trainers' epsilon), mean and variance over
    the valid tokens of the whole batch; with fewer than 2 valid tokens (1 for the biased variance)
    it raises ValueError, as the trainers do (verl's masked mean adds 1e-8 to the count, a relative
    change below fp32 rounding). The recurrence accumulates in fp32 (fp64 for fp64 input).

    Forward only: the inputs are detached, since trainers treat advantages and returns as
    constants (`torch.no_grad()`).
    """
    convention = renamed_option("semantics", semantics, "convention", convention, "verl")
    gamma, lam = _check_gae_args(rewards, values, mask, gamma, lam, convention, whiten, shift_mean, unbiased)
    advantages, returns = gae_forward(
        rewards.detach(), values.detach(), None if mask is None else mask.detach(), gamma, lam,
        convention == "trl", whiten, shift_mean, unbiased,
    )
    return GAEOutput(advantages, returns)
