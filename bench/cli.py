"""Turns the suite's expected errors (bad names, paths, files) into one-line messages."""
from __future__ import annotations

import contextlib
import sys

from bench.imports import ShadowedPackageError
from bench.registry import UnknownEntryError


def _expected() -> tuple[type, ...]:
    base: tuple[type, ...] = (ShadowedPackageError, UnknownEntryError, FileNotFoundError, ValueError)
    try:  # the suite's own error types (skipped when its packages cannot be imported)
        from backbones.checkpoint import CheckpointError
        from backbones.sites import MethodNotDefinedError
        from datasets.base import DataError
    except ImportError:
        return base
    return base + (CheckpointError, MethodNotDefinedError, DataError)


@contextlib.contextmanager
def friendly_errors():
    try:
        yield
    except Exception as e:  # noqa: BLE001
        if isinstance(e, ShadowedPackageError) or isinstance(e, _expected()):
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
