"""Reward-model ensembles (fastalign/reward_ensemble.py) against references written sample by sample
from the papers' formulas, in exact arithmetic where it matters:

* Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization" (arXiv:2310.02743),
  its ensemble objectives: the mean of the K members' rewards; worst-case optimization
  WCO = min_i R_i; uncertainty-weighted optimization UWO = mean − λ·Var_i(R_i), with the
  intra-ensemble variance (1/K) Σ_i (R_i − mean)².
* Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate
  Reward Hacking" (arXiv:2312.09244): the uncertainty-penalized "mean minus std" aggregation
  mean − λ·σ, and rewards compared across models as per-model z-scores.

Neither TRL 1.16 nor verl 0.9.1 has reward-model ensembles, so there is no library function to
compare with. The references use `statistics.fmean` / `statistics.pvariance` (exact rational
arithmetic) and count votes with plain if / else, one sample at a time; the properties run over K,
B, input dtypes (fp32, fp64, bf16), missing scores (NaN), ties and ±1e30.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import DEVICE

from fastalign import (
    EnsemblePreferences,
    ensemble_preferences,
    ensemble_rewards,
    flag_inconsistent_pairs,
    flag_inconsistent_rows,
)
from fastalign.reward_ensemble import REDUCTIONS

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NAN, INF = math.nan, math.inf


# --- references, one sample at a time ----------------------------------------------------------------


def reference_reduction(scores: list[float], reduction: str, lam: float) -> float:
    """One sample's ensemble reward from its K scores; NaN scores are left out (no score given)."""
    present = [s for s in scores if not math.isnan(s)]
    if not present:
        return NAN
    if reduction == "min":  # Coste et al. WCO: min_i R_i
        return min(present)
    mean = statistics.fmean(present)
    variance = statistics.pvariance(present)  # (1/K) Σ (R_i − mean)², exactly
    if reduction == "mean":
        return mean
    if reduction == "mean_minus_std":  # Eisenstein et al.: mean − λ·σ
        return mean - lam * math.sqrt(variance)
    return mean - lam * variance  # Coste et al. UWO: mean − λ·Var


def reference_zscores(row: list[float]) -> list[float]:
    """One model's scores over the batch as z-scores (population std, NaN kept, no spread → 0)."""
    present = [s for s in row if not math.isnan(s)]
    mean = statistics.fmean(present) if present else NAN
    std = math.sqrt(statistics.pvariance(present)) if present else NAN
    return [s if math.isnan(s) else ((s - mean) / std if std > 0 else 0.0) for s in row]


def reference_rewards(scores: list[list[float]], reduction: str, lam: float, normalize: bool) -> list[float]:
    if normalize:
        scores = [reference_zscores(row) for row in scores]
    return [reference_reduction([row[b] for row in scores], reduction, lam) for b in range(len(scores[0]))]


def reference_votes(chosen: list[list[float]], rejected: list[list[float]], label: list[bool] | None, normalize: bool):
    """Per pair: (majority, chosen_share, agreement, mean margin, margin population std, voters)."""
    margins_from = chosen, rejected
    if normalize:
        both = [reference_zscores(c + r) for c, r in zip(chosen, rejected)]
        half = len(chosen[0])
        margins_from = [row[:half] for row in both], [row[half:] for row in both]
    out = []
    for b in range(len(chosen[0])):
        votes, voters, margins = 0.0, 0, []
        for k in range(len(chosen)):
            c, r = chosen[k][b], rejected[k][b]
            if math.isnan(c) or math.isnan(r):
                continue  # this model gave no score: no vote
            voters += 1
            if c > r:
                votes += 1.0
            elif c == r:
                votes += 0.5  # a tie: half a vote to each response
            margins.append(margins_from[0][k][b] - margins_from[1][k][b])
        if voters == 0:
            out.append((0, NAN, NAN, NAN, NAN, 0))
            continue
        share = votes / voters
        majority = 1 if votes > voters / 2 else (-1 if votes < voters / 2 else 0)
        if label is None:
            agreement = max(share, 1 - share)
        else:
            agreement = share if label[b] else 1 - share
        spread = math.sqrt(statistics.pvariance(margins))
        out.append((majority, share, agreement, statistics.fmean(margins), spread, voters))
    return out


