"""Likelihood displacement in DPO training, read from the logged rewards.

DPO widens the margin between the chosen and the rejected completions' rewards
r = beta * (log pi - log pi_ref); nothing in its loss keeps the chosen completions likely, and both
log-probabilities often fall together, the chosen one below where it started (Razin et al. 2024,
"Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization",
arXiv:2410.08847; Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with
DPO-Positive", arXiv:2402.13228).

`likelihood_displacement` reads the per-step series TRL's DPOTrainer logs (`rewards/chosen`,
`rewards/rejected`, optionally `logps/chosen`, `logps/rejected`) and flags the first trailing
window of `window` logged steps where

    the chosen reward's least-squares slope < 0,
    the margin's (chosen - rejected reward) slope > 0, so the rejected reward falls faster still
        (least-squares slopes are linear: margin slope = chosen slope - rejected slope), and
    the chosen reward's least-squares line ends below 0 (log pi(y_w) < log pi_ref(y_w)).

The rewards subtract the reference's log-probs of the same batch, so they move far less from batch
to batch than the raw `logps/*` means (which follow the batch's completion lengths): the test reads
the rewards; the log-prob slopes are reported beside them when given.
`fastalign.integrations.trl.displacement_callback.LikelihoodDisplacementCallback` runs it on a
trainer's logs as they come.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import NamedTuple

import torch

REWARD_KEYS = ("rewards/chosen", "rewards/rejected")
LOGP_KEYS = ("logps/chosen", "logps/rejected")


class DisplacementReport(NamedTuple):
    """The trailing window of `window` logged steps, `start_step` to `end_step`, where the regime
    was first seen (`detected`), or the last window when it never was. Slopes are per step.

    chosen_slope, rejected_slope, margin_slope: least-squares slopes of the chosen reward, the
        rejected reward and their difference.
    chosen_reward: the chosen reward's least-squares line at `end_step`.
    chosen_logps_slope, rejected_logps_slope: the log-probs' slopes; None when not given.
    """

    detected: bool
    window: int
    start_step: int | float
    end_step: int | float
    chosen_slope: float
    rejected_slope: float
    margin_slope: float
    chosen_reward: float
    chosen_logps_slope: float | None = None
    rejected_logps_slope: float | None = None


def check_window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window: expected an int, got {type(window).__name__}")
    if window < 3:
        raise ValueError(f"window: expected an int >= 3 (logged steps per trend line), got {window}")
    return window


def _series(name: str, values: object, length: int | None = None) -> torch.Tensor:
    """A 1-d fp64 CPU series from a tensor or a sequence of numbers."""
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.is_complex():
            raise TypeError(f"{name}: expected a float or integer tensor, got {values.dtype}")
        series = values.detach().to("cpu", torch.float64)
    elif isinstance(values, Sequence) and not isinstance(values, str):
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected numbers, found {type(value).__name__} {value!r}")
        series = torch.tensor(list(values), dtype=torch.float64)
    else:
        raise TypeError(f"{name}: expected a 1-d tensor or a sequence of numbers, got {type(values).__name__}")
    if series.dim() != 1:
        raise ValueError(f"{name}: expected one value per logged step (1-d), got shape {tuple(series.shape)}")
    if length is not None and series.shape[0] != length:
        raise ValueError(f"{name}: expected {length} values (as many as chosen_rewards), got {series.shape[0]}")
    if not bool(torch.isfinite(series).all()):
        position = int((~torch.isfinite(series)).nonzero()[0, 0])
        raise ValueError(f"{name}: expected finite values; found {series[position].item()} at position {position}")
    return series


def _windows(series: torch.Tensor, window: int) -> torch.Tensor:
    return series.unfold(0, window, 1)  # [W, window], W = T - window + 1


def _slopes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least-squares slopes of y on x, per row of [W, window]."""
    dx = x - x.mean(1, keepdim=True)
    return (dx * (y - y.mean(1, keepdim=True))).sum(1) / (dx * dx).sum(1)


