"""fastalign.integrations.verl through verl's registries: every registered name against verl's own
loss or estimator of the same algorithm, looked up by name in the same registry, on random inputs
(loss, gradient, metrics; advantages and returns).

Where verl imports, the registry, the built-ins and the configs (ActorConfig, AlgoConfig) are
verl's own. verl needs Ray, so where it does not import, a stand-in `verl` package is placed in
sys.modules that mirrors verl 0.9.1:
- `verl.trainer.ppo.core_algos`: the registry API of verl/trainer/ppo/core_algos.py:50-150
  (register_policy_loss, get_policy_loss_fn, register_adv_est, get_adv_estimator_fn, with the same
  checks and errors), with verl's built-ins registered under verl's names: the policy losses ported
  line for line in tests/verl_policy.py behind verl's PolicyLossFn signature (core_algos.py:37-48),
  and the advantage estimators ported below;
- `verl` itself imports the modules listed in VERL_USE_EXTERNAL_MODULES as verl/__init__.py:49-52
  and verl/utils/import_utils.py:81-88 do;
- the configs are the fields verl's losses and estimators read, with ActorConfig's and
  AlgoConfig's defaults (verl/workers/config/actor.py:158-192, verl/trainer/config/algorithm.py:655-658).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import types
from collections import defaultdict
from enum import Enum

import numpy as np
import pytest
import torch
import verl_policy
from conftest import DEVICE

MODULE = "fastalign.integrations.verl"
LOSS_NAMES = ("fastalign_vanilla", "fastalign_gspo", "fastalign_cispo", "fastalign_sapo")
ESTIMATOR_NAMES = ("fastalign_grpo", "fastalign_rloo", "fastalign_reinforce_plus_plus",
                   "fastalign_reinforce_plus_plus_baseline")


def _real_verl():
    try:
        from verl.trainer.config import AlgoConfig
        from verl.trainer.ppo import core_algos
        from verl.workers.config import ActorConfig
    except ImportError:
        return None
    return core_algos, ActorConfig, AlgoConfig


REAL = _real_verl()


# --- verl 0.9.1's built-in advantage estimators, ported line for line --------------------------


def verl_masked_whiten(values, mask):
    """verl/utils/torch_functional.py:294-346: masked_mean, unbiased masked_var, masked_whiten."""
    mean = verl_policy.masked_mean(values, mask)
    variance = verl_policy.masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    return (values - mean) * torch.rsqrt(variance + 1e-8)


def verl_grpo(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True, config=None):
    """core_algos.py:267-331 compute_grpo_outcome_advantage."""
    scores = token_level_rewards.sum(dim=-1)
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
            else:
                scores_tensor = torch.stack(id2score[idx])
                id2mean[idx], id2std[idx] = torch.mean(scores_tensor), torch.std(scores_tensor)
        for i in range(bsz):
            if norm_adv_by_std_in_grpo:
                scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
            else:
                scores[i] = scores[i] - id2mean[index[i]]
        scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


def verl_rloo(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
    """core_algos.py:587-636 compute_rloo_outcome_advantage."""
    scores = token_level_rewards.sum(dim=-1)
    id2score, id2mean = defaultdict(list), {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            id2mean[idx] = torch.tensor(0.0) if len(id2score[idx]) == 1 else torch.mean(torch.stack(id2score[idx]))
        for i in range(bsz):
            n = len(id2score[index[i]])
            if n > 1:
                scores[i] = scores[i] * n / (n - 1) - id2mean[index[i]] * n / (n - 1)
        scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


def verl_reinforce_pp_baseline(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
    """core_algos.py:533-584 compute_reinforce_plus_plus_baseline_outcome_advantage."""
    response_length = token_level_rewards.shape[-1]
    scores = token_level_rewards.sum(dim=-1)
    id2score, id2mean = defaultdict(list), {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            id2mean[idx] = torch.tensor(0.0) if len(id2score[idx]) == 1 else torch.mean(torch.stack(id2score[idx]))
        for i in range(bsz):
            scores[i] = scores[i] - id2mean[index[i]]
        scores = scores.unsqueeze(-1).tile([1, response_length]) * response_mask
        scores = verl_masked_whiten(scores, response_mask) * response_mask
    return scores, scores


def verl_reinforce_pp(token_level_rewards, response_mask, config=None, **kwargs):
    """verl's registry signature around the one port of core_algos.py:694-731 (tests/test_advantages.py)."""
    import test_advantages

    return test_advantages.verl_reinforce_pp(token_level_rewards, response_mask, config.gamma)


