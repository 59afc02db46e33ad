"""verl 0.9.1's own CPU tests of the functions fastalign registers in verl, run with fastalign's in
their place (tests/integrations/verl_upstream/README.md): its GRPO and RLOO tests compare verl's loop
implementation with the substitute, its REINFORCE++ multi-turn tests check exact returns, its
rollout-correction tests run the PPO loss with importance weights, and its registry tests run
alongside fastalign's registered names. One child process: verl's registry tests empty the
estimator registry, which the rest of this suite uses."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import peers

peers.require("verl")

UPSTREAM = pathlib.Path(__file__).parent / "verl_upstream"
MODULES = ("verl_test_core_algos_on_cpu.py", "verl_test_reinforce_pp_multiturn_on_cpu.py",
           "verl_test_rollout_corr_integration.py")
# verl's tests that call a substituted function, per substituted name, and its registry tests.
EXPECTED = {
    "compute_grpo_vectorized_outcome_advantage": 4,  # 3 sizes and the low-variance case
    "compute_rloo_vectorized_outcome_advantage": 3,
    "compute_reinforce_plus_plus_outcome_advantage": 6,
    "compute_policy_loss_vanilla": 3,
}
REGISTRY_TESTS = 9


def test_verls_own_tests_pass_with_fastalign_substituted(tmp_path):
    report = tmp_path / "report.json"
    env = dict(os.environ, FASTALIGN_VERL_SUBSTITUTES_REPORT=str(report),
               PYTHONPATH=os.pathsep.join([str(UPSTREAM), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "verl_substitutes",
         "-W", "ignore::UserWarning", *(str(UPSTREAM / m) for m in MODULES)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    info = json.loads(report.read_text())
    assert sorted(info["substituted"]) == sorted(EXPECTED)
    for name, calls in info["calls"].items():
        assert calls >= EXPECTED[name], f"{name}: called {calls} times"
    registry = [node for node in info["kept"] if "::TestRegisterAdvEst::" in node]
    assert len(registry) == REGISTRY_TESTS
    assert info["kept"][-REGISTRY_TESTS:] == registry  # last: they empty verl's registry
    assert len(info["kept"]) == sum(EXPECTED.values()) + REGISTRY_TESTS
    assert f"{len(info['kept'])} passed" in result.stdout
