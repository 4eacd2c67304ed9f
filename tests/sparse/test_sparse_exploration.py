"""SET/RigL update records: the explored fraction (in-time over-parameterisation rate) and the
share of each update's grown weights still active after the next, checked against the masks
seen after every step, through a resume, and in the pure bookkeeping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slimtorch.prune import get_mask
from slimtorch.sparse import SET, RigL, SparseTrainingConfig
from slimtorch.sparse.updates import Exploration
from slimtorch.train import Callback, TrainConfig, Trainer
from train_helpers import Crash, KillAt, ListLoader

LAYERS = ("0", "2", "4")


def _data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    y = torch.randint(0, 4, (n,), generator=gen)
    return torch.randn(n, 16, generator=gen) + nn.functional.one_hot(y, 16).float() * 3, y


X, Y = _data()


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                         nn.Linear(48, 4))  # fmt: skip


def _config(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(epochs=3, optimizer="sgd", lr=0.05, momentum=0.9,
                                schedule="constant", amp="off", seed=1, progress=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


class _Masks(Callback):
    """The masks after every optimiser step (index ``s``: after the update at global step ``s``,
    which counts from 0 in the step hooks)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: Trainer, outputs: Any, loss: Any, idx: int) -> None:
        model = trainer.unwrapped_model
        self.seen.append({n: get_mask(model.get_submodule(n)).clone() for n in LAYERS})  # type: ignore[union-attr]


@pytest.mark.parametrize("cls", [SET, RigL])
def test_update_records_match_the_masks_seen_after_every_step(cls: type[SET]) -> None:
    cb = cls(SparseTrainingConfig(sparsity=0.8, delta_t=4, t_end=0.75))
    masks = _Masks()
    Trainer(_mlp(), _config(), callbacks=[cb, masks]).fit(ListLoader(X, Y, 8))
    steps = [u["step"] for u in cb.updates]
    assert steps == [4, 8, 12, 16, 20, 24]
    seen = masks.seen
    numel = sum(seen[0][n].numel() for n in LAYERS)
    previous: dict[str, torch.Tensor] | None = None
    for update in cb.updates:
        s = update["step"]
        before, after = seen[s - 1], seen[s]  # masks change only at the update step
        ever = sum(int(torch.stack([m[n] for m in seen[: s + 1]]).any(0).sum()) for n in LAYERS)
        assert update["explored"] == pytest.approx(ever / numel)
        grown = {n: after[n] & ~before[n] for n in LAYERS}
        if previous is None:
            assert update["grown_kept"] is None
        else:
            kept = sum(int((previous[n] & after[n]).sum()) for n in LAYERS)
            total = sum(int(previous[n].sum()) for n in LAYERS)
            assert update["grown_kept"] == pytest.approx(kept / total)
        previous = grown
    explored = [u["explored"] for u in cb.updates]
    assert explored == sorted(explored) and 0.2 < explored[0] and explored[-1] <= 1.0
    assert 0.2 < explored[-1]  # the masks did move beyond the initial 20%


@pytest.mark.parametrize("cls", [SET, RigL])
def test_exploration_survives_a_resume(cls: type[SET], tmp_path: Path) -> None:
    cfg = _config(checkpoint_every_steps=6)
    sparse = SparseTrainingConfig(sparsity=0.8, delta_t=4, t_end=0.75)
    ref_cb = cls(sparse)
    Trainer(_mlp(), cfg, callbacks=[ref_cb], out_dir=tmp_path / "ref").fit(ListLoader(X, Y, 8))
    with pytest.raises(Crash):  # checkpoint at step 6 holds update 4's grown weights
        Trainer(_mlp(), cfg, callbacks=[cls(sparse), KillAt(10)],
                out_dir=tmp_path / "run").fit(ListLoader(X, Y, 8))  # fmt: skip
    resumed_cb = cls(sparse)
    resumed = Trainer(_mlp(seed=5), cfg, callbacks=[resumed_cb], out_dir=tmp_path / "run")
    resumed.fit(ListLoader(X, Y, 8), resume=True)
    assert resumed_cb.updates == ref_cb.updates
    assert resumed_cb.updates[1]["grown_kept"] is not None


def test_layers_left_alone_count_towards_explored_and_are_not_compared() -> None:
    ex = Exploration()
    a_old, a_new = (
        torch.tensor([True, False, False, False]),
        torch.tensor([False, True, False, False]),
    )
    ex.record("a", a_old, a_new)
    ex.record("b", torch.tensor([True, True, False, False]), None)
    assert ex.close() == {"explored": 4 / 8, "grown_kept": None}
    ex.record("a", a_new, None)  # left alone now: its grown weight is not compared ...
    ex.record(
        "b", torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False])
    )
    assert ex.close() == {"explored": 5 / 8, "grown_kept": None}
    ex.record("a", a_new, torch.tensor([False, False, True, False]))  # ... nor at the next one
    ex.record(
        "b", torch.tensor([True, False, True, False]), torch.tensor([True, False, False, True])
    )
    assert ex.close() == {"explored": 7 / 8, "grown_kept": 0.0}  # b's grown index 2 dropped
    state = ex.state_dict()
    again = Exploration()
    again.load_state_dict(state)
    again.record(
        "b", torch.tensor([True, False, False, True]), torch.tensor([True, False, False, True])
    )
    assert again.close() == {"explored": 7 / 8, "grown_kept": 1.0}