# --- the stand-in -----------------------------------------------------------------------------


class StandInConfig(types.SimpleNamespace):
    """The surface of verl's BaseConfig that its losses use: attributes and `.get`."""

    def get(self, key, default=None):
        return getattr(self, key, default)


def standin_actor_config(**fields):
    defaults = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0,
                    loss_agg_mode="token-mean", loss_scale_factor=None, tau_pos=1.0, tau_neg=1.05,
                    global_batch_info={})
    return StandInConfig(**{**defaults, **fields})


def standin_algo_config(**fields):
    return StandInConfig(**{**dict(gamma=1.0, lam=1.0, norm_adv_by_std_in_grpo=True), **fields})


def _clip_range(config):
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return low, high


def verl_builtin_policy_loss(mode):
    """verl's loss `mode` (ported in tests/verl_policy.py) behind verl's PolicyLossFn signature,
    reading the config as core_algos.py:1285-1376 (vanilla), 1545-1619 (gspo), 1622-1704 (sapo)
    and 2047-2105 (cispo) do, metrics as python floats."""

    def loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
             rollout_is_weights=None):
        assert config is not None
        args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode)
        kwargs = dict(rollout_is_weights=rollout_is_weights, **config.global_batch_info)
        if mode == "vanilla":
            pg, metrics = verl_policy.policy_loss_vanilla(*args, *_clip_range(config), config.get("clip_ratio_c", 3.0),
                                                          **kwargs)
        elif mode == "sapo":
            pg, metrics = verl_policy.policy_loss_sapo(*args, config.tau_pos, config.tau_neg, **kwargs)
        else:
            port = verl_policy.policy_loss_gspo if mode == "gspo" else verl_policy.policy_loss_cispo
            pg, metrics = port(*args, *_clip_range(config), **kwargs)
        return pg, {name: float(torch.as_tensor(value).detach()) for name, value in metrics.items()}

    return loss


def standin_core_algos():
    """verl 0.9.1's registry (core_algos.py:50-150) with fresh registries and verl's built-ins."""
    core = types.ModuleType("verl.trainer.ppo.core_algos")
    core.POLICY_LOSS_REGISTRY = {}
    core.ADV_ESTIMATOR_REGISTRY = {}

    def register_policy_loss(name):
        def decorator(func):
            core.POLICY_LOSS_REGISTRY[name] = func
            return func

        return decorator

    def get_policy_loss_fn(name):
        if name not in core.POLICY_LOSS_REGISTRY:
            raise ValueError(
                f"Unsupported loss mode: {name}. Supported modes are: {list(core.POLICY_LOSS_REGISTRY.keys())}"
            )
        return core.POLICY_LOSS_REGISTRY[name]

    def register_adv_est(name_or_enum):
        def decorator(fn):
            name = name_or_enum.value if isinstance(name_or_enum, Enum) else name_or_enum
            if name in core.ADV_ESTIMATOR_REGISTRY and core.ADV_ESTIMATOR_REGISTRY[name] != fn:
                raise ValueError(
                    f"Adv estimator {name} has already been registered: {core.ADV_ESTIMATOR_REGISTRY[name]} vs {fn}"
                )
            core.ADV_ESTIMATOR_REGISTRY[name] = fn
            return fn

        return decorator

    def get_adv_estimator_fn(name_or_enum):
        name = name_or_enum.value if isinstance(name_or_enum, Enum) else name_or_enum
        if name not in core.ADV_ESTIMATOR_REGISTRY:
            raise ValueError(f"Unknown advantage estimator simply: {name}")
        return core.ADV_ESTIMATOR_REGISTRY[name]

    core.register_policy_loss, core.get_policy_loss_fn = register_policy_loss, get_policy_loss_fn
    core.register_adv_est, core.get_adv_estimator_fn = register_adv_est, get_adv_estimator_fn
    for mode in ("vanilla", "gspo", "cispo", "sapo"):
        register_policy_loss(mode)(verl_builtin_policy_loss(mode))
    builtins = {"grpo": verl_grpo, "rloo": verl_rloo, "reinforce_plus_plus": verl_reinforce_pp,
                "reinforce_plus_plus_baseline": verl_reinforce_pp_baseline}
    for name, fn in builtins.items():
        register_adv_est(name)(fn)
    return core


