"""Reader of an image folder: ``root/<class_name>/*.png|jpg|jpeg|bmp``.

Class names are the sub-folder names, sorted; images inside a class are read in sorted file
order, so the same folder always gives the same dataset. Pillow is imported only when a folder
is read.

Decompression bombs (a PNG of a few KB can declare 10000x10000 pixels) are refused from the file
header, before any pixel is decoded: an image of more than :data:`MAX_IMAGE_PIXELS` pixels (by
default Pillow's own ``Image.MAX_IMAGE_PIXELS``, about 89.5 M; ``None`` in both: no limit) is a
:class:`~slimtorch.core.errors.DataFormatError` naming the file and its size, and Pillow's
``DecompressionBombWarning`` is an error while the loader decodes. Every image is resized to the
model's input size (or kept at its own size), so real photos need far less: a 24 MP or 61 MP
camera image still loads. Raise the limit, if you must, with
``slimtorch.data.folder.MAX_IMAGE_PIXELS = ...``.

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
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtorch.core.errors import DataFormatError, DataNotFoundError
from slimtorch.data.dataset import ImageDataset

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "class_folders", "load_image_folder"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")
# Most pixels (width x height) one image may declare; checked from the header before decoding.
# None: Pillow's Image.MAX_IMAGE_PIXELS (~89.5 M, above every common camera: 24, 45, 61 MP).
MAX_IMAGE_PIXELS: int | None = None
# Pixels per channel counted at once by _channel_stats (uint8: at most this many bytes copied).
_STATS_CHUNK = 1 << 22


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


GRAY_MODES = frozenset({"1", "L", "LA", "I;16", "I;16B", "I;16L", "I;16N"})


def _open_checked(path: Path, image_mod: Any) -> Any:
    """Open an image (its header only) and refuse it, before any pixel is decoded, when it
    declares more than :data:`MAX_IMAGE_PIXELS` pixels (None: Pillow's own limit)."""
    with warnings.catch_warnings():
        # Pillow's warning is judged here by the limit below, which is at least as strict
        warnings.simplefilter("ignore", image_mod.DecompressionBombWarning)
        img = image_mod.open(path)
    limit = MAX_IMAGE_PIXELS if MAX_IMAGE_PIXELS is not None else image_mod.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit is not None and width * height > limit:
        img.close()
        raise DataFormatError(
            f"image {path} declares {width}x{height} pixels ({width * height}), more than the "
            f"limit of {limit} (slimtorch.data.folder.MAX_IMAGE_PIXELS, else Pillow's); refused "
            "before decoding, as a possible decompression bomb: shrink or remove it"
        )
    return img


def _is_gray(path: Path, image_mod: Any) -> bool:
    """Whether an image is grayscale, from its header (no pixels decoded); a file that
    cannot be opened counts as colour here and is reported when it is read."""
    try:
        with _open_checked(path, image_mod) as img:
            return img.mode in GRAY_MODES
    except (OSError, ValueError, SyntaxError, image_mod.DecompressionBombError):
        return False


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``(N, C, H, W)`` images in [0, 1] units, from exact
    integer sums: a histogram of the 256 values per channel, counted over chunks of at most
    ``_STATS_CHUNK`` pixels, so no wider copy of the images is ever made."""
    n_img, n_ch, height, width = images.shape
    counts = torch.zeros((n_ch, 256), dtype=torch.int64)
    for chunk in images.split(max(1, _STATS_CHUNK // max(1, height * width))):
        for c in range(n_ch):  # one image's channel is a view; several are a uint8 copy
            counts[c] += torch.bincount(chunk[:, c].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.int64)
    total = (counts * values).sum(dim=1)  # exact: at most 255**2 * pixels, far below 2**63
    squares = (counts * values * values).sum(dim=1)
    n = n_img * height * width
    mean = total.double() / (n * 255.0)
    var = (squares.double() / (n * 255.0**2) - mean * mean).clamp(min=0)
    return tuple(mean.tolist()), tuple(max(s, 1e-6) for s in var.sqrt().tolist())


def class_folders(root: Path) -> dict[str, Path]:
    """The class sub-folders of ``root`` by name in Unicode NFC (hidden ones left out).

    Raises:
        DataFormatError: Two folders whose names differ only in their Unicode form (``café``
            composed and decomposed): they would be one class.
    """
    folders: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        key = unicodedata.normalize("NFC", p.name)
        if key in folders:
            raise DataFormatError(
                f"{root} has two class folders named {key!r} that differ only in their "
                f"Unicode form ({folders[key].name!a} and {p.name!a}); merge or rename one"
            )
        folders[key] = p
    return folders


def load_image_folder(
    path: str | os.PathLike[str],
    *,
    channels: int | None = 3,
    size: int | Sequence[int] | None = None,
    name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    classes: Sequence[str] | None = None,
) -> ImageDataset:
    """Read ``path/<class_name>/<image>`` files into an :class:`ImageDataset`.

    For a second split of the same data (``test/`` beside ``train/``) pass the first split's
    ``classes``, ``mean`` and ``std``: a split read alone numbers its own sub-folders, so a
    class missing from it would shift every later label, and it would be normalised by its
    own statistics.

    Args:
        path: The root folder; each sub-folder is one class.
        channels: 1 (grayscale, Pillow mode ``"L"``) or 3 (RGB); None: 1 when every image is
            grayscale, else 3 (read from the file headers). 16-bit grayscale images are scaled
            to 8 bits (``round(v / 257)``).
        size: Resize every image to ``size`` (int for square, or ``(height, width)``) with
            bilinear filtering; ``None`` keeps the size, which must then be the same for all.
        name: Dataset name (default: the folder name).
        mean: Per-channel mean in [0, 1] units; default: computed from the images.
        std: Per-channel std in [0, 1] units; default: computed from the images.
        extensions: File suffixes to read (case-insensitive); other files are ignored, and so
            are hidden files and folders (names starting with ``.``, such as the ``._x.png``
            resource files macOS leaves beside copied images). What is passed over (other
            suffixes, nested folders, broken links) is counted in a warning.
        classes: The label order (label ``i`` is ``classes[i]``), usually the training split's
            ``.classes``; a sub-folder not in it is an error, a class without a sub-folder has
            no images here. Default: the sub-folder names, sorted (compared in Unicode NFC, so
            names copied between file systems sort the same).

    Returns:
        The dataset, images uint8 ``(N, channels, H, W)``.

    Raises:
        DataNotFoundError: ``path`` is not a folder or holds no images.
        DataFormatError: A file cannot be decoded, has 32-bit pixels or declares more than
            :data:`MAX_IMAGE_PIXELS` pixels (the message names it; refused from the header,
            before decoding), sizes differ and ``size`` was not given, or a sub-folder is not
            one of ``classes``.

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
    if channels not in (1, 3, None):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    hw = _normalise_size(size)
    root = Path(path)
    if not root.is_dir():
        raise DataNotFoundError(
            f"image folder {root} does not exist or is not a folder; expected "
            "<folder>/<class_name>/<image files>"
        )
    exts = tuple(e.lower() for e in extensions)
    folders = class_folders(root)
    loose = sum(p.is_file() and p.suffix.lower() in exts for p in root.iterdir())
    if loose:
        logger.warning(
            "%s: %d image(s) lie outside the class folders and are not read (an image's "
            "class is the name of the folder it is in)", root, loose,
        )  # fmt: skip
    if classes is None:
        classes = sorted(folders)
    else:
        classes = [unicodedata.normalize("NFC", str(c)) for c in classes]
        extra = sorted(set(folders) - set(classes))
        if extra:
            raise DataFormatError(
                f"{root} has class folder(s) {', '.join(extra)} that are not among the classes "
                f"given ({', '.join(classes)}); their images would have no label"
            )
    files: list[tuple[Path, int]] = []
    passed_over: dict[str, int] = {}
    for label, cls in enumerate(classes):
        members = []
        for p in sorted(folders[cls].iterdir()) if cls in folders else []:
            if p.name.startswith("."):
                continue
            if p.is_file() and p.suffix.lower() in exts:
                members.append(p)
            else:
                why = ("sub-folder" if p.is_dir() else "broken link" if not p.exists()
                       else f"{p.suffix.lower() or 'no'} suffix")  # fmt: skip
                passed_over[why] = passed_over.get(why, 0) + 1
        if not members:
            logger.warning("class %r has no %s files in %s", cls, "/".join(exts), root)
        files.extend((p, label) for p in members)
    if passed_over:
        logger.warning(
            "%s: %d entries in class folders were not read (%s); call "
            "slimtorch.data.folder.load_image_folder(path, extensions=...) to read other "
            "suffixes, or convert them to %s", root, sum(passed_over.values()),
            ", ".join(f"{n} {why}" for why, n in sorted(passed_over.items())), "/".join(exts),
        )  # fmt: skip
    if not files:
        raise DataNotFoundError(
            f"no images found under {root}; expected <folder>/<class_name>/*"
            f"{'|*'.join(exts)} (found class folders: {', '.join(folders) or 'none'})"
        )
    image_mod = _import_pil()
    from PIL import ImageOps

    if channels is None:
        channels = 1 if all(_is_gray(p, image_mod) for p, _ in files) else 3
    mode = "L" if channels == 1 else "RGB"
    bomb = (image_mod.DecompressionBombError, image_mod.DecompressionBombWarning)
    images: torch.Tensor | None = None  # (N, C, H, W), filled one image at a time
    for i, (p, _) in enumerate(files):
        try:
            with warnings.catch_warnings():  # here only: a bomb warning while decoding is fatal
                warnings.simplefilter("error", image_mod.DecompressionBombWarning)
                with _open_checked(p, image_mod) as img:  # the size is checked before decoding
                    img = ImageOps.exif_transpose(img)  # a camera's orientation tag, applied
                    img = _to_8bit(img, image_mod, p).convert(mode)
                    if hw is not None and (img.height, img.width) != hw:
                        img = img.resize((hw[1], hw[0]), image_mod.Resampling.BILINEAR)
                    arr = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, *bomb) as exc:
            # DecompressionBomb*: more pixels than PIL's limit (a decompression bomb)
            raise DataFormatError(
                f"cannot read image {p} ({type(exc).__name__}: {exc}); expected a valid "
                f"{'/'.join(exts)} file: fix or remove it"
            ) from exc
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if images is None:
            images = torch.empty((len(files), arr.shape[2], *arr.shape[:2]), dtype=torch.uint8)
        elif arr.shape != (images.shape[2], images.shape[3], images.shape[1]):
            raise DataFormatError(
                f"image {p} is {arr.shape[1]}x{arr.shape[0]} but {files[0][0]} is "
                f"{images.shape[3]}x{images.shape[2]}; pass size=(height, width) (slimtorch "
                "train: --image-size N) to resize all images to one size"
            )
        images[i] = torch.from_numpy(arr.transpose(2, 0, 1).copy())
    assert images is not None  # files is not empty
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    if mean is None or std is None:
        est_mean, est_std = _channel_stats(images)
    return ImageDataset(
        name=name or root.resolve().name,
        images=images,
        labels=labels,
        classes=tuple(classes),
        mean=tuple(mean) if mean is not None else est_mean,
        std=tuple(std) if std is not None else est_std,
    )