# --- inputs ---------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
# Small integers make ties (equal scores) frequent; the rest spans ordinary and extreme magnitudes.
SCORE = st.one_of(
    st.integers(-3, 3).map(float),
    st.floats(-50, 50, allow_nan=False, width=32),
    st.sampled_from([1e30, -1e30, NAN, 1e-30]),
)


@st.composite
def score_matrices(draw, pairs: bool = False):
    k = draw(st.integers(1, 5))
    b = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    count = 2 if pairs else 1
    rows = st.lists(st.lists(SCORE, min_size=b, max_size=b), min_size=k, max_size=k)
    matrices = [torch.tensor(draw(rows), dtype=DTYPES[dtype]) for _ in range(count)]
    return [m.to(DEVICE) for m in matrices]


def result_dtype(*inputs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32


def assert_close_to(actual: torch.Tensor, expected: list[float], dtype: torch.dtype, scale: float) -> None:
    """Within the input dtype's rounding of sums of terms as large as `scale` (a mean of scores of
    ±1e30 and 1 keeps no trace of the 1)."""
    eps = torch.finfo(dtype).eps
    want = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.cpu().double(), want, rtol=16 * eps, atol=16 * eps * (1.0 + scale),
                               equal_nan=True)


def magnitude(*tensors: torch.Tensor) -> float:
    values = torch.cat([t.double().reshape(-1) for t in tensors]).cpu()
    finite = values[~torch.isnan(values)]
    return float(finite.abs().max()) if finite.numel() else 0.0


# --- ensemble_rewards ----------------------------------------------------------------------------------


@settings(max_examples=60)
@given(inputs=score_matrices(), reduction=st.sampled_from(REDUCTIONS), lam=st.sampled_from([None, 0.0, 0.5, 2.0]),
       normalize=st.booleans())
def test_ensemble_rewards_match_the_formulas(inputs, reduction, lam, normalize):
    (scores,) = inputs
    if lam is not None and reduction not in ("mean_minus_std", "mean_minus_var"):
        lam = None
    got = ensemble_rewards(scores, reduction=reduction, uncertainty_penalty=lam, normalize=normalize)
    assert got.shape == (scores.shape[1],) and got.dtype == result_dtype(scores) and got.device == scores.device
    want = reference_rewards(scores.double().tolist(), reduction, 1.0 if lam is None else lam, normalize)
    scale = 4.0 if normalize else magnitude(scores)
    if reduction == "mean_minus_var":
        scale = scale * scale
    penalty = 1.0 if lam is None else lam
    if reduction == "mean_minus_var" and not normalize and scale * penalty > torch.finfo(got.dtype).max:
        return  # the variance of ±1e30 overflows fp32 (test_extreme_scores pins that case)
    assert_close_to(got, want, got.dtype, scale)