def install_standin(monkeypatch):
    """Places the stand-in `verl` package in sys.modules (undone by monkeypatch); returns core_algos."""
    core = standin_core_algos()
    packages = {name: types.ModuleType(name) for name in ("verl", "verl.trainer", "verl.trainer.ppo")}
    for package in packages.values():
        package.__path__ = []

    def import_external_modules():
        # verl/__init__.py:49-52, run when `verl` is imported.
        modules = os.getenv("VERL_USE_EXTERNAL_MODULES", "")
        if modules:
            for module in modules.split(","):
                importlib.import_module(module)

    packages["verl"].import_external_modules = import_external_modules
    packages["verl"].trainer = packages["verl.trainer"]
    packages["verl.trainer"].ppo = packages["verl.trainer.ppo"]
    packages["verl.trainer.ppo"].core_algos = core
    for name, module in {**packages, core.__name__: core}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return core


@contextlib.contextmanager
def fresh_integration():
    """Lets fastalign.integrations.verl be imported anew (against the stand-in), restored after."""
    saved = sys.modules.pop(MODULE, None)
    try:
        yield
    finally:
        sys.modules.pop(MODULE, None)
        if saved is not None:
            sys.modules[MODULE] = saved


class Verl(types.SimpleNamespace):
    """core_algos, the imported integration, and config factories (`actor_config`, `algo_config`)."""


@pytest.fixture
def verl(monkeypatch):
    if REAL is not None:
        core, actor_config_cls, algo_config_cls = REAL

        def actor_config(**fields):
            return actor_config_cls(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **fields)

        yield Verl(core=core, integration=importlib.import_module(MODULE), actor_config=actor_config,
                   algo_config=algo_config_cls)
        return
    core = install_standin(monkeypatch)
    with fresh_integration():
        yield Verl(core=core, integration=importlib.import_module(MODULE), actor_config=standin_actor_config,
                   algo_config=standin_algo_config)


# --- inputs -----------------------------------------------------------------------------------

B, T = 6, 9


def policy_batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    log_prob = (-3 * torch.rand(B, T, generator=g, dtype=dtype)).to(DEVICE)
    old = log_prob + 0.3 * torch.randn(B, T, generator=g, dtype=dtype).to(DEVICE)
    old[0, :3] -= 1.0  # ratios far above 1 + eps and below 1 - eps, so every clip branch is taken
    old[2, :3] += 1.0
    advantages = torch.randn(B, T, generator=g, dtype=dtype).to(DEVICE)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mask[1, 6:] = False
    mask[3, 2:] = False
    mask[4, 3:5] = False  # a masked span inside a response
    mask[5, :] = False  # a fully masked row, which verl's sequence means leave out
    is_weights = (torch.rand(B, T, generator=g, dtype=dtype) + 0.5).to(DEVICE)
    return log_prob, old, advantages, mask, is_weights


