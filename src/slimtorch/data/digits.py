"""scikit-learn's bundled 8x8 digits: the dataset that needs no file and no network.

``sklearn.datasets.load_digits`` ships 1797 grayscale 8x8 images with values 0..16. They are
scaled to uint8 0..255 (``round(v * 255 / 16)``) and split 80/20, stratified, with a fixed seed:
scikit-learn ships no split, and the fixed seed makes the split identical everywhere.

Dataset: Alpaydin and Kaynak, "Optical Recognition of Handwritten Digits", UCI ML Repository
(1998). scikit-learn is imported only when the data is loaded.

Example:
    >>> train = load_digits_dataset("train")
    >>> len(train), train.input_shape
    (1438, (1, 8, 8))
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from slimtorch.data.dataset import ImageDataset, split_dataset

logger = logging.getLogger(__name__)

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_SPLIT_SEED",
    "DIGITS_STD",
    "DIGITS_TEST_FRACTION",
    "load_digits_dataset",
]

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
# Over the 1438 training images after scaling to 0..255, in [0, 1] units (the test split
# stays out of the statistics the inputs are normalised with).
DIGITS_MEAN = (0.3060,)
DIGITS_STD = (0.3763,)
_CLASSES = tuple(str(i) for i in range(10))


def load_digits_dataset(split: str = "train") -> ImageDataset:
    """Load scikit-learn's digits as an :class:`ImageDataset` (1 x 8 x 8, 10 classes).

    Args:
        split: ``"train"`` (1438 images), ``"test"`` (359 images) or ``"all"`` (1797).

    Returns:
        The requested split, named ``"digits/<split>"``.

    Raises:
        ImportError: scikit-learn is not installed.

    Example:
        >>> test = load_digits_dataset("test")
        >>> test
        ImageDataset(name='digits/test', n=359, input_shape=(1, 8, 8), classes=10)
        >>> test.labels.bincount().tolist()  # 20% of each class
        [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'digits' dataset needs scikit-learn; install it with "
            "`pip install 'slimtorch[data]'` (or `pip install scikit-learn`)"
        ) from exc
    bunch = load_digits()
    pixels = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    images = torch.from_numpy(pixels.clip(0, 255).astype(np.uint8)).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    full = ImageDataset(
        name="digits",
        images=images,
        labels=labels,
        classes=_CLASSES,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
    )
    if split == "all":
        return full
    train, test = split_dataset(full, DIGITS_TEST_FRACTION, seed=DIGITS_SPLIT_SEED, stratify=True)
    chosen = train if split == "train" else test
    return chosen.subset(torch.arange(len(chosen)), name=f"digits/{split}")
