"""DDP: 2 gloo processes on shards of each global batch equal 1 process on the full batches."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from slimtorch.train import (
    all_reduce_sum,
    barrier,
    cleanup,
    get_local_rank,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from train_helpers import run_gloo_ranks

HERE = Path(__file__).parent


def _single_process(out_dir: Path) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("ddp_worker", HERE / "ddp_worker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run(out_dir)  # type: ignore[no-any-return]


def test_helpers_without_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert init_distributed() is False
    assert (get_rank(), get_world_size(), get_local_rank(), is_main_process()) == (0, 1, 0, True)
    barrier()
    cleanup()
    t = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(all_reduce_sum(t), torch.tensor([1.0, 2.0]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match=r"MASTER_ADDR.*torchrun"):
        init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        init_distributed()


def test_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    proc = run_gloo_ranks(str(HERE / "ddp_worker.py"), str(tmp_path / "ddp"))
    ddp = torch.load(tmp_path / "ddp" / "result.pt", weights_only=True)
    single = _single_process(tmp_path / "single")
    assert ddp["world_size"] == 2 and ddp["ddp_wrapped"] is True
    assert single["world_size"] == 1
    # the ranks ended identical, and the check sees a weight and a mask that drift on one rank
    assert ddp["replica_mismatches"] == []
    assert single["replica_mismatches"] is None
    first = next(iter(single["weights"]))
    assert ddp["drifted"] == [first, "probe_mask", "probe_stat"]
    for name, w in single["weights"].items():
        torch.testing.assert_close(ddp["weights"][name], w, rtol=0, atol=1e-6, msg=name)
    # metrics are summed over ranks: the same as one process on every sample
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
        assert ddp["history"][key] == pytest.approx(single["history"][key], rel=1e-5), key
    assert ddp["eval"]["n"] == single["eval"]["n"] == 16
    # only rank 0 wrote files and progress lines
    assert sorted(p.name for p in (tmp_path / "ddp" / "run").iterdir()) == [
        "checkpoint.pt",
        "history.json",
        "train_config.json",
    ]
    assert proc.stderr.count("epoch 2/2 done") == 1


def test_forced_group_of_one_trains_data_parallel_like_one_process(tmp_path: Path) -> None:
    """SLIMTORCH_DIST_FORCE=1: one torchrun process joins a group and wraps the model in DDP."""
    run_gloo_ranks(
        str(HERE / "ddp_worker.py"), str(tmp_path / "one"), nproc=1,
        env={"SLIMTORCH_DIST_FORCE": "1"},
    )  # fmt: skip
    forced = torch.load(tmp_path / "one" / "result.pt", weights_only=True)
    single = _single_process(tmp_path / "single")
    assert forced["world_size"] == 1 and forced["ddp_wrapped"] is True
    assert forced["replica_mismatches"] == [] and forced["drifted"] == []
    assert single["ddp_wrapped"] is False
    for name, w in single["weights"].items():
        torch.testing.assert_close(forced["weights"][name], w, rtol=0, atol=1e-6, msg=name)
