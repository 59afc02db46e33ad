"""linear_token_logprobs: equal to the unfused path (matmul -> logits -> token_logprobs) and to TRL's
ChunkedLogProbFunction, for every field, dtype and option, with gradients for hidden, weight, bias."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params
from numerics import assert_as_accurate_as_reference

import fastalign
from fastalign import linear_token_logprobs

ALL = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def make(n=29, h=24, v=203, dtype=torch.float32, bias=True):
    hidden = torch.randn(n, h, device=DEVICE).to(dtype)
    weight = (torch.randn(v, h, device=DEVICE) * 0.4).to(dtype)
    b = torch.randn(v, device=DEVICE).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), device=DEVICE)
    labels[[2, 7]] = -100
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, grads=("logps", "entropy"), **kwargs):
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    if bias is not None:
        leaves.append(bias.clone().requires_grad_())
    out = fn(leaves[0], leaves[1], leaves[2] if bias is not None else None, labels, **kwargs)
    loss = 0
    if "logps" in grads:
        loss = loss + (out.logps * torch.linspace(-1, 1, out.logps.numel(), device=out.logps.device).view_as(out.logps)).sum()
    if "entropy" in grads:
        loss = loss + 0.7 * out.entropy.sum()
    return out, torch.autograd.grad(loss, leaves)


def fused(hidden, weight, bias, labels, **kwargs):
    return linear_token_logprobs(hidden, weight, labels, bias=bias, **kwargs)


def unfused(hidden, weight, bias, labels, **kwargs):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return fastalign.reference.token_logprobs(logits, labels, **kwargs)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "options",
    [dict(), dict(temperature=0.7), dict(softcap=15.0, logit_scale=0.5), dict(temperature=1.3, bias=False)],
    ids=["plain", "temperature", "softcap-scale", "no-bias"],
)
@pytest.mark.parametrize("grads", [("logps",), ("entropy",), ("logps", "entropy")], ids=lambda g: "+".join(g))
def test_matches_unfused_float64_truth(backend, dtype, options, grads):
    options = dict(options)
    has_bias = options.pop("bias", True)
    hidden, weight, bias, labels = make(dtype=torch.float64, bias=has_bias)
    kwargs = dict(outputs=ALL, **options)
    truth, truth_grads = run(unfused, hidden, weight, bias, labels, grads, **kwargs)
    cast = [t.to(dtype) if t is not None else None for t in (hidden, weight, bias)]
    ref, ref_grads = run(unfused, *cast, labels, grads, **kwargs)
    with fastalign.use_backend(backend):
        out, out_grads = run(fused, *cast, labels, grads, **kwargs)
    # bf16 logits round to 2**-8 relative whoever forms them; on a GPU the fused kernels' and each
    # block's GEMM sum in another order than the reference's one cuBLAS call, so their roundings
    # fall elsewhere and the error, the same in size, exceeded the reference's by up to 31% (H200).
    ratio = 1.5 if dtype == torch.bfloat16 and DEVICE != "cpu" else 1.0
    for name in ("logps", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_as_accurate_as_reference(getattr(out, name), getattr(ref, name), getattr(truth, name), name,
                                        ratio=ratio)
    assert torch.equal(out.is_top1, truth.is_top1) or dtype != torch.float32
    for name, g, r, t in zip(("hidden", "weight", "bias"), out_grads, ref_grads, truth_grads):
        assert g.dtype == dtype
        assert_as_accurate_as_reference(g, r, t, f"grad {name}", slack_eps=8.0)


def test_ignored_positions_cost_nothing_and_give_zero():
    hidden, weight, bias, labels = make()
    labels[:] = -100
    out, (gh, gw, gb) = run(fused, hidden, weight, bias, labels, outputs=("entropy",))
    assert out.logps.abs().max() == 0 and gh.abs().max() == 0 and gw.abs().max() == 0 and gb.abs().max() == 0


def test_equals_trl_chunked_logprob_function():
    chunked = pytest.importorskip("trl.kernels.chunked_logprob")
    hidden, weight, bias, labels = make(n=33, h=16, v=150)
    labels[labels < 0] = 0  # TRL's function has no ignore_index (its callers compact first)
    kwargs = dict(temperature=0.9, softcap=20.0, logit_scale=0.8)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    trl_out = chunked.ChunkedLogProbFunction.apply(*leaves[:3], labels, 0.9, 64, 20.0, 0.8, ALL)
    ((trl_out[0] * 0.5).sum() + trl_out[1].sum()).backward()
    ours = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = linear_token_logprobs(ours[0], ours[1], labels, bias=ours[2], outputs=ALL, **kwargs)
    ((out.logps * 0.5).sum() + out.entropy.sum()).backward()
    for ours_value, theirs in zip((out.logps, out.entropy, out.log_sum_sq_probs, out.mean_logits), trl_out[:4]):
        torch.testing.assert_close(ours_value, theirs.float(), rtol=1e-4, atol=1e-5)
    assert torch.equal(out.is_top1, trl_out[4].bool())
    for a, b in zip(ours, leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_tied_embeddings_view_weight_and_grad_accumulation():
    torch.manual_seed(1)
    vocab, width = 97, 16
    embedding = torch.nn.Embedding(vocab, width)
    ids = torch.randint(0, vocab, (3, 6))
    labels = torch.randint(0, vocab, (3, 6))

    def step(fn):
        embedding.zero_grad()
        hidden = torch.tanh(embedding(ids))
        out = fn(hidden, embedding.weight, labels)
        out.logps.sum().backward()
        return embedding.weight.grad.clone()

    fused_grad = step(lambda h, w, y: linear_token_logprobs(h, w, y))
    unfused_grad = step(lambda h, w, y: fastalign.reference.token_logprobs(h @ w.t(), y))
    torch.testing.assert_close(fused_grad, unfused_grad, rtol=1e-5, atol=1e-6)

    # A strided view of a bigger matrix, and .grad accumulating over two calls.
    big = torch.randn(vocab, 2 * width, requires_grad=True)
    hidden = torch.randn(4, width)
    y = torch.randint(0, vocab, (4,))
    for _ in range(2):
        linear_token_logprobs(hidden, big[:, ::2], y).logps.sum().backward()
    once = torch.zeros_like(big)
    view = big.detach().clone().requires_grad_()
    linear_token_logprobs(hidden, view[:, ::2], y).logps.sum().backward()
    once = view.grad
    torch.testing.assert_close(big.grad, 2 * once)
    assert big.grad[:, 1::2].abs().max() == 0


@pytest.mark.parametrize("softcap", [None, 10.0])
def test_blocks_and_tiles_smaller_than_the_batch(monkeypatch, softcap):
    """Several token blocks in the forward and (tokens x vocabulary columns) tiles in the backward
    (the peak-memory bound; labels in every column block) give the same result as one block."""
    from fastalign import linear_blocked

    hidden, weight, bias, labels = make(n=50, v=64, dtype=torch.float64)
    kwargs = dict(outputs=("entropy",), softcap=softcap, temperature=0.8)
    whole, whole_grads = run(fused, hidden, weight, bias, labels, **kwargs)
    monkeypatch.setattr(linear_blocked, "BLOCK_ELEMENTS", 64 * 7)
    monkeypatch.setattr(linear_blocked, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(linear_blocked, "TILE_TOKENS", 16)
    monkeypatch.setattr(linear_blocked, "TILE_ELEMENTS", 16 * 24)
    monkeypatch.setattr(linear_blocked, "MIN_COLUMNS", 8)
    parts, part_grads = run(fused, hidden, weight, bias, labels, **kwargs)
    torch.testing.assert_close(parts.logps, whole.logps)
    for a, b in zip(part_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    truth, truth_grads = run(unfused, hidden, weight, bias, labels, **kwargs)
    for a, b in zip(part_grads, truth_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["blocked", "fused"])
def test_triton_blocked_and_fused_passes(monkeypatch, mode):
    """The Triton backend's two ways (FASTALIGN_LINEAR_LOGPROBS): "blocked" (cuBLAS GEMMs per block
    of tokens and the Triton row kernels; here several blocks) and "fused" (the matmul inside the
    Triton kernels) agree with the float64 truth."""
    ok, why = fastalign.available_backends(DEVICE)["triton"]
    if not ok:
        pytest.skip(f"triton not live on {DEVICE}: {why}")
    from fastalign import _triton, linear_blocked

    monkeypatch.setattr(_triton, "LINEAR_LOGPROBS_PASS", mode)
    monkeypatch.setattr(_triton, "POLICY_BLOCK_ELEMENTS", 64 * 6)
    monkeypatch.setattr(_triton, "POLICY_MIN_BLOCK_ROWS", 1)
    calls = []
    for name in ("linear_token_logprobs_forward", "linear_token_logprobs_backward_by_rows"):
        original = getattr(linear_blocked, name)
        monkeypatch.setattr(linear_blocked, name,
                            lambda *a, _f=original, _n=name, **k: calls.append((_n, k["rows_per_block"])) or _f(*a, **k))
    hidden, weight, bias, labels = make(n=50, v=64, dtype=torch.float64)
    kwargs = dict(outputs=ALL, softcap=10.0, temperature=0.8)
    truth, truth_grads = run(unfused, hidden, weight, bias, labels, **kwargs)
    cast = [t.float() for t in (hidden, weight, bias)]
    ref, ref_grads = run(unfused, *cast, labels, **kwargs)
    with fastalign.use_backend("triton"):
        out, out_grads = run(fused, *cast, labels, **kwargs)
    assert calls == ([("linear_token_logprobs_forward", 6), ("linear_token_logprobs_backward_by_rows", 6)]
                     if mode == "blocked" else [])
    for name in ("logps", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_as_accurate_as_reference(getattr(out, name), getattr(ref, name), getattr(truth, name), name)
    assert torch.equal(out.is_top1, truth.is_top1)
    for name, g, r, t in zip(("hidden", "weight", "bias"), out_grads, ref_grads, truth_grads):
        assert_as_accurate_as_reference(g, r, t, f"grad {name}", slack_eps=8.0)


def test_unknown_triton_linear_pass(monkeypatch):
    ok, why = fastalign.available_backends(DEVICE)["triton"]
    if not ok:
        pytest.skip(f"triton not live on {DEVICE}: {why}")
    from fastalign import _triton

    monkeypatch.setattr(_triton, "LINEAR_LOGPROBS_PASS", "tiled")
    hidden, weight, bias, labels = make()
    with fastalign.use_backend("triton"), pytest.raises(
        ValueError, match=r"FASTALIGN_LINEAR_LOGPROBS: expected 'blocked' or 'fused', got 'tiled'"
    ):
        linear_token_logprobs(hidden, weight, labels, bias=bias)


@pytest.mark.parametrize("backend", backend_params())
def test_weight_gather_is_entered_for_the_forward_and_again_for_the_backward(backend):
    """weight_gather (what DeepSpeed ZeRO-3 parameters get automatically): the forward runs inside
    it, and the backward enters it again and reads the weight then, rather than keeping it."""
    import contextlib

    hidden, weight, bias, labels = make()
    entered = []

    @contextlib.contextmanager
    def gather():
        entered.append("enter")
        yield

    truth, truth_grads = run(fused, hidden, weight, bias, labels, outputs=("entropy",))
    with fastalign.use_backend(backend):
        out, grads = run(lambda h, w, b, y, **k: linear_token_logprobs(h, w, y, bias=b, weight_gather=gather, **k),
                         hidden, weight, bias, labels, outputs=("entropy",))
    assert entered == ["enter", "enter"]
    torch.testing.assert_close(out.logps, truth.logps)
    for g, t in zip(grads, truth_grads):
        torch.testing.assert_close(g, t)
    with pytest.raises(TypeError, match=r"^weight_gather: expected a function returning a context manager"):
        linear_token_logprobs(hidden, weight, labels, weight_gather=contextlib.nullcontext())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_gradient_accumulates_in_fp32(dtype):
    """accumulate_product adds a 2-byte product into an fp32 accumulator as the exact fp32 sum of
    the products (here on CPU, where the operands are upcast; on a GPU cuBLAS's fp32-output GEMM)."""
    from fastalign.linear_blocked import accumulate_product

    a, b = torch.randn(7, 5).to(dtype), torch.randn(5, 3).to(dtype)
    acc = torch.randn(7, 3)
    start = acc.clone()
    accumulate_product(acc, a, b)
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc, start + a.float() @ b.float())


