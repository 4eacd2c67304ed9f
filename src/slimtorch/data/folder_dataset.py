"""A user's own image folder, used wherever a catalog dataset name is accepted.

A dataset argument that is not a catalog name but a path (it holds a ``/``, or names a folder
that exists) is an image folder laid out by split, then by class::

    pets/train/cat/*.png   pets/train/dog/*.png
    pets/test/cat/*.png    pets/test/dog/*.png      (test/ may also be val/ or validation/)

- The class names and their label order come from ``train/``'s sub-folders, read without
  decoding any image, so every split, and a model trained on it, numbers the classes alike;
  a test folder with a class ``train/`` lacks is refused.
- Images are read at the channels and size asked for (a model's input shape), else at their
  own: one channel when every image is grayscale, three otherwise.
- Each split's mean/std are its own; :func:`~slimtorch.train.classifier.train_classifier`
  normalises the test split by the training split's, and a saved model's own normalisation
  is applied wherever it is evaluated or calibrated.

Catalog names win over folders: a folder called ``mnist`` in the working directory is reached
as ``./mnist``.

Example:
    >>> import pathlib, tempfile
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp()) / "pets"
    >>> for split, cls, shade in (("train", "cat", 40), ("train", "dog", 200), ("test", "dog", 90)):
    ...     (root / split / cls).mkdir(parents=True)
    ...     Image.new("L", (12, 12), shade).save(root / split / cls / "0.png")
    >>> is_image_folder(str(root)), dataset_classes(str(root))
    (True, ('cat', 'dog'))
    >>> test = load_folder_split(str(root), "test", size=16)
    >>> test.name, test.classes, test.labels.tolist(), test.input_shape
    ('pets/test', ('cat', 'dog'), [1], (1, 16, 16))
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from slimtorch.core.errors import DataFormatError, DataNotFoundError
from slimtorch.data.catalog import DATASETS, dataset_info
from slimtorch.data.dataset import ImageDataset
from slimtorch.data.folder import class_folders, load_image_folder

__all__ = [
    "FOLDER_SPLITS",
    "dataset_classes",
    "dataset_record",
    "folder_split_path",
    "is_image_folder",
    "load_folder_split",
]

FOLDER_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "test": ("test", "val", "validation"),
}
"""Split name -> the sub-folder names that hold it, first found wins."""

LAYOUT_HINT = "<folder>/train/<class_name>/<images> and <folder>/test/<class_name>/<images>"


def is_image_folder(name: str | os.PathLike[str]) -> bool:
    """Whether a dataset argument names an image folder rather than a catalog dataset (a
    ``pathlib.Path`` always does).

    Example:
        >>> is_image_folder("mnist"), is_image_folder("./my_images"), is_image_folder("mnsit")
        (False, True, False)
    """
    if not isinstance(name, str):
        return True
    if name in DATASETS:
        return False
    return "/" in name or os.sep in name or Path(name).expanduser().is_dir()


def dataset_record(name: str | os.PathLike[str]) -> str:
    """A dataset argument as a model card records it: a catalog name as it is, an image
    folder as its absolute path, so that it is found again from any working directory.

    Example:
        >>> dataset_record("mnist"), dataset_record("/srv/data/../pets")
        ('mnist', '/srv/pets')
    """
    return str(Path(name).expanduser().resolve()) if is_image_folder(name) else os.fspath(name)


def folder_split_path(name: str | os.PathLike[str], split: str) -> Path:
    """The sub-folder of an image-folder dataset that holds ``split``.

    Raises:
        ValueError: ``split`` is not ``"train"`` or ``"test"``.
        DataNotFoundError: The folder, or the split's sub-folder, does not exist.
    """
    if split not in FOLDER_SPLITS:
        raise ValueError(
            f"an image-folder dataset has no split {split!r}; valid splits: "
            f"{', '.join(FOLDER_SPLITS)}"
        )
    root = Path(name).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(
            f"image folder {str(name)!r} does not exist or is not a folder; expected {LAYOUT_HINT}"
        )
    for sub in FOLDER_SPLITS[split]:
        if (root / sub).is_dir():
            return root / sub
        folded = [p for p in root.iterdir() if p.is_dir() and p.name.lower() == sub]
        if len(folded) == 1:  # Train/, TEST/: the same split in another case
            return folded[0]
    raise DataNotFoundError(
        f"image folder {str(name)!r} has no {' or '.join(f'{s}/' for s in FOLDER_SPLITS[split])} "
        f"sub-folder for its {split} split; expected {LAYOUT_HINT}"
    )


def _train_classes(name: str | os.PathLike[str]) -> tuple[str, ...]:
    train = folder_split_path(name, "train")
    classes = sorted(class_folders(train))
    if not classes:
        raise DataNotFoundError(f"{train} has no class sub-folders; expected {LAYOUT_HINT}")
    return tuple(classes)


def dataset_classes(name: str | os.PathLike[str]) -> tuple[str, ...]:
    """The class names of a catalog dataset or an image folder, without reading any image.

    Example:
        >>> dataset_classes("mnist")[:3]
        ('0', '1', '2')
    """
    if is_image_folder(name):
        return _train_classes(name)
    return dataset_info(os.fspath(name)).classes


def load_folder_split(
    name: str | os.PathLike[str],
    split: str = "train",
    *,
    channels: int | None = None,
    size: int | Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
) -> ImageDataset:
    """Read one split of an image-folder dataset, labelled in ``train/``'s class order (or
    in ``classes``').

    Args:
        name: The folder (see the module docstring for its layout).
        split: ``"train"`` or ``"test"`` (``test/``, else ``val/``, else ``validation/``).
        channels: 1 or 3; default: 1 when every image is grayscale, else 3.
        size: Resize to this (int, or ``(height, width)``); default: the images' own size,
            which must then be the same for all.
        classes: The label order, e.g. a trained model's class names (a model reads another
            folder with the labels it was trained on); default: ``train/``'s sub-folders.

    Raises:
        DataNotFoundError: The folder or the split is missing, or holds no images.
        DataFormatError: An image cannot be read, sizes differ without ``size``, or the split
            has a class folder that ``train/`` (or ``classes``) has not.
    """
    path = folder_split_path(name, split)
    order = _train_classes(name) if classes is None else tuple(
        unicodedata.normalize("NFC", str(c)) for c in classes
    )  # fmt: skip
    unknown = sorted(set(class_folders(path)) - set(order))
    if unknown:
        whose = "train/" if classes is None else "the given classes (the model's)"
        raise DataFormatError(
            f"{path} has class folder(s) {', '.join(unknown)} that {whose} lacks "
            f"({', '.join(order)}); their images would have no label"
        )
    folder = Path(name).expanduser().resolve()
    return load_image_folder(
        path, channels=channels, size=size, name=f"{folder.name}/{split}", classes=order
    )
