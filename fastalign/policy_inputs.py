"""Input checks and preparation shared by the policy losses (GRPO family, PPO).

Both take either logits [B, T, V] + labels [B, T] or per-token log-probs [B, T], plus a
completion mask and per-token or per-sequence tensors; every mismatch is named here."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._checks import check_positive_finite, check_token_logprobs_args, values_checkable
from .zero3 import full_shape


def check_epsilon(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not 0 < value < 1:
        raise ValueError(f"{name}: expected a clipping range in (0, 1), got {value}")
    return float(value)


def check_choice(name: str, value: object, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"{name}: expected one of {', '.join(repr(v) for v in valid)}; got {value!r}")
    return value


def check_optional_positive(name: str, value: object) -> float | None:
    return None if value is None else check_positive_finite(name, value)


def check_nonnegative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
    return float(value)


def check_total(name: str, value: object, *, zero_ok: bool) -> None:
    """A global count that normalizes a loss (a number or a one-element tensor): finite, and > 0
    (>= 0 where `zero_ok`, for a count the loss clamps at 1). A CUDA tensor's value is not read
    (no device sync)."""
    if value is None:
        return
    expected = "a finite number >= 0" if zero_ok else "a finite number > 0"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected one number, got a tensor of shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name}: expected a real number, got a {value.dtype} tensor")
        if not values_checkable(value):
            return
        number = value.item()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number or a one-element tensor, got {type(value).__name__}")
    else:
        number = value
    if not (math.isfinite(number) and (number >= 0 if zero_ok else number > 0)):
        raise ValueError(f"{name}: expected {expected}, got {number}")


def check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


def token_shape(
    logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    logps: torch.Tensor | None,
    transform: tuple[float, float, float | None],
    lm_head: tuple | None = None,
) -> tuple[torch.Size, torch.device, tuple[float, float, float]]:
    """The [B, T] shape and device fixed by the input level, and the checked logit transform.
    `lm_head`: (hidden, weight, bias) for the hidden-states level."""
    temperature, logit_scale, softcap = transform
    hidden, weight, bias = lm_head if lm_head is not None else (None, None, None)
    if hidden is not None:
        from .linear_logprobs import gather_sharded

        weight, bias = gather_sharded(weight), gather_sharded(bias)
    if sum(x is not None for x in (logits, logps, hidden)) != 1:
        raise ValueError(
            "logits / hidden / logps: pass exactly one input level: logits=[B, T, V] with labels, "
            "hidden=[B, T, H] with weight=[V, H] and labels, or logps=[B, T]"
        )
    if hidden is None and (weight is not None or bias is not None):
        raise ValueError("weight / bias: the lm_head's weight and bias go with hidden=")
    if hidden is not None:
        from .linear_logprobs import check_linear_args

        if labels is None:
            raise ValueError("labels: required with hidden (the completion token ids, [B, T])")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(f"hidden: expected shape [B, T, H], got {getattr(hidden, 'shape', hidden)}")
        check_linear_args(hidden, weight, bias, labels)
        vocab = full_shape(weight)[0]  # a ZeRO-3 weight is partitioned until it is read
        if vocab == 0:
            raise ValueError("weight: the vocabulary dimension (V, the first) is empty")
        probe = hidden.new_empty((1, 1, 1)).expand(*hidden.shape[:-1], vocab)
        temperature, logit_scale, softcap, _ = check_token_logprobs_args(
            probe, labels, temperature, -100, logit_scale, softcap, None, ()
        )
        return labels.shape, hidden.device, (temperature, logit_scale, softcap)
    if logits is not None:
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits: expected a torch.Tensor [B, T, V], got {type(logits).__name__}")
        if labels is None:
            raise ValueError("labels: required with logits (the completion token ids, [B, T])")
        if logits.dim() != 3:
            raise ValueError(f"logits: expected shape [B, T, V], got {tuple(logits.shape)}")
        temperature, logit_scale, softcap, _ = check_token_logprobs_args(
            logits, labels, temperature, -100, logit_scale, softcap, None, ()
        )
        return labels.shape, logits.device, (temperature, logit_scale, softcap)
    if labels is not None:
        raise ValueError("labels: only used with logits; with logps the labels are already gathered")
    if not isinstance(logps, torch.Tensor) or logps.dim() != 2 or not logps.is_floating_point():
        raise ValueError("logps: expected a float tensor of per-token log-probs [B, T]")
    return logps.shape, logps.device, (1.0, 1.0, 0.0)


# The label the policy losses give the tokens completion_mask leaves out: no token id equals it, so
# a label the mask counts can never be mistaken for an ignored one (-100 there is an error).
POLICY_IGNORE_INDEX = torch.iinfo(torch.int64).min


def check_policy_labels(labels: torch.Tensor | None, mask: torch.Tensor, vocab_size: int) -> None:
    """Every label completion_mask counts is a token id in [0, V). Checked for CPU tensors; on a
    GPU (no device sync) such a label gives a NaN log-prob, and with it a NaN loss, never a read
    out of bounds."""
    if labels is None or labels.device.type != "cpu" or torch.compiler.is_compiling():
        # Compiled, the op's own check (check_label_range, opaque to the compiler) still refuses it.
        return
    bad = ((labels < 0) | (labels >= vocab_size)) & (mask != 0)
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        value = int(labels[position])
        hint = (" (-100 marks ignored positions for token_logprobs; a policy loss leaves tokens out through "
                "completion_mask)" if value == -100 else "")
        raise ValueError(
            f"labels: every label where completion_mask is nonzero must lie in [0, {vocab_size}) (the vocabulary "
            f"size); found {value} at position {position}{hint}"
        )


def check_batch_not_empty(shape: torch.Size, logits: object, logps: object) -> None:
    """A policy loss over no sequence has no defined value: say so, naming the input level."""
    if shape[0] == 0:
        level = "logits" if logits is not None else "logps" if logps is not None else "hidden"
        raise ValueError(f"{level}: the batch is empty (B = 0): a policy loss needs at least one sequence")


def check_tokens(
    name: str,
    value: object,
    shape: torch.Size,
    device: torch.device,
    *,
    per_sequence: bool = False,
    floating: bool = True,
) -> torch.Tensor:
    """A [B, T] tensor (or [B] / [B, 1] when `per_sequence`), returned as [B, T] or [B, 1]."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    b, t = shape
    allowed = [(b, t)] + ([(b,), (b, 1)] if per_sequence else [])
    if tuple(value.shape) not in allowed:
        expected = " or ".join(str(s) for s in allowed)
        raise ValueError(f"{name}: expected shape {expected} (B, T from the log-probs), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {value.device}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
    if not floating and (value.is_complex() or value.dtype.is_floating_point is None):
        raise TypeError(f"{name}: expected a bool, integer or float mask, got {value.dtype}")
    return value.unsqueeze(-1) if value.dim() == 1 else value


def as_float(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Per-token inputs in the computation dtype (fp32; fp64 stays fp64 for gradcheck)."""
    if value is None:
        return None
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return value.to(dtype)


def check_transform(temperature: object, logit_scale: object, softcap: object) -> tuple[float, float, float | None]:
    """The logit transform, checked at option time so a module fails at construction."""
    from ._checks import check_finite

    temperature = check_positive_finite("temperature", temperature)
    logit_scale = check_finite("logit_scale", logit_scale)
    softcap = check_optional_positive("softcap", softcap)
    return temperature, logit_scale, softcap


class TokenInputs(NamedTuple):
    """The checked per-token inputs of a policy loss, in the computation dtype."""

    shape: torch.Size
    device: torch.device
    transform: tuple[float, float, float]
    like: torch.Tensor  # carries the computation dtype for `as_float`
    mask: torch.Tensor  # as given (bool / int / float)
    mask_f: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    entropies: torch.Tensor | None


def policy_token_inputs(
    *, logits, labels, logps, entropies, completion_mask, advantages, old_logps, ref_logps, transform,
    kl_name: str, kl_weight: float, entropy_needed_by: str | None, lm_head: tuple | None = None,
) -> TokenInputs:
    """Checks the inputs every policy loss shares. `kl_name`/`kl_weight`: the option that asks for
    ref_logps; `entropy_needed_by`: the options that need entropies at the logps level, if set."""
    shape, device, transform = token_shape(logits, labels, logps, transform, lm_head)
    check_batch_not_empty(shape, logits, logps)
    mask = check_tokens("completion_mask", completion_mask, shape, device, floating=False)
    if logits is not None or lm_head is not None:
        check_policy_labels(labels, mask, logits.shape[-1] if logits is not None else full_shape(lm_head[1])[0])
    like = logps if logps is not None else torch.empty(0)
    adv = as_float(check_tokens("advantages", advantages, shape, device, per_sequence=True), like)
    if old_logps is not None:
        old_logps = as_float(check_tokens("old_logps", old_logps, shape, device), like)
    if kl_weight != 0:
        if ref_logps is None:
            raise ValueError(
                f"ref_logps: required when {kl_name} > 0 ({kl_name}={kl_weight}): the KL term needs the "
                "reference log-probs"
            )
        ref_logps = as_float(check_tokens("ref_logps", ref_logps, shape, device), like)
    else:
        ref_logps = None
    if entropies is not None:
        if logps is None:
            raise ValueError("entropies: only used with logps; from logits the entropy is computed in the same pass")
        entropies = check_tokens("entropies", entropies, shape, device)
    if logps is not None and entropy_needed_by and entropies is None:
        raise ValueError(f"entropies: required with logps when {entropy_needed_by}")
    return TokenInputs(shape, device, transform, like, mask, as_float(mask, like), adv, old_logps, ref_logps, entropies)
