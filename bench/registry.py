"""One small registry used by methods, datasets and backbones.

An entry's name equals its yaml file name under ``conf/<group>/`` (datasets include the sub-folder,
e.g. ``vtab/cifar100``). Unknown names fail with the known names and the closest match.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownEntryError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str, conf_group: str):
        self.kind = kind
        self.conf_group = conf_group
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._entries and self._entries[name] is not obj:
            raise ValueError(f"{self.kind} '{name}' is registered twice ({self._entries[name]!r} and {obj!r})")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownEntryError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = sorted(self._entries)
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.0)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return (
            f"unknown {self.kind} '{name}' (set with {self.conf_group}=NAME).{hint} "
            f"Known: {', '.join(known)}"
        )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


METHODS: Registry = Registry("method", "method")
DATASETS: Registry = Registry("dataset", "dataset")
BACKBONES: Registry = Registry("backbone", "backbone")
