"""linear_token_divergence / distillation_loss from hidden states: equal to token_divergence on the
materialized logits (every backend, blocks of a few tokens, gradients of both models' hidden states,
weights and biases), equal to TRL's DistillationTrainer loss with a teacher wider than the student,
and the argument errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params
from peers import require

import fastalign
from fastalign import linear_token_divergence, token_divergence

V, HS, HT = 41, 12, 20


def heads(dtype=torch.float64, n=(2, 5)):
    g = torch.Generator().manual_seed(5)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)

    return dict(student_hidden=rand(*n, HS), student_weight=rand(V, HS, scale=0.6), student_bias=rand(V, scale=0.3),
                teacher_hidden=rand(*n, HT), teacher_weight=rand(V, HT, scale=0.5), teacher_bias=rand(V, scale=0.3))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("divergence, options", [
    ("jsd", dict(beta=0.4)), ("forward_kl", dict(temperature=0.8, student_softcap=3.0)),
    ("reverse_kl", dict(teacher_logit_scale=0.7)), ("skew_reverse_kl", dict(skew=0.2)), ("tv", {}),
])
def test_equals_token_divergence_on_materialized_logits(divergence, options, backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], device=DEVICE)
    leaves = {k: v.clone().requires_grad_() for k, v in heads(dtype).items()}
    with fastalign.use_backend(backend):
        got = linear_token_divergence(**leaves, divergence=divergence, mask=mask, outputs=("entropy",),
                                      rows_per_block=3, **options)
        (got.divergence * torch.arange(10.0, device=DEVICE, dtype=dtype).view(2, 5)).sum().backward()
    want_leaves = {k: v.detach().clone().requires_grad_() for k, v in heads(dtype).items()}
    w = want_leaves
    s = w["student_hidden"] @ w["student_weight"].T + w["student_bias"]
    t = w["teacher_hidden"] @ w["teacher_weight"].T + w["teacher_bias"]
    with fastalign.use_backend("reference"):
        want = token_divergence(s, t, divergence=divergence, mask=mask, outputs=("entropy",), **options)
    (want.divergence * torch.arange(10.0, device=DEVICE, dtype=dtype).view(2, 5)).sum().backward()
    torch.testing.assert_close(got.divergence, want.divergence, **tol)
    torch.testing.assert_close(got.entropy, want.entropy, **tol)
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad, want_leaves[name].grad, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_loss_from_hidden_states_equals_trl(beta):
    """TRL's DistillationTrainer loss on the same heads: a teacher 20 wide, a student 12 wide."""
    trl_loss = require("trl.trainer.distillation_trainer")._chunked_divergence_loss
    h = heads(torch.float32)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]])
    transform = dict(temperature=0.9, student_logit_scale=1.3, teacher_final_logit_softcapping=4.0)
    trl_leaves = {k: h[k].clone().requires_grad_() for k in ("student_hidden", "student_weight", "student_bias")}
    loss, entropy_sum, n_valid = trl_loss(
        trl_leaves["student_hidden"], h["teacher_hidden"], trl_leaves["student_weight"], h["teacher_weight"], mask,
        beta, num_items_in_batch=torch.tensor(9), student_lm_head_bias=trl_leaves["student_bias"],
        teacher_lm_head_bias=h["teacher_bias"], **transform)
    loss.backward()
    ours = {k: h[k].clone().requires_grad_() for k in trl_leaves}
    out = fastalign.distillation_loss(
        **ours, teacher_hidden=h["teacher_hidden"], teacher_weight=h["teacher_weight"], teacher_bias=h["teacher_bias"],
        completion_mask=mask, beta=beta, num_items_in_batch=torch.tensor(9), temperature=0.9, student_logit_scale=1.3,
        teacher_softcap=4.0)
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["entropy"], entropy_sum / n_valid, rtol=1e-5, atol=1e-6)
    for name in ours:
        torch.testing.assert_close(ours[name].grad, trl_leaves[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(teacher_weight=torch.zeros(V + 1, HT)), r"^teacher_weight: expected the student's vocabulary V = 41"),
        (dict(student_weight=torch.zeros(V, HS + 1)), r"^student_weight: expected the lm_head weight \[V, 12\]"),
        (dict(teacher_hidden=torch.zeros(2, 4, HT)), r"^teacher_hidden: expected leading dims \(2, 5\)"),
        (dict(teacher_bias=torch.zeros(V - 1)), r"^teacher_bias: expected a tensor of shape \(41,\)"),
        (dict(student_hidden=torch.zeros(2, 5, HS, dtype=torch.int64)), r"^student_hidden: expected a floating"),
    ],
)
def test_bad_heads_are_named(change, match):
    h = {k: v.float() for k, v in heads().items()}
    h.update({k: v.to(DEVICE) if v.is_floating_point() and v.dtype != torch.float32 else v.to(DEVICE)
              for k, v in change.items()})
    with pytest.raises((ValueError, TypeError), match=match):
        linear_token_divergence(**h)


