from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from slimtorch.data import (
    AugmentConfig,
    DeviceLoader,
    ImageDataset,
    SyntheticLoader,
    load_dataset,
)

Make = Callable[..., ImageDataset]


def _flat(lists: object) -> list[int]:
    return list(itertools.chain.from_iterable(lists))  # type: ignore[call-overload]


def _ids(loader: DeviceLoader) -> list[list[int]]:
    """Sample ids of each batch (images of `indexed_dataset` hold id % 256)."""
    out = []
    for x, _ in loader:
        px = x[:, 0, 0, 0].double() * 0.25 + 0.5  # undo the (0.5, 0.25) normalisation
        out.append(torch.round(px * 255).long().tolist())
    return out


def test_normalisation_values() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 2, 2, 2)
    ds = ImageDataset(name="n", images=images.contiguous(), labels=torch.tensor([0, 1, 0]),
                      classes=("a", "b"), mean=(0.2, 0.4), std=(0.5, 0.25))  # fmt: skip
    x, y = next(iter(DeviceLoader(ds, 3)))
    assert x.dtype == torch.float32 and x.shape == (3, 2, 2, 2)
    v = torch.tensor([0.0, 0.2, 1.0])
    torch.testing.assert_close(x[:, 0, 0, 0], (v - 0.2) / 0.5)
    torch.testing.assert_close(x[:, 1, 1, 1], (v - 0.4) / 0.25)
    assert y.tolist() == [0, 1, 0]
    x64, _ = next(iter(DeviceLoader(ds, 3, dtype=torch.float64)))
    assert x64.dtype == torch.float64
    torch.testing.assert_close(x64[:, 1, 0, 0], ((v - 0.4) / 0.25).double())


def test_sequential_order_and_last_partial_batch(indexed_dataset: Make) -> None:
    loader = DeviceLoader(indexed_dataset(10), 4)
    assert len(loader) == 3 and loader.batch_sizes() == [4, 4, 2]
    assert _ids(loader) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    labels = [y.tolist() for _, y in loader]
    assert labels == [[0, 1, 2, 0], [1, 2, 0, 1], [2, 0]]
    dropped = DeviceLoader(indexed_dataset(10), 4, drop_last=True)
    assert len(dropped) == 2 and _ids(dropped) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_shuffle_determinism_by_seed_and_epoch(indexed_dataset: Make) -> None:
    ds = indexed_dataset(50)
    a, b = DeviceLoader(ds, 8, shuffle=True, seed=1), DeviceLoader(ds, 8, shuffle=True, seed=1)
    first = _ids(a)
    assert first == _ids(b)
    assert sorted(_flat(first)) == list(range(50))
    assert first != [list(range(i, min(i + 8, 50))) for i in range(0, 50, 8)]
    a.set_epoch(1)
    second = _ids(a)
    assert second != first and sorted(_flat(second)) == list(range(50))
    b.set_epoch(1)
    assert _ids(b) == second
    assert _ids(DeviceLoader(ds, 8, shuffle=True, seed=2)) != first


@pytest.mark.parametrize("n", [48, 46])
def test_rank_shards_form_the_global_batches(indexed_dataset: Make, n: int) -> None:
    ds, b, w = indexed_dataset(n), 4, 3
    aug = AugmentConfig(hflip=True)
    single = DeviceLoader(ds, b * w, shuffle=True, seed=5, augment=aug)
    ranks = [DeviceLoader(ds, b, shuffle=True, seed=5, rank=r, world_size=w, augment=aug)
             for r in range(w)]  # fmt: skip
    for loader in [single, *ranks]:
        loader.set_epoch(2)
    per_rank = [_ids(r) for r in ranks]
    assert len({len(r) for r in ranks}) == 1 and len({len(p) for p in per_rank}) == 1
    glued = [_flat(p[i] for p in per_rank) for i in range(len(ranks[0]))]
    expected = _ids(single)
    if n % w == 0:
        assert glued == expected
    else:  # padded to a multiple of world_size: equal except the repeated samples at the end
        assert glued[:-1] == expected[:-1]
        assert glued[-1][: len(expected[-1])] == expected[-1]
        assert sorted(set(_flat(glued))) == list(range(n))
        assert len(_flat(glued)) == n + (-n) % w
    assert [r.batch_sizes()[-1] for r in ranks] == [ranks[0].batch_sizes()[-1]] * w


def test_shards_drop_last(indexed_dataset: Make) -> None:
    ranks = [DeviceLoader(indexed_dataset(25), 4, drop_last=True, rank=r, world_size=2)
             for r in range(2)]  # fmt: skip
    assert [len(r) for r in ranks] == [3, 3]
    assert _ids(ranks[0]) == [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]]
    assert _ids(ranks[1]) == [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 22, 23]]


