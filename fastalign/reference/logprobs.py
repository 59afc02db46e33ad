"""Token log-probs in plain PyTorch (the ground truth), and its adapter to the op contract.

The math, per row of logits x and label y:
    z = softcap * tanh(x * logit_scale / softcap) / temperature     (TRL's order; no softcap: x * scale / T)
    logp = z_y - logsumexp(z)            entropy = -sum p log p         p = softmax(z)
    (each z - max z taken as (u - u_max) * factor, see `sweep_values`)
    log_sum_sq_probs = log sum p^2       mean_logits = mean(z)          is_top1 = (argmax z == y)
Positions whose label is ignore_index give 0 (False) and no gradient. Computation runs in fp32
(fp64 for fp64 logits) whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._checks import check_label_range, check_token_logprobs_args
from ..types import TokenLogprobs


def sweep_values(
    logits: torch.Tensor, temperature: float = 1.0, logit_scale: float = 1.0, softcap: float = 0.0
) -> tuple[torch.Tensor, float]:
    """(u, factor) with z = u * factor: u = tanh(x * logit_scale / softcap) and factor = softcap / T
    with softcap, u = x and factor = logit_scale / T without; fp32 (fp64 stays fp64).

    Every backend measures a logit against the row's maximum as (u - u_max) * factor: the
    difference of two logits is exact when they are close, so the largest probabilities keep full
    precision whatever the logits' magnitude (z - lse with z and lse rounded would not: at |z| = 1e4
    the rounding alone is 5e-4)."""
    u = logits if logits.dtype == torch.float64 else logits.float()
    if softcap:
        if logit_scale != 1.0:
            u = u * logit_scale
        return torch.tanh(u / softcap), softcap / temperature
    return u, logit_scale / temperature


def transform_logits(
    logits: torch.Tensor, temperature: float = 1.0, logit_scale: float = 1.0, softcap: float = 0.0
) -> torch.Tensor:
    """logit_scale, then softcap (0 = none), then temperature, upcast to fp32 (fp64 stays fp64)."""
    u, factor = sweep_values(logits, temperature, logit_scale, softcap)
    return u * factor if factor != 1.0 else u


def row_normalizer(u: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift, log_s, d) over the last dimension: shift is u at the row's largest z (0 where that is
    not finite, as logsumexp does), d = (u - shift) * factor = z - max z, log_s = log sum exp(d).
    log p = d - log_s. The shift carries no gradient (the softmax does not depend on it)."""
    with torch.no_grad():
        if u.shape[-1] == 0:  # amax refuses an empty dimension; the sum is 0 whatever the shift
            shift = u.new_zeros(u.shape[:-1])
        else:
            u_max = u.amax(-1) if factor >= 0 else u.amin(-1)
            shift = torch.where(torch.isfinite(u_max), u_max, 0.0)
    d = (u - shift.unsqueeze(-1)) * factor
    return shift, torch.logsumexp(d, dim=-1), d


def token_logprobs_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
    outputs: frozenset[str],
) -> dict[str, torch.Tensor]:
    """All per-token fields for logits [..., V] and labels [...]; differentiable in logits."""
    u, factor = sweep_values(logits, temperature, logit_scale, softcap)
    vocab = u.shape[-1]
    valid = labels != ignore_index
    # An out-of-range label gathers a clamped index and is turned into NaN below: never an OOB read.
    in_range = (labels >= 0) & (labels < vocab)
    index = torch.where(valid & in_range, labels, 0).long()
    zero = u.new_zeros(())
    shift, log_s, d = row_normalizer(u, factor)
    log_p = d - log_s.unsqueeze(-1)
    logps = log_p.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    logps = torch.where(in_range, logps, torch.full_like(logps, float("nan")))
    norm = torch.stack([shift, log_s.detach()], dim=-1)
    stats = {"logps": torch.where(valid, logps, zero), "norm": torch.where(valid.unsqueeze(-1), norm, zero)}
    if "entropy" in outputs or "log_sum_sq_probs" in outputs:
        p = log_p.exp()
    if "entropy" in outputs:
        # p = 0 where z = -inf: take 0 * log 0 as 0, in value and in gradient.
        plogp = p * torch.where(p > 0, log_p, zero)
        stats["entropy"] = torch.where(valid, -plogp.sum(-1), zero)
    if "log_sum_sq_probs" in outputs:
        stats["log_sum_sq_probs"] = torch.where(valid, torch.logsumexp(2 * log_p, dim=-1), zero).detach()
    if "mean_logits" in outputs:
        stats["mean_logits"] = torch.where(valid, (u * factor).mean(-1), zero).detach()
    if "is_top1" in outputs:
        # argmax returns the first maximum, so a tie with an earlier token is not a hit.
        stats["is_top1"] = valid & (d.argmax(-1) == labels)
    return stats


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    mask: torch.Tensor | None = None,
    outputs: Sequence[str] = (),
) -> TokenLogprobs:
    """The reference of `fastalign.token_logprobs`: same arguments, same result, plain autograd."""
    temperature, logit_scale, softcap_value, wanted = check_token_logprobs_args(
        logits, labels, temperature, ignore_index, logit_scale, softcap, mask, outputs
    )
    if mask is not None:
        labels = labels.masked_fill(mask == 0, ignore_index)
    if not torch.compiler.is_compiling():
        check_label_range(labels, logits.shape[-1], ignore_index)
    stats = token_logprobs_stats(logits, labels, temperature, logit_scale, softcap_value, ignore_index, wanted)
    return TokenLogprobs(
        logps=stats["logps"],
        entropy=stats.get("entropy"),
        log_sum_sq_probs=stats.get("log_sum_sq_probs"),
        mean_logits=stats.get("mean_logits"),
        is_top1=stats.get("is_top1"),
    )


