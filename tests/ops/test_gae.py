"""fastalign.gae against verl's and TRL's own GAE loops, and every live backend against a float64
ground truth."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params
from numerics import assert_as_accurate_as_reference

import fastalign
from fastalign.reference import gae as reference

# --- the trainers' loops, ported as references ------------------------------------------------


def verl_masked_mean(values, mask, axis=None):
    # verl.utils.torch_functional.masked_mean (masked_sum, then the count plus 1e-8).
    return (values * mask).sum(axis=axis) / (mask.sum(axis=axis) + 1e-8)


def trl_masked_mean(values, mask, axis=None):
    # trl.trainer.utils.masked_mean (TRL 0.x, where the PPO trainer lived).
    return (values * mask).sum(axis=axis) / mask.sum(axis=axis)


def masked_var(values, mask, mean_fn, unbiased=True):
    # verl.utils.torch_functional.masked_var and trl.trainer.utils.masked_var: the same body.
    mean = mean_fn(values, mask)
    variance = mean_fn((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("At least one element in the mask has to be 1.")
        if mask_sum == 1:
            raise ValueError("The sum of the mask is one, which can cause a division by zero.")
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def masked_whiten(values, mask, mean_fn, shift_mean=True, unbiased=True):
    # masked_whiten of both trainers; the variance's Bessel choice is exposed as fastalign exposes it.
    mean, var = mean_fn(values, mask), masked_var(values, mask, mean_fn, unbiased)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def verl_gae(token_level_rewards, values, response_mask, gamma, lam, whiten=True, shift_mean=True, unbiased=True):
    """verl.trainer.ppo.core_algos.compute_gae_advantage_return, loop for loop."""
    with torch.no_grad():
        nextvalues = 0
        lastgaelam = 0
        advantages_reversed = []
        gen_len = token_level_rewards.shape[-1]
        for t in reversed(range(gen_len)):
            delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
        if whiten:
            advantages = masked_whiten(advantages, response_mask, verl_masked_mean, shift_mean, unbiased)
    return advantages, returns


def trl_gae(rewards, values, mask, gamma, lam, whiten=True, shift_mean=True, unbiased=True):
    """TRL's PPOTrainer.train advantage block (trl/trainer/ppo_trainer.py in TRL 0.x, later
    trl/experimental/ppo; TRL 1.16 no longer ships it): the loop, whitening over ~padding_mask and
    the masked fill."""
    padding_mask = ~mask.bool()
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    if whiten:
        advantages = masked_whiten(advantages, ~padding_mask, trl_masked_mean, shift_mean, unbiased)
        advantages = torch.masked_fill(advantages, padding_mask, 0)
    return advantages, returns


TRAINERS = {"verl": verl_gae, "trl": trl_gae}

# --- inputs -----------------------------------------------------------------------------------


def make_mask(kind: str, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Masks trainers produce, and the awkward ones."""
    t = torch.arange(T)
    if kind == "full":
        return torch.ones(B, T, dtype=torch.bool)
    if kind == "right_pad":  # completions of different lengths, padding after them
        ends = torch.randint(1, T + 1, (B,), generator=gen)
        return t < ends[:, None]
    if kind == "left_pad":
        starts = torch.randint(0, T, (B,), generator=gen)
        return t >= starts[:, None]
    if kind == "holes":  # tool-output tokens in the middle of a multi-turn response
        mask = torch.ones(B, T, dtype=torch.bool)
        for b in range(B):
            a = int(torch.randint(0, T - 1, (1,), generator=gen))
            mask[b, a : a + max(1, T // 4)] = False
        mask[:, -1] = False
        return mask
    if kind == "all_masked_row":
        mask = make_mask("right_pad", B, T, gen)
        mask[0] = False
        return mask
    if kind == "random":
        return torch.rand(B, T, generator=gen) > 0.4
    raise ValueError(kind)


MASKS = ["full", "right_pad", "left_pad", "holes", "all_masked_row", "random"]
COEFFS = [(0.99, 0.95), (1.0, 1.0), (0.0, 0.95), (1.0, 0.0), (0.9, 1.0)]


def make_inputs(B, T, mask_kind, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.1
    # A sparse terminal reward, as RLHF rewards are: most of the signal sits at one position.
    rewards[torch.arange(B), torch.randint(0, T, (B,), generator=gen)] += torch.randn(B, generator=gen,
                                                                                          dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = make_mask(mask_kind, B, T, gen)
    return rewards.to(dtype).to(DEVICE), values.to(dtype).to(DEVICE), mask.to(DEVICE)


# --- the reference equals the trainers --------------------------------------------------------


@pytest.mark.parametrize("semantics", ["verl", "trl"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("gamma,lam", COEFFS)
def test_reference_equals_trainer_loops(semantics, mask_kind, gamma, lam):
    rewards, values, mask = make_inputs(5, 37, mask_kind)
    for whiten, shift_mean, unbiased in [(False, True, True), (True, True, True), (True, False, True),
                                         (True, True, False)]:
        want_adv, want_ret = TRAINERS[semantics](rewards, values, mask.double(), gamma, lam, whiten, shift_mean,
                                                 unbiased)
        got_adv, got_ret = reference.gae(rewards, values, mask, gamma, lam, convention=semantics, whiten=whiten,
                                         shift_mean=shift_mean, unbiased=unbiased)
        # verl's 1e-8 in the masked mean's count is the only difference: ~1e-9 relative.
        torch.testing.assert_close(got_adv, want_adv, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(got_ret, want_ret, rtol=1e-12, atol=1e-12)


def test_semantics_differ_only_through_the_mask():
    rewards, values, mask = make_inputs(4, 20, "holes")
    verl = reference.gae(rewards, values, None, 0.99, 0.95, whiten=False)
    trl = reference.gae(rewards, values, None, 0.99, 0.95, convention="trl", whiten=False)
    torch.testing.assert_close(verl, trl, rtol=0, atol=0)
    verl = reference.gae(rewards, values, mask, 0.99, 0.95, whiten=False)
    trl = reference.gae(rewards, values, mask, 0.99, 0.95, convention="trl", whiten=False)
    assert not torch.allclose(verl[0], trl[0])


def test_hand_computed():
    # gamma = 0: the advantage is the one-step TD error r - v.
    rewards = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.25, 1.0]], dtype=torch.float64)
    adv, ret = fastalign.gae(rewards, values, None, 0.0, 0.5, whiten=False)
    torch.testing.assert_close(adv, rewards - values)
    torch.testing.assert_close(ret, rewards)
    # gamma = lam = 1: the advantage is the reward-to-go minus the value; returns the reward-to-go.
    adv, ret = fastalign.gae(rewards, values, None, 1.0, 1.0, whiten=False)
    to_go = torch.tensor([[6.0, 5.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, to_go - values)
    torch.testing.assert_close(ret, to_go)
    # verl: a masked middle token is stepped over (its value never enters a TD error, and it
    # repeats the advantage carried from its right); an all-masked row is 0.
    mask = torch.tensor([[True, False, True]])
    adv, ret = fastalign.gae(rewards, values, mask, 1.0, 1.0, whiten=False)
    torch.testing.assert_close(adv, torch.tensor([[1.0 + 3.0 - 0.5, 2.0, 2.0]], dtype=torch.float64))
    adv, _ = fastalign.gae(rewards, values, torch.zeros(1, 3, dtype=torch.bool), 1.0, 1.0, whiten=False)
    assert torch.equal(adv, torch.zeros_like(adv))


# --- every backend against the float64 ground truth -------------------------------------------


def run_backend(backend, rewards, values, mask, gamma, lam, **kwargs):
    with fastalign.use_backend(backend):
        return fastalign.gae(rewards, values, mask, gamma, lam, **kwargs)


def check_backend(backend, rewards, values, mask, gamma, lam, **kwargs):
    truth = reference.gae(rewards.double(), values.double(), mask, gamma, lam, **kwargs)
    ref = reference.gae(rewards, values, mask, gamma, lam, **kwargs)
    got = run_backend(backend, rewards, values, mask, gamma, lam, **kwargs)
    acc = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    for name, value, ref_value, true_value in zip(("advantages", "returns"), got, ref, truth):
        assert value.dtype == acc, f"{name}: dtype {value.dtype}, expected {acc}"
        # A tree scan rounds differently from the sequential loop: a few more ulps of slack.
        assert_as_accurate_as_reference(value, ref_value, true_value, name, slack_eps=32.0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("semantics", ["verl", "trl"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("whiten", [False, True])
def test_backends_match_ground_truth(backend, semantics, mask_kind, whiten):
    rewards, values, mask = make_inputs(6, 300, mask_kind, torch.float32)
    check_backend(backend, rewards, values, mask, 0.99, 0.95, convention=semantics, whiten=whiten)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("gamma,lam", COEFFS)
def test_backends_coefficients(backend, gamma, lam):
    rewards, values, mask = make_inputs(4, 200, "holes", torch.float32)
    check_backend(backend, rewards, values, mask, gamma, lam)
    check_backend(backend, rewards, values, mask, gamma, lam, convention="trl")


@pytest.mark.parametrize("backend", backend_params())
def test_backends_whitening_options(backend):
    rewards, values, mask = make_inputs(5, 150, "right_pad", torch.float32)
    for semantics in ("verl", "trl"):
        check_backend(backend, rewards, values, mask, 0.99, 0.95, convention=semantics, shift_mean=False)
        check_backend(backend, rewards, values, mask, 0.99, 0.95, convention=semantics, unbiased=False)
        check_backend(backend, rewards, values, None, 0.99, 0.95, convention=semantics)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_backends_dtypes(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32, bfloat16 and float16")
    rewards, values, mask = make_inputs(4, 130, "random", dtype)
    check_backend(backend, rewards, values, mask, 0.99, 0.95)
    # Mixed: bf16 rewards with fp32 values.
    check_backend(backend, rewards, values.float(), mask, 0.99, 0.95, convention="trl")


@pytest.mark.parametrize("backend", backend_params())
def test_backends_strided_inputs_and_mask_dtypes(backend):
    rewards, values, mask = make_inputs(4, 101, "holes", torch.float32)
    # The trainers' values[:, :-1] view and a transposed (column-major) rewards tensor.
    values_view = torch.cat([values, values[:, :1]], dim=1)[:, :-1]
    rewards_t = rewards.t().contiguous().t()
    assert not values_view.is_contiguous() or not rewards_t.is_contiguous()
    for m in (mask, mask.long(), mask.float(), mask.to(torch.int32), mask.t().contiguous().t()):
        check_backend(backend, rewards_t, values_view, m, 0.99, 0.95)
        check_backend(backend, rewards_t, values_view, m, 0.99, 0.95, convention="trl")


@pytest.mark.parametrize("backend", backend_params())
def test_backends_long_rows(backend):
    # The interpreter runs a block in about a millisecond per position group; it gets a row that
    # still spans several blocks and a partial one.
    T = 5000 if backend == "triton" and DEVICE == "cpu" else 32768
    rewards, values, mask = make_inputs(2, T, "holes", torch.float32)
    check_backend(backend, rewards, values, mask, 1.0, 1.0)
    check_backend(backend, rewards, values, mask, 0.999, 0.95, convention="trl")


def test_native_long_rows_equal_verl_loop():
    if not fastalign.available_backends("cpu")["native"][0]:
        pytest.skip("native backend not built")
    rewards, values, mask = make_inputs(3, 32768, "left_pad", torch.float32)
    want_adv, want_ret = verl_gae(rewards.double(), values.double(), mask.double(), 0.999, 0.99)
    with fastalign.use_backend("native"):
        adv, ret = fastalign.gae(rewards.cpu(), values.cpu(), mask.cpu(), 0.999, 0.99)
    torch.testing.assert_close(adv.double(), want_adv.cpu(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ret.double(), want_ret.cpu(), rtol=1e-4, atol=1e-4)


# --- behaviour --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
def test_whitening_needs_valid_tokens(backend):
    rewards, values, _ = make_inputs(2, 8, "full", torch.float32)
    nothing = torch.zeros(2, 8, dtype=torch.bool, device=DEVICE)
    one = nothing.clone()
    one[1, 3] = True
    with fastalign.use_backend(backend):
        with pytest.raises(ValueError, match="mask: whitening needs at least 2"):
            fastalign.gae(rewards, values, nothing, 0.99, 0.95)
        with pytest.raises(ValueError, match="mask: whitening needs at least 2"):
            fastalign.gae(rewards, values, one, 0.99, 0.95)
        with pytest.raises(ValueError, match="mask: whitening needs at least 1"):
            fastalign.gae(rewards, values, nothing, 0.99, 0.95, unbiased=False)
        adv, _ = fastalign.gae(rewards, values, one, 0.99, 0.95, unbiased=False)
        assert torch.isfinite(adv).all()
        adv, ret = fastalign.gae(rewards, values, nothing, 0.99, 0.95, whiten=False)
        assert torch.equal(adv, torch.zeros_like(adv))
        assert torch.equal(ret, values)


def test_forward_only_outputs_are_constants():
    rewards, values, mask = make_inputs(2, 16, "full", torch.float32)
    values.requires_grad_(True)
    adv, ret = fastalign.gae(rewards, values, mask, 0.99, 0.95)
    assert not adv.requires_grad and not ret.requires_grad
    assert isinstance(fastalign.gae(rewards, values, mask, 0.99, 0.95), fastalign.GAEOutput)


def test_torch_compile_fullgraph():
    if DEVICE != "cpu" or not fastalign.available_backends("cpu")["native"][0]:
        pytest.skip("fullgraph compilation on CPU goes through the C++ op")
    rewards, values, mask = make_inputs(3, 40, "holes", torch.float32)

    def step(r, v, m):
        adv, ret = fastalign.gae(r, v, m, 0.99, 0.95)
        return adv * 2, ret

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    for got, want in zip(compiled(rewards, values, mask), step(rewards, values, mask)):
        torch.testing.assert_close(got, want)


# --- bad input --------------------------------------------------------------------------------


def _bad_calls():
    r = torch.randn(2, 5)
    v = torch.randn(2, 5)
    m = torch.ones(2, 5, dtype=torch.bool)
    return [
        ("values", ValueError, "expected shape", dict(values=torch.randn(2, 4))),
        ("rewards", ValueError, "rank 2", dict(rewards=torch.randn(10), values=torch.randn(10), mask=None)),
        ("rewards", ValueError, "rank 2", dict(rewards=torch.randn(1, 2, 5), values=torch.randn(1, 2, 5), mask=None)),
        ("rewards", TypeError, "float", dict(rewards=torch.ones(2, 5, dtype=torch.long))),
        ("values", TypeError, "float", dict(values=torch.ones(2, 5, dtype=torch.int32))),
        ("rewards", TypeError, "torch.Tensor", dict(rewards=[[1.0] * 5] * 2)),
        ("mask", ValueError, "expected shape", dict(mask=torch.ones(2, 4, dtype=torch.bool))),
        ("mask", ValueError, "expected a tensor on", dict(mask=m.to("meta"))),
        ("mask", TypeError, "torch.Tensor or None", dict(mask=[1, 0])),
        ("gamma", ValueError, r"\[0, 1\]", dict(gamma=1.5)),
        ("gamma", ValueError, r"\[0, 1\]", dict(gamma=-0.1)),
        ("gamma", ValueError, r"\[0, 1\]", dict(gamma=float("nan"))),
        ("lam", ValueError, r"\[0, 1\]", dict(lam=1.01)),
        ("lam", TypeError, "number", dict(lam="0.9")),
        ("convention", ValueError, "'verl', 'trl'", dict(convention="ppo")),
        ("whiten", TypeError, "bool", dict(whiten=1)),
    ], r, v, m


BAD, _R, _V, _M = _bad_calls()


@pytest.mark.parametrize("name,error,message,change", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(name, error, message, change):
    args = dict(rewards=_R, values=_V, mask=_M, gamma=0.99, lam=0.95)
    args.update(change)
    kwargs = {k: args.pop(k) for k in ("convention", "whiten") if k in args}
    with pytest.raises(error, match=message) as info:
        fastalign.gae(args["rewards"], args["values"], args["mask"], args["gamma"], args["lam"], **kwargs)
    assert str(info.value).startswith(f"{name}:"), str(info.value)


def test_values_on_another_device_is_named():
    meta = torch.randn(2, 5, device="meta")
    with pytest.raises(ValueError, match="^values: expected a tensor on"):
        fastalign.gae(torch.randn(2, 5), meta, None, 0.99, 0.95)


def test_semantics_is_the_deprecated_name_of_convention():
    rewards, values, mask = make_inputs(2, 7, "holes", torch.float32)
    want = fastalign.gae(rewards, values, mask, 0.99, 0.95, convention="trl")
    with pytest.warns(DeprecationWarning, match="semantics= is deprecated; pass convention="):
        got = fastalign.gae(rewards, values, mask, 0.99, 0.95, semantics="trl")
    torch.testing.assert_close(got.advantages, want.advantages, rtol=0, atol=0)
    with pytest.raises(ValueError, match="semantics / convention: pass convention= only"):
        fastalign.gae(rewards, values, mask, 0.99, 0.95, semantics="trl", convention="trl")
