"""compress_run end to end on the bundled digits: report, model directory, honest ratios."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from slimtorch.models import load_model
from slimtorch.pipeline import compress_run
from slimtorch.train import TrainConfig
from slimtorch.train.classifier import train_classifier


@pytest.fixture(scope="module")
def trained_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base")
    cfg = TrainConfig(epochs=6, lr=0.05, progress=False)
    run = train_classifier(
        model="mlp", dataset="digits", out_dir=out, train_config=cfg, batch_size=64
    )
    assert run.test_metrics["accuracy"] > 0.85
    return out


def test_svd_compress_writes_loadable_model_and_report(trained_mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "svd"
    res = compress_run(
        in_dir=trained_mlp,
        out_dir=out,
        method="svd",
        rank=0.25,
        finetune=TrainConfig(epochs=2, lr=0.01, progress=False),
        batch_size=64,
        profile_batch=8,
        profiles=("rx580",),
        threads=1,
    )
    report = json.loads((out / "report.json").read_text())
    rows = report["layers"]["layers"]
    done = [r for r in rows if r["action"] == "decomposed"]
    assert done, rows
    # mlp on 8x8: 64->256->128->10; rank 0.25 of the 256x64 layer is 16: 16*(64+256) params
    first = next(r for r in done if r["params_before"] == 64 * 256 + 256)
    assert first["params_after"] == 16 * (64 + 256) + 256
    assert report["after"]["params"] < report["before"]["params"]
    assert set(report["accuracy"]) == {"before", "after_transform", "after_finetune"}
    acc = report["accuracy"]
    # rank 0.25 costs accuracy; two fine-tuning epochs win much of it back (~0.68 -> ~0.83)
    assert acc["after_finetune"] > max(0.75, acc["after_transform"] + 0.03)
    assert "test accuracy (%)" in res.table and "est. rx580 (ms)" in res.table
    assert "latency cpu (ms)" in res.table  # the measured figure is always shown
    # ... as the two models timed side by side at the end, not two profiles minutes apart
    side = report["latency_side_by_side"]
    assert side["before_s"] > 0 and side["after_s"] > 0 and side["source"] == "measured:cpu"
    assert side["speedup"] == pytest.approx(side["before_s"] / side["after_s"])
    row = next(line for line in res.table.splitlines() if line.startswith("latency cpu (ms)"))
    assert row.split()[3:5] == [f"{side['before_s'] * 1e3:.3f}", f"{side['after_s'] * 1e3:.3f}"]
    assert "measured side by side in alternating rounds" in res.table
    # peak memory likewise: five alternating readings each, the medians in the table
    mem = side["memory"]
    assert mem["rounds"] == 5 and len(mem["samples"]["before"]) == len(mem["samples"]["after"]) == 5
    assert mem["before_bytes"] == sorted(mem["samples"]["before"])[2]
    row = next(line for line in res.table.splitlines() if line.startswith("peak memory (MB)"))
    b, a = mem["before_bytes"] / 1e6, mem["after_bytes"] / 1e6
    assert row.split()[3:5] == [f"{b:.3f}", f"{a:.3f}"]
    assert row.split()[5].startswith("~") == mem["overlap"]
    saved = next(line for line in res.table.splitlines() if line.startswith("saved (MB)"))
    lines = res.table.splitlines()
    assert lines.index(saved) == 1 + next(i for i, x in enumerate(lines) if x.startswith("size"))
    # the verdict closes the table and is built from the same side-by-side timing
    verdict = report["verdict"]
    assert res.table.splitlines()[-1] == verdict["text"]
    assert verdict["headline"].startswith("smaller")  # 0.25 rank: far fewer bytes
    # the size is the weights files', headers included: the written file has it to the byte
    sizes = report["saved_bytes"]
    assert sizes["after"] == (out / "model" / "model.safetensors").stat().st_size
    assert sizes["before"] == (trained_mlp / "model" / "model.safetensors").stat().st_size
    assert verdict["size_ratio"] == pytest.approx(sizes["after"] / sizes["before"])
    first_timing = verdict["speed"][0]
    assert first_timing["speedup"] == pytest.approx(side["speedup"])
    assert first_timing["rounds"] == side["rounds"] == 9
    assert 0 <= first_timing["faster_rounds"] <= 9
    assert verdict["accuracy_points"] == pytest.approx(
        100 * (acc["after_finetune"] - acc["before"])
    )

    model, card = load_model(out / "model")
    x = torch.randn(4, 1, 8, 8)
    res.model.eval()
    torch.testing.assert_close(model(x), res.model(x))
    assert card.extra["method"] == "svd" and card.extra["dataset"] == "digits"


def test_unknown_method_and_bad_rank(trained_mlp: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown compression method 'qr'; valid choices: .*svd"):
        compress_run(in_dir=trained_mlp, out_dir=None, method="qr", rank=0.5)
    with pytest.raises(ValueError, match="rank"):
        compress_run(in_dir=trained_mlp, out_dir=None, method="svd", rank=1.5)
    # a batch of zero would measure nothing, after a fine-tune: refused before any work
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="profile_batch must be an int >= 1"):
            compress_run(in_dir=trained_mlp, out_dir=None, method="svd", profile_batch=bad)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        compress_run(in_dir=trained_mlp, out_dir=None, method="svd", batch_size=0)


def test_another_dataset_than_the_recorded_one_is_named_in_a_warning(
    trained_mlp: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="slimtorch.pipeline.compress"):
        compress_run(
            in_dir=trained_mlp, out_dir=None, method="svd", rank=0.5, dataset="digits",
            profile_batch=2, profiles=(), threads=1,
        )  # fmt: skip
    assert "trained on" not in caplog.text  # the recorded dataset: nothing to say
    # a model that records another dataset of the same image shape is measured as asked, named
    other = tmp_path / "other"
    shutil.copytree(trained_mlp / "model", other)
    card = json.loads((other / "config.json").read_text())
    card["extra"]["dataset"] = "kmnist-8x8"
    (other / "config.json").write_text(json.dumps(card))
    with caplog.at_level("WARNING", logger="slimtorch.pipeline.compress"):
        compress_run(
            in_dir=other, out_dir=None, method="svd", rank=0.5, dataset="digits",
            profile_batch=2, profiles=(), threads=1,
        )  # fmt: skip
    assert "was trained on kmnist-8x8; measuring and fine-tuning it on digits" in caplog.text
    with pytest.raises(ValueError, match="images are"):  # another shape is refused outright
        compress_run(in_dir=trained_mlp, out_dir=None, method="svd", dataset="mnist")


def test_nothing_factorised_means_no_finetune_and_same_outputs(trained_mlp: Path) -> None:
    """min_speedup far above reach keeps every layer dense: no fine-tuning, identical model."""
    base, _ = load_model(trained_mlp / "model")
    res = compress_run(
        in_dir=trained_mlp,
        out_dir=None,
        method="svd",
        rank=0.25,
        method_options={"min_speedup": 1e6},
        finetune=TrainConfig(epochs=2, progress=False),
        profile_batch=8,
        profiles=("rx580",),
        threads=1,
    )
    assert res.report["history"] is None
    rows = res.report["layers"]["layers"]
    assert rows and all(r["action"] == "skipped" and "not faster" in r["reason"] for r in rows)
    x = torch.randn(5, 1, 8, 8)
    res.model.eval()
    torch.testing.assert_close(res.model(x), base(x))
    assert res.report["accuracy"]["after_finetune"] == res.report["accuracy"]["before"]
    verdict = res.report["verdict"]  # the same model timed twice: no speed claim either way
    assert verdict["size_ratio"] == 1.0
    assert verdict["headline"] == "neither smaller nor faster"
    assert [t["verdict"] for t in verdict["speed"]] == ["unchanged"]
    assert "(no layer changed)" in verdict["text"]


def test_compress_with_distillation_records_config_and_uses_a_frozen_teacher(
    trained_mlp: Path, tmp_path: Path
) -> None:
    from slimtorch.distill import DistillConfig

    out = tmp_path / "svd-kd"
    distill = DistillConfig(temperature=2.0, alpha=0.7)
    res = compress_run(
        in_dir=trained_mlp,
        out_dir=out,
        method="svd",
        rank=0.25,
        finetune=TrainConfig(epochs=2, lr=0.01, progress=False),
        batch_size=64,
        profile_batch=8,
        profiles=("rx580",),
        threads=1,
        distill=distill,
    )
    report = json.loads((out / "report.json").read_text())
    assert report["distill"] == {"temperature": 2.0, "alpha": 0.7, "hints": [], "hint_weight": 1.0}
    assert report["history"] is not None and len(report["history"]["train_loss"]) == 2
    acc = report["accuracy"]
    assert acc["after_finetune"] > max(0.75, acc["after_transform"])
    # the saved model is the student (factorised), not the dense teacher
    assert report["after"]["params"] < report["before"]["params"]
    assert res.report["distill"] == report["distill"]
    with pytest.raises(TypeError, match="distill must be a DistillConfig"):
        compress_run(
            in_dir=trained_mlp, out_dir=None, method="svd", rank=0.25, distill={"alpha": 1}
        )


@pytest.mark.parametrize(
    ("method", "options", "error", "match"),
    [
        ("tucker", {"rank": 2.0}, ValueError, "rank as a fraction"),
        ("prune", {"sparsity": 1.0}, ValueError, r"sparsity must be in \[0.0, 1.0\)"),
        ("prune", {"sparsity": 0.5, "gradual": "yes"}, TypeError, "'gradual' must be true"),
        ("channel-prune", {"ratio": 1.5}, ValueError, "ratio"),
        ("ptq", {"mode": "int3"}, ValueError, "mode"),
        ("qat", {"widen_4bit_activations": 1}, TypeError, "widen_4bit_activations"),
        ("fp16", {"profile": "gtx9999"}, ValueError, "gtx9999"),
        ("bf16", {"check_batches": 0}, ValueError, "check_batches"),
        ("fold-bn", {"rank": 1}, ValueError, "fold-bn takes no options"),
        ("mixed", {"bogus_field": 1}, ValueError, "bogus_field"),
    ],
)
def test_bad_options_fail_before_anything_is_loaded(
    tmp_path: Path, method: str, options: dict, error: type[Exception], match: str
) -> None:
    # The model directory does not exist: the option error must come first, and nothing is
    # written.
    with pytest.raises(error, match=match):
        compress_run(
            in_dir=tmp_path / "missing",
            out_dir=tmp_path / "out",
            method=method,
            method_options=options,
        )
    assert not (tmp_path / "out").exists()


def test_accuracy_guard_keeps_a_model_that_lost_too_much_from_being_written(
    trained_mlp: Path, tmp_path: Path
) -> None:
    kw: dict[str, Any] = dict(
        in_dir=trained_mlp, method="svd", rank=0.02, profile_batch=4, profiles=(), threads=1
    )
    res = compress_run(out_dir=tmp_path / "refused", max_drop=0.0, **kw)
    guard = res.report["accuracy_guard"]
    acc = res.report["accuracy"]
    assert guard["drop_points"] == pytest.approx(100 * (acc["before"] - acc["after_finetune"]))
    assert guard["drop_points"] > 0 and guard["passed"] is False
    assert res.model_dir is None and not (tmp_path / "refused" / "model").exists()
    assert res.report_path == tmp_path / "refused" / "report.json"
    written = json.loads((tmp_path / "refused" / "report.json").read_text())
    assert written["accuracy_guard"] == guard  # the report says why
    ok = compress_run(out_dir=tmp_path / "ok", max_drop=100.0, **kw)
    assert ok.report["accuracy_guard"]["passed"] is True and ok.model_dir is not None
    kept = (tmp_path / "ok" / "report.json").read_bytes()
    again = compress_run(out_dir=tmp_path / "ok", max_drop=0.0, **kw)  # refused, same folder
    assert again.report_path == tmp_path / "ok" / "report.refused.json"
    assert (tmp_path / "ok" / "report.json").read_bytes() == kept  # the model's report stays
    refused = json.loads(again.report_path.read_text())
    assert refused["accuracy_guard"]["passed"] is False
    assert (tmp_path / "ok" / "report.refused.txt").is_file()
    assert compress_run(out_dir=None, **kw).report["accuracy_guard"] is None  # no guard asked
    for bad in (-1.0, "1", True):
        with pytest.raises(ValueError, match="max_drop"):
            compress_run(out_dir=None, max_drop=bad, **kw)


def test_a_refused_fine_tune_leaves_the_earlier_runs_checkpoint_and_history(
    trained_mlp: Path, tmp_path: Path
) -> None:
    kw: dict[str, Any] = dict(
        in_dir=trained_mlp, out_dir=tmp_path / "run", method="svd", rank=0.02, profile_batch=4,
        profiles=(), threads=1, finetune=TrainConfig(epochs=1, lr=0.01, progress=False),
    )  # fmt: skip
    compress_run(max_drop=100.0, **kw)
    run = tmp_path / "run"
    assert not (run / ".finetune").exists()  # the fine-tune's files landed beside the model
    kept = {n: (run / n).read_bytes() for n in ("checkpoint.pt", "history.json")}
    refused = compress_run(max_drop=0.0, **kw)
    assert refused.report["accuracy_guard"]["passed"] is False
    assert {n: (run / n).read_bytes() for n in kept} == kept
    assert (run / "checkpoint.refused.pt").is_file() and (run / "history.refused.json").is_file()


def test_an_interrupted_runs_fine_tune_files_are_not_taken_as_this_runs(
    trained_mlp: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    stage = run / ".finetune"  # what a run killed during its fine-tune leaves
    stage.mkdir(parents=True)
    (stage / "history.json").write_text('{"epochs": 400}')
    (stage / "checkpoint.pt").write_bytes(b"stale")
    res = compress_run(
        in_dir=trained_mlp, out_dir=run, method="svd", rank=0.5, profile_batch=4, profiles=(),
        threads=1, finetune=None,
    )  # fmt: skip
    assert res.model_dir is not None and res.report["history"] is None
    assert not stage.exists()
    assert not (run / "history.json").exists() and not (run / "checkpoint.pt").exists()


def test_compress_without_finetune_leaves_the_callers_generator(trained_mlp: Path) -> None:
    """No fine-tune, no seeding: the run draws nothing from the process's generator (the
    profiling batch comes from a generator of its own)."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    compress_run(in_dir=trained_mlp, out_dir=None, method="svd", rank=0.5, profile_batch=4,
                 threads=1)  # fmt: skip
    assert torch.equal(torch.rand(3), expected)
