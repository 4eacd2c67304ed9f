"""Batched, on-device image augmentation: random crop with zero padding and horizontal flip.

Both work on a whole batch at once with per-sample random choices and no Python loop over
samples, so they run on the GPU next to the model. They act on uint8 (or float) images
``(B, C, H, W)`` before normalisation, so the padding is black, as in the usual CIFAR recipe
(He et al., 2016, "Deep Residual Learning for Image Recognition", arXiv:1512.03385).

Example:
    >>> images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    >>> g = torch.Generator().manual_seed(0)
    >>> x = random_crop(images, padding=4, generator=g)     # same shape, content shifted
    >>> x = random_hflip(x, generator=g)
    >>> x.shape, x.dtype
    (torch.Size([8, 3, 32, 32]), torch.uint8)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimtorch.core.config import Config, check_bool, check_range

__all__ = ["AugmentConfig", "apply_augment", "random_crop", "random_hflip"]


@dataclass(frozen=True, kw_only=True)
class AugmentConfig(Config):
    """On-device augmentation of :class:`~slimtorch.data.loader.DeviceLoader` batches.

    Attributes:
        random_crop_padding: Pad each side by this many zero pixels, then crop back to the
            original size at a random offset per sample (0 disables the crop).
        hflip: Mirror each sample left-right with probability 0.5.

    Example:
        >>> AugmentConfig(random_crop_padding=4, hflip=True).to_dict()
        {'random_crop_padding': 4, 'hflip': True}
    """

    random_crop_padding: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.random_crop_padding, bool) or not isinstance(
            self.random_crop_padding, int
        ):
            got = self.random_crop_padding
            raise ValueError(f"AugmentConfig.random_crop_padding must be an int, got {got!r}")
        check_range(self, "random_crop_padding", self.random_crop_padding, low=0, high=64)
        check_bool(self, "hflip", self.hflip)

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is switched on."""
        return self.random_crop_padding > 0 or self.hflip


def random_crop(
    images: torch.Tensor, padding: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad ``images`` by ``padding`` on each side and crop back at per-sample offsets.

    Args:
        images: ``(B, C, H, W)``.
        padding: Pixels of zero padding per side (offsets are uniform in ``[0, 2 * padding]``).
        generator: Random generator on ``images.device``.

    Returns:
        A tensor of the same shape and dtype as ``images``.

    Example:
        >>> random_crop(torch.ones(2, 1, 4, 4), 1).shape
        torch.Size([2, 1, 4, 4])
    """
    if images.ndim != 4:
        raise ValueError(f"random_crop expects (B, C, H, W) images, got {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0 or images.shape[0] == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    dev = images.device
    offs = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=dev)
    rows = offs[0, :, None] + torch.arange(h, device=dev)  # (B, H)
    cols = offs[1, :, None] + torch.arange(w, device=dev)  # (B, W)
    batch = torch.arange(b, device=dev)[:, None, None]  # (B, 1, 1)
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def random_hflip(
    images: torch.Tensor, p: float = 0.5, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mirror each sample left-right with probability ``p``.

    Example:
        >>> random_hflip(torch.arange(4.0).view(1, 1, 1, 4), p=1.0)
        tensor([[[[3., 2., 1., 0.]]]])
    """
    if images.ndim != 4:
        raise ValueError(f"random_hflip expects (B, C, H, W) images, got {tuple(images.shape)}")
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < p
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def apply_augment(
    images: torch.Tensor, config: AugmentConfig, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply the augmentations switched on in ``config`` (crop, then flip).

    Example:
        >>> x = torch.arange(4.0).view(1, 1, 1, 4)
        >>> apply_augment(x, AugmentConfig()) is x  # nothing switched on
        True
        >>> g = torch.Generator().manual_seed(0)
        >>> y = apply_augment(x, AugmentConfig(hflip=True), generator=g)
        >>> torch.equal(y, x) or torch.equal(y, x.flip(3))  # mirrored or left as it was
        True
    """
    if config.random_crop_padding:
        images = random_crop(images, config.random_crop_padding, generator=generator)
    if config.hflip:
        images = random_hflip(images, generator=generator)
    return images
