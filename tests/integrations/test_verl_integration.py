"""fastalign.integrations.verl inside verl 0.9.1 itself: every registered name against verl's own loss
or estimator of the same algorithm, reached through verl's entry points (get_policy_loss_fn, the
actor's ppo_loss, the trainer's compute_advantage) with verl's config classes, every loss_agg_mode;
the dtypes verl returns; registration through verl's plugin entry point with no environment variable.

verl is a test dependency (the Makefile installs it): without it this module fails to import, so a
test run that lacks verl fails instead of passing without these tests.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import os
import subprocess
import sys
import types
import warnings

import numpy as np
import peers
import pytest
import torch

peers.require("verl")
peers.require("omegaconf")

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # verl's optional engines (megatron, ...) warn when absent
        from omegaconf import OmegaConf
        from tensordict import TensorDict
        from verl.protocol import DataProto
        from verl.trainer.config import AlgoConfig
        from verl.trainer.ppo import core_algos
        from verl.trainer.ppo.ray_trainer import compute_advantage
        from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories
        from verl.utils import tensordict_utils as tu
        from verl.utils.metric import Metric
        from verl.workers.config import ActorConfig
        from verl.workers.config.actor import PolicyLossConfig
        from verl.workers.utils.losses import ppo_loss
except ImportError as exc:
    raise ImportError(
        f"verl 0.9.1 is a test dependency of fastalign's verl integration (`make venv` installs it): {exc}"
    ) from exc

MODULE = "fastalign.integrations.verl"
integration = importlib.import_module(MODULE)

LOSSES = ("vanilla", "gspo", "cispo", "sapo")
ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# fp64 inputs: verl's arithmetic and fastalign's agree to the last bits (order of summation aside).
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-15), torch.float32: dict(rtol=1e-5, atol=1e-6)}
# verl's estimators carry fp32 constants into fp64 results: a group of one is divided by
# torch.tensor(1.0) + epsilon (fp32), the Bessel factor of an integer mask's count is an fp32
# tensor, and an fp64 mask's counts gain masked_mean's 1e-8. fastalign's are exact in fp64.
ESTIMATOR_TOL = {torch.float64: dict(rtol=1e-7, atol=1e-12), torch.float32: TOL[torch.float32]}


def actor_config(**fields) -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **fields)


# --- inputs -----------------------------------------------------------------------------------

B, T = 6, 9


def policy_batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    log_prob = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old = log_prob + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    old[0, :3] -= 1.0  # ratios far above 1 + eps and below 1 - eps, so every clip branch is taken
    old[2, :3] += 1.0
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False
    mask[3, 2:] = False
    mask[4, 3:5] = False  # a masked span inside a response
    mask[5, :] = False  # a fully masked row, which verl's sequence means leave out
    is_weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return log_prob.to(dtype), old.to(dtype), advantages.to(dtype), mask, is_weights.to(dtype)


def global_batch_info(kind, mask, loss_scale_factor=None):
    """What verl's ppo_loss puts in config.global_batch_info: nothing (None), one rank ("local"),
    or this rank's micro-batch in a 2-rank global batch ("dp2")."""
    if kind is None:
        return {}
    if kind == "local":
        return dict(dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=loss_scale_factor)
    return dict(dp_size=2, batch_num_tokens=int(mask.sum()) * 2 + 3, global_batch_size=2 * B + 1,
                loss_scale_factor=loss_scale_factor)


def call_loss(name, log_prob, old, advantages, mask, agg_mode, info, is_weights=None, **config_fields):
    config = actor_config(loss_agg_mode=agg_mode, global_batch_info=info, **config_fields)
    leaf = log_prob.clone().requires_grad_()
    loss, metrics = core_algos.get_policy_loss_fn(name)(
        old_log_prob=old, log_prob=leaf, advantages=advantages, response_mask=mask, loss_agg_mode=agg_mode,
        config=config, rollout_is_weights=is_weights,
    )
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss, grad, metrics


def assert_same_loss(ours, theirs):
    (loss, grad, metrics), (their_loss, their_grad, their_metrics) = ours, theirs
    tol = TOL[grad.dtype]
    assert loss.dim() == 0 and loss.requires_grad
    assert loss.dtype == their_loss.dtype
    torch.testing.assert_close(loss.detach(), their_loss.detach(), **tol)
    torch.testing.assert_close(grad, their_grad, **tol)
    assert set(metrics) == set(their_metrics)
    for name, value in their_metrics.items():
        assert isinstance(metrics[name], float), name
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


