"""``slimtorch train`` under two gloo processes trains the same model as one process does."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from slimtorch.cli.main import main
from train_helpers import run_gloo_ranks

HERE = Path(__file__).parent


def _args(out: Path) -> list[str]:
    return ["train", "--model", "mlp", "--dataset", "digits", "--epochs", "2", "--lr", "0.05",
            "--batch-size", "64", "--seed", "3", "--device", "cpu", "--threads", "1",
            "--no-progress", "--out", str(out)]  # fmt: skip


def test_two_ranks_train_the_one_process_model_on_the_same_global_batch(tmp_path: Path) -> None:
    assert main(_args(tmp_path / "one")) == 0
    run_gloo_ranks(str(HERE / "cli_train_worker.py"), *_args(tmp_path / "two"))
    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert one.keys() == two.keys()
    for name, w in one.items():  # the same initial weights (seeded), batches and updates
        torch.testing.assert_close(two[name], w, rtol=0, atol=1e-5, msg=name)
    m_one = json.loads((tmp_path / "one" / "model" / "metrics.json").read_text())
    m_two = json.loads((tmp_path / "two" / "model" / "metrics.json").read_text())
    assert "ranks_consistent" not in m_one
    assert m_two["ranks_consistent"] is True
    assert abs(m_two["test_accuracy"] - m_one["test_accuracy"]) < 0.01


def test_batch_norm_statistics_are_rank_0s_on_every_rank_after_each_epoch(tmp_path: Path) -> None:
    """DDP runs with broadcast_buffers=False; the Trainer copies rank 0's buffers every epoch,
    so the replica check (which covers buffers) passes for a batch-norm model."""
    args = ["train", "--model", "resnet20", "--dataset", "digits", "--epochs", "1",
            "--batch-size", "64", "--device", "cpu", "--threads", "1", "--no-progress",
            "--out", str(tmp_path / "bn")]  # fmt: skip
    proc = run_gloo_ranks(str(HERE / "cli_train_worker.py"), *args, timeout=300)
    metrics = json.loads((tmp_path / "bn" / "model" / "metrics.json").read_text())
    assert metrics["ranks_consistent"] is True, proc.stderr[-2000:]


def test_a_rank_that_fails_ends_the_job_with_its_error(tmp_path: Path) -> None:
    # the failing rank waited in cleanup's barrier while the other waited in its own
    # collective: the job hung until the timeout, and the error was never printed
    import time

    started = time.perf_counter()
    proc = run_gloo_ranks(str(HERE / "cli_train_worker.py"), *_args(tmp_path / "run"),
                          env={"SLIMTORCH_IMPORT": str(HERE / "fail_rank1.py")},
                          timeout=110, check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "slimtorch train: error: injected failure on rank 1" in proc.stderr
    assert time.perf_counter() - started < 100
