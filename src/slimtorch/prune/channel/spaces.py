"""Channel spaces: the index sets that coupled layers must prune alike, and their union-find.

A *space* describes the channel axis of one tensor in a traced forward pass:

* :class:`Leaf`: the output channels of one conv/linear layer (or of the model input, or of an
  op the graph does not understand). Leaves that must be pruned alike (the two operands of a
  residual addition, the input and output of a depthwise convolution) are merged in a
  union-find; each resulting class is one *channel group*.
* :class:`Cat`: a concatenation of spaces along the channel axis (offsets into the axis).
* :class:`Expand`: each channel of an inner space repeated ``factor`` times in a row, which is
  how ``flatten`` maps a ``(C, H, W)`` map onto ``C * H * W`` features and how a depthwise
  convolution with channel multiplier ``m`` maps ``C`` inputs onto ``C * m`` outputs.

Once every group has its kept indices, :meth:`SpaceSet.indices` turns any space into the kept
positions along its axis, so a layer that reads a concatenation or a flattened map is sliced
consistently with every group it depends on.

Example:
    >>> spaces = SpaceSet()
    >>> a, b = spaces.new_leaf(4, "conv_a"), spaces.new_leaf(2, "conv_b")
    >>> keep = {spaces.find(a): torch.tensor([0, 3]), spaces.find(b): torch.tensor([1])}
    >>> spaces.indices(Expand(Cat((a, b)), 2), keep).tolist()
    [0, 1, 6, 7, 10, 11]
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(eq=False)
class Leaf:
    """The channel axis produced by one layer (``origin``) or a fixed source (``None``)."""

    size: int
    uid: int
    origin: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Cat:
    """Spaces concatenated along the channel axis, in order."""

    parts: tuple[Space, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Expand:
    """Each channel of ``inner`` repeated ``factor`` times consecutively (flatten, multiplier)."""

    inner: Space
    factor: int


Space = Leaf | Cat | Expand


def space_size(space: Space) -> int:
    """Number of positions along the axis a space describes.

    Example:
        >>> space_size(Expand(Leaf(3, 0), 4))
        12
    """
    if isinstance(space, Leaf):
        return space.size
    if isinstance(space, Cat):
        return sum(space_size(p) for p in space.parts)
    return space_size(space.inner) * space.factor


def expand(space: Space, factor: int) -> Space:
    """``Expand(space, factor)``, or ``space`` itself when ``factor == 1``.

    Example:
        >>> leaf = Leaf(3, 0)
        >>> expand(leaf, 1) is leaf
        True
    """
    return space if factor == 1 else Expand(space, factor)


class SpaceSet:
    """Creates leaves and keeps the union-find of coupled leaves with each class's notes.

    Attributes:
        fixed: Root -> reasons the group's size is fixed (model input/output): never pruned,
            not an error.
        blocked: Root -> reasons the graph cannot resolve the group (unknown op, misaligned
            axes): skipped and reported.
        blocks: Root -> number of equal blocks the group must be pruned in (grouped convs).
    """

    def __init__(self) -> None:
        self._leaves: list[Leaf] = []
        self._parent: list[int] = []
        self.fixed: dict[int, list[str]] = {}
        self.blocked: dict[int, list[str]] = {}
        self.blocks: dict[int, int] = {}

    def new_leaf(self, size: int, origin: str | None = None) -> Leaf:
        """A fresh leaf of ``size`` channels in a class of its own."""
        leaf = Leaf(int(size), len(self._leaves), origin)
        self._leaves.append(leaf)
        self._parent.append(leaf.uid)
        return leaf

    @property
    def leaves(self) -> list[Leaf]:
        """Every leaf, in creation order."""
        return list(self._leaves)

    def find(self, leaf: Leaf) -> int:
        """The root id of the class holding ``leaf``."""
        i = leaf.uid
        while self._parent[i] != i:
            self._parent[i] = self._parent[self._parent[i]]
            i = self._parent[i]
        return i

    def _merge_notes(self, keep: int, gone: int) -> None:
        for notes in (self.fixed, self.blocked):
            if gone in notes:
                kept = notes.setdefault(keep, [])
                kept.extend(r for r in notes.pop(gone) if r not in kept)
        if gone in self.blocks:
            b = self.blocks.pop(gone)
            self.blocks[keep] = math.lcm(self.blocks.get(keep, 1), b)

    def leaves_of(self, space: Space) -> list[Leaf]:
        """The leaves a space is built from, in axis order."""
        if isinstance(space, Leaf):
            return [space]
        if isinstance(space, Cat):
            return [leaf for p in space.parts for leaf in self.leaves_of(p)]
        return self.leaves_of(space.inner)

    def roots_of(self, space: Space) -> set[int]:
        """Root ids of every group a space touches."""
        return {self.find(leaf) for leaf in self.leaves_of(space)}

    def fix(self, space: Space, reason: str) -> None:
        """Mark every group under ``space`` as fixed in size (not prunable, not an error)."""
        for root in self.roots_of(space):
            notes = self.fixed.setdefault(root, [])
            if reason not in notes:
                notes.append(reason)

    def block(self, space: Space, reason: str) -> None:
        """Mark every group under ``space`` as unresolvable (skipped with ``reason``)."""
        for root in self.roots_of(space):
            notes = self.blocked.setdefault(root, [])
            if reason not in notes:
                notes.append(reason)

    def require_blocks(self, space: Space, blocks: int, where: str) -> None:
        """Require the group of ``space`` to be pruned equally in ``blocks`` blocks."""
        if blocks == 1:
            return
        if not isinstance(space, Leaf):
            self.block(space, f"grouped layer {where} reads concatenated or flattened channels")
            return
        root = self.find(space)
        self.blocks[root] = math.lcm(self.blocks.get(root, 1), blocks)

    def unify(self, a: Space, b: Space, where: str) -> bool:
        """Couple two spaces that must be pruned alike; blocks both when they cannot align."""
        if isinstance(a, Leaf) and isinstance(b, Leaf):
            ra, rb = self.find(a), self.find(b)
            if ra == rb:
                return True
            if a.size != b.size:
                self.block(a, f"{where} joins {a.size} and {b.size} channels")
                self.block(b, f"{where} joins {a.size} and {b.size} channels")
                return False
            keep, gone = min(ra, rb), max(ra, rb)
            self._parent[gone] = keep
            self._merge_notes(keep, gone)
            return True
        if (
            isinstance(a, Cat)
            and isinstance(b, Cat)
            and [space_size(p) for p in a.parts] == [space_size(p) for p in b.parts]
        ):
            return all([self.unify(x, y, where) for x, y in zip(a.parts, b.parts, strict=True)])
        if isinstance(a, Expand) and isinstance(b, Expand) and a.factor == b.factor:
            return self.unify(a.inner, b.inner, where)
        reason = f"{where} combines channel axes of different structure"
        self.block(a, reason)
        self.block(b, reason)
        return False

    def indices(self, space: Space, keep: dict[int, torch.Tensor]) -> torch.Tensor:
        """Kept positions along the axis of ``space`` (all, for groups absent from ``keep``)."""
        if isinstance(space, Leaf):
            idx = keep.get(self.find(space))
            return torch.arange(space.size) if idx is None else idx
        if isinstance(space, Cat):
            out, offset = [], 0
            for part in space.parts:
                out.append(self.indices(part, keep) + offset)
                offset += space_size(part)
            return torch.cat(out)
        inner = self.indices(space.inner, keep)  # (k,)
        steps = torch.arange(space.factor)
        return (inner[:, None] * space.factor + steps[None, :]).reshape(-1)  # (k * factor,)

    def scatter(self, space: Space, values: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Split per-position ``values`` of ``space`` into per-group channel vectors.

        An :class:`Expand` sums the ``factor`` positions of each channel.
        """
        if isinstance(space, Leaf):
            return [(self.find(space), values)]
        if isinstance(space, Cat):
            out, offset = [], 0
            for part in space.parts:
                n = space_size(part)
                out += self.scatter(part, values[offset : offset + n])
                offset += n
            return out
        summed = values.reshape(-1, space.factor).sum(dim=1)  # (C,)
        return self.scatter(space.inner, summed)
