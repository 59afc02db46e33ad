"""kernels/policy.py (the fused policy-gradient forward) against fastalign.reference.policy.

Without a GPU the kernel runs under Triton's interpreter (tests/conftest.py), so the shapes stay
small and the options are combined into a handful of cases rather than a full product. Every
case mixes ignored rows, advantages of both signs (and a zero), zero weights, and log-ratios
inside, just outside and far outside the clip range; the ratios are placed well away from the
clip boundaries, where the gradient jumps and a last-bit difference in a log-prob would flip it.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE
from numerics import assert_as_accurate_as_reference

import fastalign
from fastalign.reference import policy as reference
from fastalign.token_objective import TokenObjective

_ok, _why = fastalign.available_backends(DEVICE)["triton"]
pytestmark = [
    pytest.mark.skipif(not _ok, reason=f"triton not live on {DEVICE}: {_why}"),
    # The kernel computes every branch of a select, as the reference does; the interpreter warns
    # about the inf * 0 of a branch that is not taken (a dual clip of inf times a zero advantage).
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

INF = math.inf
IGNORE = -100
# log(pi / pi_old) per token: inside [log 0.8, log 1.2], just outside, and far outside (beyond a
# dual clip of 3, a delta of 2.5 and a log-ratio clamp of 1.5).
LOG_RATIOS = (0.0, 0.05, -0.1, 0.5, -0.7, 2.0, -3.0)
# ref - logp per token: both signs, and beyond low_var_kl's estimate clamp of 10 (at 3.5).
REF_OFFSETS = (-2.5, -0.5, 0.3, 1.0, 3.5)
# Rows of a [2, 9] batch: every (log-ratio, advantage sign) pair once on a token that counts, plus
# two ignored rows, a zero advantage and a zero policy weight.
T_FULL = 9
IGNORED_ROWS = (4, 13)


def kernels():
    from fastalign import _triton

    return _triton.kernels("policy")


def make_logits(B, T, V, dtype, layout, neg_inf=False):
    """[B, T, V] logits: contiguous, a ``logits[:, :-1]`` view, or a strided vocabulary."""
    if layout == "time":
        x = (torch.randn(B, T + 1, V, device=DEVICE) * 3)[:, :-1]
    elif layout == "vocab":
        x = (torch.randn(V, B, T, device=DEVICE) * 3).permute(1, 2, 0)
    else:
        x = torch.randn(B, T, V, device=DEVICE) * 3
    if neg_inf:
        # Vocabulary masking: -inf entries (never at a label, whose log-prob would be -inf).
        x[..., V // 3 : V // 3 + 4] = -INF
    return x.to(dtype)


def make_inputs(logits, obj, with_old, with_grad_entropy, temperature, logit_scale, softcap):
    B, T, V = logits.shape
    N = B * T
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[(labels >= V // 3) & (labels < V // 3 + 4)] = 0  # off make_logits' -inf columns
    ignored = [r for r in IGNORED_ROWS if r < N]
    labels[ignored] = IGNORE
    counted = [r for r in range(N) if r not in ignored]
    # The log-ratios are set against the log-probs of these very logits.
    base = reference.policy_token_forward(
        logits, labels, *[torch.empty(0, device=DEVICE)] * 6, temperature, logit_scale, softcap, IGNORE,
        0, 0, TokenObjective().kernel_args()[2], False,
    )[0]
    lr = torch.zeros(N, device=DEVICE)
    advantages = torch.rand(N, device=DEVICE) * 1.5 + 0.5
    for k, r in enumerate(counted):
        lr[r] = LOG_RATIOS[k % len(LOG_RATIOS)]
        if (k // len(LOG_RATIOS)) % 2:
            advantages[r] = -advantages[r]
    w_pg = torch.rand(N, device=DEVICE) + 0.1
    w_kl = torch.rand(N, device=DEVICE) + 0.1
    if len(counted) > 2 * len(LOG_RATIOS):
        advantages[counted[-2]] = 0.0
        w_pg[counted[-1]] = 0.0
        w_kl[counted[0]] = 0.0
    offsets = torch.tensor(REF_OFFSETS, device=DEVICE)[torch.arange(N, device=DEVICE) % len(REF_OFFSETS)]
    empty = torch.empty(0, device=DEVICE)
    return dict(
        labels=labels,
        old_logps=base - lr if with_old else empty,
        ref_logps=base + offsets if obj.kl != "none" else empty,
        advantages=advantages,
        w_pg=w_pg,
        w_kl=w_kl if obj.kl != "none" else empty,
        grad_entropy=torch.randn(N, device=DEVICE) if with_grad_entropy else empty,
    )


def call(fn, logits, inputs, obj, temperature, logit_scale, softcap, with_grad=True):
    surrogate_id, kl_id, params = obj.kernel_args()
    return fn(
        logits, inputs["labels"], inputs["old_logps"], inputs["ref_logps"], inputs["advantages"], inputs["w_pg"],
        inputs["w_kl"], inputs["grad_entropy"], temperature, logit_scale, softcap, IGNORE,
        surrogate_id, kl_id, params, with_grad,
    )


NAMES = ("logps", "entropy", "grad", "norm")


def check(obj, dtype=torch.float32, V=37, T=T_FULL, layout="contiguous", with_old=True, with_grad_entropy=False,
          temperature=1.0, logit_scale=1.0, softcap=0.0, neg_inf=False):
    logits = make_logits(2, T, V, dtype, layout, neg_inf)
    transform = (temperature, logit_scale, softcap)
    inputs = make_inputs(logits, obj, with_old, with_grad_entropy, *transform)
    got = call(kernels().policy_token_forward, logits, inputs, obj, *transform)
    ref = call(reference.policy_token_forward, logits, inputs, obj, *transform)
    assert got[2].dtype == logits.dtype and got[2].shape == logits.shape and got[2].is_contiguous()
    valid = inputs["labels"] != IGNORE
    assert (got[2][~valid.view(2, T)] == 0).all()
    for name in ("logps", "entropy", "norm"):
        assert (got[NAMES.index(name)][~valid] == 0).all(), name
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape
    # fp32 is held to the reference directly; 2-byte dtypes to its error against float64.
    fp32 = dtype == torch.float32
    truth = ref if fp32 else call(reference.policy_token_forward, logits.double(), inputs, obj, *transform)
    for name, g, r, t in pieces(got, ref, truth):
        if fp32:
            atol = 1e-6 * (1.0 + float(r[torch.isfinite(r)].abs().max()))
            torch.testing.assert_close(g, r, rtol=2e-5, atol=atol, msg=lambda m: f"{name}: {m}")
        else:
            assert_as_accurate_as_reference(g, r, t, name)
    return got, ref


def pieces(got, ref, truth):
    """The per-token outputs whole, the gradient row by row: a tolerance scaled by the largest
    entry of the whole gradient would let a row of small entries (a clipped token) be wrong."""
    for name, g, r, t in zip(NAMES, got, ref, truth):
        if name == "grad":
            V = g.shape[-1]
            yield from ((f"grad row {i}", *rows) for i, rows in enumerate(zip(*(x.reshape(-1, V) for x in (g, r, t)))))
        else:
            yield name, g, r, t


@pytest.mark.parametrize("kl", ["none", "k1", "abs", "k2", "k3", "low_var_kl"])
@pytest.mark.parametrize("surrogate", ["clip", "cispo", "sapo"])
def test_every_surrogate_and_kl(surrogate, kl):
    # Each (surrogate, KL) pair is its own compiled variant; odd ones also take the bias correction.
    obj = TokenObjective(surrogate, kl=kl, kl_bias_correction=kl in ("k1", "k3", "low_var_kl"))
    check(obj, V=37, with_old=surrogate != "cispo" or kl == "none", with_grad_entropy=kl in ("none", "k2"))


CASES = {
    # Every clip option at once: delta, dual clip, the log-ratio clamp, k3 with bias correction.
    "clip-all-options-bf16": dict(
        obj=TokenObjective("clip", delta=2.5, dual_clip=3.0, log_ratio_clamp=1.5, kl="k3", kl_bias_correction=True),
        dtype=torch.bfloat16, V=300, layout="time", with_grad_entropy=True, temperature=0.7,
    ),
    "clip-dual-softcap-fp32": dict(
        obj=TokenObjective("clip", ratio_low=0.8, ratio_high=1.28, dual_clip=3.0, kl="low_var_kl"),
        V=300, layout="vocab", with_grad_entropy=True, temperature=0.9, logit_scale=0.5, softcap=30.0,
    ),
    "clip-on-policy-bf16": dict(
        obj=TokenObjective("clip", kl="k3", kl_bias_correction=True), dtype=torch.bfloat16, V=128,
        with_old=False, with_grad_entropy=True, softcap=5.0,
    ),
    # TRL's CISPO: no lower bound on the ratio.
    "cispo-no-low-bound-bf16": dict(
        obj=TokenObjective("cispo", ratio_low=-INF, ratio_high=5.0, kl="k2", kl_straight_through=True),
        dtype=torch.bfloat16, V=300, layout="vocab", temperature=1.3,
    ),
    "cispo-masked-vocab-fp32": dict(
        obj=TokenObjective("cispo", kl="abs"), V=100, layout="time", with_grad_entropy=True, neg_inf=True,
        temperature=0.7,
    ),
    "sapo-clamped-fp32": dict(
        obj=TokenObjective("sapo", tau_pos=1.0, tau_neg=1.05, log_ratio_clamp=1.5, kl="k3",
                           kl_straight_through=True, kl_bias_correction=True),
        V=257, layout="vocab", with_grad_entropy=True, softcap=30.0, logit_scale=0.5,
    ),
    "sapo-on-policy-bf16": dict(
        obj=TokenObjective("sapo", kl="k1"), dtype=torch.bfloat16, V=77, layout="time", with_old=False,
        temperature=0.7, neg_inf=True,
    ),
    # A negative scale reaches the sweeps as negated logits (kernels/logprobs.py, _forward_operands).
    "clip-negative-scale-fp32": dict(
        obj=TokenObjective("clip", kl="k3"), V=300, layout="time", with_grad_entropy=True, logit_scale=-1.5,
        temperature=0.8,
    ),
    "cispo-zero-scale-bf16": dict(
        obj=TokenObjective("cispo", kl="k1"), dtype=torch.bfloat16, V=100, logit_scale=0.0,
    ),
    "clip-fp16": dict(
        obj=TokenObjective("clip", dual_clip=3.0, kl="k2"), dtype=torch.float16, V=64, with_grad_entropy=True,
        temperature=0.7,
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_combined_options(case):
    check(**case)


def test_without_grad_gives_the_same_forward_fields():
    obj = TokenObjective("clip", kl="k3")
    logits = make_logits(2, 3, 50, torch.bfloat16, "time")
    inputs = make_inputs(logits, obj, True, True, 0.7, 1.0, 0.0)
    with_grad = call(kernels().policy_token_forward, logits, inputs, obj, 0.7, 1.0, 0.0)
    without = call(kernels().policy_token_forward, logits, inputs, obj, 0.7, 1.0, 0.0, with_grad=False)
    assert without[2].numel() == 0 and without[2].dtype == logits.dtype
    for name in ("logps", "entropy", "norm"):
        i = NAMES.index(name)
        torch.testing.assert_close(without[i], with_grad[i], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_a_zero_weight_keeps_inf_and_nan_out_and_nan_in_gives_nan_out():
    # old = -inf: r = inf and the clip's d is inf * 0 = NaN; w_pg = 0 on that token must still give
    # a finite gradient row, exactly as the reference's where(w != 0, ...) does. A NaN old
    # log-prob on a weighted token is NaN through the clamps, the clip and the dual clip.
    obj = TokenObjective("clip", delta=2.5, dual_clip=3.0, kl="k3")
    logits = make_logits(1, 6, 40, torch.float32, "contiguous")
    inputs = make_inputs(logits, obj, True, False, 1.0, 1.0, 0.0)
    inputs["labels"][1:5] = torch.tensor([5, 6, 7, 8])
    inputs["old_logps"][2] = -INF
    inputs["w_pg"][2] = 0.0
    inputs["ref_logps"][3] = 60.0  # k3's exp(q - l) overflows to inf
    inputs["w_kl"][3] = 0.0
    inputs["old_logps"][5] = float("nan")
    inputs["advantages"][5] = -1.0
    inputs["w_pg"][5] = 1.0
    got = call(kernels().policy_token_forward, logits, inputs, obj, 1.0, 1.0, 0.0)
    ref = call(reference.policy_token_forward, logits, inputs, obj, 1.0, 1.0, 0.0)
    assert torch.isfinite(got[2][0, :5]).all() and torch.isnan(got[2][0, 5]).all()
    torch.testing.assert_close(got[2], ref[2], rtol=2e-5, atol=1e-6, equal_nan=True)


def test_label_out_of_range_gives_nan_without_reading_out_of_bounds():
    V = 40
    obj = TokenObjective("sapo", kl="k1")
    logits = make_logits(1, 3, V, torch.float32, "contiguous")
    inputs = make_inputs(logits, obj, True, True, 1.0, 1.0, 0.0)
    inputs["labels"] = torch.tensor([2, V + 5, IGNORE], device=DEVICE)
    logps, entropy, grad, norm = call(kernels().policy_token_forward, logits, inputs, obj, 1.0, 1.0, 0.0)
    assert torch.isfinite(logps[0]) and torch.isnan(logps[1]) and logps[2] == 0
    # The row's other statistics are still its own.
    assert torch.isfinite(entropy[:2]).all() and torch.isfinite(norm[:2]).all()
    assert torch.isfinite(grad[0, 0]).all() and torch.isnan(grad[0, 1]).all() and (grad[0, 2] == 0).all()


def test_kl_without_ref_logps_is_an_error():
    obj = TokenObjective("clip", kl="k3")
    logits = make_logits(1, 3, 16, torch.float32, "contiguous")
    inputs = make_inputs(logits, obj, True, False, 1.0, 1.0, 0.0)
    inputs["ref_logps"] = torch.empty(0, device=DEVICE)
    with pytest.raises(ValueError, match="ref_logps"):
        call(kernels().policy_token_forward, logits, inputs, obj, 1.0, 1.0, 0.0)


@pytest.mark.parametrize("layout", ["contiguous", "time"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_wide_rows_that_start_off_16_byte_boundaries(layout, dtype, softcap):
    """Rows of more than two chunks (both sweeps' loops run) of an odd vocabulary, so that row
    starts fall anywhere within 16 bytes: each sweep's vector chunks begin at the row's first
    boundary, a masked remainder covers the head and the tail, the second sweep runs from the
    row's end back, and its stores are vectors where the gradient rows share the logits rows'
    alignment (contiguous) and not where they do not (the logits[:, :-1] view)."""
    check(TokenObjective(), dtype=dtype, V=2 * 4096 + 1003, T=3, layout=layout, with_grad_entropy=True,
          softcap=softcap, logit_scale=0.5 if softcap else 1.0, temperature=0.9)
