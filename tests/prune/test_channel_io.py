"""A channel-pruned model is an ordinary dense model: it saves, loads and exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimtorch.models import create_model, load_exported, load_model, save_exported, save_model
from slimtorch.models.transforms import replay_transforms
from slimtorch.prune.channel import ChannelPruneConfig, prune_channels_, replay_channel_widths


def _pruned(name: str, size: int, **kwargs) -> tuple[nn.Module, torch.Tensor]:
    model = create_model(name, num_classes=10, in_channels=3, input_size=size, **kwargs)
    x = torch.randn(2, 3, size, size)
    prune_channels_(model, ChannelPruneConfig(ratio=0.5), x)
    return model.eval(), x


def _save(model: nn.Module, path: Path, size: int) -> None:
    save_model(
        model,
        path,
        input_shape=(3, size, size),
        mean=[0.5],
        std=[0.25],
        class_names=[str(i) for i in range(10)],
    )


def test_save_load_round_trip_reproduces_outputs(tmp_path: Path) -> None:
    model, x = _pruned("resnet20", 16)
    # prune a second time: both records replay in order
    prune_channels_(model, ChannelPruneConfig(ratio=0.5, round_to=1), x, include=["layer3.*"])
    model.eval()
    _save(model, tmp_path / "m", 16)
    loaded, card = load_model(tmp_path / "m")
    assert [t["name"] for t in card.transforms] == ["prune.channels", "prune.channels"]
    assert loaded.layer3[0].conv1.out_channels == model.layer3[0].conv1.out_channels == 16
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_mobilenet_with_depthwise_widths(tmp_path: Path) -> None:
    model, x = _pruned("mobilenetv2", 8, width_mult=0.35)
    _save(model, tmp_path / "m", 8)
    loaded, _ = load_model(tmp_path / "m")
    dw = loaded.features[2].conv[1][0]
    assert dw.groups == dw.in_channels == dw.out_channels < 96
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_replay_rejects_malformed_records() -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="needs params"):
        replay_channel_widths(net, {"widths": {}})
    with pytest.raises(ValueError, match="lacks"):
        replay_channel_widths(net, {"layers": {"5": {"type": "Linear"}}})
    with pytest.raises(ValueError, match="malformed"):
        replay_channel_widths(net, {"layers": {"0": {"type": "Softmax"}}})
    model = create_model("mlp", num_classes=10, in_channels=1, input_size=8)
    from slimtorch.core.errors import ModelLoadError

    record = {"name": "prune.channels", "params": {"layers": {"classifier": {"type": "Conv2d"}}}}
    with pytest.raises(ModelLoadError, match=r"prune\.channels"):
        replay_transforms(model, [record])


@pytest.mark.parametrize(
    ("name", "kwargs"), [("resnet20", {}), ("mobilenetv2", {"width_mult": 0.35})]
)
def test_torch_export_of_pruned_model(name: str, kwargs: dict) -> None:
    model, x = _pruned(name, 8, **kwargs)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


def test_saved_export_of_pruned_model_takes_any_batch(tmp_path: Path) -> None:
    model, _ = _pruned("lenet5", 28)
    save_exported(model, torch.randn(2, 3, 28, 28), tmp_path / "m.pt2")
    x = torch.randn(5, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path / "m.pt2")(x), model(x))


@pytest.mark.slow  # the dynamo ONNX exporter takes 3-10 s on a shared CPU
def test_onnx_export_of_pruned_resnet_matches_onnxruntime(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model, x = _pruned("resnet20", 8)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["y"], {"x": x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
