"""Image folders named wherever a dataset name goes: splits, class order, shapes, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimtorch.core.errors import DataFormatError, DataNotFoundError
from slimtorch.data import (
    dataset_classes,
    dataset_record,
    is_image_folder,
    load_dataset,
    load_folder_split,
)

Image = pytest.importorskip("PIL.Image")


def write_images(root: Path, split: str, labels: dict[str, list[int]], size: int = 10) -> None:
    """One grayscale PNG per entry: class folder -> pixel shades."""
    for cls, shades in labels.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i, shade in enumerate(shades):
            Image.new("L", (size, size), shade).save(root / split / cls / f"{i}.png")


@pytest.fixture
def pets(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    write_images(root, "train", {"cat": [10, 20], "dog": [200], "emu": [100]})
    write_images(root, "test", {"dog": [190, 210]})  # no cat, no emu: labels must not shift
    return root


def test_splits_share_the_training_class_order(pets: Path) -> None:
    train = load_dataset(str(pets), "train")
    test = load_dataset(str(pets), "test")
    assert train.classes == test.classes == ("cat", "dog", "emu")
    assert train.labels.tolist() == [0, 0, 1, 2]
    assert test.labels.tolist() == [1, 1]  # "dog" is label 1 in both splits
    assert train.name == "pets/train" and test.name == "pets/test"
    assert train.input_shape == (1, 10, 10)  # every image grayscale: one channel


def test_channels_and_size_are_read_as_asked(pets: Path) -> None:
    ds = load_dataset(str(pets), "test", channels=3, size=(16, 16))
    assert ds.input_shape == (3, 16, 16)
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])  # gray copied into R, G and B


def test_colour_images_give_three_channels(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    write_images(root, "train", {"a": [5]})
    (root / "train" / "b").mkdir()
    Image.new("RGB", (10, 10), (255, 0, 0)).save(root / "train" / "b" / "0.png")
    assert load_folder_split(str(root), "train").input_shape == (3, 10, 10)


def test_val_folder_serves_as_the_test_split(tmp_path: Path) -> None:
    root = tmp_path / "v"
    write_images(root, "train", {"a": [1], "b": [2]})
    write_images(root, "val", {"b": [3]})
    assert load_dataset(str(root), "test").labels.tolist() == [1]
    caps = tmp_path / "caps"  # split folders in another case
    write_images(caps, "Train", {"a": [1], "b": [2]})
    write_images(caps, "TEST", {"a": [3]})
    assert load_dataset(str(caps), "test").labels.tolist() == [0]


def test_a_test_class_unknown_to_train_is_refused(pets: Path) -> None:
    write_images(pets, "test", {"yak": [50]})
    with pytest.raises(DataFormatError, match="yak"):
        load_dataset(str(pets), "test")


def test_missing_folder_and_missing_split_name_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"does not exist.*train/<class_name>"):
        load_dataset(str(tmp_path / "nowhere"), "train")
    write_images(tmp_path / "only", "train", {"a": [1]})
    with pytest.raises(DataNotFoundError, match="no test/ or val/ or validation/"):
        load_dataset(str(tmp_path / "only"), "test")
    write_images(tmp_path / "flat", "a", {"x": [1]})  # class folders without a train/ level
    with pytest.raises(DataNotFoundError, match="no train/ sub-folder"):
        load_dataset(str(tmp_path / "flat"), "train")
    with pytest.raises(ValueError, match="no split 'val'"):
        load_dataset(str(tmp_path / "only"), "val")


def test_names_and_records(pets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(pets.parent)
    assert is_image_folder("pets") and is_image_folder("./pets")
    assert not is_image_folder("mnist") and not is_image_folder("mnsit")  # typo: not a folder
    assert dataset_record("pets") == str(pets.resolve())
    assert dataset_record("mnist") == "mnist"
    assert dataset_classes("pets") == ("cat", "dog", "emu")
    (pets.parent / "mnist").mkdir()  # a catalog name wins over a folder of that name
    assert not is_image_folder("mnist") and is_image_folder("./mnist")


def test_a_catalog_name_shadowing_an_image_folder_here_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "digits", "train", {"a": [1]})
    with caplog.at_level("WARNING", logger="slimtorch.data.resolve"):
        assert load_dataset("digits", "test").name == "digits/test"  # the catalog set
    assert "for the image folder of that name here, pass ./digits" in caplog.text


def test_catalog_datasets_refuse_another_shape() -> None:
    assert load_dataset("digits", "test", channels=1, size=8).input_shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r"digits/test images are \(1, 8, 8\).*not \(3, 8, 8\)"):
        load_dataset("digits", "test", channels=3)
    with pytest.raises(ValueError, match=r"not \(1, 28, 28\)"):
        load_dataset("digits", "test", size=(28, 28))


def test_a_model_reads_another_folder_in_its_own_label_order(pets: Path, tmp_path: Path) -> None:
    from slimtorch.models import ModelCard

    other = tmp_path / "other"
    write_images(other, "train", {"cat": [1], "emu": [2]})  # no dog: emu would be label 1
    write_images(other, "test", {"emu": [3]})
    card = ModelCard(architecture={"name": "mlp", "kwargs": {}}, transforms=[],
                     input_shape=(1, 10, 10), mean=(0.5,), std=(0.25,),
                     class_names=("cat", "dog", "emu"), dtype="float32", torch_version="",
                     extra={"dataset": str(pets)})  # fmt: skip
    ds = card.load_split("test", dataset=other)  # a pathlib.Path names a folder too
    assert ds.classes == ("cat", "dog", "emu") and ds.labels.tolist() == [2]
    assert ds.mean == (0.5,) and ds.std == (0.25,)  # the model's normalisation
    write_images(other, "test", {"yak": [4]})
    with pytest.raises(DataFormatError, match=r"yak that the given classes \(the model's\)"):
        card.load_split("test", dataset=str(other))
    assert load_dataset(pets, "train").classes == ("cat", "dog", "emu")  # Path accepted


def test_class_folders_equal_after_unicode_normalisation_are_refused(tmp_path: Path) -> None:
    import unicodedata

    root = tmp_path / "cafes"
    for form, shade in (("NFC", 30), ("NFD", 220)):
        write_images(root, "train", {unicodedata.normalize(form, "café"): [shade]})
    with pytest.raises(DataFormatError, match="differ only in their Unicode form"):
        load_dataset(str(root), "train")


def test_images_outside_the_class_folders_are_named(
    pets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Image.new("L", (10, 10), 5).save(pets / "train" / "stray.png")
    with caplog.at_level("WARNING", logger="slimtorch.data.folder"):
        assert len(load_dataset(str(pets), "train")) == 4
    assert "1 image(s) lie outside the class folders" in caplog.text
