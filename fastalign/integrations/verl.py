"""fastalign's policy losses and advantage estimators in verl's registries (verl 0.9.1).

Importing this module registers, in `verl.trainer.ppo.core_algos`:

| verl setting | name | same result as verl's |
|---|---|---|
| `actor_rollout_ref.actor.policy_loss.loss_mode` | `fastalign_vanilla` | `vanilla` (dual-clip PPO) |
| | `fastalign_gspo` | `gspo` |
| | `fastalign_cispo` | `cispo` |
| | `fastalign_sapo` | `sapo` |
| `algorithm.adv_estimator` | `fastalign_grpo` | `grpo` (`norm_adv_by_std_in_grpo=False`: Dr.GRPO) |
| | `fastalign_rloo` | `rloo` |
| | `fastalign_reinforce_plus_plus` | `reinforce_plus_plus` |
| | `fastalign_reinforce_plus_plus_baseline` | `reinforce_plus_plus_baseline` |
| | `fastalign_remax` | `remax` |

Installing fastalign is enough: it declares this module in verl's `verl.plugins` entry-point group,
which `import verl` loads in every process that imports verl (the driver and its Ray workers).
`VERL_USE_EXTERNAL_PLUGINS=none` turns verl's plugin loading off; then
`VERL_USE_EXTERNAL_MODULES=fastalign.integrations.verl` (or importing this module) registers the names.
The policy losses read verl's actor config as verl's do (`clip_ratio`, `clip_ratio_low`,
`clip_ratio_high`, `clip_ratio_c`, `tau_pos`, `tau_neg`, `global_batch_info`) and return verl's
`(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})`; verl adds the KL and
entropy terms itself. Losses and advantages come back in the dtype verl's own would have: bf16 inputs
give a bf16 loss where verl's is bf16 ("token-mean" and "token-sum" with a bool or integer mask; its
sequence means and SAPO divide by fp32 counts), computed in fp32 and rounded once.

GAE is not registered: verl's trainer hands the critic's values only to its own "gae" and starts a
critic only for that name, so a registered GAE would never receive them. For the same reason
`fastalign_remax` receives the greedy responses' rewards (`reward_baselines`) only where the caller
puts them in the batch: verl 0.9.1's `RayPPOTrainer.fit` generates the greedy baseline responses
only when `algorithm.adv_estimator` is "remax"; `compute_advantage` hands a batch's
`reward_baselines` to any estimator.
"""

from __future__ import annotations

import contextlib

import torch

from .. import grpo_loss, grpo_options, group_advantages, reinforce_plus_plus_advantages
from ..advantages import _remax

try:
    from verl.trainer.ppo import core_algos
except ImportError as exc:
    raise ImportError(
        "fastalign.integrations.verl requires verl (pip install verl): it registers fastalign's losses and "
        f"advantage estimators in verl.trainer.ppo.core_algos, which could not be imported ({exc})"
    ) from exc

__all__ = ["ADV_ESTIMATORS", "POLICY_LOSSES"]

# verl's default loss_agg_mode for each loss (the trainer always passes the configured one).
_DEFAULT_AGG = {"vanilla": "token-mean", "gspo": "seq-mean-token-mean", "cispo": "token-mean",
                "sapo": "seq-mean-token-mean"}
_METRICS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")

# fastalign's argument name -> the name verl's caller set, so an error names what the user wrote.
_VERL_NAMES = {
    "epsilon": "config.clip_ratio",
    "epsilon_low": "config.clip_ratio_low",
    "epsilon_high": "config.clip_ratio_high",
    "clip_ratio_c": "config.clip_ratio_c",
    "sapo_temperature_pos": "config.tau_pos",
    "sapo_temperature_neg": "config.tau_neg",
    "dp_size": "config.global_batch_info['dp_size']",
    "loss_scale_factor": "config.loss_scale_factor",
    "batch_num_tokens": "config.global_batch_info['batch_num_tokens']",
    "global_batch_size": "config.global_batch_info['global_batch_size']",
    "logps": "log_prob",
    "old_logps": "old_log_prob",
    "completion_mask": "response_mask",
    "importance_sampling_ratio": "rollout_is_weights",
    "rewards": "token_level_rewards",
    "eps": "epsilon",
    "gamma": "config.gamma",
}


@contextlib.contextmanager
def _verl_names():
    """Re-raises fastalign's argument errors ("name: why") under the name verl's caller used."""
    try:
        yield
    except (TypeError, ValueError) as exc:
        name, sep, why = str(exc).partition(": ")
        if not sep or name not in _VERL_NAMES:
            raise
        raise type(exc)(f"{_VERL_NAMES[name]}: {why}") from exc


# --- policy losses ----------------------------------------------------------------------------


def _require(config, what: str):
    if config is None:
        raise ValueError(f"config: {what} reads its settings from verl's config, got None")
    return config


def _setting(config, name: str, default=None):
    """config.name as verl reads it (an attribute of its config dataclasses, a DictConfig key, or a
    plain namespace's attribute in verl's own tests); `default` where the field is absent."""
    if hasattr(config, name):
        return getattr(config, name)
    getter = getattr(config, "get", None)
    return getter(name, default) if getter is not None else default


