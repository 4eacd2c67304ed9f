"""Config base (validation, round trip, unknown keys) and Registry (duplicates, unknown names)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from slimtorch.core.config import Config, check_choice, check_range
from slimtorch.core.errors import RegistryError
from slimtorch.core.registry import Registry


@dataclass(frozen=True, kw_only=True)
class _Inner(Config):
    k: int = 2

    def __post_init__(self) -> None:
        check_range(self, "k", self.k, low=1)


@dataclass(frozen=True, kw_only=True)
class _Outer(Config):
    rate: float = 0.5
    mode: str = "a"
    sizes: tuple[int, ...] = (1, 2)
    inner: _Inner = _Inner()

    def __post_init__(self) -> None:
        check_range(self, "rate", self.rate, low=0.0, high=1.0, low_inclusive=False)
        check_choice(self, "mode", self.mode, ("a", "b"))


def test_validation_messages_name_field_range_and_value() -> None:
    with pytest.raises(ValueError, match=r"_Outer\.rate must be in \(0\.0, 1\.0\], got 0\.0"):
        _Outer(rate=0.0)
    with pytest.raises(ValueError, match=r"_Outer\.mode must be one of 'a', 'b', got 'c'"):
        _Outer(mode="c")
    with pytest.raises(ValueError, match=r"_Inner\.k must be in \[1, inf\], got 0"):
        _Inner(k=0)
    with pytest.raises(ValueError, match="must be a number"):
        _Outer(rate="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _Outer(0.5)  # type: ignore[misc]  # keyword-only


def test_round_trip_nested_and_unknown_keys(tmp_path: Path) -> None:
    cfg = _Outer(rate=0.25, mode="b", sizes=(3, 4), inner=_Inner(k=5))
    d = cfg.to_dict()
    assert d == {"rate": 0.25, "mode": "b", "sizes": [3, 4], "inner": {"k": 5}}
    assert _Outer.from_dict(d) == cfg
    with pytest.raises(ValueError, match=r"unknown _Outer key\(s\) speed; valid keys: inner, mode"):
        _Outer.from_dict({"speed": 1})
    cfg.save(tmp_path / "c.json")
    assert _Outer.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="holds a _Outer, not a _Inner"):
        _Inner.load(tmp_path / "c.json")
    assert cfg.replace(rate=1.0).rate == 1.0
    with pytest.raises(ValueError):
        cfg.replace(rate=2.0)


def test_registry_duplicates_and_unknown() -> None:
    reg: Registry[int] = Registry("widget")
    reg.add("b", 2)

    @reg.register("a")
    def _one() -> int:
        return 1

    assert reg.names() == ["a", "b"] and "a" in reg and len(reg) == 2
    with pytest.raises(RegistryError, match="widget 'a' is already registered"):
        reg.add("a", 3)
    with pytest.raises(ValueError, match="unknown widget 'c'; valid choices: a, b"):
        reg.get("c")
