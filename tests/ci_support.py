"""Skips that must not hide failures: under CI=true a missing test dependency fails the test.

On a developer's machine without an optional extra the test skips, as pytest.importorskip does; in
CI (which installs `.[dev]`) the same absence means a broken install, so it is a failure."""
from __future__ import annotations

import importlib
import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def import_or_skip(name: str, reason: str):
    """The module `name`; skip with `reason` when it is missing, or fail when CI=true."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if in_ci():
            pytest.fail(f"{reason}: {exc} (CI=true: a missing package fails instead of skipping)", pytrace=False)
        pytest.skip(reason, allow_module_level=True)   # also at a module's top
