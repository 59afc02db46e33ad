"""topk_token_divergence: a student against a top-k teacher, in its tail and renormalized forms,
equal to the dense computation on the k(+1)-outcome distributions built in float64 from the full
student softmax; gradients, masks, every backend, and the argument errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params

import fastalign
from fastalign.topk_divergence import topk_token_divergence

N, V, K = 6, 50, 5


def case(dtype=torch.float64):
    g = torch.Generator().manual_seed(4)
    student = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).to(DEVICE, dtype)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    logps, ids = teacher.log_softmax(-1).topk(K, dim=-1)
    return student, ids.to(DEVICE), logps.to(DEVICE, dtype)


def dense_truth(student, ids, logps, form, divergence, temperature=1.0):
    """The two small distributions in float64 from the full softmax, then the textbook formula."""
    lp_s = (student.double() / temperature).log_softmax(-1).gather(-1, ids)
    lp_t = logps.double()
    if form == "tail":
        lp_s = torch.cat([lp_s, (1 - lp_s.exp().sum(-1, keepdim=True)).log()], -1)
        lp_t = torch.cat([lp_t, (1 - lp_t.exp().sum(-1, keepdim=True)).log()], -1)
    else:
        lp_s, lp_t = lp_s.log_softmax(-1), lp_t.log_softmax(-1)
    p_s, p_t = lp_s.exp(), lp_t.exp()
    if divergence == "forward_kl":
        return (p_t * (lp_t - lp_s)).sum(-1)
    if divergence == "reverse_kl":
        return (p_s * (lp_s - lp_t)).sum(-1)
    m = 0.5 * p_s + 0.5 * p_t
    return 0.5 * (p_t * (lp_t - m.log())).sum(-1) + 0.5 * (p_s * (lp_s - m.log())).sum(-1)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("form", ["tail", "renormalized"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_equals_dense_truth(divergence, form, backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    student, ids, logps = case(dtype)
    leaf = student.clone().requires_grad_()
    mask = torch.ones(N, dtype=torch.bool, device=DEVICE)
    mask[2] = False
    with fastalign.use_backend(backend):
        got = topk_token_divergence(leaf, ids, logps, form=form, divergence=divergence, beta=0.5, temperature=0.8,
                                    mask=mask).divergence
    got.sum().backward()
    truth_leaf = student.double().clone().requires_grad_()
    want = dense_truth(truth_leaf, ids, logps, form, divergence, temperature=0.8) * mask
    want.sum().backward()
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(leaf.grad.double(), truth_leaf.grad, **tol)
    assert bool((leaf.grad[2] == 0).all())


def test_full_vocabulary_top_k_is_the_dense_divergence():
    """k = V: the tail is empty and both forms are the ordinary divergence."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 9, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g, dtype=torch.float64)
    logps, ids = t.log_softmax(-1).sort(-1, descending=True)
    leaf = s.clone().requires_grad_()
    want = fastalign.token_divergence(s, t, divergence="forward_kl").divergence
    for form in ("tail", "renormalized"):
        got = topk_token_divergence(leaf, ids, logps, form=form).divergence
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        (grad,) = torch.autograd.grad(got.sum(), leaf)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(teacher_ids=torch.zeros(N, K + 1, dtype=torch.long)), r"^teacher_logps: expected shape \(6, 6\)"),
        (dict(teacher_ids=torch.zeros(N, K)), r"^teacher_ids: expected integer token ids"),
        (dict(teacher_logps=torch.zeros(N - 1, K)), r"^teacher_logps: expected shape \(6, 'k'\)"),
        (dict(teacher_ids=torch.full((N, K), V)), r"^teacher_ids: every id where the position counts must lie in"),
        (dict(form="topk"), r"^form: expected one of"),
    ],
)
def test_bad_arguments_are_named(change, match):
    student, ids, logps = case()
    args = dict(teacher_ids=ids.cpu(), teacher_logps=logps.cpu())
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        topk_token_divergence(student.cpu(), **args)


def test_distillation_loss_with_a_topk_teacher():
    student, ids, logps = case()
    mask = torch.tensor([1, 1, 0, 1, 1, 1], device=DEVICE)
    out = fastalign.distillation_loss(student, teacher_ids=ids, teacher_logps=logps, completion_mask=mask,
                                      divergence="forward_kl", temperature=0.8)
    per_token = topk_token_divergence(student, ids, logps, divergence="forward_kl", temperature=0.8,
                                      mask=mask).divergence
    torch.testing.assert_close(out.loss, per_token.sum() / 5)
    entropy = fastalign.token_logprobs(student, ids[:, 0], temperature=0.8, outputs=("entropy",)).entropy
    torch.testing.assert_close(out.metrics["entropy"], (entropy * mask).sum().float() / 5)
    with pytest.raises(ValueError, match=r"^teacher_ids / teacher_logps: a top-k teacher goes with student_logits"):
        fastalign.distillation_loss(student, student, teacher_ids=ids, teacher_logps=logps)
    with pytest.raises(ValueError, match=r"^teacher_ids / teacher_logps: a top-k teacher needs both"):
        fastalign.distillation_loss(student, teacher_ids=ids)
