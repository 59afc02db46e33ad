"""LikelihoodDisplacementCallback (fastalign/integrations/trl/displacement_callback.py): its on_log on a
scripted sequence of TRL-style logs (warnings once per episode, the numbers of
fastalign.likelihood_displacement on the trailing window), the options its warning names checked
against TRL 1.16 and fastalign, and a real tiny DPOTrainer run with the callback attached.

The regime is Razin et al. 2024 (arXiv:2410.08847): rewards/chosen = beta * (log pi(y_w) -
log pi_ref(y_w)) falling below 0 while the margin rewards/chosen - rewards/rejected grows.
"""

from __future__ import annotations

import types
import warnings

import pytest
import tiny_trl
import torch

trl = pytest.importorskip("trl")

import fastalign  # noqa: E402
from fastalign.integrations import trl as fa_trl  # noqa: E402
from fastalign.integrations.trl.displacement_callback import (  # noqa: E402
    LikelihoodDisplacementCallback,
    LikelihoodDisplacementWarning,
)
from fastalign.likelihood_displacement import likelihood_displacement  # noqa: E402

KEYS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def two_episodes():
    """60 logged steps: healthy, displaced, recovering (the chosen reward rises, still below 0),
    displaced again. Per-step changes of (chosen, rejected) reward in each phase of 15 steps."""
    phases = [(0.01, -0.03), (-0.05, -0.1), (0.02, -0.05), (-0.05, -0.1)]
    steps = torch.tensor([phase for phase in phases for _ in range(15)], dtype=torch.float64)
    chosen, rejected = steps.cumsum(0).T
    return chosen.tolist(), rejected.tolist()


