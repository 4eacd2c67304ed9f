"""The dataset catalog: names, files, published checksums, mirrors, classes and statistics.

Each entry of :data:`DATASETS` is a :class:`DatasetInfo`. File-based sets list, per split, one or
more :class:`Layout` alternatives (e.g. the gzipped IDX files with their published digests, or the
same files uncompressed); the first layout is the one that can be downloaded. Mean and std are
per channel, in [0, 1] pixel units, over the training split.

Example:
    >>> list_datasets()
    ['cifar10', 'digits', 'fashion-mnist', 'kmnist', 'mnist']
    >>> dataset_info("fashion-mnist").classes[0]
    'T-shirt/top'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimtorch.core.registry import Registry
from slimtorch.data.checksum import FileSpec
from slimtorch.data.cifar import (
    CIFAR10_ARCHIVE_MD5,
    CIFAR10_CLASSES,
    CIFAR10_MD5,
    read_cifar_batches,
    read_cifar_npz,
)
from slimtorch.data.dataset import ImageDataset
from slimtorch.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits_dataset
from slimtorch.data.idx import load_idx_pair

__all__ = ["DATASETS", "DatasetInfo", "Layout", "dataset_info", "list_datasets"]

Reader = Callable[[Sequence[Path]], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Layout:
    """One way a split can lie on disk: the files and the function that reads them.

    Attributes:
        files: The files, in the order ``read`` expects them.
        read: ``read(paths) -> (images uint8 (N, C, H, W), labels int64 (N,))``.
    """

    files: tuple[FileSpec, ...]
    read: Reader


@dataclass(frozen=True)
class DatasetInfo:
    """A catalog entry.

    Attributes:
        name: Registry name.
        classes: Class names, indexed by label.
        mean: Per-channel mean in [0, 1] units (training split).
        std: Per-channel std in [0, 1] units (training split).
        layouts: Split name -> layout alternatives; empty for sets built in memory.
        subdirs: Folders below a data root to look in (``""`` is the root itself); the first
            is where downloads go below the cache folder.
        mirrors: Base URLs, tried in order; a file's URL is ``mirror + file name``.
        archive: When set, downloads fetch this archive and extract the first layouts from it.
        archive_prefix: Folder of the files inside ``archive``.
        build: For sets that need no files: ``build(split) -> ImageDataset``.
    """

    name: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layouts: Mapping[str, tuple[Layout, ...]] = field(default_factory=dict)
    subdirs: tuple[str, ...] = ("",)
    mirrors: tuple[str, ...] = ()
    archive: FileSpec | None = None
    archive_prefix: str = ""
    build: Callable[[str], ImageDataset] | None = None

    @property
    def splits(self) -> tuple[str, ...]:
        """The split names this dataset offers."""
        return ("train", "test") if self.build is not None else tuple(self.layouts)


DATASETS: Registry[DatasetInfo] = Registry("dataset")


def list_datasets() -> list[str]:
    """Names accepted by :func:`~slimtorch.data.resolve.load_dataset`, sorted.

    Example:
        >>> "mnist" in list_datasets()
        True
    """
    return [str(n) for n in DATASETS.names()]


def dataset_info(name: str) -> DatasetInfo:
    """The catalog entry of ``name`` (``ValueError`` listing the names if unknown).

    Example:
        >>> dataset_info("cifar10").mean
        (0.4914, 0.4822, 0.4465)
    """
    return DATASETS.get(name)


def _read_idx_layout(paths: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    return load_idx_pair(paths[0], paths[1])


def _read_npz_layout(paths: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    return read_cifar_npz(paths[0])


def _read_batches_layout(paths: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    return read_cifar_batches(paths, verify=False)  # checked by the resolver before reading


_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_layouts(
    table: Mapping[str, tuple[str | None, str | None, int | None]],
) -> dict[str, tuple[Layout, ...]]:
    out: dict[str, tuple[Layout, ...]] = {}
    for split, names in _IDX_NAMES.items():
        gz = tuple(FileSpec(f"{n}.gz", *table[f"{n}.gz"]) for n in names)
        raw = tuple(FileSpec(n) for n in names)
        out[split] = (Layout(gz, _read_idx_layout), Layout(raw, _read_idx_layout))
    return out


# file -> (md5, sha256, size). MNIST and Fashion-MNIST: the published values; KMNIST: md5 only.
_MNIST = {
    "train-images-idx3-ubyte.gz": (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        9912422,
    ),
    "train-labels-idx1-ubyte.gz": (
        "d53e105ee54ea40749a09fcbcd1e9432",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        28881,
    ),
    "t10k-images-idx3-ubyte.gz": (
        "9fb629c4189551a2d022fa330f9573f3",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        1648877,
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "ec29112dd5afa0611ce80d1b7f02629c",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        4542,
    ),
}
_FASHION = {
    "train-images-idx3-ubyte.gz": (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        26421880,
    ),
    "train-labels-idx1-ubyte.gz": (
        "25c81989df183df01b3e8a0aad5dffbe",
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        29515,
    ),
    "t10k-images-idx3-ubyte.gz": (
        "bef4ecab320f06d8554ea6380940ec79",
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        4422102,
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "bb300cfdad3c16e7a12a480ee83cd310",
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        5148,
    ),
}
# The same files uncompressed -> (sha256, size), taken from the verified archives above. Raw
# IDX files are not required to match (a user's own subset in IDX form loads), but MNIST and
# Fashion-MNIST share file names, so these tell whose uncompressed files sit in a flat folder.
IDX_CONTENTS: dict[str, dict[str, tuple[str, int]]] = {
    "mnist": {
        "train-images-idx3-ubyte": (
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016),
        "train-labels-idx1-ubyte": (
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008),
        "t10k-images-idx3-ubyte": (
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016),
        "t10k-labels-idx1-ubyte": (
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": (
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
        "train-labels-idx1-ubyte": (
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
        "t10k-images-idx3-ubyte": (
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
        "t10k-labels-idx1-ubyte": (
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
    },
}  # fmt: skip
_KMNIST: dict[str, tuple[str | None, str | None, int | None]] = {
    "train-images-idx3-ubyte.gz": ("bdb82020997e1d708af4cf47b453dcf7", None, None),
    "train-labels-idx1-ubyte.gz": ("e144d726b3acfaa3e44228e80efcd344", None, None),
    "t10k-images-idx3-ubyte.gz": ("5c965bf0a639b31b8f53240b1b52f4d7", None, None),
    "t10k-labels-idx1-ubyte.gz": ("7320c461ea6c1c855c0b718fb2a4b134", None, None),
}

# LeCun et al. (1998), "Gradient-based learning applied to document recognition".
DATASETS.add(
    "mnist",
    DatasetInfo(
        name="mnist",
        classes=tuple(str(i) for i in range(10)),
        mean=(0.1307,),
        std=(0.3081,),
        layouts=_idx_layouts(_MNIST),
        subdirs=("mnist", ""),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
    ),
)
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# Xiao, Rasul and Vollgraf (2017), "Fashion-MNIST", arXiv:1708.07747.
DATASETS.add(
    "fashion-mnist",
    DatasetInfo(
        name="fashion-mnist",
        classes=_FASHION_CLASSES,
        mean=(0.2860,),
        std=(0.3530,),
        layouts=_idx_layouts(_FASHION),
        subdirs=("fashion-mnist", ""),
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
    ),
)
# Clanuwat et al. (2018), "Deep Learning for Classical Japanese Literature", arXiv:1812.01718.
DATASETS.add(
    "kmnist",
    DatasetInfo(
        name="kmnist",
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        mean=(0.1904,),
        std=(0.3475,),
        layouts=_idx_layouts(_KMNIST),
        subdirs=("kmnist", ""),
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
    ),
)


def _cifar_layouts() -> dict[str, tuple[Layout, ...]]:
    train = tuple(FileSpec(f"data_batch_{i}", CIFAR10_MD5[f"data_batch_{i}"]) for i in range(1, 6))
    test = (FileSpec("test_batch", CIFAR10_MD5["test_batch"]),)
    return {
        "train": (
            Layout(train, _read_batches_layout),
            Layout((FileSpec("cifar10-train.npz"),), _read_npz_layout),
        ),
        "test": (
            Layout(test, _read_batches_layout),
            Layout((FileSpec("cifar10-test.npz"),), _read_npz_layout),
        ),
    }


# Krizhevsky (2009), "Learning Multiple Layers of Features from Tiny Images".
DATASETS.add(
    "cifar10",
    DatasetInfo(
        name="cifar10",
        classes=CIFAR10_CLASSES,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        layouts=_cifar_layouts(),
        subdirs=("cifar10/cifar-10-batches-py", "cifar-10-batches-py", "cifar10", ""),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        archive=FileSpec("cifar-10-python.tar.gz", CIFAR10_ARCHIVE_MD5, size=170498071),
        archive_prefix="cifar-10-batches-py/",
    ),
)
DATASETS.add(
    "digits",
    DatasetInfo(
        name="digits",
        classes=tuple(str(i) for i in range(10)),
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        build=load_digits_dataset,
    ),
)
