"""RRHF from logits in eager PyTorch, the way the released RRHF trainer computes it (Yuan et al.
2023; GanjinZero/RRHF train.py, `RRHFTrainer`): log_softmax over [N, T, V], gather, masked sums,
length-normalised scores, then per prompt the k x k pair masks `(r_j - r_i > 0) & (p_j - p_i < 0)`
summed as `p_i - p_j` (paper Eq. 2) and the best response's negative log-prob (Eq. 3).

The unfused oracle `fastalign.rrhf` is tested against and the eager baseline it is timed against.
It shares only the option checks (`rrhf_options`) with `fastalign.rrhf`; groups are walked one
prompt at a time here, where `fastalign.rrhf` pads them into one [G, K, K] tensor.
"""

from __future__ import annotations

import torch

from .._checks import options_from
from ..rrhf import RRHFOptions, rrhf_options
from ..types import LossOutput


def rrhf_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_index: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    options: RRHFOptions | None = None,
    **option_kwargs,
) -> LossOutput:
    """The RRHF loss (averaged over prompts) from `[N, T, V]` logits; arguments as
    `fastalign.rrhf_loss_from_logits` (no packing, no hidden states). Metrics: `rank_loss`, `sft_loss`."""
    options = options_from(options, option_kwargs, RRHFOptions, rrhf_options)
    z = logits if logits.dtype == torch.float64 else logits.float()
    mask = labels != ignore_index
    if completion_mask is not None:
        mask = mask & (completion_mask != 0)
    log_p = z.log_softmax(dim=-1)
    token = torch.where(mask, log_p.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1), 0.0)
    logps = token.sum(-1)
    lengths = mask.sum(-1).to(logps.dtype).clamp(min=1)
    scores = logps / lengths ** options.length_penalty
    if group_index is None:
        group_index = torch.arange(logits.shape[0], device=logits.device) // group_size
    rank_losses, sft_losses = [], []
    for prompt in torch.unique(group_index):
        rows = (group_index == prompt).nonzero().squeeze(1)
        p, r = scores[rows], rewards[rows].to(scores.dtype)
        diff = p.unsqueeze(0) - p.unsqueeze(-1)
        ranked = ((r.unsqueeze(0) - r.unsqueeze(-1)) > 0) & (diff < 0)
        rank_losses.append(-diff[ranked].sum())
        best = rows[torch.argmax(r)]
        sft = -logps[best]
        sft_losses.append(sft / lengths[best] if options.sft_reduction == "mean" else sft)
    rank, sft = torch.stack(rank_losses), torch.stack(sft_losses)
    loss = (options.rank_weight * rank + options.sft_weight * sft).mean()
    return LossOutput(loss, {"rank_loss": rank.detach().mean().float(), "sft_loss": sft.detach().mean().float()})
