"""Calling forms kept for compatibility: an argument's earlier name, or a parameter that became
keyword-only. Each still works, with a DeprecationWarning that points at the caller's line and
says what to write instead."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable

import torch

# Frames in these directories are not the caller: a module's forward is reached through torch's
# nn.Module.__call__, and fastalign's entry points call one another.
_INTERNAL = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)
_LEADING = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def warn_deprecated(message: str) -> None:
    """A DeprecationWarning attributed to the first frame outside fastalign and torch: Python's
    default filter shows it only when that frame is in `__main__`, so it must be the caller's.
    While torch.compile traces, nothing is said: the frame walk cannot be traced, and a deprecated
    call must still compile without a graph break, as it did."""
    if torch.compiler.is_compiling():
        return
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DeprecationWarning, stacklevel=level)


def keyword_only(*names: str) -> Callable[[Callable], Callable]:
    """For a function whose keyword-only parameters `names` were positional once, in this order
    right after the positional ones (names it takes through **kwargs count too, e.g. a module's
    options). `help` and `inspect` show the new signature."""

    def decorate(fn: Callable) -> Callable:
        parameters = inspect.signature(fn).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        wrong = [
            name for name in names
            if (parameters[name].kind is not inspect.Parameter.KEYWORD_ONLY if name in parameters else not takes_any)
        ]
        if wrong:
            raise TypeError(f"keyword_only: {wrong} are not keyword-only parameters of {fn.__qualname__}")
        leading = sum(p.kind in _LEADING for p in parameters.values())
        qualname = fn.__qualname__

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if len(args) > leading:
                extra = args[leading:]
                if len(extra) > len(names):
                    raise TypeError(
                        f"{qualname}() takes at most {leading + len(names)} positional arguments but "
                        f"{len(args)} were given"
                    )
                moved = names[: len(extra)]
                for name, value in zip(moved, extra):
                    if name in kwargs:
                        raise TypeError(f"{qualname}() got multiple values for argument '{name}'")
                    kwargs[name] = value
                warn_deprecated(
                    f"{qualname}: passing {', '.join(moved)} by position is deprecated; pass "
                    f"{', '.join(name + '=' for name in moved)} by keyword"
                )
                args = args[:leading]
            return fn(*args, **kwargs)

        return wrapper

    return decorate


def parameter_names(fn: Callable) -> tuple[str, ...]:
    """`fn`'s parameters in order: a module whose options were positional once takes them in its
    options builder's order."""
    return tuple(inspect.signature(fn).parameters)


def renamed_option(old_name: str, old_value: object, new_name: str, new_value: object, default: object) -> object:
    """The option's value: `new_value`, or `old_value` when given under the earlier name `old_name`
    (with a DeprecationWarning). `default` is the new name's default, which stands for "not given";
    both names given is an error."""
    if old_value is None:
        return new_value
    new_given = new_value is not None and (default is None or new_value != default)
    if new_given:
        raise ValueError(f"{old_name} / {new_name}: pass {new_name}= only ({old_name}= is its earlier name)")
    warn_deprecated(f"{old_name}= is deprecated; pass {new_name}= instead")
    return old_value
