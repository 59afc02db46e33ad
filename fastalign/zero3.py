"""DeepSpeed ZeRO-3 parameters: recognized, and gathered whole where an op reads them.

Under ZeRO-3 every parameter is partitioned to `numel 0` outside its module's forward, and a fused
loss reads `lm_head.weight` without calling `lm_head`. fastalign gathers such a weight (and bias)
for the forward, and, for an op whose backward reads the weight again (`linear_token_logprobs`),
gathers it again there instead of keeping the whole weight alive between forward and backward —
what TRL's `maybe_gather_lm_head_ctx` does for its own fused head. The gradient of the weight
reaches the partitioned parameter as any gradient does, and DeepSpeed reduces it.

A parameter already gathered (inside `GatheredParameters`, or tied to an embedding whose module is
running) is left alone: re-partitioning it on exit would pull it from under its owner.
"""

from __future__ import annotations

import contextlib

import torch


def is_zero3_param(t: object) -> bool:
    """Whether `t` is a parameter DeepSpeed ZeRO-3 manages (it carries `ds_id` and `ds_status`)."""
    return isinstance(t, torch.Tensor) and hasattr(t, "ds_id") and hasattr(t, "ds_status")


def full_shape(t: torch.Tensor) -> torch.Size:
    """The parameter's whole shape, also while ZeRO-3 holds it partitioned (`ds_shape`)."""
    return t.ds_shape if is_zero3_param(t) else t.shape


def gathered(*params: torch.Tensor | None):
    """A context in which the given ZeRO-3 parameters are whole (a null context for anything else,
    or for parameters already whole)."""
    todo = {id(p): p for p in params if is_zero3_param(p)}
    if not todo:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = [p for p in todo.values() if p.ds_status != ZeroParamStatus.AVAILABLE]
    if not todo:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(todo)
