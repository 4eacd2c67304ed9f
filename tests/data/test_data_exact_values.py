"""Exact values of subsets, rank sharding, crop offsets and checksum matching."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from slimtorch.data import AugmentConfig, DeviceLoader, ImageDataset
from slimtorch.data.augment import random_crop
from slimtorch.data.checksum import verify_file


def _labelled(n: int) -> ImageDataset:
    """``n`` one-pixel images whose label is their index."""
    return ImageDataset(
        name="t", images=torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1),
        labels=torch.arange(n), classes=tuple(str(i) for i in range(n)),
        mean=(0.0,), std=(1.0,),
    )  # fmt: skip


def test_a_negative_subset_index_is_refused() -> None:
    with pytest.raises(ValueError):
        _labelled(3).subset([-1])


def test_the_short_last_batch_of_rank_one_starts_after_rank_zeros_share() -> None:
    # 10 samples, 2 ranks of 4: the last global batch holds samples 8 and 9, one per rank
    loader = DeviceLoader(_labelled(10), 4, rank=1, world_size=2)
    assert [y.tolist() for _, y in loader] == [[4, 5, 6, 7], [9]]


def test_ranks_draw_different_augmentations() -> None:
    img = torch.randint(0, 255, (1, 1, 6, 6), dtype=torch.uint8)
    ds = ImageDataset(
        name="t", images=img.repeat(8, 1, 1, 1), labels=torch.zeros(8, dtype=torch.long),
        classes=("a",), mean=(0.0,), std=(1.0,),
    )  # fmt: skip
    aug = AugmentConfig(random_crop_padding=2, hflip=True)
    first = [
        next(iter(DeviceLoader(ds, 4, rank=r, world_size=2, augment=aug, seed=1)))[0]
        for r in (0, 1)
    ]
    # eight copies of one image: only the random draws tell the ranks' batches apart
    assert not torch.equal(first[0], first[1])


def test_random_crop_uses_every_offset_in_both_directions() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4).repeat(4000, 1, 1, 1)
    top_left = random_crop(x, 1, generator=g)[:, 0, 0, 0]
    # offsets (r, c) in {0,1,2}^2 put padded[r, c] at the top left: 0 (the padding) when r or c
    # is 0, else the original pixel (r-1, c-1), whose value is 4(r-1) + (c-1) + 1
    assert set(top_left.tolist()) == {0, 1, 2, 5, 6}


def test_flips_alone_enable_augmentation() -> None:
    assert AugmentConfig(hflip=True).enabled is True


def test_an_upper_case_sha256_matches(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert verify_file(path, sha256=hashlib.sha256(b"abc").hexdigest().upper()) is True