# --- the policy losses ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("info", [None, "local", "dp2"])
@pytest.mark.parametrize("agg_mode", AGG_MODES)
@pytest.mark.parametrize("loss", LOSSES)
def test_policy_loss_equals_verls_own(loss, agg_mode, info, dtype):
    log_prob, old, advantages, mask, is_weights = policy_batch(dtype)
    weights = is_weights if info == "dp2" else None
    kwargs = dict(info=global_batch_info(info, mask, loss_scale_factor=4 if info == "dp2" else None),
                  is_weights=weights)
    theirs = call_loss(loss, log_prob, old, advantages, mask, agg_mode, **kwargs)
    ours = call_loss(f"fastalign_{loss}", log_prob, old, advantages, mask, agg_mode, **kwargs)
    assert_same_loss(ours, theirs)


CONFIG_CASES = [
    ("vanilla", "token-sum", dict(clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=2.0)),
    ("vanilla", "seq-mean-token-mean", dict(clip_ratio=0.25, clip_ratio_low=None, clip_ratio_high=None)),
    ("gspo", "seq-mean-token-mean", dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4)),
    ("cispo", "token-mean", dict(clip_ratio_low=0.2, clip_ratio_high=0.28)),
    # verl's CISPO example: a lower bound of 1 - 10 (none) and an upper one of 1 + 5.
    ("cispo", "token-mean", dict(clip_ratio_low=10.0, clip_ratio_high=5.0)),
    ("sapo", "seq-mean-token-mean", dict(tau_pos=2.0, tau_neg=3.0)),
    ("sapo", "token-mean", dict(tau_pos=1.0, tau_neg=1.05)),  # 1.05 is not an fp32 number
]


@pytest.mark.parametrize("loss,agg_mode,fields", CONFIG_CASES, ids=str)
def test_policy_loss_reads_verls_settings(loss, agg_mode, fields):
    log_prob, old, advantages, mask, is_weights = policy_batch()
    kwargs = dict(info=global_batch_info("dp2", mask), is_weights=is_weights, **fields)
    theirs = call_loss(loss, log_prob, old, advantages, mask, agg_mode, **kwargs)
    ours = call_loss(f"fastalign_{loss}", log_prob, old, advantages, mask, agg_mode, **kwargs)
    assert_same_loss(ours, theirs)


# --- through verl's actor loss ----------------------------------------------------------------


def actor_data(log_prob, old, advantages, mask, is_weights, ref, dp_size):
    """(model_output, data) as verl's engine hands them to ppo_loss: the model's log-probs and
    entropies unpadded, one entry per prompt and response token (the response's shifted left by
    one), and the padded batch with the global counts the engine assigns."""
    prompt_len = 3
    response_lens = [T] * B
    response_lens[1], response_lens[3] = 6, 2  # right padding where the mask ends early
    attention = torch.zeros(B, prompt_len + T, dtype=torch.int64)
    flat_logps, flat_entropy = [], []
    g = torch.Generator().manual_seed(11)
    for i, n in enumerate(response_lens):
        attention[i, : prompt_len + n] = 1
        junk = -torch.rand(prompt_len + n, generator=g, dtype=torch.float64).to(log_prob.dtype)
        junk[prompt_len - 1: prompt_len - 1 + n] = log_prob[i, :n]
        flat_logps.append(junk)
        flat_entropy.append(torch.rand(prompt_len + n, generator=g, dtype=torch.float64).to(log_prob.dtype))
    data = TensorDict(
        {"prompts": torch.zeros(B, prompt_len, dtype=torch.int64), "responses": torch.zeros(B, T, dtype=torch.int64),
         "attention_mask": attention, "response_mask": mask.to(torch.int64), "old_log_probs": old,
         "advantages": advantages, "rollout_is_weights": is_weights, "ref_log_prob": ref},
        batch_size=[B],
    )
    tokens = int(mask.sum())
    tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=tokens * dp_size + (dp_size - 1),
                         global_batch_size=B * dp_size)
    return torch.cat(flat_logps), torch.cat(flat_entropy), data


def metric_value(value):
    return value.aggregate() if isinstance(value, Metric) else float(value)


