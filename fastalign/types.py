"""Result types returned by fastalign's functional API."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .zero3 import full_shape


class TokenLogprobs(NamedTuple):
    """Per-token fields, each shaped like `labels`, fp32 (fp64 for fp64 logits); None unless asked for.

    logps: log p(label), differentiable. entropy: -sum p log p, differentiable.
    log_sum_sq_probs: log sum_v p_v^2 (WPO weights). mean_logits: mean over the vocabulary of the
    transformed logits (DPO's logits/chosen metric). is_top1: the label is the first argmax (bool).
    Positions with label == ignore_index hold 0 (False).
    """

    logps: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


class LossOutput(NamedTuple):
    """A loss and the metrics trainers log with it.

    loss: the scalar to backpropagate. metrics: name -> detached 0-d fp32 tensor, under the
    names TRL's trainers log (e.g. "rewards/chosen", "logps/rejected"); tensors, not floats, so
    reading them is the caller's choice of when to synchronize.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


class HiddenStates(NamedTuple):
    """Logits given as hidden states and the lm_head (`hidden @ weight.T + bias`), never
    materialized. Quacks like the [..., V] logits it stands for where the losses check shapes and
    devices.

    Internal: the losses build it from their `hidden=, weight=, bias=` arguments
    (`fastalign._checks.policy_logits`). Passing one as a loss's `logits` still works, with a
    DeprecationWarning; pass hidden=, weight=, bias= instead."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    # Set when `weight` holds this rank's rows of a vocabulary-parallel lm_head: the whole vocabulary.
    vocab_size: int | None = None

    def _checked(self) -> "HiddenStates":
        # A NamedTuple takes anything; the losses read these attributes first, so a wrong part is
        # named here rather than failing as an AttributeError on the stand-in's shape.
        for name, value, shape in (("hidden", self.hidden, "[..., H]"), ("weight", self.weight, "[V, H]")):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}: expected a {shape} tensor, got {type(value).__name__}")
        if self.hidden.dim() < 1:
            raise ValueError("hidden: expected hidden states [..., H], got a 0-d tensor")
        if len(full_shape(self.weight)) != 2:
            raise ValueError(f"weight: expected the lm_head weight [V, H], got shape {tuple(self.weight.shape)}")
        if full_shape(self.weight)[0] == 0:
            raise ValueError("weight: the vocabulary dimension (V, the first) is empty")
        return self

    @property
    def shape(self) -> torch.Size:
        self._checked()
        vocab = full_shape(self.weight)[0] if self.vocab_size is None else self.vocab_size
        return torch.Size((*self.hidden.shape[:-1], vocab))

    @property
    def device(self) -> torch.device:
        return self._checked().hidden.device

    def dim(self) -> int:
        return self._checked().hidden.dim()

    def is_floating_point(self) -> bool:
        return self._checked().hidden.is_floating_point()