def feed(callback, chosen, rejected, first_step=1, extra=None, main_process=True):
    """on_log as the Trainer calls it, one training log per step; returns the warnings given."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k, (c, r) in enumerate(zip(chosen, rejected)):
            state = types.SimpleNamespace(global_step=first_step + k, is_world_process_zero=main_process)
            logs = {"loss": 0.5, "rewards/chosen": c, "rewards/rejected": r, "rewards/margins": c - r,
                    "logps/chosen": -50 + c, "logps/rejected": -60 + r, "epoch": 0.1}
            callback.on_log(None, state, None, logs=logs)
            for entry in (extra or {}).get(k, ()):
                callback.on_log(None, state, None, logs=entry)
    return [w for w in caught if issubclass(w.category, LikelihoodDisplacementWarning)]


def test_warns_once_per_episode_with_the_windows_numbers():
    chosen, rejected = two_episodes()
    callback = LikelihoodDisplacementCallback(window=6)
    given = feed(callback, chosen, rejected)
    assert len(given) == len(callback.reports) == 2
    first, second = callback.reports
    assert 15 < first.end_step < 30 < 45 < second.end_step
    for report, warning in zip(callback.reports, given):
        # The report is fastalign.likelihood_displacement of the window the callback had seen.
        lo = report.start_step - 1
        want = likelihood_displacement(chosen[lo:lo + 6], rejected[lo:lo + 6], steps=list(range(lo + 1, lo + 7)),
                                       window=6, chosen_logps=[-50 + c for c in chosen[lo:lo + 6]],
                                       rejected_logps=[-60 + r for r in rejected[lo:lo + 6]])
        assert report == want and report.detected
        text = str(warning.message)
        for part in (f"steps {report.start_step}-{report.end_step}", f"{report.chosen_slope:+.4g}/step",
                     f"{report.margin_slope:+.4g}/step", f"{report.chosen_reward:.4g} < 0"):
            assert part in text, part
    # The first report is the first window in the regime of the whole run.
    assert first == likelihood_displacement(chosen, rejected, steps=list(range(1, 61)), window=6,
                                            chosen_logps=[-50 + c for c in chosen],
                                            rejected_logps=[-60 + r for r in rejected])
    once = LikelihoodDisplacementCallback(window=6, once=True)
    assert len(feed(once, chosen, rejected)) == 1 and once.reports == [first]
    # Another process of a multi-process run records the same reports and leaves the warning to the main one.
    other = LikelihoodDisplacementCallback(window=6)
    assert feed(other, chosen, rejected, main_process=False) == [] and other.reports == callback.reports


def test_other_logs_pass_by_and_a_repeated_step_replaces():
    chosen, rejected = two_episodes()
    extra = {
        3: [{"eval_loss": 0.7, "eval_rewards/chosen": -5.0, "eval_rewards/rejected": -9.0}],
        5: [{"rewards/chosen": float("nan"), "rewards/rejected": 0.0}, {"loss": 0.4}],
        7: [{"rewards/chosen": chosen[7] + 1.0, "rewards/rejected": rejected[7]}],  # a second log at step 8
    }
    callback = LikelihoodDisplacementCallback(window=6)
    feed(callback, chosen[:10], rejected[:10], extra=extra)
    assert [entry["step"] for entry in callback.received] == list(range(1, 11))
    assert callback.received[7] == {"step": 8, "rewards/chosen": chosen[7] + 1.0, "rewards/rejected": rejected[7]}
    assert callback.received[6] == {"step": 7, **dict(zip(KEYS, (chosen[6], rejected[6], -50 + chosen[6],
                                                                  -60 + rejected[6])))}
    # A new training starts afresh.
    callback.on_train_begin(None, None, None)
    assert callback.received == [] and callback.reports == []


def test_the_options_the_warning_names_exist(tmp_path):
    from trl import DPOConfig

    callback = LikelihoodDisplacementCallback(window=6)
    text = str(feed(callback, *two_episodes())[0].message)
    assert "loss_type=['sigmoid', 'sft'], loss_weights=[1.0, alpha]" in text and "apo_zero" in text
    assert "dpop_lambda" in text and "no rpo_alpha" in text
    # TRL 1.16: the NLL term is the "sft" loss type, weighted; there is no rpo_alpha and no DPOP loss type.
    config = DPOConfig(**tiny_trl.common_args(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]))
    assert config.loss_type == ["sigmoid", "sft"]
    assert "apo_zero" in DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert "rpo_alpha" not in DPOConfig.__dataclass_fields__
    assert not any("dpop" in name for name in DPOConfig.__dataclass_fields__)
    # fastalign's DPO has DPOP, on the sigmoid loss.
    assert fastalign.dpo_options(dpop_lambda=5.0).dpop_lambda == 5.0


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(window=2), ValueError, r"^window: expected an int >= 3"),
    (dict(window="10"), TypeError, r"^window: expected an int"),
    (dict(once="yes"), TypeError, r"^once: expected True or False"),
])
def test_bad_arguments_are_named(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        LikelihoodDisplacementCallback(**kwargs)


def test_in_a_tiny_dpo_training_run(tmp_path):
    """A 4-step DPOTrainer run on CPU (logging_steps=1) with the callback attached: training goes
    through, the callback reads every training log, and what it reports is what the offline
    function finds in the trainer's log_history."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from fastalign.likelihood_displacement import likelihood_displacement_from_logs

    callback = LikelihoodDisplacementCallback(window=3)
    args = DPOConfig(**tiny_trl.common_args(tmp_path, max_steps=4, logging_steps=1))
    trainer = DPOTrainer(model=tiny_trl.causal_lm(), ref_model=tiny_trl.causal_lm(seed=1), args=args,
                         train_dataset=Dataset.from_list(tiny_trl.preference_rows(16)),
                         processing_class=tiny_trl.tokenizer(), callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LikelihoodDisplacementWarning)  # the 4 steps may or may not be in the regime
        trainer.train()
    assert not fa_trl.is_patched()
    logged = [entry for entry in trainer.state.log_history if "rewards/chosen" in entry]
    assert [entry["step"] for entry in callback.received] == [entry["step"] for entry in logged] == [1, 2, 3, 4]
    for mine, theirs in zip(callback.received, logged):
        assert mine == {"step": theirs["step"], **{key: theirs[key] for key in KEYS}}
    offline = likelihood_displacement_from_logs(trainer.state.log_history, window=3)
    assert callback.reports == ([offline] if offline.detected else [])
