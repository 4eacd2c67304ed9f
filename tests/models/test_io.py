"""Tests for slimtorch.models.io: model directories round trip, fail loudly, swap atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import slimtorch.models.io as model_io
from slimtorch.core.errors import ModelLoadError
from slimtorch.models import (
    ModelCard,
    create_model,
    load_model,
    read_model_card,
    save_model,
    update_metrics,
)

NAMES = [str(i) for i in range(10)]


def _trained_like(model: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial running statistics so a round trip has something to lose."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32))
    return model.eval()


def _save(model: nn.Module, path: Path, **kw: object) -> Path:
    args: dict[str, object] = {
        "input_shape": (3, 32, 32),
        "mean": [0.49, 0.48, 0.45],
        "std": [0.25, 0.24, 0.26],
        "class_names": NAMES,
    }
    args.update(kw)
    return save_model(model, path, **args)  # type: ignore[arg-type]


def test_round_trip_reproduces_outputs_and_metadata(tmp_path: Path) -> None:
    model = _trained_like(create_model("resnet20", in_channels=3, input_size=32))
    x = torch.randn(3, 3, 32, 32)
    out = _save(model, tmp_path / "r20", metrics={"top1": 0.91}, extra={"dataset": "cifar10"})
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "metrics.json",
        "model.safetensors",
    ]
    loaded, card = load_model(out)
    assert not loaded.training
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert card == ModelCard(
        architecture={
            "name": "resnet20",
            "kwargs": {"num_classes": 10, "in_channels": 3, "input_size": 32},
        },
        transforms=[],
        input_shape=(3, 32, 32),
        mean=(0.49, 0.48, 0.45),
        std=(0.25, 0.24, 0.26),
        class_names=tuple(NAMES),
        dtype="float32",
        torch_version=torch.__version__,
        extra={"dataset": "cifar10"},
        metrics={"top1": 0.91},
    )
    assert loaded.slimtorch_arch == model.slimtorch_arch
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "slimtorch-model" and config["format_version"] == 1


def test_half_precision_round_trip_keeps_dtype(tmp_path: Path) -> None:
    model = create_model("mlp", input_size=8, hidden=[16]).half()
    _save(model, tmp_path / "m", input_shape=(1, 8, 8), mean=[0.0], std=[1.0])
    loaded, card = load_model(tmp_path / "m")
    assert card.dtype == "float16"
    assert loaded.classifier.weight.dtype == torch.float16
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_overwrite_replaces_weights_and_drops_stale_metrics(tmp_path: Path) -> None:
    first = create_model("mlp", input_size=8, hidden=[4])
    second = create_model("mlp", input_size=8, hidden=[4])
    kw = {"input_shape": (1, 8, 8), "mean": [0.0], "std": [1.0]}
    _save(first, tmp_path / "m", metrics={"top1": 0.1}, **kw)
    _save(second, tmp_path / "m", **kw)
    loaded, card = load_model(tmp_path / "m")
    assert card.metrics == {}
    torch.testing.assert_close(loaded.state_dict(), second.state_dict(), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary or backup left


def test_saving_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    kw = {"input_shape": (1, 8, 8), "mean": [0.0], "std": [1.0]}
    _save(create_model("mlp", input_size=8, hidden=[4]), tmp_path / "run-1", **kw)
    os.symlink(tmp_path / "run-1", tmp_path / "latest")
    for hidden in ([6], [3]):  # twice: nothing left behind blocks the next save
        second = create_model("mlp", input_size=8, hidden=hidden)
        _save(second, tmp_path / "latest", **kw)
        assert (tmp_path / "latest").is_symlink()
        loaded, _ = load_model(tmp_path / "run-1")
        torch.testing.assert_close(loaded.state_dict(), second.state_dict(), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run-1"]


def test_crash_while_writing_keeps_previous_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = {"input_shape": (1, 8, 8), "mean": [0.0], "std": [1.0]}
    old = create_model("mlp", input_size=8, hidden=[4])
    _save(old, tmp_path / "m", **kw)

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # e.g. Ctrl-C between weights and config

    monkeypatch.setattr(model_io, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(create_model("mlp", input_size=8, hidden=[4]), tmp_path / "m", **kw)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    loaded, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(loaded.state_dict(), old.state_dict(), rtol=0, atol=0)


def test_crash_between_renames_is_recovered(tmp_path: Path) -> None:
    kw = {"input_shape": (1, 8, 8), "mean": [0.0], "std": [1.0]}
    old = create_model("mlp", input_size=8, hidden=[4])
    _save(old, tmp_path / "m", **kw)
    os.replace(tmp_path / "m", tmp_path / ".m.old")  # the state after the first rename
    loaded, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(loaded.state_dict(), old.state_dict(), rtol=0, atol=0)
    new = create_model("mlp", input_size=8, hidden=[4])
    _save(new, tmp_path / "m", **kw)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_tied_weights_are_saved_once_and_retied(tmp_path: Path) -> None:
    model = create_model("mlp", input_size=2, in_channels=1, hidden=[4], num_classes=4)
    model.features[1].weight = model.classifier.weight  # both (4, 4): a tied pair
    _save(
        model,
        tmp_path / "t",
        input_shape=(1, 2, 2),
        mean=[0.0],
        std=[1.0],
        class_names=list("abcd"),
    )
    stored = load_file(tmp_path / "t" / "model.safetensors")
    assert len(stored) == len(model.state_dict()) - 1
    card = read_model_card(tmp_path / "t")
    assert card.tied == {"classifier.weight": "features.1.weight"}  # first key is kept
    loaded, _ = load_model(tmp_path / "t")
    torch.testing.assert_close(loaded.features[1].weight, model.classifier.weight)


def test_update_metrics_merges(tmp_path: Path) -> None:
    metrics = {"top1": 0.9, "size_mb": 1.0}
    model = create_model("mlp", input_size=8)
    _save(model, tmp_path / "m", input_shape=(1, 8, 8), mean=0.5, std=0.5, metrics=metrics)
    merged = update_metrics(tmp_path / "m", {"top1": 0.95, "latency_ms": 0.4})
    assert merged == {"top1": 0.95, "size_mb": 1.0, "latency_ms": 0.4}
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == merged
    with pytest.raises(ModelLoadError, match="does not exist"):
        update_metrics(tmp_path / "nothing", {"a": 1})


def test_corrupt_weights_file(tmp_path: Path) -> None:
    out = _save(create_model("resnet20", in_channels=3, input_size=32), tmp_path / "r")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is corrupt or truncated"):
        load_model(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is missing from"):
        load_model(out)


def test_running_out_of_memory_while_loading_is_not_called_corruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a sound model was reported as "corrupt or truncated; restore it or re-save the model"
    # (and config.json as "malformed") when memory ran out while reading it
    import safetensors.torch

    import slimtorch.models.registry as registry

    out = _save(create_model("lenet5", in_channels=3, input_size=32), tmp_path / "l")

    def no_memory(*args: object, **kwargs: object) -> None:
        raise safetensors.SafetensorError("Error while deserializing: Cannot allocate memory "
                                          "(os error 12)")  # fmt: skip

    with monkeypatch.context() as mp:
        mp.setattr(safetensors.torch, "load_file", no_memory)
        with pytest.raises(MemoryError, match=r"out of memory reading .*model\.safetensors"):
            load_model(out)
    with monkeypatch.context() as mp:
        mp.setattr(registry, "create_model", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
        with pytest.raises(MemoryError):
            load_model(out)
    assert load_model(out)[1].architecture["name"] == "lenet5"  # and nothing was changed


def test_missing_or_bad_config(tmp_path: Path) -> None:
    out = _save(create_model("lenet5", in_channels=3, input_size=32), tmp_path / "l")
    (out / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json is unreadable or not valid JSON"):
        load_model(out)
    (out / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json is missing from"):
        load_model(out)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "absent")


def test_mismatched_weights_are_listed(tmp_path: Path) -> None:
    out = _save(create_model("lenet5", in_channels=3, input_size=32), tmp_path / "l")
    tensors = load_file(out / "model.safetensors")
    tensors["fc2.weight"] = torch.zeros(80, 120)
    del tensors["fc1.bias"]
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(ModelLoadError, match="do not fit") as info:
        load_model(out)
    msg = str(info.value)
    assert "missing keys: fc1.bias" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "fc2.weight: saved (80, 120)" in msg


def test_a_card_whose_image_size_the_model_cannot_take_is_refused(tmp_path: Path) -> None:
    out = _save(create_model("lenet5", in_channels=3, input_size=32), tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["input_shape"] = [3, 28, 28]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match=r"input_shape \(3, 28, 28\) does not fit lenet5's layers"
    ):
        load_model(out)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile imports torch.jit
def test_a_compiled_model_is_named_as_such(tmp_path: Path) -> None:
    compiled = torch.compile(create_model("lenet5", in_channels=3, input_size=32))
    with pytest.raises(TypeError, match=r"torch\.compile wrapper; save the model it wraps"):
        _save(compiled, tmp_path / "a")


def test_a_size_agnostic_architecture_takes_other_image_sizes(tmp_path: Path) -> None:
    model = create_model("resnet20", in_channels=3)  # built for the default 28, runs at 32
    _save(model, tmp_path / "r", input_shape=(3, 32, 32))
    loaded, card = load_model(tmp_path / "r")
    assert card.input_shape == (3, 32, 32) and loaded(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_save_argument_checks(tmp_path: Path) -> None:
    model = create_model("lenet5", in_channels=3, input_size=32)
    with pytest.raises(ValueError, match="input_shape has 1 channels but the model"):
        _save(model, tmp_path / "a", input_shape=(1, 32, 32))
    with pytest.raises(ValueError, match=r"\(3, 28, 28\) does not fit lenet5's layers as built"):
        _save(model, tmp_path / "a", input_shape=(3, 28, 28))
    with pytest.raises(ValueError, match="mean must be 1 or 3 numbers"):
        _save(model, tmp_path / "a", mean=[0.1, 0.2])
    with pytest.raises(ValueError, match="std must be > 0"):
        _save(model, tmp_path / "a", std=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="9 class_names given but the model has num_classes=10"):
        _save(model, tmp_path / "a", class_names=NAMES[:9])
    with pytest.raises(ValueError, match="has no slimtorch_arch record"):
        _save(nn.Linear(2, 2), tmp_path / "a")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a slimtorch model directory"):
        _save(model, tmp_path / "user")
    assert (tmp_path / "user" / "notes.txt").read_text() == "keep me"


def test_bad_device_string(tmp_path: Path) -> None:
    out = _save(create_model("lenet5", in_channels=3, input_size=32), tmp_path / "l")
    with pytest.raises(ValueError, match="invalid device 'gpu0'; expected 'auto', 'cpu'"):
        load_model(out, device="gpu0")


@pytest.mark.gpu
def test_load_onto_cuda_matches_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare true float32
    model = _trained_like(create_model("resnet20", in_channels=3, input_size=32))
    out = _save(model, tmp_path / "r")
    loaded, _ = load_model(out, device="cuda")
    assert next(loaded.parameters()).is_cuda
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x.cuda()).cpu(), model(x), rtol=1e-3, atol=1e-3)


def test_a_half_model_with_float32_batch_norms_loads_as_saved(tmp_path: Path) -> None:
    model = create_model("resnet20", in_channels=1, input_size=28).eval().half()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.float()  # batch norms kept in float32, by hand
    path = save_model(model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.5], std=[0.5],
                      class_names=list("0123456789"))  # fmt: skip
    loaded, card = load_model(path)
    assert card.dtype == "mixed"
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), key


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_load_model_names_a_device_that_is_not_here(tmp_path: Path) -> None:
    path = save_model(create_model("lenet5", in_channels=1, input_size=28), tmp_path / "m",
                      input_shape=(1, 28, 28), mean=[0.5], std=[0.5],
                      class_names=list("0123456789"))  # fmt: skip
    with pytest.raises(ValueError, match="device 'cuda' asked for a CUDA/ROCm GPU but"):
        load_model(path, device="cuda")


class _ValueBranch(nn.Module):
    """Branches on its input's values and builds a tensor on the CPU: neither runs on meta."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, num_classes), nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x - torch.full((1, 3, 2, 2), 0.1), 1)
        return self.a(x) if x.mean() > 0 else self.b(x)


