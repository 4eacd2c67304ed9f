"""Static / SET / RigL callbacks: exact sparsity, dense-gradient regrowth, clean regrown weights,
AMP, checkpoint resume, save/load, and no extra work between updates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from slimtorch.models import create_model, load_model, save_model
from slimtorch.prune import MaskCallback, get_mask
from slimtorch.sparse import (
    SET,
    RigL,
    SparseTrainingConfig,
    StaticSparse,
    drop_and_grow,
    drop_count,
    make_sparse_callback,
)
from slimtorch.train import Callback, TrainConfig, Trainer
from train_helpers import Crash, KillAt, ListLoader


def _data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randn(n, 16, generator=gen) + nn.functional.one_hot(y, 16).float() * 3
    return x, y


X, Y = _data()
LAYERS = ("0", "2", "4")


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )


def _config(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        epochs=3,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-3,
        schedule="constant",
        amp="off",
        seed=1,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def _sparse_cfg(**kw: Any) -> SparseTrainingConfig:
    base: dict[str, Any] = dict(sparsity=0.8, delta_t=4, alpha=0.3, t_end=0.75)
    base.update(kw)
    return SparseTrainingConfig(**base)


class _Watch(Callback):
    """After every step: masks, exactness, and the optimiser state where weights just grew."""

    def __init__(self, cb: StaticSparse) -> None:
        self.cb = cb
        self.masks: list[dict[str, torch.Tensor]] = []
        self.problems: list[str] = []
        self.grown_clean: list[bool] = []

    def on_train_batch_end(self, trainer: Trainer, outputs: Any, loss: Any, idx: int) -> None:
        model = trainer.unwrapped_model
        now = {n: get_mask(model.get_submodule(n)).clone() for n in self.cb.nonzeros}  # type: ignore[union-attr]
        for name, row in self.cb.summary(model).items():
            if row["active"] != row["target"] or row["nonzero_masked"]:
                self.problems.append(f"step {trainer.global_step} {name}: {row}")
        if self.masks:
            for name, mask in now.items():
                grown = mask & ~self.masks[-1][name]
                if grown.any():
                    w = model.get_submodule(name).weight
                    state = trainer.optimizer.state[w]  # type: ignore[union-attr]
                    clean = bool((w[grown] == 0).all())
                    for value in state.values():
                        if isinstance(value, torch.Tensor) and value.shape == w.shape:
                            clean = clean and bool((value[grown] == 0).all())
                    self.grown_clean.append(clean)
        self.masks.append(now)


@pytest.mark.parametrize(
    ("kind", "optimizer", "amp"),
    [
        ("static", "sgd", "off"),
        ("set", "sgd", "off"),
        ("rigl", "sgd", "off"),
        ("rigl", "adamw", "bf16"),
    ],
)
def test_sparsity_is_exact_after_every_step(kind: str, optimizer: str, amp: str) -> None:
    model = _mlp()
    cb = make_sparse_callback(kind, 0.8, delta_t=4)
    watch = _Watch(cb)
    lr = 0.05 if optimizer == "sgd" else 0.01
    trainer = Trainer(model, _config(optimizer=optimizer, amp=amp, lr=lr), callbacks=[cb, watch])
    history = trainer.fit(ListLoader(X, Y, 8))
    assert trainer.global_step == 36 and watch.problems == []
    total = sum(model.get_submodule(n).weight.numel() for n in LAYERS)
    assert sum(cb.nonzeros.values()) == pytest.approx(0.2 * total, abs=len(LAYERS))
    changed = [
        i
        for i in range(1, 36)
        if any(not torch.equal(watch.masks[i][n], watch.masks[i - 1][n]) for n in LAYERS)
    ]
    if kind == "static":
        assert changed == [] and cb.updates == []
    else:
        # masks move only after the update steps 4, 8, ..., 24 (T_end = 0.75 * 36 = 27)
        assert [u["step"] for u in cb.updates] == [4, 8, 12, 16, 20, 24]
        assert set(changed) <= {u["step"] for u in cb.updates} and changed
        assert watch.grown_clean and all(watch.grown_clean)
    assert history.train_loss[-1] < history.train_loss[0]


class _GradSpy(Callback):
    """Runs before RigL: the dense gradient and, after the step, the weights RigL will see."""

    def __init__(self, cb: RigL) -> None:
        self.cb = cb
        self.seen: dict[int, dict[str, Any]] = {}

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: Any) -> None:
        if self.cb.is_update_step(trainer.global_step):
            model = trainer.unwrapped_model
            self.seen[trainer.global_step] = {
                n: {"grad": model.get_submodule(n).weight.grad.clone()} for n in self.cb.nonzeros
            }

    def on_after_optimizer_step(self, trainer: Trainer) -> None:
        for name, entry in self.seen.get(trainer.global_step, {}).items():
            module = trainer.unwrapped_model.get_submodule(name)
            entry["weight"] = module.weight.detach().clone()
            entry["mask"] = get_mask(module).clone()  # type: ignore[union-attr]


class _After(Callback):
    def __init__(self, spy: _GradSpy) -> None:
        self.spy = spy

    def on_after_optimizer_step(self, trainer: Trainer) -> None:
        for name, entry in self.spy.seen.get(trainer.global_step, {}).items():
            entry["new"] = get_mask(trainer.unwrapped_model.get_submodule(name)).clone()  # type: ignore[union-attr]


def test_rigl_regrows_by_the_dense_gradient() -> None:
    cb = RigL(_sparse_cfg())
    spy = _GradSpy(cb)
    trainer = Trainer(_mlp(), _config(epochs=2), callbacks=[spy, cb, _After(spy)])
    trainer.fit(ListLoader(X, Y, 8))
    assert sorted(spy.seen) == [4, 8, 12, 16]
    for step, layers in spy.seen.items():
        fraction = cb.drop_fraction(step)
        for name, e in layers.items():
            old = e["mask"]
            if not bool(old.all()):  # the gradient was dense: nonzero where the weight is masked
                assert bool((e["grad"][~old] != 0).any())
            n = drop_count(cb.nonzeros[name], fraction)
            expected = drop_and_grow(e["weight"], old, e["grad"].abs(), n)
            assert torch.equal(e["new"], expected), (step, name)


def test_set_regrows_at_random_and_differs_from_rigl() -> None:
    masks = {}
    for cls in (SET, RigL):
        model = _mlp()
        cb = cls(_sparse_cfg())
        Trainer(model, _config(epochs=2), callbacks=[cb]).fit(ListLoader(X, Y, 8))
        masks[cls.__name__] = {n: get_mask(model.get_submodule(n)).clone() for n in LAYERS}  # type: ignore[union-attr]
        assert all(u["swapped"] > 0 for u in cb.updates[:2])
    assert any(not torch.equal(masks["SET"][n], masks["RigL"][n]) for n in LAYERS)


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _counting(cls: type[StaticSparse]) -> type[StaticSparse]:
    class Counting(cls):  # type: ignore[valid-type, misc]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            self.ops: dict[int, int] = {}

        def _count(self, step: int, fn: Any, *args: Any) -> None:
            with _Counter() as c:
                fn(*args)
            self.ops[step] = self.ops.get(step, 0) + c.ops

        def on_before_optimizer_step(self, trainer: Trainer, optimizer: Any) -> None:
            self._count(trainer.global_step, super().on_before_optimizer_step, trainer, optimizer)

        def on_after_optimizer_step(self, trainer: Trainer) -> None:
            self._count(trainer.global_step, super().on_after_optimizer_step, trainer)

    return Counting


def test_rigl_does_no_extra_work_between_updates() -> None:
    ops = {}
    for cls in (StaticSparse, RigL):
        cb = _counting(cls)(_sparse_cfg(delta_t=5))
        Trainer(_mlp(), _config(epochs=2), callbacks=[cb]).fit(ListLoader(X, Y, 8))
        ops[cls.__name__] = cb.ops
    static, rigl = ops["StaticSparse"], ops["RigL"]
    update_steps = {5, 10, 15}  # T_end = 0.75 * 24 = 18
    for step in range(24):
        if step in update_steps:
            assert rigl[step] > static[step]
        else:  # the same tensor operations as fixed masks: only the masking itself
            assert rigl[step] == static[step], step


class _InfAt(Callback):
    """Make the loss infinite at one step, so fp16 gradient scaling skips it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def compute_loss(
        self, trainer: Trainer, inputs: Any, outputs: Any, targets: Any, loss: Any
    ) -> Any:
        return loss * float("inf") if trainer.global_step == self.step else loss


