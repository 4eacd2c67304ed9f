"""CLI: ``train --sparse`` and ``compress --method prune|nm`` on the bundled digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimtorch.cli.main import main
from slimtorch.models import load_model


def _linear_sparsity(model: torch.nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def test_train_rigl_then_prune_and_nm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rigl"
    code = main(
        ["train", "--model", "mlp", "--dataset", "digits", "--epochs", "2", "--batch-size", "64",
         "--lr", "0.05", "--out", str(out), "--no-progress", "--device", "cpu",
         "--sparse", "rigl", "--sparsity", "0.8", "--delta-t", "5"]
    )  # fmt: skip
    assert code == 0
    sparse = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sparse"]
    # 2 epochs of 23 steps, updates every 5 steps until 0.75 of them: steps 5, 10, ..., 30
    assert sparse["method"] == "rigl" and sparse["mask_updates"] == 6
    assert sparse["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert 0.2 < sparse["explored"] <= 1.0  # the masks moved beyond the first 20%
    model, _ = load_model(out / "model")
    assert _linear_sparsity(model) == pytest.approx(0.8, abs=0.01)  # ERK: exact total
    assert any(k.endswith("weight_mask") for k in model.state_dict())

    base = tmp_path / "dense"
    assert main(["train", "--model", "mlp", "--dataset", "digits", "--epochs", "2",
                 "--out", str(base), "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
    capsys.readouterr()
    pruned = tmp_path / "p"
    code = main(
        ["compress", "--in", str(base), "--out", str(pruned), "--method", "prune",
         "--sparsity", "0.75", "--scope", "global", "--finetune-epochs", "1", "--batch-size", "64",
         "--device", "cpu", "--profile-batch", "4", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "compact file:" in text and "smaller than the original model's weights file" in text
    report = json.loads((pruned / "report.json").read_text())
    # the ratio is against the model before pruning, not the pruned one with its masks
    compact, original = (
        report["finish"]["storage"]["compact_bytes"],
        report["saved_bytes"]["before"],
    )
    assert compact == (pruned / "model.compact.safetensors").stat().st_size  # header included
    assert f"{original / compact:.2f}x smaller" in text
    assert report["verdict"]["size_what"] == "compact file"
    assert report["verdict"]["size_ratio"] == pytest.approx(compact / original)
    assert report["config"]["sparsity"] == 0.75 and report["config"]["scope"] == "global"

    code = main(
        ["compress", "--in", str(base), "--out", str(tmp_path / "nm"), "--method", "nm",
         "--set", "n=1", "--set", "m=4", "--finetune-epochs", "0", "--device", "cpu",
         "--profile-batch", "4", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "nm" / "report.json").read_text())["config"] == {
        "n": 1,
        "m": 4,
        "sparse_check": True,
    }

    capsys.readouterr()
    code = main(
        ["compress", "--in", str(base), "--out", str(tmp_path / "cp"), "--method",
         "channel-prune", "--ratio", "0.5", "--finetune-epochs", "0", "--device", "cpu",
         "--profile-batch", "4", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert "channel groups changed: 2 of 3" in capsys.readouterr().out  # classifier is fixed


def test_a_network_without_norms_trains_at_90_percent(tmp_path: Path) -> None:
    """lenet5 has no batch norm: at 90% sparsity with its dense initial weights it stayed at
    chance; each unit's weights scaled to its sparse fan-in, it learns."""
    args = ["train", "--model", "lenet5", "--dataset", "digits", "--epochs", "12",
            "--batch-size", "64", "--lr", "0.05", "--no-progress", "--device", "cpu",
            "--sparse", "rigl", "--sparsity", "0.9"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "r")]) == 0
    metrics = json.loads((tmp_path / "r" / "model" / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.6, metrics


def test_compress_option_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compress", "--in", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main([*args, "--method", "prune", "--rank", "0.5"]) == 2
    assert "--rank applies to svd, tucker, cp, tt, not prune" in capsys.readouterr().err
    assert main([*args, "--method", "nm", "--set", "n"]) == 2
    assert "--set expects KEY=VALUE, got 'n'" in capsys.readouterr().err


def test_the_summary_of_fixed_masks_gives_their_density_as_explored() -> None:
    from types import SimpleNamespace

    from slimtorch.cli.train_cmd import _sparse_record
    from slimtorch.sparse import SparseTrainingConfig, StaticSparse

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    cb = StaticSparse(SparseTrainingConfig(sparsity=0.75, distribution="uniform"))
    cb.init_masks_(net)
    record = _sparse_record([cb], SimpleNamespace(model=net))
    assert record == {
        "sparse": {"method": "static", "sparsity": 0.75, "mask_updates": 0, "explored": 0.25}
    }
    assert _sparse_record([], SimpleNamespace()) == {}
