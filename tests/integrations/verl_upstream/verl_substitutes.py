"""pytest plugin (`-p verl_substitutes`, this folder on PYTHONPATH) that runs verl's own tests with
fastalign's registered functions in place of verl's.

verl's test modules import the functions under test by name from verl.trainer.ppo.core_algos; after
collection each such name in a test module's globals is rebound to the fastalign function registered
for the same algorithm (wrapped to count its calls), and only the tests that call one of them, plus
verl's registry tests (TestRegisterAdvEst), are kept. TestRegisterAdvEst empties verl's estimator
registry, so it runs last. With FASTALIGN_VERL_SUBSTITUTES_REPORT set, the names substituted, the
tests kept and the calls counted are written there as JSON.
"""

from __future__ import annotations

import functools
import json
import os

import pytest

# verl's name in its test modules -> the fastalign name registered for the same algorithm.
SUBSTITUTES = {
    "compute_grpo_vectorized_outcome_advantage": "fastalign_grpo",
    "compute_rloo_vectorized_outcome_advantage": "fastalign_rloo",
    "compute_reinforce_plus_plus_outcome_advantage": "fastalign_reinforce_plus_plus",
    "compute_policy_loss_vanilla": "fastalign_vanilla",
}
REGISTRY_TESTS = "TestRegisterAdvEst"

_calls = {name: 0 for name in SUBSTITUTES}
_kept: list[str] = []
_replacements: dict = {}


def _replacement(verl_name: str):
    if verl_name not in _replacements:
        from verl.trainer.ppo import core_algos

        fastalign_name = SUBSTITUTES[verl_name]
        if verl_name.startswith("compute_policy_loss"):
            fn = core_algos.get_policy_loss_fn(fastalign_name)
        else:
            fn = core_algos.get_adv_estimator_fn(fastalign_name)
        if not fn.__module__.startswith("fastalign."):
            raise RuntimeError(f"{fastalign_name} is registered to {fn.__module__}.{fn.__name__}, not fastalign's")

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            _calls[verl_name] += 1
            return fn(*args, **kwargs)

        _replacements[verl_name] = counted
    return _replacements[verl_name]


def _uses_substitute(item) -> bool:
    code = getattr(getattr(item, "function", None), "__code__", None)
    return code is not None and bool(set(code.co_names) & set(SUBSTITUTES))


def pytest_collection_modifyitems(session, config, items):
    kept, registry, deselected = [], [], []
    for item in items:
        module = item.module
        for verl_name in SUBSTITUTES:
            if verl_name in vars(module):
                setattr(module, verl_name, _replacement(verl_name))
        if item.cls is not None and item.cls.__name__ == REGISTRY_TESTS:
            registry.append(item)
        elif _uses_substitute(item):
            kept.append(item)
        else:
            deselected.append(item)
    items[:] = kept + registry
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    _kept.extend(item.nodeid for item in items)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("FASTALIGN_VERL_SUBSTITUTES_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"substituted": sorted(_replacements), "kept": _kept, "calls": _calls}, f)
