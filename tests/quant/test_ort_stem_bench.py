"""The ORT stem A/B script runs end to end on a saved model and the real Fashion-MNIST files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from script_helpers import load_script
from slimtorch.models import create_model, save_model


def test_bench_ort_stem_smoke(tmp_path: Path, shared_data: Path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    model = create_model("resnet20", in_channels=1, input_size=28).eval()
    model_dir = save_model(model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.286],
                           std=[0.353], class_names=[str(i) for i in range(10)])  # fmt: skip
    out = tmp_path / "ab.json"
    bench = load_script("bench_ort_stem")
    argv = ["--model-dir", str(model_dir), "--data", str(shared_data), "--rounds", "1"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    for b in ("b1", "b32"):
        assert set(saved[b]["ms"]) == {"fp32", "int8", "float"}
        assert all(v > 0 for v in saved[b]["ms"].values())
        assert set(saved[b]["speedup"]) == {"int8", "float"}
    assert "float stem" in capsys.readouterr().out
