"""The peers fastalign is checked against (TRL, verl and what verl's tests import). `make test`
requires them (FASTALIGN_REQUIRE_PEERS=1: a missing one fails the run, never a silent skip);
elsewhere, on a GPU machine that has neither, a test module that needs one is skipped, naming it."""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest


def require(module: str):
    """The imported module; or, outside `make test`, a skip of the calling test module."""
    if os.environ.get("FASTALIGN_REQUIRE_PEERS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (make venv installs the test peers)")


def missing(module: str) -> bool:
    """For a skipif mark: True where `module` is absent and not required (outside `make test`)."""
    if os.environ.get("FASTALIGN_REQUIRE_PEERS") == "1":
        return False
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # a parent package is absent
        return True
