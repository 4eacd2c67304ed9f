"""DistillConfig validation, defaults and the JSON round trip."""

from __future__ import annotations

import pytest

from slimtorch.distill import DistillConfig


def test_defaults_and_round_trip() -> None:
    cfg = DistillConfig()
    assert (cfg.temperature, cfg.alpha, cfg.hints, cfg.hint_weight) == (4.0, 0.9, (), 1.0)
    cfg = DistillConfig(hints=[["fc1", "fc1"], ("a.b", "c.d")], hint_weight=0.5)  # type: ignore[arg-type]
    assert cfg.hints == (("fc1", "fc1"), ("a.b", "c.d"))
    again = DistillConfig.from_dict(cfg.to_dict())
    assert again == cfg and hash(again) == hash(cfg)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, r"DistillConfig.temperature must be in \(0.0, inf\], got 0.0"),
        ({"temperature": -1}, r"DistillConfig.temperature must be in \(0.0, inf\], got -1"),
        ({"alpha": 1.5}, r"DistillConfig.alpha must be in \[0.0, 1.0\], got 1.5"),
        ({"alpha": -0.1}, r"DistillConfig.alpha must be in \[0.0, 1.0\], got -0.1"),
        ({"hint_weight": -1.0}, r"DistillConfig.hint_weight must be in \[0.0, inf\], got -1.0"),
        ({"alpha": "high"}, r"DistillConfig.alpha must be a number, got 'high'"),
        ({"hints": (("fc1",),)}, r"DistillConfig.hints must hold .* got \('fc1',\)"),
        ({"hints": (("fc1", ""),)}, r"non-empty dotted names"),
        ({"hints": "fc1"}, r"DistillConfig.hints must be a sequence"),
    ],
)
def test_validation_names_field_range_and_value(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistillConfig(**kwargs)  # type: ignore[arg-type]


def test_unknown_key_and_positional_use_raise() -> None:
    with pytest.raises(ValueError, match="unknown DistillConfig key"):
        DistillConfig.from_dict({"temp": 2.0})
    with pytest.raises(TypeError):
        DistillConfig(2.0)  # type: ignore[misc]
