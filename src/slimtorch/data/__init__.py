"""slimtorch.data: dataset readers, checksums, downloads and device-resident loaders.

Example (reads the real files from ``$SLIMTORCH_DATA`` or the cache):
    >>> from slimtorch.data import AugmentConfig, DeviceLoader, load_dataset
    >>> train = load_dataset("fashion-mnist", "train", download=False)
    >>> loader = DeviceLoader(train, 256, shuffle=True, augment=AugmentConfig(hflip=True))
    >>> x, y = next(iter(loader))
    >>> len(loader), x.shape, x.dtype, y.shape
    (235, torch.Size([256, 1, 28, 28]), torch.float32, torch.Size([256]))
"""

from slimtorch.data.augment import AugmentConfig, apply_augment, random_crop, random_hflip
from slimtorch.data.catalog import DATASETS, DatasetInfo, Layout, dataset_info, list_datasets
from slimtorch.data.checksum import FileSpec, clear_checksum_cache, file_digest, verify_file
from slimtorch.data.cifar import read_cifar_batch, read_cifar_batches, read_cifar_npz
from slimtorch.data.dataset import ImageDataset, split_dataset
from slimtorch.data.digits import load_digits_dataset
from slimtorch.data.download import download_file, extract_tar_members
from slimtorch.data.folder import load_image_folder
from slimtorch.data.folder_dataset import (
    dataset_classes,
    dataset_record,
    is_image_folder,
    load_folder_split,
)
from slimtorch.data.idx import load_idx_pair, read_idx
from slimtorch.data.loader import DeviceLoader, SyntheticLoader
from slimtorch.data.resolve import DATA_ENV_VAR, data_cache_dir, find_dataset_files, load_dataset

__all__ = [
    "DATASETS",
    "DATA_ENV_VAR",
    "AugmentConfig",
    "DatasetInfo",
    "DeviceLoader",
    "FileSpec",
    "ImageDataset",
    "Layout",
    "SyntheticLoader",
    "apply_augment",
    "clear_checksum_cache",
    "data_cache_dir",
    "dataset_classes",
    "dataset_info",
    "dataset_record",
    "download_file",
    "extract_tar_members",
    "file_digest",
    "find_dataset_files",
    "is_image_folder",
    "list_datasets",
    "load_dataset",
    "load_digits_dataset",
    "load_folder_split",
    "load_idx_pair",
    "load_image_folder",
    "random_crop",
    "random_hflip",
    "read_cifar_batch",
    "read_cifar_batches",
    "read_cifar_npz",
    "read_idx",
    "split_dataset",
    "verify_file",
]