def test_fp16_overflow_skips_the_mask_update() -> None:
    model = _mlp()
    cb = RigL(_sparse_cfg())
    watch = _Watch(cb)
    trainer = Trainer(model, _config(amp="fp16", epochs=2), callbacks=[_InfAt(8), cb, watch])
    trainer.fit(ListLoader(X, Y, 8))
    assert cb.skipped_updates == [8]
    assert [u["step"] for u in cb.updates] == [4, 12, 16]
    assert all(torch.equal(watch.masks[8][n], watch.masks[7][n]) for n in LAYERS)
    assert watch.problems == []


@pytest.mark.parametrize("cls", [SET, RigL])
def test_state_survives_checkpoint_and_resume(cls: type[StaticSparse], tmp_path: Path) -> None:
    cfg = _config(checkpoint_every_steps=6)
    ref_cb = cls(_sparse_cfg())
    ref = Trainer(_mlp(), cfg, callbacks=[ref_cb], out_dir=tmp_path / "ref")
    ref.fit(ListLoader(X, Y, 8))
    with pytest.raises(Crash):
        Trainer(
            _mlp(), cfg, callbacks=[cls(_sparse_cfg()), KillAt(14)], out_dir=tmp_path / "run"
        ).fit(ListLoader(X, Y, 8))
    fresh = _mlp(seed=99)
    resumed_cb = cls(_sparse_cfg())
    resumed_cb.init_masks_(fresh)  # the mask buffers the checkpoint holds
    resumed = Trainer(fresh, cfg, callbacks=[resumed_cb], out_dir=tmp_path / "run")
    resumed.fit(ListLoader(X, Y, 8), resume=True)
    assert resumed.global_step == ref.global_step == 36
    assert resumed_cb.updates == ref_cb.updates
    assert torch.equal(resumed_cb.generator.get_state(), ref_cb.generator.get_state())
    ref_sd, res_sd = ref.model.state_dict(), resumed.model.state_dict()
    assert ref_sd.keys() == res_sd.keys()
    for key in ref_sd:
        torch.testing.assert_close(res_sd[key], ref_sd[key], rtol=0, atol=0)


