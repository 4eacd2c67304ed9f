from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slimtorch.core.errors import DataFormatError, DataNotFoundError
from slimtorch.data import load_image_folder


def _img(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (5, 4)) -> np.ndarray:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = rgb
    arr[0, 0] = (255, 255, 255)  # a marker pixel at the top-left
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    _img(root / "dog" / "b.png", (0, 200, 0))
    _img(root / "dog" / "a.png", (0, 100, 0))
    _img(root / "cat" / "x.bmp", (10, 20, 30))
    (root / "cat" / "notes.txt").write_text("ignored")
    (root / "empty").mkdir()
    return root


def test_rgb_classes_sorted_and_pixels_exact(folder: Path) -> None:
    ds = load_image_folder(folder)
    assert ds.classes == ("cat", "dog", "empty")
    assert ds.labels.tolist() == [0, 1, 1]  # cat/x.bmp, dog/a.png, dog/b.png
    assert ds.images.shape == (3, 3, 4, 5) and ds.images.dtype == torch.uint8
    assert ds.images[0, :, 1, 1].tolist() == [10, 20, 30]
    assert ds.images[1, :, 2, 2].tolist() == [0, 100, 0]
    assert ds.images[2, :, 0, 0].tolist() == [255, 255, 255]
    assert ds.name == "pets"
    # mean/std estimated from the images, per channel
    x = ds.images.double() / 255
    torch.testing.assert_close(torch.tensor(ds.mean, dtype=torch.float64), x.mean(dim=(0, 2, 3)))


def test_grayscale_matches_pillow(folder: Path) -> None:
    ds = load_image_folder(folder, channels=1, mean=(0.5,), std=(0.5,))
    assert ds.input_shape == (1, 4, 5)
    expected = np.asarray(Image.open(folder / "cat" / "x.bmp").convert("L"))
    assert ds.images[0, 0].numpy().tolist() == expected.tolist()
    assert ds.mean == (0.5,)


def test_resize(folder: Path) -> None:
    ds = load_image_folder(folder, size=(8, 6))
    assert ds.input_shape == (3, 8, 6)
    assert load_image_folder(folder, size=3).input_shape == (3, 3, 3)


def test_mixed_sizes_need_size(folder: Path) -> None:
    _img(folder / "dog" / "c.png", (1, 2, 3), size=(7, 7))
    with pytest.raises(DataFormatError, match=r"c\.png is 7x7 .* pass size="):
        load_image_folder(folder)
    assert load_image_folder(folder, size=4).images.shape[0] == 4


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 25700, 65535]], dtype=np.uint16)
    for cls in ("a", "b"):
        (tmp_path / "depth" / cls).mkdir(parents=True)
        Image.fromarray(values).save(tmp_path / "depth" / cls / "0.png")
    assert Image.open(tmp_path / "depth" / "a" / "0.png").mode == "I;16"
    gray = load_image_folder(tmp_path / "depth", channels=1, mean=(0.5,), std=(0.5,))
    assert gray.images[0, 0].tolist() == [[0, 4, 100, 255]]
    rgb = load_image_folder(tmp_path / "depth", channels=3)
    assert rgb.images[1, :, 0, 2].tolist() == [100, 100, 100]


def test_unreadable_file_is_named(folder: Path) -> None:
    (folder / "dog" / "broken.jpg").write_bytes(b"not really a jpeg")
    with pytest.raises(DataFormatError, match=r"cannot read image .*broken\.jpg"):
        load_image_folder(folder)


def test_hidden_files_are_skipped(folder: Path) -> None:
    # macOS leaves AppleDouble files ("._a.png") beside copied images; they are not images
    (folder / "dog" / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    _img(folder / ".cache" / "x.png", (1, 1, 1))  # hidden class folder
    ds = load_image_folder(folder)
    assert ds.classes == ("cat", "dog", "empty") and ds.labels.tolist() == [0, 1, 1]


def test_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "e" / "a").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="no images found"):
        load_image_folder(tmp_path / "e")


def test_bad_arguments(folder: Path) -> None:
    with pytest.raises(ValueError, match="channels must be 1"):
        load_image_folder(folder, channels=2)
    with pytest.raises(ValueError, match="size must be"):
        load_image_folder(folder, size=(1, 2, 3))


def test_an_image_over_the_pixel_limit_is_named(folder: Path, monkeypatch) -> None:
    _img(folder / "cat" / "huge.png", (1, 2, 3), size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40x40 > 2x the limit: a bomb to PIL
    with pytest.raises(DataFormatError, match=r"cannot read image .*huge\.png \(DecompressionBomb"):
        load_image_folder(folder)


def test_std_from_integer_sums_matches_the_float_formula(folder: Path) -> None:
    ds = load_image_folder(folder)
    x = ds.images.double() / 255
    torch.testing.assert_close(
        torch.tensor(ds.std, dtype=torch.float64), x.std(dim=(0, 2, 3), unbiased=False)
    )


def test_a_second_split_takes_the_first_splits_labels(folder: Path, tmp_path: Path) -> None:
    train = load_image_folder(folder)  # cat, dog, empty
    test = tmp_path / "test"
    _img(test / "dog" / "a.png", (0, 90, 0))  # no cat folder in this split
    alone = load_image_folder(test)
    assert alone.classes == ("dog",) and alone.labels.tolist() == [0]  # shifted on its own
    ds = load_image_folder(test, classes=train.classes, mean=train.mean, std=train.std)
    assert ds.classes == train.classes and ds.labels.tolist() == [1] and ds.mean == train.mean
    _img(test / "fox" / "a.png", (9, 9, 9))
    with pytest.raises(DataFormatError, match=r"folder\(s\) fox that are not among the classes"):
        load_image_folder(test, classes=train.classes)


def test_entries_passed_over_are_counted(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    _img(folder / "dog" / "nested" / "c.png", (1, 2, 3))
    (folder / "dog" / "gone.png").symlink_to(folder / "nowhere.png")
    with caplog.at_level("WARNING", logger="slimtorch.data.folder"):
        ds = load_image_folder(folder)
    assert len(ds) == 3
    assert "3 entries in class folders were not read (1 .txt suffix, 1 broken link, " in caplog.text
    assert "1 sub-folder)" in caplog.text


def test_class_order_does_not_depend_on_unicode_normal_form(tmp_path: Path) -> None:
    import unicodedata

    for form in ("NFC", "NFD"):
        root = tmp_path / form
        for name in ("über", "vogel"):
            _img(root / unicodedata.normalize(form, name) / "a.png", (1, 1, 1))
        assert load_image_folder(root).classes == ("vogel", "über")  # sorted in NFC


def test_the_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = _img(tmp_path / "x" / "c" / "tmp.png", (0, 0, 0), size=(6, 2))  # wide, marker top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to view
    Image.fromarray(arr).save(tmp_path / "x" / "c" / "a.jpg", exif=exif, quality=100)
    (tmp_path / "x" / "c" / "tmp.png").unlink()
    ds = load_image_folder(tmp_path / "x")
    assert ds.input_shape == (3, 6, 2)  # shown upright: tall
    assert int(ds.images[0, 0, 0, -1]) > 200  # the marker moved to the top-right
