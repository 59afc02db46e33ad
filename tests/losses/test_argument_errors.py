"""Every argument of every public function, given a wrong value, fails with a TypeError or ValueError
whose message starts with the argument's name: never a crash deep in a kernel, never a silent
result.

The cases are a table: for each function, a call with sound defaults and one argument replaced by a
wrong value (wrong rank or shape, mismatched batch, wrong dtype, another device — a "meta" tensor
stands in for one —, NaN, inf or out-of-range numbers, unknown choices, incompatible options, values
that are not tensors). Each runs on the default backend and on the reference one.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

import fastalign
from fastalign import HiddenStates

B, T, V, H = 2, 3, 7, 4
NAN, INF = math.nan, math.inf


def fl(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def ids(*shape, device="cpu"):
    return torch.randint(0, V, shape, device=device)


def ones(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(*shape, dtype=dtype, device=device)


def with_label(value, shape=(B, T), at=(1, 2)):
    labels = torch.randint(0, V, shape)
    labels[at] = value
    return labels


class Case(NamedTuple):
    id: str
    call: Callable[[], object]
    error: type[Exception] | tuple[type[Exception], ...]
    pattern: str


CASES: list[Case] = []


def api(fn: Callable, defaults: Callable[[], dict], positional: tuple[str, ...] = ()):
    """`bad(**overrides)` -> a call of `fn` with the defaults, the overrides replacing them."""

    def bad(**overrides):
        def call():
            args = defaults()
            args.update(overrides)
            values = [args.pop(name) for name in positional]
            return fn(*values, **args)

        return call

    return bad


def case(fn_name: str, arg: str, what: str, call, error=ValueError, pattern: str | None = None):
    """A case whose error message starts with `arg` (or matches `pattern` where the message names
    several arguments at once)."""
    pattern = pattern if pattern is not None else rf"^{re.escape(arg)}\b"
    CASES.append(Case(f"{fn_name}-{arg}-{what}", call, error, pattern))


def options_cases(fn_name: str, call, builder: Callable, other: Callable):
    """Options come as keywords or as `options=builder(...)`, not both; another object, or an
    unknown keyword, is named."""
    first, parameter = next(iter(inspect.signature(builder).parameters.items()))
    case(fn_name, "options", "dict", call(options={}), TypeError)
    case(fn_name, "options", other.__name__, call(options=other()), TypeError)
    case(fn_name, "options", "with-keywords", call(options=builder(), **{first: parameter.default}))
    case(fn_name, "unknown_option", "typo", call(not_an_option=1.0), TypeError, r"not_an_option")


def hidden_cases(fn_name: str, call, rows: int):
    """The hidden-states level of a loss from logits: hidden= with weight= (and bias=), in place of logits."""
    head = dict(logits=None, hidden=fl(rows, T, H), weight=fl(V, H))
    case(fn_name, "logits", "with-hidden", call(hidden=fl(rows, T, H), weight=fl(V, H)))
    case(fn_name, "hidden", "without-weight", call(logits=None, hidden=fl(rows, T, H)))
    case(fn_name, "hidden", "weight-alone", call(logits=None, weight=fl(V, H)))
    case(fn_name, "hidden", "bias-alone", call(logits=None, bias=fl(V)))
    case(fn_name, "hidden", "int", call(**{**head, "hidden": torch.zeros(rows, T, H, dtype=torch.long)}), TypeError)
    case(fn_name, "weight", "hidden-size", call(**{**head, "weight": fl(V, H + 1)}))
    case(fn_name, "weight", "device", call(**{**head, "weight": fl(V, H, device="meta")}))
    case(fn_name, "bias", "shape", call(**head, bias=fl(V + 1)))


# --- token_logprobs and linear_token_logprobs ----------------------------------------------------------

tl = api(fastalign.token_logprobs, lambda: dict(logits=fl(B, T, V), labels=ids(B, T)), ("logits", "labels"))
N = "token_logprobs"
case(N, "logits", "list", tl(logits=[[0.0] * V]), TypeError)
case(N, "logits", "0-d", tl(logits=torch.tensor(1.0), labels=torch.tensor(0)))
case(N, "logits", "int", tl(logits=torch.randint(0, 5, (B, T, V))), TypeError)
case(N, "logits", "bool", tl(logits=torch.zeros(B, T, V, dtype=torch.bool)), TypeError)
case(N, "logits", "complex", tl(logits=fl(B, T, V, dtype=torch.complex64)), TypeError)
case(N, "logits", "empty-vocab", tl(logits=fl(B, T, 0), labels=torch.zeros(B, T, dtype=torch.long)))
case(N, "labels", "list", tl(labels=[[0] * T] * B), TypeError)
case(N, "labels", "float", tl(labels=fl(B, T)), TypeError)
case(N, "labels", "bool", tl(labels=torch.zeros(B, T, dtype=torch.bool)), TypeError)
case(N, "labels", "int16", tl(labels=torch.zeros(B, T, dtype=torch.int16)), TypeError)
case(N, "labels", "shape", tl(labels=ids(B, T + 1)))
case(N, "labels", "batch", tl(labels=ids(B + 1, T)))
case(N, "labels", "flat", tl(labels=ids(B * T)))
case(N, "labels", "device", tl(labels=ids(B, T, device="meta")))
case(N, "labels", "too-large", tl(labels=with_label(V)))
case(N, "labels", "negative", tl(labels=with_label(-1)))
for value, error in ((0.0, ValueError), (-1.0, ValueError), (NAN, ValueError), (INF, ValueError),
                     ("hot", TypeError), (True, TypeError), (None, TypeError), (torch.tensor(1.0), TypeError)):
    case(N, "temperature", repr(value), tl(temperature=value), error)
for value, error in ((NAN, ValueError), (INF, ValueError), ("x", TypeError), (None, TypeError)):
    case(N, "logit_scale", repr(value), tl(logit_scale=value), error)
for value, error in ((0.0, ValueError), (-30.0, ValueError), (NAN, ValueError), (INF, ValueError),
                     ("x", TypeError), (True, TypeError)):
    case(N, "softcap", repr(value), tl(softcap=value), error)
for value in (1.5, True, "x", None, torch.tensor(-100)):
    case(N, "ignore_index", repr(value), tl(ignore_index=value), TypeError)
case(N, "mask", "list", tl(mask=[[1] * T] * B), TypeError)
case(N, "mask", "shape", tl(mask=ones(B, T + 1)))
case(N, "mask", "device", tl(mask=ones(B, T, device="meta")))
case(N, "mask", "complex", tl(mask=ones(B, T, dtype=torch.complex64)), TypeError)
case(N, "outputs", "unknown", tl(outputs=("entropy", "perplexity")))
case(N, "outputs", "int", tl(outputs=5), TypeError)
case(N, "outputs", "None", tl(outputs=None), TypeError)
case(N, "outputs", "int-item", tl(outputs=("entropy", 3)))

ll = api(fastalign.linear_token_logprobs, lambda: dict(hidden=fl(B, T, H), weight=fl(V, H), labels=ids(B, T)),
         ("hidden", "weight", "labels"))
N = "linear_token_logprobs"
case(N, "hidden", "list", ll(hidden=[[0.0] * H]), TypeError)
case(N, "hidden", "0-d", ll(hidden=torch.tensor(1.0)), TypeError)
case(N, "hidden", "int", ll(hidden=torch.randint(0, 5, (B, T, H))), TypeError)
case(N, "weight", "list", ll(weight=[[0.0] * H] * V))
case(N, "weight", "None", ll(weight=None))
case(N, "weight", "1-d", ll(weight=fl(V)))
case(N, "weight", "3-d", ll(weight=fl(1, V, H)))
case(N, "weight", "hidden-size", ll(weight=fl(V, H + 1)))
case(N, "weight", "empty-vocabulary", ll(weight=fl(0, H)))
case(N, "weight", "dtype", ll(weight=fl(V, H, dtype=torch.float64)), TypeError)
case(N, "weight", "device", ll(weight=fl(V, H, device="meta")))
case(N, "bias", "shape", ll(bias=fl(V + 1)))
case(N, "bias", "list", ll(bias=[0.0] * V))
case(N, "bias", "dtype", ll(bias=fl(V, dtype=torch.float64)), TypeError)
case(N, "bias", "device", ll(bias=fl(V, device="meta")), TypeError)
case(N, "labels", "list", ll(labels=[[0] * T] * B), TypeError)
case(N, "labels", "float", ll(labels=fl(B, T)), TypeError)
case(N, "labels", "shape", ll(labels=ids(B, T + 1)))
case(N, "labels", "device", ll(labels=ids(B, T, device="meta")))
case(N, "labels", "too-large", ll(labels=with_label(V)))
case(N, "labels", "negative", ll(labels=with_label(-2)))
case(N, "temperature", "0", ll(temperature=0.0))
case(N, "temperature", "str", ll(temperature="hot"), TypeError)
case(N, "logit_scale", "nan", ll(logit_scale=NAN))
case(N, "softcap", "negative", ll(softcap=-1.0))
case(N, "ignore_index", "float", ll(ignore_index=-100.0), TypeError)
case(N, "mask", "shape", ll(mask=ones(B + 1, T)))
case(N, "mask", "device", ll(mask=ones(B, T, device="meta")))
case(N, "outputs", "unknown", ll(outputs=("perplexity",)))


# --- distillation: token_divergence, linear_token_divergence, topk_token_divergence, distillation_loss ------

td = api(fastalign.token_divergence, lambda: dict(student_logits=fl(B, T, V), teacher_logits=fl(B, T, V)),
         ("student_logits", "teacher_logits"))
N = "token_divergence"
case(N, "student_logits", "list", td(student_logits=[[0.0] * V]), TypeError)
case(N, "student_logits", "int", td(student_logits=torch.zeros(B, T, V, dtype=torch.long)), TypeError)
case(N, "student_logits", "0-d", td(student_logits=torch.tensor(1.0), teacher_logits=torch.tensor(1.0)))
case(N, "student_logits", "empty-vocab", td(student_logits=fl(B, T, 0), teacher_logits=fl(B, T, 0)))
case(N, "teacher_logits", "shape", td(teacher_logits=fl(B, T, V + 1)))
case(N, "teacher_logits", "device", td(teacher_logits=fl(B, T, V, device="meta")))
case(N, "teacher_logits", "None", td(teacher_logits=None), TypeError)
for value, error in (("js", ValueError), (None, ValueError), (3, ValueError)):
    case(N, "divergence", repr(value), td(divergence=value), error)
for value, error in ((-0.1, ValueError), (1.5, ValueError), (NAN, ValueError), ("x", TypeError), (None, TypeError)):
    case(N, "beta", repr(value), td(beta=value), error)
for value, error in ((1.0, ValueError), (-0.5, ValueError), ("x", TypeError)):
    case(N, "skew", repr(value), td(divergence="skew_forward_kl", skew=value), error)
for value, error in ((0.0, ValueError), (-1.0, ValueError), (INF, ValueError), ("hot", TypeError), (None, TypeError)):
    case(N, "temperature", repr(value), td(temperature=value), error)
for name in ("student", "teacher"):
    for value, error in ((0.0, ValueError), (NAN, ValueError), ("x", TypeError)):
        case(N, f"{name}_logit_scale", repr(value), td(**{f"{name}_logit_scale": value}), error)
    for value, error in ((0.0, ValueError), (-3.0, ValueError), (INF, ValueError), ("x", TypeError)):
        case(N, f"{name}_softcap", repr(value), td(**{f"{name}_softcap": value}), error)
case(N, "mask", "shape", td(mask=ones(B, T + 1)))
case(N, "mask", "list", td(mask=[[1] * T] * B), TypeError)
case(N, "mask", "device", td(mask=ones(B, T, device="meta")))
case(N, "labels", "shape", td(labels=ids(B)))
for value in (1.5, True, "x", None):
    case(N, "ignore_index", repr(value), td(labels=ids(B, T), ignore_index=value), TypeError)
case(N, "outputs", "unknown", td(outputs=("entropy", "kl")))
case(N, "outputs", "int", td(outputs=5), TypeError)

HT = H + 2
ltd = api(fastalign.linear_token_divergence,
          lambda: dict(student_hidden=fl(B, T, H), student_weight=fl(V, H), teacher_hidden=fl(B, T, HT),
                       teacher_weight=fl(V, HT)),
          ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"))
N = "linear_token_divergence"
case(N, "student_hidden", "int", ltd(student_hidden=torch.zeros(B, T, H, dtype=torch.long)), TypeError)
case(N, "student_weight", "width", ltd(student_weight=fl(V, H + 1)))
case(N, "student_weight", "device", ltd(student_weight=fl(V, H, device="meta")))
case(N, "student_bias", "shape", ltd(student_bias=fl(V + 1)))
case(N, "teacher_weight", "vocabulary", ltd(teacher_weight=fl(V + 1, HT)))
case(N, "teacher_hidden", "positions", ltd(teacher_hidden=fl(B, T + 1, HT)))
case(N, "teacher_hidden", "dtype", ltd(teacher_hidden=fl(B, T, HT, dtype=torch.float64),
                                       teacher_weight=fl(V, HT, dtype=torch.float64)))
case(N, "beta", "range", ltd(beta=2.0))
for value in (0, True, "x"):
    case(N, "rows_per_block", repr(value), ltd(rows_per_block=value))

ttd = api(fastalign.topk_token_divergence,
          lambda: dict(student_logits=fl(B, T, V), teacher_ids=ids(B, T, 3), teacher_logps=fl(B, T, 3) - 3.0),
          ("student_logits", "teacher_ids", "teacher_logps"))
N = "topk_token_divergence"
case(N, "teacher_ids", "float", ttd(teacher_ids=fl(B, T, 3)), TypeError)
case(N, "teacher_ids", "shape", ttd(teacher_ids=ids(B, T)))
case(N, "teacher_ids", "too-large", ttd(teacher_ids=torch.full((B, T, 3), V)))
case(N, "teacher_logps", "shape", ttd(teacher_logps=fl(B, T, 4)))
case(N, "teacher_logps", "int", ttd(teacher_logps=ids(B, T, 3)), TypeError)
case(N, "form", "unknown", ttd(form="dense"))
case(N, "outputs", "unknown", ttd(outputs=("kl",)))

dl = api(fastalign.distillation_loss, lambda: dict(student_logits=fl(B, T, V), teacher_logits=fl(B, T, V)),
         ("student_logits", "teacher_logits"))
N = "distillation_loss"
case(N, "reduction", "batchmean", dl(reduction="batchmean"))
case(N, "num_items_in_batch", "zero", dl(num_items_in_batch=0))
case(N, "num_items_in_batch", "with-sum", dl(reduction="sum", num_items_in_batch=4))
case(N, "num_items_in_batch", "str", dl(num_items_in_batch="4"), TypeError)
case(N, "student_logits", "with-hidden", dl(student_hidden=fl(B, T, H)), ValueError,
     r"^student_logits / student_hidden")
case(N, "teacher_ids", "with-teacher-logits", dl(teacher_ids=ids(B, T, 3), teacher_logps=fl(B, T, 3)), ValueError,
     r"^teacher_ids / teacher_logps")
case(N, "student_logits", "missing", dl(teacher_logits=None), ValueError, r"^student_logits / teacher_logits")
case(N, "teacher_hidden", "missing", dl(student_logits=None, teacher_logits=None, student_hidden=fl(B, T, H),
                                        student_weight=fl(V, H)), ValueError, r"^teacher_hidden, teacher_weight")
N = "DistillationLoss"
case(N, "beta", "range", lambda: fastalign.DistillationLoss(beta=1.5))
case(N, "divergence", "unknown", lambda: fastalign.DistillationLoss(divergence="kl"))
case(N, "reduction", "none", lambda: fastalign.DistillationLoss(reduction="none"))
case(N, "teacher_softcap", "zero", lambda: fastalign.DistillationLoss(teacher_softcap=0.0))


# --- DPO -----------------------------------------------------------------------------------------------

def _dpo_defaults():
    return dict(policy_chosen_logps=fl(B) - 5, policy_rejected_logps=fl(B) - 5,
                ref_chosen_logps=fl(B) - 5, ref_rejected_logps=fl(B) - 5)


dpo = api(fastalign.dpo_loss, _dpo_defaults,
          ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"))
N = "dpo_loss"
case(N, "policy_chosen_logps", "list", dpo(policy_chosen_logps=[-1.0, -2.0]), TypeError)
case(N, "policy_chosen_logps", "2-d", dpo(policy_chosen_logps=fl(B, 1)))
case(N, "policy_chosen_logps", "0-d", dpo(policy_chosen_logps=torch.tensor(-1.0)))
case(N, "policy_chosen_logps", "empty", dpo(policy_chosen_logps=fl(0)))
case(N, "policy_chosen_logps", "int", dpo(policy_chosen_logps=torch.zeros(B, dtype=torch.long)), TypeError)
case(N, "policy_chosen_logps", "bool", dpo(policy_chosen_logps=torch.zeros(B, dtype=torch.bool)), TypeError)
case(N, "policy_rejected_logps", "list", dpo(policy_rejected_logps=[-1.0, -2.0]), TypeError)
case(N, "policy_rejected_logps", "batch", dpo(policy_rejected_logps=fl(B + 1)))
case(N, "policy_rejected_logps", "int", dpo(policy_rejected_logps=torch.zeros(B, dtype=torch.long)), TypeError)
case(N, "policy_rejected_logps", "device", dpo(policy_rejected_logps=fl(B, device="meta")))
for ref in ("ref_chosen_logps", "ref_rejected_logps"):
    case(N, ref, "list", dpo(**{ref: [-1.0, -2.0]}), TypeError)
    case(N, ref, "batch", dpo(**{ref: fl(B + 1)}))
    case(N, ref, "int", dpo(**{ref: torch.zeros(B, dtype=torch.long)}), TypeError)
    case(N, ref, "device", dpo(**{ref: fl(B, device="meta")}))
case(N, "ref_rejected_logps", "alone", dpo(ref_rejected_logps=None))
case(N, "ref_chosen_logps", "alone", dpo(ref_chosen_logps=None))
case(N, "ref_chosen_logps", "missing", dpo(ref_chosen_logps=None, ref_rejected_logps=None))
case(N, "ref_chosen_logps", "with-reference_free", dpo(reference_free=True))
ipo = dict(loss_type="ipo", chosen_num_tokens=ones(B) * 3, rejected_num_tokens=ones(B) * 3)
for counts in ("chosen_num_tokens", "rejected_num_tokens"):
    case(N, counts, "missing-for-ipo", dpo(**{**ipo, counts: None}))
    case(N, counts, "batch", dpo(**{**ipo, counts: ones(B + 1)}))
    case(N, counts, "bool", dpo(**{**ipo, counts: torch.ones(B, dtype=torch.bool)}), TypeError)
    case(N, counts, "negative", dpo(**{**ipo, counts: -ones(B)}))
    case(N, counts, "nan", dpo(**{**ipo, counts: torch.tensor([1.0, NAN])}))
ld = dict(ld_alpha=0.5, chosen_tail_logps=fl(B), rejected_tail_logps=fl(B))
for tail in ("chosen_tail_logps", "rejected_tail_logps"):
    case(N, tail, "missing-for-ld_alpha", dpo(**{**ld, tail: None}))
    case(N, tail, "int", dpo(**{**ld, tail: torch.zeros(B, dtype=torch.long)}), TypeError)
for lssp in ("chosen_log_sum_sq_probs", "rejected_log_sum_sq_probs"):
    wpo = dict(use_weighting=True, chosen_num_tokens=ones(B), rejected_num_tokens=ones(B),
               chosen_log_sum_sq_probs=fl(B), rejected_log_sum_sq_probs=fl(B))
    case(N, lssp, "missing-for-use_weighting", dpo(**{**wpo, lssp: None}))
    case(N, lssp, "batch", dpo(**{**wpo, lssp: fl(B + 1)}))
for value, error in ((0.0, ValueError), (-0.1, ValueError), (NAN, ValueError), (INF, ValueError),
                     ("x", TypeError), (True, TypeError), (None, TypeError)):
    case(N, "beta", repr(value), dpo(beta=value), error)
for value, error in (("nope", ValueError), ([], ValueError), (["sigmoid", "nope"], ValueError),
                     (5, TypeError), (None, TypeError)):
    case(N, "loss_type", repr(value), dpo(loss_type=value), error)
for value, error in (([1.0, 2.0], ValueError), ([NAN], ValueError), (["a"], TypeError), (1.0, TypeError),
                     ("1", TypeError)):
    case(N, "loss_weights", repr(value), dpo(loss_weights=value), error)
for value, error, extra in ((-0.1, ValueError, {"loss_type": "robust"}), (1.0, ValueError, {"loss_type": "robust"}),
                            (NAN, ValueError, {"loss_type": "robust"}), ("x", TypeError, {"loss_type": "robust"}),
                            (0.1, ValueError, {}), (0.0, ValueError, {"loss_type": "exo_pair"}),
                            (0.5, ValueError, {"loss_type": "robust"})):
    case(N, "label_smoothing", f"{value!r}-{extra}", dpo(label_smoothing=value, **extra), error)
case(N, "f_divergence_type", "unknown", dpo(f_divergence_type="kl"))
case(N, "f_divergence_type", "with-nca_pair", dpo(f_divergence_type="forward_kl", loss_type="nca_pair"))
case(N, "f_alpha_divergence_coef", "nan", dpo(f_alpha_divergence_coef=NAN))
case(N, "f_alpha_divergence_coef", "str", dpo(f_alpha_divergence_coef="x"), TypeError)
case(N, "use_weighting", "str", dpo(use_weighting="yes"), TypeError)
case(N, "use_weighting", "with-aot", dpo(use_weighting=True, loss_type="aot"))
for value, error in ((1.5, ValueError), (-0.1, ValueError), (NAN, ValueError), ("x", TypeError)):
    case(N, "ld_alpha", repr(value), dpo(ld_alpha=value), error)
case(N, "discopop_tau", "0", dpo(discopop_tau=0.0, loss_type="discopop"))
case(N, "discopop_tau", "nan", dpo(discopop_tau=NAN, loss_type="discopop"))
case(N, "dpop_lambda", "negative", dpo(dpop_lambda=-1.0))
case(N, "dpop_lambda", "nan", dpo(dpop_lambda=NAN))
case(N, "dpop_lambda", "with-hinge", dpo(dpop_lambda=1.0, loss_type="hinge"))
case(N, "reference_free", "str", dpo(reference_free="yes"), TypeError)


def _paired_logits_defaults():
    return dict(logits=fl(2 * B, T, V), labels=ids(2 * B, T), completion_mask=ones(2 * B, T),
                ref_chosen_logps=fl(B) - 5, ref_rejected_logps=fl(B) - 5)


dpol = api(fastalign.dpo_loss_from_logits, _paired_logits_defaults, ("logits", "labels"))
N = "dpo_loss_from_logits"
case(N, "logits", "list", dpol(logits=[[[0.0] * V] * T] * 2 * B))
case(N, "logits", "2-d", dpol(logits=fl(2 * B, V)))
case(N, "logits", "odd-rows", dpol(logits=fl(2 * B + 1, T, V), labels=ids(2 * B + 1, T),
                                   completion_mask=ones(2 * B + 1, T)))
case(N, "logits", "no-rows", dpol(logits=fl(0, T, V), labels=ids(0, T), completion_mask=ones(0, T)))
case(N, "logits", "int", dpol(logits=torch.zeros(2 * B, T, V, dtype=torch.long)), TypeError)
case(N, "logits", "empty-vocab", dpol(logits=fl(2 * B, T, 0)))
case(N, "labels", "list", dpol(labels=[[0] * T] * 2 * B), TypeError)
case(N, "labels", "float", dpol(labels=fl(2 * B, T)), TypeError)
case(N, "labels", "shape", dpol(labels=ids(2 * B, T + 1), completion_mask=None))
case(N, "labels", "device", dpol(labels=ids(2 * B, T, device="meta")))
case(N, "labels", "too-large", dpol(labels=with_label(V, (2 * B, T))))
case(N, "completion_mask", "list", dpol(completion_mask=[[1] * T] * 2 * B), TypeError)
case(N, "completion_mask", "shape", dpol(completion_mask=ones(2 * B, T + 1)))
case(N, "completion_mask", "device", dpol(completion_mask=ones(2 * B, T, device="meta")))
case(N, "completion_mask", "complex", dpol(completion_mask=ones(2 * B, T, dtype=torch.complex64)), TypeError)
for ref in ("ref_chosen_logps", "ref_rejected_logps"):
    case(N, ref, "list", dpol(**{ref: [-1.0, -2.0]}), TypeError)
    case(N, ref, "batch", dpol(**{ref: fl(B + 1)}))
    case(N, ref, "2-d", dpol(**{ref: fl(B, 1)}))
    case(N, ref, "int", dpol(**{ref: torch.zeros(B, dtype=torch.long)}), TypeError)
    case(N, ref, "device", dpol(**{ref: fl(B, device="meta")}))
case(N, "ref_rejected_logps", "alone", dpol(ref_rejected_logps=None))
case(N, "ref_chosen_logps", "missing", dpol(ref_chosen_logps=None, ref_rejected_logps=None))
no_ref = dict(ref_chosen_logps=None, ref_rejected_logps=None)
case(N, "ref_logits", "list", dpol(ref_logits=[[0.0]], **no_ref), TypeError)
case(N, "ref_logits", "shape", dpol(ref_logits=fl(2 * B, T, V + 1), **no_ref))
case(N, "ref_logits", "int", dpol(ref_logits=torch.zeros(2 * B, T, V, dtype=torch.long), **no_ref), TypeError)
case(N, "ref_logits", "device", dpol(ref_logits=fl(2 * B, T, V, device="meta"), **no_ref))
case(N, "ref_logits", "with-ref-logps", dpol(ref_logits=fl(2 * B, T, V)))
case(N, "ignore_index", "float", dpol(ignore_index=-100.0), TypeError)
case(N, "ignore_index", "None", dpol(ignore_index=None), TypeError)
case(N, "beta", "0", dpol(beta=0.0))
case(N, "loss_type", "unknown", dpol(loss_type="nope"))


def hs_parts(**parts):
    """HiddenStates where the logits go: its parts are checked and named."""
    return HiddenStates(**{"hidden": fl(2 * B, T, H), "weight": fl(V, H), **parts})


N = "HiddenStates"
case(N, "hidden", "list", dpol(logits=HiddenStates([[0.0] * H], fl(V, H))), TypeError)
case(N, "hidden", "int", dpol(logits=hs_parts(hidden=torch.zeros(2 * B, T, H, dtype=torch.long))), TypeError)
case(N, "hidden", "2-d", dpol(logits=hs_parts(hidden=fl(2 * B, H))), ValueError, r"^(logits|hidden)\b")
case(N, "weight", "list", dpol(logits=hs_parts(weight=[[0.0] * H] * V)), TypeError)
case(N, "weight", "None", dpol(logits=hs_parts(weight=None)), TypeError)
case(N, "weight", "1-d", dpol(logits=hs_parts(weight=fl(V))))
case(N, "weight", "hidden-size", dpol(logits=hs_parts(weight=fl(V, H + 1))))
case(N, "weight", "dtype", dpol(logits=hs_parts(weight=fl(V, H, dtype=torch.float64))), TypeError)
case(N, "bias", "shape", dpol(logits=hs_parts(bias=fl(V + 1))))
case(N, "bias", "list", dpol(logits=hs_parts(bias=[0.0] * V)))
case(N, "weight", "ref_logits-str", dpol(ref_logits=hs_parts(weight="w"), **no_ref), TypeError)
case(N, "weight", "empty-vocab", dpol(logits=hs_parts(weight=fl(0, H))))

dpom = api(lambda options, **kw: fastalign.DPOLoss(**options)(**kw),
           lambda: dict(options={}, **_paired_logits_defaults()))
N = "DPOLoss"
case(N, "beta", "0", dpom(options=dict(beta=0.0)))
case(N, "loss_type", "unknown", dpom(options=dict(loss_type="nope")))
case(N, "ignore_index", "str", dpom(options=dict(ignore_index="x")), TypeError)
case(N, "ignore_index", "float", dpom(options=dict(ignore_index=-100.0)), TypeError)
case(N, "ignore_index", "at-construction", lambda: fastalign.DPOLoss(ignore_index=None), TypeError)
case(N, "logits", "missing", dpom(logits=None))
lm_head = dict(logits=None, hidden=fl(2 * B, T, H), weight=fl(V, H))
case(N, "logits", "with-hidden", dpom(hidden=fl(2 * B, T, H), weight=fl(V, H)))
case(N, "hidden", "without-weight", dpom(logits=None, hidden=fl(2 * B, T, H)))
case(N, "hidden", "weight-alone", dpom(logits=None, weight=fl(V, H)))
case(N, "hidden", "bias-alone", dpom(logits=None, bias=fl(V)))
case(N, "hidden", "list", dpom(**{**lm_head, "hidden": [[0.0] * H]}), TypeError)
case(N, "hidden", "int", dpom(**{**lm_head, "hidden": torch.zeros(2 * B, T, H, dtype=torch.long)}), TypeError)
case(N, "weight", "hidden-size", dpom(**{**lm_head, "weight": fl(V, H + 1)}))
case(N, "weight", "device", dpom(**{**lm_head, "weight": fl(V, H, device="meta")}))
case(N, "weight", "empty-vocab", dpom(**{**lm_head, "weight": fl(0, H)}))
case(N, "bias", "shape", dpom(**lm_head, bias=fl(V + 1)))
case(N, "labels", "shape", dpom(**lm_head, labels=ids(2 * B, T + 1), completion_mask=None))
case(N, "labels", "missing", dpom(**lm_head, labels=None), TypeError)
case(N, "logits", "odd-rows", dpom(**{**lm_head, "hidden": fl(2 * B + 1, T, H)}, labels=ids(2 * B + 1, T),
                                   completion_mask=None))


# --- CPO / SimPO, ORPO ---------------------------------------------------------------------------------

def _cpo_defaults():
    return dict(chosen_logps=fl(B) - 5, rejected_logps=fl(B) - 5, chosen_num_tokens=ones(B) * 3,
                rejected_num_tokens=ones(B) * 3)


cpo = api(fastalign.cpo_loss, _cpo_defaults,
          ("chosen_logps", "rejected_logps", "chosen_num_tokens", "rejected_num_tokens"))
N = "cpo_loss"
case(N, "chosen_logps", "list", cpo(chosen_logps=[-1.0, -2.0]), TypeError)
case(N, "chosen_logps", "2-d", cpo(chosen_logps=fl(B, 1)))
case(N, "chosen_logps", "empty", cpo(chosen_logps=fl(0)))
case(N, "chosen_logps", "int", cpo(chosen_logps=torch.zeros(B, dtype=torch.long)), TypeError)
case(N, "rejected_logps", "batch", cpo(rejected_logps=fl(B + 1)))
case(N, "rejected_logps", "int", cpo(rejected_logps=torch.zeros(B, dtype=torch.long)), TypeError)
case(N, "rejected_logps", "device", cpo(rejected_logps=fl(B, device="meta")))
for counts in ("chosen_num_tokens", "rejected_num_tokens"):
    case(N, counts, "list", cpo(**{counts: [1, 2]}), TypeError)
    case(N, counts, "batch", cpo(**{counts: ones(B + 1)}))
    case(N, counts, "bool", cpo(**{counts: torch.ones(B, dtype=torch.bool)}), TypeError)
    case(N, counts, "device", cpo(**{counts: ones(B, device="meta")}))
    case(N, counts, "negative", cpo(loss_type="simpo", **{counts: -ones(B)}))
case(N, "beta", "0", cpo(beta=0.0))
case(N, "beta", "nan", cpo(beta=NAN))
case(N, "beta", "str", cpo(beta="x"), TypeError)
case(N, "loss_type", "unknown", cpo(loss_type="dpo"))
case(N, "loss_type", "int", cpo(loss_type=5))
case(N, "label_smoothing", "above-1", cpo(label_smoothing=1.5))
case(N, "label_smoothing", "nan", cpo(label_smoothing=NAN))
case(N, "label_smoothing", "with-hinge", cpo(label_smoothing=0.1, loss_type="hinge"))
case(N, "cpo_alpha", "negative", cpo(cpo_alpha=-1.0))
case(N, "cpo_alpha", "nan", cpo(cpo_alpha=NAN))
case(N, "cpo_alpha", "with-alphapo", cpo(cpo_alpha=1.0, loss_type="alphapo"))
case(N, "simpo_gamma", "with-sigmoid", cpo(simpo_gamma=0.5))
case(N, "simpo_gamma", "nan", cpo(simpo_gamma=NAN, loss_type="simpo"))
case(N, "alpha", "nan", cpo(alpha=NAN))
case(N, "alpha", "str", cpo(alpha="x"), TypeError)

cpol = api(fastalign.cpo_loss_from_logits, lambda: dict(logits=fl(2 * B, T, V), labels=ids(2 * B, T)),
           ("logits", "labels"))
N = "cpo_loss_from_logits"
case(N, "logits", "list", cpol(logits=[[0.0] * V]))
case(N, "logits", "2-d", cpol(logits=fl(2 * B, V)))
case(N, "logits", "odd-rows", cpol(logits=fl(3, T, V), labels=ids(3, T)))
case(N, "logits", "no-rows", cpol(logits=fl(0, T, V), labels=ids(0, T)))
case(N, "logits", "int", cpol(logits=torch.zeros(2 * B, T, V, dtype=torch.long)), TypeError)
case(N, "labels", "shape", cpol(labels=ids(2 * B, T + 1)))
case(N, "labels", "float", cpol(labels=fl(2 * B, T)), TypeError)
case(N, "labels", "list", cpol(labels=[[0] * T] * 2 * B), TypeError)
case(N, "labels", "too-large", cpol(labels=with_label(V, (2 * B, T))))
case(N, "completion_mask", "list", cpol(completion_mask=[[1] * T] * 2 * B), TypeError)
case(N, "completion_mask", "shape", cpol(completion_mask=ones(2 * B, T + 1)))
case(N, "completion_mask", "device", cpol(completion_mask=ones(2 * B, T, device="meta")))
case(N, "completion_mask", "complex", cpol(completion_mask=ones(2 * B, T, dtype=torch.complex64)), TypeError)
case(N, "ignore_index", "float", cpol(ignore_index=-100.0), TypeError)
case(N, "beta", "0", cpol(beta=0.0))

cpom = api(lambda options, **kw: fastalign.CPOLoss(**options)(**kw),
           lambda: dict(options={}, logits=fl(2 * B, T, V), labels=ids(2 * B, T)))
N = "CPOLoss"
case(N, "beta", "negative", cpom(options=dict(beta=-1.0)))
case(N, "loss_type", "unknown", cpom(options=dict(loss_type="nope")))
case(N, "ignore_index", "str", cpom(options=dict(ignore_index="x")), TypeError)
case(N, "ignore_index", "at-construction", lambda: fastalign.CPOLoss(ignore_index=-100.0), TypeError)
case(N, "logits", "odd-rows", cpom(logits=fl(3, T, V), labels=ids(3, T)))
case(N, "completion_mask", "shape", cpom(completion_mask=ones(2 * B, T + 1)))


def _orpo_defaults():
    return dict(chosen_logps=fl(B) - 5, rejected_logps=fl(B) - 5, chosen_num_tokens=ones(B) * 3,
                rejected_num_tokens=ones(B) * 3, chosen_nll_logps=fl(B) - 9, chosen_nll_num_tokens=ones(B) * 5)


orpo = api(fastalign.orpo_loss, _orpo_defaults, tuple(_orpo_defaults()))
N = "orpo_loss"
case(N, "chosen_logps", "list", orpo(chosen_logps=[-1.0, -2.0]), TypeError)
case(N, "chosen_logps", "2-d", orpo(chosen_logps=fl(B, 2)))
case(N, "chosen_logps", "empty", orpo(chosen_logps=fl(0)))
for name in ("rejected_logps", "chosen_nll_logps"):
    case(N, name, "batch", orpo(**{name: fl(B + 1)}))
    case(N, name, "int", orpo(**{name: torch.zeros(B, dtype=torch.long)}), TypeError)
    case(N, name, "device", orpo(**{name: fl(B, device="meta")}))
for name in ("chosen_num_tokens", "rejected_num_tokens", "chosen_nll_num_tokens"):
    case(N, name, "batch", orpo(**{name: ones(B - 1)}))
    case(N, name, "bool", orpo(**{name: torch.ones(B, dtype=torch.bool)}), TypeError)
    case(N, name, "list", orpo(**{name: [1, 2]}), TypeError)
    case(N, name, "negative", orpo(**{name: -ones(B)}))
case(N, "beta", "0", orpo(beta=0.0))
case(N, "beta", "inf", orpo(beta=INF))
case(N, "beta", "None", orpo(beta=None), TypeError)

orpol = api(fastalign.orpo_loss_from_logits,
            lambda: dict(logits=fl(2 * B, T, V), labels=ids(2 * B, T), completion_mask=ones(2 * B, T)),
            ("logits", "labels"))
N = "orpo_loss_from_logits"
case(N, "logits", "list", orpol(logits=[[0.0] * V]))
case(N, "logits", "odd-rows", orpol(logits=fl(3, T, V), labels=ids(3, T), completion_mask=ones(3, T)))
case(N, "logits", "no-rows", orpol(logits=fl(0, T, V), labels=ids(0, T), completion_mask=ones(0, T)))
case(N, "logits", "int", orpol(logits=torch.zeros(2 * B, T, V, dtype=torch.long)), TypeError)
case(N, "labels", "shape", orpol(labels=ids(2 * B, T + 1)))
case(N, "labels", "float", orpol(labels=fl(2 * B, T)), TypeError)
case(N, "labels", "too-large", orpol(labels=with_label(V, (2 * B, T))))
case(N, "completion_mask", "missing", orpol(completion_mask=None), TypeError)
case(N, "completion_mask", "shape", orpol(completion_mask=ones(2 * B, T - 1)))
case(N, "completion_mask", "device", orpol(completion_mask=ones(2 * B, T, device="meta")))
case(N, "completion_mask", "complex", orpol(completion_mask=ones(2 * B, T, dtype=torch.complex64)), TypeError)
case(N, "attention_mask", "list", orpol(attention_mask=[[1] * T] * 2 * B), TypeError)
case(N, "attention_mask", "shape", orpol(attention_mask=ones(2 * B, T + 1)))
case(N, "attention_mask", "device", orpol(attention_mask=ones(2 * B, T, device="meta")))
case(N, "attention_mask", "complex", orpol(attention_mask=ones(2 * B, T, dtype=torch.complex64)), TypeError)
case(N, "ignore_index", "float", orpol(ignore_index=-100.0), TypeError)
case(N, "beta", "0", orpol(beta=0.0))

orpom = api(lambda options, **kw: fastalign.ORPOLoss(**options)(**kw),
            lambda: dict(options={}, logits=fl(2 * B, T, V), labels=ids(2 * B, T), completion_mask=ones(2 * B, T)))
N = "ORPOLoss"
case(N, "beta", "nan", orpom(options=dict(beta=NAN)))
case(N, "ignore_index", "str", orpom(options=dict(ignore_index="x")), TypeError)
case(N, "ignore_index", "at-construction", lambda: fastalign.ORPOLoss(ignore_index="x"), TypeError)
case(N, "logits", "2-d", orpom(logits=fl(2 * B, V)))
case(N, "completion_mask", "shape", orpom(completion_mask=ones(2 * B, T + 1)))


# --- KTO -----------------------------------------------------------------------------------------------

def _kto_defaults():
    return dict(policy_logps=fl(B) - 5, ref_logps=fl(B) - 5, desirable=torch.tensor([True, False]),
                kl_logps=fl(B) - 5, ref_kl_logps=fl(B) - 5)


kto = api(fastalign.kto_loss, _kto_defaults, ("policy_logps", "ref_logps", "desirable"))
N = "kto_loss"
case(N, "policy_logps", "list", kto(policy_logps=[-1.0, -2.0]), TypeError)
case(N, "policy_logps", "2-d", kto(policy_logps=fl(B, 1)))
case(N, "policy_logps", "empty", kto(policy_logps=fl(0)))
case(N, "policy_logps", "int", kto(policy_logps=torch.zeros(B, dtype=torch.long)), TypeError)
case(N, "ref_logps", "batch", kto(ref_logps=fl(B + 1)))
case(N, "ref_logps", "int", kto(ref_logps=torch.zeros(B, dtype=torch.long)), TypeError)
case(N, "ref_logps", "device", kto(ref_logps=fl(B, device="meta")))
case(N, "ref_logps", "list", kto(ref_logps=[-1.0, -2.0]), TypeError)
case(N, "desirable", "list", kto(desirable=[True, False]), TypeError)
case(N, "desirable", "float", kto(desirable=torch.tensor([1.0, 0.0])), TypeError)
case(N, "desirable", "batch", kto(desirable=torch.tensor([True, False, True])))
case(N, "desirable", "device", kto(desirable=torch.ones(B, dtype=torch.bool, device="meta")))
case(N, "desirable", "not-0-or-1", kto(desirable=torch.tensor([2, 0])))
case(N, "kl_logps", "missing", kto(kl_logps=None))
case(N, "kl_logps", "one-pair", kto(kl_logps=fl(1), ref_kl_logps=fl(1)))
case(N, "kl_logps", "2-d", kto(kl_logps=fl(B, 1)))
case(N, "kl_logps", "int", kto(kl_logps=torch.zeros(B, dtype=torch.long)), TypeError)
case(N, "kl_logps", "device", kto(kl_logps=fl(B, device="meta"), ref_kl_logps=fl(B, device="meta")))
case(N, "kl_logps", "with-apo_zero_unpaired", kto(loss_type="apo_zero_unpaired", ref_kl_logps=None))
case(N, "ref_kl_logps", "missing", kto(ref_kl_logps=None))
case(N, "ref_kl_logps", "batch", kto(ref_kl_logps=fl(B + 1)))
case(N, "ref_kl_logps", "list", kto(ref_kl_logps=[1.0, 2.0]), TypeError)
case(N, "ref_kl_logps", "device", kto(ref_kl_logps=fl(B, device="meta")))
case(N, "kl", "with-kl_logps", kto(kl=0.1))
no_kl = dict(kl_logps=None, ref_kl_logps=None)
case(N, "kl", "str", kto(kl="x", **no_kl), TypeError)
case(N, "kl", "nan", kto(kl=NAN, **no_kl))
case(N, "kl", "inf", kto(kl=INF, **no_kl))
case(N, "kl", "bool", kto(kl=True, **no_kl), TypeError)
case(N, "kl", "int-tensor", kto(kl=torch.tensor(1), **no_kl), (TypeError, ValueError))
case(N, "kl", "vector", kto(kl=torch.zeros(2), **no_kl))
case(N, "kl", "nan-tensor", kto(kl=torch.tensor(NAN), **no_kl))
case(N, "kl", "with-apo_zero_unpaired", kto(loss_type="apo_zero_unpaired", kl=0.1, **no_kl))
case(N, "beta", "0", kto(beta=0.0))
case(N, "beta", "str", kto(beta="x"), TypeError)
case(N, "loss_type", "unknown", kto(loss_type="kto_pair"))
case(N, "desirable_weight", "negative", kto(desirable_weight=-1.0))
case(N, "desirable_weight", "nan", kto(desirable_weight=NAN))
case(N, "undesirable_weight", "inf", kto(undesirable_weight=INF))
case(N, "undesirable_weight", "str", kto(undesirable_weight="x"), TypeError)
case(N, "desirable_weight", "both-zero", kto(desirable_weight=0.0, undesirable_weight=0.0))
case(N, "gather", "not-callable", kto(gather=5), TypeError)


def _kto_logits_defaults():
    return dict(logits=fl(B, T, V), labels=ids(B, T), ref_logps=fl(B) - 5, desirable=torch.tensor([True, False]),
                kl_logps=fl(B) - 5, ref_kl_logps=fl(B) - 5)


ktol = api(fastalign.kto_loss_from_logits, _kto_logits_defaults, ("logits", "labels", "ref_logps", "desirable"))
N = "kto_loss_from_logits"
case(N, "logits", "list", ktol(logits=[[0.0] * V]))
case(N, "logits", "2-d", ktol(logits=fl(B, V)))
case(N, "logits", "no-rows", ktol(logits=fl(0, T, V), labels=ids(0, T)))
case(N, "logits", "int", ktol(logits=torch.zeros(B, T, V, dtype=torch.long)), TypeError)
case(N, "labels", "shape", ktol(labels=ids(B, T + 1)))
case(N, "labels", "float", ktol(labels=fl(B, T)), TypeError)
case(N, "labels", "too-large", ktol(labels=with_label(V)))
case(N, "ref_logps", "batch", ktol(ref_logps=fl(B + 1)))
case(N, "ref_logps", "device", ktol(ref_logps=fl(B, device="meta")))
case(N, "desirable", "batch", ktol(desirable=torch.tensor([True])))
case(N, "desirable", "float", ktol(desirable=torch.tensor([1.0, 0.0])), TypeError)
case(N, "completion_mask", "shape", ktol(completion_mask=ones(B, T + 1)))
case(N, "completion_mask", "list", ktol(completion_mask=[[1] * T] * B), TypeError)
case(N, "completion_mask", "device", ktol(completion_mask=ones(B, T, device="meta")))
case(N, "completion_mask", "complex", ktol(completion_mask=ones(B, T, dtype=torch.complex64)), TypeError)
case(N, "ignore_index", "float", ktol(ignore_index=-100.0), TypeError)
case(N, "kl_logps", "missing", ktol(kl_logps=None))
case(N, "kl", "nan", ktol(kl=NAN, kl_logps=None, ref_kl_logps=None))
case(N, "beta", "0", ktol(beta=0.0))
case(N, "gather", "not-callable", ktol(gather="all"), TypeError)

ktom = api(lambda options, **kw: fastalign.KTOLoss(**options)(**kw), lambda: dict(options={}, **_kto_logits_defaults()))
N = "KTOLoss"
case(N, "beta", "0", ktom(options=dict(beta=0.0)))
case(N, "loss_type", "unknown", ktom(options=dict(loss_type="nope")))
case(N, "ignore_index", "str", ktom(options=dict(ignore_index="x")), TypeError)
case(N, "ignore_index", "at-construction", lambda: fastalign.KTOLoss(ignore_index=True), TypeError)
case(N, "desirable", "batch", ktom(desirable=torch.tensor([True, False, True])))


# --- reward --------------------------------------------------------------------------------------------

rl = api(fastalign.reward_loss, lambda: dict(rewards=fl(2 * B)), ("rewards",))
N = "reward_loss"
case(N, "rewards", "list", rl(rewards=[1.0, 2.0]), TypeError)
case(N, "rewards", "0-d", rl(rewards=torch.tensor(1.0)))
case(N, "rewards", "3-d", rl(rewards=fl(2 * B, 1, 1)))
case(N, "rewards", "two-columns", rl(rewards=fl(2 * B, 2)))
case(N, "rewards", "empty", rl(rewards=fl(0)))
case(N, "rewards", "odd", rl(rewards=fl(2 * B + 1)))
case(N, "rewards", "int", rl(rewards=torch.zeros(2 * B, dtype=torch.long)), TypeError)
case(N, "rewards", "bool", rl(rewards=torch.zeros(2 * B, dtype=torch.bool)), TypeError)
case(N, "margin", "batch", rl(margin=fl(2 * B)))
case(N, "margin", "int", rl(margin=torch.zeros(B, dtype=torch.long)), TypeError)
case(N, "margin", "device", rl(margin=fl(B, device="meta")))
case(N, "margin", "nan", rl(margin=NAN))
case(N, "margin", "str", rl(margin="x"), TypeError)
case(N, "margin", "bool", rl(margin=True), TypeError)
case(N, "center_rewards_coefficient", "negative", rl(center_rewards_coefficient=-0.1))
case(N, "center_rewards_coefficient", "nan", rl(center_rewards_coefficient=NAN))
case(N, "center_rewards_coefficient", "str", rl(center_rewards_coefficient="x"), TypeError)

bt = api(fastalign.bradley_terry_loss, lambda: dict(chosen_rewards=fl(B), rejected_rewards=fl(B)),
         ("chosen_rewards", "rejected_rewards"))
N = "bradley_terry_loss"
case(N, "chosen_rewards", "list", bt(chosen_rewards=[1.0, 2.0]), TypeError)
case(N, "chosen_rewards", "2-d", bt(chosen_rewards=fl(B, 1)))
case(N, "chosen_rewards", "empty", bt(chosen_rewards=fl(0), rejected_rewards=fl(0)))
case(N, "chosen_rewards", "int", bt(chosen_rewards=torch.zeros(B, dtype=torch.long)), TypeError)
case(N, "rejected_rewards", "batch", bt(rejected_rewards=fl(B + 1)))
case(N, "rejected_rewards", "int", bt(rejected_rewards=torch.zeros(B, dtype=torch.long)), TypeError)
case(N, "rejected_rewards", "device", bt(rejected_rewards=fl(B, device="meta")))
case(N, "rejected_rewards", "list", bt(rejected_rewards=[1.0, 2.0]), TypeError)
case(N, "margin", "batch", bt(margin=fl(B + 1)))
case(N, "margin", "inf", bt(margin=INF))
case(N, "center_rewards_coefficient", "inf", bt(center_rewards_coefficient=INF))

rm = api(lambda options, **kw: fastalign.RewardLoss(**options)(**kw), lambda: dict(options={}, rewards=fl(2 * B)))
N = "RewardLoss"
case(N, "center_rewards_coefficient", "negative", rm(options=dict(center_rewards_coefficient=-1.0)))
case(N, "center_rewards_coefficient", "bool", rm(options=dict(center_rewards_coefficient=True)), TypeError)
case(N, "rewards", "odd", rm(rewards=fl(3)))
case(N, "margin", "batch", rm(margin=fl(B + 1)))


# --- the conventions every preference loss shares: options, hidden states ---------------------------------

options_cases("dpo_loss", dpo, fastalign.dpo_options, fastalign.cpo_options)
options_cases("dpo_loss_from_logits", dpol, fastalign.dpo_options, fastalign.kto_options)
options_cases("cpo_loss", cpo, fastalign.cpo_options, fastalign.dpo_options)
options_cases("cpo_loss_from_logits", cpol, fastalign.cpo_options, fastalign.orpo_options)
options_cases("orpo_loss", orpo, fastalign.orpo_options, fastalign.cpo_options)
options_cases("orpo_loss_from_logits", orpol, fastalign.orpo_options, fastalign.dpo_options)
options_cases("kto_loss", kto, fastalign.kto_options, fastalign.dpo_options)
options_cases("kto_loss_from_logits", ktol, fastalign.kto_options, fastalign.reward_options)
options_cases("reward_loss", rl, fastalign.reward_options, fastalign.kto_options)
options_cases("bradley_terry_loss", bt, fastalign.reward_options, fastalign.rloo_options)
hidden_cases("dpo_loss_from_logits", dpol, 2 * B)
hidden_cases("cpo_loss_from_logits", cpol, 2 * B)
hidden_cases("CPOLoss", cpom, 2 * B)
hidden_cases("orpo_loss_from_logits", orpol, 2 * B)
hidden_cases("ORPOLoss", orpom, 2 * B)
hidden_cases("kto_loss_from_logits", ktol, B)
hidden_cases("KTOLoss", ktom, B)
for module in (fastalign.DPOLoss, fastalign.CPOLoss, fastalign.ORPOLoss, fastalign.KTOLoss, fastalign.RewardLoss,
               fastalign.RLOOLoss):
    case(module.__name__, "unknown_option", "typo", (lambda m: lambda: m(not_an_option=1.0))(module), TypeError,
         r"not_an_option")
option_builder_cases = [
    (fastalign.dpo_options, "beta", 0.0, ValueError), (fastalign.dpo_options, "loss_type", "nope", ValueError),
    (fastalign.dpo_options, "use_weighting", "yes", TypeError),
    (fastalign.cpo_options, "beta", -1.0, ValueError), (fastalign.cpo_options, "loss_type", "dpo", ValueError),
    (fastalign.cpo_options, "alpha", "x", TypeError),
    (fastalign.orpo_options, "beta", INF, ValueError), (fastalign.orpo_options, "beta", None, TypeError),
    (fastalign.kto_options, "beta", 0.0, ValueError), (fastalign.kto_options, "desirable_weight", -1.0, ValueError),
    (fastalign.kto_options, "undesirable_weight", "x", TypeError),
    (fastalign.reward_options, "center_rewards_coefficient", -0.1, ValueError),
    (fastalign.reward_options, "center_rewards_coefficient", "x", TypeError),
    (fastalign.rloo_options, "epsilon", 1.0, ValueError), (fastalign.rloo_options, "epsilon_high", 0.0, ValueError),
    (fastalign.rloo_options, "temperature", 0.0, ValueError), (fastalign.rloo_options, "softcap", "x", TypeError),
    (fastalign.rrhf_options, "rank_weight", -1.0, ValueError), (fastalign.rrhf_options, "sft_reduction", 3, ValueError),
    (fastalign.rrhf_options, "length_penalty", "x", TypeError),
]
for builder, name, value, error in option_builder_cases:
    case(builder.__name__, name, repr(value), (lambda b, kw: lambda: b(**kw))(builder, {name: value}), error)
for builder in (fastalign.dpo_options, fastalign.cpo_options, fastalign.orpo_options, fastalign.kto_options,
                fastalign.reward_options, fastalign.rloo_options, fastalign.rrhf_options):
    case(builder.__name__, "unknown_option", "typo", (lambda b: lambda: b(not_an_option=1.0))(builder), TypeError,
         r"not_an_option")


# --- policy losses: GRPO, PPO, RLOO --------------------------------------------------------------------

def _policy_defaults():
    return dict(logits=fl(B, T, V), labels=ids(B, T), completion_mask=ones(B, T), advantages=fl(B),
                old_logps=fl(B, T) - 3)


def _policy_level_cases(N: str, call, old_shape=(B, T)):
    """Input-level cases every policy loss shares (logits, hidden or logps; mask; advantages)."""
    logps_level = dict(logits=None, labels=None, logps=fl(B, T) - 3)
    hidden_level = dict(logits=None, hidden=fl(B, T, H), weight=fl(V, H))
    case(N, "logits", "list", call(logits=[[[0.0] * V] * T] * B), TypeError)
    case(N, "logits", "2-d", call(logits=fl(B * T, V), labels=ids(B * T)))
    case(N, "logits", "int", call(logits=torch.zeros(B, T, V, dtype=torch.long)), TypeError)
    case(N, "logits", "empty-vocab", call(logits=fl(B, T, 0)))
    case(N, "logits", "no-rows", call(logits=fl(0, T, V), labels=ids(0, T), completion_mask=ones(0, T),
                                      advantages=fl(0), old_logps=fl(0, *old_shape[1:])))
    case(N, "logits", "with-logps", call(logps=fl(B, T)), ValueError, r"^logits / hidden / logps\b")
    case(N, "logits", "none-given", call(logits=None, labels=None), ValueError, r"^logits / hidden / logps\b")
    case(N, "labels", "missing", call(labels=None))
    case(N, "labels", "list", call(labels=[[0] * T] * B), TypeError)
    case(N, "labels", "float", call(labels=fl(B, T)), TypeError)
    case(N, "labels", "shape", call(labels=ids(B, T + 1)))
    case(N, "labels", "device", call(labels=ids(B, T, device="meta")))
    case(N, "labels", "too-large", call(labels=with_label(V)))
    case(N, "labels", "ignore-index-counted", call(labels=with_label(-100)))
    case(N, "labels", "with-logps", call(**{**logps_level, "labels": ids(B, T)}))
    case(N, "temperature", "0", call(temperature=0.0))
    case(N, "softcap", "nan", call(softcap=NAN))
    case(N, "hidden", "list", call(**{**hidden_level, "hidden": [[0.0] * H]}))
    case(N, "hidden", "2-d", call(**{**hidden_level, "hidden": fl(B * T, H)}))
    case(N, "hidden", "int", call(**{**hidden_level, "hidden": torch.zeros(B, T, H, dtype=torch.long)}), TypeError)
    case(N, "hidden", "labels-missing", call(**hidden_level, labels=None), ValueError, r"^labels\b")
    case(N, "weight", "missing", call(**{**hidden_level, "weight": None}))
    case(N, "weight", "hidden-size", call(**{**hidden_level, "weight": fl(V, H + 1)}))
    case(N, "weight", "dtype", call(**{**hidden_level, "weight": fl(V, H, dtype=torch.float64)}), TypeError)
    case(N, "weight", "device", call(**{**hidden_level, "weight": fl(V, H, device="meta")}))
    case(N, "weight", "empty-vocab", call(**{**hidden_level, "weight": fl(0, H)}))
    case(N, "weight", "with-logits", call(weight=fl(V, H)), ValueError, r"^weight\b")
    case(N, "bias", "shape", call(**hidden_level, bias=fl(V + 1)))
    case(N, "bias", "with-logits", call(bias=fl(V)), ValueError, r"^weight / bias\b")
    case(N, "labels", "hidden-shape", call(**hidden_level, labels=ids(B, T + 1)))
    case(N, "labels", "hidden-too-large", call(**hidden_level, labels=with_label(V)))
    case(N, "logps", "list", call(**{**logps_level, "logps": [[0.0] * T] * B}), (TypeError, ValueError))
    case(N, "logps", "1-d", call(**{**logps_level, "logps": fl(B)}))
    case(N, "logps", "int", call(**{**logps_level, "logps": torch.zeros(B, T, dtype=torch.long)}),
         (TypeError, ValueError))
    case(N, "logps", "no-rows", call(**{**logps_level, "logps": fl(0, T)}, completion_mask=ones(0, T),
                                     advantages=fl(0), old_logps=fl(0, *old_shape[1:])))
    case(N, "entropies", "with-logits", call(entropies=fl(B, T)))
    case(N, "entropies", "shape", call(**logps_level, entropies=fl(B, T + 1)))
    case(N, "entropies", "int", call(**logps_level, entropies=torch.zeros(B, T, dtype=torch.long)), TypeError)
    case(N, "completion_mask", "missing", call(completion_mask=None), TypeError)
    case(N, "completion_mask", "list", call(completion_mask=[[1] * T] * B), TypeError)
    case(N, "completion_mask", "shape", call(completion_mask=ones(B, T - 1)))
    case(N, "completion_mask", "batch", call(completion_mask=ones(B + 1, T)))
    case(N, "completion_mask", "device", call(completion_mask=ones(B, T, device="meta")))
    case(N, "completion_mask", "complex", call(completion_mask=ones(B, T, dtype=torch.complex64)), TypeError)
    case(N, "advantages", "list", call(advantages=[1.0, 2.0]), TypeError)
    case(N, "advantages", "batch", call(advantages=fl(B + 1)))
    case(N, "advantages", "int", call(advantages=torch.ones(B, dtype=torch.long)), TypeError)
    case(N, "advantages", "device", call(advantages=fl(B, device="meta")))
    case(N, "old_logps", "list", call(old_logps=[[0.0] * T] * B), TypeError)
    case(N, "old_logps", "shape", call(old_logps=fl(B + 1, *old_shape[1:])))
    case(N, "old_logps", "int", call(old_logps=torch.zeros(*old_shape, dtype=torch.long)), TypeError)
    case(N, "old_logps", "device", call(old_logps=fl(*old_shape, device="meta")))


grpo = api(fastalign.grpo_loss, lambda: dict(**_policy_defaults(), num_items_in_batch=B * T))
N = "grpo_loss"
_policy_level_cases(N, grpo)
case(N, "advantages", "two-columns", grpo(advantages=fl(B, 2)))
case(N, "ref_logps", "missing", grpo(beta=0.04))
case(N, "ref_logps", "shape", grpo(beta=0.04, ref_logps=fl(B)))
case(N, "ref_logps", "int", grpo(beta=0.04, ref_logps=torch.zeros(B, T, dtype=torch.long)), TypeError)
case(N, "ref_logps", "device", grpo(beta=0.04, ref_logps=fl(B, T, device="meta")))
case(N, "importance_sampling_ratio", "shape", grpo(importance_sampling_ratio=fl(B, 2)))
case(N, "importance_sampling_ratio", "int", grpo(importance_sampling_ratio=torch.ones(B, T, dtype=torch.long)),
     TypeError)
case(N, "importance_sampling_ratio", "list", grpo(importance_sampling_ratio=[1.0, 1.0]), TypeError)
case(N, "sampling_logps", "without-threshold", grpo(sampling_logps=fl(B, T)))
case(N, "sampling_logps", "shape", grpo(off_policy_mask_threshold=0.5, sampling_logps=fl(B)))
for value, error in ((None, ValueError), ("x", TypeError), (-5.0, ValueError), (NAN, ValueError),
                     (INF, ValueError), (True, TypeError), (torch.tensor([1.0, 2.0]), ValueError),
                     (torch.tensor(-3.0), ValueError), (torch.tensor(1.0 + 0j), TypeError)):
    case(N, "num_items_in_batch", repr(value), grpo(num_items_in_batch=value), error)
verl = dict(convention="verl", loss_type="vanilla", dp_size=2)
for value, error in ((None, ValueError), (0, ValueError), (-4.0, ValueError), (NAN, ValueError), ("x", TypeError),
                     (torch.tensor(0.0), ValueError)):
    case(N, "batch_num_tokens", repr(value), grpo(**verl, batch_num_tokens=value), error)
    case(N, "global_batch_size", repr(value),
         grpo(**verl, loss_agg_mode="seq-mean-token-mean", global_batch_size=value), error)
case(N, "options", "dict", grpo(options={"loss_type": "dapo"}), TypeError)
case(N, "options", "ppo-options", grpo(options=fastalign.ppo_options()), TypeError)
case(N, "options", "with-keywords", grpo(options=fastalign.grpo_options(), beta=0.1))
case(N, "gather", "not-callable", grpo(gather=5), TypeError)
case(N, "num_items_in_batch", "missing-for-vespo", grpo(loss_type="vespo", num_items_in_batch=None))
case(N, "unknown_option", "typo", grpo(epsilon_hi=0.3), TypeError, r"epsilon_hi")

go = api(fastalign.grpo_options, dict)
N = "grpo_options"
option_cases = [
    ("loss_type", "nope", ValueError), ("loss_type", None, ValueError), ("loss_type", "vanilla", ValueError),
    ("convention", "openrlhf", ValueError),
    ("epsilon", 0.0, ValueError), ("epsilon", 1.0, ValueError), ("epsilon", NAN, ValueError),
    ("epsilon", "x", TypeError), ("epsilon", True, TypeError), ("epsilon", None, TypeError),
    ("epsilon_low", -0.1, ValueError), ("epsilon_high", 1.5, ValueError), ("epsilon_high", NAN, ValueError),
    ("delta", 0.0, ValueError), ("delta", NAN, ValueError), ("delta", "x", TypeError),
    ("beta", -0.1, ValueError), ("beta", NAN, ValueError), ("beta", INF, ValueError), ("beta", "x", TypeError),
    ("kl_estimator", "k4", ValueError), ("kl_estimator", 5, ValueError),
    ("use_bias_correction_kl", "yes", TypeError), ("use_bias_correction_kl", None, TypeError),
    ("importance_sampling_level", "group", ValueError),
    ("sapo_temperature_pos", 0.0, ValueError), ("sapo_temperature_neg", NAN, ValueError),
    ("vespo_k_pos", -1.0, ValueError), ("vespo_k_pos", True, TypeError), ("vespo_lambda_pos", NAN, ValueError),
    ("vespo_k_neg", INF, ValueError), ("vespo_lambda_neg", "x", TypeError),
    ("top_entropy_quantile", 0.0, ValueError), ("top_entropy_quantile", 1.5, ValueError),
    ("top_entropy_quantile", NAN, ValueError), ("top_entropy_quantile", "x", TypeError),
    ("top_entropy_quantile", True, TypeError),
    ("entropy_coef", -1.0, ValueError), ("entropy_coef", NAN, ValueError),
    ("off_policy_mask_threshold", 0.0, ValueError), ("off_policy_mask_threshold", NAN, ValueError),
    ("gradient_accumulation_steps", 0, ValueError), ("gradient_accumulation_steps", 1.5, ValueError),
    ("gradient_accumulation_steps", True, ValueError), ("num_processes", 0, ValueError),
    ("steps_per_generation", 0, ValueError), ("steps_per_generation", "2", ValueError),
    ("max_completion_length", 0, ValueError), ("max_completion_length", 1.5, ValueError),
    ("loss_agg_mode", "mean", ValueError), ("dp_size", 0, ValueError), ("dp_size", 2.0, ValueError),
    ("loss_scale_factor", 0.0, ValueError), ("loss_scale_factor", NAN, ValueError),
    ("clip_ratio_c", 1.0, ValueError), ("clip_ratio_c", NAN, ValueError), ("clip_ratio_c", "x", TypeError),
    ("clip_ratio_c", True, TypeError),
    ("temperature", 0.0, ValueError), ("temperature", "x", TypeError), ("logit_scale", INF, ValueError),
    ("softcap", -1.0, ValueError),
]
for name, value, error in option_cases:
    case(N, name, repr(value), go(**{name: value}), error)
    case("GRPOLoss", name, repr(value), (lambda kw: lambda: fastalign.GRPOLoss(**kw))({name: value}), error)
combos = [
    ("max_completion_length", dict(loss_type="dr_grpo")),
    ("loss_type", dict(convention="verl", loss_type="vespo")),
    ("epsilon_high", dict(loss_type="cispo", epsilon_high=-1.0)),
    ("epsilon", dict(convention="verl", loss_type="cispo", epsilon=0.0)),
    ("delta", dict(convention="verl", loss_type="vanilla", delta=2.0)),
    ("importance_sampling_level", dict(loss_type="cispo", importance_sampling_level="sequence")),
    ("importance_sampling_level", dict(convention="verl", loss_type="vanilla", importance_sampling_level="sequence")),
    ("top_entropy_quantile", dict(convention="verl", loss_type="vanilla", top_entropy_quantile=0.5)),
    ("off_policy_mask_threshold", dict(convention="verl", loss_type="vanilla", off_policy_mask_threshold=0.5)),
    ("kl_estimator", dict(kl_estimator="k3+x")),
    ("kl_estimator", dict(kl_estimator="mse")),  # a verl alias, not a TRL name
]
for name, kw in combos:
    case(N, name, f"combo-{sorted(kw.items())}", go(**kw))

ppo = api(fastalign.ppo_loss, _policy_defaults)
N = "ppo_loss"
_policy_level_cases(N, ppo)
case(N, "ref_logps", "missing", ppo(kl_coef=0.1))
case(N, "ref_logps", "shape", ppo(kl_coef=0.1, ref_logps=fl(B, T + 1)))
case(N, "ref_logps", "int", ppo(kl_coef=0.1, ref_logps=torch.zeros(B, T, dtype=torch.long)), TypeError)
case(N, "entropies", "missing-for-entropy_coef", ppo(entropy_coef=0.01, logits=None, labels=None, logps=fl(B, T)))
value_inputs = dict(vpreds=fl(B, T), values=fl(B, T), returns=fl(B, T))
for name in ("vpreds", "values", "returns"):
    case(N, name, "missing", ppo(**{**value_inputs, name: None}), ValueError, rf"\b{name}\b.*together")
    case(N, name, "shape", ppo(**{**value_inputs, name: fl(B)}))
    case(N, name, "int", ppo(**{**value_inputs, name: torch.zeros(B, T, dtype=torch.long)}), TypeError)
    case(N, name, "list", ppo(**{**value_inputs, name: [[0.0] * T] * B}), TypeError)
    case(N, name, "device", ppo(**{**value_inputs, name: fl(B, T, device="meta")}))
case(N, "value_mask", "shape", ppo(**value_inputs, value_mask=ones(B, T + 1)))
case(N, "value_mask", "list", ppo(**value_inputs, value_mask=[[1] * T] * B), TypeError)
case(N, "value_mask", "complex", ppo(**value_inputs, value_mask=ones(B, T, dtype=torch.complex64)), TypeError)
case(N, "value_mask", "without-value-loss", ppo(value_mask=ones(B, T)))
case(N, "importance_sampling_ratio", "shape", ppo(importance_sampling_ratio=fl(B, 2)))
case(N, "importance_sampling_ratio", "int", ppo(importance_sampling_ratio=torch.ones(B, T, dtype=torch.long)), TypeError)
for value, error in ((None, ValueError), (0, ValueError), (-4.0, ValueError), ("x", TypeError)):
    case(N, "batch_num_tokens", repr(value), ppo(dp_size=2, batch_num_tokens=value), error)
    case(N, "global_batch_size", repr(value),
         ppo(dp_size=2, loss_agg_mode="seq-mean-token-sum", global_batch_size=value), error)
case(N, "options", "dict", ppo(options={}), TypeError)
case(N, "options", "grpo-options", ppo(options=fastalign.grpo_options()), TypeError)
case(N, "options", "with-keywords", ppo(options=fastalign.ppo_options(), kl_coef=0.1))

po = api(fastalign.ppo_options, dict)
N = "ppo_options"
ppo_option_cases = [
    ("convention", "trl2", ValueError), ("epsilon", 0.0, ValueError), ("epsilon", "x", TypeError),
    ("epsilon_low", 1.0, ValueError), ("epsilon_high", NAN, ValueError),
    ("dual_clip", 1.0, ValueError), ("dual_clip", NAN, ValueError), ("dual_clip", "x", TypeError),
    ("dual_clip", True, TypeError),
    ("kl_coef", -1.0, ValueError), ("kl_coef", NAN, ValueError), ("kl_estimator", "full", ValueError),
    ("entropy_coef", INF, ValueError), ("vf_coef", -0.1, ValueError), ("vf_coef", "x", TypeError),
    ("value_clip", 0.0, ValueError), ("value_clip", NAN, ValueError), ("loss_agg_mode", "sum", ValueError),
    ("dp_size", 0, ValueError), ("loss_scale_factor", -1.0, ValueError), ("temperature", NAN, ValueError),
    ("logit_scale", "x", TypeError), ("softcap", 0.0, ValueError),
]
for name, value, error in ppo_option_cases:
    case(N, name, repr(value), po(**{name: value}), error)
    case("PPOLoss", name, repr(value), (lambda kw: lambda: fastalign.PPOLoss(**kw))({name: value}), error)
case(N, "dual_clip", "with-trl", po(convention="trl", dual_clip=3.0))
case(N, "kl_estimator", "verl-alias-with-trl", po(convention="trl", kl_estimator="mse"))


def _rloo_defaults():
    return dict(logits=fl(B, T, V), labels=ids(B, T), completion_mask=ones(B, T), advantages=fl(B),
                old_logps=fl(B) - 8)


rloo = api(fastalign.rloo_loss, _rloo_defaults)
N = "rloo_loss"
_policy_level_cases(N, rloo, old_shape=(B,))
case(N, "advantages", "per-token", rloo(advantages=fl(B, T)))
case(N, "old_logps", "per-token", rloo(old_logps=fl(B, T)))
for value, error in ((0.0, ValueError), (1.0, ValueError), (NAN, ValueError), ("x", TypeError), (None, TypeError)):
    case(N, "epsilon", repr(value), rloo(epsilon=value), error)
for value, error in ((0.0, ValueError), (-1.0, ValueError), (NAN, ValueError), (INF, ValueError), ("x", TypeError)):
    case(N, "epsilon_high", repr(value), rloo(epsilon_high=value), error)
case(N, "logit_scale", "nan", rloo(logit_scale=NAN))
case(N, "gather", "not-callable", rloo(gather=[]), TypeError)
options_cases(N, rloo, fastalign.rloo_options, fastalign.grpo_options)

rlm = api(lambda options, **kw: fastalign.RLOOLoss(**options)(**kw), lambda: dict(options={}, **_rloo_defaults()))
N = "RLOOLoss"
case(N, "epsilon", "1", rlm(options=dict(epsilon=1.0)))
case(N, "epsilon_high", "0", rlm(options=dict(epsilon_high=0.0)))
case(N, "temperature", "negative", rlm(options=dict(temperature=-1.0)))
case(N, "softcap", "str", rlm(options=dict(softcap="x")), TypeError)
case(N, "advantages", "batch", rlm(advantages=fl(B + 1)))

vis = api(fastalign.vllm_importance_sampling_ratio,
          lambda: dict(old_logps=fl(B, T), sampling_logps=fl(B, T), completion_mask=ones(B, T)),
          ("old_logps", "sampling_logps", "completion_mask"))
N = "vllm_importance_sampling_ratio"
case(N, "old_logps", "list", vis(old_logps=[[0.0] * T] * B), TypeError)
case(N, "old_logps", "1-d", vis(old_logps=fl(B), sampling_logps=fl(B), completion_mask=ones(B)))
case(N, "old_logps", "3-d", vis(old_logps=fl(B, T, 1), sampling_logps=fl(B, T, 1), completion_mask=ones(B, T, 1)))
case(N, "old_logps", "int", vis(old_logps=torch.zeros(B, T, dtype=torch.long)), TypeError)
case(N, "sampling_logps", "shape", vis(sampling_logps=fl(B, T + 1)))
case(N, "sampling_logps", "int", vis(sampling_logps=torch.zeros(B, T, dtype=torch.long)), TypeError)
case(N, "sampling_logps", "device", vis(sampling_logps=fl(B, T, device="meta")))
case(N, "sampling_logps", "list", vis(sampling_logps=[[0.0] * T] * B), TypeError)
case(N, "completion_mask", "shape", vis(completion_mask=ones(B + 1, T)))
case(N, "completion_mask", "list", vis(completion_mask=[[1] * T] * B), TypeError)
case(N, "completion_mask", "complex", vis(completion_mask=ones(B, T, dtype=torch.complex64)), TypeError)
case(N, "mode", "unknown", vis(mode="token_clip"))
case(N, "mode", "None", vis(mode=None))
for name in ("clip_min", "clip_max"):
    case(N, name, "nan", vis(**{name: NAN}))
    case(N, name, "str", vis(**{name: "x"}), TypeError)
    case(N, name, "negative", vis(**{name: -1.0}))
case(N, "clip_min", "above-clip_max", vis(clip_min=4.0, clip_max=2.0))


# --- advantages ----------------------------------------------------------------------------------------

gae = api(fastalign.gae, lambda: dict(rewards=fl(B, T), values=fl(B, T), mask=ones(B, T), gamma=1.0, lam=0.95),
          ("rewards", "values", "mask", "gamma", "lam"))
N = "gae"
case(N, "rewards", "list", gae(rewards=[[0.0] * T] * B), TypeError)
case(N, "rewards", "1-d", gae(rewards=fl(T), values=fl(T), mask=None))
case(N, "rewards", "3-d", gae(rewards=fl(B, T, 1), values=fl(B, T, 1), mask=None))
case(N, "rewards", "int", gae(rewards=torch.zeros(B, T, dtype=torch.long)), TypeError)
case(N, "rewards", "bool", gae(rewards=torch.zeros(B, T, dtype=torch.bool)), TypeError)
case(N, "values", "shape", gae(values=fl(B, T + 1)))
case(N, "values", "int", gae(values=torch.zeros(B, T, dtype=torch.long)), TypeError)
case(N, "values", "device", gae(values=fl(B, T, device="meta")))
case(N, "values", "list", gae(values=[[0.0] * T] * B), TypeError)
case(N, "mask", "shape", gae(mask=ones(B, T - 1)))
case(N, "mask", "list", gae(mask=[[1] * T] * B), TypeError)
case(N, "mask", "device", gae(mask=ones(B, T, device="meta")))
case(N, "mask", "complex", gae(mask=ones(B, T, dtype=torch.complex64)), TypeError)
case(N, "mask", "one-valid-token", gae(mask=torch.tensor([[1.0, 0, 0], [0, 0, 0]])))
for name in ("gamma", "lam"):
    for value, error in ((-0.1, ValueError), (1.5, ValueError), (NAN, ValueError), ("x", TypeError),
                         (True, TypeError), (None, TypeError)):
        case(N, name, repr(value), gae(**{name: value}), error)
case(N, "convention", "unknown", gae(convention="openrlhf"))
for name in ("whiten", "shift_mean", "unbiased"):
    case(N, name, "str", gae(**{name: "yes"}), TypeError)

ga = api(fastalign.group_advantages, lambda: dict(rewards=fl(2 * B), group_size=2), ("rewards",))
N = "group_advantages"
case(N, "rewards", "list", ga(rewards=[1.0, 2.0]), TypeError)
case(N, "rewards", "0-d", ga(rewards=torch.tensor(1.0)))
case(N, "rewards", "3-d", ga(rewards=fl(2 * B, 1, 1)))
case(N, "rewards", "empty", ga(rewards=fl(0)))
case(N, "rewards", "bool", ga(rewards=torch.ones(2 * B, dtype=torch.bool)), TypeError)
case(N, "rewards", "complex", ga(rewards=fl(2 * B, dtype=torch.complex64)), TypeError)
case(N, "group_size", "0", ga(group_size=0))
case(N, "group_size", "float", ga(group_size=2.0), TypeError)
case(N, "group_size", "bool", ga(group_size=True), TypeError)
case(N, "group_size", "not-dividing", ga(group_size=3))
case(N, "group_size", "neither", ga(group_size=None), ValueError, r"^group_size, group_index\b")
case(N, "group_size", "both", ga(group_index=torch.tensor([0, 0, 1, 1])), ValueError, r"^group_size, group_index\b")
by_id = dict(group_size=None)
case(N, "group_index", "list", ga(**by_id, group_index=[0, 0, 1, 1]), TypeError)
case(N, "group_index", "float", ga(**by_id, group_index=torch.tensor([0.0, 0, 1, 1])), TypeError)
case(N, "group_index", "batch", ga(**by_id, group_index=torch.tensor([0, 0, 1])))
case(N, "group_index", "device", ga(**by_id, group_index=torch.zeros(2 * B, dtype=torch.long, device="meta")))
case(N, "estimator", "unknown", ga(estimator="ppo"))
case(N, "scale", "unknown", ga(scale="global"))
case(N, "scale", "with-dr_grpo", ga(estimator="dr_grpo", scale="group"))
for value, error in ((-1e-4, ValueError), (NAN, ValueError), (INF, ValueError), ("x", TypeError), (True, TypeError)):
    case(N, "eps", repr(value), ga(eps=value), error)
case(N, "convention", "unknown", ga(convention="openrlhf"))
case(N, "reward_weights", "list", ga(rewards=fl(2 * B, 2), reward_weights=[1.0, 1.0]), TypeError)
case(N, "reward_weights", "shape", ga(rewards=fl(2 * B, 2), reward_weights=ones(3)))
case(N, "reward_weights", "bool", ga(rewards=fl(2 * B, 2), reward_weights=torch.ones(2, dtype=torch.bool)), TypeError)
case(N, "reward_weights", "device", ga(rewards=fl(2 * B, 2), reward_weights=ones(2, device="meta")))
case(N, "reward_weights", "nan", ga(rewards=fl(2 * B, 2), reward_weights=torch.tensor([1.0, NAN])))
case(N, "aggregation", "unknown", ga(aggregation="mean"))
case(N, "aggregation", "with-rloo", ga(aggregation="normalize_then_sum", estimator="rloo"))
case(N, "normalize_advantages", "with-grpo", ga(normalize_advantages=True))
case(N, "normalize_advantages", "str", ga(estimator="rloo", normalize_advantages="yes"), TypeError)
case(N, "response_mask", "list", ga(response_mask=[[1] * T] * 2 * B), TypeError)
case(N, "response_mask", "rows", ga(response_mask=ones(2 * B + 1, T)))
case(N, "response_mask", "1-d", ga(response_mask=ones(2 * B)))
case(N, "response_mask", "device", ga(response_mask=ones(2 * B, T, device="meta")))
case(N, "response_mask", "complex", ga(response_mask=ones(2 * B, T, dtype=torch.complex64)), TypeError)
case(N, "response_mask", "missing-for-reinforce++", ga(estimator="reinforce++-baseline"))
case(N, "response_mask", "one-token-for-reinforce++",
     ga(estimator="reinforce++-baseline", response_mask=torch.tensor([[1.0], [0], [0], [0]])))

rpp = api(fastalign.reinforce_plus_plus_advantages,
          lambda: dict(token_level_rewards=fl(B, T), response_mask=ones(B, T)),
          ("token_level_rewards", "response_mask"))
N = "reinforce_plus_plus_advantages"
case(N, "token_level_rewards", "list", rpp(token_level_rewards=[[0.0] * T] * B), TypeError)
case(N, "token_level_rewards", "1-d", rpp(token_level_rewards=fl(B)))
case(N, "token_level_rewards", "bool", rpp(token_level_rewards=torch.zeros(B, T, dtype=torch.bool)), TypeError)
case(N, "response_mask", "list", rpp(response_mask=[[1] * T] * B), TypeError)
case(N, "response_mask", "shape", rpp(response_mask=ones(B, T + 1)))
case(N, "response_mask", "rows", rpp(response_mask=ones(B + 1, T)))
case(N, "response_mask", "device", rpp(response_mask=ones(B, T, device="meta")))
case(N, "response_mask", "complex", rpp(response_mask=ones(B, T, dtype=torch.complex64)), TypeError)
case(N, "response_mask", "one-token", rpp(response_mask=torch.tensor([[1.0, 0, 0], [0, 0, 0]])))
for value, error in ((1.5, ValueError), (-0.1, ValueError), (NAN, ValueError), ("x", TypeError), (True, TypeError)):
    case(N, "gamma", repr(value), rpp(gamma=value), error)


rmx = api(fastalign.remax_advantages, lambda: dict(rewards=fl(2 * B), reward_baselines=fl(2 * B)),
          ("rewards", "reward_baselines"))
N = "remax_advantages"
case(N, "rewards", "list", rmx(rewards=[0.0] * 2 * B), TypeError)
case(N, "rewards", "3-d", rmx(rewards=fl(2 * B, T, 2)))
case(N, "rewards", "empty", rmx(rewards=fl(0), reward_baselines=fl(0)))
case(N, "rewards", "bool", rmx(rewards=torch.zeros(2 * B, dtype=torch.bool)), TypeError)
case(N, "reward_baselines", "list", rmx(reward_baselines=[0.0] * 2 * B), TypeError)
case(N, "reward_baselines", "rows", rmx(reward_baselines=fl(2 * B + 1)))
case(N, "reward_baselines", "2-d", rmx(reward_baselines=fl(2 * B, 1)))
case(N, "reward_baselines", "device", rmx(reward_baselines=fl(2 * B, device="meta")))
case(N, "response_mask", "missing-for-token-rewards", rmx(rewards=fl(2 * B, T)))
case(N, "response_mask", "shape", rmx(rewards=fl(2 * B, T), response_mask=ones(2 * B, T + 1)))
case(N, "response_mask", "rows", rmx(response_mask=ones(2 * B + 1, T)))
case(N, "response_mask", "device", rmx(response_mask=ones(2 * B, T, device="meta")))
case(N, "group_size", "not-dividing", rmx(reward_baselines=fl(B), group_size=3))
case(N, "group_size", "float", rmx(reward_baselines=fl(B), group_size=2.0), TypeError)
case(N, "group_index", "out-of-range", rmx(reward_baselines=fl(B), group_index=torch.tensor([0, 1, 2, 0])))
case(N, "group_index", "float", rmx(reward_baselines=fl(B), group_index=fl(2 * B)), TypeError)
case(N, "group_index", "rows", rmx(reward_baselines=fl(B), group_index=torch.zeros(3, dtype=torch.long)))
case(N, "group_size", "with-group-index", rmx(reward_baselines=fl(B), group_size=2,
                                              group_index=torch.zeros(2 * B, dtype=torch.long)),
     pattern=r"^group_size, group_index")


# --- RRHF ----------------------------------------------------------------------------------------------

rrhf = api(fastalign.rrhf_loss, lambda: dict(logps=fl(2 * B) - 5, num_tokens=ones(2 * B) * 3, rewards=fl(2 * B),
                                             group_size=2), ("logps", "num_tokens", "rewards"))
N = "rrhf_loss"
case(N, "logps", "list", rrhf(logps=[-1.0] * 2 * B), TypeError)
case(N, "logps", "2-d", rrhf(logps=fl(2 * B, 1)))
case(N, "logps", "empty", rrhf(logps=fl(0), num_tokens=ones(0), rewards=fl(0)))
case(N, "logps", "int", rrhf(logps=torch.zeros(2 * B, dtype=torch.long)), TypeError)
case(N, "num_tokens", "negative", rrhf(num_tokens=-ones(2 * B)))
case(N, "num_tokens", "rows", rrhf(num_tokens=ones(2 * B + 1)))
case(N, "num_tokens", "device", rrhf(num_tokens=ones(2 * B, device="meta")))
case(N, "rewards", "list", rrhf(rewards=[0.0] * 2 * B), TypeError)
case(N, "rewards", "rows", rrhf(rewards=fl(2 * B + 1)))
case(N, "rewards", "nan", rrhf(rewards=torch.tensor([0.0, NAN, 1.0, 2.0])))
case(N, "rewards", "inf", rrhf(rewards=torch.tensor([0.0, INF, 1.0, 2.0])))
case(N, "rewards", "bool", rrhf(rewards=torch.zeros(2 * B, dtype=torch.bool)), TypeError)
case(N, "rewards", "device", rrhf(rewards=fl(2 * B, device="meta")))
case(N, "group_size", "not-dividing", rrhf(group_size=3))
case(N, "group_size", "0", rrhf(group_size=0))
case(N, "group_size", "str", rrhf(group_size="2"), TypeError)
case(N, "group_size", "neither", rrhf(group_size=None), pattern=r"^group_size, group_index")
case(N, "group_index", "float", rrhf(group_size=None, group_index=fl(2 * B)), TypeError)
case(N, "group_index", "rows", rrhf(group_size=None, group_index=torch.zeros(3, dtype=torch.long)))
case(N, "group_index", "device", rrhf(group_size=None, group_index=torch.zeros(2 * B, dtype=torch.long,
                                                                               device="meta")))
case(N, "rank_weight", "negative", rrhf(rank_weight=-1.0))
case(N, "rank_weight", "str", rrhf(rank_weight="1"), TypeError)
case(N, "sft_weight", "nan", rrhf(sft_weight=NAN))
case(N, "length_penalty", "negative", rrhf(length_penalty=-1.0))
case(N, "sft_reduction", "unknown", rrhf(sft_reduction="token"))
case(N, "rank_weight", "both-zero", rrhf(rank_weight=0.0, sft_weight=0.0), pattern=r"^rank_weight, sft_weight")
options_cases(N, rrhf, fastalign.rrhf_options, fastalign.cpo_options)

rrhfl = api(fastalign.rrhf_loss_from_logits,
            lambda: dict(logits=fl(2 * B, T, V), labels=ids(2 * B, T), rewards=fl(2 * B), group_size=2),
            ("logits", "labels", "rewards"))
N = "rrhf_loss_from_logits"
case(N, "logits", "list", rrhfl(logits=[[0.0] * V]))
case(N, "logits", "2-d", rrhfl(logits=fl(2 * B, V)))
case(N, "logits", "no-rows", rrhfl(logits=fl(0, T, V), labels=ids(0, T), rewards=fl(0)))
case(N, "logits", "int", rrhfl(logits=torch.zeros(2 * B, T, V, dtype=torch.long)), TypeError)
case(N, "labels", "shape", rrhfl(labels=ids(2 * B, T + 1)))
case(N, "labels", "float", rrhfl(labels=fl(2 * B, T)), TypeError)
case(N, "labels", "too-large", rrhfl(labels=with_label(V, (2 * B, T))))
case(N, "rewards", "rows", rrhfl(rewards=fl(2 * B + 1)))
case(N, "rewards", "missing", rrhfl(rewards=None), TypeError)
case(N, "completion_mask", "shape", rrhfl(completion_mask=ones(2 * B, T + 1)))
case(N, "completion_mask", "device", rrhfl(completion_mask=ones(2 * B, T, device="meta")))
case(N, "ignore_index", "float", rrhfl(ignore_index=-100.0), TypeError)
case(N, "group_size", "not-dividing", rrhfl(group_size=3))
options_cases(N, rrhfl, fastalign.rrhf_options, fastalign.orpo_options)
hidden_cases(N, rrhfl, 2 * B)

rrhfm = api(lambda options, **kw: fastalign.RRHFLoss(**options)(**kw),
            lambda: dict(options={}, logits=fl(2 * B, T, V), labels=ids(2 * B, T), rewards=fl(2 * B), group_size=2))
N = "RRHFLoss"
case(N, "rank_weight", "negative", rrhfm(options=dict(rank_weight=-1.0)))
case(N, "ignore_index", "str", rrhfm(options=dict(ignore_index="x")), TypeError)
case(N, "rewards", "rows", rrhfm(rewards=fl(3)))
case(N, "group_index", "rows", rrhfm(group_size=None, group_index=torch.zeros(3, dtype=torch.long)))
hidden_cases(N, rrhfm, 2 * B)


# --- reward-model ensembles ----------------------------------------------------------------------------

er = api(fastalign.ensemble_rewards, lambda: dict(scores=fl(3, B)), ("scores",))
N = "ensemble_rewards"
case(N, "scores", "list-of-floats", er(scores=[[1.0, 2.0]]), TypeError)
case(N, "scores", "str", er(scores="x"), TypeError)
case(N, "scores", "empty-list", er(scores=[]))
case(N, "scores", "1-d", er(scores=fl(B)))
case(N, "scores", "3-d", er(scores=fl(3, B, 1)))
case(N, "scores", "no-model", er(scores=fl(0, B)))
case(N, "scores", "empty", er(scores=fl(3, 0)))
case(N, "scores", "int", er(scores=torch.zeros(3, B, dtype=torch.long)), TypeError)
case(N, "scores", "bool", er(scores=torch.zeros(3, B, dtype=torch.bool)), TypeError)
case(N, "scores", "complex", er(scores=fl(3, B, dtype=torch.complex64)), TypeError)
case(N, "scores", "inf", er(scores=torch.full((3, B), INF)))
case(N, "scores", "rows-batch", er(scores=[fl(B), fl(B + 1)]))
case(N, "scores", "rows-device", er(scores=[fl(B), fl(B, device="meta")]))
case(N, "scores", "rows-int", er(scores=[fl(B), torch.ones(B, dtype=torch.int32)]), TypeError)
case(N, "reduction", "unknown", er(reduction="median"))
case(N, "uncertainty_penalty", "negative", er(reduction="mean_minus_std", uncertainty_penalty=-0.1))
case(N, "uncertainty_penalty", "nan", er(reduction="mean_minus_var", uncertainty_penalty=NAN))
case(N, "uncertainty_penalty", "inf", er(reduction="mean_minus_std", uncertainty_penalty=INF))
case(N, "uncertainty_penalty", "bool", er(reduction="mean_minus_std", uncertainty_penalty=True), TypeError)
case(N, "uncertainty_penalty", "str", er(reduction="mean_minus_std", uncertainty_penalty="1"), TypeError)
case(N, "uncertainty_penalty", "with-min", er(reduction="min", uncertainty_penalty=1.0))
case(N, "normalize", "str", er(normalize="yes"), TypeError)

for _fn in (fastalign.ensemble_preferences, fastalign.flag_inconsistent_pairs):
    ep = api(_fn, lambda: dict(chosen_scores=fl(3, B), rejected_scores=fl(3, B)), ("chosen_scores", "rejected_scores"))
    N = _fn.__name__
    case(N, "chosen_scores", "1-d", ep(chosen_scores=fl(B), rejected_scores=fl(B)))
    case(N, "chosen_scores", "int", ep(chosen_scores=torch.zeros(3, B, dtype=torch.long)), TypeError)
    case(N, "chosen_scores", "list", ep(chosen_scores=[[1.0]]), TypeError)
    case(N, "rejected_scores", "models", ep(rejected_scores=fl(4, B)))
    case(N, "rejected_scores", "batch", ep(rejected_scores=fl(3, B + 1)))
    case(N, "rejected_scores", "device", ep(rejected_scores=fl(3, B, device="meta")))
    case(N, "rejected_scores", "bool", ep(rejected_scores=torch.zeros(3, B, dtype=torch.bool)), TypeError)
    case(N, "rejected_scores", "inf", ep(rejected_scores=torch.full((3, B), -INF)))
    case(N, "rejected_scores", "none", ep(rejected_scores=None), TypeError)
    case(N, "labels", "list", ep(labels=[1] * B), TypeError)
    case(N, "labels", "float", ep(labels=fl(B)), TypeError)
    case(N, "labels", "shape", ep(labels=torch.ones(B + 1, dtype=torch.bool)))
    case(N, "labels", "device", ep(labels=torch.ones(B, dtype=torch.bool, device="meta")))
    case(N, "labels", "value-2", ep(labels=torch.full((B,), 2)))
N = "ensemble_preferences"
ep = api(fastalign.ensemble_preferences, lambda: dict(chosen_scores=fl(3, B), rejected_scores=fl(3, B)))
case(N, "normalize", "int", ep(normalize=1), TypeError)
N = "flag_inconsistent_pairs"
fp = api(fastalign.flag_inconsistent_pairs, lambda: dict(chosen_scores=fl(3, B), rejected_scores=fl(3, B)))
case(N, "threshold", "above-1", fp(threshold=1.5))
case(N, "threshold", "negative", fp(threshold=-0.1))
case(N, "threshold", "nan", fp(threshold=NAN))
case(N, "threshold", "str", fp(threshold="0.5"), TypeError)
case(N, "threshold", "bool", fp(threshold=True), TypeError)


def _score_table():
    import datasets

    return datasets.Dataset.from_dict({"c0": [1.0, 2.0], "c1": [0.5, 1.0], "r0": [0.0, 3.0], "r1": [1.0, 0.0],
                                       "p": ["a", "b"], "l": [True, False], "l2": [0, 2], "x": [1.0, INF]})


def _score_table_dict():
    import datasets

    return datasets.DatasetDict(train=_score_table())


fr = api(fastalign.flag_inconsistent_rows,
         lambda: dict(dataset=_score_table(), chosen_columns=["c0", "c1"], rejected_columns=["r0", "r1"]))
N = "flag_inconsistent_rows"
case(N, "dataset", "dict", fr(dataset={"c0": [1.0]}), TypeError)
case(N, "dataset", "DatasetDict", lambda: fr(dataset=_score_table_dict())(), TypeError)
case(N, "chosen_columns", "missing", fr(chosen_columns=["c0", "nope"]))
case(N, "chosen_columns", "string-column", fr(chosen_columns=["c0", "p"]), TypeError)
case(N, "chosen_columns", "int", fr(chosen_columns=3), TypeError)
case(N, "chosen_columns", "names-not-str", fr(chosen_columns=[0, 1]), TypeError)
case(N, "chosen_columns", "empty", fr(chosen_columns=[], rejected_columns=[]))
case(N, "chosen_columns", "inf-value", fr(chosen_columns=["c0", "x"]))
case(N, "rejected_columns", "count", fr(rejected_columns=["r0"]))
case(N, "rejected_columns", "shared", fr(rejected_columns=["r0", "c0"]))
case(N, "label_column", "string", fr(label_column="p"), TypeError)
case(N, "label_column", "float", fr(label_column="c0"), TypeError)
case(N, "label_column", "value-2", fr(label_column="l2"))
case(N, "threshold", "above-1", fr(threshold=2.0))
case(N, "agreement_column", "exists", fr(agreement_column="p"))
case(N, "flagged_column", "empty", fr(flagged_column=""), TypeError)
case(N, "flagged_column", "same", fr(flagged_column="agreement"))
case(N, "drop_flagged", "str", fr(drop_flagged="no"), TypeError)
case(N, "batch_size", "zero", fr(batch_size=0))
case(N, "batch_size", "float", fr(batch_size=2.0), TypeError)


# --- preference-data diagnostics -----------------------------------------------------------------------

def _judged():
    return dict(prompt_ids=torch.tensor([0, 0]), item_a=torch.tensor([1, 2]), item_b=torch.tensor([2, 3]),
                a_won=torch.tensor([True, False]))


_JUDGED = ("prompt_ids", "item_a", "item_b", "a_won")
_EMPTY = dict(prompt_ids=torch.zeros(0, dtype=torch.int64), item_a=torch.zeros(0, dtype=torch.int64),
              item_b=torch.zeros(0, dtype=torch.int64), a_won=torch.zeros(0, dtype=torch.bool))
for N, _fn in (("intransitive_cycles", fastalign.intransitive_cycles), ("bradley_terry_fit", fastalign.bradley_terry_fit)):
    judged = api(_fn, _judged, positional=_JUDGED)
    case(N, "prompt_ids", "list", judged(prompt_ids=[0, 0]), TypeError)
    case(N, "prompt_ids", "float", judged(prompt_ids=fl(2)), TypeError)
    case(N, "prompt_ids", "empty", judged(**_EMPTY))
    case(N, "item_a", "2-d", judged(item_a=torch.tensor([[1, 2]])))
    case(N, "item_a", "bool", judged(item_a=torch.tensor([True, False])), TypeError)
    case(N, "item_a", "device", judged(item_a=torch.tensor([1, 2], device="meta")))
    case(N, "item_b", "shape", judged(item_b=torch.tensor([2, 3, 4])))
    case(N, "item_b", "self-judged", judged(item_b=torch.tensor([1, 3])))
    case(N, "a_won", "int", judged(a_won=torch.tensor([1, 0])), TypeError)
    case(N, "a_won", "shape", judged(a_won=torch.tensor([True])))

N = "bradley_terry_fit"
btf = api(fastalign.bradley_terry_fit, _judged, positional=_JUDGED)
case(N, "l2", "zero", btf(l2=0.0))
case(N, "l2", "nan", btf(l2=NAN))
case(N, "l2", "str", btf(l2="0.01"), TypeError)
case(N, "max_iterations", "zero", btf(max_iterations=0))
case(N, "max_iterations", "float", btf(max_iterations=10.0), TypeError)
case(N, "tolerance", "negative", btf(tolerance=-1e-9))
case(N, "tolerance", "inf", btf(tolerance=INF))


def _preference_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["p", "p"], "chosen": ["x", "y"], "rejected": ["y", "z"], "won": [1, 0]})


N = "judgements_from_dataset"
from_dataset = api(fastalign.judgements_from_dataset, lambda: dict(dataset=_preference_dataset()),
                   positional=("dataset",))
case(N, "dataset", "list", from_dataset(dataset=[{"prompt": "p", "chosen": "x", "rejected": "y"}]), TypeError)
case(N, "dataset", "no-rows", lambda: fastalign.judgements_from_dataset(_preference_dataset().select([])))
case(N, "prompt_column", "missing", from_dataset(prompt_column="question"))
case(N, "a_column", "int", from_dataset(a_column=1), TypeError)
case(N, "b_column", "missing", from_dataset(b_column="loser"))
case(N, "a_won_column", "not-bool", from_dataset(a_won_column="won"), TypeError)
case(N, "a_won_column", "missing", from_dataset(a_won_column="winner"))

N = "likelihood_displacement"
displaced = api(fastalign.likelihood_displacement, lambda: dict(chosen_rewards=[0.1, 0.0, -0.1, -0.2],
                                                                rejected_rewards=[0.0, -0.2, -0.4, -0.6], window=3),
                positional=("chosen_rewards", "rejected_rewards"))
case(N, "chosen_rewards", "str", displaced(chosen_rewards="0.1"), TypeError)
case(N, "chosen_rewards", "none-value", displaced(chosen_rewards=[0.1, None, 0.0, 0.0]), TypeError)
case(N, "chosen_rewards", "bool-tensor", displaced(chosen_rewards=torch.ones(4, dtype=torch.bool)), TypeError)
case(N, "chosen_rewards", "2-d", displaced(chosen_rewards=fl(2, 2)))
case(N, "chosen_rewards", "shorter-than-window", displaced(chosen_rewards=[0.1, 0.0]))
case(N, "chosen_rewards", "nan", displaced(chosen_rewards=[0.1, NAN, 0.0, 0.0]))
case(N, "rejected_rewards", "length", displaced(rejected_rewards=[0.0, -0.2, -0.4]))
case(N, "rejected_rewards", "inf", displaced(rejected_rewards=[0.0, -INF, -0.4, -0.6]))
case(N, "steps", "not-increasing", displaced(steps=[1, 2, 2, 3]))
case(N, "steps", "length", displaced(steps=[1, 2, 3]))
case(N, "chosen_logps", "length", displaced(chosen_logps=[-1.0]))
case(N, "rejected_logps", "nan", displaced(rejected_logps=[-1.0, NAN, -1.0, -1.0]))
case(N, "window", "2", displaced(window=2))
case(N, "window", "float", displaced(window=3.0), TypeError)

N = "likelihood_displacement_from_logs"
_LOGS = [{"rewards/chosen": 0.1 - 0.1 * k, "rewards/rejected": -0.2 * k, "step": k + 1} for k in range(4)]
from_logs = api(fastalign.likelihood_displacement_from_logs, lambda: dict(log_history=_LOGS, window=3),
                positional=("log_history",))
case(N, "log_history", "dict", from_logs(log_history=_LOGS[0]), TypeError)
case(N, "log_history", "not-dicts", from_logs(log_history=[("rewards/chosen", 0.1)]), TypeError)
case(N, "log_history", "no-rewards", from_logs(log_history=[{"loss": 0.5, "step": 1}]))
case(N, "log_history", "some-steps",
     from_logs(log_history=_LOGS[:3] + [{"rewards/chosen": 0.0, "rewards/rejected": 0.0}]))
case(N, "prefix", "none", from_logs(prefix=None), TypeError)
case(N, "window", "2", from_logs(window=2))


def _displacement_callback(**kwargs):
    def call():
        from fastalign.integrations.trl.displacement_callback import LikelihoodDisplacementCallback

        return LikelihoodDisplacementCallback(**kwargs)

    return call


N = "integrations.trl.LikelihoodDisplacementCallback"
case(N, "window", "2", _displacement_callback(window=2))
case(N, "window", "str", _displacement_callback(window="10"), TypeError)
case(N, "once", "str", _displacement_callback(once="yes"), TypeError)

# --- backends ------------------------------------------------------------------------------------------

def _use(name):
    def call():
        with fastalign.use_backend(name):
            pass

    return call


for value in ("nope", "cuda", 5, None):
    case("use_backend", "use_backend(name)", repr(value), _use(value), ValueError, r"^use_backend\(name\):")


# --- the TRL integration (its arguments are checked before TRL is imported) ----------------------------

def _patch(**kwargs):
    def call():
        from fastalign.integrations import trl as fa_trl

        fa_trl.patch(**kwargs)
        fa_trl.unpatch()  # reached only if the call was wrongly accepted

    return call


N = "integrations.trl.patch"
case(N, "trainers", "unknown", _patch(trainers=("dpo", "sft")))
case(N, "trainers", "unknown-name", _patch(trainers="ppo"))
case(N, "trainers", "int", _patch(trainers=5), TypeError)
case(N, "lm_head", "str", _patch(lm_head="no"), TypeError)
case(N, "losses", "None", _patch(losses=None), TypeError)


def _chunked(**overrides):
    def call():
        from fastalign.integrations.trl.lm_head import FastalignChunkedLogProb

        args = dict(hidden=fl(B * T, H), weight=fl(V, H), bias=None, targets=ids(B * T), temperature=1.0)
        args.update(overrides)
        return FastalignChunkedLogProb.apply(*args.values())

    return call


N = "integrations.trl.FastalignChunkedLogProb"
case(N, "final_logit_softcapping", "0", _chunked(chunk_size=None, final_logit_softcapping=0.0))
case(N, "final_logit_softcapping", "str", _chunked(chunk_size=None, final_logit_softcapping="30"), TypeError)
case(N, "final_logit_softcapping", "nan", _chunked(chunk_size=None, final_logit_softcapping=NAN))
case(N, "outputs", "unknown", _chunked(chunk_size=None, final_logit_softcapping=None, logit_scale=1.0,
                                       outputs=("log_probs", "logits")))
case(N, "labels", "too-large", _chunked(targets=torch.full((B * T,), V)))


# --- the sweep -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_argument_is_named(case, backend):
    with fastalign.use_backend(backend), pytest.raises(case.error, match=case.pattern):
        case.call()


def test_every_public_callable_is_swept():
    # A new public function or class gets its rows in the table above. Left out: result types, and
    # the two backend queries, which answer for any device name.
    swept = {c.id.split("-", 1)[0] for c in CASES}
    public = {name for name in fastalign.__all__ if callable(getattr(fastalign, name))}
    unswept = {"TokenLogprobs", "TokenDivergence", "GAEOutput", "EnsemblePreferences", "FlaggedPairs",
               "BradleyTerryFit", "DatasetJudgements", "DisplacementReport", "IntransitivityReport",
               "PairwiseJudgements", "current_backend", "available_backends"}
    assert public - unswept <= swept, sorted(public - unswept - swept)


def test_the_case_ids_are_unique():
    ids_ = [c.id for c in CASES]
    assert len(ids_) == len(set(ids_)), sorted({i for i in ids_ if ids_.count(i) > 1})
