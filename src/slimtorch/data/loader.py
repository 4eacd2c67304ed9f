"""Device-resident batch loaders.

For small images a Python data loader (one sample at a time, collated on the CPU, copied every
step) is slower than the model. :class:`DeviceLoader` copies the whole uint8 dataset to the
device once and, per batch, gathers the indices, augments, converts and normalises there.
:class:`SyntheticLoader` yields random batches of the same shapes at almost no cost, to measure
what the real loader adds to a training step.

Sharding (``world_size > 1``): every rank draws the same permutation (a function of
``(seed, epoch)``); global batch ``i`` is the slice ``[i * B * W, (i + 1) * B * W)`` of it and
rank ``r`` takes the ``r``-th contiguous part of that slice. With ``drop_last=False`` the
permutation is **padded** by repeating its first elements until its length is a multiple of
``world_size``, so every rank has the same number of batches and the last batch has the same
size on every rank (a few samples then appear twice in that epoch). With ``drop_last=True`` the
samples after the last full global batch are dropped.

Example:
    >>> train = ImageDataset(name="toy", images=torch.zeros(10, 1, 8, 8, dtype=torch.uint8),
    ...                      labels=torch.arange(10) % 2, classes=("a", "b"),
    ...                      mean=(0.5,), std=(0.25,))
    >>> loader = DeviceLoader(train, 4, shuffle=True,  # device="cuda" to work on the GPU
    ...                       augment=AugmentConfig(random_crop_padding=1, hflip=True))
    >>> loader.set_epoch(1)  # a new shuffle and new augmentation each epoch
    >>> [(tuple(x.shape), x.dtype) for x, y in loader]
    [((4, 1, 8, 8), torch.float32), ((4, 1, 8, 8), torch.float32), ((2, 1, 8, 8), torch.float32)]
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence

import torch

from slimtorch.core.devices import resolve_device
from slimtorch.data.augment import AugmentConfig, apply_augment
from slimtorch.data.dataset import ImageDataset

logger = logging.getLogger(__name__)

__all__ = ["DeviceLoader", "SyntheticLoader"]


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (stable across runs and machines)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


class DeviceLoader:
    """Batches of a whole :class:`ImageDataset` kept as uint8 on ``device``.

    Each batch is gathered on the device, augmented (uint8, before normalisation, so crop
    padding is black), converted to ``dtype``, scaled to [0, 1] and normalised with the dataset's
    mean/std. The dataset is copied to the device on the first iteration, not in the constructor.

    Args:
        dataset: The data.
        batch_size: Samples per batch on this rank.
        shuffle: Draw a new permutation each epoch (a function of ``seed`` and the epoch set
            with :meth:`set_epoch`; the epoch does not advance by itself).
        drop_last: Drop samples after the last full (global) batch; otherwise pad (see the
            module docstring) and yield a smaller last batch.
        device: Where the data lives and batches are made: ``"cpu"``, ``"cuda[:<i>]"``,
            ``"mps"`` or ``"auto"``, as :func:`~slimtorch.core.devices.resolve_device` reads it
            (an unknown or unavailable device raises ``ValueError`` here).
        dtype: Floating dtype of the yielded images.
        augment: On-device augmentation, or ``None``.
        seed: Seed of the shuffle and of the augmentation.
        rank: This process's rank in ``[0, world_size)``.
        world_size: Number of processes sharing the epoch.
        channels_last: Yield images in ``torch.channels_last`` memory format.

    Example:
        >>> loader = DeviceLoader(load_dataset("digits"), 64, shuffle=True)
        >>> x, y = next(iter(loader))
        >>> x.shape, y.shape
        (torch.Size([64, 1, 8, 8]), torch.Size([64]))
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, {world_size - 1}] for world_size={world_size}")
        self.seed = _check_int("seed", seed, 0)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if augment is not None and not isinstance(augment, AugmentConfig):
            raise TypeError(f"augment must be an AugmentConfig or None, got {augment!r}")
        self.dataset = dataset
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.device = resolve_device(device)
        self.dtype = dtype
        self.augment = augment
        self.channels_last = bool(channels_last)
        self._epoch = 0
        self._start_batch = 0
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self._shift: torch.Tensor | None = None

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch set by :meth:`set_epoch`."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the shuffle order and the augmentation a function of ``(seed, epoch)``.

        Example:
            >>> ds = ImageDataset(name="toy", images=torch.zeros(8, 1, 2, 2, dtype=torch.uint8),
            ...                   labels=torch.zeros(8, dtype=torch.int64), classes=("a",),
            ...                   mean=(0.5,), std=(0.25,))
            >>> loader = DeviceLoader(ds, 4, shuffle=True)
            >>> loader.set_epoch(3)
            >>> first = loader.order()
            >>> torch.equal(first, loader.order())  # the same (seed, epoch), the same order
            True
            >>> loader.set_epoch(4)
            >>> torch.equal(first, loader.order())
            False
        """
        self._epoch = _check_int("epoch", epoch, 0)

    def set_start_batch(self, k: int) -> None:
        """Make the next iteration start at batch ``k`` of the epoch, without computing the
        first ``k`` batches (to resume mid-epoch). The batches yielded, augmentation included,
        equal batches ``k, k+1, ...`` of an uninterrupted epoch. Applies to one iteration.

        Example:
            >>> images = torch.arange(160).byte().view(10, 1, 4, 4)  # all different
            >>> ds = ImageDataset(name="toy", images=images,
            ...                   labels=torch.zeros(10, dtype=torch.int64), classes=("a",),
            ...                   mean=(0.5,), std=(0.25,))
            >>> loader = DeviceLoader(ds, 4, shuffle=True, augment=AugmentConfig(hflip=True))
            >>> loader.set_epoch(5)
            >>> full = [x for x, _ in loader]
            >>> loader.set_start_batch(1)  # resume after batch 0
            >>> rest = [x for x, _ in loader]
            >>> len(rest), all(torch.equal(a, b) for a, b in zip(rest, full[1:], strict=True))
            (2, True)
            >>> len([x for x, _ in loader])  # the next iteration is a whole epoch again
            3
        """
        _check_int("k", k, 0)
        if k > len(self):
            raise ValueError(f"start batch {k} is past the end of the epoch ({len(self)} batches)")
        self._start_batch = k

    def _padded_size(self) -> int:
        n = len(self.dataset)
        if self.drop_last:
            return (n // (self.batch_size * self.world_size)) * self.batch_size * self.world_size
        return n + (-n) % self.world_size if n else 0

    def __len__(self) -> int:
        return math.ceil(self._padded_size() / (self.batch_size * self.world_size))

    def batch_sizes(self) -> list[int]:
        """The size of each batch this rank yields in one epoch.

        Example:
            >>> ds_of_10 = ImageDataset(name="ten", images=torch.zeros(10, 1, 2, 2).byte(),
            ...                         labels=torch.zeros(10, dtype=torch.int64), classes=("a",),
            ...                         mean=(0.5,), std=(0.25,))
            >>> DeviceLoader(ds_of_10, 4).batch_sizes()
            [4, 4, 2]
            >>> DeviceLoader(ds_of_10, 4, drop_last=True).batch_sizes()
            [4, 4]
            >>> DeviceLoader(ds_of_10, 2, world_size=4).batch_sizes()  # padded to 12, 3 per rank
            [2, 1]
        """
        total, gb = self._padded_size(), self.batch_size * self.world_size
        return [min(gb, total - i * gb) // self.world_size for i in range(len(self))]

    def order(self) -> torch.Tensor:
        """The epoch's sample order (CPU int64), padded or cut as described in the module
        docstring; identical on every rank.

        Example:
            >>> ds_of_10 = ImageDataset(name="ten", images=torch.zeros(10, 1, 2, 2).byte(),
            ...                         labels=torch.zeros(10, dtype=torch.int64), classes=("a",),
            ...                         mean=(0.5,), std=(0.25,))
            >>> DeviceLoader(ds_of_10, 2, world_size=4).order().tolist()  # padded to 12
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
            >>> shuffled = DeviceLoader(ds_of_10, 4, shuffle=True).order()
            >>> sorted(shuffled.tolist()) == list(range(10))
            True
        """
        n = len(self.dataset)
        if self.shuffle:
            gen = torch.Generator().manual_seed(_mix_seed(self.seed, self._epoch))
            perm = torch.randperm(n, generator=gen)
        else:
            perm = torch.arange(n)
        size = self._padded_size()
        if size > n:
            perm = perm.repeat(math.ceil(size / n))
        return perm[:size]

    # -- iteration ---------------------------------------------------------------------------
    def _materialise(self) -> None:
        if self._images is not None:
            return
        ds = self.dataset
        self._images = ds.images.to(self.device)
        self._labels = ds.labels.to(self.device)
        mean = torch.tensor(ds.mean, dtype=torch.float64)
        std = torch.tensor(ds.std, dtype=torch.float64)
        shape = (1, len(ds.mean), 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(self.device, self.dtype).view(shape)
        self._shift = (mean / std).to(self.device, self.dtype).view(shape)
        logger.debug("moved %s (%d images) to %s", ds.name, len(ds), self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._materialise()
        assert self._images is not None and self._labels is not None
        assert self._scale is not None and self._shift is not None
        start, self._start_batch = self._start_batch, 0
        epoch = self._epoch
        order = self.order().to(self.device)
        sizes = self.batch_sizes()
        gb = self.batch_size * self.world_size
        augment = self.augment if self.augment is not None and self.augment.enabled else None
        gen = torch.Generator(device=self.device) if augment is not None else None
        for i in range(start, len(sizes)):
            m = sizes[i]
            lo = i * gb + self.rank * m
            idx = order[lo : lo + m]
            x = self._images[idx]  # (m, C, H, W) uint8
            y = self._labels[idx]
            if augment is not None and gen is not None:
                gen.manual_seed(_mix_seed(self.seed, epoch, self.rank, i))
                x = apply_augment(x, augment, generator=gen)
            x = x.to(self.dtype).mul_(self._scale).sub_(self._shift)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


class SyntheticLoader:
    """Random on-device batches with the shapes and count of a real loader, at almost no cost.

    One random batch (normal images, uniform labels) is made on the first iteration and slices
    of it are yielded, so a training loop fed by this loader measures the step alone; the
    difference to the same loop fed by :class:`DeviceLoader` is the loader's cost.

    Args:
        input_shape: ``(C, H, W)``.
        batch_size: Samples per batch.
        num_batches: Batches per epoch.
        num_classes: Labels are drawn from ``[0, num_classes)``.
        last_batch_size: Size of the last batch (default: ``batch_size``).
        device: Where the batches live.
        dtype: Floating dtype of the images.
        seed: Seed of the random batch.
        channels_last: Yield images in ``torch.channels_last`` memory format.

    Example:
        >>> synth = SyntheticLoader((1, 28, 28), 128, 100, num_classes=10)
        >>> x, y = next(iter(synth))
        >>> len(synth), x.shape, y.shape
        (100, torch.Size([128, 1, 28, 28]), torch.Size([128]))
        >>> loader = DeviceLoader(load_dataset("digits"), 64)
        >>> like = SyntheticLoader.like(loader)
        >>> len(like) == len(loader), like.batch_sizes() == loader.batch_sizes()
        (True, True)
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        batch_size: int,
        num_batches: int,
        *,
        num_classes: int = 10,
        last_batch_size: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
            raise ValueError(f"input_shape must be (C, H, W), all positive, got {input_shape}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_batches = _check_int("num_batches", num_batches, 0)
        self.num_classes = _check_int("num_classes", num_classes, 1)
        last = batch_size if last_batch_size is None else last_batch_size
        self.last_batch_size = _check_int("last_batch_size", last, 1)
        if self.last_batch_size > batch_size:
            raise ValueError(
                f"last_batch_size must be <= batch_size ({batch_size}), got {last_batch_size}"
            )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = seed
        self.channels_last = bool(channels_last)
        self._start_batch = 0
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    @classmethod
    def like(cls, loader: DeviceLoader) -> SyntheticLoader:
        """A synthetic loader with the shapes, batch sizes, device and dtype of ``loader``."""
        sizes = loader.batch_sizes()
        return cls(
            loader.dataset.input_shape,
            max(sizes, default=loader.batch_size),
            len(sizes),
            num_classes=loader.dataset.num_classes,
            last_batch_size=sizes[-1] if sizes else None,
            device=loader.device,
            dtype=loader.dtype,
            seed=loader.seed,
            channels_last=loader.channels_last,
        )

    def __len__(self) -> int:
        return self.num_batches

    def batch_sizes(self) -> list[int]:
        """The size of each batch of an epoch."""
        if self.num_batches == 0:
            return []
        return [self.batch_size] * (self.num_batches - 1) + [self.last_batch_size]

    def set_epoch(self, epoch: int) -> None:
        """Accepted for interface parity with :class:`DeviceLoader`; the data does not change."""
        _check_int("epoch", epoch, 0)

    def set_start_batch(self, k: int) -> None:
        """Skip the first ``k`` batches of the next iteration."""
        _check_int("k", k, 0)
        if k > len(self):
            raise ValueError(f"start batch {k} is past the end of the epoch ({len(self)} batches)")
        self._start_batch = k

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._x is None or self._y is None:
            gen = torch.Generator(device=self.device).manual_seed(self.seed)
            b = self.batch_size
            x = torch.randn((b, *self.input_shape), generator=gen, device=self.device)
            x = x.to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self._x = x
            self._y = torch.randint(0, self.num_classes, (b,), generator=gen, device=self.device)
        start, self._start_batch = self._start_batch, 0
        for m in self.batch_sizes()[start:]:
            yield self._x[:m], self._y[:m]
