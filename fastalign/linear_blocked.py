"""The CPU path of `linear_token_logprobs`: blocks of tokens through ATen matmuls and the C++ row
kernels, so the peak extra memory is one block of logits, never [N, V]. The token-blocked policy
pass here also serves the Triton backend, with cuBLAS matmuls and its Triton row kernel.

Only the tokens that count are projected (rows whose label is ignore_index cost no matmul: TRL's
"compact" mode). Forward: per block of tokens, logits = h @ W.T (+ b) in the input dtype, then the
row kernel's one pass. Backward: per tile of tokens x vocabulary columns, the logits again, the row
kernel's gradient, then grad_h += dz @ W_c and grad_W_c += dz.T @ h (fp32 accumulation): four
matmul-equivalents in all.
"""

from __future__ import annotations

import torch

# Logits per forward block: 8M values (32 MiB in fp32), so the extra memory does not grow with N ...
BLOCK_ELEMENTS = 8 * 1024 * 1024
# ... but at least 256 tokens: h @ W.T with a few dozen rows streams all of W from memory for little
# work. At V = 152K, 55-row blocks made the forward matmul 1.9x slower than 2048-row tiles, and the
# policy pass's grad_W += dz.T @ h ran once per 55 tokens (GRPO fwd+bwd 8.5 s; 256 rows: 6.0 s).
MIN_BLOCK_ROWS = 256
# The backward's tiles: up to 2048 tokens by as many vocabulary columns as make 2M values (8 MiB
# in fp32, at least 256 columns). Many tokens per tile keep grad_W's read-modify-writes rare.
TILE_TOKENS = 2048
TILE_ELEMENTS = 2 * 1024 * 1024
MIN_COLUMNS = 256


def _rows_per_block(vocab: int) -> int:
    return max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // max(vocab, 1))


def _valid_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (labels != ignore_index).nonzero().squeeze(1)


class _BlockLogits:
    """logits = h @ W.T (+ b) for successive blocks of tokens, written into one buffer allocated once
    per call: a fresh [rows, V] tensor per block would let the allocator's cached and fragmented
    blocks, not the block size, set the peak memory."""

    def __init__(self, rows: int, weight: torch.Tensor, bias: torch.Tensor):
        self.weight_t, self.bias = weight.t(), bias
        self.buffer = torch.empty(rows * weight.shape[0], dtype=weight.dtype, device=weight.device)

    def __call__(self, hidden_block: torch.Tensor) -> torch.Tensor:
        out = self.buffer[: hidden_block.shape[0] * self.weight_t.shape[1]].view(hidden_block.shape[0], -1)
        torch.mm(hidden_block, self.weight_t, out=out)
        if self.bias.numel():  # rounded after the product, as the unfused hidden @ W.T + b is
            out += self.bias
        return out.unsqueeze(0)


def _cpu_row_forward(logits, labels, *args):
    return torch.ops.fastalign_cpu.token_logprobs_forward(logits, labels, *args)


def accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with acc in fp32 (fp64) and a, b possibly 2-byte. On a GPU the product runs on
    the tensor cores with an fp32 output (cuBLAS's bf16 x bf16 -> fp32 GEMM) and is added in the
    same call: an fp32 copy of a and b would make it an fp32 GEMM, without tensor cores, several
    times slower (the weight gradient's V x H x rows product dominated the whole pass that way)."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.device.type == "cuda" and _FP32_OUTPUT_GEMM.get(acc.device.index, True):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):  # an older torch or a GPU without the fp32-output GEMM
            _FP32_OUTPUT_GEMM[acc.device.index] = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


# Per GPU: whether torch.addmm(..., out_dtype=float32) ran there (learnt on first use).
_FP32_OUTPUT_GEMM: dict[int | None, bool] = {}


def linear_token_logprobs_forward(
    hidden, weight, bias, labels, temperature, logit_scale, softcap, ignore_index,
    with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1,
    row_forward=_cpu_row_forward, rows_per_block=None,
):
    """Per block of counted tokens: logits = h @ W.T (+ b), then `row_forward` (the backend's
    token_logprobs_forward row kernel: C++ here, Triton on a GPU) reads them once."""
    n, vocab = labels.shape[0], weight.shape[0]
    device = hidden.device
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    flags = (with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1)
    outs = [torch.zeros(n, dtype=acc, device=device)]
    outs += [torch.zeros(n if flag else 0, dtype=acc, device=device) for flag in flags[:3]]
    outs += [torch.zeros(n if with_is_top1 else 0, dtype=torch.bool, device=device),
             torch.zeros(n, 2, dtype=acc, device=device)]
    rows = _valid_rows(labels, ignore_index)
    step = max(1, min(rows_per_block or _rows_per_block(vocab), rows.numel()))
    block_logits = _BlockLogits(step, weight, bias)
    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        logits = block_logits(hidden.index_select(0, idx))
        fields = row_forward(
            logits, labels.index_select(0, idx), temperature, logit_scale, softcap, ignore_index, *flags
        )
        for out, field in zip(outs, fields):
            if out.numel():
                out.index_copy_(0, idx, field.to(out.dtype))
    return tuple(outs)


def linear_token_logprobs_backward(
    grad_logps, grad_entropy, hidden, weight, bias, labels, norm, entropy, temperature, logit_scale, softcap,
    ignore_index, need_hidden=True, need_weight=True,
):
    """Tiles of (tokens x vocabulary columns): each tile's logits are recomputed, turned into its
    gradient by the C++ row kernel (the forward's row normalizer makes a column block enough), then
    folded into grad_h and into that column block of grad_W. A tile spans TILE_TOKENS rows, so
    grad_W is read and written once per TILE_TOKENS tokens rather than once per small block."""
    vocab, width = weight.shape
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows = _valid_rows(labels, ignore_index)
    n = rows.numel()
    # A gradient nobody needs (need_*) is neither accumulated nor allocated: it comes back as [0].
    grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape if need_weight else (0,), dtype=acc)
    grad_bias = torch.zeros(vocab if bias.numel() and need_weight else 0, dtype=acc)
    if n == 0:
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)

    def part(t):
        return None if t is None or not t.numel() else t.index_select(0, rows)

    h_all = hidden.index_select(0, rows)
    labels_v, norm_v, g_v, gh_v, ent_v = (part(t) for t in (labels, norm, grad_logps, grad_entropy, entropy))
    grad_h = torch.zeros(n if need_hidden else 0, width, dtype=acc)
    tokens = min(n, TILE_TOKENS)
    columns = max(MIN_COLUMNS, TILE_ELEMENTS // tokens)
    for t0 in range(0, n, tokens):
        t1 = min(t0 + tokens, n)
        h = h_all[t0:t1]
        h_acc = h if h.dtype == acc else h.to(acc)
        for c0 in range(0, vocab, columns):
            c1 = min(c0 + columns, vocab)
            w = weight[c0:c1]
            logits = torch.mm(h, w.t())
            if bias.numel():
                logits += bias[c0:c1]
            dz = torch.ops.fastalign_cpu.token_logprobs_backward_columns(
                None if g_v is None else g_v[t0:t1], None if gh_v is None else gh_v[t0:t1], logits.unsqueeze(0),
                labels_v[t0:t1], norm_v[t0:t1], None if ent_v is None else ent_v[t0:t1],
                temperature, logit_scale, softcap, ignore_index, c0,
            )[0]
            del logits
            dz_acc = dz if dz.dtype == acc else dz.to(acc)
            if need_hidden:
                grad_h[t0:t1].addmm_(dz_acc, w if w.dtype == acc else w.to(acc))
            if need_weight:
                grad_weight[c0:c1].addmm_(dz_acc.t(), h_acc)
                if bias.numel():
                    grad_bias[c0:c1] += dz_acc.sum(0)
    if need_hidden:
        grad_hidden.index_copy_(0, rows, grad_h.to(hidden.dtype))
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)


def linear_token_logprobs_backward_by_rows(
    grad_logps, grad_entropy, hidden, weight, bias, labels, norm, entropy, temperature, logit_scale, softcap,
    ignore_index, need_hidden=True, need_weight=True, *, row_backward, rows_per_block,
):
    """The backward in blocks of whole rows, for a GPU: per block the logits again (one GEMM), the
    backend's row kernel turns them into dz, then grad_h = dz @ W and grad_W += dz.T @ h
    (`accumulate_product`). Four matmul-equivalents, each a large GEMM; the extra memory is two
    [rows, V] blocks (logits and dz)."""
    vocab = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    device = hidden.device
    rows = _valid_rows(labels, ignore_index)
    grad_hidden = (torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_hidden
                   else hidden.new_empty(0))
    grad_weight = torch.zeros(weight.shape if need_weight else (0,), dtype=acc, device=device)
    grad_bias = torch.zeros(vocab if bias.numel() and need_weight else 0, dtype=acc, device=device)
    n = rows.numel()
    if n == 0 or not (need_hidden or need_weight):
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)

    def part(t, idx):
        return None if t is None or not t.numel() else t.index_select(0, idx)

    step = max(1, min(rows_per_block, n))
    block_logits = _BlockLogits(step, weight, bias)
    for start in range(0, n, step):
        idx = rows[start:start + step]
        h = hidden.index_select(0, idx)
        logits = block_logits(h)
        dz = row_backward(
            part(grad_logps, idx), part(grad_entropy, idx), logits, labels.index_select(0, idx), norm.index_select(0, idx),
            part(entropy, idx), temperature, logit_scale, softcap, ignore_index,
        )[0]
        _add_block_gradients(dz, idx, h, weight, grad_hidden, grad_weight, grad_bias, need_hidden, need_weight)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)