def global_batch_info(kind, mask, loss_scale_factor=None):
    """What verl's ppo_loss puts in config.global_batch_info (verl/workers/utils/losses.py:65-68):
    nothing (None), one rank ("local"), or this rank's micro-batch in a 2-rank global batch ("dp2")."""
    if kind is None:
        return {}
    if kind == "local":
        return dict(dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=loss_scale_factor)
    return dict(dp_size=2, batch_num_tokens=int(mask.sum()) * 2 + 3, global_batch_size=2 * B + 1,
                loss_scale_factor=loss_scale_factor)


LOSS_CASES = [
    ("vanilla", "token-mean", dict(info="local")),
    ("vanilla", "token-mean", dict(info="dp2", dtype=torch.float32)),
    ("vanilla", "token-sum", dict(is_weights=True, config=dict(clip_ratio_low=0.1, clip_ratio_high=0.3,
                                                               clip_ratio_c=2.0))),
    ("vanilla", "seq-mean-token-mean", dict(info="dp2", config=dict(clip_ratio=0.25, clip_ratio_low=None,
                                                                    clip_ratio_high=None))),
    ("vanilla", "seq-mean-token-sum", dict(info="dp2", is_weights=True)),
    ("vanilla", "seq-mean-token-sum-norm", dict(info="dp2", loss_scale_factor=4)),
    ("vanilla", "seq-mean-token-sum-norm", dict()),
    ("gspo", "seq-mean-token-mean", dict(info="dp2", config=dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4))),
    ("gspo", "token-mean", dict(info="local", is_weights=True)),
    ("cispo", "token-mean", dict(info="dp2", config=dict(clip_ratio_low=0.2, clip_ratio_high=0.28))),
    ("cispo", "seq-mean-token-sum", dict(info="dp2", is_weights=True)),
    # verl's CISPO example: a lower bound of 1 - 10 (none) and an upper one of 1 + 5.
    ("cispo", "token-mean", dict(info="local", config=dict(clip_ratio_low=10.0, clip_ratio_high=5.0))),
    ("sapo", "token-mean", dict(info="local")),
    ("sapo", "seq-mean-token-mean", dict(info="dp2", is_weights=True, config=dict(tau_pos=2.0, tau_neg=3.0))),
]


@pytest.mark.parametrize("mode,agg_mode,case", LOSS_CASES, ids=lambda x: str(x))
def test_policy_loss_equals_verls_own(verl, mode, agg_mode, case):
    log_prob, old, advantages, mask, is_weights = policy_batch(case.get("dtype", torch.float64))
    config_fields = dict(case.get("config", {}), loss_agg_mode=agg_mode)

    def run(name):
        info = global_batch_info(case.get("info"), mask, case.get("loss_scale_factor"))
        config = verl.actor_config(**config_fields, global_batch_info=info)
        leaf = log_prob.clone().requires_grad_()
        loss, metrics = verl.core.get_policy_loss_fn(name)(
            old_log_prob=old, log_prob=leaf, advantages=advantages, response_mask=mask, loss_agg_mode=agg_mode,
            config=config, rollout_is_weights=is_weights if case.get("is_weights") else None,
        )
        (grad,) = torch.autograd.grad(loss, leaf)
        return loss, grad, metrics

    theirs, their_grad, their_metrics = run(mode)
    ours, grad, metrics = run(f"fastalign_{mode}")
    tol = dict(rtol=1e-5, atol=1e-6) if log_prob.dtype == torch.float32 else dict(rtol=1e-7, atol=1e-9)
    assert ours.dim() == 0 and ours.requires_grad
    torch.testing.assert_close(ours.detach().to(theirs.dtype), theirs.detach(), **tol)
    torch.testing.assert_close(grad, their_grad, **tol)
    assert set(metrics) == set(their_metrics)
    for name, value in their_metrics.items():
        assert isinstance(metrics[name], float), name
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


