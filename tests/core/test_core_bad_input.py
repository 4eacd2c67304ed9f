"""Bad input to the core helpers (io, config, profiles, devices, globs, surgery): clear errors."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimtorch.core.config import Config, check_choice
from slimtorch.core.devices import as_device, run_info, synchronize
from slimtorch.core.globs import check_globs
from slimtorch.core.io import atomic_write_json, read_json
from slimtorch.core.profiles import DeviceProfile, dtype_key, get_profile
from slimtorch.core.surgery import set_submodule

_RATES = {"fp32": 1e12, "fp16": 1e12, "bf16": 1e12, "int8": 1e12}
_PROFILE = {
    "name": "bad-input-gpu",
    "description": "a made-up GPU",
    "peak_flops": _RATES,
    "memory_bandwidth": 1e11,
    "memory_bytes": 2**30,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Quant(Config):
    bits: int = 8

    def __post_init__(self) -> None:
        check_choice(self, "bits", self.bits, (4, 8))


def test_numpy_and_torch_numbers_are_saved_as_numbers(tmp_path: Path) -> None:
    cfg = _Quant(bits=np.int64(4))  # type: ignore[arg-type]  # passes check_choice
    cfg.save(tmp_path / "q.json")
    assert json.loads((tmp_path / "q.json").read_text())["config"] == {"bits": 4}
    assert _Quant.load(tmp_path / "q.json") == _Quant(bits=4)
    obj = {"f": np.float32(0.5), "a": np.arange(3), "t": torch.tensor([1.5]), "p": tmp_path}
    assert read_json(atomic_write_json(tmp_path / "o.json", obj)) == {
        "f": 0.5,
        "a": [0, 1, 2],
        "t": [1.5],
        "p": str(tmp_path),
    }


def test_read_json_names_a_binary_file(tmp_path: Path) -> None:
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"bin\.json is not valid JSON \('utf-8' codec"):
        read_json(tmp_path / "bin.json")


def test_load_names_the_file_and_the_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"type": "DeviceProfile", "config": {"name": "x"}}))
    with pytest.raises(
        ValueError,
        match=r"p\.json: DeviceProfile needs key\(s\) description, memory_bandwidth, "
        r"memory_bytes, peak_flops, which are missing",
    ):
        DeviceProfile.load(path)
    path.write_text(
        json.dumps({"type": "DeviceProfile", "config": {**_PROFILE, "int8_dot": "false"}})
    )
    with pytest.raises(ValueError, match=r"p\.json: DeviceProfile.int8_dot must be true or false"):
        DeviceProfile.load(path)
    with pytest.raises(ValueError, match=r"^DeviceProfile needs key\(s\) description, "):
        DeviceProfile.from_dict({"name": "x"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"packed_fp16": "no"}, "DeviceProfile.packed_fp16 must be true or false, got 'no'"),
        ({"tensor_cores": 1}, "DeviceProfile.tensor_cores must be true or false, got 1"),
        ({"memory_bytes": 1.5}, r"DeviceProfile.memory_bytes must be an int, got 1\.5"),
        ({"memory_bytes": float("inf")}, "DeviceProfile.memory_bytes must be an int, got inf"),
        ({"description": None}, "DeviceProfile.description must be a str, got None"),
        ({"source": 3}, "DeviceProfile.source must be a str, got 3"),
        ({"name": "  "}, "DeviceProfile.name must be a non-empty str, got '  '"),
    ],
)
def test_profile_fields_are_typed(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeviceProfile(**{**_PROFILE, **change})  # type: ignore[arg-type]


def test_dtype_key_refuses_what_is_not_a_dtype() -> None:
    for bad in (None, 5, np.float16):
        with pytest.raises(TypeError, match=r"dtype must be a torch.dtype or its name, got"):
            dtype_key(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype or its name"):
        get_profile("rx580").peak_rate(np.float16)  # type: ignore[arg-type]


def test_device_helpers_raise_value_and_type_errors() -> None:
    with pytest.raises(TypeError, match=r"device must be a str or torch.device, got int"):
        as_device(0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"device must be a str or torch.device, got int"):
        synchronize(0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"device must be like 'cpu'.*got 'gpu0'"):
        synchronize("gpu0")
    with pytest.raises(ValueError, match=r"device must be like 'cpu'.*got 'gpu0'"):
        run_info("gpu0", [])
    with pytest.raises(TypeError, match=r"argv must be a list of arguments, got the string"):
        run_info("cpu", "bench.py --x 1")


def test_globs_must_be_a_collection_not_an_iterator() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(TypeError, match=r"include must be a list of glob strings or None, got 5"):
        check_globs(net, 5, None)
    with pytest.raises(
        TypeError, match=r"exclude must be a list of glob strings or None, got <gen"
    ):
        check_globs(net, None, (p for p in ["0"]))
    check_globs(net, ("0",), {"1"})
    with pytest.raises(ValueError, match=r"layers of a model by name, and Linear has none"):
        check_globs(nn.Linear(2, 2), ["*"], None)


def test_set_submodule_checks_types() -> None:
    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"name must be a dotted submodule name \(a str\), got 0"):
        set_submodule(net, 0, nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got list"):
        set_submodule([net], "0", nn.Identity())  # type: ignore[arg-type]
    assert isinstance(net[0], nn.Linear)


def test_hooks_a_replacement_drops_are_named(caplog: pytest.LogCaptureFixture) -> None:
    # a transform that replaced a hooked layer dropped the user's hooks without a word
    from slimtorch.decompose import TuckerConfig, decompose_

    net = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(32, 32, 3)))
    seen: list[int] = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(1))
    net[2][0].register_forward_pre_hook(lambda m, i: None)
    net[2][0].register_forward_pre_hook(lambda m, i: None)
    with caplog.at_level("WARNING", logger="slimtorch.core.surgery"):
        decompose_(net, TuckerConfig(rank=0.5), include=["0"])
        set_submodule(net, "2", nn.Identity())
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2
    assert said[0].startswith("hooks on 0 (1 forward hook) are not carried over to 0's")
    assert said[1].startswith("hooks on 2.0 (2 forward pre hooks) are not carried over to 2's")
    caplog.clear()
    with caplog.at_level("WARNING", logger="slimtorch.core.surgery"):
        set_submodule(net, "1", nn.ReLU())  # nothing hooked: nothing said
    assert not caplog.records


def test_numpy_scalars_in_configs_become_python_numbers() -> None:
    from slimtorch.quant import PTQConfig
    from slimtorch.train import TrainConfig

    cfg = TrainConfig(lr=np.float32(0.5), epochs=np.int64(3), nesterov=np.bool_(False))
    assert (type(cfg.lr), type(cfg.epochs), type(cfg.nesterov)) == (float, int, bool)
    assert json.loads(json.dumps(cfg.to_dict()))["epochs"] == 3
    assert type(PTQConfig(weight_bits=np.int64(8)).weight_bits) is int
    with pytest.raises(ValueError, match=r"TrainConfig\.epochs"):
        TrainConfig(epochs=np.int64(0))  # still validated, as the number it holds


def test_integer_fields_refuse_fractions() -> None:
    from slimtorch.quant import DirectConvConfig, GemmConvConfig

    with pytest.raises(ValueError, match=r"GemmConvConfig\.min_k must be an int in \[1, "):
        GemmConvConfig(min_k=8.5)
    with pytest.raises(ValueError, match=r"DirectConvConfig\.max_taps must be an int in \[1, 4096"):
        DirectConvConfig(max_taps=8.5)


def test_replacements_keep_a_channels_last_model_channels_last() -> None:
    # decomposed and channel-pruned layers came back NCHW inside a channels-last model, so
    # every one of them paid a layout conversion on each call
    from slimtorch.decompose import TuckerConfig, decompose_
    from slimtorch.models import create_model
    from slimtorch.prune import ChannelPruneConfig, prune_channels_

    cl = torch.channels_last
    torch.manual_seed(0)
    base = create_model("resnet20", in_channels=1, input_size=16).eval()
    x = torch.randn(2, 1, 16, 16)
    for transform in (
        lambda m, x: decompose_(m, TuckerConfig(rank=0.5)),
        lambda m, x: prune_channels_(m, ChannelPruneConfig(ratio=0.5), x),
    ):
        laid = copy.deepcopy(base).to(memory_format=cl)
        transform(laid, x.contiguous(memory_format=cl))
        weights = [p for p in laid.parameters() if p.dim() == 4 and p.shape[1] > 1]
        assert weights and all(p.is_contiguous(memory_format=cl) for p in weights)
        plain = copy.deepcopy(laid).to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            torch.testing.assert_close(laid(x), plain(x), atol=1e-5, rtol=1e-5)
