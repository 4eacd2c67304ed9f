"""The in-memory image dataset type and a deterministic train/validation split.

Every reader in :mod:`slimtorch.data` returns an :class:`ImageDataset`: all images as one uint8
tensor ``(N, C, H, W)``, labels as int64 ``(N,)``, the class names and the per-channel mean/std
(in [0, 1] pixel units) used to normalise them. Small image sets fit in memory many times over,
so keeping them as one tensor lets :class:`~slimtorch.data.loader.DeviceLoader` move them to the
device once and gather batches there.

Example:
    >>> ds = ImageDataset(name="toy", images=torch.zeros(4, 1, 8, 8, dtype=torch.uint8),
    ...                   labels=torch.tensor([0, 1, 0, 1]), classes=("a", "b"),
    ...                   mean=(0.5,), std=(0.25,))
    >>> train, val = split_dataset(ds, 0.5, seed=0)
    >>> len(train), len(val)
    (2, 2)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

__all__ = ["ImageDataset", "split_dataset"]


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An image-classification dataset held in memory.

    Attributes:
        name: Short name, e.g. ``"mnist"`` or ``"mnist/train"``.
        images: uint8 tensor ``(N, C, H, W)``, pixel values 0..255.
        labels: int64 tensor ``(N,)`` with values in ``[0, len(classes))``.
        classes: Class names; label ``i`` means ``classes[i]``.
        mean: Per-channel mean in [0, 1] pixel units (length ``C``).
        std: Per-channel standard deviation in [0, 1] pixel units (length ``C``, all > 0).

    Example:
        >>> ds = ImageDataset(name="toy", images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
        ...                   labels=torch.tensor([0, 1]), classes=("a", "b"),
        ...                   mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
        >>> ds.input_shape
        (3, 4, 4)
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        where = f"ImageDataset {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ImageDataset.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.images, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise TypeError(f"{where}: images and labels must be torch.Tensor objects")
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"{where}: images must be a uint8 tensor of shape (N, C, H, W), got "
                f"{self.images.dtype} of shape {tuple(self.images.shape)}; convert with "
                "`.to(torch.uint8)` and permute channels first"
            )
        n, c = self.images.shape[0], self.images.shape[1]
        if c < 1 or self.images.shape[2] < 1 or self.images.shape[3] < 1:
            raise ValueError(f"{where}: images need C, H, W >= 1, got {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (n,):
            raise ValueError(
                f"{where}: labels must be an int64 tensor of shape ({n},), got "
                f"{self.labels.dtype} of shape {tuple(self.labels.shape)}"
            )
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.classes) < 1 or not all(isinstance(k, str) for k in self.classes):
            raise ValueError(f"{where}: classes must be a non-empty tuple of str")
        if n > 0:
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= len(self.classes):
                raise ValueError(
                    f"{where}: labels must lie in [0, {len(self.classes) - 1}] (one per class), "
                    f"found values in [{lo}, {hi}]; check the classes tuple"
                )
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(
                f"{where}: mean and std need one value per channel ({c}), got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        if not all(s > 0 for s in self.std):
            raise ValueError(f"{where}: std values must be > 0, got {self.std}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, input_shape={self.input_shape}, "
            f"classes={len(self.classes)})"
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` of one image."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return len(self.classes)

    def subset(
        self, indices: Sequence[int] | torch.Tensor, *, name: str | None = None
    ) -> ImageDataset:
        """A dataset holding the samples at ``indices`` (int positions or a bool mask).

        Example:
            >>> ds = ImageDataset(name="toy", images=torch.zeros(4, 1, 2, 2, dtype=torch.uint8),
            ...                   labels=torch.tensor([0, 1, 1, 0]), classes=("a", "b"),
            ...                   mean=(0.5,), std=(0.25,))
            >>> ds.subset([0, 2]).labels.tolist()
            [0, 1]
            >>> ds.subset(ds.labels == 1, name="toy/b")
            ImageDataset(name='toy/b', n=2, input_shape=(1, 2, 2), classes=2)
        """
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise ValueError(
                    f"a bool mask for subset must have shape ({len(self)},), got {tuple(idx.shape)}"
                )
            idx = idx.nonzero().flatten()
        if idx.numel() == 0:
            idx = idx.to(torch.int64)
        if idx.ndim != 1 or idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(
                f"subset indices must be a 1-D sequence of ints or a bool mask, got "
                f"{idx.dtype} of shape {tuple(idx.shape)}"
            )
        idx = idx.to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise ValueError(
                f"subset indices must lie in [0, {len(self) - 1}], got values in "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        return ImageDataset(
            name=name or self.name,
            images=self.images[idx],
            labels=self.labels[idx],
            classes=self.classes,
            mean=self.mean,
            std=self.std,
        )


def split_dataset(
    ds: ImageDataset, val_fraction: float, *, seed: int, stratify: bool = True
) -> tuple[ImageDataset, ImageDataset]:
    """Split ``ds`` into ``(train, val)``, deterministically for a given ``seed``.

    With ``stratify=True`` each class contributes ``round(n_class * val_fraction)`` samples to
    the validation set (leaving it one training sample at least), so class proportions are
    kept; otherwise ``round(N * val_fraction)`` samples are drawn at random. Both subsets keep
    the original sample order.

    Args:
        ds: The dataset to split.
        val_fraction: Fraction of samples for validation, in (0, 1).
        seed: Seed of the random draw; the same seed gives the same split on every machine.
        stratify: Keep the class proportions in both parts.

    Returns:
        ``(train, val)``, named ``"<name>/train"`` and ``"<name>/val"``.

    Example:
        >>> train, val = split_dataset(load_dataset("digits"), 0.1, seed=0)
        >>> len(train), len(val), val.name
        (1295, 143, 'digits/val')
        >>> val.labels.bincount().tolist()  # about 10% of each class
        [14, 15, 14, 15, 14, 15, 14, 14, 14, 14]
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float):
        raise TypeError(f"val_fraction must be a float, got {type(val_fraction).__name__}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    gen = torch.Generator().manual_seed(int(seed))
    n = len(ds)
    is_val = torch.zeros(n, dtype=torch.bool)
    if stratify:
        labels = ds.labels.cpu()
        for c in range(len(ds.classes)):
            members = (labels == c).nonzero().flatten()
            # every class keeps one training sample at least: a class that only validation
            # sees is never learned
            k = min(round(members.numel() * val_fraction), members.numel() - 1)
            if k > 0:
                pick = torch.randperm(members.numel(), generator=gen)[:k]
                is_val[members[pick]] = True
    else:
        k = round(n * val_fraction)
        is_val[torch.randperm(n, generator=gen)[:k]] = True
    n_val = int(is_val.sum())
    if n_val == 0 or n_val == n:
        raise ValueError(
            f"val_fraction={val_fraction} of {n} samples leaves an empty "
            f"{'validation' if n_val == 0 else 'training'} set; choose a fraction that leaves "
            "at least one sample on each side"
        )
    base = ds.name.split("/")[0]
    return ds.subset(~is_val, name=f"{base}/train"), ds.subset(is_val, name=f"{base}/val")
