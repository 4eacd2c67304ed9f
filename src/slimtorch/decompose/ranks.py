"""Rank selection: fixed fraction, energy threshold, EVBMF, rounding to a multiple.

A rank spec is what a config's ``rank`` field holds: a float fraction in ``(0, 1]``, an int, or a
string ``"vbmf"`` / ``"energy:0.9"`` / ``"budget:params=0.33"``. :func:`parse_rank_spec` validates
it once; :func:`select_mode_rank` turns it into a rank for one mode of one weight (a budget spec is
resolved across layers by ``decompose_``, see :mod:`slimtorch.decompose.budget_mode`). Every rank
returned is clamped to ``[1, full]``; where EVBMF finds no rank for a nonzero weight,
:class:`NoRankError` says so instead.

Example:
    >>> spec = parse_rank_spec(0.25, field="TuckerConfig.rank")
    >>> select_mode_rank(spec, torch.randn(64, 288), round_to=8)
    16
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Literal

import torch

from slimtorch.decompose.vbmf import evbmf

RankKind = Literal["fraction", "int", "vbmf", "energy", "budget"]
BUDGET_METRICS = ("params", "flops")
RankSpecInput = float | int | str


class NoRankError(ValueError):
    """EVBMF found no component above its noise threshold in a nonzero unfolding.

    A flat singular-value spectrum (an identity, orthogonal or freshly random initialisation)
    looks like pure noise to EVBMF; rank 1 would throw almost all of such a weight away, so
    ``decompose_`` skips the layer with this message as its reason.
    """


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """A parsed rank spec: ``kind``, its ``value`` (fraction, rank, energy or budget fraction; 0
    for vbmf) and, for a budget, the ``metric`` it counts (``"params"`` or ``"flops"``); a spec
    with several budgets (``"budget:params=0.33,flops=0.5"``) lists them all in ``budgets``
    (``value``/``metric`` are the first)."""

    kind: RankKind
    value: float
    metric: str | None = None
    budgets: tuple[tuple[str, float], ...] = ()


def parse_rank_spec(
    value: object,
    *,
    field: str = "rank",
    allowed: Iterable[RankKind] = ("fraction", "int", "vbmf", "energy", "budget"),
) -> RankSpec:
    """Validate a rank spec, raising ``ValueError`` that names ``field`` and the allowed forms.

    Args:
        value: ``float`` in ``(0, 1]`` (fraction), ``int >= 1``, ``"vbmf"``, ``"energy:x"``
            with ``x`` in ``(0, 1]``, or ``"budget:params=x"`` / ``"budget:flops=x"`` with ``x``
            in ``(0, 1]`` (the share of the targeted layers' total to keep), or both at once,
            ``"budget:params=x,flops=y"`` (every total must meet its own share).
        field: Name used in error messages (``"TuckerConfig.rank"``).
        allowed: The kinds this caller accepts.

    Returns:
        The parsed :class:`RankSpec`.

    Example:
        >>> parse_rank_spec("energy:0.9")
        RankSpec(kind='energy', value=0.9, metric=None, budgets=())
        >>> parse_rank_spec("budget:flops=0.5")
        RankSpec(kind='budget', value=0.5, metric='flops', budgets=(('flops', 0.5),))
    """
    allowed = tuple(allowed)
    forms = {
        "fraction": "a float in (0, 1]",
        "int": "an int >= 1",
        "vbmf": "'vbmf'",
        "energy": "'energy:<x>' with x in (0, 1]",
        "budget": "'budget:params=<x>', 'budget:flops=<x>' or 'budget:params=<x>,flops=<y>' "
        "with x, y in (0, 1]",
    }
    expected = ", ".join(forms[k] for k in allowed)

    def bad(why: str) -> ValueError:
        return ValueError(f"{field} {why}; expected {expected}, got {value!r}")

    if isinstance(value, bool):
        raise bad("must not be a bool")
    spec: RankSpec
    if isinstance(value, int):
        if value < 1:
            raise bad("must be >= 1")
        spec = RankSpec("int", float(value))
    elif isinstance(value, float):
        if not 0.0 < value <= 1.0 or math.isnan(value):
            raise bad("as a fraction must be in (0, 1]")
        spec = RankSpec("fraction", value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text == "vbmf":
            spec = RankSpec("vbmf", 0.0)
        elif text.startswith("energy:"):
            try:
                x = float(text.split(":", 1)[1])
            except ValueError:
                raise bad("has a malformed energy threshold") from None
            if not 0.0 < x <= 1.0:
                raise bad("has an energy threshold outside (0, 1]")
            spec = RankSpec("energy", x)
        elif text.startswith("budget:"):
            budgets: list[tuple[str, float]] = []
            for part in text.split(":", 1)[1].split(","):
                metric, _, amount = part.partition("=")
                metric = metric.strip()
                if metric not in BUDGET_METRICS:
                    raise bad(f"has a budget metric {metric!r} other than params or flops")
                if any(m == metric for m, _ in budgets):
                    raise bad(f"names the {metric} budget twice")
                try:
                    x = float(amount)
                except ValueError:
                    raise bad("has a malformed budget fraction") from None
                if not 0.0 < x <= 1.0:
                    raise bad("has a budget fraction outside (0, 1]")
                budgets.append((metric, x))
            spec = RankSpec("budget", budgets[0][1], budgets[0][0], tuple(budgets))
        else:
            raise bad("is not a known rank string")
    else:
        raise bad(f"has the wrong type {type(value).__name__}")
    if spec.kind not in allowed:
        raise bad(f"uses the {spec.kind!r} form, which this method does not support")
    return spec


def clamp_rank(rank: int, full: int) -> int:
    """Clamp to ``[1, full]``.

    Example:
        >>> clamp_rank(0, 8), clamp_rank(9, 8)
        (1, 8)
    """
    return max(1, min(int(rank), int(full)))


def round_rank(rank: int, full: int, multiple: int = 1) -> int:
    """Round ``rank`` to the nearest multiple of ``multiple`` (at least one multiple), then clamp
    to ``[1, full]``. ``multiple=1`` only clamps.

    Example:
        >>> round_rank(13, 64, 8), round_rank(3, 64, 8), round_rank(61, 60, 8)
        (16, 8, 60)
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    if multiple > 1:
        rank = max(multiple, multiple * math.floor(rank / multiple + 0.5))
    return clamp_rank(rank, full)


def rank_from_fraction(size: int, fraction: float) -> int:
    """``ceil(fraction * size)`` clamped to ``[1, size]`` (robust to float noise: 0.3 * 10 -> 3).

    Example:
        >>> rank_from_fraction(64, 0.25), rank_from_fraction(10, 0.3), rank_from_fraction(5, 0.01)
        (16, 3, 1)
    """
    return clamp_rank(math.ceil(fraction * size - 1e-9), size)


def rank_from_energy(singular_values: torch.Tensor, threshold: float) -> int:
    """Smallest ``r`` whose leading singular values hold ``threshold`` of the energy ``sum s^2``.

    Example:
        >>> rank_from_energy(torch.tensor([3.0, 2.0, 1.0, 0.0]), 0.9)
        2
    """
    s2 = singular_values.detach().double().cpu() ** 2
    total = float(s2.sum())
    if total <= 0:
        return 1
    share = torch.cumsum(s2, 0) / total
    rank = int((share < threshold - 1e-12).sum()) + 1
    return clamp_rank(rank, s2.numel())


def select_mode_rank(spec: RankSpec, unfolding: torch.Tensor, *, round_to: int = 1) -> int:
    """Rank for one mode, from its unfolding ``(I_mode, rest)``: the rows are the mode's size.

    ``fraction`` and ``int`` use only the size; ``energy`` the unfolding's singular values;
    ``vbmf`` runs :func:`~slimtorch.decompose.vbmf.evbmf` (a rank of 0 becomes 1 for the zero
    matrix, which rank 1 reproduces exactly).

    Raises:
        NoRankError: ``vbmf`` found rank 0 for a nonzero unfolding (all of it below the noise
            threshold).
        ValueError: a budget spec, which has no per-mode rank.

    Example:
        >>> select_mode_rank(RankSpec("int", 4.0), torch.randn(16, 9))
        4
    """
    full = unfolding.shape[0]
    if spec.kind == "budget":
        raise ValueError(
            f"a budget rank spec ({spec.metric}={spec.value}) has no per-mode rank: decompose_ "
            "spreads it over the layers; call decompose_ or give a fraction, int or energy"
        )
    if spec.kind == "fraction":
        rank = rank_from_fraction(full, spec.value)
    elif spec.kind == "int":
        rank = int(spec.value)
    elif spec.kind == "energy":
        rank = rank_from_energy(torch.linalg.svdvals(unfolding), spec.value)
    else:
        rank = evbmf(unfolding).rank
        if rank == 0 and bool((unfolding != 0).any()):
            rows, cols = unfolding.shape
            raise NoRankError(
                f"EVBMF found no component above its noise threshold in the {rows} x {cols} "
                "unfolding of the weight (a flat singular-value spectrum, as from an identity, "
                "orthogonal or random initialisation), and rank 1 would discard almost all of "
                "it; give an int, a fraction or 'energy:<x>' rank instead, or exclude the layer"
            )
    return round_rank(clamp_rank(rank, full), full, round_to)
