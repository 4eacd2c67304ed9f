"""The data-parallel benchmark script: its checks, and one end-to-end run on CPU (gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from script_helpers import load_script


def _bench():
    return load_script("bench_ddp")


def test_bench_refuses_settings_it_cannot_measure(tmp_path: Path, capsys) -> None:
    bench = _bench()
    base = [
        "--model",
        "mlp",
        "--dataset",
        "digits",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit):
        bench.main([*base, "--world-sizes", "2"])  # nothing to compare against
    assert "must include 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main([*base, "--world-sizes", "1,3", "--parity-epochs", "1", "--parity-batch", "64"])
    assert "does not split" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main([*base, "--per-rank-batches", "0"])
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_bench_runs_one_and_two_gloo_ranks(tmp_path: Path) -> None:
    bench = _bench()
    out = tmp_path / "ddp.json"
    argv = ["--model", "mlp", "--dataset", "digits", "--device", "cpu", "--world-sizes", "1,2"]
    argv += ["--per-rank-batches", "32", "--epochs", "2", "--threads", "1"]
    argv += ["--parity-epochs", "2", "--parity-batch", "64", "--seeds", "0", "--out", str(out)]
    assert bench.main(argv) == 0
    saved = json.loads(out.read_text())
    rows = {r["world_size"]: r for r in saved["throughput"]}
    assert rows[1]["ddp"] is False and rows[1]["speedup"] == pytest.approx(1.0)
    assert rows[2]["ddp"] is True and rows[2]["ranks_consistent"] is True
    assert rows[2]["images_per_s_median"] > 0 and len(rows[2]["images_per_s"]) == 2
    parity = {r["world_size"]: r for r in saved["parity"]}
    # the same global batch and seed: the same model up to float rounding
    assert abs(parity[1]["test_accuracy"] - parity[2]["test_accuracy"]) < 0.01
