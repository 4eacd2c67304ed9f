"""The fused-Tucker benchmark script runs end to end on saved models and the real test files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from script_helpers import load_script
from slimtorch.decompose import TuckerConfig, decompose_
from slimtorch.models import create_model, save_model


def test_bench_fused_tucker_smoke(tmp_path: Path, shared_data: Path, capsys) -> None:
    card = {"input_shape": (1, 28, 28), "mean": [0.286], "std": [0.353],
            "class_names": [str(i) for i in range(10)]}  # fmt: skip
    base = create_model("resnet20", in_channels=1, input_size=28).eval()
    base_dir = save_model(base, tmp_path / "base", **card)
    decompose_(base, TuckerConfig(rank=0.25), include=["layer*"], exclude=["*shortcut*"])
    comp_dir = save_model(base, tmp_path / "tucker", **card)
    out = tmp_path / "fused.json"
    bench = load_script("bench_fused_tucker")
    argv = ["--base", str(base_dir), "--compressed", str(comp_dir), "--data", str(shared_data)]
    assert (
        bench.main(
            [*argv, "--batches", "2", "--rounds", "1", "--test-images", "500", "--out", str(out)]
        )
        == 0
    )
    saved = json.loads(out.read_text())
    entry = saved["compressed"][0]
    assert entry["accuracy_fused"] == entry["accuracy"]  # the same model, another kernel
    assert entry["flops"] < saved["base"]["flops"]
    ms = entry["latency_ms"]["b2"]["ms"]
    assert set(ms) == {"dense", "dense-folded-cl", "tucker-cl", "fused"}
    assert all(v > 0 for v in ms.values())
    assert "batch 2" in capsys.readouterr().out


@pytest.mark.gpu
def test_bench_fused_tucker_on_cuda_with_graphs(tmp_path: Path, shared_data: Path) -> None:
    card = {"input_shape": (1, 28, 28), "mean": [0.286], "std": [0.353],
            "class_names": [str(i) for i in range(10)]}  # fmt: skip
    base = create_model("resnet20", in_channels=1, input_size=28).eval()
    base_dir = save_model(base, tmp_path / "base", **card)
    decompose_(base, TuckerConfig(rank=0.25), include=["layer*"], exclude=["*shortcut*"])
    comp_dir = save_model(base, tmp_path / "tucker", **card)
    out = tmp_path / "fused.json"
    argv = ["--base", str(base_dir), "--compressed", str(comp_dir), "--data", str(shared_data),
            "--device", "cuda", "--graphs", "--batches", "2", "--rounds", "1",
            "--test-images", "500", "--out", str(out)]  # fmt: skip
    assert load_script("bench_fused_tucker").main(argv) == 0
    saved = json.loads(out.read_text())
    assert saved["kernel"].startswith("available")
    ms = saved["compressed"][0]["latency_ms"]["b2"]["ms"]
    assert {"fused+graph", "dense-folded-cl+graph"} <= set(ms)
    assert all(v > 0 for v in ms.values())