def test_sparse_init_scales_each_unit_to_its_active_fan_in() -> None:
    scaled, dense = _mlp(), _mlp()
    scaled_cb = StaticSparse(_sparse_cfg())
    dense_cb = StaticSparse(_sparse_cfg(scale_init=False))
    scaled_cb.init_masks_(scaled)
    dense_cb.init_masks_(dense)
    for name in LAYERS:
        mask = get_mask(scaled.get_submodule(name))
        assert mask is not None
        assert torch.equal(mask, get_mask(dense.get_submodule(name)))  # same masks
        w, w0 = scaled.get_submodule(name).weight, dense.get_submodule(name).weight
        active = mask.sum(dim=1, keepdim=True).clamp(min=1)
        factor = (mask.shape[1] / active).sqrt()
        torch.testing.assert_close(w, w0 * factor, rtol=1e-6, atol=0)
        assert int((w[~mask] != 0).sum()) == 0
    # the first layer's pre-activations keep the dense layer's spread (to sampling noise)
    x = torch.randn(512, 16)
    ref = _mlp()[0](x).std()
    assert 0.8 < float(scaled[0](x).std() / ref) < 1.25
    assert float(dense[0](x).std() / ref) < 0.7  # 80% sparse, unscaled: the signal shrinks
    with pytest.raises(ValueError, match="scale_init"):
        SparseTrainingConfig(scale_init=1)  # type: ignore[arg-type]


def test_masks_survive_save_and_load_model(tmp_path: Path) -> None:
    model = create_model("mlp", num_classes=4, in_channels=1, input_size=4)
    cb = make_sparse_callback("rigl", 0.7, delta_t=3, dense_last=True)
    x = torch.randn(48, 1, 4, 4)
    y = torch.randint(0, 4, (48,))
    Trainer(model, _config(epochs=1), callbacks=[cb]).fit(ListLoader(x, y, 8))
    names = list(cb.nonzeros)
    assert cb.summary(model)[names[-1]]["target"] == model.get_submodule(names[-1]).weight.numel()
    out = save_model(
        model,
        tmp_path / "m",
        input_shape=(1, 4, 4),
        mean=[0.0],
        std=[1.0],
        class_names=list("abcd"),
    )
    loaded, _ = load_model(out)
    for name in names:
        assert torch.equal(
            get_mask(loaded.get_submodule(name)), get_mask(model.get_submodule(name))
        )  # type: ignore[arg-type]
    model.eval()
    torch.testing.assert_close(loaded(x), model(x))


