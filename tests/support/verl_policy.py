"""verl 0.9.1's own policy and value losses (verl.trainer.ppo.core_algos), called the way its
actor calls them, behind plain-argument signatures: the ground truth tests/losses/test_ppo.py
compares fastalign's convention="verl" with. verl is a test dependency (the Makefile installs it)."""

from __future__ import annotations

import torch

from verl.trainer.ppo import core_algos
from verl.utils.torch_functional import masked_mean  # noqa: F401  (re-exported for the tests)
from verl.workers.config import ActorConfig

agg_loss = core_algos.agg_loss
kl_penalty = core_algos.kl_penalty


def actor_config(**fields) -> ActorConfig:
    """verl's ActorConfig with the fields its losses read; the rest at verl's defaults."""
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **fields)


def _agg_info(agg: dict) -> dict:
    """What verl's ppo_loss puts in config.global_batch_info."""
    return {key: agg[key] for key in ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
            if key in agg}


def _call(fn, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    pg_loss, metrics = fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                          rollout_is_weights=rollout_is_weights)
    # verl logs python floats; the tests read every metric as a tensor.
    return pg_loss, {name: torch.as_tensor(value) for name, value in metrics.items()}


def policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, clip_low, clip_high,
                        clip_ratio_c, rollout_is_weights=None, **agg):
    config = actor_config(clip_ratio_low=clip_low, clip_ratio_high=clip_high, clip_ratio_c=clip_ratio_c,
                          global_batch_info=_agg_info(agg))
    return _call(core_algos.compute_policy_loss_vanilla, old_log_prob, log_prob, advantages, response_mask,
                 loss_agg_mode, config, rollout_is_weights)


def policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, clip_low, clip_high,
                     rollout_is_weights=None, **agg):
    config = actor_config(clip_ratio_low=clip_low, clip_ratio_high=clip_high, global_batch_info=_agg_info(agg))
    return _call(core_algos.compute_policy_loss_gspo, old_log_prob, log_prob, advantages, response_mask,
                 loss_agg_mode, config, rollout_is_weights)


def policy_loss_sapo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, tau_pos, tau_neg,
                     rollout_is_weights=None, **agg):
    config = actor_config(tau_pos=tau_pos, tau_neg=tau_neg, global_batch_info=_agg_info(agg))
    return _call(core_algos.compute_policy_loss_sapo, old_log_prob, log_prob, advantages, response_mask,
                 loss_agg_mode, config, rollout_is_weights)


def policy_loss_cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, clip_low, clip_high,
                      rollout_is_weights=None, **agg):
    config = actor_config(clip_ratio_low=clip_low, clip_ratio_high=clip_high, global_batch_info=_agg_info(agg))
    return _call(core_algos.compute_policy_loss_cispo, old_log_prob, log_prob, advantages, response_mask,
                 loss_agg_mode, config, rollout_is_weights)


def value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean", **agg):
    return core_algos.compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode,
                                         **agg)