def likelihood_displacement(
    chosen_rewards: torch.Tensor | Sequence[float],
    rejected_rewards: torch.Tensor | Sequence[float],
    *,
    steps: torch.Tensor | Sequence[float] | None = None,
    chosen_logps: torch.Tensor | Sequence[float] | None = None,
    rejected_logps: torch.Tensor | Sequence[float] | None = None,
    window: int = 10,
) -> DisplacementReport:
    """The first trailing window where the chosen and rejected rewards fall together while the
    margin grows and the chosen reward is below 0 (module docstring).

    Args:
        chosen_rewards, rejected_rewards: `[T]` per logged step (TRL's `rewards/chosen`,
            `rewards/rejected`, beta * (log pi - log pi_ref) batch means); tensors or lists.
        steps: `[T]` strictly increasing steps of the values; None: 0, 1, ..., T - 1.
        chosen_logps, rejected_logps: `[T]` (TRL's `logps/chosen`, `logps/rejected`), optional:
            their slopes are reported, not tested.
        window: logged steps per trend line (>= 3, <= T).

    Returns:
        DisplacementReport: the numbers of the first window in the regime, or of the last window
        (`detected=False`).
    """
    window = check_window(window)
    chosen = _series("chosen_rewards", chosen_rewards)
    length = chosen.shape[0]
    if length < window:
        raise ValueError(f"chosen_rewards: expected at least window={window} values, got {length}")
    rejected = _series("rejected_rewards", rejected_rewards, length)
    if steps is None:
        x = torch.arange(length, dtype=torch.float64)
    else:
        x = _series("steps", steps, length)
        if not bool((x[1:] > x[:-1]).all()):
            raise ValueError("steps: expected strictly increasing steps")
    logps = [None if v is None else _series(n, v, length)
             for n, v in (("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps))]
    xs, chosen_w, rejected_w = (_windows(s, window) for s in (x, chosen, rejected))
    chosen_slope = _slopes(xs, chosen_w)
    rejected_slope = _slopes(xs, rejected_w)
    margin_slope = _slopes(xs, chosen_w - rejected_w)
    # The trend line's value at the window's last step: mean + slope * (last x - mean x).
    chosen_end = chosen_w.mean(1) + chosen_slope * (xs[:, -1] - xs.mean(1))
    regime = (chosen_slope < 0) & (margin_slope > 0) & (chosen_end < 0)
    detected = bool(regime.any())
    at = int(regime.to(torch.int8).argmax()) if detected else xs.shape[0] - 1
    logp_slopes = [None if s is None else float(_slopes(xs[at:at + 1], _windows(s, window)[at:at + 1])) for s in logps]
    return DisplacementReport(
        detected=detected, window=window, start_step=_number(xs[at, 0]), end_step=_number(xs[at, -1]),
        chosen_slope=float(chosen_slope[at]), rejected_slope=float(rejected_slope[at]),
        margin_slope=float(margin_slope[at]), chosen_reward=float(chosen_end[at]),
        chosen_logps_slope=logp_slopes[0], rejected_logps_slope=logp_slopes[1],
    )


def _number(value: torch.Tensor) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() else value


def likelihood_displacement_from_logs(
    log_history: Sequence[dict], *, window: int = 10, prefix: str = ""
) -> DisplacementReport:
    """`likelihood_displacement` of a trainer's `state.log_history`.

    Args:
        log_history: the logged dicts in order; those with `rewards/chosen` and `rewards/rejected`
            (after `prefix`) are read, at their `step` (every one has it, or none: then their
            position), with `logps/chosen` and `logps/rejected` where every read entry has them.
            A `datasets.Dataset` with a column per logged key (a saved run's logs) is read the same
            way, its None cells taken as keys the row did not log.
        window: as in `likelihood_displacement`.
        prefix: "" for the training logs, "eval_" for the evaluation ones.
    """
    if _is_dataset(log_history):
        log_history = [{k: v for k, v in row.items() if v is not None} for row in log_history.to_list()]
    if not isinstance(log_history, Sequence) or isinstance(log_history, str):
        raise TypeError(
            f"log_history: expected a list of dicts (trainer.state.log_history), got {type(log_history).__name__}"
        )
    if not isinstance(prefix, str):
        raise TypeError(f"prefix: expected a str, got {type(prefix).__name__}")
    bad = next((entry for entry in log_history if not isinstance(entry, dict)), None)
    if bad is not None:
        raise TypeError(f"log_history: expected dicts, found {type(bad).__name__}")
    entries = [entry for entry in log_history if all(prefix + key in entry for key in REWARD_KEYS)]
    if not entries:
        raise ValueError(f"log_history: no entry logs {prefix}{REWARD_KEYS[0]} and {prefix}{REWARD_KEYS[1]}")
    with_step = sum("step" in entry for entry in entries)
    if with_step not in (0, len(entries)):
        raise ValueError("log_history: some entries have a 'step' and others do not")
    steps = [entry["step"] for entry in entries] if with_step else None
    has_logps = all(prefix + key in entry for entry in entries for key in LOGP_KEYS)
    chosen, rejected, *logps = ([entry[prefix + key] for entry in entries]
                                for key in REWARD_KEYS + (LOGP_KEYS if has_logps else ()))
    return likelihood_displacement(
        chosen, rejected, steps=steps, window=window,
        chosen_logps=logps[0] if logps else None, rejected_logps=logps[1] if logps else None,
    )


def _is_dataset(value: object) -> bool:
    # datasets is optional: a Dataset can only be passed when it is installed.
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(value, datasets.Dataset)


def describe(report: DisplacementReport) -> str:
    """One paragraph: what was seen, in numbers, and the options that keep the chosen completions likely."""
    logps = ""
    if report.chosen_logps_slope is not None and report.rejected_logps_slope is not None:
        logps = (f" (logps/chosen {report.chosen_logps_slope:+.4g}/step, "
                 f"logps/rejected {report.rejected_logps_slope:+.4g}/step)")
    return (
        f"Likelihood displacement (Razin et al. 2024): over steps {report.start_step}-{report.end_step} "
        f"({report.window} logs) rewards/chosen fell ({report.chosen_slope:+.4g}/step) with rewards/rejected "
        f"({report.rejected_slope:+.4g}/step){logps} while the margin grew ({report.margin_slope:+.4g}/step); "
        f"the chosen reward's trend is at {report.chosen_reward:.4g} < 0, so the policy now gives the chosen "
        "completions less probability than the reference does. To keep them likely, add an NLL term on the "
        "chosen completions: TRL 1.16's DPOConfig(loss_type=['sigmoid', 'sft'], loss_weights=[1.0, alpha]) "
        "(RPO's NLL term; TRL 1.16 has no rpo_alpha), or loss_type='apo_zero'; or DPOP's penalty (Pal et al. "
        "2024), which TRL 1.16 lacks: fastalign.dpo_loss(..., dpop_lambda=lam) / fastalign.dpo_options("
        "dpop_lambda=lam) with loss_type 'sigmoid'."
    )


def is_finite_number(value: object) -> bool:
    """A logged value the detection can read: a finite int or float (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