def test_distillation_loss_levels_are_exclusive():
    h = heads()
    s = h["student_hidden"] @ h["student_weight"].T
    with pytest.raises(ValueError, match=r"^student_logits / student_hidden: pass either"):
        fastalign.distillation_loss(s, s, **h)
    with pytest.raises(ValueError, match=r"^teacher_hidden, teacher_weight: the hidden-states level needs"):
        fastalign.distillation_loss(student_hidden=h["student_hidden"], student_weight=h["student_weight"])


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_loss_equals_liger_fused_linear_jsd(beta):
    """Liger's LigerFusedLinearJSDLoss with its hard (cross-entropy) term off: the same mean JSD over
    the tokens whose label is not -100, and the same student gradients. (Liger also pads a smaller
    student vocabulary with zero logits to the teacher's; fastalign requires one vocabulary.)"""
    LigerFusedLinearJSDLoss = require("liger_kernel.chunked_loss").LigerFusedLinearJSDLoss
    h = heads(torch.float32, n=(10,))
    labels = torch.randint(0, V, (10,), generator=torch.Generator().manual_seed(1))
    labels[[2, 7]] = -100
    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=0.8,
                                    compiled=False)
    student = ("student_hidden", "student_weight", "student_bias")
    theirs = {k: h[k].clone().requires_grad_() for k in student}
    want = liger(theirs["student_hidden"], theirs["student_weight"], h["teacher_hidden"], h["teacher_weight"], labels,
                 theirs["student_bias"], h["teacher_bias"])
    want.backward()
    ours = {k: h[k].clone().requires_grad_() for k in student}
    got = fastalign.distillation_loss(**ours, teacher_hidden=h["teacher_hidden"], teacher_weight=h["teacher_weight"],
                                      teacher_bias=h["teacher_bias"], labels=labels, beta=beta, temperature=0.8)
    got.loss.backward()
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    for name in student:
        torch.testing.assert_close(ours[name].grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("reduction, num_items", [("mean", None), ("mean", 7.0), ("sum", None)])
def test_one_pass_loss_equals_the_two_pass_path(reduction, num_items, backend):
    """distillation_loss from hidden states takes the student's gradients in its forward
    (linear_divergence_loss) unless the teacher needs one; both ways give one loss and gradient."""
    from fastalign.divergence import checked_options
    from fastalign.linear_divergence import linear_divergence_loss

    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], device=DEVICE)
    options = dict(beta=0.3, temperature=0.7, student_softcap=4.0)
    one = {k: v.clone().requires_grad_(k.startswith("student")) for k, v in heads(dtype).items()}
    two = {k: v.clone().requires_grad_() for k, v in heads(dtype).items()}  # the teacher needs a gradient
    with fastalign.use_backend(backend):
        got = fastalign.distillation_loss(**one, completion_mask=mask, reduction=reduction,
                                          num_items_in_batch=num_items, **options)
        want = fastalign.distillation_loss(**two, completion_mask=mask, reduction=reduction,
                                           num_items_in_batch=num_items, **options)
        got.loss.backward()
        want.loss.backward()
        # Blocks of 3 tokens, directly.
        params, _ = checked_options("jsd", 0.3, 0.1, 0.7, 1.0, 4.0, 1.0, None, (), "test")
        leaves = {k: v.clone().requires_grad_(k.startswith("student")) for k, v in heads(dtype).items()}
        weights = mask.reshape(-1).to(dtype)
        loss, _, _ = linear_divergence_loss(*(leaves[f"student_{p}"] for p in ("hidden", "weight", "bias")),
                                            *(leaves[f"teacher_{p}"] for p in ("hidden", "weight", "bias")),
                                            weights, params, False, rows_per_block=3)
        loss.backward()
    torch.testing.assert_close(got.loss, want.loss, **tol)
    torch.testing.assert_close(got.metrics["entropy"], want.metrics["entropy"], **tol)
    for name in ("student_hidden", "student_weight", "student_bias"):
        torch.testing.assert_close(one[name].grad, two[name].grad, **tol, msg=name)
    sums = fastalign.distillation_loss(**{k: v.detach() for k, v in heads(dtype).items()}, completion_mask=mask,
                                       reduction="sum", **options).loss
    torch.testing.assert_close(loss, sums, **tol)
    for name in ("student_hidden", "student_weight", "student_bias"):
        assert leaves[name].grad is not None


def test_one_pass_loss_refuses_a_second_derivative():
    h = {k: v.clone().requires_grad_(k.startswith("student")) for k, v in heads().items()}
    out = fastalign.distillation_loss(**h)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(out.loss, h["student_hidden"], create_graph=True)
