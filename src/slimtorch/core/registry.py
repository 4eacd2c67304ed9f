"""Name -> object registries: methods, models, device profiles and layer handlers.

Register, don't branch: a duplicate key raises at import, an unknown key raises a
``ValueError`` that lists the valid choices.

Example:
    >>> MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
    >>> @MODELS.register("mlp")
    ... def mlp(num_classes: int = 10) -> nn.Module:
    ...     return nn.Linear(784, num_classes)
    >>> MODELS.get("mlp") is mlp, MODELS.names()
    (True, ['mlp'])
    >>> MODELS.get("cnn")
    Traceback (most recent call last):
    ...
    ValueError: unknown model 'cnn'; valid choices: mlp
    >>> MODELS.add("mlp", mlp)
    Traceback (most recent call last):
    ...
    slimtorch.core.errors.RegistryError: model 'mlp' is already registered; pick another name ...
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

from slimtorch.core.errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from keys (names or tuples of types) to registered objects."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[Hashable, T] = {}

    def add(self, key: Hashable, item: T) -> T:
        """Register ``item`` under ``key``; raises :class:`RegistryError` on a duplicate."""
        if key in self._items:
            raise RegistryError(
                f"{self.kind} {key!r} is already registered; pick another name or remove the "
                "duplicate registration"
            )
        self._items[key] = item
        return item

    def register(self, key: Hashable) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def deco(item: T) -> T:
            return self.add(key, item)

        return deco

    def get(self, key: Hashable) -> T:
        """Return the item for ``key``; unknown keys raise ``ValueError`` listing the choices."""
        try:
            return self._items[key]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {key!r}; valid choices: {', '.join(map(str, self.names()))}"
            ) from None

    def names(self) -> list[Hashable]:
        """Registered keys, sorted by their string form."""
        return sorted(self._items, key=str)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