def _loss_options(loss_type: str, loss_agg_mode: str, config):
    """grpo_options from verl's actor config, read as verl's own loss of that name reads it."""
    info = _setting(config, "global_batch_info") or {}
    dp_size = info.get("dp_size", 1)
    options = dict(loss_agg_mode=loss_agg_mode, dp_size=1 if dp_size is None else int(dp_size),
                   loss_scale_factor=info.get("loss_scale_factor"))
    if loss_type == "sapo":
        # verl's SAPO reads only the temperatures; the clip ratios do not enter it.
        options.update(sapo_temperature_pos=_setting(config, "tau_pos", 1.0),
                       sapo_temperature_neg=_setting(config, "tau_neg", 1.05))
    else:
        # clip_ratio_low / clip_ratio_high fall back to clip_ratio when None, as in verl.
        options.update(epsilon=_setting(config, "clip_ratio"), epsilon_low=_setting(config, "clip_ratio_low"),
                       epsilon_high=_setting(config, "clip_ratio_high"))
    if loss_type == "vanilla":
        options["clip_ratio_c"] = _setting(config, "clip_ratio_c", 3.0)
    return grpo_options(loss_type, convention="verl", **options), info


def _verl_loss_dtype(loss_type, loss_agg_mode, old_log_prob, log_prob, advantages, response_mask,
                     rollout_is_weights) -> torch.dtype:
    """The dtype verl's own loss of that name returns for these inputs: torch's promotion through its
    arithmetic. The per-token loss takes the promoted dtype of the log-probs, the advantages, the
    rollout weights and a floating-point mask; agg_loss's sequence means divide by fp32 counts."""
    dtype = torch.promote_types(torch.promote_types(log_prob.dtype, old_log_prob.dtype), advantages.dtype)
    for tensor in (rollout_is_weights, response_mask):
        if tensor is not None and tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    if loss_type == "sapo" or loss_agg_mode.startswith("seq-mean"):
        dtype = torch.promote_types(dtype, torch.float32)
    return dtype


def _policy_loss(loss_type, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights):
    config = _require(config, f"fastalign_{loss_type}")
    with _verl_names():
        options, info = _loss_options(loss_type, loss_agg_mode, config)
        out = grpo_loss(
            logps=log_prob, completion_mask=response_mask, advantages=advantages, old_logps=old_log_prob,
            importance_sampling_ratio=rollout_is_weights, batch_num_tokens=info.get("batch_num_tokens"),
            global_batch_size=info.get("global_batch_size"), options=options,
        )
    # fastalign computes in fp32 (fp64 for fp64 log-probs); the result is handed back in the dtype
    # verl's loss would have, so that what verl adds to it (entropy and KL terms) and the backward
    # pass see the same dtypes as with verl's own loss.
    loss = out.loss.to(_verl_loss_dtype(loss_type, loss_agg_mode, old_log_prob, log_prob, advantages, response_mask,
                                        rollout_is_weights))
    # verl's losses log python floats; verl adds actor/pg_loss itself.
    return loss, {name: float(out.metrics[name]) for name in _METRICS}


def _make_policy_loss(loss_type: str):
    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = _DEFAULT_AGG[loss_type],
        config=None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return _policy_loss(loss_type, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                            rollout_is_weights)

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_fastalign_{loss_type}"
    policy_loss.__doc__ = (
        f"verl's policy loss {loss_type!r} computed by fastalign.grpo_loss(convention='verl'), with verl's "
        "PolicyLossFn signature and return value."
    )
    return policy_loss


POLICY_LOSSES = {
    f"fastalign_{loss_type}": core_algos.register_policy_loss(f"fastalign_{loss_type}")(_make_policy_loss(loss_type))
    for loss_type in _DEFAULT_AGG
}


# --- advantage estimators ---------------------------------------------------------------------


