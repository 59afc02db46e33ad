"""RRHF (Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human Feedback
without tears"): the paper's Eqs. 1-4 written as loops, the released training code's
`RRHFTrainer` (GanjinZero/RRHF train.py: `gather_logits_labels`, `get_score`, `rrhf_loss`,
`sft_loss`) ported, a float64 eager ground truth from logits on every backend, properties and
argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, backend_params
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import assert_as_accurate_as_reference

import fastalign
from fastalign.rrhf import RRHFLoss, rrhf_loss, rrhf_loss_from_logits


# --- the paper's formulas, as loops ------------------------------------------------------------------


def paper_rrhf(logps, num_tokens, rewards, groups, rank_weight=1.0, sft_weight=1.0, length_penalty=1.0,
               sft_reduction="sum"):
    """Eq. 1: p_i = sum_t log P(y_i,t | x, y_i,<t) / |y_i|^length_penalty;
    Eq. 2: L_rank = sum_{r_i < r_j} max(0, p_i - p_j);
    Eq. 3: L_ft = -sum_t log P(y_i',t | x, y_i',<t), i' = argmax_i r_i;
    Eq. 4: L = L_rank + L_ft (here weighted), averaged over the prompts of the batch."""
    total = 0.0
    for rows in groups:
        p = {i: logps[i] / max(float(num_tokens[i]), 1.0) ** length_penalty for i in rows}
        rank = sum(max(0.0, p[i] - p[j]) for i in rows for j in rows if rewards[i] < rewards[j])
        best = max(rows, key=lambda i: (float(rewards[i]), -rows.index(i)))  # the first of equal best
        sft = -logps[best] / (max(float(num_tokens[best]), 1.0) if sft_reduction == "mean" else 1.0)
        total = total + rank_weight * rank + sft_weight * sft
    return total / len(groups)


def groups_of(index: torch.Tensor) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for row, prompt in enumerate(index.tolist()):
        out.setdefault(prompt, []).append(row)
    return [out[k] for k in sorted(out)]


OPTIONS = [
    {},
    {"length_penalty": 0.0},
    {"length_penalty": 0.5, "sft_reduction": "mean"},
    {"rank_weight": 100.0, "sft_weight": 0.5},
    {"sft_weight": 0.0},
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_equals_the_papers_formulas_ragged(options):
    g = torch.Generator().manual_seed(1)
    index = torch.tensor([4, 1, 4, 7, 1, 4, 7, 7, 2, 2, 4])  # groups of 4, 2, 3, 2, not adjacent
    n = index.numel()
    logps = (-30 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_()
    num_tokens = torch.randint(0, 20, (n,), generator=g).double()
    num_tokens[3] = 0  # an empty response: probability 1, score 0
    rewards = torch.randint(0, 3, (n,), generator=g).double()  # ties, ranked pairs and equal best
    got = rrhf_loss(logps, num_tokens, rewards, group_index=index, **options)
    want_leaf = logps.detach().clone().requires_grad_()
    want = paper_rrhf(want_leaf, num_tokens, rewards, groups_of(index), **options)
    torch.testing.assert_close(got.loss, want, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(got.loss, logps)
    (want_grad,) = torch.autograd.grad(want, want_leaf)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)


def released_rrhf_trainer_loss(logits, labels, rw_scores, rrhf_weight=100.0, length_penalty=1.0):
    """GanjinZero/RRHF train.py, RRHFTrainer.compute_loss for its batch of one prompt (the
    collator's scores [1, k]): log_softmax, `gather_logits_labels`, `get_score`, `rrhf_loss`,
    `sft_loss`, `rrhf_weight * rrhf_loss + sft_loss`."""
    logits = F.log_softmax(logits, dim=-1)
    mask = (labels != -100).float()
    safe = labels.masked_fill(labels == -100, 0)
    logit_label = torch.gather(logits, dim=-1, index=safe.unsqueeze(-1)).squeeze(-1) * mask
    scores = logit_label.sum(-1) / (mask.sum(-1) ** length_penalty)
    diff = scores.unsqueeze(0) - scores.unsqueeze(-1)
    rw_diff = rw_scores.unsqueeze(0) - rw_scores.unsqueeze(-1)
    aval = torch.bitwise_and(rw_diff > 0, diff < 0)[0]
    rank = -diff[aval].sum()
    sft = -logit_label[torch.argmax(rw_scores)].mean()
    return rrhf_weight * rank + sft


def prompt_batch(k=4, T=9, V=31, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, T, V, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (k, T), generator=g)
    labels[:, :3] = -100  # the prompt
    for row, length in enumerate([9, 5, 7, 8][:k]):
        labels[row, length:] = -100  # right padding
    return logits, labels


def test_equals_the_released_trainer_for_one_prompt():
    # Its collator gives the rewards as [1, k] (one prompt per batch): the [0] of its [1, k, k] pair
    # mask is the whole k x k mask.
    logits, labels = prompt_batch()
    rewards = torch.tensor([[0.5, 2.0, -1.0, 0.5]], dtype=torch.float64)
    T = labels.shape[1]
    want = released_rrhf_trainer_loss(logits, labels, rewards)
    # Its SFT term is the best response's log-prob sum over the padded length T, so the same loss is
    # fastalign's with the SFT sum and the ranking weight scaled by T, divided by T.
    got = rrhf_loss_from_logits(logits, labels, rewards[0], group_size=4, rank_weight=100.0 * T)
    torch.testing.assert_close(got.loss / T, want, rtol=1e-12, atol=1e-12)


def test_released_pairwise_masks_are_equation_2():
    # The released code's pair selection, (r_j - r_i > 0) & (p_j - p_i < 0) summed as p_i - p_j, is Eq. 2.
    g = torch.Generator().manual_seed(3)
    scores, rw = torch.randn(6, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g).double()
    diff = scores.unsqueeze(0) - scores.unsqueeze(-1)
    aval = torch.bitwise_and((rw.unsqueeze(0) - rw.unsqueeze(-1)) > 0, diff < 0)
    released = -diff[aval].sum()
    got = rrhf_loss(scores, torch.ones(6, dtype=torch.float64), rw, group_size=6, sft_weight=0.0)
    torch.testing.assert_close(got.loss, released, rtol=1e-12, atol=1e-12)
    assert got.metrics["rank_loss"] == pytest.approx(float(released), rel=1e-6)


# --- every backend against a float64 eager ground truth -----------------------------------------------


def eager_from_logits(logits, labels, rewards, group_size, **options):
    logp = torch.log_softmax(logits.double(), dim=-1)
    mask = labels != -100
    token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    index = torch.arange(labels.shape[0]) // group_size
    return paper_rrhf(token.sum(-1), mask.sum(-1).double(), rewards, groups_of(index), **options)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [{}, {"length_penalty": 0.5, "sft_reduction": "mean", "rank_weight": 3.0}],
                         ids=str)
def test_from_logits_matches_float64_truth(backend, dtype, options):
    logits, labels = prompt_batch(k=4, dtype=torch.float64, seed=2)
    logits = torch.cat([logits, prompt_batch(k=4, seed=5)[0]]).to(DEVICE)  # two prompts of 4
    labels = torch.cat([labels, labels.flip(0)]).to(DEVICE)
    rewards = torch.tensor([0.1, 0.7, -0.3, 0.7, 2.0, -1.0, 0.0, 1.0], device=DEVICE)

    def loss_and_grad(fn, x):
        x = x.clone().requires_grad_()
        loss = fn(x)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    low = logits.to(dtype)
    truth, truth_grad = loss_and_grad(lambda x: eager_from_logits(x, labels.cpu(), rewards.cpu(), 4, **options),
                                      low.double().cpu())
    with fastalign.use_backend("reference"):
        ref, ref_grad = loss_and_grad(lambda x: rrhf_loss_from_logits(x, labels, rewards, group_size=4,
                                                                      **options).loss, low)
    with fastalign.use_backend(backend):
        got, got_grad = loss_and_grad(lambda x: rrhf_loss_from_logits(x, labels, rewards, group_size=4,
                                                                      **options).loss, low)
    assert_as_accurate_as_reference(got.cpu(), ref.cpu(), truth, "loss")
    assert got_grad.dtype == dtype
    assert_as_accurate_as_reference(got_grad.cpu(), ref_grad.cpu(), truth_grad, "grad")


@pytest.mark.parametrize("backend", backend_params())
def test_module_and_hidden_states_equal_the_function(backend):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(6, 5, 8, generator=g).to(DEVICE)
    weight = torch.randn(17, 8, generator=g).to(DEVICE)
    labels = torch.randint(0, 17, (6, 5), generator=g).to(DEVICE)
    labels[:, 0] = -100
    rewards = torch.tensor([3.0, 1.0, 2.0, 0.0, 5.0, 5.0], device=DEVICE)
    index = torch.tensor([0, 0, 0, 1, 1, 1], device=DEVICE)
    with fastalign.use_backend(backend):
        plain = rrhf_loss_from_logits(hidden @ weight.T, labels, rewards, group_index=index, length_penalty=0.7)
        fused = RRHFLoss(length_penalty=0.7)(labels=labels, rewards=rewards, group_index=index, hidden=hidden,
                                             weight=weight)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-5)
    for name in plain.metrics:
        torch.testing.assert_close(fused.metrics[name], plain.metrics[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_the_eager_oracle_equals_the_paper(options):
    # fastalign.reference.rrhf (the benchmark's eager baseline) against the paper's loops, ragged groups.
    from fastalign.reference import rrhf as reference_rrhf

    logits, labels = prompt_batch(k=4, seed=7)
    logits, labels = torch.cat([logits, logits[:3].flip(1)]), torch.cat([labels, labels[:3]])
    index = torch.tensor([5, 2, 5, 5, 2, 9, 9])
    rewards = torch.tensor([0.3, 1.0, -2.0, 0.3, 4.0, 1.0, 1.5], dtype=torch.float64)
    got = reference_rrhf.rrhf_loss_from_logits(logits, labels, rewards, group_index=index, **options)
    logp = torch.log_softmax(logits, dim=-1)
    mask = labels != -100
    token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    want = paper_rrhf(token.sum(-1), mask.sum(-1).double(), rewards, groups_of(index), **options)
    torch.testing.assert_close(got.loss, want, rtol=1e-12, atol=1e-12)
    fused = rrhf_loss_from_logits(logits, labels, rewards, group_index=index, **options)
    torch.testing.assert_close(fused.loss, want, rtol=1e-12, atol=1e-12)
    for name in ("rank_loss", "sft_loss"):
        torch.testing.assert_close(fused.metrics[name], got.metrics[name], msg=name)


# --- properties ---------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16),
       length_penalty=st.sampled_from([0.0, 0.5, 1.0, 2.0]))
def test_shuffling_the_rows_changes_nothing(sizes, seed, length_penalty):
    g = torch.Generator().manual_seed(seed)
    index = torch.cat([torch.full((k,), p) for p, k in enumerate(sizes)])
    n = index.numel()
    logps = -50 * torch.rand(n, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 30, (n,), generator=g)
    rewards = torch.randint(-2, 3, (n,), generator=g).double() * 1e3
    perm = torch.randperm(n, generator=g)
    # Equal best rewards pick the first in batch order: make the maximum unique per prompt.
    rewards = rewards + torch.arange(n, dtype=torch.float64) * 1e-6
    a = rrhf_loss(logps, counts, rewards, group_index=index, length_penalty=length_penalty)
    b = rrhf_loss(logps[perm], counts[perm], rewards[perm], group_index=index[perm] * 7 - 3,
                  length_penalty=length_penalty)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-12)
    want = paper_rrhf(logps, counts, rewards, groups_of(index), length_penalty=length_penalty)
    torch.testing.assert_close(a.loss, torch.as_tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-9)


def test_a_policy_ranking_like_the_rewards_pays_only_the_sft_term():
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    out = rrhf_loss(logps, torch.ones(4), torch.tensor([4.0, 3.0, 2.0, 1.0]), group_size=4)
    assert out.metrics["rank_loss"] == 0 and out.metrics["rewards/accuracies"] == 1
    torch.testing.assert_close(out.loss, torch.tensor(1.0))
    reversed_ = rrhf_loss(logps, torch.ones(4), torch.tensor([1.0, 2.0, 3.0, 4.0]), group_size=4)
    assert reversed_.metrics["rewards/accuracies"] == 0
    # Six pairs, each violated by p_i - p_j = (j - i) for i < j in rank: 1+2+3+1+2+1 = 10.
    torch.testing.assert_close(reversed_.metrics["rank_loss"], torch.tensor(10.0))


def test_equal_rewards_are_not_ranked():
    out = rrhf_loss(torch.tensor([-1.0, -9.0]), torch.ones(2), torch.zeros(2), group_size=2, sft_weight=0.0)
    assert out.loss == 0 and out.metrics["rewards/accuracies"] == 1


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rank_weight=-1.0), ValueError, "rank_weight: expected a finite number >= 0"),
        (dict(sft_weight=float("nan")), ValueError, "sft_weight"),
        (dict(length_penalty=-0.5), ValueError, "length_penalty: expected a finite number >= 0"),
        (dict(sft_reduction="token"), ValueError, "sft_reduction: expected one of 'sum', 'mean'"),
        (dict(rank_weight=0.0, sft_weight=0.0), ValueError, "rank_weight, sft_weight: both are 0"),
        (dict(beta=0.1), TypeError, "beta"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        rrhf_loss(torch.zeros(4), torch.ones(4), torch.zeros(4), group_size=2, **kwargs)
    with pytest.raises(error, match=match):
        RRHFLoss(**kwargs)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.zeros(4), torch.ones(4), torch.zeros(4)), {}, ValueError, "group_size, group_index: pass exactly one"),
        ((torch.zeros(4), torch.ones(4), torch.zeros(4)), dict(group_size=3), ValueError,
         "group_size: the batch of 4 responses is not divisible"),
        ((torch.zeros(4), torch.ones(4), torch.zeros(4)), dict(group_size=0), ValueError, "group_size: expected an int >= 1"),
        ((torch.zeros(4), torch.ones(4), torch.zeros(4)), dict(group_index=torch.zeros(3, dtype=torch.int64)),
         ValueError, r"group_index: expected shape \[4\]"),
        ((torch.zeros(4), torch.ones(4), torch.zeros(4)), dict(group_index=torch.zeros(4)), TypeError,
         "group_index: expected an integer tensor"),
        ((torch.zeros(4), torch.ones(4), torch.zeros(3)), dict(group_size=2), ValueError, r"rewards: expected shape \[4\]"),
        ((torch.zeros(4), torch.ones(4), torch.tensor([0.0, float("nan"), 1.0, 2.0])), dict(group_size=2), ValueError,
         "rewards: expected finite rewards, found nan at position 1"),
        ((torch.zeros(4), torch.ones(4), torch.zeros(4, dtype=torch.bool)), dict(group_size=2), TypeError,
         "rewards: expected a float or integer tensor"),
        ((torch.zeros(4), -torch.ones(4), torch.zeros(4)), dict(group_size=2), ValueError, "num_tokens: expected token counts"),
        ((torch.zeros(4, 1), torch.ones(4), torch.zeros(4)), dict(group_size=2), ValueError, "logps: expected a 1-d tensor"),
        ((torch.zeros(0), torch.ones(0), torch.zeros(0)), dict(group_size=2), ValueError, "logps: the batch is empty"),
    ],
)
def test_bad_sequence_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        rrhf_loss(*args, **kwargs)


def test_bad_logits_arguments():
    logits, labels = prompt_batch(k=4, dtype=torch.float32)
    rewards = torch.zeros(4)
    with pytest.raises(ValueError, match=r"logits: expected \[N, T, V\]"):
        rrhf_loss_from_logits(logits[0], labels, rewards, group_size=2)
    with pytest.raises(ValueError, match=r"labels: expected shape \(4, 9\)"):
        rrhf_loss_from_logits(logits, labels[:, :-1], rewards, group_size=2)
    with pytest.raises(ValueError, match=r"rewards: expected shape \[4\]"):
        rrhf_loss_from_logits(logits, labels, torch.zeros(8), group_size=2)
    with pytest.raises(TypeError, match="rewards: expected a torch.Tensor"):
        rrhf_loss_from_logits(logits, labels, [0.0] * 4, group_size=2)
    with pytest.raises(ValueError, match="completion_mask: expected shape"):
        rrhf_loss_from_logits(logits, labels, rewards, group_size=2, completion_mask=torch.ones(4, 3))
    with pytest.raises(ValueError, match="label"):
        rrhf_loss_from_logits(logits, labels.masked_fill(labels == -100, 99), rewards, group_size=2)
