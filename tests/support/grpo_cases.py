"""The GRPO cases tests/losses/test_grpo.py and tests/integrations/test_trl_trainer_grpo.py share:
a completion batch, the option sets TRL's GRPOTrainer takes, the inputs its `_compute_loss` and
fastalign's `grpo_loss` take for them, and TRL 1.16's `_compute_loss` itself, called on a stand-in
trainer (TRL is imported when it is called)."""

from __future__ import annotations

import collections
import math
import types

import pytest
import torch
from conftest import DEVICE

from fastalign.reference import token_logprobs as reference_token_logprobs

B, T, V = 4, 7, 61
TEMPERATURE = 0.9


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def stand_in_trainer(config: dict, use_vllm: bool = False, accelerator=None):
    """A GRPOTrainer stand-in holding exactly the attributes `_compute_loss` reads (the adaptive
    entropy controller's state included), for one process (`accelerator`: one of several)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    ga = config.get("gradient_accumulation_steps", 1)
    epsilon = config.get("epsilon", 0.2)
    adaptive = config.get("use_adaptive_entropy", False)
    trainer = types.SimpleNamespace(
        loss_type=config.get("loss_type", "dapo"),
        beta=config.get("beta", 0.0),
        epsilon_low=epsilon,
        epsilon_high=config.get("epsilon_high", epsilon),
        importance_sampling_level=config.get("importance_sampling_level", "token"),
        top_entropy_quantile=config.get("top_entropy_quantile", 1.0),
        off_policy_mask_threshold=config.get("off_policy_mask_threshold"),
        use_vllm=use_vllm,
        vllm_importance_sampling_correction=True,
        aux_loss_enabled=False,
        entropy_coef=config.get("entropy_coef", 0.0),
        _entropy_bonus_enabled=config.get("entropy_coef", 0.0) != 0 or adaptive,
        use_adaptive_entropy=adaptive,
        _last_world_entropy=float("inf"),
        _entropy_window_stats=None,
        max_completion_length=config.get("max_completion_length"),
        current_gradient_accumulation_steps=ga,
        accelerator=accelerator or _Accelerator(),
        model=types.SimpleNamespace(training=True),
        args=types.SimpleNamespace(
            use_bias_correction_kl=config.get("use_bias_correction_kl", True),
            delta=config.get("delta"),
            sapo_temperature_pos=config.get("sapo_temperature_pos", 1.0),
            sapo_temperature_neg=config.get("sapo_temperature_neg", 1.05),
            vespo_k_pos=config.get("vespo_k_pos", 2.0),
            vespo_lambda_pos=config.get("vespo_lambda_pos", 3.0),
            vespo_k_neg=config.get("vespo_k_neg", 3.0),
            vespo_lambda_neg=config.get("vespo_lambda_neg", 2.0),
            steps_per_generation=config.get("steps_per_generation", ga),
            entropy_target=config.get("entropy_target", 0.2),
            entropy_coef_delta=config.get("entropy_coef_delta", 0.005),
            entropy_coef_min=config.get("entropy_coef_min", 0.0),
            entropy_coef_max=config.get("entropy_coef_max", 1.0),
        ),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
    )
    trainer.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, trainer)
    trainer.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
    trainer.get_gamma_weights = GRPOTrainer.get_gamma_weights
    return trainer


def run_compute_loss(trainer, logps, entropies, inputs, compute_loss=None):
    """One `_compute_loss` call (TRL's, or `compute_loss`, a replacement with its signature) on a
    stand-in, the forward answered with the given per-token log-probs and entropies."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropies, None)
    return (compute_loss or GRPOTrainer._compute_loss)(trainer, None, inputs)


def trl_compute_loss(config: dict, logps, entropies, inputs, compute_loss=None):
    """TRL's `_compute_loss` (or `compute_loss`, a replacement with its signature) on a fresh
    stand-in; the loss and the last value of each logged metric."""
    trainer = stand_in_trainer(config, use_vllm="importance_sampling_ratio" in inputs)
    loss = run_compute_loss(trainer, logps, entropies, inputs, compute_loss)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def make_batch(dtype=torch.float64, advantages_scale=1.0, drift=0.3):
    """A right-padded completion batch; old/ref log-probs drift from the policy's so that ratios
    land inside and far outside the clip range; advantages of both signs."""
    logits = (torch.randn(B, T, V, device=DEVICE) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    mask = torch.ones(B, T, device=DEVICE, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    with torch.no_grad():
        logps = reference_token_logprobs(logits.double(), labels, temperature=TEMPERATURE).logps.float()
    old = logps + drift * torch.randn(B, T, device=DEVICE)
    old[0, :3] = logps[0, :3] - 1.5  # ratio e^1.5: far above 1 + eps
    old[3, :2] = logps[3, :2] + 1.5  # far below 1 - eps
    ref = logps + 0.2 * torch.randn(B, T, device=DEVICE)
    advantages = torch.tensor([1.0, -0.5, 0.7, -1.2], device=DEVICE) * advantages_scale
    return logits, labels, mask, advantages, old, ref


CONFIGS = [
    dict(loss_type="grpo"),
    dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False),
    dict(loss_type="grpo", beta=0.04, delta=1.5),
    dict(loss_type="bnpo", beta=0.04),
    dict(loss_type="dr_grpo", max_completion_length=9, gradient_accumulation_steps=2),
    dict(loss_type="dapo", epsilon_high=0.28),
    dict(loss_type="dapo", epsilon_high=0.28, beta=0.04, gradient_accumulation_steps=2, steps_per_generation=4),
    dict(loss_type="dapo", beta=0.04, on_policy=True),
    dict(loss_type="cispo", epsilon_high=5.0, beta=0.02),
    dict(loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
    dict(loss_type="luspo", beta=0.04),
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.04),
    dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.01),
    dict(loss_type="grpo", entropy_coef=0.05, beta=0.04),
    dict(loss_type="dapo", off_policy_mask_threshold=0.05, sampling=True),
    dict(loss_type="dapo", is_ratio="token"),
    dict(loss_type="grpo", is_ratio="sequence", beta=0.04),
    # VESPO: phi from the summed token log-ratios (some far from 0), both advantage signs; with the
    # vLLM ratio folded into phi (token-level, and the [B, 1] ratio TRL's get_gamma_weights also takes).
    dict(loss_type="vespo"),
    dict(loss_type="vespo", on_policy=True, beta=0.04),
    dict(loss_type="vespo", is_ratio="token", vespo_k_pos=1.5, vespo_lambda_neg=2.5, gradient_accumulation_steps=2,
         steps_per_generation=4),
    dict(loss_type="vespo", is_ratio="token", on_policy=True, vespo_lambda_pos=0.0),
    dict(loss_type="vespo", is_ratio="sequence", beta=0.04, use_bias_correction_kl=True),
    dict(loss_type="vespo", importance_sampling_level="sequence", beta=0.04),
    dict(loss_type="vespo", top_entropy_quantile=0.5, entropy_coef=0.01),
    dict(loss_type="dapo", off_policy_mask_threshold=0.05, sampling=True, entropy_coef=0.02),
]


def split_config(config):
    options = dict(config)
    extras = {key: options.pop(key, None) for key in ("on_policy", "sampling", "is_ratio")}
    return options, extras


def loss_inputs(config, extras, labels, mask, advantages, old, ref, n_items):
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long, device=DEVICE),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long, device=DEVICE),
        "completion_ids": labels,
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": n_items,
    }
    ours = {"completion_mask": mask, "advantages": advantages, "num_items_in_batch": n_items}
    if not extras["on_policy"]:
        inputs["old_per_token_logps"] = old
        ours["old_logps"] = old
    if config.get("beta", 0):
        inputs["ref_per_token_logps"] = ref
        ours["ref_logps"] = ref
    if extras["sampling"]:
        sampling = old + 0.1 * torch.randn_like(old)
        inputs["sampling_per_token_logps"] = sampling
        ours["sampling_logps"] = sampling
    if extras["is_ratio"] == "token":
        ratio = torch.rand(B, T, device=DEVICE) + 0.5
        inputs["importance_sampling_ratio"] = ours["importance_sampling_ratio"] = ratio
    elif extras["is_ratio"] == "sequence":
        ratio = torch.rand(B, 1, device=DEVICE) + 0.5
        inputs["importance_sampling_ratio"] = ours["importance_sampling_ratio"] = ratio
    return inputs, ours


def assert_metrics_equal(ours: dict, theirs: dict, atol: float):
    assert set(ours) == set(theirs), f"metric names differ: {sorted(ours)} vs {sorted(theirs)}"
    for name, value in theirs.items():
        mine = float(ours[name])
        if math.isnan(value):
            assert math.isnan(mine), name
        else:
            assert mine == pytest.approx(value, abs=atol, rel=1e-5), name
