"""Bad inputs to the policy losses fail up front with the argument's name and what was expected."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE
from label_rules import refused_or_nan

import fastalign

B, T, V = 2, 5, 17


def inputs(**overrides):
    base = dict(
        logits=torch.randn(B, T, V, device=DEVICE),
        labels=torch.randint(0, V, (B, T), device=DEVICE),
        completion_mask=torch.ones(B, T, device=DEVICE),
        advantages=torch.randn(B, device=DEVICE),
        old_logps=torch.randn(B, T, device=DEVICE) - 3,
        ref_logps=torch.randn(B, T, device=DEVICE) - 3,
        num_items_in_batch=torch.tensor(10.0),
    )
    # The parameters are built at collection, on CPU: a bad input goes to the batch's device (a meta
    # one stays, for the device check), so that the check under test answers.
    base.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) and not v.is_meta else v for k, v in overrides.items()})
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(loss_type="ppo"),
         r"loss_type: expected one of 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'sapo', 'luspo', 'vespo'"),
        (dict(loss_type="vespo", convention="verl"), r"loss_type: expected one of 'vanilla', 'gspo', 'cispo', 'sapo'"),
        (dict(loss_type="vespo", vespo_k_pos=-1.0), r"vespo_k_pos: expected a finite number >= 0, got -1.0"),
        (dict(loss_type="vespo", vespo_lambda_neg=math.inf), r"vespo_lambda_neg: expected a finite number >= 0"),
        (dict(loss_type="vespo", vespo_lambda_pos=math.nan), r"vespo_lambda_pos: expected a finite number >= 0"),
        (dict(loss_type="dapo", convention="verl"), r"loss_type: expected one of 'vanilla', 'gspo', 'cispo', 'sapo'"),
        (dict(epsilon=1.5), r"epsilon: expected a clipping range in \(0, 1\), got 1.5"),
        (dict(epsilon=0.0), r"epsilon: expected a clipping range in \(0, 1\)"),
        (dict(epsilon_high=-0.1), r"epsilon_high: expected a clipping range in \(0, 1\)"),
        (dict(loss_type="cispo", epsilon_high=-1.0), r"epsilon_high: expected a finite number > 0"),
        (dict(loss_type="dr_grpo"), r"max_completion_length: required for loss_type='dr_grpo'"),
        (dict(beta=-0.1), r"beta: expected a finite number >= 0"),
        (dict(kl_estimator="k4", beta=0.1), r"kl_estimator: expected one of"),
        (dict(importance_sampling_level="group"), r"importance_sampling_level: expected one of 'token', 'sequence'"),
        (dict(loss_type="cispo", importance_sampling_level="sequence"), r"'sequence' is not defined for loss_type='cispo'"),
        (dict(top_entropy_quantile=0.0), r"top_entropy_quantile: expected a value in \(0, 1\]"),
        (dict(loss_agg_mode="mean"), r"loss_agg_mode: expected one of 'token-mean'"),
        (dict(convention="openrlhf"), r"convention: expected one of 'trl', 'verl'"),
        (dict(convention="verl", loss_type="vanilla", clip_ratio_c=0.5), r"clip_ratio_c: the dual-clip bound must be > 1"),
        (dict(convention="verl", loss_type="vanilla", delta=2.0), r"delta: TRL's two-sided clipping"),
        (dict(temperature=0.0), r"temperature: expected a finite number > 0"),
    ],
)
def test_bad_grpo_options(options, match):
    with pytest.raises(ValueError, match=match):
        fastalign.GRPOLoss(**options)
    with pytest.raises(ValueError, match=match):
        fastalign.grpo_loss(**inputs(), **options)


@pytest.mark.parametrize("name,value", [("vespo_k_pos", "2"), ("vespo_lambda_neg", True), ("vespo_k_neg", None)])
def test_vespo_options_take_numbers(name, value):
    with pytest.raises(TypeError, match=rf"{name}: expected a number, got {type(value).__name__}"):
        fastalign.GRPOLoss(loss_type="vespo", **{name: value})


@pytest.mark.parametrize(
    "options,overrides,match",
    [
        (dict(beta=0.04), dict(ref_logps=None), r"ref_logps: required when beta > 0"),
        (dict(loss_type="dapo"), dict(num_items_in_batch=None), r"num_items_in_batch: required for loss_type='dapo'"),
        (dict(loss_type="cispo", epsilon_high=5.0), dict(num_items_in_batch=None), r"num_items_in_batch: required"),
        (dict(loss_type="vespo"), dict(num_items_in_batch=None), r"num_items_in_batch: required for loss_type='vespo'"),
        (dict(), dict(labels=torch.zeros(B, T + 1, dtype=torch.long)), r"labels: expected shape \(2, 5\)"),
        (dict(), dict(labels=torch.zeros(B, T)), r"labels: expected an int64 or int32 tensor"),
        (dict(), dict(labels=torch.full((B, T), V)), r"labels: every label where completion_mask is nonzero must lie in \[0, 17\)"),
        (dict(), dict(logits=torch.randn(B * T, V), labels=torch.zeros(B * T, dtype=torch.long)),
         r"logits: expected shape \[B, T, V\]"),
        (dict(), dict(completion_mask=torch.ones(B, T - 1)), r"completion_mask: expected shape \(2, 5\)"),
        (dict(), dict(advantages=torch.randn(B + 1)), r"advantages: expected shape \(2, 5\) or \(2,\) or \(2, 1\)"),
        (dict(), dict(advantages=torch.ones(B, dtype=torch.long)), r"advantages: expected a floating-point tensor"),
        (dict(), dict(old_logps=torch.randn(B, T - 1)), r"old_logps: expected shape \(2, 5\)"),
        (dict(beta=0.1), dict(ref_logps=torch.randn(B)), r"ref_logps: expected shape \(2, 5\)"),
        (dict(), dict(importance_sampling_ratio=torch.rand(B, 2)), r"importance_sampling_ratio: expected shape"),
        (dict(), dict(sampling_logps=torch.randn(B, T)), r"sampling_logps: only used with off_policy_mask_threshold"),
        (dict(), dict(logps=torch.randn(B, T)), r"logits / hidden / logps: pass exactly one input level"),
        (dict(entropy_coef=0.1), dict(logits=None, labels=None, logps=torch.randn(B, T)),
         r"entropies: required with logps"),
        (dict(), dict(labels=None), r"labels: required with logits"),
        (dict(convention="verl", loss_type="vanilla", dp_size=2), dict(), r"batch_num_tokens: required when dp_size > 1"),
        (dict(convention="verl", loss_type="vanilla", dp_size=2, loss_agg_mode="seq-mean-token-mean"), dict(),
         r"global_batch_size: required when dp_size > 1"),
    ],
)
def test_bad_grpo_inputs(options, overrides, match):
    if match.startswith("labels: every label"):
        refused_or_nan(lambda: fastalign.grpo_loss(**inputs(**overrides), **options), match)
        return
    with pytest.raises((ValueError, TypeError), match=match):
        fastalign.grpo_loss(**inputs(**overrides), **options)


def test_grpo_device_mismatch_is_named():
    meta = torch.randn(B, T, device="meta")
    device = inputs()["logits"].device
    with pytest.raises(ValueError, match=rf"old_logps: expected a tensor on {device}, got meta"):
        fastalign.grpo_loss(**inputs(old_logps=meta))


@pytest.mark.parametrize(
    "options,overrides,match",
    [
        (dict(epsilon=2.0), dict(), r"epsilon: expected a clipping range in \(0, 1\)"),
        (dict(dual_clip=1.0), dict(), r"dual_clip: the dual-clip bound c must be > 1"),
        (dict(convention="trl", dual_clip=3.0), dict(), r"dual_clip: TRL's PPO has no dual-clip"),
        (dict(kl_coef=0.1), dict(ref_logps=None), r"ref_logps: required when kl_coef > 0"),
        (dict(), dict(vpreds=torch.randn(B, T)), r"returns, values: the value loss needs vpreds, values and returns"),
        (dict(), dict(vpreds=torch.randn(B, T), values=torch.randn(B, T), returns=torch.randn(B)),
         r"returns: expected shape \(2, 5\)"),
        (dict(value_clip=-1.0), dict(), r"value_clip: expected a finite number > 0"),
        (dict(kl_estimator="full", kl_coef=0.1), dict(), r"kl_estimator: expected one of"),
    ],
)
def test_bad_ppo_inputs(options, overrides, match):
    args = inputs(**overrides)
    args.pop("num_items_in_batch")
    with pytest.raises((ValueError, TypeError), match=match):
        fastalign.ppo_loss(**args, **options)