@pytest.mark.parametrize("dp_size", [1, 2])
@pytest.mark.parametrize("agg_mode", AGG_MODES)
@pytest.mark.parametrize("loss", LOSSES)
def test_actor_ppo_loss_with_fastalign_loss_mode(loss, agg_mode, dp_size):
    """verl's actor loss (verl/workers/utils/losses.py: ppo_loss) with
    `actor.policy_loss.loss_mode` set to verl's name and to fastalign's: the policy term, verl's
    own entropy bonus and KL loss on top, the gradient and every metric."""
    log_prob, old, advantages, mask, is_weights = policy_batch()
    ref = log_prob + 0.2 * torch.randn(B, T, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def run(name):
        flat_logps, flat_entropy, data = actor_data(log_prob, old, advantages, mask, is_weights, ref, dp_size)
        config = actor_config(loss_agg_mode=agg_mode, policy_loss=PolicyLossConfig(loss_mode=name),
                              entropy_coeff=0.01, use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.05,
                              loss_scale_factor=5 if agg_mode == "seq-mean-token-sum-norm" else None)
        leaf = flat_logps.requires_grad_()
        total, metrics = ppo_loss(config, {"log_probs": leaf, "entropy": flat_entropy}, data)
        (grad,) = torch.autograd.grad(total, leaf)
        return total, grad, {key: metric_value(value) for key, value in metrics.items()}

    their_total, their_grad, their_metrics = run(loss)
    total, grad, metrics = run(f"fastalign_{loss}")
    assert total.dtype == their_total.dtype
    torch.testing.assert_close(total.detach(), their_total.detach(), **TOL[torch.float64])
    torch.testing.assert_close(grad, their_grad, **TOL[torch.float64])
    assert set(metrics) == set(their_metrics)
    for key, value in their_metrics.items():
        # fastalign's own metrics are fp32 (verl's of an fp64 batch fp64); the losses are exact.
        tol = dict(rel=1e-12, abs=1e-15) if key in ("actor/pg_loss", "kl_loss", "actor/entropy_loss") else \
            dict(rel=1e-6, abs=1e-8)
        assert metrics[key] == pytest.approx(value, **tol), key


# --- dtypes -----------------------------------------------------------------------------------


def test_loss_dtype_is_verls():
    """The loss comes back in the dtype verl's own loss has (bf16 only where every input is bf16
    and the aggregation divides by integer counts), for every mix of input dtypes."""
    dtypes = (torch.float64, torch.float32, torch.bfloat16)
    base = policy_batch(torch.float64)
    checked = 0
    for loss, agg_mode in itertools.product(LOSSES, AGG_MODES):
        for logp_dtype, adv_dtype, mask_dtype, weights_dtype in itertools.product(
            dtypes, dtypes, (torch.bool, torch.int64, torch.float32, torch.bfloat16), (None, torch.bfloat16)
        ):
            log_prob, old, advantages = (x.to(d) for x, d in zip(base[:3], (logp_dtype, logp_dtype, adv_dtype)))
            mask = base[3].to(mask_dtype)
            weights = None if weights_dtype is None else base[4].to(weights_dtype)
            config = actor_config(loss_agg_mode=agg_mode)
            dtypes_out = [
                core_algos.get_policy_loss_fn(name)(old, log_prob, advantages, mask, agg_mode, config,
                                                    rollout_is_weights=weights)[0].dtype
                for name in (loss, f"fastalign_{loss}")
            ]
            assert dtypes_out[1] == dtypes_out[0], (loss, agg_mode, logp_dtype, adv_dtype, mask_dtype, weights_dtype)
            checked += 1
    assert checked == 4 * 5 * 3 * 3 * 4 * 2


@pytest.mark.parametrize("agg_mode", ["token-mean", "token-sum"])
@pytest.mark.parametrize("loss", LOSSES)
def test_bf16_loss_is_the_rounded_fp32_loss(loss, agg_mode):
    """bf16 in, bf16 out as in verl, but computed in fp32 and rounded once: within half a bf16 unit
    of the float64 truth, where verl's bf16 arithmetic strays further."""
    log_prob, old, advantages, mask, _ = policy_batch(torch.bfloat16)
    truth, truth_grad, _ = call_loss(loss, log_prob.double(), old.double(), advantages.double(), mask, agg_mode, {})
    ours, grad, _ = call_loss(f"fastalign_{loss}", log_prob, old, advantages, mask, agg_mode, {})
    theirs, their_grad, _ = call_loss(loss, log_prob, old, advantages, mask, agg_mode, {})
    if loss == "sapo":  # verl's SAPO averages per sequence whatever the mode, and its counts are fp32
        assert ours.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(ours.double(), truth.detach(), rtol=1e-6, atol=1e-7)
    else:
        assert ours.dtype == theirs.dtype == torch.bfloat16
        half_unit = torch.finfo(torch.bfloat16).eps / 2 * abs(float(truth))
        assert abs(float(ours) - float(truth)) <= half_unit * (1 + 1e-3)
        assert abs(float(ours) - float(truth)) <= abs(float(theirs) - float(truth))
    assert grad.dtype == their_grad.dtype == torch.bfloat16
    err, their_err = ((g.double() - truth_grad).abs().max() for g in (grad, their_grad))
    assert err <= their_err * 1.01 + 1e-6


# --- the advantage estimators -----------------------------------------------------------------


def reward_batch(dtype=torch.float32, mask_dtype=torch.int64):
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(9, 7, generator=g, dtype=torch.float64)
    rewards[6] = 0.0  # with row 7's rewards also 0: a group whose rewards are all equal
    rewards[7] = 0.0
    mask = torch.ones(9, 7)
    mask[1, 4:] = 0  # right padding
    mask[2, 2:4] = 0  # tool observations inside multi-turn responses
    mask[5, 1:3] = 0
    mask[5, 5:] = 0
    mask[8, 3:] = 0
    # verl's uids: strings, groups of different sizes, not adjacent, one group of one
    uids = np.array(["a", "b", "a", "c", "b", "a", "d", "d", "e"], dtype=object)
    return rewards.to(dtype), mask.to(mask_dtype), uids


def algo_config(kind, **fields):
    """verl's trainer hands compute_advantage its `algorithm` config: an OmegaConf DictConfig in
    the trainer, the AlgoConfig dataclass where it is built in code."""
    if kind == "dataclass":
        return AlgoConfig(**fields)
    return OmegaConf.create({"gamma": 1.0, "lam": 1.0, "norm_adv_by_std_in_grpo": True, **fields})


ESTIMATOR_CASES = [
    ("grpo", dict(norm_adv_by_std_in_grpo=True)),
    ("grpo", dict(norm_adv_by_std_in_grpo=False)),
    ("rloo", dict()),
    ("reinforce_plus_plus_baseline", dict()),
    ("reinforce_plus_plus", dict(gamma=1.0)),
    ("reinforce_plus_plus", dict(gamma=0.9)),
    ("remax", dict()),
]


@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float32, torch.int64), (torch.float64, torch.float64),
                                              (torch.float32, torch.float32)], ids=str)
