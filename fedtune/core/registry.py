"""One registry per pluggable family, so names are looked up in a single place.

Built-in entries are given as where they live (`"module:attr"`) and imported on first `get`:
listing and checking names imports nothing, so a config is validated without torch or peft.
Unknown names fail loudly with the list of known ones, instead of drifting string switches
spread across modules. `register` adds an object directly (a user's own strategy, say).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, lazy: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, Any] = dict(lazy or {})

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

    def names(self) -> list[str]:
        return sorted(self._items)

    def in_order(self) -> list[str]:
        """The names in the order they were given (where order matters: client features)."""
        return list(self._items)

    def check(self, name: str) -> str:
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return name

    def get(self, name: str) -> T:
        item = self._items[self.check(name)]
        if isinstance(item, str):  # a built-in entry, imported the first time it is used
            module, _, attr = item.partition(":")
            item = self._items[name] = getattr(importlib.import_module(module), attr)
        return cast(T, item)