def test_argument_errors_and_conflicts() -> None:
    with pytest.raises(ValueError, match="kind must be one of static, set, rigl"):
        make_sparse_callback("snip", 0.9)
    with pytest.raises(ValueError, match=r"SparseTrainingConfig.sparsity must be in \[0.0, 1.0\)"):
        make_sparse_callback("rigl", 1.0)
    with pytest.raises(ValueError, match=r"delta_t must be in \[1, inf\]"):
        SparseTrainingConfig(delta_t=0)
    with pytest.raises(ValueError, match="t_end must be in"):
        SparseTrainingConfig(t_end=0.0)
    with pytest.raises(ValueError, match=r"SparseTrainingConfig\.seed must be in \[0, 1844"):
        SparseTrainingConfig(seed=2**64)
    with pytest.raises(ValueError, match="distribution must be one of"):
        SparseTrainingConfig(distribution="gaussian")
    with pytest.raises(TypeError, match="SparseTrainingConfig"):
        RigL({"sparsity": 0.9})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total_steps"):
        RigL(total_steps=0)
    with pytest.raises(ValueError, match="match no module"):
        RigL(include=["nothing*"]).plan(_mlp())
    trainer = Trainer(
        _mlp(), _config(epochs=1), callbacks=[RigL(_sparse_cfg(delta_t=2)), MaskCallback()]
    )
    with pytest.raises(ValueError, match="remove the other mask callback"):
        trainer.fit(ListLoader(X, Y, 8))
    cfg = SparseTrainingConfig.from_dict(_sparse_cfg(dense_first=True).to_dict())
    assert cfg == _sparse_cfg(dense_first=True)
    cb = make_sparse_callback(
        "set",
        0.5,
        distribution="uniform",
        delta_t=7,
        alpha=0.1,
        t_end=0.5,
        dense_first=True,
        seed=3,
        exclude=["4"],
    )
    assert isinstance(cb, SET) and cb.config.delta_t == 7 and cb.config.seed == 3
    assert list(cb.plan(_mlp())) == ["0", "2"]
    assert cb.plan(_mlp())["0"] == 16 * 64  # first layer dense


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_a_sparsity_that_empties_a_layer_raises_naming_it(distribution: str) -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    cb = StaticSparse(SparseTrainingConfig(sparsity=0.9, distribution=distribution))
    with pytest.raises(
        ValueError,
        match=rf"sparsity 0.9 \({distribution}\) cannot be met: layer\(s\) '0' \(4 weights, "
        r"0.40 at density 0.1\), '2' .* would keep no weight at all",
    ):
        cb.init_masks_(net)
    assert get_mask(net[0]) is None and int((net[0].weight == 0).sum()) == 0
    cb = StaticSparse(SparseTrainingConfig(sparsity=0.5, distribution=distribution))
    assert cb.init_masks_(net) == {"0": 2, "2": 2}


def test_a_model_that_already_holds_pruning_masks_is_refused_unchanged() -> None:
    from slimtorch.prune import MagnitudeConfig, prune_

    net = _mlp()
    prune_(net, MagnitudeConfig(sparsity=0.8), include=["0", "4"])  # e.g. a loaded pruned model
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"layer\(s\) '0' \(205 of 1024 active\), '4' \(51 of 256 active\) already hold "
        r"pruning masks; RigL draws new random masks and would zero the weights they keep",
    ):
        Trainer(net, _config(epochs=1), callbacks=[RigL(_sparse_cfg())]).fit(ListLoader(X, Y, 8))
    after = net.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    fresh = _mlp()
    prune_(fresh, MagnitudeConfig(sparsity=0.0))  # all-True masks keep nothing back: allowed
    assert StaticSparse(_sparse_cfg()).init_masks_(fresh).keys() == {"0", "2", "4"}


@pytest.mark.parametrize("kind", ["set", "rigl"])
def test_a_run_too_short_for_one_mask_update_is_refused_before_any_mask(kind: str) -> None:
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = make_sparse_callback(kind, 0.8, delta_t=100)  # 36 steps, updates stop at step 27
    trainer = Trainer(model, _config(), callbacks=[cb])
    with pytest.raises(ValueError, match=rf"{kind} would never move its masks: the first update "
                       r"is at step 100 \(delta_t\) but updates stop at step 27"):  # fmt: skip
        trainer.fit(ListLoader(X, Y, 8))
    assert model.state_dict().keys() == before.keys()  # no mask buffers were added
    static = make_sparse_callback("static", 0.8, delta_t=100)
    Trainer(_mlp(), _config(), callbacks=[static]).fit(ListLoader(X, Y, 8))  # nothing to move


