"""Find a dataset's files, download them if allowed, verify them and load them.

Folders are searched in this order, and the first folder holding every file of one layout of
the split wins:

1. the ``root`` argument,
2. the folder named by the environment variable ``SLIMTORCH_DATA``,
3. the user cache, ``$XDG_CACHE_HOME/slimtorch/data`` (default ``~/.cache/slimtorch/data``).

Below each of them both ``<folder>/<name>/<file>`` and ``<folder>/<file>`` are accepted. When
nothing is found and ``download=True`` the files are downloaded from the official mirrors into
the cache (verified before they get their final name). Files with published checksums are
verified on every load (cached per process by path, size and mtime).

Example (reads the real files from ``$SLIMTORCH_DATA`` or the cache):
    >>> train = load_dataset("fashion-mnist", "train", download=False)
    >>> train.images.shape
    torch.Size([60000, 1, 28, 28])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from slimtorch.core.errors import ChecksumError, DataFormatError, DataNotFoundError
from slimtorch.core.io import folder_lock, scratch_dir
from slimtorch.data.catalog import (
    IDX_CONTENTS,
    DatasetInfo,
    Layout,
    dataset_info,
    list_datasets,
)
from slimtorch.data.checksum import verify_file
from slimtorch.data.dataset import ImageDataset
from slimtorch.data.download import download_file, extract_tar_members
from slimtorch.data.folder_dataset import is_image_folder, load_folder_split

logger = logging.getLogger(__name__)

__all__ = ["DATA_ENV_VAR", "data_cache_dir", "find_dataset_files", "load_dataset"]

DATA_ENV_VAR = "SLIMTORCH_DATA"


def data_cache_dir() -> Path:
    """The user cache folder for datasets: ``$XDG_CACHE_HOME/slimtorch/data`` or
    ``~/.cache/slimtorch/data``.

    Example:
        >>> data_cache_dir()  # e.g. PosixPath('/home/me/.cache/slimtorch/data')
        PosixPath('.../slimtorch/data')
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slimtorch" / "data"


def _roots(root: str | os.PathLike[str] | None) -> list[Path]:
    roots: list[Path] = []
    if root is not None:
        folder = Path(root).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ValueError(
                f"root {str(root)!r} is a file, not a folder; pass the folder that holds the "
                f"dataset's files as root= / --data-root (e.g. {str(folder.parent)!r})"
            )
        roots.append(folder)
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        roots.append(Path(env).expanduser())
    roots.append(data_cache_dir())
    return roots


def _candidate_folders(info: DatasetInfo, roots: Sequence[Path]) -> list[Path]:
    folders: list[Path] = []
    for r in roots:
        for sub in info.subdirs:
            folder = r / sub if sub else r
            if folder not in folders:
                folders.append(folder)
    return folders


def _check_split(info: DatasetInfo, split: str) -> None:
    if split not in info.splits:
        raise ValueError(
            f"dataset {info.name!r} has no split {split!r}; valid splits: {', '.join(info.splits)}"
        )


def find_dataset_files(
    name: str, split: str = "train", *, root: str | os.PathLike[str] | None = None
) -> tuple[list[Path], Layout] | None:
    """Locate the files of ``name``/``split`` without downloading or reading them.

    Returns:
        ``(paths, layout)`` for the first folder (in resolution order) that holds every file of
        one layout, or ``None``.

    Example (finds the real files in ``$SLIMTORCH_DATA`` or the cache):
        >>> paths, layout = find_dataset_files("mnist", "test")
        >>> [p.name for p in paths]
        ['t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz']
        >>> layout.files[1].md5  # the published checksum load_dataset verifies
        'ec29112dd5afa0611ce80d1b7f02629c'
    """
    return next(_dataset_files(name, split, root), None)


def _dataset_files(
    name: str, split: str, root: str | os.PathLike[str] | None
) -> Iterator[tuple[list[Path], Layout]]:
    """Every folder (in resolution order) holding all files of one layout of ``name``."""
    info = dataset_info(name)
    _check_split(info, split)
    for folder in _candidate_folders(info, _roots(root)):
        for layout in info.layouts[split]:
            paths = [folder / f.name for f in layout.files]
            if all(p.is_file() for p in paths):
                logger.debug("found %s/%s in %s", name, split, folder)
                yield paths, layout
                break  # this folder's first complete layout


def _download(info: DatasetInfo, split: str, mirrors: Sequence[str]) -> None:
    target = data_cache_dir() / info.subdirs[0]
    target.mkdir(parents=True, exist_ok=True)
    # one process fetches; others (data-parallel ranks, two commands) wait, then find the files
    with folder_lock(target, shared=False):
        _fetch(info, split, mirrors, target)


