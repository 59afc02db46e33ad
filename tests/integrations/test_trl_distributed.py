"""GRPO (dapo, beta > 0, with its global token-count normalization), DPO, RLOO, KTO and Reward trained by 2 processes
(torchrun, gloo, CPU): fastalign-patched TRL logs the same loss and metrics as stock TRL at every
step."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import peers
import pytest
import tiny_trl

pytest.importorskip("trl")

WORKER = os.path.join(os.path.dirname(__file__), os.pardir, "support", "trl_distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(trainer, fastalign, model_dir, out, zero3=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           WORKER, "--trainer", trainer, "--model-dir", model_dir, "--out", str(out)]
    if fastalign:
        cmd.append("--fastalign")
    if zero3:
        cmd.append("--zero3")
        env["DS_ACCELERATOR"] = "cpu"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with open(out) as f:
        result = json.load(f)
    assert result["world_size"] == 2
    return result["logs"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_trl.saved_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.parametrize("trainer", ["grpo", "dpo", "rloo", "kto", "reward", "distillation", "gkd"])
def test_two_processes_match_stock_trl(trainer, model_dir, tmp_path):
    stock = _run(trainer, False, model_dir, tmp_path / "stock.json")
    ours = _run(trainer, True, model_dir, tmp_path / "fastalign.json")
    tiny_trl.assert_logs_match(stock, ours)


def test_grpo_under_deepspeed_zero3_matches_stock_trl(model_dir, tmp_path):
    # ZeRO-3 partitions the lm_head; TRL's fused head gathers it around the forward and fastalign's
    # gathers it again for its backward (DeepSpeed's CPU accelerator, gloo).
    peers.require("deepspeed")
    stock = _run("grpo", False, model_dir, tmp_path / "stock.json", zero3=True)
    ours = _run("grpo", True, model_dir, tmp_path / "fastalign.json", zero3=True)
    tiny_trl.assert_logs_match(stock, ours)
