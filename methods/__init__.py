"""PETL methods: one module per method, each registering itself with ``@register(name)``.

Every module in this package (except the shared ``base`` and ``blocks``) is imported here, so adding
a method is one file in ``methods/`` plus one yaml in ``conf/method/``.
"""
from __future__ import annotations

import importlib
import pkgutil

from bench.registry import METHODS
from methods.base import Method, register

__all__ = ["Method", "register", "build", "METHODS"]

_SKIP = {"base", "blocks"}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.name not in _SKIP and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def build(cfg) -> Method:
    """Instantiate the method named ``cfg['name']`` with its config."""
    cls = METHODS.get(cfg["name"])
    return cls({k: v for k, v in dict(cfg).items() if k != "name"})