def test_set_start_batch_resumes_exactly(indexed_dataset: Make) -> None:
    ds = indexed_dataset(30, h=6, w=6)
    aug = AugmentConfig(random_crop_padding=2, hflip=True)
    loader = DeviceLoader(ds, 4, shuffle=True, seed=3, augment=aug)
    loader.set_epoch(4)
    full = list(loader)
    loader.set_start_batch(5)
    resumed = list(loader)
    assert len(resumed) == len(full) - 5
    for (x1, y1), (x2, y2) in zip(resumed, full[5:], strict=True):
        torch.testing.assert_close(x1, x2)
        assert torch.equal(y1, y2)
    assert len(list(loader)) == len(full)  # only one iteration is shortened
    loader.set_start_batch(len(loader))
    assert list(loader) == []
    with pytest.raises(ValueError, match="past the end of the epoch"):
        loader.set_start_batch(len(loader) + 1)


def test_augmentation_is_applied_and_reproducible(indexed_dataset: Make) -> None:
    ds = indexed_dataset(16, h=6, w=6)
    plain = next(iter(DeviceLoader(ds, 16)))[0]
    aug = AugmentConfig(random_crop_padding=2)
    a = next(iter(DeviceLoader(ds, 16, augment=aug, seed=9)))[0]
    b = next(iter(DeviceLoader(ds, 16, augment=aug, seed=9)))[0]
    torch.testing.assert_close(a, b)
    assert a.shape == plain.shape and not torch.equal(a, plain)
    pad_value = (0.0 - 0.5) / 0.25  # black padding, normalised
    assert (a == pad_value).any()


def test_channels_last() -> None:
    ds = ImageDataset(name="c", images=torch.zeros(4, 3, 5, 5, dtype=torch.uint8),
                      labels=torch.zeros(4, dtype=torch.int64), classes=("a",),
                      mean=(0.5,) * 3, std=(0.5,) * 3)  # fmt: skip
    x, _ = next(iter(DeviceLoader(ds, 4, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_argument_validation(indexed_dataset: Make) -> None:
    ds = indexed_dataset(4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        DeviceLoader(ds, 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 1\]"):
        DeviceLoader(ds, 1, rank=2, world_size=2)
    with pytest.raises(TypeError, match=r"floating torch\.dtype"):
        DeviceLoader(ds, 1, dtype=torch.int32)
    with pytest.raises(TypeError, match="must be an ImageDataset"):
        DeviceLoader(ds.images, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        DeviceLoader(ds, 1).set_epoch(-1)


def test_unknown_or_unavailable_device_is_refused_by_name(shared_data: Path) -> None:
    ds = load_dataset("mnist", "test", root=shared_data, download=False)
    with pytest.raises(ValueError, match="invalid device 'gpu'; expected 'auto', 'cpu', 'cuda'"):
        DeviceLoader(ds, 64, device="gpu")
    with pytest.raises(
        ValueError, match=r"device 'cuda:99' (asked for a CUDA/ROCm GPU|does not exist)"
    ):
        DeviceLoader(ds, 64, device="cuda:99")
    with pytest.raises(ValueError, match="unsupported device 'meta'"):
        DeviceLoader(ds, 64, device="meta")
    with pytest.raises(TypeError, match=r"device must be a str or torch\.device, got int"):
        DeviceLoader(ds, 64, device=0)  # type: ignore[arg-type]


def test_constructor_does_no_device_work(indexed_dataset: Make) -> None:
    loader = DeviceLoader(indexed_dataset(4), 2)
    assert loader._images is None
    next(iter(loader))
    assert loader._images is not None


def test_synthetic_loader_matches_shapes(indexed_dataset: Make) -> None:
    real = DeviceLoader(indexed_dataset(10, c=3), 4, dtype=torch.float64)
    synth = SyntheticLoader.like(real)
    assert len(synth) == len(real) == 3
    shapes = [(tuple(x.shape), tuple(y.shape), x.dtype, y.dtype) for x, y in synth]
    assert shapes == [(tuple(x.shape), tuple(y.shape), x.dtype, y.dtype) for x, y in real]
    assert all(int(y.max()) < 3 for _, y in synth)
    synth.set_start_batch(2)
    assert [x.shape[0] for x, _ in synth] == [2]
    direct = SyntheticLoader((1, 28, 28), 32, 5, num_classes=10)
    assert len(direct) == 5 and direct.batch_sizes() == [32] * 5
    x, y = next(iter(direct))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    with pytest.raises(ValueError, match="last_batch_size must be <= batch_size"):
        SyntheticLoader((1, 2, 2), 4, 2, last_batch_size=5)


@pytest.mark.gpu
def test_cuda_matches_cpu(indexed_dataset: Make) -> None:
    ds = indexed_dataset(20)
    cpu = list(DeviceLoader(ds, 8, shuffle=True))
    gpu = list(DeviceLoader(ds, 8, shuffle=True, device="cuda"))
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.device.type == "cuda"
        torch.testing.assert_close(xg.cpu(), xc)
        assert torch.equal(yg.cpu(), yc)
    aug = DeviceLoader(ds, 8, device="cuda", augment=AugmentConfig(random_crop_padding=1))
    assert next(iter(aug))[0].shape == (8, 1, 4, 4)
