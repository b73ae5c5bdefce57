"""One small generic registry for named extension points (KD terms, selectors, scorers, ...).

Example:
    >>> SCORERS: Registry[Callable[..., float]] = Registry("score.method")
    >>> @SCORERS.register("l1")
    ... def l1_score(block): ...
    >>> SCORERS.get("l1")  # unknown names raise M2MError listing the choices
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from m2mdc.errors import M2MError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; duplicate registration is a bug, an unknown name a user error."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.name} registry: '{name}' is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise M2MError(
                f"{self.name}: unknown choice '{name}'; valid choices: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
