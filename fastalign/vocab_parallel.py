"""Token log-probs on logits sharded along the vocabulary (tensor parallelism: Megatron's and verl's
vocabulary-parallel lm_head, torchtitan's `ColwiseParallel` with the output left sharded).

Each rank runs the ordinary one-pass kernel (`token_logprobs_forward`, any backend) over its own
slice of the vocabulary, then the ranks exchange a handful of numbers per token in one all-gather:
the slice's normalizer (shift, log-sum), the label's log-prob where the slice holds the label, and
the slice's entropy, log sum p^2, logit sum and top-1 flag as asked. Those combine exactly into the
whole vocabulary's fields; `[N, V]` is never gathered. The backward needs no communication: with
the combined normalizer and entropy, each rank's gradient is the ordinary kernel's on its slice.

How the slices combine. Slice r has z-max shift_r * f and log-sum log_s_r, so its log-sum-exp is
lse_r = shift_r * f + log_s_r (f: the transform's factor, `reference.logprobs.sweep_values`).
Measured from the slice with the largest lse_r (k), rel_r = (shift_r - shift_k) * f + log_s_r and
LS = logsumexp_r(rel_r) = lse - shift_k * f: differences of nearby values only, so log-probs keep
full precision at any logit magnitude, as the single-process kernels do. With w_r = exp(rel_r - LS),
the slice's share of the probability:

    log p(y)      = log q_o(y) - (LS - rel_o)                  (o: the slice holding y)
    entropy       = sum_r w_r * (H_r + LS - rel_r)             (H_r: the slice's own entropy)
    log sum p^2   = logsumexp_r(2 * (rel_r - LS) + lsq_r)
    mean logit    = sum_r V_r * mean_r / V
    is_top1       = the owner's top-1, and no earlier slice's max reaches it, no later one exceeds it

A token whose label lies in another slice runs through the local kernel with label 0 (its fields
that do not depend on the label are what is wanted); in backward the kernel's 1[j = 0] term of
that token is taken back out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabShard:
    """Where a rank's logits sit in the vocabulary: columns [start, start + size) of vocab_size."""

    group: object  # a torch.distributed ProcessGroup (None: the default group)
    rank: int
    start: int
    size: int
    vocab_size: int
    sizes: tuple[int, ...]


def is_vocab_sharded(logits: torch.Tensor) -> bool:
    """Whether `logits` is a DTensor sharded along its last (vocabulary) dimension."""
    placements = getattr(logits, "placements", None)
    if placements is None:
        return False
    from torch.distributed.tensor import Shard

    last = logits.dim() - 1
    return any(isinstance(p, Shard) and p.dim in (last, -1) for p in placements)


