"""Tests for slimtorch.models.registry: names, argument checks, the rebuild record."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.core.errors import RegistryError
from slimtorch.models import MODELS, create_model, list_models, register_model

ZOO = ["lenet5", "mlp", "mobilenetv2", "resnet20", "resnet32", "resnet56", "vgg11-bn"]


def test_list_models_holds_the_zoo_sorted() -> None:
    names = list_models()
    assert set(ZOO) <= set(names)
    assert names == sorted(names)


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet18'; valid choices: .*lenet5"):
        create_model("resnet18")


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("num_classes", 0),
        ("num_classes", 2.5),
        ("num_classes", True),
        ("in_channels", 0),
        ("in_channels", "3"),
        ("input_size", -1),
    ],
)
def test_bad_common_arguments(arg: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{arg} must be an integer >= 1, got"):
        create_model("mlp", **{arg: value})  # type: ignore[arg-type]


def test_unknown_model_argument_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown argument\(s\) widht for model 'mlp'.*hidden"):
        create_model("mlp", widht=3)
    with pytest.raises(ValueError, match=r"valid model-specific arguments: \(none\)"):
        create_model("lenet5", hidden=(3,))


def test_model_specific_argument_checks() -> None:
    with pytest.raises(ValueError, match="width_mult must be a number > 0"):
        create_model("mobilenetv2", width_mult=0)
    with pytest.raises(ValueError, match="hidden must be a sequence of integers >= 1"):
        create_model("mlp", hidden=(0,))
    with pytest.raises(ValueError, match="lenet5 needs input_size >= 4"):
        create_model("lenet5", input_size=3)


def test_arch_record_has_every_construction_argument() -> None:
    model = create_model("mlp", num_classes=3, in_channels=1, input_size=8)
    assert model.slimtorch_arch == {
        "name": "mlp",
        "kwargs": {"num_classes": 3, "in_channels": 1, "input_size": 8, "hidden": [256, 128]},
        "transforms": [],
    }
    mb = create_model("mobilenetv2", width_mult=0.25)
    assert mb.slimtorch_arch["kwargs"] == {
        "num_classes": 10,
        "in_channels": 1,
        "input_size": 28,
        "width_mult": 0.25,
        "dropout": 0.2,
    }


def test_rebuild_from_record_gives_same_architecture() -> None:
    model = create_model("mlp", input_size=8, hidden=(16, 8))
    again = create_model(model.slimtorch_arch["name"], **model.slimtorch_arch["kwargs"])
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes


def test_register_model_checks_signature_and_duplicates() -> None:
    with pytest.raises(TypeError, match="must accept the keyword argument"):

        @register_model("test-only-bad-signature")
        def bad(*, num_classes: int) -> nn.Module:
            return nn.Linear(1, num_classes)

    with pytest.raises(RegistryError, match="model 'mlp' is already registered"):

        @register_model("mlp")
        def dup(*, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
            return nn.Linear(1, num_classes)


def test_non_json_argument_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # register into a copy of the registry, restored after the test, so later tests (the CLI's
    # static list of model names) see only the built-in models
    monkeypatch.setattr(MODELS, "_items", dict(MODELS._items))

    def takes(
        *, num_classes: int, in_channels: int, input_size: int, act: object = None
    ) -> nn.Module:
        return nn.Linear(in_channels, num_classes)

    register_model("test-only-takes-object")(takes)
    with pytest.raises(ValueError, match="must be JSON-serialisable"):
        create_model("test-only-takes-object", act=nn.ReLU())
    out = create_model("test-only-takes-object", in_channels=2)(torch.ones(1, 2))
    assert out.shape == (1, 10)