def reward_batch():
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(9, 7, generator=g).to(DEVICE)
    rewards[6] = 0.0  # with row 7's rewards also 0: a group whose rewards are all equal
    rewards[7] = 0.0
    mask = torch.ones(9, 7, device=DEVICE)
    mask[1, 4:] = 0  # right padding
    mask[2, 2:4] = 0  # tool observations inside multi-turn responses
    mask[5, 1:3] = 0
    mask[5, 5:] = 0
    mask[8, 3:] = 0
    # verl's uids: strings, groups of different sizes, not adjacent, one group of one
    uids = np.array(["a", "b", "a", "c", "b", "a", "d", "d", "e"], dtype=object)
    return rewards, mask, uids


ESTIMATOR_CASES = [
    ("grpo", dict(norm_adv_by_std_in_grpo=True)),
    ("grpo", dict(norm_adv_by_std_in_grpo=False)),
    ("rloo", dict()),
    ("reinforce_plus_plus_baseline", dict()),
    ("reinforce_plus_plus", dict(gamma=1.0)),
    ("reinforce_plus_plus", dict(gamma=0.9)),
]


@pytest.mark.parametrize("name,fields", ESTIMATOR_CASES, ids=lambda x: str(x))
def test_advantage_estimator_equals_verls_own(verl, name, fields):
    rewards, mask, uids = reward_batch()
    config = verl.algo_config(**fields)
    # how verl's compute_advantage calls a registered estimator (verl/trainer/ppo/ray_trainer.py:251-279)
    ours = verl.core.get_adv_estimator_fn(f"fastalign_{name}")(
        token_level_rewards=rewards.clone(), response_mask=mask.clone(), config=config, index=uids,
    )
    builtin = verl.core.get_adv_estimator_fn(name)
    if name == "grpo":
        # verl calls its own GRPO with the flag itself (ray_trainer.py:240-245)
        theirs = builtin(token_level_rewards=rewards.clone(), response_mask=mask.clone(), index=uids,
                         norm_adv_by_std_in_grpo=fields["norm_adv_by_std_in_grpo"])
    else:
        theirs = builtin(token_level_rewards=rewards.clone(), response_mask=mask.clone(), config=config, index=uids)
    for got, want, what in zip(ours, theirs, ("advantages", "returns")):
        assert got.shape == want.shape, what
        torch.testing.assert_close(got.to(want.dtype), want, rtol=1e-5, atol=1e-6, msg=what)


def test_names_are_registered_beside_verls_own(verl):
    integration = verl.integration
    assert tuple(integration.POLICY_LOSSES) == LOSS_NAMES
    assert tuple(integration.ADV_ESTIMATORS) == ESTIMATOR_NAMES
    for name, fn in integration.POLICY_LOSSES.items():
        assert verl.core.get_policy_loss_fn(name) is fn
        assert verl.core.get_policy_loss_fn(name.removeprefix("fastalign_")) is not fn
    for name, fn in integration.ADV_ESTIMATORS.items():
        assert verl.core.get_adv_estimator_fn(name) is fn
        assert verl.core.get_adv_estimator_fn(name.removeprefix("fastalign_")) is not fn
    with pytest.raises(ValueError, match="Unknown advantage estimator"):
        verl.core.get_adv_estimator_fn("fastalign_gae")  # not registered: verl gives critic values only to "gae"


def test_verl_use_external_modules_registers_the_names(monkeypatch):
    if REAL is not None:
        code = ("import verl.trainer.ppo.core_algos as c; "
                f"[c.get_policy_loss_fn(n) for n in {LOSS_NAMES!r}]; "
                f"[c.get_adv_estimator_fn(n) for n in {ESTIMATOR_NAMES!r}]")
        env = dict(os.environ, VERL_USE_EXTERNAL_MODULES=MODULE)
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
        return
    core = install_standin(monkeypatch)
    with fresh_integration():
        monkeypatch.setenv("VERL_USE_EXTERNAL_MODULES", f"json,{MODULE}")
        assert not set(LOSS_NAMES) & set(core.POLICY_LOSS_REGISTRY)
        sys.modules["verl"].import_external_modules()
        assert set(LOSS_NAMES) <= set(core.POLICY_LOSS_REGISTRY)
        assert set(ESTIMATOR_NAMES) <= set(core.ADV_ESTIMATOR_REGISTRY)