def local_shard(logits: torch.Tensor, process_group) -> tuple[torch.Tensor, VocabShard]:
    """(the rank's logits slice, its place in the vocabulary) from a DTensor sharded along the
    vocabulary, or from a plain local slice and the `process_group` whose ranks hold the slices in
    rank order. Collective: every rank of the group must call it."""
    if is_vocab_sharded(logits):
        from torch.distributed.tensor import Replicate, Shard

        if process_group is not None:
            raise ValueError("process_group: not used with DTensor logits (their device mesh names the group)")
        last = logits.dim() - 1
        sharded = [i for i, p in enumerate(logits.placements) if isinstance(p, Shard) and p.dim in (last, -1)]
        others = [p for i, p in enumerate(logits.placements) if i not in sharded]
        if len(sharded) != 1 or not all(isinstance(p, Replicate) for p in others):
            raise ValueError(
                f"logits: expected a DTensor sharded along the vocabulary on one mesh dimension and replicated "
                f"on the others, got placements {tuple(logits.placements)}"
            )
        group = logits.device_mesh.get_group(sharded[0])
        local = logits.to_local()
    else:
        group, local = process_group, logits
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: vocabulary-parallel logits need an initialized torch.distributed")
    world = dist.get_world_size(group)
    mine = torch.tensor([local.shape[-1]], dtype=torch.int64, device=local.device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    sizes_list = tuple(int(s) for s in torch.cat(sizes).tolist())
    rank = dist.get_rank(group)
    return local, VocabShard(group, rank, sum(sizes_list[:rank]), sizes_list[rank], sum(sizes_list), sizes_list)


def _transform_factor(temperature: float, logit_scale: float, softcap: float) -> float:
    return softcap / temperature if softcap else logit_scale / temperature


def _dz_dx(x: torch.Tensor, temperature: float, logit_scale: float, softcap: float) -> torch.Tensor:
    """d z / d x of the transform (scale, softcap, temperature) at raw logits x, in fp32."""
    x = x.float() if x.dtype != torch.float64 else x
    if softcap:
        u = torch.tanh(x * (logit_scale / softcap))
        return (1 - u * u) * (logit_scale / temperature)
    return torch.full_like(x, logit_scale / temperature)


def _combine(stats: torch.Tensor, shard: VocabShard, factor: float, wanted: frozenset[str]):
    """The whole vocabulary's fields from every slice's per-token stats [R, N, 8]: (shift, log_s,
    owns the label, log q(y), H_r, lsq_r, mean_r, top1_r), a field not asked for as zeros. Returns
    (logps, whether some slice owns the label, entropy, lsq, mean, top1, and the whole vocabulary's
    log-sum measured from this rank's shift); None for a field not asked for."""
    shift, log_s, owned, logq, ent, lsq, mean, top1 = stats.unbind(-1)
    lse_approx = shift * factor + log_s
    k = lse_approx.argmax(0, keepdim=True)  # the slice with the largest mass: the reference point
    rel = (shift - shift.gather(0, k)) * factor + log_s
    big = torch.logsumexp(rel, 0)  # LS = lse - shift_k * f
    owner = owned > 0
    logps = torch.where(owner, logq - (big - rel), 0.0).sum(0)
    any_owner = owner.any(0)
    entropy = lsq_out = mean_out = top1_out = None
    if "entropy" in wanted:
        w = torch.exp(rel - big)
        # A slice with no mass (w = 0, every logit -inf) adds nothing, whatever its H_r holds.
        entropy = torch.where(w > 0, w * (ent + big - rel), 0.0).sum(0)
    if "log_sum_sq_probs" in wanted:
        lsq_out = torch.logsumexp(torch.where(rel > float("-inf"), 2 * (rel - big) + lsq, float("-inf")), 0)
    if "mean_logits" in wanted:
        sizes = torch.tensor(shard.sizes, dtype=stats.dtype, device=stats.device).unsqueeze(1)
        mean_out = (mean * sizes).sum(0) / shard.vocab_size
    if "is_top1" in wanted:
        # A slice's largest z is shift * f; the owner's top-1 holds globally when no earlier slice's
        # maximum reaches it and no later one exceeds it (argmax takes the first maximum).
        owner_index = owner.float().argmax(0, keepdim=True)
        zmax_rel = (shift - shift.gather(0, owner_index)) * factor
        order = torch.arange(stats.shape[0], device=stats.device).unsqueeze(1)
        beaten = torch.where(order < owner_index, zmax_rel >= 0, zmax_rel > 0)
        beaten = beaten & (order != owner_index) & torch.isfinite(log_s)
        top1_out = any_owner & (torch.where(owner, top1, 0.0).sum(0) > 0) & ~beaten.any(0)
    my_log_s = big - (shift[shard.rank] - shift.gather(0, k).squeeze(0)) * factor
    return logps, any_owner, entropy, lsq_out, mean_out, top1_out, my_log_s


def _local_labels(labels, shard, ignore_index):
    """(labels in this slice's columns, counted, owned): a counted label another slice holds
    becomes column 0 here (its label-free fields are what this slice contributes)."""
    counted = labels != ignore_index
    owned = counted & (labels >= shard.start) & (labels < shard.start + shard.size)
    return torch.where(owned, labels - shard.start, torch.where(counted, 0, ignore_index)), counted, owned


def _exchange(local_fields, counted, owned, shard, temperature, logit_scale, softcap, wanted):
    """The slice's kernel outputs (logq, entropy, lsq, mean, top1, norm) -> the whole vocabulary's
    (logps, entropy, lsq, mean, top1) and its normalizer in this slice's shift, for the backward.
    One all-gather of 8 numbers per token."""
    logq, ent, lsq, mean, top1, norm = local_fields
    acc = norm.dtype
    n = counted.shape[0]

    def column(t):
        return t.to(acc) if t.numel() else torch.zeros(n, dtype=acc, device=norm.device)

    mine = torch.stack([norm[:, 0], norm[:, 1], owned.to(acc), column(logq), column(ent), column(lsq),
                        column(mean), column(top1)], dim=-1)
    parts = [torch.empty_like(mine) for _ in shard.sizes]
    dist.all_gather(parts, mine.contiguous(), group=shard.group)
    gathered = torch.stack(parts)
    factor = _transform_factor(temperature, logit_scale, softcap)
    logps, any_owner, entropy, lsq_out, mean_out, top1_out, my_log_s = _combine(gathered, shard, factor, wanted)
    # A counted label no slice holds lies outside [0, V): NaN, as the single-process kernels give
    # on a GPU (CPU tensors were refused before this point).
    logps = torch.where(counted & ~any_owner, float("nan"), logps)
    zero = torch.zeros((), dtype=acc, device=logps.device)
    logps = torch.where(counted, logps, zero)
    entropy = torch.where(counted, entropy, zero) if entropy is not None else logps.new_empty(0)
    lsq_out = torch.where(counted, lsq_out, zero) if lsq_out is not None else logps.new_empty(0)
    mean_out = torch.where(counted, mean_out, zero) if mean_out is not None else logps.new_empty(0)
    top1_out = (counted & top1_out) if top1_out is not None else torch.zeros(0, dtype=torch.bool, device=logps.device)
    return (logps, entropy, lsq_out, mean_out, top1_out), torch.stack([norm[:, 0], my_log_s], dim=-1)


class _VocabParallelTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, labels, shard, temperature, logit_scale, softcap, ignore_index, wanted):
        from .backend import current_backend
        from .logprobs import token_logprobs_forward

        local_labels, counted, owned = _local_labels(labels, shard, ignore_index)
        need_entropy = "entropy" in wanted
        local_fields = token_logprobs_forward(
            rows, local_labels, temperature, logit_scale, softcap, ignore_index,
            need_entropy, "log_sum_sq_probs" in wanted, "mean_logits" in wanted, "is_top1" in wanted,
        )
        fields, global_norm = _exchange(local_fields, counted, owned, shard, temperature, logit_scale, softcap,
                                        wanted)
        logps, entropy, lsq_out, mean_out, top1_out = fields
        ctx.save_for_backward(rows, local_labels, global_norm, entropy if need_entropy else None,
                              counted & ~owned)
        ctx.params = (temperature, logit_scale, softcap, ignore_index)
        ctx.backend = current_backend()
        ctx.mark_non_differentiable(lsq_out, mean_out, top1_out)
        return logps, entropy, lsq_out, mean_out, top1_out

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, *_unused):
        from .logprobs import token_logprobs_backward

        rows, local_labels, norm, entropy, elsewhere = ctx.saved_tensors
        temperature, logit_scale, softcap, ignore_index = ctx.params
        if entropy is None:
            grad_entropy = None
        grad_logps = None if grad_logps is None else grad_logps.to(norm.dtype)
        grad_entropy = None if grad_entropy is None else grad_entropy.to(norm.dtype)
        grad = token_logprobs_backward(grad_logps, grad_entropy, rows, local_labels, norm, entropy,
                                       temperature, logit_scale, softcap, ignore_index, ctx.backend)
        if grad_logps is not None and rows.shape[-1] > 0:
            # The tokens whose label lies in another slice ran with label 0: take their 1[j = 0] term
            # out. The kernel rounded g * (1 - p_0) to the logits' dtype, so for 2-byte logits that
            # one entry carries the absolute error the label's own entry has unsharded (|g| * 2^-9).
            flat = grad.view(-1, rows.shape[-1])
            x0 = rows.reshape(-1, rows.shape[-1])[:, 0]
            fix = torch.where(elsewhere, grad_logps * _dz_dx(x0, temperature, logit_scale, softcap), 0.0)
            flat[:, 0] -= fix.to(flat.dtype)
        return grad, None, None, None, None, None, None, None


