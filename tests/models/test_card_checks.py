"""load_model refuses a config.json that contradicts the architecture; save refuses NaN stats."""

from __future__ import annotations

import json

import pytest

from slimtorch.core.errors import ModelLoadError
from slimtorch.models import create_model, load_model, save_model

NAMES = [str(i) for i in range(10)]


@pytest.fixture
def saved(tmp_path):
    model = create_model("lenet5", in_channels=1, input_size=28)
    return save_model(
        model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.1], std=[0.3], class_names=NAMES
    )


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("input_shape", [3, 28, 28], "has 3 channels but the architecture has in_channels=1"),
        ("class_names", ["a"], "class_names has 1 names but the architecture has num_classes=10"),
        ("std", [0.0], "std must be > 0"),
        ("mean", [1, 2, 3], "mean must be 1 or 1 finite numbers"),
        ("class_names", "0123456789", "class_names must be a list of strings"),
        ("class_names", list(range(10)), "class_names must be a list of strings"),
        ("format_version", True, "format_version True, not a version number"),
        ("format_version", 0, "format_version 0, not a version number"),
        ("format_version", 99, "format_version 99; this slimtorch reads up to 1"),
        ("transforms", {"name": "x"}, "transforms must be a list of records"),
        ("transforms", ["prune.channels"], r"transforms\[0\] must be"),
        ("transforms", [{"name": "x", "params": []}], r"transforms\[0\] must be"),
        (
            "transforms",
            [{"name": "no.such"}],
            r"config\.json: the model was saved after .*no\.such",
        ),
        ("extra", [], "extra must be an object"),
    ],
)
def test_config_that_lies_is_refused(saved, field, value, fragment):
    cfg = json.loads((saved / "config.json").read_text())
    cfg[field] = value
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=fragment):
        load_model(saved)


def test_save_refuses_nan_normalisation(tmp_path):
    model = create_model("lenet5", in_channels=1, input_size=28)
    with pytest.raises(ValueError, match="mean and std must be finite"):
        save_model(
            model,
            tmp_path / "m",
            input_shape=(1, 28, 28),
            mean=[0.1],
            std=[float("nan")],
            class_names=NAMES,
        )
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("int4", [False, True])
def test_a_config_asking_for_terabytes_is_refused_before_allocating(tmp_path, int4):
    # input_size 100000 makes lenet5's first linear layer terabytes large; an int4 model's
    # state dict cannot be laid out on the meta device, so the size is what tells
    from slimtorch.quant import PTQConfig, quantize_

    model = create_model("lenet5", in_channels=1, input_size=28).eval()
    if int4:
        quantize_(model, PTQConfig(mode="weight_only", weight_bits=4))
    saved = save_model(
        model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.1], std=[0.3], class_names=NAMES
    )
    cfg = json.loads((saved / "config.json").read_text())
    cfg["architecture"]["kwargs"]["input_size"] = 100000
    cfg["input_shape"] = [1, 100000, 100000]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json describes a lenet5 of [\d,.]+ GiB "
                       r"before its transforms, more than the"):  # fmt: skip
        load_model(saved)


def test_a_config_asking_for_other_shapes_is_refused_before_allocating(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["architecture"]["kwargs"]["input_size"] = 32
    cfg["input_shape"] = [1, 32, 32]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ModelLoadError,
        match=r"do not fit the architecture .*config\.json records; "
        r"mismatched keys: fc1\.weight: saved \(120, 400\)",
    ):
        load_model(saved)
