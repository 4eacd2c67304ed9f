"""Batch-norm statistics re-estimated for the final weights: exact averages, nothing else moves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.prune import MagnitudeConfig, prune_
from slimtorch.train import BatchNormRecalibration, TrainConfig, Trainer, recalibrate_batchnorm_
from train_helpers import run_gloo_ranks


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))  # fmt: skip


def _batches(n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 8, 8, generator=g) * 2 + 3, torch.zeros(8, dtype=torch.long))
            for _ in range(n)]  # fmt: skip


def test_statistics_become_the_plain_average_over_the_batches() -> None:
    net = _net().eval()
    bn = net[1]
    bn.running_mean.fill_(100.0)  # stale statistics
    bn.running_var.fill_(1e-3)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k}
    batches = _batches()
    out = recalibrate_batchnorm_(net, batches)
    assert out == {"layers": 1, "batches": 5, "samples": 40}
    with torch.no_grad():
        feats = [net[0](x) for x, _ in batches]
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats])
    variances = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1) for f in feats])  # unbiased
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert int(bn.num_batches_tracked) == 5 and bn.momentum == 0.1
    assert not net.training  # the mode it came in
    after = {k: v for k, v in net.state_dict().items() if "running" not in k and "tracked" not in k}
    assert all(torch.equal(after[k], weights[k]) for k in after)


def test_pruning_masks_and_max_batches() -> None:
    net = _net()
    prune_(net, MagnitudeConfig(sparsity=0.5))
    masked = net[0].weight.clone()
    out = recalibrate_batchnorm_(net, _batches(), max_batches=2)
    assert out["batches"] == 2 and torch.equal(net[0].weight, masked)


def test_a_failing_or_empty_source_puts_the_old_statistics_back() -> None:
    net = _net()
    before = {k: v.clone() for k, v in net[1].state_dict().items()}

    def broken():
        yield _batches(1)[0]
        raise RuntimeError("loader died")

    with pytest.raises(RuntimeError, match="loader died"):
        recalibrate_batchnorm_(net, broken())
    with pytest.raises(ValueError, match="yielded no batch"):
        recalibrate_batchnorm_(net, [])
    for k, v in net[1].state_dict().items():
        assert torch.equal(v, before[k]), k
    assert net[1].momentum == 0.1
    with pytest.raises(ValueError, match="max_batches must be an int >= 1"):
        recalibrate_batchnorm_(net, _batches(), max_batches=0)
    with pytest.raises(ValueError, match="max_batches must be an int >= 1"):
        BatchNormRecalibration(max_batches=True)


def test_no_batch_norm_runs_nothing() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    assert recalibrate_batchnorm_(net, iter(())) == {"layers": 0, "batches": 0, "samples": 0}


def test_callback_runs_once_after_the_last_epoch_and_before_its_evaluation() -> None:
    net = _net()
    seen: list[int] = []
    recal = BatchNormRecalibration(max_batches=3)
    original = recalibrate_batchnorm_

    import slimtorch.train.batchnorm as mod

    def spy(model, batches, **kw):  # type: ignore[no-untyped-def]
        seen.append(trainer.epoch)
        return original(model, batches, **kw)

    mod.recalibrate_batchnorm_ = spy  # type: ignore[assignment]
    try:
        trainer = Trainer(net, TrainConfig(epochs=3, lr=0.05, progress=False), callbacks=[recal])
        history = trainer.fit(_batches(), _batches(2))
    finally:
        mod.recalibrate_batchnorm_ = original  # type: ignore[assignment]
    assert seen == [2] and recal.result == {"layers": 1, "batches": 3, "samples": 24}
    assert int(net[1].num_batches_tracked) == 3
    # the last epoch's validation ran with the re-estimated statistics
    val = Trainer(net, TrainConfig(epochs=1, progress=False)).evaluate(_batches(2))
    assert history.val_loss[-1] == pytest.approx(val["loss"])


@pytest.mark.parametrize("order", ["recal_first", "stopper_first"])
def test_a_run_stopped_early_is_recalibrated_and_checkpointed(
    order: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from slimtorch.train import EarlyStopping

    net = _net()
    recal = BatchNormRecalibration(max_batches=3)
    stop = EarlyStopping("val_loss", patience=1, min_delta=1e9)  # stops after the 2nd epoch
    callbacks = [recal, stop] if order == "recal_first" else [stop, recal]
    config = TrainConfig(epochs=6, lr=0.05, progress=False)
    Trainer(net, config, callbacks=callbacks, out_dir=tmp_path).fit(_batches(), _batches(2))
    assert recal.result == {"layers": 1, "batches": 3, "samples": 24}
    assert int(net[1].num_batches_tracked) == 3
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert torch.equal(saved["1.running_mean"], net[1].running_mean)  # the checkpoint has them
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with caplog.at_level("INFO", logger="slimtorch.train.batchnorm"):
        Trainer(plain, TrainConfig(epochs=1, progress=False), callbacks=[recal]).fit(_batches())
    assert "has no batch norm" in caplog.text and recal.result is None


@pytest.mark.slow
def test_ranks_end_with_the_average_of_their_statistics(tmp_path: Path) -> None:
    run_gloo_ranks(
        str(Path(__file__).parent / "batchnorm_ddp_worker.py"), str(tmp_path), timeout=120
    )
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in ("running_mean", "running_var"):
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    # the samples of every rank's shard (one rank's count was reported)
    total = sum(len(x) for r in (r0, r1) for x in r["batches"])
    assert r0["result"]["samples"] == r1["result"]["samples"] == total
    expected = []
    for r in (r0, r1):  # what each rank would hold alone
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
        recalibrate_batchnorm_(net, r["batches"])
        expected.append(net[1].running_mean.clone())
    torch.testing.assert_close(r0["state"]["running_mean"], (expected[0] + expected[1]) / 2)


def test_frozen_batch_norms_keep_their_statistics() -> None:
    # compress's recalibration after a QAT fine-tune re-estimated the batch norms that QAT's
    # freeze_bn_epoch had frozen (eval mode, running statistics fixed)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.BatchNorm1d(8))
    net.train()
    net[3].eval()  # frozen
    frozen = [b.clone() for b in (net[3].running_mean, net[3].running_var)]
    batches = [torch.randn(16, 4) * 3 + 1 for _ in range(3)]
    result = recalibrate_batchnorm_(net, batches)
    assert result["layers"] == 1
    assert torch.equal(net[3].running_mean, frozen[0])
    assert torch.equal(net[3].running_var, frozen[1])
    assert not torch.equal(net[1].running_mean, torch.zeros(8))
    assert net.training and net[1].training and not net[3].training
