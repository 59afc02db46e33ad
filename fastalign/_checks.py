"""Argument checks shared by every backend: a bad input fails here, naming the argument,
never deep in a kernel."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def check_positive_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return float(value)


def check_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return float(value)


def check_flag(name: str, value: object) -> bool:
    # A truthy string or None read as a bool would flip an option silently.
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return value


def check_ignore_index(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ignore_index: expected an int, got {type(value).__name__}")
    return value


def check_gather(gather: object) -> None:
    if gather is not None and not callable(gather):
        raise TypeError(
            f"gather: expected a function returning every process's tensor concatenated along dim 0, or None; "
            f"got {type(gather).__name__}"
        )


def values_checkable(value: torch.Tensor) -> bool:
    """Whether a check may read a tensor's values: on CPU (no device sync) and outside torch.compile's
    tracing (where reading a value breaks the graph)."""
    return value.device.type == "cpu" and not torch.compiler.is_compiling()


def check_outputs(outputs: Sequence[str] | str) -> frozenset[str]:
    if isinstance(outputs, str):
        outputs = (outputs,)
    if not isinstance(outputs, (Sequence, set, frozenset)):
        raise TypeError(
            f"outputs: expected a sequence of field names among {', '.join(OPTIONAL_OUTPUTS)}, "
            f"got {type(outputs).__name__}"
        )
    unknown = [name for name in outputs if name not in OPTIONAL_OUTPUTS]
    if unknown:
        raise ValueError(
            f"outputs: unknown field(s) {unknown}; expected any of {', '.join(OPTIONAL_OUTPUTS)} "
            "(log-probs are always returned)"
        )
    return frozenset(outputs)


def check_token_logprobs_args(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    logit_scale: float,
    softcap: float | None,
    mask: torch.Tensor | None,
    outputs: Sequence[str] | str,
) -> tuple[float, float, float, frozenset[str]]:
    """Checks shapes, dtypes, devices and options; returns (temperature, logit_scale, softcap or 0, outputs)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 1:
        raise ValueError("logits: expected shape [..., V] with at least 1 dimension, got a 0-d tensor")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits: expected a float32, bfloat16, float16 or float64 tensor, got {logits.dtype}")
    if logits.shape[-1] == 0:
        raise ValueError("logits: the vocabulary dimension (last) is empty")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"labels: expected an int64 or int32 tensor, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels: expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels: expected a tensor on {logits.device} (the logits' device), got {labels.device}")
    if mask is not None:
        check_token_mask("mask", mask, labels, optional=True)
    check_ignore_index(ignore_index)
    temperature = check_positive_finite("temperature", temperature)
    logit_scale = check_finite("logit_scale", logit_scale)
    softcap = 0.0 if softcap is None else check_positive_finite("softcap", softcap)
    return temperature, logit_scale, softcap, check_outputs(outputs)


