"""Pure mask-update maths of dynamic sparse training: the drop schedule and drop-and-grow.

The drop fraction follows the cosine schedule of RigL (Evci et al. 2020, arXiv:1911.11134)::

    f(t) = alpha / 2 * (1 + cos(pi * t / T_end))   for t < T_end, 0 afterwards

At an update, a layer with ``k`` active weights drops the ``floor(f(t) * k)`` of smallest
magnitude and grows as many inactive ones with the highest grow score: the dense gradient
magnitude for RigL, a random number for SET (Mocanu et al. 2018, arXiv:1707.04780). Weights
just dropped may be grown back (they compete like any inactive weight), so the number of active
weights never changes. Ties are broken deterministically (lower flat index first), so equal
inputs give equal masks on every DDP rank.

:class:`Exploration` keeps two figures of how the masks move, for reading a run rather than
steering it: the in-time over-parameterisation rate of Liu et al. 2021 ("Do We Actually Need
Dense Over-Parameterization? In-Time Over-Parameterization in Sparse Training",
arXiv:2102.02887), the fraction of weights that were active at any time so far, and the share
of the weights grown at one update that are still active after the next (regrowth that picks
useful connections keeps more of them).

Example:
    >>> round(cosine_drop_fraction(0, 0.3, 100), 3), round(cosine_drop_fraction(50, 0.3, 100), 3)
    (0.3, 0.15)
    >>> w = torch.tensor([0.5, 0.1, 0.0, 0.0])
    >>> mask = torch.tensor([True, True, False, False])
    >>> drop_and_grow(w, mask, torch.tensor([0.0, 0.0, 2.0, 1.0]), 1).tolist()
    [True, False, True, False]
"""

from __future__ import annotations

import math
from typing import Any

import torch

from slimtorch.prune.masks import lowest_k


def cosine_drop_fraction(step: int, alpha: float, t_end: int) -> float:
    """The fraction of active weights replaced at ``step``: ``alpha/2 (1 + cos(pi t / T_end))``.

    Example:
        >>> cosine_drop_fraction(100, 0.3, 100)
        0.0
    """
    if t_end <= 0 or step >= t_end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / t_end))


def drop_count(active: int, fraction: float) -> int:
    """``floor(fraction * active)``, the number of weights swapped in one layer.

    Example:
        >>> drop_count(10, 0.29)
        2
    """
    return math.floor(fraction * active + 1e-9)


def drop_and_grow(
    weight: torch.Tensor, mask: torch.Tensor, grow_scores: torch.Tensor, n: int
) -> torch.Tensor:
    """Drop the ``n`` active weights of smallest ``|weight|``, grow the ``n`` best-scored others.

    Args:
        weight: The layer's weight (any shape).
        mask: Its ``bool`` mask (same shape).
        grow_scores: Higher is grown first (same shape); only inactive entries compete.
        n: Number of weights to swap (clamped to what the mask allows).

    Returns:
        The new ``bool`` mask, with exactly as many ``True`` entries as ``mask``.

    Example:
        >>> m = drop_and_grow(torch.randn(6, 6), torch.rand(6, 6) > 0.5, torch.rand(6, 6), 3)
        >>> m.dtype
        torch.bool
    """
    if weight.shape != mask.shape or grow_scores.shape != mask.shape:
        raise ValueError(
            f"weight {tuple(weight.shape)}, mask {tuple(mask.shape)} and grow_scores "
            f"{tuple(grow_scores.shape)} must have the same shape"
        )
    flat_mask = mask.reshape(-1)
    active = int(flat_mask.sum())
    n = max(0, min(n, active, flat_mask.numel() - active + n))
    if n == 0:
        return mask.clone()
    inf = torch.tensor(float("inf"), device=weight.device)
    drop_scores = torch.where(flat_mask, weight.detach().reshape(-1).abs().float(), inf)
    after = flat_mask & ~lowest_k(drop_scores, n)  # lowest magnitudes; ties: lower index
    big = torch.finfo(torch.float32).max
    candidates = torch.nan_to_num(grow_scores.detach().reshape(-1).float(), -big, big, -big)
    scores = torch.where(after, -inf, candidates)  # every inactive entry beats every active one
    after |= lowest_k(-scores, n)  # highest scores; ties: lower index
    return after.view(mask.shape)


class Exploration:
    """Which weights were ever active, and how many of the last grown ones survive.

    Call :meth:`record` for every sparse layer at every update, with its old and new mask
    (``new=None`` for a layer the update left alone: it counts towards the explored fraction,
    and its last grown weights are not compared), then :meth:`close` once; it returns the
    update's figures. It keeps two ``bool`` tensors the size of each sparse weight (ever
    active, grown at the last update) on the weight's device, and both go into the checkpoint:
    two bytes a weight, half the size of one fp32 copy of it.

    Example:
        >>> ex = Exploration()
        >>> ex.record("fc", torch.tensor([True, True, False, False]),
        ...           torch.tensor([True, False, True, False]))
        >>> ex.close()
        {'explored': 0.75, 'grown_kept': None}
        >>> ex.record("fc", torch.tensor([True, False, True, False]),
        ...           torch.tensor([False, False, True, True]))
        >>> ex.close()
        {'explored': 1.0, 'grown_kept': 1.0}
    """

    def __init__(self) -> None:
        self.explored: dict[str, torch.Tensor] = {}
        self.last_grown: dict[str, torch.Tensor] = {}
        self._kept = 0
        self._compared = 0

    def record(self, name: str, old: torch.Tensor, new: torch.Tensor | None) -> None:
        """Note one layer's masks before and after the current update (``None``: unchanged)."""
        explored = self.explored.get(name)
        explored = old.clone() if explored is None else explored.to(old.device)
        previous = self.last_grown.pop(name, None)
        if new is not None:
            explored |= new
            if previous is not None:
                previous = previous.to(new.device)
                self._kept += int((previous & new).sum())
                self._compared += int(previous.sum())
            self.last_grown[name] = new & ~old
        self.explored[name] = explored

    def close(self) -> dict[str, float | None]:
        """End the update: the explored fraction over all recorded layers, the grown share kept.

        ``grown_kept`` is ``None`` when no layer compared had grown weights at its previous
        update.
        """
        numel = sum(m.numel() for m in self.explored.values())
        ever = sum(int(m.sum()) for m in self.explored.values())
        kept = self._kept / self._compared if self._compared else None
        self._kept = self._compared = 0
        return {"explored": ever / numel if numel else None, "grown_kept": kept}

    def state_dict(self) -> dict[str, Any]:
        return {"explored": dict(self.explored), "last_grown": dict(self.last_grown)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.explored = dict(state.get("explored", {}))
        self.last_grown = dict(state.get("last_grown", {}))
