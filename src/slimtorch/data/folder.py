"""Reader of an image folder: ``root/<class_name>/*.png|jpg|jpeg|bmp``.

Class names are the sub-folder names, sorted; images inside a class are read in sorted file
order, so the same folder always gives the same dataset. Pillow is imported only when a folder
is read.

Example:
    >>> import pathlib, tempfile
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp()) / "pets"
    >>> for cls, shade in (("cat", 40), ("dog", 200)):  # one 48x40 image per class
    ...     (root / cls).mkdir(parents=True)
    ...     Image.new("RGB", (48, 40), (shade,) * 3).save(root / cls / "0.png")
    >>> ds = load_image_folder(root, channels=3, size=64)
    >>> ds.name, ds.classes, ds.labels.tolist(), ds.input_shape
    ('pets', ('cat', 'dog'), [0, 1], (3, 64, 64))
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtorch.core.errors import DataFormatError, DataNotFoundError
from slimtorch.data.dataset import ImageDataset

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "load_image_folder"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")


def _import_pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading an image folder needs Pillow, which is not installed; install it with "
            "`pip install pillow` or `pip install slimtorch[data]`"
        ) from exc
    return Image


def _normalise_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        hw = (size, size)
    elif isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, int) for s in size):
        hw = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"size must be an int or an (height, width) pair, got {size!r}")
    if min(hw) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return hw


def _to_8bit(img: Any, image_mod: Any, path: Path) -> Any:
    """16-bit grayscale scaled to 8 bits (``convert`` would clip it at 255); 32-bit integer
    and float images, whose range is unknown, are refused."""
    if img.mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float64)  # (H, W), 0..65535
        return image_mod.fromarray(np.rint(arr / 257.0).astype(np.uint8))  # mode "L"
    if img.mode in ("I", "F"):
        raise DataFormatError(
            f"image {path} has mode {img.mode!r} (32-bit pixels with no fixed range), which "
            "cannot be mapped onto 0..255 unambiguously; save it as 8-bit or 16-bit first"
        )
    return img


def load_image_folder(
    path: str | os.PathLike[str],
    *,
    channels: int = 3,
    size: int | Sequence[int] | None = None,
    name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ImageDataset:
    """Read ``path/<class_name>/<image>`` files into an :class:`ImageDataset`.

    Args:
        path: The root folder; each sub-folder is one class.
        channels: 1 (grayscale, Pillow mode ``"L"``) or 3 (RGB). 16-bit grayscale images are
            scaled to 8 bits (``round(v / 257)``).
        size: Resize every image to ``size`` (int for square, or ``(height, width)``) with
            bilinear filtering; ``None`` keeps the size, which must then be the same for all.
        name: Dataset name (default: the folder name).
        mean: Per-channel mean in [0, 1] units; default: computed from the images.
        std: Per-channel std in [0, 1] units; default: computed from the images.
        extensions: File suffixes to read (case-insensitive); other files are ignored, and so
            are hidden files and folders (names starting with ``.``, such as the ``._x.png``
            resource files macOS leaves beside copied images).

    Returns:
        The dataset, images uint8 ``(N, channels, H, W)``.

    Raises:
        DataNotFoundError: ``path`` is not a folder or holds no images.
        DataFormatError: A file cannot be decoded or has 32-bit pixels (the message names it),
            or sizes differ and ``size`` was not given.

    Example:
        >>> import pathlib, tempfile
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for cls, size in (("daisy", (48, 40)), ("rose", (20, 20))):  # (width, height)
        ...     (root / cls).mkdir()
        ...     Image.new("RGB", size, (255, 0, 0)).save(root / cls / "0.jpg")
        >>> ds = load_image_folder(root, channels=1, size=(32, 24), name="flowers",
        ...                        mean=[0.5], std=[0.25])
        >>> ds.name, ds.classes, ds.input_shape, ds.mean
        ('flowers', ('daisy', 'rose'), (1, 32, 24), (0.5,))
        >>> load_image_folder(root)  # two sizes and no size=
        Traceback (most recent call last):
        ...
        slimtorch.core.errors.DataFormatError: image .../rose/0.jpg is 20x20 but .../daisy/0.jpg ...
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    hw = _normalise_size(size)
    root = Path(path)
    if not root.is_dir():
        raise DataNotFoundError(
            f"image folder {root} does not exist or is not a folder; expected "
            "<folder>/<class_name>/<image files>"
        )
    exts = tuple(e.lower() for e in extensions)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        members = sorted(
            p
            for p in (root / cls).iterdir()
            if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")
        )
        if not members:
            logger.warning("class folder %s holds no %s files", root / cls, "/".join(exts))
        files.extend((p, label) for p in members)
    if not files:
        raise DataNotFoundError(
            f"no images found under {root}; expected <folder>/<class_name>/*"
            f"{'|*'.join(exts)} (found class folders: {', '.join(classes) or 'none'})"
        )
    image_mod = _import_pil()
    mode = "L" if channels == 1 else "RGB"
    arrays: list[np.ndarray] = []
    for p, _ in files:
        try:
            with image_mod.open(p) as img:
                img = _to_8bit(img, image_mod, p).convert(mode)
                if hw is not None and (img.height, img.width) != hw:
                    img = img.resize((hw[1], hw[0]), image_mod.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, image_mod.DecompressionBombError) as exc:
            # DecompressionBombError: more pixels than PIL's limit (a decompression bomb)
            raise DataFormatError(
                f"cannot read image {p} ({type(exc).__name__}: {exc}); expected a valid "
                f"{'/'.join(exts)} file: fix or remove it"
            ) from exc
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arrays and arr.shape != arrays[0].shape:
            raise DataFormatError(
                f"image {p} is {arr.shape[1]}x{arr.shape[0]} but {files[0][0]} is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; pass size=(height, width) to "
                "resize all images to one size"
            )
        arrays.append(arr)
    images = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())  # (N, C, H, W)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    if mean is None or std is None:
        x = images.to(torch.float64) / 255.0
        est_mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
        est_std = tuple(max(s, 1e-6) for s in x.std(dim=(0, 2, 3), unbiased=False).tolist())
    return ImageDataset(
        name=name or root.resolve().name,
        images=images,
        labels=labels,
        classes=tuple(classes),
        mean=tuple(mean) if mean is not None else est_mean,
        std=tuple(std) if std is not None else est_std,
    )
