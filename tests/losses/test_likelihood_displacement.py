"""Likelihood displacement in DPO (fastalign/likelihood_displacement.py): the trailing-window test
against a numpy re-implementation (`numpy.polyfit` slopes), synthetic runs in and out of the regime,
TRL's `state.log_history` as input, argument errors.

The regime (Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct
Preference Optimization", arXiv:2410.08847, Sec. 3; Pal et al. 2024, "Smaug", arXiv:2402.13228,
Sec. 3): over a window of logged steps, TRL's rewards/chosen = beta * (log pi(y_w) - log
pi_ref(y_w)) and rewards/rejected both fall while their difference, the margin DPO's loss
-log sigma(margin) widens, grows, and the chosen reward is below 0 (pi(y_w) < pi_ref(y_w)).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastalign.likelihood_displacement import (
    describe,
    likelihood_displacement,
    likelihood_displacement_from_logs,
)


def reference_scan(steps, chosen, rejected, window):
    """(first window index in the regime or None, per-window numbers), with numpy.polyfit lines."""
    numbers = []
    for start in range(len(chosen) - window + 1):
        x = np.asarray(steps[start:start + window], dtype=np.float64)
        c = np.asarray(chosen[start:start + window], dtype=np.float64)
        r = np.asarray(rejected[start:start + window], dtype=np.float64)
        chosen_slope, chosen_intercept = np.polyfit(x, c, 1)
        rejected_slope = np.polyfit(x, r, 1)[0]
        margin_slope = np.polyfit(x, c - r, 1)[0]
        end_value = chosen_slope * x[-1] + chosen_intercept
        numbers.append((x[0], x[-1], chosen_slope, rejected_slope, margin_slope, end_value))
    first = next((k for k, (_, _, cs, rs, ms, end) in enumerate(numbers) if cs < 0 and rs < 0 and ms > 0 and end < 0),
                 None)
    # Slopes are linear in the data: margin slope = chosen slope - rejected slope, so a falling chosen
    # reward with a growing margin implies a falling rejected one.
    assert all(np.isclose(ms, cs - rs) for _, _, cs, rs, ms, _ in numbers)
    return first, numbers


def random_walks(seed, length, drift):
    gen = torch.Generator().manual_seed(seed)
    chosen = (drift[0] + 0.3 * torch.randn(length, generator=gen, dtype=torch.float64)).cumsum(0)
    rejected = (drift[1] + 0.3 * torch.randn(length, generator=gen, dtype=torch.float64)).cumsum(0)
    return chosen, rejected


@settings(max_examples=25)
@given(seed=st.integers(0, 2**16), length=st.integers(3, 40), window=st.integers(3, 12),
       drift=st.sampled_from([(0.0, 0.0), (-0.1, -0.3), (0.1, -0.2), (-0.2, -0.1)]), spaced=st.booleans())
def test_windows_match_numpy_polyfit(seed, length, window, drift, spaced):
    window = min(window, length)
    chosen, rejected = random_walks(seed, length, drift)
    steps = (torch.arange(length) * 5 + 5).tolist() if spaced else list(range(length))
    report = likelihood_displacement(chosen, rejected, steps=steps if spaced else None, window=window)
    first, numbers = reference_scan(steps, chosen.tolist(), rejected.tolist(), window)
    assert report.detected == (first is not None)
    want = numbers[first if first is not None else -1]
    assert (report.start_step, report.end_step) == (want[0], want[1])
    got = (report.chosen_slope, report.rejected_slope, report.margin_slope, report.chosen_reward)
    np.testing.assert_allclose(got, want[2:], rtol=1e-9, atol=1e-9)
    assert report.window == window and report.chosen_logps_slope is None


def displaced_run(length=40, turn=15, seed=0):
    """A DPO-like run: until `turn` the chosen reward rises a little and the rejected one falls; then
    both fall, the rejected faster (the margin still grows), the chosen below 0 from about turn + 4."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float64)
    chosen = torch.where(t < turn, 0.01 * t, 0.01 * turn - 0.04 * (t - turn))
    rejected = torch.where(t < turn, -0.03 * t, -0.03 * turn - 0.1 * (t - turn))
    noise = 0.005 * torch.randn(2, length, generator=gen, dtype=torch.float64)
    return chosen + noise[0], rejected + noise[1]


def test_a_displaced_run_is_found_where_it_starts():
    chosen, rejected = displaced_run()
    report = likelihood_displacement(chosen, rejected, window=8)
    assert report.detected
    # The chosen reward turns at step 15 and crosses 0 near step 19: the first window in the regime
    # ends a little past the turn, once its line ends below 0.
    assert 15 < report.end_step <= 22 and report.start_step == report.end_step - 7
    assert report.chosen_slope < 0 and report.rejected_slope < report.chosen_slope and report.margin_slope > 0
    assert report.chosen_reward < 0
    first, _ = reference_scan(list(range(40)), chosen.tolist(), rejected.tolist(), 8)
    assert report.start_step == first


@pytest.mark.parametrize("case", ["healthy", "chosen-above-0", "margin-shrinks", "rejected-rises"])
def test_runs_outside_the_regime_are_not_flagged(case):
    t = torch.arange(30, dtype=torch.float64)
    chosen, rejected = {
        "healthy": (0.02 * t, -0.05 * t),  # chosen up, rejected down
        "chosen-above-0": (2.0 - 0.02 * t, -0.1 * t),  # both fall, the chosen still above its start
        "margin-shrinks": (-0.1 * t, -0.05 * t),  # both fall, the chosen faster: the loss gets worse
        "rejected-rises": (-0.01 * t, 0.001 * t - 0.5),
    }[case]
    report = likelihood_displacement(chosen, rejected, window=10)
    assert not report.detected
    assert (report.start_step, report.end_step) == (20, 29)  # the last window's numbers


