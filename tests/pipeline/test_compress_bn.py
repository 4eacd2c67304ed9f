"""After a short fine-tune, batch-norm statistics must describe the final weights.

A gradual prune to 90% within one fine-tuning epoch removes the last weights in the final steps;
the running statistics (a momentum-0.1 average of earlier steps) then no longer fit, and the
model in eval mode fell to chance (9.7% on the digits) while it was 92% accurate in train mode.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from slimtorch.pipeline.compress import compress_run
from slimtorch.train import TrainConfig
from slimtorch.train.classifier import train_classifier


@pytest.fixture(scope="module")
def trained_resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resnet20-digits")
    cfg = TrainConfig(epochs=5, lr=0.1, progress=False)
    run = train_classifier(model="resnet20", dataset="digits", out_dir=out, train_config=cfg)
    assert run.test_metrics["accuracy"] > 0.9
    return out


def _gradual_prune(base: Path, out: Path | None, recal: int) -> dict:
    return compress_run(
        in_dir=base,
        out_dir=out,
        method="prune",
        method_options={"sparsity": 0.9, "scope": "global", "gradual": True, "sparse_check": False},
        finetune=TrainConfig(epochs=1, lr=0.01, progress=False),
        profile_batch=4,
        profiles=(),
        threads=1,
        bn_recalibration=recal,
    ).report


def test_recalibrated_statistics_keep_a_short_fine_tune_accurate(
    trained_resnet: Path, tmp_path: Path
) -> None:
    stale = _gradual_prune(trained_resnet, None, 0)
    fresh = _gradual_prune(trained_resnet, tmp_path / "p90", 100)
    assert stale["bn_recalibration"] is None
    assert fresh["bn_recalibration"] == {"layers": 21, "batches": 11, "samples": 1408}
    acc = fresh["accuracy"]["after_finetune"]
    # 0.86 with one thread, 0.81 with two (the fine-tune's sums change with the thread count);
    # without recalibration 0.17: the bound tells the two apart with room to spare
    assert acc > 0.7 and acc > stale["accuracy"]["after_finetune"] + 0.3
    with pytest.raises(ValueError, match="bn_recalibration must be an int >= 0"):
        _gradual_prune(trained_resnet, None, -1)


def test_fine_tuning_a_model_whose_batch_norms_were_folded_warns(
    trained_resnet: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # fold-bn then tucker lost 48 points in one fine-tuning epoch, without a word beforehand
    compress_run(in_dir=trained_resnet, out_dir=tmp_path / "folded", method="fold-bn",
                 profile_batch=4, profiles=(), threads=1)  # fmt: skip
    with caplog.at_level("WARNING", logger="slimtorch.pipeline.methods"):
        compress_run(in_dir=tmp_path / "folded", out_dir=None, method="prune",
                     method_options={"sparsity": 0.3, "sparse_check": False},
                     finetune=TrainConfig(epochs=1, lr=0.01, progress=False), profile_batch=4,
                     profiles=(), threads=1)  # fmt: skip
    said = [r.getMessage() for r in caplog.records]
    assert any("batch norms were folded away (quant.fold_bn)" in m for m in said)
