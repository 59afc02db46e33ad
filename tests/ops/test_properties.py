"""Property-based tests (hypothesis): random shapes (0, 1 and odd sizes included), dtypes, strides,
logit transforms, masks, label patterns and extreme values, every backend against a float64 ground
truth with the tolerance of tests/support/numerics.py. The profile is derandomized with a fixed example
count (tests/conftest.py), so `make test` runs the same examples every time."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, live_backends
from numerics import assert_as_accurate_as_reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastalign  # noqa: E402
from fastalign import reference  # noqa: E402
from fastalign.grpo import grpo_loss  # noqa: E402

BACKENDS = live_backends()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FIELDS = ("entropy", "log_sum_sq_probs", "mean_logits")


@st.composite
def logits_cases(draw, max_vocab=300):
    """(logits [B, T, V] in some layout, labels [B, T], mask or None, transform kwargs)."""
    B = draw(st.integers(0, 3))
    T = draw(st.integers(1, 5))
    V = draw(st.sampled_from([1, 2, 3, 7, 8, 9, 16, 31, 64, 127, 257, max_vocab]))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "shifted", "sliced_vocab", "strided_vocab"]))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if layout == "shifted":  # logits[:, :-1]
        x = torch.randn(B, T + 1, V, generator=g)[:, :-1]
    elif layout == "sliced_vocab":  # a vocabulary sliced from a padded one
        x = torch.randn(B, T, V + 5, generator=g)[..., :V]
    elif layout == "strided_vocab":
        x = torch.randn(V, B, T, generator=g).permute(1, 2, 0)
    else:
        x = torch.randn(B, T, V, generator=g)
    x = (x * scale).to(dtype).to(DEVICE)
    labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    pattern = draw(st.sampled_from(["all", "some_ignored", "all_ignored"]))
    if pattern == "some_ignored":
        labels[torch.rand(B, T, generator=g).to(DEVICE) < 0.3] = -100
    elif pattern == "all_ignored":
        labels[:] = -100
    transform = draw(st.sampled_from([
        {}, {"temperature": 0.7}, {"logit_scale": 0.5, "softcap": 30.0, "temperature": 0.9},
        {"softcap": 5.0}, {"logit_scale": -1.5}, {"temperature": 1.3, "logit_scale": 2.0},
    ]))
    if draw(st.booleans()) and V > 2:
        # Vocabulary masking: entries whose transformed logit is -inf (+inf raw under a negative
        # scale), never at a label (its log-prob would be -inf).
        banned = torch.rand(B, T, V, generator=g).to(DEVICE) < 0.3
        banned.scatter_(-1, labels.clamp(min=0).unsqueeze(-1), False)
        x = x.masked_fill(banned, math.copysign(math.inf, -transform.get("logit_scale", 1.0)))
    mask = None
    if draw(st.booleans()):
        mask = (torch.rand(B, T, generator=g) < 0.7).to(DEVICE)
    return x, labels, mask, transform


# The Triton kernels' tanh (kernels/logprobs.py, _tanh_scaled: two MUFU operations, as on GPUs)
# errs up to 1.2e-7 absolute where torch's fp32 tanh errs 5e-8: under softcap each transformed
# logit may be off by that times softcap / T beyond the reference, and a log-prob (the label's
# logit minus the normalizer) twice that.
TRITON_TANH_ERROR = 1.2e-7


def _backend_slack(backend, transform):
    if backend != "triton" or not transform.get("softcap"):
        return 0.0
    return 2 * TRITON_TANH_ERROR * transform["softcap"] / transform.get("temperature", 1.0)


def _fields_and_grad(fn, logits, labels, mask, transform, weights):
    leaf = logits.detach().clone().requires_grad_(True)
    out = fn(leaf, labels, mask=mask, outputs=FIELDS + ("is_top1",), **transform)
    loss = (out.logps.double() * weights[0]).sum() + (out.entropy.double() * weights[1]).sum()
    grad = torch.autograd.grad(loss, leaf)[0] if loss.requires_grad else torch.zeros_like(leaf)
    return out, grad


@settings(max_examples=100)
@given(case=logits_cases())
def test_token_logprobs_matches_float64_truth_on_every_backend(case):
    logits, labels, mask, transform = case
    weights = (torch.randn(labels.shape, dtype=torch.float64, device=DEVICE),
               torch.randn(labels.shape, dtype=torch.float64, device=DEVICE))
    truth, truth_grad = _fields_and_grad(reference.token_logprobs, logits.double(), labels, mask, transform, weights)
    ref, ref_grad = _fields_and_grad(reference.token_logprobs, logits, labels, mask, transform, weights)
    for backend in BACKENDS:
        with fastalign.use_backend(backend):
            got, got_grad = _fields_and_grad(fastalign.token_logprobs, logits, labels, mask, transform, weights)
        slack = _backend_slack(backend, transform)
        for name in ("logps",) + FIELDS:
            assert_as_accurate_as_reference(getattr(got, name), getattr(ref, name), getattr(truth, name),
                                            f"{backend} {name}", slack_abs=slack)
        assert torch.equal(got.is_top1, ref.is_top1), backend
        assert got_grad.dtype == logits.dtype and got_grad.shape == logits.shape
        assert_as_accurate_as_reference(got_grad, ref_grad, truth_grad, f"{backend} grad", slack_abs=slack)
        # Ignored positions: exactly 0, and no gradient.
        ignored = labels == -100
        if mask is not None:
            ignored = ignored | ~mask
        assert (got.logps[ignored] == 0).all() and (got.entropy[ignored] == 0).all(), backend
        assert (got_grad[ignored] == 0).all(), backend


@settings(max_examples=40)
@given(case=logits_cases(max_vocab=64), big=st.sampled_from([1e2, 1e3, 1e4, 1e6, 1e20, -1e30]))
def test_large_magnitude_logits_stay_finite_and_accurate(case, big):
    # Logits shifted anywhere up to 1e30 (within each dtype's range): the log-probs, the entropy
    # and the gradient keep the accuracy they have at small logits.
    logits, labels, mask, transform = case
    hypothesis.assume(abs(big) < torch.finfo(logits.dtype).max / 2)
    shifted = (logits.double() + big).to(logits.dtype)
    weights = (torch.randn(labels.shape, dtype=torch.float64, device=DEVICE),
               torch.randn(labels.shape, dtype=torch.float64, device=DEVICE))
    truth, truth_grad = _fields_and_grad(reference.token_logprobs, shifted.double(), labels, mask, transform, weights)
    ref, ref_grad = _fields_and_grad(reference.token_logprobs, shifted, labels, mask, transform, weights)
    for backend in BACKENDS:
        with fastalign.use_backend(backend):
            got, got_grad = _fields_and_grad(fastalign.token_logprobs, shifted, labels, mask, transform, weights)
        slack = _backend_slack(backend, transform)
        for name in ("logps", "entropy"):
            assert_as_accurate_as_reference(getattr(got, name), getattr(ref, name), getattr(truth, name),
                                            f"{backend} {name}", slack_abs=slack)
        assert_as_accurate_as_reference(got_grad, ref_grad, truth_grad, f"{backend} grad", slack_abs=slack)


@st.composite
def grpo_cases(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 5))
    V = draw(st.sampled_from([2, 7, 33, 130]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype).to(DEVICE)
    labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) < 0.8).float().to(DEVICE)
    advantages = torch.randn(B, generator=g).to(DEVICE)
    ref = reference.token_logprobs(logits.float(), labels).logps.detach()
    old = (ref + 0.3 * torch.randn(B, T, generator=g).to(DEVICE)).detach()
    options = draw(st.sampled_from([
        dict(loss_type="grpo"), dict(loss_type="dapo", epsilon_high=0.28), dict(loss_type="bnpo", beta=0.04),
        dict(loss_type="dr_grpo", max_completion_length=T), dict(loss_type="cispo", epsilon_high=5.0),
        dict(loss_type="sapo"), dict(loss_type="grpo", temperature=0.7, beta=0.1),
        dict(loss_type="grpo", importance_sampling_level="sequence"),
    ]))
    return logits, labels, mask, advantages, old, ref, options


@settings(max_examples=60)
@given(case=grpo_cases())
def test_grpo_loss_and_gradient_match_float64_truth_on_every_backend(case):
    logits, labels, mask, advantages, old, ref_logps, options = case

    def run(x, backend):
        leaf = x.detach().clone().requires_grad_(True)
        with fastalign.use_backend(backend):
            out = grpo_loss(leaf, labels, completion_mask=mask, advantages=advantages, old_logps=old,
                            ref_logps=ref_logps, num_items_in_batch=mask.sum(), **options)
        return out.loss, torch.autograd.grad(out.loss, leaf)[0]

    truth_loss, truth_grad = run(logits.double(), "reference")
    ref_loss, ref_grad = run(logits, "reference")
    for backend in BACKENDS:
        loss, grad = run(logits, backend)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), backend
        assert_as_accurate_as_reference(loss.reshape(1).float(), ref_loss.reshape(1).float(),
                                        truth_loss.reshape(1), f"{backend} loss")
        assert_as_accurate_as_reference(grad, ref_grad, truth_grad, f"{backend} grad")
        assert (grad[mask == 0] == 0).all(), backend


# Found by the suite above with HYPOTHESIS_PROFILE=explore, when the backward took p = exp(z - lse)
# with lse rounded to fp32 and the C++ forward took z - m with z = x * k rounded first.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["gradient of the only entry", "logit of 1e30"])
def test_single_entry_rows_at_a_temperature(backend, case):
    if case == "gradient of the only entry":
        logits, big = torch.tensor([[[46.2299]]], device=DEVICE), 0.0
    else:
        logits, big = torch.tensor([[[0.1541]]], device=DEVICE), 1e30
    labels = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    weights = (torch.ones(1, 1, dtype=torch.float64, device=DEVICE), torch.zeros(1, 1, dtype=torch.float64, device=DEVICE))
    x = logits + big
    truth, truth_grad = _fields_and_grad(reference.token_logprobs, x.double(), labels, None, {"temperature": 0.7}, weights)
    ref, ref_grad = _fields_and_grad(reference.token_logprobs, x, labels, None, {"temperature": 0.7}, weights)
    with fastalign.use_backend(backend):
        got, got_grad = _fields_and_grad(fastalign.token_logprobs, x, labels, None, {"temperature": 0.7}, weights)
    assert_as_accurate_as_reference(got.logps, ref.logps, truth.logps, "logps")
    assert_as_accurate_as_reference(got_grad, ref_grad, truth_grad, "grad")
    assert got.logps.item() == 0.0 and got_grad.item() == 0.0


def _plain_log_softmax_grad(logits, labels, weights):
    leaf = logits.detach().clone().requires_grad_(True)
    log_p = torch.log_softmax(leaf.float(), dim=-1)
    logps = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    loss = (logps.double() * weights[0]).sum() + (entropy.double() * weights[1]).sum()
    return torch.autograd.grad(loss, leaf)[0]


def _relative_error(value, truth):
    return float((value.double() - truth).abs().max() / truth.abs().max())


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("magnitude", [1e2, 1e3, 1e4, -1e4])
def test_gradient_precision_does_not_fall_with_logit_magnitude(backend, temperature, magnitude):
    # The same rows of logits near 0 and shifted by `magnitude`: the gradient (of log-probs and
    # entropy) keeps the relative error against float64 it has near 0, within 2x, and at
    # temperature 1 stays within 2x of plain fp32 log_softmax's at that magnitude when that is
    # larger. (At another temperature plain log_softmax itself loses |z| * 6e-8 to the rounding of
    # x / T; the backends do not.) Before the rows' normalizers were kept as (shift, log s), the
    # error grew with |z|: 2e-4 at 1e4.
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 8, 300, generator=g) * 3
    labels = torch.randint(0, 300, (4, 8), generator=g).to(DEVICE)
    weights = (torch.randn(4, 8, generator=g, dtype=torch.float64).to(DEVICE),
               torch.randn(4, 8, generator=g, dtype=torch.float64).to(DEVICE))
    transform = {"temperature": temperature} if temperature != 1.0 else {}
    fn = reference.token_logprobs if backend == "reference" else fastalign.token_logprobs

    def error(x):
        _, truth = _fields_and_grad(reference.token_logprobs, x.double(), labels, None, transform, weights)
        with fastalign.use_backend(backend):
            _, got = _fields_and_grad(fn, x, labels, None, transform, weights)
        return _relative_error(got, truth), truth

    near_zero, _ = error(base.to(DEVICE))
    shifted = (base + magnitude).to(DEVICE)
    err, truth = error(shifted)
    allowed = 2 * max(near_zero, 1e-7)
    if temperature == 1.0:
        allowed = max(allowed, 2 * _relative_error(_plain_log_softmax_grad(shifted, labels, weights), truth))
    assert err <= allowed, f"{backend}: {err:.3g} at {magnitude:g}, {near_zero:.3g} near 0"


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("x", [3e38, -3e38, 1e30, 1e20])
def test_logits_near_the_float32_limit_give_correct_signs_and_values(backend, x):
    # Two equal logits anywhere in the fp32 range (the transformed logits finite): p = 1/2 each,
    # log p = -log 2, entropy log 2, and the gradient of the label's log-prob is +1/2 at the
    # label and -1/2 at the other entry; a third logit far below changes nothing.
    logits = torch.tensor([[[x, x], [x, x]]], device=DEVICE)
    third = torch.tensor([[[x, x, x - abs(x) * 0.5]]], device=DEVICE)
    fn = reference.token_logprobs if backend == "reference" else fastalign.token_logprobs
    for rows, labels in ((logits, torch.tensor([[0, 1]], device=DEVICE)), (third, torch.tensor([[1]], device=DEVICE))):
        leaf = rows.clone().requires_grad_(True)
        with fastalign.use_backend("reference" if backend == "reference" else backend):
            out = fn(leaf, labels, outputs=("entropy",))
            grad = torch.autograd.grad(out.logps.sum(), leaf)[0]
        torch.testing.assert_close(out.logps, torch.full_like(out.logps, -math.log(2.0)))
        torch.testing.assert_close(out.entropy, torch.full_like(out.entropy, math.log(2.0)))
        expected = torch.full_like(grad, -0.5)
        expected.scatter_(-1, labels.unsqueeze(-1), 0.5)
        if rows is third:
            expected[..., 2] = 0.0
        torch.testing.assert_close(grad, expected)


@st.composite
def linear_cases(draw):
    N = draw(st.integers(0, 9))
    H = draw(st.sampled_from([1, 3, 16, 33]))
    V = draw(st.sampled_from([1, 5, 31, 130]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(V, H, generator=g) * draw(st.sampled_from([0.1, 1.0, 4.0])) / max(H, 1) ** 0.5).to(dtype)
    weight = weight.to(DEVICE)
    bias = (torch.randn(V, generator=g).to(dtype).to(DEVICE)) if draw(st.booleans()) else None
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    if draw(st.booleans()):
        labels[torch.rand(N, generator=g).to(DEVICE) < 0.3] = -100
    transform = draw(st.sampled_from([{}, {"temperature": 0.7}, {"softcap": 5.0, "logit_scale": 0.5},
                                      {"logit_scale": -1.0}]))
    return hidden, weight, bias, labels, transform


@settings(max_examples=40)
@given(case=linear_cases())
def test_linear_token_logprobs_matches_float64_truth_on_every_backend(case):
    hidden, weight, bias, labels, transform = case
    weights = torch.randn(labels.shape, dtype=torch.float64, device=DEVICE)

    def run(fn, h, w, b):
        leaves = [t.detach().clone().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
        out = fn(*leaves[:2], labels, bias=leaves[2] if b is not None else None, outputs=("entropy",), **transform)
        loss = (out.logps.double() * weights).sum() + out.entropy.double().sum()
        grads = torch.autograd.grad(loss, leaves) if loss.requires_grad else [torch.zeros_like(t) for t in leaves]
        return out, grads

    def reference_linear(h, w, labels, bias=None, **kw):
        logits = h @ w.t() + (bias if bias is not None else 0)
        return reference.token_logprobs(logits, labels, **kw)

    b64 = None if bias is None else bias.double()
    truth, truth_grads = run(reference_linear, hidden.double(), weight.double(), b64)
    # The reference in the input dtype: its matmul in that dtype, its softmax as token_logprobs takes it.
    ref, ref_grads = run(reference_linear, hidden, weight, bias)
    for backend in BACKENDS:
        with fastalign.use_backend(backend):
            got, got_grads = run(fastalign.linear_token_logprobs, hidden, weight, bias)
        for name in ("logps", "entropy"):
            assert_as_accurate_as_reference(getattr(got, name), getattr(ref, name), getattr(truth, name),
                                            f"{backend} {name}")
        # The gradients are matmuls over the vocabulary (or the tokens), summed in another order
        # than ATen's: a wider slack than the elementwise fields.
        for i, (g_, r_, t_) in enumerate(zip(got_grads, ref_grads, truth_grads)):
            assert_as_accurate_as_reference(g_, r_, t_, f"{backend} grad[{i}]", slack_eps=16.0)


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@settings(max_examples=60)
@given(loss_type=st.sampled_from(DPO_LOSS_TYPES), B=st.integers(1, 4), seed=st.integers(0, 2**16),
       spread=st.sampled_from([0.1, 10.0, 1000.0]), beta=st.sampled_from([0.01, 0.1, 1.0]))
def test_dpo_losses_in_fp32_stay_finite_and_close_to_fp64(loss_type, B, seed, spread, beta):
    # Per-sequence log-probs from tiny to far apart (a reference log-prob of -5000 against a policy's
    # -10): wherever the float64 loss is finite, the fp32 one is too, and close to it.
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-(torch.rand(B, generator=g, dtype=torch.float64) * spread + 1.0) for _ in range(4))
    tokens = torch.randint(1, 50, (2, B), generator=g).double()
    smoothing = 1e-3 if loss_type in ("exo_pair", "robust", "aot", "aot_unpaired") else 0.0

    def run(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (pc, pr)]
        out = fastalign.dpo_loss(leaves[0], leaves[1], rc.to(dtype), rr.to(dtype), beta=beta, loss_type=loss_type,
                                 label_smoothing=smoothing, chosen_num_tokens=tokens[0].to(dtype),
                                 rejected_num_tokens=tokens[1].to(dtype))
        # sft reads the chosen completions only: the rejected ones get no gradient at all.
        grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
        return out.loss.detach().double(), [torch.zeros(B, dtype=torch.float64) if gr is None else gr.double()
                                             for gr in grads]

    loss64, grads64 = run(torch.float64)
    loss32, grads32 = run(torch.float32)
    if torch.isfinite(loss64):
        assert torch.isfinite(loss32), f"{loss_type}: fp32 loss {loss32} where fp64 gives {loss64}"
        assert abs(loss32 - loss64) <= 1e-4 * (1 + abs(loss64)), (loss_type, loss32, loss64)
    for g32, g64 in zip(grads32, grads64):
        finite = torch.isfinite(g64)
        assert torch.isfinite(g32[finite]).all(), loss_type
        assert ((g32 - g64)[finite].abs() <= 1e-4 * (1 + g64[finite].abs())).all(), (loss_type, g32, g64)


@settings(max_examples=60)
@given(estimator_scale=st.sampled_from([("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                        ("dr_grpo", "none"), ("rloo", "none")]),
       convention=st.sampled_from(["trl", "verl"]), group_size=st.sampled_from([1, 2, 3, 8]),
       groups=st.integers(1, 5), by_index=st.booleans(), nan=st.booleans(),
       magnitude=st.sampled_from([1e-3, 1.0, 1e4]), seed=st.integers(0, 2**16))
def test_group_advantages_match_float64_truth_on_every_backend(estimator_scale, convention, group_size, groups,
                                                                by_index, nan, magnitude, seed):
    estimator, scale = estimator_scale
    g = torch.Generator().manual_seed(seed)
    n = group_size * groups
    rewards = (torch.randn(n, generator=g, dtype=torch.float64) * magnitude).to(DEVICE)
    if nan and convention == "trl":
        rewards[torch.rand(n, generator=g).to(DEVICE) < 0.2] = math.nan  # unscorable: left out, advantage 0
    kwargs = dict(estimator=estimator, scale=scale, convention=convention)
    if by_index:
        # Arbitrary ids, groups interleaved (verl's uid).
        ids = torch.arange(groups).repeat_interleave(group_size)[torch.randperm(n, generator=g)] * 7 + 3
        kwargs["group_index"] = ids.to(DEVICE)
    else:
        kwargs["group_size"] = group_size
    with fastalign.use_backend("reference"):
        truth = fastalign.group_advantages(rewards, **kwargs)
        ref = fastalign.group_advantages(rewards.float(), **kwargs)
    for backend in BACKENDS:
        with fastalign.use_backend(backend):
            got = fastalign.group_advantages(rewards.float(), **kwargs)
        assert got.dtype == torch.float32 and got.shape == (n,)
        assert_as_accurate_as_reference(got, ref, truth, f"{backend} advantages")


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 7), length=st.integers(1, 40), magnitude=st.sampled_from([1e-3, 1.0, 1e6]),
       mask_kind=st.sampled_from(["ones", "random", "fractional", "spans"]), seed=st.integers(0, 2**16))
def test_remax_matches_verl_on_every_backend(rows, length, magnitude, mask_kind, seed):
    """verl 0.9.1 `compute_remax_outcome_advantage`: returns = flip-cumsum of rewards * mask,
    advantages = returns - baseline * mask; every backend gives verl-on-CPU's numbers exactly."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(rows, length, generator=g) * magnitude
    baselines = torch.randn(rows, generator=g) * magnitude
    if mask_kind == "ones":
        mask = torch.ones(rows, length)
    elif mask_kind == "random":
        mask = (torch.rand(rows, length, generator=g) > 0.3).float()
    elif mask_kind == "fractional":
        mask = torch.rand(rows, length, generator=g)
    else:  # tool-observation spans inside the response, then right padding
        mask = torch.ones(rows, length)
        mask[:, length // 3: length // 2] = 0
        mask[:, (3 * length) // 4:] = 0
    want, _ = core_algos.compute_remax_outcome_advantage(rewards, baselines, mask)
    for backend in BACKENDS:
        with fastalign.use_backend(backend):
            got = fastalign.remax_advantages(rewards.to(DEVICE), baselines.to(DEVICE), response_mask=mask.to(DEVICE))
        assert torch.equal(got.cpu(), want), backend