def _fetch(info: DatasetInfo, split: str, mirrors: Sequence[str], target: Path) -> None:
    if info.archive is None:
        for spec in info.layouts[split][0].files:
            dest = target / spec.name
            if not dest.is_file():
                download_file([m.rstrip("/") + "/" + spec.name for m in mirrors], dest, spec)
        return
    # One archive holds every split: fetch it once, extract the files, drop the archive.
    members = [f for s in info.layouts for f in info.layouts[s][0].files]
    if all((target / f.name).is_file() for f in members):  # another process fetched it
        return
    # (a fetch killed by SIGTERM left its partial archive in such a folder: swept first)
    with scratch_dir(target.parent / info.archive.name) as tmp:
        archive = tmp / info.archive.name
        download_file([m.rstrip("/") + "/" + info.archive.name for m in mirrors], archive,
                      info.archive)  # fmt: skip
        extract_tar_members(archive, info.archive_prefix, members, target)


DOWNLOAD_OFF = "Downloading is off (download=False / --no-download)."
"""The reason :func:`load_dataset` gives with ``download=False``; each setting is named both as
the Python argument and as the ``slimtorch`` option."""


def _not_found(
    info: DatasetInfo, split: str, root: str | os.PathLike[str] | None, reason: str
) -> DataNotFoundError:
    folders = _candidate_folders(info, _roots(root))
    alternatives = " | ".join(", ".join(f.name for f in lay.files) for lay in info.layouts[split])
    searched = "\n  ".join(str(f) for f in folders)
    allow = (
        ", or allow the download (download=True / leave out --no-download)"
        if reason == DOWNLOAD_OFF
        else ""
    )
    return DataNotFoundError(
        f"dataset {info.name!r} (split {split!r}) not found.\nSearched, in order:\n  {searched}\n"
        f"Expected files (any one group): {alternatives}\n{reason}\nWhat to do: put the files "
        f"in <folder>/{info.subdirs[0] or info.name}/ or <folder>/ and set {DATA_ENV_VAR}=<folder> "
        f"(or pass root=<folder> / --data-root <folder>){allow}."
    )


def load_dataset(
    name: str | os.PathLike[str],
    split: str = "train",
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    channels: int | None = None,
    size: int | Sequence[int] | None = None,
) -> ImageDataset:
    """Load a catalogued dataset split, or a split of an image folder, as an
    :class:`ImageDataset`.

    Args:
        name: One of :func:`~slimtorch.data.catalog.list_datasets` (``"mnist"``,
            ``"fashion-mnist"``, ``"kmnist"``, ``"cifar10"``, ``"digits"``), or the path of an
            image folder with ``train/`` and ``test/`` class folders
            (:mod:`~slimtorch.data.folder_dataset`; ``root``, ``download`` and ``mirrors``
            do not apply to it).
        split: ``"train"`` or ``"test"``.
        root: A folder searched before ``$SLIMTORCH_DATA`` and the cache.
        download: Download missing files from the mirrors into the cache folder.
        mirrors: Base URLs to download from instead of the official ones (e.g. a local
            mirror, ``"file:///srv/mirror/mnist/"``); files are still checked against the
            published checksums.
        channels: The number of channels the caller needs (a model's input), or None. An
            image folder is read with that many; a catalog dataset with other images is an
            error.
        size: The image size the caller needs (int for square, or ``(height, width)``), or
            None; as ``channels``: an image folder is resized to it.

    Returns:
        The split, named ``"<name>/<split>"``.

    Raises:
        ValueError: Unknown name or split, ``root`` is a file, or the images are not of the
            ``channels`` and ``size`` asked for.
        TypeError: ``mirrors`` is a single string instead of a list.
        DataNotFoundError: The files are in none of the searched folders and could not be
            downloaded; the message lists every folder searched and the expected file names.
        ChecksumError: A file differs from its published checksum (nothing partial is loaded).
        DataFormatError: A file is damaged or not in the expected format.

    Example (the first reads the real files from ``$SLIMTORCH_DATA`` or the cache):
        >>> test = load_dataset("mnist", "test", download=False)
        >>> test.name, len(test), test.input_shape
        ('mnist/test', 10000, (1, 28, 28))

        ``root`` is searched first; here it holds a one-image split, uncompressed:

        >>> import pathlib, struct, tempfile
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> images = bytes([0, 0, 8, 3]) + struct.pack(">3I", 1, 28, 28) + bytes(28 * 28)
        >>> _ = (root / "t10k-images-idx3-ubyte").write_bytes(images)
        >>> _ = (root / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 1, 7]))
        >>> mine = load_dataset("mnist", "test", root=root, download=False)
        >>> len(mine), mine.labels.tolist()
        (1, [7])
    """
    if isinstance(mirrors, str):
        raise TypeError(
            f"mirrors must be a list of base URLs, got the string {mirrors!r}; pass [{mirrors!r}]"
        )
    if is_image_folder(name):
        return load_folder_split(name, split, channels=channels, size=size)
    name = os.fspath(name)
    if (Path(name) / "train").is_dir():  # an image folder named like a catalog set
        logger.warning("%r is the catalog dataset; for the image folder of that name here, "
                       "pass ./%s", name, name)  # fmt: skip
    info = dataset_info(name)
    _check_split(info, split)
    if info.build is not None:
        return _check_shape(info.build(split), channels, size)
    found = find_dataset_files(name, split, root=root)
    if found is None:
        if not download:
            raise _not_found(info, split, root, DOWNLOAD_OFF)
        try:
            _download(info, split, tuple(mirrors) if mirrors is not None else info.mirrors)
        except DataNotFoundError as exc:
            raise _not_found(info, split, root, f"The download failed: {exc}") from exc
        found = find_dataset_files(name, split, root=root)
        if found is None:  # pragma: no cover - the download wrote every file of the layout
            raise _not_found(info, split, root, "The download did not produce the files.")
    paths, layout = _verified(name, split, root, found)
    env = os.environ.get(DATA_ENV_VAR)
    for what, given in (("root", root), (f"${DATA_ENV_VAR}", env)):
        if given and not Path(given).expanduser().exists():  # a typo, most likely
            logger.warning("%s %s does not exist; read %s/%s from %s", what, given, name, split,
                           paths[0].parent)  # fmt: skip
    images, labels = layout.read(paths)
    _check_label_range(labels, len(info.classes), paths)
    logger.info("loaded %s/%s from %s: %d images", name, split, paths[0].parent, len(labels))
    ds = ImageDataset(
        name=f"{name}/{split}",
        images=images,
        labels=labels,
        classes=info.classes,
        mean=info.mean,
        std=info.std,
    )
    return _check_shape(ds, channels, size)


