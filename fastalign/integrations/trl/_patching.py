"""Attribute swaps that can be undone exactly: each records what it replaced (or that the name
was inherited), and undo puts it back in reverse order."""

from __future__ import annotations

import functools

_INHERITED = object()


class Swaps:
    def __init__(self) -> None:
        self._saved: list[tuple[object, str, object]] = []

    def __bool__(self) -> bool:
        return bool(self._saved)

    def swap(self, owner: object, name: str, value: object) -> None:
        if isinstance(owner, type):
            original = owner.__dict__.get(name, _INHERITED)
        else:
            original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, value)

    def undo(self) -> None:
        while self._saved:
            owner, name, original = self._saved.pop()
            if original is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def checked_init(original_init, check):
    """`__init__` that runs the original, then `check(self)`: options fastalign cannot serve fail
    when the trainer is built, not at its first step."""

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        check(self)

    __init__.__fastalign_checked__ = True
    return __init__
