"""group_advantages / reinforce_plus_plus_advantages / remax_advantages against the trainers' own code, ported as
loops (TRL 1.16 GRPOTrainer / RLOOTrainer `_generate_and_score_completions`, verl
`core_algos.compute_*_outcome_advantage`), on every backend, plus the argument errors."""

from collections import defaultdict

import peers
import pytest
import torch

peers.require("trl")
peers.require("verl")
from trl.trainer.utils import nanstd  # noqa: E402
from verl.trainer.ppo.core_algos import compute_remax_outcome_advantage  # noqa: E402

import fastalign
from conftest import backend_params

BACKENDS = backend_params()


# --- the trainers' code, ported -----------------------------------------------------------------


def trl_grpo(rewards_per_func, weights, num_generations, scale_rewards="group", aggregation="sum_then_normalize"):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, the advantage block."""
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
        if scale_rewards in ["group", "none"]:
            if num_generations > 1:
                std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
            else:
                std = torch.zeros_like(rewards)
        else:
            std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = rewards - mean_grouped
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
    else:
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
        reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, rewards_per_func.shape[1])
        rewards = (reward_k * weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def trl_rloo(rewards, num_generations, normalize_advantages=False):
    """TRL 1.16 RLOOTrainer._generate_and_score_completions, the advantage block (one reward)."""
    grouped = rewards.view(-1, num_generations)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped, dim=1, keepdim=True)
    if num_generations > 1:
        advantages = rewards - ((grouped_sum - grouped) / (scorable - 1)).view(-1)
    else:
        advantages = torch.zeros_like(rewards)
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def _groups(index):
    id2 = defaultdict(list)
    for i, uid in enumerate(index.tolist()):
        id2[uid].append(i)
    return id2


def verl_grpo(scores, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    """verl compute_grpo_outcome_advantage (scores = token_level_rewards.sum(-1))."""
    scores = scores.clone()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(len(scores)):
        id2score[int(index[i])].append(scores[i])
    for idx, vals in id2score.items():
        if len(vals) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            id2mean[idx], id2std[idx] = torch.mean(torch.stack(vals)), torch.std(torch.stack(vals))
    for i in range(len(scores)):
        idx = int(index[i])
        if norm_adv_by_std_in_grpo:
            scores[i] = (scores[i] - id2mean[idx]) / (id2std[idx] + epsilon)
        else:
            scores[i] = scores[i] - id2mean[idx]
    return scores


def verl_rloo(scores, index):
    """verl compute_rloo_outcome_advantage."""
    scores = scores.clone()
    id2score, id2mean = defaultdict(list), {}
    for i in range(len(scores)):
        id2score[int(index[i])].append(scores[i])
    for idx, vals in id2score.items():
        id2mean[idx] = torch.tensor(0.0) if len(vals) == 1 else torch.mean(torch.stack(vals))
    for i in range(len(scores)):
        n = len(id2score[int(index[i])])
        if n > 1:
            scores[i] = scores[i] * n / (n - 1) - id2mean[int(index[i])] * n / (n - 1)
    return scores


def verl_masked_whiten(values, mask):
    """verl torch_functional.masked_whiten (masked_mean, unbiased masked_var, rsqrt(var + 1e-8))."""
    mean = (values * mask).sum() / mask.sum()
    var = (((values - mean) ** 2) * mask).sum() / mask.sum()
    var = var * (mask.sum() / (mask.sum() - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8)


def verl_reinforce_pp_baseline(token_level_rewards, response_mask, index):
    """verl compute_reinforce_plus_plus_baseline_outcome_advantage."""
    scores = token_level_rewards.sum(dim=-1)
    groups = _groups(index)
    means = {k: (torch.tensor(0.0, dtype=scores.dtype) if len(v) == 1 else scores[v].mean()) for k, v in groups.items()}
    scores = torch.stack([scores[i] - means[int(index[i])] for i in range(len(scores))])
    scores = scores.unsqueeze(-1).tile([1, token_level_rewards.shape[-1]]) * response_mask
    return verl_masked_whiten(scores, response_mask) * response_mask


def verl_reinforce_pp(token_level_rewards, response_mask, gamma):
    """verl 0.9.1 compute_reinforce_plus_plus_outcome_advantage,
    line for line: masked (observation) tokens are skipped, the running return carried across them."""
    with torch.no_grad():
        returns = torch.zeros_like(token_level_rewards)
        running_return = 0

        for t in reversed(range(token_level_rewards.shape[1])):
            new_running_return = token_level_rewards[:, t] + gamma * running_return
            returns[:, t] = new_running_return * response_mask[:, t]
            running_return = new_running_return * response_mask[:, t] + running_return * (1 - response_mask[:, t])

        advantages = verl_masked_whiten(returns, response_mask)
        advantages = advantages * response_mask

    return advantages, returns


# --- inputs ---------------------------------------------------------------------------------------


def adversarial_rewards(groups=6, g=4):
    r = torch.randn(groups * g, dtype=torch.float64)
    r[0:g] = 0.7  # all equal
    r[g] = float("nan")  # one NaN
    r[2 * g: 3 * g - 1] = float("nan")  # a single scorable reward
    r[3 * g: 4 * g] = float("nan")  # nothing scorable
    return r


def run(backend, fn, *args, **kwargs):
    with fastalign.use_backend(backend):
        return fn(*args, **kwargs)


def close(got, want, tol=2e-5):
    got, want = got.double(), want.double()
    assert got.shape == want.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    ok = ~torch.isnan(want)
    torch.testing.assert_close(got[ok], want[ok], atol=tol, rtol=tol)


# --- TRL --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("adversarial", [False, True])
@pytest.mark.parametrize("g", [1, 4])
def test_grpo_matches_trl(backend, scale, adversarial, g):
    r = adversarial_rewards(6, 4) if adversarial else torch.randn(24, dtype=torch.float64)
    want = trl_grpo(r.unsqueeze(1), torch.ones(1, dtype=torch.float64), g, scale)
    got = run(backend, fastalign.group_advantages, r.float(), group_size=g, scale=scale)
    assert got.dtype == torch.float32
    close(got, want, tol=1e-4 if scale != "none" else 2e-6)
    got64 = run(backend, fastalign.group_advantages, r, group_size=g, scale=scale) if backend != "triton" else None
    if got64 is not None:
        # TRL's nanstd forms its Bessel factor count / (count - 1) in float32 even for float64 input.
        close(got64, want, tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "none"])
def test_infinite_rewards_follow_trl_nan_to_num(backend, scale):
    r = torch.tensor([float("inf"), 1.0, 2.0, 3.0, -float("inf"), 0.5, 0.25, 0.0], dtype=torch.float64)
    want = trl_grpo(r.float().unsqueeze(1), torch.ones(1), 4, scale)
    got = run(backend, fastalign.group_advantages, r.float(), group_size=4, scale=scale)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want), (got, want)


def test_all_equal_group_gives_exact_zero():
    r = torch.full((8,), 0.1)
    for backend in ("reference", "native"):
        assert torch.equal(run(backend, fastalign.group_advantages, r, group_size=8), torch.zeros(8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_multi_reward_matches_trl(backend, aggregation):
    rk = torch.randn(16, 3, dtype=torch.float64)
    rk[1, 0] = rk[5, 2] = float("nan")
    rk[6] = float("nan")  # unscorable row
    rk[8:12, 1] = 2.0  # one column constant in a group
    w = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
    want = trl_grpo(rk, w, 4, "group", aggregation)
    got = run(backend, fastalign.group_advantages, rk.float(), group_size=4, reward_weights=w.float(),
              aggregation=aggregation)
    close(got, want, tol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("adversarial", [False, True])
@pytest.mark.parametrize("g", [1, 4])
def test_rloo_matches_trl(backend, normalize, adversarial, g):
    r = adversarial_rewards(6, 4) if adversarial else torch.randn(24, dtype=torch.float64)
    want = trl_rloo(r, g, normalize)
    got = run(backend, fastalign.group_advantages, r.float(), group_size=g, estimator="rloo",
              normalize_advantages=normalize)
    close(got, want, tol=1e-4)


# --- verl -------------------------------------------------------------------------------------------


def ragged_index(b=23):
    ids = torch.tensor([7, -3, 7, 100, 5, 5, 7, 100, -3, 5, 42, 7, 100, 5, 9, 9, 7, 5, 100, 9, 5, 7, 9])[:b]
    return ids  # groups of 6, 2, 4, 5, 1 (id 42), 4, shuffled


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", [True, False])
def test_grpo_matches_verl_ragged(backend, norm):
    index = ragged_index()
    r = torch.randn(len(index))
    r[index == 100] = 1.0  # all equal
    want = verl_grpo(r, index, 1e-6, norm)
    got = run(backend, fastalign.group_advantages, r, group_index=index, convention="verl",
              scale="group" if norm else "none")
    close(got, want, tol=1e-4)
    dr = run(backend, fastalign.group_advantages, r, group_index=index.int(), estimator="dr_grpo",
             convention="verl")
    close(dr, verl_grpo(r, index, 1e-6, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rloo_matches_verl_ragged(backend):
    index = ragged_index()
    r = torch.randn(len(index))
    mask = (torch.rand(len(index), 5) > 0.3).float()
    mask[3] = 0  # an all-masked row
    want = verl_rloo(r, index).unsqueeze(-1) * mask
    got = run(backend, fastalign.group_advantages, r, group_index=index, estimator="rloo", convention="verl",
              response_mask=mask)
    close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trl_ragged_equals_contiguous(backend):
    r = adversarial_rewards(6, 4).float()
    perm = torch.randperm(24)
    index = (torch.arange(24) // 4 * 13 + 1)[perm]
    got = run(backend, fastalign.group_advantages, r[perm], group_index=index)
    want = run("reference", fastalign.group_advantages, r, group_size=4)[perm]
    close(got, want, tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reinforce_pp_baseline_matches_verl(backend):
    index = ragged_index()
    token_rewards = torch.zeros(len(index), 6)
    token_rewards[:, -1] = torch.randn(len(index))
    mask = torch.ones(len(index), 6)
    mask[0, 2:] = 0
    mask[4] = 0  # all masked
    want = verl_reinforce_pp_baseline(token_rewards, mask, index)
    got = run(backend, fastalign.group_advantages, token_rewards.sum(-1), group_index=index,
              estimator="reinforce++-baseline", response_mask=mask)
    close(got, want, tol=1e-5)


def multi_turn_batch(dtype=torch.float32):
    """Rewards on every token, masked ones included (verl must drop those), and masks with the
    spans of multi-turn rollouts: interior zero spans (tool observations), right padding, a row
    starting with an observation, a fully masked row."""
    B, T = 6, 12
    rewards = torch.randn(B, T, dtype=dtype)
    mask = torch.ones(B, T, dtype=dtype)
    mask[1, 7:] = 0  # right padding after EOS
    mask[2, 3:6] = 0  # one tool observation
    mask[2, 10:] = 0
    mask[3, 1:3] = 0  # two observations in one response
    mask[3, 5:9] = 0
    mask[4, :4] = 0  # an observation first
    mask[5] = 0  # all masked
    return rewards, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_verl(backend, gamma):
    rewards, mask = multi_turn_batch()
    want_adv, want_ret = verl_reinforce_pp(rewards, mask, gamma)
    adv, ret = run(backend, fastalign.reinforce_plus_plus_advantages, rewards, mask, gamma=gamma)
    assert torch.equal(ret[mask == 0], torch.zeros(int((mask == 0).sum())))
    close(ret, want_ret, tol=1e-5)
    close(adv, want_adv, tol=1e-5)
    if backend != "triton":
        r64, m64 = rewards.double(), mask.double()
        want_adv, want_ret = verl_reinforce_pp(r64, m64, gamma)
        adv, ret = run(backend, fastalign.reinforce_plus_plus_advantages, r64, m64, gamma=gamma)
        assert ret.dtype == adv.dtype == torch.float64
        close(ret, want_ret, tol=1e-12)
        close(adv, want_adv, tol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reinforce_pp_fractional_mask_matches_verl(backend):
    # verl's scan is linear in the mask: a fractional weight blends "keep" and "skip".
    rewards, mask = multi_turn_batch()
    mask = mask * torch.tensor([1.0, 0.25, 0.5, 0.75]).repeat(3).unsqueeze(0)
    want_adv, want_ret = verl_reinforce_pp(rewards, mask, 0.9)
    adv, ret = run(backend, fastalign.reinforce_plus_plus_advantages, rewards, mask, gamma=0.9)
    close(ret, want_ret, tol=1e-5)
    close(adv, want_adv, tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reinforce_pp_carries_the_return_across_an_observation(backend):
    # By hand, gamma = 0.5: the observation's reward of 5 is dropped and its return is 0; the
    # return 0.5 from after it reaches the tokens before it (0.25, 0.125) undiscounted by it.
    rewards = torch.tensor([[0.0, 0.0, 5.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    _, ret = run(backend, fastalign.reinforce_plus_plus_advantages, rewards, mask, gamma=0.5)
    want = torch.tensor([[0.125, 0.25, 0.0, 0.5, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(ret, want), ret


@pytest.mark.parametrize("backend", [p for p in backend_params("cpu") if p.values[0] != "triton"])
def test_reinforce_pp_returns_are_verls_bit_for_bit_on_cpu(backend):
    # The same float ops in the same order as verl's eager loop (no FMA contraction in the C++).
    rewards, mask = multi_turn_batch()
    mask[0] = torch.rand(mask.shape[1])
    _, want = verl_reinforce_pp(rewards, mask, 0.9)
    _, got = run(backend, fastalign.reinforce_plus_plus_advantages, rewards, mask, gamma=0.9)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_ragged_groups_loop_over_blocks(backend):
    index = torch.cat([torch.zeros(1500, dtype=torch.int64), torch.ones(3, dtype=torch.int64)])
    r = torch.randn(1503)
    got = run(backend, fastalign.group_advantages, r, group_index=index)
    want = trl_grpo(r.double()[torch.argsort(index, stable=True)][:1500].unsqueeze(1),
                    torch.ones(1, dtype=torch.float64), 1500)
    close(got[:1500], want, tol=1e-4)


# --- ReMax ----------------------------------------------------------------------------------------


def remax_paper(rewards, greedy_rewards):
    """Li et al. 2023 (ReMax), Algorithm 1: the gradient weight of a sampled response is
    r(x, y_sampled) - r(x, y_greedy), the same on every token of the response."""
    return rewards - greedy_rewards


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_remax_token_level_equals_verls_function(backend, dtype):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the triton kernels take float32")
    rewards, mask = multi_turn_batch(dtype)
    rewards = rewards * torch.logspace(-4, 4, rewards.shape[1], dtype=dtype)  # sums that round
    baselines = torch.randn(rewards.shape[0], dtype=dtype)
    want_adv, want_ret = compute_remax_outcome_advantage(rewards, baselines, mask)
    got = run(backend, fastalign.remax_advantages, rewards, baselines, response_mask=mask)
    _, got_ret = run(backend, lambda *a: fastalign.advantages._remax(*a, None, None), rewards, baselines, mask)
    assert got.dtype == want_adv.dtype
    # verl on CPU: torch's cumsum accumulates in double, as every fastalign backend does.
    assert torch.equal(got_ret, want_ret)
    assert torch.equal(got, want_adv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_remax_outcome_reward_is_the_papers_advantage(backend):
    # One reward on the last response token (verl's outcome reward): every response token gets
    # r(sampled) - r(greedy); the [B] form gives the same numbers directly.
    B, T = 5, 7
    lengths = torch.tensor([7, 3, 1, 5, 6])
    mask = (torch.arange(T) < lengths.unsqueeze(1)).float()
    scores, greedy = torch.randn(B), torch.randn(B)
    token_rewards = torch.zeros(B, T)
    token_rewards[torch.arange(B), lengths - 1] = scores
    want = remax_paper(scores, greedy).unsqueeze(1) * mask
    got = run(backend, fastalign.remax_advantages, token_rewards, greedy, response_mask=mask)
    close(got, want, tol=1e-6)
    close(run(backend, fastalign.remax_advantages, scores, greedy, response_mask=mask), want, tol=1e-6)
    close(run(backend, fastalign.remax_advantages, scores, greedy), remax_paper(scores, greedy), tol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_remax_baseline_per_prompt(backend):
    # One greedy reward per prompt, shared by its samples: as runs (TRL's num_generations) or by index.
    scores, greedy = torch.randn(12), torch.randn(3)
    want = remax_paper(scores, greedy.repeat_interleave(4))
    close(run(backend, fastalign.remax_advantages, scores, greedy, group_size=4), want, tol=0)
    index = torch.tensor([2, 0, 1, 2, 0, 1])
    close(run(backend, fastalign.remax_advantages, scores[:6], greedy, group_index=index),
          remax_paper(scores[:6], greedy[index]), tol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_remax_long_rows_and_many_blocks(backend):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(300, 1100, generator=g)
    mask = (torch.rand(300, 1100, generator=g) > 0.2).float()
    baselines = torch.randn(300, generator=g)
    want, _ = compute_remax_outcome_advantage(rewards, baselines, mask)
    got = run(backend, fastalign.remax_advantages, rewards, baselines, response_mask=mask)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.randn(4), torch.randn(3)), {}, r"reward_baselines: expected shape \[4\]"),
        ((torch.randn(4), torch.randn(4, 1)), {}, "reward_baselines: expected shape"),
        ((torch.randn(4, 3), torch.randn(4)), {}, "response_mask: token-level rewards"),
        ((torch.randn(4, 3), torch.randn(4)), dict(response_mask=torch.ones(4, 2)), "response_mask: expected shape"),
        ((torch.randn(2, 3, 4), torch.randn(2)), {}, "rewards: expected shape"),
        ((torch.randn(4), torch.randn(2)), dict(group_size=3), "group_size: expected 4 rows"),
        ((torch.randn(4), torch.randn(2)), dict(group_size=2.0), "group_size: expected an int"),
        ((torch.randn(4), torch.randn(2)), dict(group_index=torch.tensor([0, 1, 2, 0])), r"group_index: expected indices in \[0, 2\)"),
        ((torch.randn(4), torch.randn(2)), dict(group_index=torch.tensor([0, 1, -1, 0])), "group_index: expected indices"),
        ((torch.randn(4), torch.randn(2)), dict(group_index=torch.zeros(4)), "group_index: expected an integer tensor"),
        ((torch.randn(4), torch.randn(2)), dict(group_size=2, group_index=torch.zeros(4, dtype=torch.int64)),
         "pass at most one"),
        ((torch.randn(4), torch.ones(4, dtype=torch.bool)), {}, "reward_baselines: expected a float"),
        ((torch.randn(0), torch.randn(0)), {}, "rewards: the batch is empty"),
    ],
)
def test_remax_bad_arguments_name_the_argument(args, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastalign.remax_advantages(*args, **kwargs)


def test_compiles_fullgraph_on_cpu():
    r = torch.randn(32)
    fn = torch.compile(lambda x: fastalign.group_advantages(x, group_size=8), fullgraph=True)
    close(fn(r), run("reference", fastalign.group_advantages, r, group_size=8), tol=1e-6)


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(group_size=5), "group_size: the batch of 8"),
        (dict(), "group_size, group_index: pass exactly one"),
        (dict(group_size=4, group_index=torch.zeros(8, dtype=torch.int64)), "exactly one"),
        (dict(group_index=torch.zeros(7, dtype=torch.int64)), r"group_index: expected shape \[8\]"),
        (dict(group_index=torch.zeros(8)), "group_index: expected an integer tensor"),
        (dict(group_size=4, scale="global"), "scale: expected one of 'group', 'batch', 'none'"),
        (dict(group_size=4, eps=-1e-3), "eps: expected a finite number >= 0"),
        (dict(group_size=4, reward_weights=torch.ones(2)), r"reward_weights: expected shape \[1\]"),
        (dict(group_size=4, response_mask=torch.ones(7, 3)), "response_mask: expected shape"),
        (dict(group_size=4, estimator="ppo"), "estimator: expected one of"),
        (dict(group_size=4, estimator="dr_grpo", scale="group"), "scale: estimator 'dr_grpo'"),
        (dict(group_size=4, estimator="reinforce++-baseline"), "response_mask: estimator"),
        (dict(group_size=0), "group_size: expected an int >= 1"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastalign.group_advantages(torch.randn(8), **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="rewards: expected shape"):
        fastalign.group_advantages(torch.randn(2, 3, 4), group_size=2)
    with pytest.raises(ValueError, match=r"reward_weights: expected shape \[3\]"):
        fastalign.group_advantages(torch.randn(8, 3), group_size=4, reward_weights=torch.ones(4))
    with pytest.raises(ValueError, match="response_mask: expected shape"):
        fastalign.reinforce_plus_plus_advantages(torch.randn(4, 5), torch.ones(4, 6))
    with pytest.raises(ValueError, match="gamma"):
        fastalign.reinforce_plus_plus_advantages(torch.randn(4, 5), torch.ones(4, 5), gamma=1.5)