# The op contract shared with the native and Triton backends: logits [B, T, V], labels [B*T].


def token_logprobs_forward(
    logits, labels, temperature, logit_scale, softcap, ignore_index,
    with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1,
):
    wanted = {
        name
        for name, flag in (
            ("entropy", with_entropy),
            ("log_sum_sq_probs", with_log_sum_sq_probs),
            ("mean_logits", with_mean_logits),
            ("is_top1", with_is_top1),
        )
        if flag
    }
    rows = labels.view(logits.shape[:-1])
    with torch.no_grad():
        stats = token_logprobs_stats(logits, rows, temperature, logit_scale, softcap, ignore_index, frozenset(wanted))
    acc = stats["logps"].dtype
    empty = logits.new_empty(0, dtype=acc)

    def field(name, dtype=acc):
        return stats[name].reshape(-1).to(dtype) if name in stats else logits.new_empty(0, dtype=dtype)

    return (
        stats["logps"].reshape(-1),
        field("entropy"),
        field("log_sum_sq_probs"),
        field("mean_logits"),
        field("is_top1", torch.bool) if with_is_top1 else empty.bool(),
        stats["norm"].reshape(-1, 2).clone(),
    )


def token_logprobs_backward(
    grad_logps, grad_entropy, logits, labels, norm, entropy, temperature, logit_scale, softcap, ignore_index
):
    """The gradient of sum(g * logps) + sum(gH * entropy) w.r.t. logits, written out:
        dz_j = g * (1[j = label] - p_j) - gH * p_j * (log p_j + H)       (0 where p_j = 0)
        dx_j = dz_j * logit_scale / T * (1 - tanh^2(x_j * logit_scale / softcap))   (no softcap: no tanh term)
    with log p_j = (u_j - shift) * factor - log_s from the forward's normalizer `norm` [B*T, 2] =
    (shift, log_s) (`row_normalizer`). The kernels implement this formula; tests check it against
    autograd of `token_logprobs_stats`. (Autograd cannot run inside a torch.library op body, hence
    the explicit form.)
    """
    vocab = logits.shape[-1]
    rows = labels.view(-1)
    u, factor = sweep_values(logits, temperature, logit_scale, softcap)
    u = u.reshape(-1, vocab)
    valid = (rows != ignore_index).unsqueeze(-1)
    norm = norm.to(u.dtype)
    log_p = (u - norm[:, :1]) * factor - norm[:, 1:]
    p = log_p.exp()
    dz = torch.zeros_like(u)
    if grad_logps is not None:
        g = grad_logps.to(u.dtype).unsqueeze(-1)
        dz -= p * g
        index = torch.where(valid.squeeze(-1), rows, 0).clamp(0, vocab - 1).unsqueeze(-1)
        dz.scatter_add_(-1, index, g.expand_as(index).clone())
    if grad_entropy is not None:
        h = entropy.to(u.dtype).unsqueeze(-1)
        dz -= grad_entropy.to(u.dtype).unsqueeze(-1) * torch.where(p > 0, p * (log_p + h), 0.0)
    dz = torch.where(valid, dz, 0.0) * (logit_scale / temperature)
    if grad_logps is not None:
        # An out-of-range label has a NaN log-prob (CUDA; CPU raises in the forward): so does its gradient.
        in_range = ((rows >= 0) & (rows < vocab)) | (rows == ignore_index)
        dz = torch.where(in_range.unsqueeze(-1), dz, float("nan"))
    if softcap:
        dz = dz * (1 - u * u)
    return dz.reshape(logits.shape).to(logits.dtype).contiguous()
