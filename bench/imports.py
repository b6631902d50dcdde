"""Imports the suite's top-level packages (methods, datasets, backbones) and detects shadowing.

The names are generic: Hugging Face's ``datasets`` in particular is often installed. The repository
root is put first on ``sys.path`` so its packages win; if a package of the same name was already
imported from elsewhere (or wins anyway), we stop with one line that names both paths and the fix.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from bench import ROOT

OWN_PACKAGES = ("backbones", "methods", "datasets")


class ShadowedPackageError(ImportError):
    pass


def _origin(module) -> Path | None:
    f = getattr(module, "__file__", None)
    return Path(f).resolve() if f else None


def check_package(name: str) -> None:
    mod = sys.modules.get(name)
    if mod is None:
        return
    origin = _origin(mod)
    expected = ROOT / name
    if origin is None or expected not in origin.parents:
        raise ShadowedPackageError(
            f"package '{name}' was imported from {origin or 'a namespace'}, not from petl-bench's {expected}/; "
            f"another distribution shadows it: run from the repository root, or `pip uninstall {name}` "
            f"if it is not needed in this environment"
        )


def import_suite() -> None:
    """Import methods, datasets and backbones from this repository (each registers its entries)."""
    root = str(ROOT)
    if not sys.path or sys.path[0] != root:
        sys.path.insert(0, root)
    for name in OWN_PACKAGES:
        check_package(name)  # already imported from elsewhere?
        importlib.import_module(name)
        check_package(name)