def test_a_forward_that_needs_values_saves_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the input-shape check ran the forward on the meta device and called every failure a shape
    # misfit: such a model could not be saved, nor loaded once its forward gained the branch
    from slimtorch.models import MODELS, register_model

    monkeypatch.setattr(MODELS, "_items", dict(MODELS._items))

    @register_model("test-only-value-branch")
    def build(*, num_classes: int = 10, in_channels: int = 3, input_size: int = 2) -> nn.Module:
        return _ValueBranch(num_classes)

    model = create_model("test-only-value-branch", in_channels=3, input_size=2).eval()
    path = _save(model, tmp_path / "m", input_shape=(3, 2, 2))
    loaded, _ = load_model(path)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_saved_in_half_takes_float32_inputs(tmp_path: Path, dtype: torch.dtype) -> None:
    # eval, compress and export fed it float32 batches and failed with a raw dtype clash
    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, input_size=28).to(dtype).eval()
    path = _save(model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.3], std=[0.3])
    loaded, card = load_model(path)
    assert card.dtype == str(dtype).removeprefix("torch.")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x.to(dtype)), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x.to(dtype)), model(x.to(dtype)), rtol=0, atol=0)
        assert loaded.float()(x).dtype == torch.float32  # cast back, it takes float32 as is


def test_a_channels_last_model_loads_channels_last(tmp_path: Path) -> None:
    # the file holds NCHW tensors; load_model returned NCHW weights whatever layout the model
    # was trained and saved in, so each convolution paid a layout conversion per call
    model = create_model("resnet20", in_channels=3, input_size=32).to(
        memory_format=torch.channels_last
    )
    out = _save(model, tmp_path / "cl")
    loaded, card = load_model(out)
    assert card.memory_format == "channels_last"
    conv = loaded.get_submodule("layer1.0.conv1").weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    _, card = load_model(_save(create_model("lenet5", in_channels=3, input_size=32),
                                   tmp_path / "nchw"))  # fmt: skip
    assert card.memory_format == "contiguous"
    assert "memory_format" not in json.loads((tmp_path / "nchw" / "config.json").read_text())


def test_loads_wait_for_a_save_in_progress(tmp_path: Path) -> None:
    # a load read config.json from one save and the weights from another (3.7% of loads beside
    # a saving process), and two saves undid each other's swap (21% of them failed)
    import threading

    from slimtorch.core.io import folder_lock
    from slimtorch.models import read_model_card

    net = create_model("mlp", in_channels=1, input_size=8)
    save_model(net, tmp_path / "m", input_shape=(1, 8, 8), mean=[0.5], std=[0.5],
               class_names=list("0123456789"))  # fmt: skip
    done = threading.Event()

    def read() -> None:
        read_model_card(tmp_path / "m")
        load_model(tmp_path / "m")
        done.set()

    with folder_lock(tmp_path / "m", shared=False):  # as save_model holds it over its swap
        reader = threading.Thread(target=read)
        reader.start()
        assert not done.wait(0.5)
    assert done.wait(30)
    reader.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no lock file left behind
