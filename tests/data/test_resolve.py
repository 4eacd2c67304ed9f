from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtorch.core.errors import ChecksumError, DataFormatError, DataNotFoundError
from slimtorch.data import data_cache_dir, find_dataset_files, load_dataset

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_CLASS_MEANS = [44.2, 19.4, 38.0, 36.1, 30.9, 32.8, 35.0, 29.2, 38.3, 31.3]
FASHION_CLASS_MEANS = [83.0, 56.8, 96.1, 66.0, 98.3, 34.9, 84.6, 42.8, 90.2, 76.8]
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _class_means(images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    per_image = images.view(images.shape[0], -1).sum(1, dtype=torch.int64).double()
    sums = torch.bincount(labels, weights=per_image, minlength=10)
    return (sums / torch.bincount(labels, minlength=10) / images[0].numel()).tolist()


@pytest.fixture(scope="module")
def mnist_train(shared_data: Path):
    return load_dataset("mnist", "train", root=shared_data, download=False)


def test_real_mnist(mnist_train, shared_data: Path) -> None:
    ds = mnist_train
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.name == "mnist/train" and ds.classes[3] == "3"
    assert torch.bincount(ds.labels).tolist() == MNIST_TRAIN_COUNTS
    np.testing.assert_allclose(_class_means(ds.images, ds.labels), MNIST_CLASS_MEANS, atol=0.05)
    test = load_dataset("mnist", "test", root=shared_data, download=False)
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == MNIST_TEST_COUNTS


def test_real_fashion_mnist(shared_data: Path) -> None:
    ds = load_dataset("fashion-mnist", "train", root=shared_data, download=False)
    assert ds.images.shape == (60000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [6000] * 10
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    np.testing.assert_allclose(_class_means(ds.images, ds.labels), FASHION_CLASS_MEANS, atol=0.05)
    assert abs(ds.images.double().mean().item() - 72.9) < 0.05
    hist = torch.bincount(ds.images.flatten(), minlength=256).double()
    v = torch.arange(256, dtype=torch.float64) / 255
    mean = (hist * v).sum() / hist.sum()
    std = ((hist * (v - mean) ** 2).sum() / hist.sum()).sqrt()
    assert abs(mean.item() - ds.mean[0]) < 5e-4 and abs(std.item() - ds.std[0]) < 5e-4
    test = load_dataset("fashion-mnist", "test", root=shared_data, download=False)
    assert torch.bincount(test.labels).tolist() == [1000] * 10


def test_mnist_mean_std_constants(mnist_train) -> None:
    hist = torch.bincount(mnist_train.images.flatten(), minlength=256).double()
    v = torch.arange(256, dtype=torch.float64) / 255
    mean = (hist * v).sum() / hist.sum()
    std = ((hist * (v - mean) ** 2).sum() / hist.sum()).sqrt()
    assert abs(mean.item() - mnist_train.mean[0]) < 5e-4
    assert abs(std.item() - mnist_train.std[0]) < 5e-4


def _copy_test_files(shared_data: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in TEST_FILES:
        shutil.copy(shared_data / "mnist" / f, dest / f)
    return dest


def test_env_var_is_used(shared_data: Path, isolated: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLIMTORCH_DATA", str(shared_data))
    assert len(load_dataset("mnist", "test", download=False)) == 10000


def test_cache_dir_follows_xdg(isolated: Path, monkeypatch, tmp_path: Path) -> None:
    assert data_cache_dir() == isolated
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_cache_dir() == tmp_path / "home" / ".cache" / "slimtorch" / "data"


def _raw_mnist(folder: Path, n: int, write_idx: Callable[..., Path]) -> None:
    write_idx(folder / "t10k-images-idx3-ubyte", np.full((n, 28, 28), n, np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)


def test_resolution_order(
    isolated: Path, tmp_path: Path, monkeypatch, write_idx: Callable[..., Path], caplog
) -> None:
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    _raw_mnist(explicit / "mnist", 3, write_idx)  # <root>/<name>/file layout
    _raw_mnist(env, 4, write_idx)  # <root>/file layout
    _raw_mnist(isolated / "mnist", 5, write_idx)
    monkeypatch.setenv("SLIMTORCH_DATA", str(env))

    assert len(load_dataset("mnist", "test", root=explicit, download=False)) == 3
    assert len(load_dataset("mnist", "test", download=False)) == 4
    monkeypatch.delenv("SLIMTORCH_DATA")
    assert len(load_dataset("mnist", "test", download=False)) == 5
    found = find_dataset_files("mnist", "test", root=explicit)
    assert found is not None and found[0][0] == explicit / "mnist" / "t10k-images-idx3-ubyte"
    # an explicit root without the files falls through to the next folder; one that does not
    # exist at all (a typo) is named
    with caplog.at_level("WARNING", logger="slimtorch.data.resolve"):
        assert len(load_dataset("mnist", "test", root=tmp_path / "empty", download=False)) == 5
    assert f"root {tmp_path / 'empty'} does not exist; read mnist/test from" in caplog.text


def test_gz_layout_beats_raw_in_same_folder(
    shared_data: Path, isolated: Path, tmp_path: Path, write_idx: Callable[..., Path]
) -> None:
    folder = _copy_test_files(shared_data, tmp_path / "r" / "mnist")
    _raw_mnist(folder, 2, write_idx)
    assert len(load_dataset("mnist", "test", root=tmp_path / "r", download=False)) == 10000


def test_missing_everywhere(isolated: Path, tmp_path: Path, monkeypatch) -> None:
    env = tmp_path / "envdata"
    monkeypatch.setenv("SLIMTORCH_DATA", str(env))
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("kmnist", "train", root=tmp_path / "mine", download=False)
    msg = str(info.value)
    for folder in (tmp_path / "mine" / "kmnist", tmp_path / "mine", env / "kmnist", env,
                   isolated / "kmnist", isolated):  # fmt: skip
        assert f"\n  {folder}\n" in msg + "\n"
    assert "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz" in msg
    assert "SLIMTORCH_DATA" in msg and "download=False" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_flipped_byte_is_a_checksum_error(shared_data: Path, isolated: Path, tmp_path) -> None:
    folder = _copy_test_files(shared_data, tmp_path / "c" / "mnist")
    p = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(p.read_bytes())
    raw[2000] ^= 0x01
    p.write_bytes(bytes(raw))
    with pytest.raises(
        ChecksumError, match=r"t10k-labels-idx1-ubyte\.gz has sha256 .* expected f7ae"
    ):
        load_dataset("mnist", "test", root=tmp_path / "c", download=False)


def test_another_datasets_files_in_a_flat_root_are_named_and_passed_over(
    shared_data: Path, isolated: Path, tmp_path: Path, monkeypatch
) -> None:
    flat = _copy_test_files(shared_data, tmp_path / "flat")  # MNIST's files, no subfolder
    with pytest.raises(ChecksumError, match=r"flat holds mnist's test files, not fashion-mnist"):
        load_dataset("fashion-mnist", "test", root=flat, download=False)
    monkeypatch.setenv("SLIMTORCH_DATA", str(shared_data))  # a good copy further down
    fashion = load_dataset("fashion-mnist", "test", root=flat, download=False)
    mnist = load_dataset("mnist", "test", download=False)
    assert fashion.name == "fashion-mnist/test" and not torch.equal(fashion.images, mnist.images)


def test_uncompressed_files_of_another_dataset_are_recognised(
    shared_data: Path, isolated: Path, tmp_path: Path, write_idx: Callable[..., Path]
) -> None:
    import gzip

    flat = tmp_path / "raw"
    flat.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # MNIST's, gunzipped
        (flat / name).write_bytes(
            gzip.decompress((shared_data / "mnist" / f"{name}.gz").read_bytes())
        )
    with pytest.raises(ChecksumError, match=r"raw holds mnist's test files, not fashion-mnist"):
        load_dataset("fashion-mnist", "test", root=flat, download=False)
    assert len(load_dataset("mnist", "test", root=flat, download=False)) == 10000
    own = tmp_path / "own" / "fashion-mnist"  # a user's own small IDX files still load
    _raw_mnist(own, 3, write_idx)
    assert len(load_dataset("fashion-mnist", "test", root=tmp_path / "own", download=False)) == 3


def test_truncated_file_is_rejected(shared_data: Path, isolated: Path, tmp_path: Path) -> None:
    folder = _copy_test_files(shared_data, tmp_path / "t" / "mnist")
    p = folder / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:100_000])
    with pytest.raises(ChecksumError, match="has 100000 bytes, expected 1648877"):
        load_dataset("mnist", "test", root=tmp_path / "t", download=False)


def test_bad_magic_in_raw_layout(
    isolated: Path, tmp_path: Path, write_idx: Callable[..., Path]
) -> None:
    folder = tmp_path / "m" / "mnist"
    _raw_mnist(folder, 3, write_idx)
    p = folder / "t10k-images-idx3-ubyte"
    p.write_bytes(b"\x08\x03" + p.read_bytes()[2:])
    with pytest.raises(DataFormatError, match="not an IDX file"):
        load_dataset("mnist", "test", root=tmp_path / "m", download=False)


def test_labels_outside_the_classes_name_the_files(
    isolated: Path, tmp_path: Path, write_idx: Callable[..., Path]
) -> None:
    folder = tmp_path / "m" / "mnist"
    _raw_mnist(folder, 3, write_idx)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.array([1, 200, 2], np.uint8))
    with pytest.raises(
        DataFormatError, match=r"t10k-labels-idx1-ubyte: labels must lie in \[0, 9\]"
    ):
        load_dataset("mnist", "test", root=tmp_path / "m", download=False)


def test_unknown_name_and_split(isolated: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*mnist"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="no split 'val'; valid splits: train, test"):
        load_dataset("mnist", "val", download=False)


def test_root_that_is_a_file_is_refused(shared_data: Path, isolated: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLIMTORCH_DATA", str(shared_data))  # would silently be used instead
    given = shared_data / "mnist" / TEST_FILES[0]
    with pytest.raises(ValueError, match=r"root '.*t10k-images-idx3-ubyte\.gz' is a file, not a"):
        load_dataset("mnist", "test", root=given, download=False)


def test_cifar_npz_layout(isolated: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "d" / "cifar10").mkdir(parents=True)
    np.savez(tmp_path / "d" / "cifar10" / "cifar10-test.npz", x=x, y=np.arange(6) % 10)
    ds = load_dataset("cifar10", "test", root=tmp_path / "d", download=False)
    assert ds.input_shape == (3, 32, 32) and len(ds) == 6 and ds.classes[0] == "airplane"
    assert ds.mean == (0.4914, 0.4822, 0.4465)


def test_cifar_unofficial_batch_is_refused(isolated: Path, tmp_path: Path) -> None:
    folder = tmp_path / "d" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(b"\x80\x04N.")
    with pytest.raises(ChecksumError, match="40351d587109b95175f43aff81a1287e"):
        load_dataset("cifar10", "test", root=tmp_path / "d", download=False)


def test_not_found_names_the_argument_and_the_command_line_option(
    isolated: Path, tmp_path: Path
) -> None:
    """Read by Python users and, through ``slimtorch train``, by command-line users."""
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("kmnist", "test", download=False)
    msg = str(info.value)
    assert "\nDownloading is off (download=False / --no-download).\n" in msg
    assert msg.endswith(
        "What to do: put the files in <folder>/kmnist/ or <folder>/ and set "
        "SLIMTORCH_DATA=<folder> (or pass root=<folder> / --data-root <folder>), or allow the "
        "download (download=True / leave out --no-download)."
    )
    # the download was on and failed: allowing it is no advice
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("kmnist", "test", mirrors=[(tmp_path / "no-mirror").as_uri() + "/"])
    msg = str(info.value)
    assert "\nThe download failed: " in msg
    assert msg.endswith("(or pass root=<folder> / --data-root <folder>).")


def test_root_that_is_a_file_names_the_option_too(shared_data: Path, isolated: Path) -> None:
    given = shared_data / "mnist" / TEST_FILES[0]
    with pytest.raises(ValueError) as info:
        load_dataset("mnist", "test", root=given, download=False)
    assert str(info.value) == (
        f"root {str(given)!r} is a file, not a folder; pass the folder that holds the dataset's "
        f"files as root= / --data-root (e.g. {str(given.parent)!r})"
    )


def test_processes_fetching_one_dataset_at_once_fetch_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every data-parallel rank (or command) missing the files downloaded the whole dataset
    import threading
    import time

    from slimtorch.data import resolve
    from slimtorch.data.catalog import dataset_info

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fetched: list[str] = []

    def slow_fetch(urls: list[str], dest: Path, spec: object) -> Path:
        fetched.append(dest.name)
        time.sleep(0.2)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"x")
        return dest

    monkeypatch.setattr(resolve, "download_file", slow_fetch)
    info = dataset_info("mnist")
    runs = [threading.Thread(target=resolve._download, args=(info, "test", ["file:///m"]))
            for _ in range(2)]  # fmt: skip
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert sorted(fetched) == sorted(f.name for f in info.layouts["test"][0].files)