def _check_shape(
    ds: ImageDataset, channels: int | None, size: int | Sequence[int] | None
) -> ImageDataset:
    """A catalog split's images are what they are: refuse other ``channels``/``size``."""
    c, h, w = ds.input_shape
    hw = (size, size) if isinstance(size, int) else None if size is None else tuple(size)
    if (channels is not None and channels != c) or (hw is not None and hw != (h, w)):
        want = (channels or c, *(hw or (h, w)))
        raise ValueError(
            f"{ds.name} images are {(c, h, w)} (channels, height, width), not {want}: pick a "
            "dataset of that shape (only an image folder is resized)"
        )
    return ds


def _check_label_range(labels: torch.Tensor, classes: int, paths: Sequence[Path]) -> None:
    """Refuse labels outside ``[0, classes)``, naming the files they came from (files without
    published checksums, unpacked by hand, are checked only here)."""
    if len(labels) == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise DataFormatError(
            f"{', '.join(map(str, paths))}: labels must lie in [0, {classes - 1}] for the "
            f"dataset's {classes} classes, found values in [{low}, {high}]; the files are "
            "corrupt or belong to another dataset: delete them and download them again"
        )


def _verified(
    name: str,
    split: str,
    root: str | os.PathLike[str] | None,
    found: tuple[list[Path], Layout],
) -> tuple[list[Path], Layout]:
    """The first candidate whose files match the published checksums. MNIST and Fashion-MNIST
    share file names, so the files of one sitting straight in a data root are found for the
    other: a folder holding another catalog dataset's files is passed over with a warning (or
    named in the error when no later folder holds good files)."""
    candidates = [found, *list(_dataset_files(name, split, root))[1:]]
    for i, (paths, layout) in enumerate(candidates):
        try:
            _verify(paths, layout)
        except ChecksumError:
            other = _other_dataset(name, split, paths)
            if other is None:
                raise  # damaged: the message says to delete it
        else:  # uncompressed files carry no published digest, but may still be another's
            other = _raw_owner(name, paths)
            if other is None:
                return paths, layout
        why = f"{paths[0].parent} holds {other}'s {split} files, not {name}'s"
        if i + 1 < len(candidates):
            logger.warning("%s (same file names); looking further", why)
            continue
        raise ChecksumError(
            f"{why} (the two share file names); keep each dataset in a folder of its own "
            f"name ({paths[0].parent / name}/)"
        )
    raise AssertionError("unreachable: candidates holds at least one entry")


def _other_dataset(name: str, split: str, paths: Sequence[Path]) -> str | None:
    """The catalog dataset other than ``name`` whose published files these are, if any."""
    for other in list_datasets():
        info = dataset_info(other)
        if other == name or split not in info.layouts:
            continue
        for layout in info.layouts[split]:
            if [f.name for f in layout.files] != [p.name for p in paths] or not any(
                f.md5 or f.sha256 for f in layout.files
            ):  # no digest: nothing tells its files from any other files of these names
                continue
            try:
                _verify(paths, layout)
            except ChecksumError:
                continue
            return other
    return None


def _raw_owner(name: str, paths: Sequence[Path]) -> str | None:
    """The other dataset whose uncompressed IDX files these are (:data:`IDX_CONTENTS`), or
    None: they are this dataset's, or files no catalog dataset publishes (a user's own)."""
    for owner, contents in IDX_CONTENTS.items():
        if owner == name or any(p.name not in contents for p in paths):
            continue
        try:
            for path in paths:
                sha256, size = contents[path.name]
                verify_file(path, sha256=sha256, size=size)  # the size is checked first
        except ChecksumError:
            continue
        return owner
    return None


def _verify(paths: Sequence[Path], layout: Layout) -> None:
    """Check each file against the layout's published size and digests."""
    for path, spec in zip(paths, layout.files, strict=True):
        verify_file(path, md5=spec.md5, sha256=spec.sha256, size=spec.size)
