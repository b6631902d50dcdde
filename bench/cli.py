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


GROUPS = ("method", "dataset", "backbone")


def group_options(group: str) -> list[str]:
    from bench import CONF_DIR

    root = CONF_DIR / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")
                  if not any(part.startswith("_") for part in p.relative_to(root).parts))


def check_group_overrides(argv: list[str]) -> str | None:
    """One-line message for ``method=NAME``/``dataset=``/``backbone=`` naming no config, else None.

    Sweeps (``a,b``) and Hydra's glob/choice syntax are checked per plain name.
    """
    import difflib

    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in GROUPS or any(c in value for c in "()[]{}*$"):
            continue
        known = group_options(key)
        for name in filter(None, (v.strip() for v in value.split(","))):
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.0)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                return f"unknown {key} '{name}' (no conf/{key}/{name}.yaml).{hint} Known: {', '.join(known)}"
    return None