@pytest.mark.parametrize("kind", ["dataclass", "dictconfig"])
@pytest.mark.parametrize("name,fields", ESTIMATOR_CASES, ids=str)
def test_compute_advantage_with_fastalign_estimator(name, fields, kind, dtype, mask_dtype):
    """verl's compute_advantage (verl/trainer/ppo/ray_trainer.py), called as its trainer calls it,
    with `algorithm.adv_estimator` set to verl's name and to fastalign's."""
    rewards, mask, uids = reward_batch(dtype, mask_dtype)
    config = algo_config(kind, **fields)
    # The greedy responses' rewards, as verl's trainer adds them for ReMax (the other estimators ignore them).
    baselines = torch.randn(rewards.shape[0], generator=torch.Generator().manual_seed(1)).to(dtype)

    def run(estimator):
        data = DataProto.from_dict(tensors={"token_level_rewards": rewards.clone(), "response_mask": mask.clone(),
                                            "reward_baselines": baselines.clone()},
                                   non_tensors={"uid": uids})
        out = compute_advantage(data, adv_estimator=estimator, gamma=config.gamma, lam=config.lam, num_repeat=1,
                                norm_adv_by_std_in_grpo=config.norm_adv_by_std_in_grpo, config=config)
        return out.batch["advantages"], out.batch["returns"]

    ours, theirs = run(f"fastalign_{name}"), run(core_algos.AdvantageEstimator(name))
    for got, want, what in zip(ours, theirs, ("advantages", "returns")):
        assert got.shape == want.shape and got.dtype == want.dtype, what
        torch.testing.assert_close(got, want, **ESTIMATOR_TOL[dtype], msg=what)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimator_dtype_is_verls(name):
    for dtype, mask_dtype in itertools.product((torch.float64, torch.float32, torch.bfloat16),
                                               (torch.int64, torch.float32, torch.float64)):
        rewards, mask, uids = reward_batch(dtype, mask_dtype)
        kwargs = dict(token_level_rewards=rewards, response_mask=mask, index=uids, config=AlgoConfig(gamma=0.9))
        if name == "remax":
            kwargs["reward_baselines"] = torch.randn(rewards.shape[0]).to(dtype)
        theirs = core_algos.get_adv_estimator_fn(name)(**{k: v.clone() if torch.is_tensor(v) else v
                                                          for k, v in kwargs.items()})
        ours = core_algos.get_adv_estimator_fn(f"fastalign_{name}")(**kwargs)
        assert [x.dtype for x in ours] == [x.dtype for x in theirs], (dtype, mask_dtype)