def flat_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` as the contiguous int64 ``[N]`` vector the ops read: a strided, sliced or expanded
    label tensor (``labels[:, ::2]``, ``labels.expand(...)``) or an int32 one is copied, a few
    bytes per token."""
    return labels.reshape(-1).to(torch.int64).contiguous()


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raises ValueError for a label outside [0, V) that is not ignore_index (synchronizes on GPU)."""
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if bool(bad.any()):
        position = int(bad.reshape(-1).nonzero()[0, 0])
        value = int(labels.reshape(-1)[position])
        raise ValueError(
            f"labels: every value must lie in [0, {vocab_size}) (the vocabulary size, logits.shape[-1]) "
            f"or equal ignore_index={ignore_index}; found {value} at flattened position {position}"
        )


# Checks shared by the sequence-level losses (DPO, CPO, ORPO, KTO, reward).


def check_group_index(group_index: object, count: int, device: torch.device, per: str) -> torch.Tensor:
    """An integer id per row, `[count]` on `device`; `per` says what a row is ("reward", "response")."""
    if not isinstance(group_index, torch.Tensor):
        raise TypeError(f"group_index: expected a torch.Tensor of ids, got {type(group_index).__name__}")
    if group_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"group_index: expected an integer tensor (int64 or int32 ids), got {group_index.dtype}")
    if group_index.dim() != 1 or group_index.shape[0] != count:
        raise ValueError(f"group_index: expected shape [{count}] (one id per {per}), got {tuple(group_index.shape)}")
    if group_index.device != device:
        raise ValueError(f"group_index: expected a tensor on {device} (that of the {per}s), got {group_index.device}")
    return group_index


def check_loss_type(loss_type: object, valid: tuple[str, ...]) -> str:
    if loss_type not in valid:
        raise ValueError(f"loss_type: expected one of {', '.join(repr(v) for v in valid)}; got {loss_type!r}")
    return loss_type


def check_sequence_values(
    name: str, value: object, like: torch.Tensor | None = None, like_name: str = "", counts: bool = False
) -> torch.Tensor:
    """A [B] per-sequence tensor, returned in fp32 (fp64 kept for gradcheck); `like` fixes B and the device."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 1:
        raise ValueError(f"{name}: expected a 1-d tensor of per-sequence values [B], got shape {tuple(value.shape)}")
    if value.dtype == torch.bool or value.is_complex() or (not counts and not value.is_floating_point()):
        kind = "a float or integer" if counts else "a floating-point"
        raise TypeError(f"{name}: expected {kind} tensor, got {value.dtype}")
    if like is None:
        if value.shape[0] == 0:
            raise ValueError(f"{name}: the batch is empty")
    else:
        if value.shape != like.shape:
            raise ValueError(
                f"{name}: expected shape {tuple(like.shape)} (that of {like_name}), got {tuple(value.shape)}"
            )
        if value.device != like.device:
            raise ValueError(f"{name}: expected a tensor on {like.device} (that of {like_name}), got {value.device}")
    if counts and values_checkable(value):
        # A negative or NaN count would be clamped to 1 downstream and give a plausible, wrong loss.
        bad = ~(torch.isfinite(value) & (value >= 0))
        if bool(bad.any()):
            position = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name}: expected token counts, finite and >= 0; found {value[position].item()} at position {position}"
            )
    return value if value.dtype == torch.float64 else value.float()


def check_token_mask(name: str, mask: object, like: object, like_name: str = "labels", optional: bool = False) -> None:
    """A mask of `like`'s shape and device (bool, integer or float: nonzero counts)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor{' or None' if optional else ''}, got {type(mask).__name__}")
    if not isinstance(like, torch.Tensor):
        return  # the caller names the bad reference tensor
    if mask.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} (that of {like_name}), got {tuple(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device} (that of {like_name}), got {mask.device}")
    if mask.is_complex():
        raise TypeError(f"{name}: expected a bool, integer or float tensor, got {mask.dtype}")


# The calling conventions every loss shares.


def options_from(options: object, option_kwargs: dict, kind: type, builder: Callable) -> object:
    """A loss's checked options: `options` (a `kind` that `builder` made) or the keyword options
    `option_kwargs` checked by `builder`; both at once is an error, not a merge."""
    if options is not None and not isinstance(options, kind):
        raise TypeError(
            f"options: expected a {kind.__name__} from {builder.__name__}(...), or None; got {type(options).__name__}"
        )
    if options is None:
        return builder(**option_kwargs)
    if option_kwargs:
        raise ValueError(f"options: pass either options= or keyword options, not both ({sorted(option_kwargs)})")
    return options


def policy_logits(logits: object, hidden: object, weight: object, bias: object, labels: object,
                  vocab_group: object = None) -> object:
    """What a loss reads for the policy: `logits`, or the hidden states `hidden` with the lm_head
    `weight` (and `bias`), returned as a `HiddenStates` so that the logits are never materialized.

    An FSDP2-sharded weight or bias (a DTensor) is gathered here, differentiably, unless
    `vocab_group` says the weight holds this rank's rows of a vocabulary-parallel lm_head (then it
    stays local, and the `HiddenStates` knows the whole vocabulary's size). A `HiddenStates` passed
    as `logits` is the earlier spelling of hidden=, weight=, bias=: still read, with a
    DeprecationWarning."""
    from ._deprecation import warn_deprecated
    from .types import HiddenStates

    if isinstance(logits, HiddenStates):
        warn_deprecated("logits: passing HiddenStates(hidden, weight, bias) as logits is deprecated; "
                        "pass hidden=, weight=, bias= instead")
    check_vocab_group(vocab_group, logits)
    if hidden is None and weight is None and bias is None:
        return logits
    if logits is not None:
        raise ValueError("logits / hidden: pass either logits= or hidden= (with weight=), not both")
    if hidden is None or weight is None:
        raise ValueError("hidden / weight: the hidden-states level needs both hidden= and weight=")
    from .linear_logprobs import check_linear_args, gather_sharded

    if vocab_group is not None:
        from .vocab_parallel import row_shard

        weight, bias, shard = row_shard(weight, bias, vocab_group)
        check_linear_args(hidden, weight, bias, labels)
        return HiddenStates(hidden, weight, bias, shard.vocab_size)
    weight, bias = gather_sharded(weight), gather_sharded(bias)
    check_linear_args(hidden, weight, bias, labels)
    return HiddenStates(hidden, weight, bias)


def check_vocab_group(vocab_group: object, logits: object = None) -> None:
    """A `vocab_group` is a torch.distributed process group in use, and DTensor logits need none."""
    if vocab_group is None:
        return
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_group: torch.distributed is not initialized (init_process_group first)")
    if not isinstance(vocab_group, dist.ProcessGroup):
        raise TypeError(f"vocab_group: expected a torch.distributed ProcessGroup, got {type(vocab_group).__name__}")
    if getattr(logits, "placements", None) is not None:
        raise ValueError("vocab_group: not used with DTensor logits (their device mesh names the group)")