def test_fp32_output_gemm_call_is_valid_for_this_torch():
    """The GPU branch of accumulate_product calls torch.addmm(acc, a, b, out_dtype=..., out=acc);
    on meta tensors that call is shape- and signature-checked without a GPU."""
    acc = torch.empty(7, 3, device="meta")
    a = torch.empty(7, 5, dtype=torch.bfloat16, device="meta")
    b = torch.empty(5, 3, dtype=torch.bfloat16, device="meta")
    out = torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    assert out.dtype == torch.float32 and out.shape == (7, 3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight=torch.randn(10, 5)), r"weight: expected shape \[V, 8\]"),
        (dict(weight=torch.randn(10, 8, dtype=torch.float64)), r"weight: expected dtype torch.float32"),
        (dict(bias=torch.randn(11)), r"bias: expected shape \(10,\)"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), r"labels: expected shape \(4,\)"),
        (dict(labels=torch.full((4,), 10)), r"labels: every value must lie in \[0, 10\)"),
        (dict(labels=torch.zeros(4)), r"labels: expected an int64 or int32 tensor"),
        (dict(temperature=0.0), r"temperature: expected a finite number > 0"),
        (dict(hidden=torch.zeros(4, 8, dtype=torch.int32)), r"hidden: expected a float32"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), labels=torch.zeros(4, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)