def test_remax_without_baselines_names_them():
    rewards, mask, _ = reward_batch()
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask})
    with pytest.raises(ValueError, match="reward_baselines: fastalign_remax needs the greedy responses' rewards"):
        compute_advantage(data, adv_estimator="fastalign_remax", config=AlgoConfig())
    with pytest.raises(ValueError, match=r"reward_baselines: expected shape \[9\]"):
        core_algos.get_adv_estimator_fn("fastalign_remax")(rewards, mask, reward_baselines=torch.zeros(8))


def test_multi_trajectory_grpo_is_verls_own_grpo_only():
    """verl's v1 trainer gives its own "grpo" alone the agent-loop treatment of sessions with several
    outputs (only each session's last output is scored, and its advantage is copied to the rest);
    any other estimator, fastalign_grpo included, scores every output. With one output per session
    the two agree."""
    rewards, mask, _ = reward_batch()
    uids = np.array(["a"] * 6 + ["b"] * 3, dtype=object)

    def run(estimator, keys):
        data = DataProto.from_dict(tensors={"token_level_rewards": rewards.clone(), "response_mask": mask.clone()},
                                   non_tensors={"uid": uids})
        return compute_advantage_for_multi_trajectories(data, batch_keys=keys, adv_estimator=estimator,
                                                        config=AlgoConfig()).batch["advantages"]

    single = [f"{uid}_{i}_0" for i, uid in enumerate(uids)]
    torch.testing.assert_close(run("fastalign_grpo", single), run("grpo", single), **TOL[torch.float32])
    sessions = ["a_0_0", "a_0_1", "a_1_0", "a_2_0", "a_2_1", "a_2_2", "b_0_0", "b_1_0", "b_1_1"]
    assert not torch.allclose(run("fastalign_grpo", sessions), run("grpo", sessions))


# --- registration -----------------------------------------------------------------------------


def test_names_are_registered_beside_verls_own():
    assert tuple(integration.POLICY_LOSSES) == tuple(f"fastalign_{n}" for n in LOSSES)
    assert tuple(integration.ADV_ESTIMATORS) == tuple(f"fastalign_{n}" for n in ESTIMATORS)
    for name, fn in integration.POLICY_LOSSES.items():
        assert core_algos.get_policy_loss_fn(name) is fn
        assert core_algos.get_policy_loss_fn(name.removeprefix("fastalign_")) is not fn
    for name, fn in integration.ADV_ESTIMATORS.items():
        assert core_algos.get_adv_estimator_fn(name) is fn
        assert core_algos.get_adv_estimator_fn(name.removeprefix("fastalign_")) is not fn
    with pytest.raises(ValueError, match="Unknown advantage estimator"):
        core_algos.get_adv_estimator_fn("fastalign_gae")  # not registered: verl gives critic values only to "gae"


_REGISTERED = """
import json, sys
FIRST
import verl.trainer.ppo.core_algos as c
names = [n for n in list(c.POLICY_LOSS_REGISTRY) + list(c.ADV_ESTIMATOR_REGISTRY) if n.startswith("fastalign_")]
print(json.dumps({"names": sorted(names), "imported": MODULE in sys.modules}))
""".replace("MODULE", repr(MODULE))


