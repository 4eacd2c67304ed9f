"""The channel-pruning benchmark script runs end to end on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from script_helpers import load_script


def _bench_module():
    return load_script("bench_channel_prune")


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


def test_bench_cuda_graphs_flag(tmp_path: Path) -> None:
    bench = _bench_module()
    argv = ["--model", "lenet5", "--in-channels", "1", "--input-size", "28", "--ratios", "0.5"]
    argv += ["--batches", "2", "--threads", "1", "--repeats", "1", "--warmup", "1"]
    argv += ["--min-time", "0", "--rounds", "1", "--cuda-graphs"]
    result = bench.main([*argv, "--out", str(tmp_path / "g.json")])  # CPU: runs eagerly
    assert result["cuda_graphs"] is True and result["variants"][0]["speedup"]["2"] > 0
    with pytest.raises(SystemExit):
        bench.main([*argv, "--compile"])  # alternatives, refused by the parser