def test_reductions_on_a_small_ensemble():
    # Three models, two samples, by hand: σ² = 2/3 and 8/3, σ = 0.8165 and 1.633.
    scores = torch.tensor([[1.0, 2.0], [2.0, 6.0], [3.0, 4.0]], device=DEVICE)
    torch.testing.assert_close(ensemble_rewards(scores).cpu(), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(ensemble_rewards(scores, reduction="min").cpu(), torch.tensor([1.0, 2.0]))
    std = torch.tensor([math.sqrt(2 / 3), math.sqrt(8 / 3)])
    got = ensemble_rewards(scores, reduction="mean_minus_std", uncertainty_penalty=0.5).cpu()
    torch.testing.assert_close(got, torch.tensor([2.0, 4.0]) - 0.5 * std)
    got = ensemble_rewards(scores, reduction="mean_minus_var").cpu()  # λ = 1 by default
    torch.testing.assert_close(got, torch.tensor([2.0 - 2 / 3, 4.0 - 8 / 3]))


def test_one_model_is_its_own_reward():
    scores = torch.randn(1, 7, device=DEVICE)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(ensemble_rewards(scores, reduction=reduction), scores[0])


def test_unanimous_models_have_no_spread():
    # Seven fp32 copies of 0.3 sum to a mean one ulp off 0.3; the spread must still be exactly 0.
    scores = torch.full((7, 3), 0.3, device=DEVICE)
    assert torch.equal(ensemble_rewards(scores, reduction="mean_minus_std", uncertainty_penalty=5.0),
                       ensemble_rewards(scores))
    assert torch.equal(ensemble_rewards(scores, normalize=True), torch.zeros(3, device=DEVICE))
    out = ensemble_preferences(scores, scores * 0.5)
    assert torch.equal(out.margin_std, torch.zeros(3, device=DEVICE))


def test_missing_scores_are_left_out():
    scores = torch.tensor([[1.0, NAN, NAN], [3.0, 4.0, NAN], [NAN, 6.0, NAN]], device=DEVICE)
    torch.testing.assert_close(ensemble_rewards(scores).cpu(), torch.tensor([2.0, 5.0, NAN]), equal_nan=True)
    torch.testing.assert_close(ensemble_rewards(scores, reduction="min").cpu(), torch.tensor([1.0, 4.0, NAN]),
                               equal_nan=True)
    got = ensemble_rewards(scores, reduction="mean_minus_std").cpu()
    torch.testing.assert_close(got, torch.tensor([1.0, 4.0, NAN]), equal_nan=True)


def test_list_of_rows_equals_the_stacked_tensor():
    rows = [torch.randn(5, device=DEVICE) for _ in range(3)]
    for reduction in REDUCTIONS:
        assert torch.equal(ensemble_rewards(rows, reduction=reduction),
                           ensemble_rewards(torch.stack(rows), reduction=reduction))
    mixed = ensemble_rewards([rows[0].double(), rows[1].bfloat16()])
    assert mixed.dtype == torch.float64
    assert ensemble_preferences(torch.stack(rows), torch.stack(rows).double()).mean_margin.dtype == torch.float64
    assert flag_inconsistent_pairs(rows, rows[::-1]).agreement.dtype == torch.float32


def test_normalize_removes_each_models_scale_and_offset():
    # Eisenstein et al. compare models' rewards as z-scores: any positive affine map of one model's
    # scores leaves the normalized ensemble unchanged.
    scores = torch.randn(3, 8, dtype=torch.float64, device=DEVICE)
    scale = torch.tensor([[1.0], [100.0], [0.01]], dtype=torch.float64, device=DEVICE)
    shift = torch.tensor([[0.0], [-50.0], [3.0]], dtype=torch.float64, device=DEVICE)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(ensemble_rewards(scores * scale + shift, reduction=reduction, normalize=True),
                                   ensemble_rewards(scores, reduction=reduction, normalize=True))
    # A model whose scores are all equal carries no ranking: its z-scores are 0.
    constant = torch.stack([scores[0], torch.full_like(scores[0], 0.1)])
    torch.testing.assert_close(ensemble_rewards(constant, normalize=True),
                               ensemble_rewards(scores[:1], normalize=True) / 2)


def test_extreme_scores():
    big = torch.tensor([[1e30, 1e30, 5.0], [-1e30, 1e30, 5.0]], device=DEVICE)
    # Squared deviations would overflow fp32 (1e60); the standard deviation is still exact.
    torch.testing.assert_close(ensemble_rewards(big, reduction="mean_minus_std").cpu(),
                               torch.tensor([-1e30, 1e30, 5.0]))
    # The UWO variance itself is beyond fp32: it overflows, as documented, and fp64 holds it.
    assert ensemble_rewards(big, reduction="mean_minus_var")[0].item() == -INF
    assert ensemble_rewards(big.double(), reduction="mean_minus_var")[0].item() == pytest.approx(-1e60)
    assert ensemble_rewards(big, reduction="mean_minus_var", uncertainty_penalty=0.0)[0].item() == 0.0
    z = ensemble_rewards(big, normalize=True).cpu()
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("value", [INF, -INF])
def test_infinite_scores_are_refused_on_cpu(value):
    scores = torch.zeros(2, 3)
    scores[1, 2] = value
    with pytest.raises(ValueError, match=r"^scores: expected finite scores.*at \[1, 2\]"):
        ensemble_rewards(scores)
    with pytest.raises(ValueError, match=r"^rejected_scores: expected finite"):
        flag_inconsistent_pairs(torch.zeros(2, 3), scores)


def test_results_are_detached_and_read_no_values():
    scores = torch.randn(3, 4, requires_grad=True)
    assert not ensemble_rewards(scores).requires_grad
    # On the meta device there are no values to read: every function runs on shapes alone, as
    # on an accelerator where reading a value would synchronize.
    meta = torch.empty(3, 4, device="meta")
    assert ensemble_rewards(meta, reduction="mean_minus_std", normalize=True).shape == (4,)
    out = ensemble_preferences(meta, meta, torch.ones(4, dtype=torch.long, device="meta"), normalize=True)
    assert [tuple(t.shape) for t in out] == [(4,)] * 6
    assert flag_inconsistent_pairs(meta, meta).flagged.dtype == torch.bool


# --- ensemble_preferences and flag_inconsistent_pairs ----------------------------------------------------


@settings(max_examples=60)
@given(inputs=score_matrices(pairs=True), with_labels=st.booleans(), normalize=st.booleans(), data=st.data())
def test_votes_match_the_counted_votes(inputs, with_labels, normalize, data):
    chosen, rejected = inputs
    batch = chosen.shape[1]
    labels = None
    if with_labels:
        labels = torch.tensor(data.draw(st.lists(st.integers(0, 1), min_size=batch, max_size=batch)), device=DEVICE)
    got = ensemble_preferences(chosen, rejected, labels, normalize=normalize)
    want = reference_votes(chosen.double().tolist(), rejected.double().tolist(),
                           None if labels is None else labels.bool().tolist(), normalize)
    dtype = result_dtype(chosen, rejected)
    columns = list(zip(*want))
    assert got.majority.tolist() == list(columns[0]) and got.voters.tolist() == list(columns[5])
    assert got.majority.dtype == got.voters.dtype == torch.int64
    for field, expected in zip(("chosen_share", "agreement"), columns[1:3]):
        assert getattr(got, field).dtype == dtype
        assert_close_to(getattr(got, field), list(expected), dtype, 1.0)
    margin_scale = 4.0 if normalize else 2 * magnitude(chosen, rejected)
    assert_close_to(got.mean_margin, list(columns[3]), dtype, margin_scale)
    assert_close_to(got.margin_std, list(columns[4]), dtype, margin_scale)

    threshold = data.draw(st.sampled_from([0.0, 0.25, 0.5, 2 / 3, 1.0]))
    flagged = flag_inconsistent_pairs(chosen, rejected, threshold=threshold, labels=labels)
    # The agreement with the label; with no labels the chosen response is the human's choice.
    agreement = want if labels is not None else reference_votes(
        chosen.double().tolist(), rejected.double().tolist(), [True] * batch, False)
    expected = [a[2] for a in agreement]
    assert_close_to(flagged.agreement, expected, dtype, 1.0)
    assert flagged.flagged.tolist() == [(not math.isnan(a)) and a < threshold for a in expected]


def test_votes_by_hand():
    # Five pairs, three models. Pair 0: all prefer chosen. Pair 1: 1 for, 2 against. Pair 2: one
    # for, one tie, one against (1.5 / 3). Pair 3: a tie and a vote for (model 2 gave no score).
    # Pair 4: no model scored the rejected response.
    chosen = torch.tensor([[2.0, 1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 2.0, 5.0, 1.0], [1.0, 0.0, 0.0, NAN, 1.0]])
    rejected = torch.tensor([[1.0, 0.0, 0.0, 1.0, NAN], [0.0, 1.0, 2.0, 4.0, NAN], [0.0, 2.0, 1.0, 0.0, NAN]])
    out = ensemble_preferences(chosen.to(DEVICE), rejected.to(DEVICE))
    assert isinstance(out, EnsemblePreferences)
    assert out.majority.tolist() == [1, -1, 0, 1, 0]
    assert out.voters.tolist() == [3, 3, 3, 2, 0]
    torch.testing.assert_close(out.chosen_share.cpu(), torch.tensor([1.0, 1 / 3, 0.5, 0.75, NAN]), equal_nan=True)
    torch.testing.assert_close(out.agreement.cpu(), torch.tensor([1.0, 2 / 3, 0.5, 0.75, NAN]), equal_nan=True)
    torch.testing.assert_close(out.mean_margin.cpu(), torch.tensor([5 / 3, -2 / 3, 0.0, 0.5, NAN]), equal_nan=True)
    spread = [math.sqrt(8 / 9), math.sqrt(14 / 9), math.sqrt(2 / 3), 0.5, NAN]
    torch.testing.assert_close(out.margin_std.cpu(), torch.tensor(spread), equal_nan=True)
    # The human label: pair 1 labelled "rejected preferred" agrees with 2 of 3 models.
    labels = torch.tensor([True, False, True, False, True], device=DEVICE)
    labelled = ensemble_preferences(chosen.to(DEVICE), rejected.to(DEVICE), labels)
    torch.testing.assert_close(labelled.agreement.cpu(), torch.tensor([1.0, 2 / 3, 0.5, 0.25, NAN]), equal_nan=True)
    flagged = flag_inconsistent_pairs(chosen.to(DEVICE), rejected.to(DEVICE))
    assert flagged.flagged.tolist() == [False, True, False, False, False]  # 0.5 is not below 0.5; NaN not flagged
    assert flag_inconsistent_pairs(chosen, rejected, threshold=1.0).flagged.tolist() == [False, True, True, True, False]
    assert not flag_inconsistent_pairs(chosen, rejected, threshold=0.0).flagged.any()
    assert flag_inconsistent_pairs(chosen, rejected, labels=labels.cpu()).flagged.tolist() == [False] * 3 + [True, False]


def test_normalize_changes_margins_not_votes():
    chosen, rejected = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    scale = torch.tensor([[1.0], [1000.0], [0.001], [7.0]], dtype=torch.float64)
    raw = ensemble_preferences(chosen * scale, rejected * scale)
    normalized = ensemble_preferences(chosen * scale, rejected * scale, normalize=True)
    reference = ensemble_preferences(chosen, rejected, normalize=True)
    for field in ("majority", "chosen_share", "agreement", "voters"):
        assert torch.equal(getattr(raw, field), getattr(normalized, field))
    torch.testing.assert_close(normalized.mean_margin, reference.mean_margin)
    torch.testing.assert_close(normalized.margin_std, reference.margin_std)


def test_votes_on_huge_close_scores_are_taken_before_normalizing():
    # z-scoring 1e30, 1 and 2 in fp32 rounds 1 and 2 to the same value; the votes must not see that.
    chosen = torch.tensor([[1e30, 2.0]])
    rejected = torch.tensor([[0.0, 1.0]])
    out = ensemble_preferences(chosen, rejected, normalize=True)
    assert out.majority.tolist() == [1, 1]


# --- argument errors ----------------------------------------------------------------------------------

K, B = 3, 4


def fl(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


ERRORS = [
    # (call, error, message start)
    (lambda: ensemble_rewards([[1.0, 2.0]]), TypeError, r"scores\[0\]: expected a \[B\] torch.Tensor"),
    (lambda: ensemble_rewards("scores"), TypeError, "scores: expected a"),
    (lambda: ensemble_rewards([]), ValueError, r"scores: .*K = 0"),
    (lambda: ensemble_rewards(fl(B)), ValueError, r"scores: expected shape \[K, B\].*unsqueeze"),
    (lambda: ensemble_rewards(fl(K, B, 1)), ValueError, r"scores: expected shape \[K, B\]"),
    (lambda: ensemble_rewards(fl(0, B)), ValueError, "scores: no reward model"),
    (lambda: ensemble_rewards(fl(K, 0)), ValueError, "scores: the batch is empty"),
    (lambda: ensemble_rewards(torch.ones(K, B, dtype=torch.long)), TypeError, "scores: expected a floating-point"),
    (lambda: ensemble_rewards(torch.ones(K, B, dtype=torch.bool)), TypeError, "scores: expected a floating-point"),
    (lambda: ensemble_rewards(fl(K, B, dtype=torch.complex64)), TypeError, "scores: expected a floating-point"),
    (lambda: ensemble_rewards([fl(B), fl(B + 1)]), ValueError, r"scores\[1\]: expected shape"),
    (lambda: ensemble_rewards([fl(B), fl(B, device="meta")]), ValueError, r"scores\[1\]: expected a tensor on cpu"),
    (lambda: ensemble_rewards([fl(B), fl(B, 1)]), ValueError, r"scores\[1\]: expected a 1-d"),
    (lambda: ensemble_rewards([fl(B), torch.ones(B, dtype=torch.int32)]), TypeError, r"scores\[1\]: expected a floating"),
    (lambda: ensemble_rewards(fl(K, B), reduction="median"), ValueError, "reduction: expected one of"),
    (lambda: ensemble_rewards(fl(K, B), reduction=None), ValueError, "reduction: expected one of"),
    (lambda: ensemble_rewards(fl(K, B), reduction="mean_minus_std", uncertainty_penalty=-0.1), ValueError,
     "uncertainty_penalty: expected a finite number >= 0"),
    (lambda: ensemble_rewards(fl(K, B), reduction="mean_minus_std", uncertainty_penalty=NAN), ValueError,
     "uncertainty_penalty: expected a finite number"),
    (lambda: ensemble_rewards(fl(K, B), reduction="mean_minus_var", uncertainty_penalty=INF), ValueError,
     "uncertainty_penalty: expected a finite number"),
    (lambda: ensemble_rewards(fl(K, B), reduction="mean_minus_std", uncertainty_penalty=True), TypeError,
     "uncertainty_penalty: expected a number"),
    (lambda: ensemble_rewards(fl(K, B), reduction="mean_minus_std", uncertainty_penalty="1"), TypeError,
     "uncertainty_penalty: expected a number"),
    (lambda: ensemble_rewards(fl(K, B), reduction="min", uncertainty_penalty=1.0), ValueError,
     "uncertainty_penalty: read only by"),
    (lambda: ensemble_rewards(fl(K, B), normalize="yes"), TypeError, "normalize: expected True or False"),
    (lambda: ensemble_preferences(fl(K, B), fl(K + 1, B)), ValueError, r"rejected_scores: expected shape \(3, 4\)"),
    (lambda: ensemble_preferences(fl(K, B), fl(K, B + 1)), ValueError, r"rejected_scores: expected shape"),
    (lambda: ensemble_preferences(fl(K, B), fl(K, B, device="meta")), ValueError, "rejected_scores: expected a tensor on"),
    (lambda: ensemble_preferences(fl(K, B), torch.ones(K, B, dtype=torch.bool)), TypeError,
     "rejected_scores: expected a floating-point"),
    (lambda: ensemble_preferences(torch.ones(K, B, dtype=torch.long), fl(K, B)), TypeError,
     "chosen_scores: expected a floating-point"),
    (lambda: ensemble_preferences(fl(B), fl(B)), ValueError, r"chosen_scores: expected shape \[K, B\]"),
    (lambda: ensemble_preferences(fl(K, B), None), TypeError, "rejected_scores: expected a"),
    (lambda: ensemble_preferences(fl(K, B), fl(K, B), [1] * B), TypeError, "labels: expected a"),
    (lambda: ensemble_preferences(fl(K, B), fl(K, B), fl(B)), TypeError, "labels: expected a bool or integer"),
    (lambda: ensemble_preferences(fl(K, B), fl(K, B), torch.ones(B + 1, dtype=torch.bool)), ValueError,
     r"labels: expected shape \[4\]"),
    (lambda: ensemble_preferences(fl(K, B), fl(K, B), torch.ones(B, dtype=torch.bool, device="meta")), ValueError,
     "labels: expected a tensor on"),
    (lambda: ensemble_preferences(fl(K, B), fl(K, B), torch.tensor([0, 1, 2, 1])), ValueError,
     r"labels: expected 0 or 1.*found 2 at pair 2"),
    (lambda: ensemble_preferences(fl(K, B), fl(K, B), normalize=1), TypeError, "normalize: expected True or False"),
    (lambda: flag_inconsistent_pairs(fl(K, B), fl(K, B), threshold=1.5), ValueError, r"threshold: .*\[0, 1\]"),
    (lambda: flag_inconsistent_pairs(fl(K, B), fl(K, B), threshold=-0.1), ValueError, r"threshold: .*\[0, 1\]"),
    (lambda: flag_inconsistent_pairs(fl(K, B), fl(K, B), threshold=NAN), ValueError, "threshold: expected a finite"),
    (lambda: flag_inconsistent_pairs(fl(K, B), fl(K, B), threshold="0.5"), TypeError, "threshold: expected a number"),
    (lambda: flag_inconsistent_pairs(fl(K, B), fl(K, B), threshold=True), TypeError, "threshold: expected a number"),
    (lambda: flag_inconsistent_pairs(fl(K, B), fl(K - 1, B)), ValueError, "rejected_scores: expected shape"),
    (lambda: flag_inconsistent_pairs(fl(K, B), fl(K, B), labels=torch.ones(B, 1, dtype=torch.bool)), ValueError,
     "labels: expected shape"),
]


@pytest.mark.parametrize("call,error,message", ERRORS, ids=[f"{i}-{e[2][:30]}" for i, e in enumerate(ERRORS)])
def test_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=f"^{message}"):
        call()


# --- on a datasets.Dataset ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets():
    return pytest.importorskip("datasets")


def scored_pairs(datasets, k: int = 3, rows: int = 11, seed: int = 0):
    """A dataset in TRL's chosen / rejected layout with per-model score columns, some missing."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randn(k, rows, generator=generator, dtype=torch.float64)
    rejected = torch.randn(k, rows, generator=generator, dtype=torch.float64)
    chosen[1, 3] = NAN  # model 1 could not score pair 3's chosen response
    columns = {"prompt": [f"p{i}" for i in range(rows)]}
    for m in range(k):
        columns[f"chosen_rm{m}"] = [None if math.isnan(v) else v for v in chosen[m].tolist()]
        columns[f"rejected_rm{m}"] = rejected[m].tolist()
    columns["label"] = [i % 3 != 0 for i in range(rows)]
    return datasets.Dataset.from_dict(columns), chosen, rejected


CHOSEN = [f"chosen_rm{m}" for m in range(3)]
REJECTED = [f"rejected_rm{m}" for m in range(3)]


@pytest.mark.parametrize("batch_size", [1, 4, 1000])
def test_dataset_rows_equal_the_tensor_call(datasets, batch_size):
    dataset, chosen, rejected = scored_pairs(datasets)
    out = flag_inconsistent_rows(dataset, CHOSEN, REJECTED, threshold=0.6, batch_size=batch_size)
    want = flag_inconsistent_pairs(chosen, rejected, threshold=0.6)
    assert out.column_names == dataset.column_names + ["agreement", "flagged"]
    assert out["prompt"] == dataset["prompt"]
    assert out["flagged"] == want.flagged.tolist()
    torch.testing.assert_close(torch.tensor(out["agreement"], dtype=torch.float64), want.agreement)
    assert out.features["agreement"].dtype == "float64" and out.features["flagged"].dtype == "bool"


def test_dataset_labels_and_dropping(datasets):
    dataset, chosen, rejected = scored_pairs(datasets)
    labels = torch.tensor(dataset["label"])
    want = flag_inconsistent_pairs(chosen, rejected, labels=labels)
    assert want.flagged.any() and not want.flagged.all()
    out = flag_inconsistent_rows(dataset, CHOSEN, REJECTED, label_column="label", agreement_column="rm_agreement",
                                 flagged_column="rm_flagged", drop_flagged=True, batch_size=3)
    kept = [i for i, f in enumerate(want.flagged.tolist()) if not f]
    assert out["prompt"] == [dataset["prompt"][i] for i in kept]
    assert out["rm_flagged"] == [False] * len(kept)
    torch.testing.assert_close(torch.tensor(out["rm_agreement"], dtype=torch.float64), want.agreement[kept])


def test_dataset_empty_and_single_model(datasets):
    dataset, chosen, rejected = scored_pairs(datasets)
    empty = flag_inconsistent_rows(dataset.select([]), CHOSEN, REJECTED)
    assert len(empty) == 0 and empty.column_names[-2:] == ["agreement", "flagged"]
    one = flag_inconsistent_rows(dataset, "chosen_rm0", "rejected_rm0")
    assert one["flagged"] == (chosen[0] < rejected[0]).tolist()


def test_dataset_errors(datasets):
    dataset, _, _ = scored_pairs(datasets, rows=4)
    with_inf = dataset.map(lambda row, i: {"chosen_rm2": INF if i == 2 else row["chosen_rm2"]}, with_indices=True)
    with_bad_label = dataset.map(lambda row, i: {"label2": 2 if i == 1 else 1}, with_indices=True)
    without_label = dataset.map(lambda row, i: {"label3": None if i == 3 else True}, with_indices=True)
    cases = [
        (lambda: flag_inconsistent_rows({"chosen": [1.0]}, CHOSEN, REJECTED), TypeError, "dataset: expected a datasets"),
        (lambda: flag_inconsistent_rows(datasets.DatasetDict(train=dataset), CHOSEN, REJECTED), TypeError,
         "dataset: expected a datasets.Dataset .a DatasetDict"),
        (lambda: flag_inconsistent_rows(dataset, CHOSEN[:2] + ["nope"], REJECTED), ValueError,
         "chosen_columns: the dataset has no column 'nope'"),
        (lambda: flag_inconsistent_rows(dataset, CHOSEN, REJECTED[:2] + ["prompt"]), TypeError,
         "rejected_columns: column 'prompt' holds"),
        (lambda: flag_inconsistent_rows(dataset, CHOSEN, REJECTED[:2] + ["label"]), TypeError,
         "rejected_columns: column 'label' holds"),
        (lambda: flag_inconsistent_rows(dataset, CHOSEN, REJECTED[:2]), ValueError, "rejected_columns: expected 3 names"),
        (lambda: flag_inconsistent_rows(dataset, CHOSEN, [REJECTED[0], REJECTED[1], CHOSEN[0]]), ValueError,
         r"rejected_columns: column\(s\) \['chosen_rm0'\] also among chosen_columns"),
        (lambda: flag_inconsistent_rows(dataset, [], []), ValueError, "chosen_columns: no column given"),
        (lambda: flag_inconsistent_rows(dataset, 3, REJECTED), TypeError, "chosen_columns: expected a list"),
        (lambda: flag_inconsistent_rows(dataset, [0, 1, 2], REJECTED), TypeError, "chosen_columns: expected column names"),
        (lambda: flag_inconsistent_rows(dataset, CHOSEN, REJECTED, label_column="prompt"), TypeError,
         "label_column: column 'prompt' holds"),
        (lambda: flag_inconsistent_rows(dataset, CHOSEN, REJECTED, label_column="chosen_rm0"), TypeError,
         "label_column: column 'chosen_rm0' holds"),
        (lambda: flag_inconsistent_rows(dataset, CHOSEN, REJECTED, threshold=2.0), ValueError, "threshold: "),
        (lambda: flag_inconsistent_rows(dataset, CHOSEN, REJECTED, agreement_column="prompt"), ValueError,
         "agreement_column: the dataset already has a column 'prompt'"),
        (lambda: flag_inconsistent_rows(dataset, CHOSEN, REJECTED, flagged_column=""), TypeError, "flagged_column: "),
        (lambda: flag_inconsistent_rows(dataset, CHOSEN, REJECTED, flagged_column="agreement"), ValueError,
         "flagged_column: the same name as agreement_column"),
        (lambda: flag_inconsistent_rows(dataset, CHOSEN, REJECTED, drop_flagged="no"), TypeError, "drop_flagged: "),
        (lambda: flag_inconsistent_rows(dataset, CHOSEN, REJECTED, batch_size=0), ValueError, "batch_size: "),
        (lambda: flag_inconsistent_rows(dataset, CHOSEN, REJECTED, batch_size=2.0), TypeError, "batch_size: "),
        (lambda: flag_inconsistent_rows(with_inf, CHOSEN, REJECTED, batch_size=2), ValueError,
         "chosen_columns: column 'chosen_rm2' holds inf at row 2"),
        (lambda: flag_inconsistent_rows(with_bad_label, CHOSEN, REJECTED, label_column="label2"), ValueError,
         "label_column: column 'label2' holds 2 at row 1"),
        (lambda: flag_inconsistent_rows(without_label, CHOSEN, REJECTED, label_column="label3", batch_size=2), ValueError,
         "label_column: column 'label3' holds None at row 3"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=f"^{message}"):
            call()
