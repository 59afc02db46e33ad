"""Tolerances the way Cut Cross-Entropy tests them: a backend's error against a float64 ground
truth may not exceed the reference's own error in the same dtype, plus a small slack. This
catches real precision loss without punishing bf16 for being bf16."""

from __future__ import annotations

import torch


def max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    diff = (value.double() - truth.double()).abs()
    finite = torch.isfinite(truth.double())
    return float(diff[finite].max()) if finite.any() else 0.0


def assert_as_accurate_as_reference(
    value: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor, name: str, slack_eps: float = 4.0,
    slack_abs: float = 0.0, ratio: float = 1.0,
) -> None:
    """`value` (backend) and `reference` (reference impl, same dtype) against `truth` (float64);
    `slack_abs` is a documented absolute error the backend may have beyond the reference's, and
    `ratio` a factor on the reference's error (for results whose rounding is as coarse as the
    reference's but falls differently, as 2-byte logits from another GEMM's summation order)."""
    assert value.shape == truth.shape, f"{name}: shape {tuple(value.shape)} != {tuple(truth.shape)}"
    truth = truth.detach().double()
    value, reference = value.detach(), reference.detach()
    # Non-finite entries must match exactly (NaN where the truth is NaN, same infinities).
    t_nan, v_nan = torch.isnan(truth), torch.isnan(value.double())
    assert torch.equal(t_nan, v_nan), f"{name}: NaN at different positions"
    inf = torch.isinf(truth)
    assert torch.equal(value.double()[inf], truth[inf]), f"{name}: infinities differ"
    eps = torch.finfo(value.dtype).eps if value.dtype.is_floating_point else 0.0
    scale = float(truth[torch.isfinite(truth)].abs().max()) if torch.isfinite(truth).any() else 0.0
    allowed = ratio * max_error(reference, truth) + slack_eps * eps * (1.0 + scale) + slack_abs
    err = max_error(value, truth)
    assert err <= allowed, f"{name}: error {err:.3g} vs float64 exceeds the reference's {allowed:.3g} (with slack)"