def _add_block_gradients(dz, idx, h, weight, grad_hidden, grad_weight, grad_bias, need_hidden, need_weight):
    """A block's logits gradient dz [rows, V] into the block's rows `idx` of grad_hidden (dz @ W) and
    into the fp32 accumulators of grad_weight (dz.T @ h) and grad_bias."""
    if need_hidden:
        grad_hidden.index_copy_(0, idx, torch.mm(dz, weight).to(grad_hidden.dtype))
    if need_weight:
        accumulate_product(grad_weight, dz.t(), h)
        if grad_bias.numel():
            grad_bias += dz.sum(0, dtype=grad_bias.dtype)


def _cpu_policy_pass(logits, inputs, with_grad):
    """The C++ policy pass over a block: (logps, entropy, norm); with_grad, the gradient overwrites the logits."""
    if with_grad:
        return torch.ops.fastalign_cpu.policy_token_forward_(logits, *inputs)
    lp, ent, _, ls = torch.ops.fastalign_cpu.policy_token_forward(logits, *inputs, False)
    return lp, ent, ls


def linear_policy_token_forward(
    hidden, weight, bias, labels, old_logps, ref_logps, advantages, w_pg, w_kl, grad_entropy,
    temperature, logit_scale, softcap, ignore_index, surrogate_id, kl_id, params, with_grad,
    need_hidden=True, need_weight=True, policy_pass=_cpu_policy_pass, rows_per_block=None,
):
    """A token-level policy objective from hidden states in three matmul-equivalents: per block,
    logits = h @ W.T, then the policy pass (log-probs, and the logits gradient written over the
    block's logits in the same read), then grad_h = dz @ W and grad_W += dz.T @ h right away.
    Nothing is recomputed in backward. `policy_pass` is the backend's row kernel (C++ here; the
    Triton backend passes its own, with the matmuls on cuBLAS)."""
    n, vocab = labels.shape[0], weight.shape[0]
    device = hidden.device
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logps, entropy = (torch.zeros(n, dtype=acc, device=device) for _ in range(2))
    norm = torch.zeros(n, 2, dtype=acc, device=device)
    need_hidden, need_weight = with_grad and need_hidden, with_grad and need_weight
    grad_hidden = (torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_hidden
                   else hidden.new_empty(0))
    grad_weight = torch.zeros(weight.shape if need_weight else (0,), dtype=acc, device=device)
    grad_bias = torch.zeros(vocab if need_weight and bias.numel() else 0, dtype=acc, device=device)
    rows = _valid_rows(labels, ignore_index)
    step = max(1, min(rows_per_block or _rows_per_block(vocab), rows.numel()))
    block_logits = _BlockLogits(step, weight, bias)

    def part(t, idx):
        return t if not t.numel() else t.index_select(0, idx)

    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        h = hidden.index_select(0, idx)
        logits = block_logits(h)
        inputs = (
            labels.index_select(0, idx), part(old_logps, idx), part(ref_logps, idx), part(advantages, idx),
            part(w_pg, idx), part(w_kl, idx), part(grad_entropy, idx), temperature, logit_scale, softcap,
            ignore_index, surrogate_id, kl_id, params,
        )
        lp, ent, ls = policy_pass(logits, inputs, with_grad)
        logps.index_copy_(0, idx, lp.to(acc))
        entropy.index_copy_(0, idx, ent.to(acc))
        norm.index_copy_(0, idx, ls.to(acc))
        if not with_grad:
            continue
        _add_block_gradients(logits[0], idx, h, weight, grad_hidden, grad_weight, grad_bias, need_hidden, need_weight)
    return logps, entropy, grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype), norm