def test_log_history_of_a_trainer():
    chosen, rejected = displaced_run(length=30)
    logps_chosen = (-40 + 3 * chosen).tolist()
    logps_rejected = (-45 + 3 * rejected).tolist()
    history = []
    for k in range(30):
        step = 2 * (k + 1)  # logging_steps=2
        history.append({"loss": 0.6, "grad_norm": 1.0, "learning_rate": 1e-5, "rewards/chosen": float(chosen[k]),
                        "rewards/rejected": float(rejected[k]), "rewards/margins": float(chosen[k] - rejected[k]),
                        "logps/chosen": logps_chosen[k], "logps/rejected": logps_rejected[k], "epoch": 0.1,
                        "step": step})
        if k % 10 == 9:  # an evaluation: other values under eval_ names
            history.append({"eval_loss": 0.7, "eval_rewards/chosen": 1.0, "eval_rewards/rejected": 0.5, "step": step})
    history.append({"train_runtime": 1.0, "train_loss": 0.6, "step": 60})
    report = likelihood_displacement_from_logs(history, window=8)
    want = likelihood_displacement(chosen, rejected, steps=[2 * (k + 1) for k in range(30)], window=8,
                                   chosen_logps=logps_chosen, rejected_logps=logps_rejected)
    assert report == want and report.detected
    # Least-squares slopes are linear: the log-probs 3x the rewards' (plus constants) slope 3x as fast.
    assert report.chosen_logps_slope == pytest.approx(3 * report.chosen_slope, rel=1e-9)
    assert report.rejected_logps_slope == pytest.approx(3 * report.rejected_slope, rel=1e-9)
    evaluation = likelihood_displacement_from_logs(history, window=3, prefix="eval_")
    assert not evaluation.detected and (evaluation.start_step, evaluation.end_step) == (20, 60)
    # Entries without steps are read in order.
    no_steps = [{k: v for k, v in entry.items() if k != "step"} for entry in history]
    assert likelihood_displacement_from_logs(no_steps, window=8).start_step == report.start_step // 2 - 1
    # The same logs as a datasets.Dataset (a saved run's): rows that did not log a key hold None there.
    datasets = pytest.importorskip("datasets")
    keys = sorted(set().union(*history))
    table = datasets.Dataset.from_dict({key: [entry.get(key) for entry in history] for key in keys})
    assert likelihood_displacement_from_logs(table, window=8) == report
    assert likelihood_displacement_from_logs(table, window=3, prefix="eval_") == evaluation


def test_description_gives_the_numbers_and_real_options():
    report = likelihood_displacement(*displaced_run(), window=8)
    text = describe(report)
    for part in (f"{report.start_step}-{report.end_step}", f"{report.chosen_slope:+.4g}", f"{report.margin_slope:+.4g}",
                 "loss_type=['sigmoid', 'sft']", "apo_zero", "dpop_lambda"):
        assert part in text, part


# --- argument errors ----------------------------------------------------------------------------------

C, R = displaced_run(length=12)


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(chosen_rewards="1 2 3"), TypeError, r"^chosen_rewards: expected a 1-d tensor or a sequence"),
    (dict(chosen_rewards=[0.1, None] * 6), TypeError, r"^chosen_rewards: expected numbers"),
    (dict(chosen_rewards=torch.zeros(12, dtype=torch.bool)), TypeError, r"^chosen_rewards: expected a float"),
    (dict(chosen_rewards=C.reshape(3, 4)), ValueError, r"^chosen_rewards: expected one value per logged step"),
    (dict(chosen_rewards=C[:5]), ValueError, r"^chosen_rewards: expected at least window=8 values"),
    (dict(rejected_rewards=R[:11]), ValueError, r"^rejected_rewards: expected 12 values"),
    (dict(rejected_rewards=torch.cat([R[:11], torch.tensor([math.nan], dtype=torch.float64)])), ValueError,
     r"^rejected_rewards: expected finite values; found nan at position 11"),
    (dict(steps=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 10]), ValueError, r"^steps: expected strictly increasing"),
    (dict(chosen_logps=[1.0] * 3), ValueError, r"^chosen_logps: expected 12 values"),
    (dict(rejected_logps=[math.inf] * 12), ValueError, r"^rejected_logps: expected finite values"),
    (dict(window=2), ValueError, r"^window: expected an int >= 3"),
    (dict(window=8.0), TypeError, r"^window: expected an int"),
])
def test_bad_arguments_are_named(kwargs, error, pattern):
    args = dict(chosen_rewards=C, rejected_rewards=R, window=8)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        likelihood_displacement(args.pop("chosen_rewards"), args.pop("rejected_rewards"), **args)


@pytest.mark.parametrize("history,kwargs,error,pattern", [
    ({"rewards/chosen": 1.0}, {}, TypeError, r"^log_history: expected a list of dicts"),
    ([("rewards/chosen", 1.0)], {}, TypeError, r"^log_history: expected dicts"),
    ([{"loss": 1.0}], {}, ValueError, r"^log_history: no entry logs rewards/chosen and rewards/rejected"),
    ([{"rewards/chosen": 1.0, "rewards/rejected": 0.0, "step": 1}, {"rewards/chosen": 1.0, "rewards/rejected": 0.0}],
     {}, ValueError, r"^log_history: some entries have a 'step'"),
    ([{"rewards/chosen": 1.0, "rewards/rejected": 0.0}], {"prefix": None}, TypeError, r"^prefix: expected a str"),
])
def test_bad_log_histories_are_named(history, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        likelihood_displacement_from_logs(history, **kwargs)