def _group_ids(index, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """verl's `uid` array (any hashable ids, one per row) as int64 group ids for group_advantages."""
    if index is None:
        raise ValueError(f"index: {name} groups responses by prompt and needs verl's per-row `uid` array, got None")
    uids = index.tolist() if hasattr(index, "tolist") else list(index)
    if len(uids) != batch:
        raise ValueError(f"index: expected {batch} ids (one per row of token_level_rewards), got {len(uids)}")
    ids: dict = {}
    return torch.tensor([ids.setdefault(uid, len(ids)) for uid in uids], dtype=torch.int64, device=device)


def _verl_advantage_dtype(token_level_rewards, response_mask) -> torch.dtype:
    """The dtype verl's estimators return: the rewards' promoted with a floating-point mask's (they
    end by multiplying by the mask)."""
    if isinstance(response_mask, torch.Tensor) and response_mask.is_floating_point():
        return torch.promote_types(token_level_rewards.dtype, response_mask.dtype)
    return token_level_rewards.dtype


def _group_estimator(name: str, token_level_rewards, response_mask, index, **options):
    with _verl_names():
        group_index = _group_ids(index, token_level_rewards.shape[0], token_level_rewards.device, name)
        advantages = group_advantages(token_level_rewards.sum(dim=-1), group_index=group_index, convention="verl",
                                      response_mask=response_mask, **options)
    advantages = advantages.to(_verl_advantage_dtype(token_level_rewards, response_mask))
    # verl's outcome estimators return the advantages as the returns too.
    return advantages, advantages


@core_algos.register_adv_est("fastalign_grpo")
def compute_fastalign_grpo_advantage(token_level_rewards, response_mask, index=None, epsilon: float = 1e-6,
                                     norm_adv_by_std_in_grpo: bool | None = None, config=None, **kwargs):
    """verl's "grpo": group mean removed, divided by the group std + epsilon unless
    `algorithm.norm_adv_by_std_in_grpo` is False (Dr.GRPO); a group of one keeps its reward."""
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = True if config is None else _setting(config, "norm_adv_by_std_in_grpo", True)
    return _group_estimator("fastalign_grpo", token_level_rewards, response_mask, index, estimator="grpo",
                            scale="group" if norm_adv_by_std_in_grpo else "none", eps=epsilon)


@core_algos.register_adv_est("fastalign_rloo")
def compute_fastalign_rloo_advantage(token_level_rewards, response_mask, index=None, epsilon: float = 1e-6,
                                     config=None, **kwargs):
    """verl's "rloo": n / (n - 1) * (r - group mean); a group of one keeps its reward."""
    return _group_estimator("fastalign_rloo", token_level_rewards, response_mask, index, estimator="rloo")


@core_algos.register_adv_est("fastalign_reinforce_plus_plus_baseline")
def compute_fastalign_reinforce_plus_plus_baseline_advantage(token_level_rewards, response_mask, index=None,
                                                             epsilon: float = 1e-6, config=None, **kwargs):
    """verl's "reinforce_plus_plus_baseline": group mean removed, then whitened over the batch's
    response tokens."""
    return _group_estimator("fastalign_reinforce_plus_plus_baseline", token_level_rewards, response_mask, index,
                            estimator="reinforce++-baseline")


@core_algos.register_adv_est("fastalign_reinforce_plus_plus")
def compute_fastalign_reinforce_plus_plus_advantage(token_level_rewards, response_mask, config=None, **kwargs):
    """verl's "reinforce_plus_plus": discounted returns over the response tokens (`algorithm.gamma`),
    whitened over the batch's response tokens."""
    gamma = _setting(_require(config, "fastalign_reinforce_plus_plus"), "gamma")
    # fastalign's scan is verl 0.9.1's (compute_reinforce_plus_plus_outcome_advantage): masked tokens
    # (tool observations inside a multi-turn response) are skipped and their returns are 0, so the
    # call is direct.
    with _verl_names():
        advantages, returns = reinforce_plus_plus_advantages(token_level_rewards, response_mask, gamma=gamma)
    # verl scans into a zeros_like(rewards) buffer, so its returns keep the rewards' dtype.
    advantages = advantages.to(_verl_advantage_dtype(token_level_rewards, response_mask))
    return advantages, returns.to(token_level_rewards.dtype)


@core_algos.register_adv_est("fastalign_remax")
def compute_fastalign_remax_advantage(token_level_rewards, response_mask, reward_baselines=None, config=None,
                                      **kwargs):
    """verl's "remax": the reward-to-go of the token-level rewards minus the greedy response's reward
    (`reward_baselines`, one per row) on the response tokens; returns the reward-to-go."""
    if reward_baselines is None:
        raise ValueError(
            "reward_baselines: fastalign_remax needs the greedy responses' rewards in the batch "
            "(data.batch['reward_baselines'], one per row); verl's trainer generates them only for "
            "algorithm.adv_estimator='remax'"
        )
    if not isinstance(token_level_rewards, torch.Tensor) or not isinstance(reward_baselines, torch.Tensor):
        raise TypeError("token_level_rewards, reward_baselines: expected torch.Tensors")
    # verl's arithmetic runs in the promoted dtype of the rewards, the baselines and a float mask.
    dtype = torch.promote_types(_verl_advantage_dtype(token_level_rewards, response_mask), reward_baselines.dtype)
    with _verl_names():
        advantages, returns = _remax(token_level_rewards.to(dtype), reward_baselines.to(dtype), response_mask,
                                     None, None)
    returns_dtype = torch.promote_types(token_level_rewards.dtype, response_mask.dtype) \
        if response_mask.is_floating_point() else token_level_rewards.dtype
    return advantages.to(dtype), returns.to(returns_dtype)


ADV_ESTIMATORS = {
    "fastalign_grpo": compute_fastalign_grpo_advantage,
    "fastalign_rloo": compute_fastalign_rloo_advantage,
    "fastalign_reinforce_plus_plus": compute_fastalign_reinforce_plus_plus_advantage,
    "fastalign_reinforce_plus_plus_baseline": compute_fastalign_reinforce_plus_plus_baseline_advantage,
    "fastalign_remax": compute_fastalign_remax_advantage,
}
