"""The CPU path of `linear_token_logprobs`: blocks of tokens through ATen matmuls and the C++ row
kernels, so the peak extra memory is one block of logits, never [N, V].

Only the tokens that count are projected (rows whose label is ignore_index cost no matmul: TRL's
"compact" mode). Forward: per block, logits = h @ W.T (+ b) in the input dtype, then the row
kernel's one pass. Backward: per block, the logits again, the row kernel's gradient, then
grad_h = dz @ W and grad_W += dz.T @ h (fp32 accumulation): four matmul-equivalents in all.
"""

from __future__ import annotations

import torch

# Logits per block: 8M values (32 MiB in fp32) bound the extra memory whatever N and V are, and
# keep a block's rows in the tens even at V = 152K so the matmuls stay efficient.
BLOCK_ELEMENTS = 8 * 1024 * 1024


def _rows_per_block(vocab: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(vocab, 1))


def _valid_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (labels != ignore_index).nonzero().squeeze(1)


def _block_logits(hidden_block, weight, bias):
    logits = torch.mm(hidden_block, weight.t())
    if bias.numel():
        logits += bias
    return logits.unsqueeze(0)


def linear_token_logprobs_forward(
    hidden, weight, bias, labels, temperature, logit_scale, softcap, ignore_index,
    with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1,
):
    n, vocab = labels.shape[0], weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    flags = (with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1)
    outs = [torch.zeros(n, dtype=acc)]
    outs += [torch.zeros(n if flag else 0, dtype=acc) for flag in flags[:3]]
    outs += [torch.zeros(n if with_is_top1 else 0, dtype=torch.bool), torch.zeros(n, dtype=acc)]
    rows = _valid_rows(labels, ignore_index)
    step = _rows_per_block(vocab)
    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        logits = _block_logits(hidden.index_select(0, idx), weight, bias)
        fields = torch.ops.fastalign_cpu.token_logprobs_forward(
            logits, labels.index_select(0, idx), temperature, logit_scale, softcap, ignore_index, *flags
        )
        for out, field in zip(outs, fields):
            if out.numel():
                out.index_copy_(0, idx, field)
    return tuple(outs)


def linear_token_logprobs_backward(
    grad_logps, grad_entropy, hidden, weight, bias, labels, lse, entropy, temperature, logit_scale, softcap,
    ignore_index,
):
    vocab = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
    grad_weight = torch.zeros(weight.shape, dtype=acc)
    grad_bias = torch.zeros(vocab if bias.numel() else 0, dtype=acc)
    rows = _valid_rows(labels, ignore_index)
    step = _rows_per_block(vocab)

    def part(t, idx):
        return None if t is None or not t.numel() else t.index_select(0, idx)

    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        h = hidden.index_select(0, idx)
        logits = _block_logits(h, weight, bias)
        dz = torch.ops.fastalign_cpu.token_logprobs_backward(
            part(grad_logps, idx), part(grad_entropy, idx), logits, labels.index_select(0, idx),
            lse.index_select(0, idx), part(entropy, idx), temperature, logit_scale, softcap, ignore_index,
        )[0]
        del logits
        grad_hidden.index_copy_(0, idx, torch.mm(dz, weight).to(hidden.dtype))
        if dz.dtype == acc:
            grad_weight.addmm_(dz.t(), h)
        else:
            grad_weight.addmm_(dz.t().to(acc), h.to(acc))
        if bias.numel():
            grad_bias += dz.sum(0, dtype=acc)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)


def linear_policy_token_forward(
    hidden, weight, bias, labels, old_logps, ref_logps, advantages, w_pg, w_kl, grad_entropy,
    temperature, logit_scale, softcap, ignore_index, surrogate_id, kl_id, params, with_grad,
):
    """A token-level policy objective from hidden states in three matmul-equivalents: per block,
    logits = h @ W.T, then the C++ policy pass (log-probs and the logits gradient in one read),
    then grad_h = dz @ W and grad_W += dz.T @ h right away. Nothing is recomputed in backward."""
    n, vocab = labels.shape[0], weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logps, entropy, lse = (torch.zeros(n, dtype=acc) for _ in range(3))
    grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if with_grad else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape if with_grad else (0,), dtype=acc)
    grad_bias = torch.zeros(vocab if with_grad and bias.numel() else 0, dtype=acc)
    rows = _valid_rows(labels, ignore_index)
    step = _rows_per_block(vocab)

    def part(t, idx):
        return t if not t.numel() else t.index_select(0, idx)

    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        h = hidden.index_select(0, idx)
        logits = _block_logits(h, weight, bias)
        lp, ent, dz, ls = torch.ops.fastalign_cpu.policy_token_forward(
            logits, labels.index_select(0, idx), part(old_logps, idx), part(ref_logps, idx),
            part(advantages, idx), part(w_pg, idx), part(w_kl, idx), part(grad_entropy, idx),
            temperature, logit_scale, softcap, ignore_index, surrogate_id, kl_id, params, with_grad,
        )
        del logits
        logps.index_copy_(0, idx, lp)
        entropy.index_copy_(0, idx, ent)
        lse.index_copy_(0, idx, ls)
        if not with_grad:
            continue
        dz = dz[0]
        grad_hidden.index_copy_(0, idx, torch.mm(dz, weight).to(hidden.dtype))
        if dz.dtype == acc:
            grad_weight.addmm_(dz.t(), h)
        else:
            grad_weight.addmm_(dz.t().to(acc), h.to(acc))
        if grad_bias.numel():
            grad_bias += dz.sum(0, dtype=acc)
    return logps, entropy, grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype), lse
