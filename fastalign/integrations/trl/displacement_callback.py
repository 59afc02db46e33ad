"""A `transformers.TrainerCallback` that warns when DPO training displaces the chosen completions'
likelihood (`fastalign.likelihood_displacement`), from the rewards the DPOTrainer logs.

    from fastalign.integrations.trl.displacement_callback import LikelihoodDisplacementCallback
    trainer = DPOTrainer(..., callbacks=[LikelihoodDisplacementCallback(window=10)])

It reads TRL's training logs (`rewards/chosen`, `rewards/rejected`, and `logps/chosen`,
`logps/rejected` when logged) at every `on_log`, and each time the trailing `window` logs enter the
regime (once per episode: it re-arms when a window leaves it; `once=True`: the first time only)
warns with a `LikelihoodDisplacementWarning` that gives the numbers and the options that keep the
chosen completions likely. It changes nothing in the training. It works with stock TRL and with TRL
patched by `fastalign.integrations.trl.patch()` alike (both log the same names).
"""

from __future__ import annotations

import warnings

from transformers import TrainerCallback

from ..._checks import check_flag
from ...likelihood_displacement import (
    LOGP_KEYS,
    REWARD_KEYS,
    DisplacementReport,
    check_window,
    describe,
    is_finite_number,
    likelihood_displacement,
)


class LikelihoodDisplacementWarning(UserWarning):
    """DPO training lowers the chosen completions' likelihood below the reference's while the margin grows."""


class LikelihoodDisplacementCallback(TrainerCallback):
    """Warns when the logged DPO rewards show likelihood displacement.

    Args:
        window: logged steps per trend line (>= 3): with `logging_steps=k`, the last `window * k`
            optimizer steps.
        once: warn the first time only, rather than once per episode.

    Attributes:
        received: every training log read, as {"step": global step, "rewards/chosen": ..., ...}.
        reports: the `DisplacementReport` of each warning (given by the main process only, recorded
            by every process).
    """

    def __init__(self, window: int = 10, *, once: bool = False):
        self.window = check_window(window)
        self.once = check_flag("once", once)
        self._reset()

    def _reset(self) -> None:
        self.received: list[dict] = []
        self.reports: list[DisplacementReport] = []
        self._in_regime = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset()

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Evaluation logs carry "eval_" names and the closing summary none of the keys: both pass by.
        if not logs or not all(is_finite_number(logs.get(key)) for key in REWARD_KEYS):
            return
        entry = {"step": state.global_step, **{key: logs[key] for key in REWARD_KEYS + LOGP_KEYS if key in logs}}
        if self.received and self.received[-1]["step"] >= entry["step"]:
            # A second log at one step (a user's trainer.log): the later values stand.
            self.received[-1] = entry
        else:
            self.received.append(entry)
        if len(self.received) < self.window:
            return
        report = self._latest()
        if report.detected and not self._in_regime and not (self.once and self.reports):
            self.reports.append(report)
            # Every process logs the same gathered values: one warning, from the main process.
            if getattr(state, "is_world_process_zero", True):
                warnings.warn(describe(report), LikelihoodDisplacementWarning, stacklevel=2)
        self._in_regime = report.detected

    def _latest(self) -> DisplacementReport:
        """The report of the last `window` logs alone."""
        last = self.received[-self.window:]
        logps = {}
        if all(is_finite_number(entry.get(key)) for entry in last for key in LOGP_KEYS):
            logps = {"chosen_logps": [e[LOGP_KEYS[0]] for e in last], "rejected_logps": [e[LOGP_KEYS[1]] for e in last]}
        return likelihood_displacement(
            [e[REWARD_KEYS[0]] for e in last], [e[REWARD_KEYS[1]] for e in last],
            steps=[e["step"] for e in last], window=self.window, **logps,
        )
