from __future__ import annotations

import pytest
import torch

from slimtorch.data import ImageDataset, split_dataset


def _ds(n: int = 10, classes: int = 2) -> ImageDataset:
    return ImageDataset(
        name="toy",
        images=torch.arange(n * 4, dtype=torch.uint8).view(n, 1, 2, 2),
        labels=torch.arange(n) % classes,
        classes=tuple(f"c{i}" for i in range(classes)),
        mean=(0.5,),
        std=(0.25,),
    )


def test_basic_properties() -> None:
    ds = _ds()
    assert len(ds) == 10
    assert ds.input_shape == (1, 2, 2)
    assert ds.num_classes == 2
    assert "n=10" in repr(ds)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"images": torch.zeros(2, 1, 2, 2)}, "uint8 tensor of shape"),
        ({"images": torch.zeros(2, 2, 2, dtype=torch.uint8)}, r"\(N, C, H, W\)"),
        ({"labels": torch.tensor([0, 1], dtype=torch.int32)}, "int64 tensor of shape"),
        ({"labels": torch.tensor([0, 1, 1])}, r"shape \(2,\)"),
        ({"labels": torch.tensor([0, 2])}, r"labels must lie in \[0, 1\]"),
        ({"labels": torch.tensor([-1, 0])}, r"found values in \[-1, 0\]"),
        ({"mean": (0.5, 0.5)}, "one value per channel"),
        ({"std": (0.0,)}, "std values must be > 0"),
        ({"classes": ()}, "non-empty tuple"),
        ({"name": ""}, "non-empty string"),
    ],
)
def test_validation(kwargs: dict, match: str) -> None:
    base = dict(
        name="toy",
        images=torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
        labels=torch.tensor([0, 1]),
        classes=("a", "b"),
        mean=(0.5,),
        std=(0.2,),
    )
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ImageDataset(**base)


def test_subset_by_list_mask_and_tensor() -> None:
    ds = _ds()
    sub = ds.subset([3, 1])
    assert sub.labels.tolist() == [1, 1]
    torch.testing.assert_close(sub.images[0], ds.images[3])
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[0, 9]] = True
    assert ds.subset(mask).images[:, 0, 0, 0].tolist() == [0, 36]
    assert len(ds.subset(torch.tensor([], dtype=torch.int64))) == 0
    assert ds.subset([0], name="x").name == "x"


def test_subset_rejects_bad_indices() -> None:
    ds = _ds()
    with pytest.raises(ValueError, match=r"lie in \[0, 9\]"):
        ds.subset([10])
    with pytest.raises(ValueError, match="bool mask"):
        ds.subset(torch.zeros(3, dtype=torch.bool))


def test_split_stratified_counts_and_disjoint() -> None:
    ds = _ds(n=100, classes=4)  # 25 per class
    train, val = split_dataset(ds, 0.2, seed=0)
    assert len(val) == 20 and len(train) == 80
    assert torch.bincount(val.labels, minlength=4).tolist() == [5, 5, 5, 5]
    # together the two parts hold every sample exactly once
    all_pix = sorted(torch.cat([train.images, val.images]).view(100, -1).tolist())
    assert all_pix == sorted(ds.images.view(100, -1).tolist())
    assert train.name == "toy/train" and val.name == "toy/val"


def test_split_keeps_every_class_in_training() -> None:
    # at val_fraction 0.6 a class of one image went wholly to validation: never learned
    ds = ImageDataset(name="toy", images=torch.zeros(11, 1, 2, 2, dtype=torch.uint8),
                      labels=torch.tensor([0] * 5 + [1] * 5 + [2]), classes=("a", "b", "c"),
                      mean=(0.5,), std=(0.25,))  # fmt: skip
    train, val = split_dataset(ds, 0.6, seed=0)
    assert torch.bincount(train.labels, minlength=3).tolist() == [2, 2, 1]
    assert torch.bincount(val.labels, minlength=3).tolist() == [3, 3, 0]


def test_split_is_deterministic_by_seed() -> None:
    ds = _ds(n=60, classes=3)
    a = split_dataset(ds, 0.25, seed=1)[1]
    b = split_dataset(ds, 0.25, seed=1)[1]
    c = split_dataset(ds, 0.25, seed=2)[1]
    torch.testing.assert_close(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_split_random_mode() -> None:
    ds = _ds(n=10, classes=2)
    train, val = split_dataset(ds, 0.3, seed=0, stratify=False)
    assert (len(train), len(val)) == (7, 3)


def test_split_rejects_bad_fraction() -> None:
    ds = _ds(n=4)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        split_dataset(ds, 1.0, seed=0)
    with pytest.raises(ValueError, match="empty validation set"):
        split_dataset(ds, 0.01, seed=0)
