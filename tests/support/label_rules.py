"""A label outside the vocabulary that counts: refused with a ValueError for CPU tensors; on a GPU,
where checking would synchronize the device, a NaN result instead (README, "Inputs"). Tests of such
labels state both halves through `refused_or_nan`, so the same test holds on either device."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE


def refused_or_nan(call, match: str, nan_in=lambda out: out.loss, device: str = DEVICE):
    """On CPU: `call()` raises ValueError matching `match`. On a GPU: `call()` returns, and
    `nan_in(result)` is NaN (every entry of it); returns the result there (None on CPU)."""
    if device == "cpu":
        with pytest.raises(ValueError, match=match):
            call()
        return None
    out = call()
    value = nan_in(out)
    assert torch.isnan(value).all(), f"an out-of-range label on {device} gave {value}, not NaN"
    return out
