"""``ChannelPruneConfig`` and the channel-count rounding rule.

Example:
    >>> ChannelPruneConfig(ratio=0.5, importance="taylor", scope="global").to_dict()["scope"]
    'global'
    >>> round_channels(42, 84, round_to=8)
    40
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from slimtorch.core.config import Config, check_choice, check_range
from slimtorch.prune.channel.importance import IMPORTANCES


def _check_int(obj: object, name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{type(obj).__name__}.{name} must be an integer >= {low}, got {value!r}")
    check_range(obj, name, value, low=low)


def _check_ratio(obj: object, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{type(obj).__name__}.{name} must be a number in [0, 1), got {value!r}")
    check_range(obj, name, value, low=0.0, high=1.0, high_inclusive=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelPruneConfig(Config):
    """Structured channel pruning.

    Attributes:
        ratio: Fraction of each group's channels removed (``scope="local"``), or of all
            targeted channels together (``scope="global"``), in [0, 1). ``0`` changes nothing.
        importance: ``"l1"``, ``"l2"`` (filter norms), ``"bn_scale"`` (``|gamma|``, network
            slimming) or ``"taylor"`` (first-order Taylor; needs calibration batches).
        scope: ``"local"`` (every group loses ``ratio``) or ``"global"`` (one threshold on
            normalised scores across groups; each group capped by ``max_layer_ratio``). With
            ``"bn_scale"``, a group without a BatchNorm is scored by ``"l1"`` and pruned
            locally at ``ratio``: filter norms and ``|gamma|`` share no scale.
        round_to: Kept channel counts are rounded to the nearest multiple of this (never below
            it unless the group has fewer channels); ``1`` disables rounding. 8 suits GPU
            tensor cores and vector units.
        min_channels: No group keeps fewer channels than this (>= 1).
        max_layer_ratio: Global scope: no group loses more than this fraction, in [0, 1).
        layer_ratios: Per-group ratio overrides: dotted-name glob -> ratio in [0, 1), matched
            against the group's producing layers (first matching glob wins); these groups are
            pruned locally at their ratio, also under ``scope="global"``. A glob that
            matches no producing layer raises ``ValueError`` in ``prune_channels_``.
        calibration_batches: At most this many calibration batches for ``"taylor"`` (>= 1).

    Example:
        >>> ChannelPruneConfig(ratio=0.25, layer_ratios={"layer3.*": 0.5}).layer_ratios
        {'layer3.*': 0.5}
    """

    ratio: float = 0.5
    importance: str = "l1"
    scope: str = "local"
    round_to: int = 8
    min_channels: int = 1
    max_layer_ratio: float = 0.8
    layer_ratios: Mapping[str, float] | None = None
    calibration_batches: int = 8

    def __post_init__(self) -> None:
        _check_ratio(self, "ratio", self.ratio)
        check_choice(self, "importance", self.importance, IMPORTANCES)
        check_choice(self, "scope", self.scope, ("local", "global"))
        _check_int(self, "round_to", self.round_to, 1)
        _check_int(self, "min_channels", self.min_channels, 1)
        _check_ratio(self, "max_layer_ratio", self.max_layer_ratio)
        _check_int(self, "calibration_batches", self.calibration_batches, 1)
        if self.layer_ratios is not None:
            if not isinstance(self.layer_ratios, Mapping) or not all(
                isinstance(k, str) for k in self.layer_ratios
            ):
                raise ValueError(
                    "ChannelPruneConfig.layer_ratios must map dotted-name globs to ratios, got "
                    f"{self.layer_ratios!r}"
                )
            for key, value in self.layer_ratios.items():
                _check_ratio(self, f"layer_ratios[{key!r}]", value)
            object.__setattr__(self, "layer_ratios", dict(self.layer_ratios))


def round_channels(
    keep: int, channels: int, *, round_to: int = 8, min_channels: int = 1, blocks: int = 1
) -> int:
    """The channel count a group keeps: ``keep`` rounded to the hardware multiple.

    ``keep`` goes to the nearest multiple of ``round_to`` (ties up), never below ``round_to``;
    a group of at most ``round_to`` channels, or a result that reaches ``channels``, keeps
    everything. Then at least ``min_channels`` are kept, and the count is raised to a multiple
    of ``blocks`` (grouped convs prune the same number in each group).

    Raises:
        ValueError: The result would remove every channel.

    Example:
        >>> [round_channels(k, 64, round_to=8) for k in (1, 12, 30, 60, 64)]
        [8, 16, 32, 64, 64]
        >>> round_channels(11, 16, round_to=1), round_channels(3, 6, round_to=8)
        (11, 6)
    """
    if keep >= channels:
        return channels
    k = keep
    if round_to > 1:
        if channels <= round_to:
            return channels
        k = max(round_to, math.floor(k / round_to + 0.5) * round_to)
        if k >= channels:
            return channels
    k = max(k, min(min_channels, channels))
    if blocks > 1:
        k = -(-k // blocks) * blocks
    if k >= channels:
        return channels
    if k < 1:
        raise ValueError(
            f"pruning would remove all {channels} channels of a group (keep={keep}); lower the "
            "ratio or raise min_channels"
        )
    return k