def test_registered_by_verls_plugin_entry_point_without_environment_variables():
    """A fresh process with fastalign installed: `import verl` loads fastalign's "verl.plugins" entry
    point, so the names are there with no VERL_USE_EXTERNAL_MODULES. With verl's plugin loading off
    (VERL_USE_EXTERNAL_PLUGINS=none) the environment variable still works, and importing the module
    before verl (verl then loads the half-imported module as its plugin) registers each name once."""
    from importlib.metadata import entry_points

    declared = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert declared.get("fastalign") == MODULE, (
        f"fastalign's verl.plugins entry point is not installed ({declared}); reinstall fastalign (make install)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_MODULES", "VERL_USE_EXTERNAL_PLUGINS")}
    cases = {  # each child imports verl (about 6 s of CPU), so only three
        "entry point": ({}, ""),
        "plugins off, module listed": ({"VERL_USE_EXTERNAL_PLUGINS": "none", "VERL_USE_EXTERNAL_MODULES": MODULE}, ""),
        "module imported first": ({}, f"import {MODULE}"),
    }
    children = {
        case: subprocess.Popen([sys.executable, "-W", "ignore", "-c", _REGISTERED.replace("FIRST", first)],
                               env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for case, (extra, first) in cases.items()
    }
    for case, child in children.items():
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, f"{case}: {err[-2000:]}"
        result = json.loads(out.strip().splitlines()[-1])
        assert result == {"names": sorted(f"fastalign_{n}" for n in LOSSES + ESTIMATORS), "imported": True}, case


@contextlib.contextmanager
def fresh_integration():
    """Lets fastalign.integrations.verl be imported anew, the registered module restored after."""
    saved = sys.modules.pop(MODULE, None)
    try:
        yield
    finally:
        sys.modules.pop(MODULE, None)
        if saved is not None:
            sys.modules[MODULE] = saved


def test_import_without_verl_says_verl_is_required(monkeypatch):
    for name in ("verl", "verl.trainer", "verl.trainer.ppo", "verl.trainer.ppo.core_algos"):
        monkeypatch.setitem(sys.modules, name, None)  # `import verl` now raises ImportError
    with fresh_integration(), pytest.raises(ImportError, match="fastalign.integrations.verl requires verl"):
        importlib.import_module(MODULE)


# --- errors and settings ----------------------------------------------------------------------


def test_errors_name_verls_settings():
    log_prob, old, advantages, mask, _ = policy_batch()
    loss = core_algos.get_policy_loss_fn("fastalign_vanilla")
    inputs = dict(old_log_prob=old, log_prob=log_prob, advantages=advantages, response_mask=mask)
    with pytest.raises(ValueError, match=r"^config\.clip_ratio_high: "):
        loss(**inputs, config=actor_config(clip_ratio_high=1.5))
    with pytest.raises(ValueError, match=r"^config\.clip_ratio_c: "):
        loss(**inputs, config=actor_config(clip_ratio_c=0.5))
    with pytest.raises(ValueError, match=r"^config: "):
        loss(**inputs, config=None)
    with pytest.raises(ValueError, match=r"^response_mask: "):
        loss(**dict(inputs, response_mask=mask[:, :-1]), config=actor_config())
    with pytest.raises(ValueError, match=r"^config\.global_batch_info\['batch_num_tokens'\]: "):
        loss(**inputs, config=actor_config(global_batch_info=dict(dp_size=2)))

    rewards, reward_mask, uids = reward_batch()
    grpo = core_algos.get_adv_estimator_fn("fastalign_grpo")
    with pytest.raises(ValueError, match=r"^index: .*uid"):
        grpo(token_level_rewards=rewards, response_mask=reward_mask, config=AlgoConfig())
    with pytest.raises(ValueError, match=r"^index: expected 9 ids"):
        grpo(token_level_rewards=rewards, response_mask=reward_mask, config=AlgoConfig(), index=uids[:-1])
    reinforce = core_algos.get_adv_estimator_fn("fastalign_reinforce_plus_plus")
    with pytest.raises(ValueError, match=r"^config: "):
        reinforce(token_level_rewards=rewards, response_mask=reward_mask, config=None)
    with pytest.raises(ValueError, match=r"^response_mask: "):
        reinforce(token_level_rewards=rewards, response_mask=reward_mask[:, :-1], config=AlgoConfig())
    with pytest.raises(ValueError, match=r"^config\.gamma: "):
        reinforce(token_level_rewards=rewards, response_mask=reward_mask, config=AlgoConfig(gamma=1.5))


def test_reinforce_plus_plus_reads_gamma_as_an_attribute():
    # verl's own estimator reads config.gamma; its tests pass a plain namespace without .get().
    rewards, mask, uids = reward_batch(torch.float64, torch.float64)
    config = types.SimpleNamespace(gamma=0.9)
    ours = core_algos.get_adv_estimator_fn("fastalign_reinforce_plus_plus")(
        token_level_rewards=rewards.clone(), response_mask=mask.clone(), config=config, index=uids,
    )
    theirs = core_algos.get_adv_estimator_fn("reinforce_plus_plus")(
        token_level_rewards=rewards.clone(), response_mask=mask.clone(), config=config, index=uids,
    )
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, **ESTIMATOR_TOL[torch.float64])
