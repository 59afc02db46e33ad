"""bench/scale_model.py (the 70B projection) and bench/scaling.py (its measured counterpart on CPU):
the model's bytes-sent formulas equal what the collectives of a 2-process run send, and the
projection prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))


def test_the_projection_prints_every_way():
    out = subprocess.run([sys.executable, str(BENCH / "scale_model.py")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for way in ("fastalign, from the logits slice", "fastalign, from hidden states", "verl Megatron", "Liger fused linear"):
        assert way in out.stdout


def test_model_bytes_equal_the_measured_collectives():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import scaling
    from scale_model import Setup, fastalign_hidden

    tokens, vocab, hidden, world = 64, 301, 16, 2
    rows = scaling.measure(world, tokens, vocab, hidden)
    sizes_exchange = (world - 1) * 8  # each rank's slice size, one int64, gathered once per call
    setup = Setup(hidden=hidden, vocab=vocab, tokens=tokens, tp=world, act_bytes=4)
    for r in rows:
        if r["way"] == "logits":  # the bench's logits way has no lm_head: the all-gather alone
            assert r["sent"] == (world - 1) * tokens * 8 * 4 + sizes_exchange, r
        else:
            assert r["sent"] == pytest.approx(fastalign_hidden(setup)["sent"] + sizes_exchange), r