def test_import_without_verl_says_verl_is_required(monkeypatch):
    for name in ("verl", "verl.trainer", "verl.trainer.ppo", "verl.trainer.ppo.core_algos"):
        monkeypatch.setitem(sys.modules, name, None)  # `import verl` now raises ImportError
    with fresh_integration(), pytest.raises(ImportError, match="fastalign.integrations.verl requires verl"):
        importlib.import_module(MODULE)


def test_errors_name_verls_settings(verl):
    log_prob, old, advantages, mask, _ = policy_batch()
    loss = verl.core.get_policy_loss_fn("fastalign_vanilla")
    inputs = dict(old_log_prob=old, log_prob=log_prob, advantages=advantages, response_mask=mask)
    with pytest.raises(ValueError, match=r"^config\.clip_ratio_high: "):
        loss(**inputs, config=verl.actor_config(clip_ratio_high=1.5))
    with pytest.raises(ValueError, match=r"^config\.clip_ratio_c: "):
        loss(**inputs, config=verl.actor_config(clip_ratio_c=0.5))
    with pytest.raises(ValueError, match=r"^config: "):
        loss(**inputs, config=None)
    with pytest.raises(ValueError, match=r"^response_mask: "):
        loss(**dict(inputs, response_mask=mask[:, :-1]), config=verl.actor_config())
    with pytest.raises(ValueError, match=r"^config\.global_batch_info\['batch_num_tokens'\]: "):
        loss(**inputs, config=verl.actor_config(global_batch_info=dict(dp_size=2)))

    rewards, reward_mask, uids = reward_batch()
    grpo = verl.core.get_adv_estimator_fn("fastalign_grpo")
    with pytest.raises(ValueError, match=r"^index: .*uid"):
        grpo(token_level_rewards=rewards, response_mask=reward_mask, config=verl.algo_config())
    with pytest.raises(ValueError, match=r"^index: expected 9 ids"):
        grpo(token_level_rewards=rewards, response_mask=reward_mask, config=verl.algo_config(), index=uids[:-1])
    reinforce = verl.core.get_adv_estimator_fn("fastalign_reinforce_plus_plus")
    with pytest.raises(ValueError, match=r"^config: "):
        reinforce(token_level_rewards=rewards, response_mask=reward_mask, config=None)
    with pytest.raises(ValueError, match=r"^response_mask: "):
        reinforce(token_level_rewards=rewards, response_mask=reward_mask[:, :-1], config=verl.algo_config())
    with pytest.raises(ValueError, match=r"^config\.gamma: "):
        reinforce(token_level_rewards=rewards, response_mask=reward_mask, config=verl.algo_config(gamma=1.5))


def test_reinforce_plus_plus_reads_gamma_as_an_attribute(verl):
    # verl's own estimator reads config.gamma; its tests pass a plain namespace without .get().
    rewards, mask, uids = reward_batch()
    config = types.SimpleNamespace(gamma=0.9)
    ours = verl.core.get_adv_estimator_fn("fastalign_reinforce_plus_plus")(
        token_level_rewards=rewards.clone(), response_mask=mask.clone(), config=config, index=uids,
    )
    theirs = verl.core.get_adv_estimator_fn("reinforce_plus_plus")(
        token_level_rewards=rewards.clone(), response_mask=mask.clone(), config=config, index=uids,
    )
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got.to(want.dtype), want, rtol=1e-5, atol=1e-6)
