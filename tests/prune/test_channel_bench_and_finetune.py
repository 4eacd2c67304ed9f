"""The benchmark script runs end to end on CPU, and prune-then-fine-tune saves a working model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from slimtorch.data import DeviceLoader, load_dataset
from slimtorch.models import create_model, load_model, save_model
from slimtorch.prune.channel import ChannelPruneConfig, channel_prune_model, prune_and_finetune
from slimtorch.train import TrainConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread: the machines running the suite are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_channel_prune.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_channel_prune", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_script_smoke(tmp_path: Path, capsys) -> None:
    bench = _bench_module()
    out = tmp_path / "bench.json"
    argv = ["--model", "lenet5", "--in-channels", "1", "--input-size", "28", "--ratios", "0.5"]
    argv += ["--batches", "1,4", "--threads", "1", "--repeats", "1", "--warmup", "1"]
    argv += ["--min-time", "0", "--rounds", "1", "--out", str(out)]
    result = bench.main(argv)
    saved = json.loads(out.read_text())
    assert saved["variants"] == json.loads(json.dumps(result["variants"]))
    keys = [v["key"] for v in saved["variants"]]
    assert keys == ["r0.5-round8", "r0.5-round1"]
    for v in saved["variants"]:
        assert 0 < v["mac_ratio"] < 1 and 0 < v["params_ratio"] < 1
        assert set(v["speedup"]) == {"1", "4"} and all(s > 0 for s in v["speedup"].values())
    # rounding keeps more channels here (fc2: 42 -> 40, but fc1 60 -> 64 and conv 8 -> 8)
    assert saved["variants"][0]["params_ratio"] != saved["variants"][1]["params_ratio"]
    assert saved["threads"] == 1 and saved["device"] == "cpu"
    assert "r0.5-round8" in capsys.readouterr().out


def test_channel_prune_model_fine_tunes(shared_data: Path) -> None:
    test = load_dataset("mnist", "test", root=shared_data / "mnist", download=False)
    loader = DeviceLoader(test, 64)
    model = create_model("mlp", num_classes=10, in_channels=1, input_size=28, hidden=(64,))
    x = next(iter(loader))[0][:4]
    cfg = TrainConfig(epochs=1, lr=0.05, progress=False, eval_every_epochs=0)
    head = [next(iter(loader))]  # one batch is enough to exercise the loop
    res = channel_prune_model(
        model, ChannelPruneConfig(ratio=0.5), x, finetune=cfg, train_loader=head
    )
    assert model.features[1].out_features == 32
    assert res.history is not None and res.report.pruned


def test_prune_and_finetune_saves_a_model_dir(shared_data: Path, tmp_path: Path) -> None:
    model = create_model("lenet5", num_classes=10, in_channels=1, input_size=28)
    save_model(
        model,
        tmp_path / "base",
        input_shape=(1, 28, 28),
        mean=[0.1307],
        std=[0.3081],
        class_names=[str(i) for i in range(10)],
        extra={"dataset": "mnist"},
    )
    run = prune_and_finetune(
        tmp_path / "base",
        tmp_path / "run",
        ChannelPruneConfig(ratio=0.5),
        finetune=TrainConfig(epochs=1, lr=0.05, progress=False),
        data_root=shared_data / "mnist",
        batch_size=64,
        train_limit=256,
        test_limit=256,
    )
    summary = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(summary["accuracy"]) == {"before", "after_prune", "after_finetune"}
    assert summary["pruning"]["totals"]["params_ratio"] < 0.5
    assert run.history is not None and run.model_dir == tmp_path / "run" / "model"
    loaded, card = load_model(run.model_dir)
    assert card.extra["method"] == "channel-prune" and loaded.fc1.out_features == 64
    x = torch.randn(3, 1, 28, 28)
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), run.model(x))