def vocab_parallel_fields(rows, labels, shard, temperature, logit_scale, softcap, ignore_index, wanted):
    """(logps, entropy, log_sum_sq_probs, mean_logits, is_top1) over the whole vocabulary for rows
    [B, T, V_r] (this rank's slice) and labels [B*T] (global token ids); [0] for a field not asked."""
    return _VocabParallelTokenLogprobs.apply(rows, labels, shard, temperature, logit_scale, softcap, ignore_index,
                                             frozenset(wanted))


class _VocabParallelLinearTokenLogprobs(torch.autograd.Function):
    """The same exchange over hidden [N, H] (the same on every rank) and this rank's rows of the
    lm_head [V_r, H]: the slice's logits are formed block by block by the linear op, never whole.
    Backward: each rank's grad_hidden is its slice's share, summed over the group (one all-reduce of
    [N, H]); the weight and bias gradients are the slice's own."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, shard, temperature, logit_scale, softcap, ignore_index, wanted):
        from .backend import current_backend
        from .linear_logprobs import linear_token_logprobs_forward

        local_labels, counted, owned = _local_labels(labels, shard, ignore_index)
        need_entropy = "entropy" in wanted
        local_fields = linear_token_logprobs_forward(
            hidden, weight, bias, local_labels, temperature, logit_scale, softcap, ignore_index,
            need_entropy, "log_sum_sq_probs" in wanted, "mean_logits" in wanted, "is_top1" in wanted,
        )
        fields, global_norm = _exchange(local_fields, counted, owned, shard, temperature, logit_scale, softcap,
                                        wanted)
        logps, entropy, lsq_out, mean_out, top1_out = fields
        ctx.save_for_backward(hidden, weight, bias, local_labels, global_norm,
                              entropy if need_entropy else logps.new_empty(0), counted & ~owned)
        ctx.params = (temperature, logit_scale, softcap, ignore_index)
        ctx.with_entropy = need_entropy
        ctx.group = shard.group
        ctx.backend = current_backend()
        ctx.mark_non_differentiable(lsq_out, mean_out, top1_out)
        return logps, entropy, lsq_out, mean_out, top1_out

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, *_unused):
        from .linear_logprobs import linear_token_logprobs_backward

        hidden, weight, bias, local_labels, norm, entropy, elsewhere = ctx.saved_tensors
        temperature, logit_scale, softcap, ignore_index = ctx.params
        if not ctx.with_entropy:
            grad_entropy = None
        grad_logps = None if grad_logps is None else grad_logps.to(norm.dtype)
        grad_entropy = None if grad_entropy is None else grad_entropy.to(norm.dtype)
        need_hidden = ctx.needs_input_grad[0]
        need_weight = ctx.needs_input_grad[1] or (ctx.needs_input_grad[2] and bias.numel() != 0)
        if (grad_logps is None and grad_entropy is None) or not (need_hidden or need_weight):
            return (None,) * 10
        grad_hidden, grad_weight, grad_bias = linear_token_logprobs_backward(
            grad_logps, grad_entropy, hidden, weight, bias, local_labels, norm, entropy,
            temperature, logit_scale, softcap, ignore_index, ctx.backend, need_hidden, need_weight,
        )
        if grad_logps is not None:
            # Tokens whose label another slice holds ran with label 0 here: take their 1[j = 0] term
            # out of dz, and so out of grad_hidden (c * W_0), grad_weight[0] (c * h) and grad_bias[0].
            acc = norm.dtype
            x0 = hidden.to(acc) @ weight[0].to(acc) + (bias[0].to(acc) if bias.numel() else 0.0)
            c = torch.where(elsewhere, grad_logps * _dz_dx(x0, temperature, logit_scale, softcap), 0.0)
            if need_hidden:
                grad_hidden = (grad_hidden.to(acc) - c[:, None] * weight[0].to(acc)).to(grad_hidden.dtype)
            if need_weight:
                grad_weight[0] -= (c @ hidden.to(acc)).to(grad_weight.dtype)
                if bias.numel():
                    grad_bias[0] -= c.sum().to(grad_bias.dtype)
        if need_hidden:
            dist.all_reduce(grad_hidden, group=ctx.group)
        return (
            grad_hidden if ctx.needs_input_grad[0] else None,
            grad_weight if ctx.needs_input_grad[1] else None,
            grad_bias if ctx.needs_input_grad[2] and bias.numel() else None,
            *(None,) * 7,
        )


def vocab_parallel_linear_fields(hidden, weight, bias, labels, shard, temperature, logit_scale, softcap,
                                 ignore_index, wanted):
    """`vocab_parallel_fields` from hidden [N, H] and this rank's lm_head rows weight [V_r, H] (bias
    [V_r] or [0])."""
    return _VocabParallelLinearTokenLogprobs.apply(hidden, weight, bias, labels, shard, temperature, logit_scale,
                                                   softcap, ignore_index, frozenset(wanted))


def row_shard(weight: torch.Tensor, bias, process_group):
    """(local weight rows, local bias rows, VocabShard) for an lm_head split by rows over
    `process_group` (plain local rows, or a DTensor sharded along dim 0 on a 1-D mesh). Collective."""
    from torch.distributed.tensor import DTensor, Shard

    def local(t, name):
        if not isinstance(t, DTensor):
            return t
        if t.device_mesh.ndim != 1 or not isinstance(t.placements[0], Shard) or t.placements[0].dim != 0:
            raise ValueError(f"{name}: with process_group, expected this rank's rows of the lm_head (a plain tensor, "
                             f"or a DTensor sharded along dim 0 on a 1-D mesh), got placements {t.placements}")
        return t.to_local()

    weight, bias = local(weight, "weight"), local(bias, "bias")
    _, shard = local_shard(weight[:, 0], process_group)  # the rows' count, exchanged over the group
    return weight, bias, shard