def test_tied_layers_are_refused_before_any_mask_is_drawn() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.dec = nn.Linear(32, 32), nn.Linear(32, 32)
            self.dec.weight = self.enc.weight
            self.head = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.dec(torch.relu(self.enc(x))))

    model = Tied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = make_sparse_callback("rigl", 0.5)
    with pytest.raises(ValueError, match=r"share parameters .*'dec' shares enc\.weight"):
        callback.init_masks_(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_layer_tied_to_an_excluded_one_is_trained_sparse() -> None:
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 4))
    model[2].weight = model[0].weight  # 2 uses 0's (masked) weight and is left out
    counts = make_sparse_callback("static", 0.5, exclude=["2"]).init_masks_(model)
    assert set(counts) == {"0", "3"} and model[2].weight is model[0].weight


def test_a_layer_that_cannot_take_a_mask_stops_it_before_any_layer_changes() -> None:
    # the layers before it had been masked, zeroed and rescaled, and a retry was then refused
    model = _mlp()
    model[2] = nn.utils.parametrizations.weight_norm(model[2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"RigL cannot mask every layer: .*'?2'?: weight is comp"):
        make_sparse_callback("rigl", 0.8).init_masks_(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert make_sparse_callback("rigl", 0.8, exclude=["2"]).init_masks_(model).keys() == {"0", "4"}


def test_layer_names_with_glob_characters_are_taken_literally() -> None:
    model = nn.Module()
    model.heads = nn.ModuleDict({"head[cls]": nn.Linear(16, 8), "head[box]": nn.Linear(16, 4)})
    counts = make_sparse_callback("static", 0.5, distribution="uniform").init_masks_(model)
    assert counts == {"heads.head[cls]": 64, "heads.head[box]": 32}


def test_set_leaves_frozen_layers_alone() -> None:
    # random regrowth swapped trained weights of a frozen layer for zeros that never train
    model = _mlp()
    model[0].requires_grad_(False)
    cb = make_sparse_callback("set", 0.5, delta_t=2, distribution="uniform")
    Trainer(model, _config(), callbacks=[cb]).fit(ListLoader(X, Y, 8))
    assert sum(u["swapped"] for u in cb.updates) > 0  # the trained layers did move
    frozen, mask = model[0].weight, get_mask(model[0])
    assert mask is not None and int((frozen != 0).sum()) == int(mask.sum()) == 512


def test_a_callback_used_before_masks_a_fresh_model_and_resumes(tmp_path: Path) -> None:
    cb = make_sparse_callback("set", 0.8, delta_t=4)
    Trainer(_mlp(), _config(epochs=1), callbacks=[cb]).fit(ListLoader(X, Y, 8))
    fresh = _mlp(seed=1)
    Trainer(fresh, _config(epochs=1), callbacks=[cb]).fit(ListLoader(X, Y, 8))
    assert all(get_mask(fresh.get_submodule(n)) is not None for n in LAYERS)
    assert cb.updates and all(u["step"] <= 12 for u in cb.updates)  # this run's only


def test_one_weight_per_layer_beyond_the_total_is_refused() -> None:
    from slimtorch.sparse import exact_nonzeros

    shapes = {f"l{i}": (6, 10) for i in range(10)}  # 1% of 600 is 6 weights, for 10 layers
    with pytest.raises(ValueError, match="10 layers keeping one weight each already exceed the 6"):
        exact_nonzeros(shapes, 0.99, "uniform")
    counts = exact_nonzeros({"a": (1, 60), "c": (1, 60), "b": (100, 100)}, 0.99, "uniform")
    assert counts == {"a": 1, "c": 1, "b": 99}  # 0.6 + 0.6 + 100 = 101.2: the surplus from b


def test_sparse_training_names_the_layers_it_leaves_dense(caplog: pytest.LogCaptureFixture) -> None:
    net = nn.Sequential(nn.Conv1d(4, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6, 4))
    with caplog.at_level("WARNING", logger="slimtorch.sparse.dst"):
        make_sparse_callback("rigl", 0.9).init_masks_(net)
    assert any("left dense: 0 (Conv1d)" in r.getMessage() for r in caplog.records)
