"""Config base: frozen, keyword-only dataclasses that validate themselves.

Every knob of every method lives in a subclass of :class:`Config`, declared as
``@dataclass(frozen=True, kw_only=True)``. Subclasses validate in ``__post_init__`` with the
``check_*`` helpers, which raise ``ValueError`` naming the field, the allowed range and the value
given. YAML/JSON recipes map onto configs one to one: :meth:`Config.from_dict` raises on unknown
keys, and :meth:`Config.to_dict` is what is saved beside every output.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True, kw_only=True)
    ... class TuckerConfig(Config):
    ...     rank: float = 0.25
    ...     def __post_init__(self) -> None:
    ...         check_range(self, "rank", self.rank, low=0.0, high=1.0, low_inclusive=False)
    >>> TuckerConfig.from_dict({"rank": 0.5}).to_dict()
    {'rank': 0.5}
    >>> TuckerConfig(rank=0)
    Traceback (most recent call last):
    ...
    ValueError: TuckerConfig.rank must be in (0.0, 1.0], got 0
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import typing
from collections.abc import Iterable
from typing import Any, Self

from slimtorch.core.io import atomic_write_json, read_json


def _field_name(obj: object, name: str) -> str:
    return f"{type(obj).__name__}.{name}"


def check_range(
    obj: object,
    name: str,
    value: float | int,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise ``ValueError`` unless ``low <= value <= high`` (bounds optional/exclusive) and
    ``value`` is finite: no setting means anything at infinity (a size ratio of ``inf`` would
    ask for a model of zero bytes), so an open bound is not an invitation to pass one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{_field_name(obj, name)} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{_field_name(obj, name)} must be finite, got {value!r}")
    ok = True
    if low is not None:
        ok &= value >= low if low_inclusive else value > low
    if high is not None:
        ok &= value <= high if high_inclusive else value < high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        rng = f"{'[' if low_inclusive else '('}{lo}, {hi}{']' if high_inclusive else ')'}"
        raise ValueError(f"{_field_name(obj, name)} must be in {rng}, got {value!r}")


def check_int(obj: object, name: str, value: object, *, low: int, high: int | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool, not ``8.5``) in
    ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{_field_name(obj, name)} must be an int {bounds}, got {value!r}")
    check_range(obj, name, value, low=low, high=high)


def check_bool(obj: object, name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False`` (``"no"`` and ``0`` would
    pass an ``if`` the wrong way or by accident).

    ``obj`` is the config, or a string naming the function for a keyword argument.

    Example:
        >>> check_bool("prune_", "strict", "no")
        Traceback (most recent call last):
        ...
        ValueError: prune_(strict=...) must be True or False, got 'no'
    """
    if not isinstance(value, bool):
        where = f"{obj}({name}=...)" if isinstance(obj, str) else _field_name(obj, name)
        raise ValueError(f"{where} must be True or False, got {value!r}")


def _same_kind(value: Any, choice: Any) -> bool:
    """Whether ``value`` is of ``choice``'s kind: a bool only for a bool, an integer (any
    integral type, numpy's included) for an int."""
    if isinstance(value, bool) or isinstance(choice, bool):
        return isinstance(value, bool) and isinstance(choice, bool)
    if isinstance(choice, int):
        return isinstance(value, numbers.Integral)
    return True


def check_choice(obj: object, name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (of the same type too: ``8.0``
    and ``True`` are not the choices ``8`` and ``1``)."""
    options = list(choices)
    if not any(value == c and _same_kind(value, c) for c in options):
        raise ValueError(
            f"{_field_name(obj, name)} must be one of {', '.join(map(repr, options))}, "
            f"got {value!r}"
        )


def _plain(value: Any) -> Any:
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()  # a numpy scalar (int, float, bool)
    if isinstance(value, tuple | list) and any(_plain(v) is not v for v in value):
        return type(value)(_plain(v) for v in value)
    return value


def _plain_numbers(config: Any) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        plain = _plain(value)
        if plain is not value:
            object.__setattr__(config, f.name, plain)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every slimtorch config (see the module docstring).

    Numpy scalars given for a field (``np.int64(8)``, ``np.float32(0.5)``, ``np.bool_``)
    become the Python values they hold before the subclass validates, so they are checked,
    compared and saved like ``8`` and ``0.5``.
    """

    def __post_init__(self) -> None:
        _plain_numbers(self)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_plain_numbers_first", False):

            def post_init(self: Config) -> None:
                _plain_numbers(self)
                own(self)

            post_init._plain_numbers_first = True  # type: ignore[attr-defined]
            post_init.__doc__ = own.__doc__
            cls.__post_init__ = post_init  # type: ignore[method-assign]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (nested configs become dicts, tuples lists)."""

        def conv(v: Any) -> Any:
            if isinstance(v, Config):
                return v.to_dict()
            if isinstance(v, tuple | list):
                return [conv(x) for x in v]
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            return v

        return {f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a dict; unknown or missing required keys raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} key(s) {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(fields))}"
            )
        missing = sorted(
            name
            for name, f in fields.items()
            if name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"{cls.__name__} needs key(s) {', '.join(missing)}, which are missing")
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            hint = hints.get(name)
            if isinstance(hint, type) and issubclass(hint, Config) and isinstance(value, dict):
                value = hint.from_dict(value)
            elif typing.get_origin(hint) is tuple and isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the resolved config as JSON, atomically."""
        atomic_write_json(path, {"type": type(self).__name__, "config": self.to_dict()})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Read a config written by :meth:`save` (or a bare dict of fields)."""
        data = read_json(path)
        if isinstance(data, dict) and "config" in data and "type" in data:
            if data["type"] != cls.__name__:
                raise ValueError(f"{path} holds a {data['type']}, not a {cls.__name__}")
            data = data["config"]
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as exc:
            if type(exc) not in (ValueError, TypeError):
                raise
            raise type(exc)(f"{path}: {exc}") from exc  # name the file that holds the bad value
