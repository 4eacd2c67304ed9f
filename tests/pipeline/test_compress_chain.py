"""A compress run whose input an earlier run pruned: the zeros and the sizes carry over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimtorch.models import load_model
from slimtorch.pipeline import compress_run
from slimtorch.prune.buffers import masked_params
from slimtorch.train import TrainConfig
from slimtorch.train.classifier import train_classifier


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("chain")
    cfg = TrainConfig(epochs=4, lr=0.05, progress=False)
    train_classifier(model="lenet5", dataset="digits", out_dir=base / "base", train_config=cfg)
    _run(base / "base", base / "pruned", "prune", {"sparsity": 0.7, "sparse_check": False})
    return base / "pruned"


def _run(src: Path, out: Path, method: str, options: dict[str, object]) -> dict[str, object]:
    compress_run(in_dir=src, out_dir=out, method=method, method_options=options,
                 finetune=TrainConfig(epochs=1, lr=0.01, progress=False), batch_size=64,
                 profile_batch=4, profiles=(), threads=1)  # fmt: skip
    return json.loads((out / "report.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize(("method", "options"), [("svd", {"rank": 0.5}), ("channel-prune", {})])
def test_the_next_method_keeps_a_pruned_models_zeros_and_reports_its_size(
    pruned: Path, tmp_path: Path, method: str, options: dict[str, object]
) -> None:
    # the fine-tune after svd or channel-prune regrew every pruned weight of the layers it kept,
    # with the old masks still stored; and "before" was the dense file, not the compact one the
    # pruning run reported as its "after"
    first = json.loads((pruned / "report.json").read_text())
    report = _run(pruned, tmp_path / method, method, options)
    model, _ = load_model(tmp_path / method / "model")
    masked = list(masked_params(model))
    assert masked
    for _, p, mask in masked:
        assert int((p.detach()[~mask] != 0).sum()) == 0
    assert report["saved_bytes"]["before"] == first["saved_bytes"]["after"]  # type: ignore[index]
    assert "compact file" in report["verdict"]["text"]  # type: ignore[index]
    assert torch.isfinite(torch.tensor(report["accuracy"]["after_finetune"]))  # type: ignore[index]


def test_a_run_whose_model_save_was_interrupted_is_read_from_its_copy(
    pruned: Path, tmp_path: Path
) -> None:
    # between save_model's two renames only model/'s copy .model.old exists; eval, export and
    # profile read it, while compress and a --teacher refused the run as having no config.json
    import shutil

    from slimtorch.distill.teacher import load_teacher

    run = tmp_path / "run"
    shutil.copytree(pruned, run)
    (run / "model").rename(run / ".model.old")
    _run(run, tmp_path / "next", "fold-bn", {})
    assert (tmp_path / "next" / "model" / "config.json").is_file()
    teacher = load_teacher(run, input_shape=(1, 8, 8), num_classes=10)
    assert not teacher.training


def test_a_run_that_fails_after_its_model_landed_leaves_no_report_of_the_replaced_one(
    pruned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a full disk while writing the report left the new model beside the replaced prune run's
    # report.json, checkpoint and compact file, which described another model
    import errno
    import shutil

    import slimtorch.pipeline.compress as compress

    run = tmp_path / "run"
    shutil.copytree(pruned, run)
    assert (run / "model.compact.safetensors").is_file() and (run / "checkpoint.pt").is_file()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compress, "atomic_write_json", full)
    with pytest.raises(OSError, match="No space left"):
        compress_run(in_dir=pruned, out_dir=run, method="fold-bn", profile_batch=4, profiles=(),
                     threads=1)  # fmt: skip
    assert load_model(run / "model")[1].extra["method"] == "fold-bn"  # the new model landed
    left = sorted(p.name for p in run.iterdir())
    assert left == ["model"], left


def test_an_interrupt_after_the_models_swap_leaves_no_report_of_the_replaced_one(
    pruned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a Ctrl-C while save_model removed the replaced model's copy (after the new model had
    # landed) left the new model beside the prune run's report, checkpoint and compact file
    import shutil

    import slimtorch.models.io as model_io

    run = tmp_path / "run"
    shutil.copytree(pruned, run)
    real_rmtree = shutil.rmtree

    def interrupted(path: object, *args: object, **kwargs: object) -> None:
        if Path(str(path)).name == ".model.old":
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model_io.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress_run(in_dir=pruned, out_dir=run, method="fold-bn", profile_batch=4, profiles=(),
                     threads=1)  # fmt: skip
    monkeypatch.setattr(model_io.shutil, "rmtree", real_rmtree)
    assert load_model(run / "model")[1].extra["method"] == "fold-bn"  # the new model landed
    assert not (run / "report.json").exists() and not (run / "checkpoint.pt").exists()


def test_the_seed_decides_the_calibration_without_fine_tuning_and_is_recorded(
    pruned: Path,
) -> None:
    # with no fine-tune the seed was taken from a missing TrainConfig (always 0): ptq with
    # seed 7 calibrated on the same batches as seed 0, and no seed was recorded anywhere;
    # the model's config.json carried the source model's training config as its own
    base = pruned.parent / "base"

    def scales(seed: int) -> tuple[dict[str, object], list[float]]:
        options = {"calibration_batches": 1, "runtime_check": False}
        result = compress_run(in_dir=base, out_dir=None, method="ptq", method_options=options,
                              seed=seed, batch_size=16, profile_batch=4, profiles=(),
                              threads=1)  # fmt: skip
        layers = result.model.modules()
        return result.report, [m.input_scale for m in layers if hasattr(m, "input_scale")]

    report0, s0 = scales(0)
    report7, s7 = scales(7)
    assert report0["seed"] == 0 and report7["seed"] == 7 and report0["batch_size"] == 16
    assert s0 != s7 and s0 == scales(0)[1]
    with pytest.raises(ValueError, match=r"seed=7 differs from finetune\.seed=0"):
        compress_run(in_dir=base, out_dir=None, method="ptq", seed=7,
                     finetune=TrainConfig(epochs=1, progress=False))  # fmt: skip
    card = load_model(pruned / "model")[1]
    assert card.extra["method"] == "prune" and card.extra["batch_size"] == 64
    assert card.extra["finetune"]["epochs"] == 1 and "train_config" not in card.extra
    assert card.extra["source"]["train_config"]["epochs"] == 4  # the base model's training
