"""compress_run with the pruning methods: masks kept through fine-tuning, compact file written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimtorch.models import load_model
from slimtorch.pipeline import compress_run
from slimtorch.pipeline.methods import COMPACT_FILE
from slimtorch.prune import load_compact
from slimtorch.train import TrainConfig
from slimtorch.train.classifier import train_classifier


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base")
    cfg = TrainConfig(epochs=6, lr=0.05, progress=False)
    run = train_classifier(
        model="mlp", dataset="digits", out_dir=out, train_config=cfg, batch_size=64
    )
    assert run.test_metrics["accuracy"] > 0.85
    return out


def _weight_sparsity(model: torch.nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


@pytest.mark.parametrize("gradual", [False, True])
def test_prune_reaches_exact_global_sparsity_after_finetune(
    trained: Path, tmp_path: Path, gradual: bool
) -> None:
    out = tmp_path / "p"
    res = compress_run(
        in_dir=trained,
        out_dir=out,
        method="prune",
        method_options={"sparsity": 0.8, "scope": "global", "gradual": gradual},
        finetune=TrainConfig(epochs=3, lr=0.01, progress=False),
        batch_size=64,
        profile_batch=8,
        threads=1,
    )
    assert _weight_sparsity(res.model) == pytest.approx(0.8, abs=1e-3)
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["gradual"] is gradual and report["history"] is not None
    assert report["accuracy"]["after_finetune"] > 0.8
    # the layer report is the saved model's, also when it was reached gradually
    totals = report["layers"]["totals"]
    assert totals["sparsity"] == pytest.approx(0.8, abs=1e-3) and totals["zeros_before"] == 0
    storage = report["finish"]["storage"]
    assert storage["compact_bytes"] < storage["dense_bytes"] / 2.5
    # sparse kernels timed on this device: each layer measured, the model checked if swapped
    sparse = report["finish"]["sparse_kernels"]
    assert sparse["device"] == "cpu" and sparse["batch"] == 8 and sparse["timed_layers"] == 3
    assert all(
        r["choice"] in ("csr", "bsr") and r["speedup"] >= 1.05 for r in sparse["sparse_layers"]
    )
    if sparse["sparse_layers"]:
        assert sparse["model"]["dense_s"] > 0 and sparse["model"]["kept"] is True
    table = (out / "report.txt").read_text()
    assert "sparse kernels" in table
    art = report["artifacts"]
    assert art["compact_file_bytes"] < art["dense_file_bytes"] / 2.5
    # the compact file and the model directory hold the same weights
    model, _ = load_model(out / "model")
    compact = load_compact(out / COMPACT_FILE)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(compact[k].to(v.dtype), v)
    x = torch.randn(3, 1, 8, 8)
    res.model.eval()
    torch.testing.assert_close(model(x), res.model(x))


def test_nm_keeps_two_of_four_through_finetune(trained: Path, tmp_path: Path) -> None:
    res = compress_run(
        in_dir=trained,
        out_dir=None,
        method="nm",
        method_options={"n": 2, "m": 4},
        finetune=TrainConfig(epochs=1, lr=0.01, progress=False),
        batch_size=64,
        profile_batch=8,
        threads=1,
    )
    for row in res.report["layers"]["layers"]:
        if row["action"] == "pruned":
            w = res.model.get_submodule(row["name"]).weight.detach()
            assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    assert res.report["history"] is not None
    # 2:4 runs as a sparse kernel on recent NVIDIA GPUs only: the CPU report says so
    sparse = res.report["finish"]["sparse_kernels"]
    assert any("storage-only" in note for note in sparse["notes"])
    res = compress_run(
        in_dir=trained, out_dir=None, method="nm", method_options={"sparse_check": False},
        profile_batch=2, threads=1, profiles=(),
    )  # fmt: skip
    assert "sparse_kernels" not in res.report["finish"]
    assert res.report["config"]["sparse_check"] is False


def test_option_errors_name_the_field(trained: Path) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        compress_run(in_dir=trained, out_dir=None, method="prune", method_options={"sparsity": 1.2})
    with pytest.raises(ValueError, match="unknown"):
        compress_run(in_dir=trained, out_dir=None, method="nm", method_options={"k": 3})


def test_channel_prune_fine_tunes_saves_and_reloads(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "cp"
    res = compress_run(
        in_dir=trained,
        out_dir=out,
        method="channel-prune",
        method_options={"ratio": 0.5},
        finetune=TrainConfig(epochs=1, lr=0.01, progress=False),
        batch_size=64,
        profile_batch=8,
        threads=1,
    )
    summary = json.loads((out / "report.json").read_text())
    assert set(summary["accuracy"]) == {"before", "after_transform", "after_finetune"}
    assert summary["layers"]["totals"]["params_ratio"] < 0.6
    assert summary["history"] is not None
    loaded, card = load_model(out / "model")
    assert card.extra["method"] == "channel-prune"
    widths = [m.out_features for m in loaded.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [m.out_features for m in res.model.modules() if isinstance(m, torch.nn.Linear)]
    x = torch.randn(3, 1, 8, 8)
    res.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model(x))


def test_only_layers_a_sparse_kernel_ran_on_count_as_timed(trained: Path) -> None:
    res = compress_run(
        in_dir=trained, out_dir=None, method="prune", method_options={"sparsity": 0.9},
        include=["features.1"], profile_batch=8, threads=1, profiles=(),
    )  # fmt: skip
    pruned = [r["name"] for r in res.report["layers"]["layers"] if r["action"] == "pruned"]
    sparse = res.report["finish"]["sparse_kernels"]
    assert pruned == ["features.1"] and sparse["timed_layers"] == 1  # the dense ones untimed
    assert "(1 layers timed" in res.table or "of 1 " in res.table
