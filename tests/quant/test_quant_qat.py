"""LSQ quantization-aware training in the Trainer, and conversion to the int8 Q/DQ path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.core.errors import SlimtorchError
from slimtorch.data import DeviceLoader, load_dataset
from slimtorch.models import create_model, load_model, save_model
from slimtorch.quant.lsq import LSQConv2d, LSQLinear
from slimtorch.quant.qat import QATCallback, QATConfig, prepare_qat_, qat_layers
from slimtorch.quant.qat_convert import convert_qat_
from slimtorch.quant.qdq import QDQConv2d, QDQLinear
from slimtorch.train import TrainConfig, Trainer


def _fashion(
    root: Path, n_train: int = 768, n_test: int = 512
) -> tuple[DeviceLoader, DeviceLoader]:
    train = load_dataset("fashion-mnist", "train", root=root / "fashion-mnist", download=False)
    test = load_dataset("fashion-mnist", "test", root=root / "fashion-mnist", download=False)
    train = train.subset(torch.arange(n_train))
    test = test.subset(torch.arange(n_test))
    return (
        DeviceLoader(train, 64, shuffle=True, drop_last=True, seed=0),
        DeviceLoader(test, 256),
    )


def _cfg(**kw: object) -> TrainConfig:
    base = {"epochs": 1, "lr": 0.05, "progress": False, "amp": "off", "eval_every_epochs": 0}
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="weight_bits"):
        QATConfig(weight_bits=2)
    with pytest.raises(ValueError, match="act_bits"):
        QATConfig(act_bits=16)
    with pytest.raises(ValueError, match="include"):
        QATConfig(include="conv1")  # type: ignore[arg-type]
    assert QATConfig.from_dict(QATConfig(weight_bits=4).to_dict()) == QATConfig(weight_bits=4)
    for bad in (0.5, -1.0, float("inf"), True, "3"):
        with pytest.raises(ValueError, match="spike_clip must be None or a number >= 1"):
            QATConfig(spike_clip=bad)  # type: ignore[arg-type]
    assert QATConfig(spike_clip=None).spike_clip is None
    with pytest.raises(ValueError, match="freeze_bn_epoch applies with fold_bn=False only"):
        QATConfig(freeze_bn_epoch=0)  # fold_bn=True: nothing to freeze


def test_callback_refuses_a_model_prepared_otherwise_and_warns_of_a_late_freeze(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = create_model("lenet5", num_classes=10, in_channels=1, input_size=8)
    prepare_qat_(model, QATConfig(weight_bits=4))
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    with pytest.raises(
        ValueError, match=r"'features\.0' was prepared for QAT as .*'weight_bits': 4"
    ):
        Trainer(model, _cfg(), callbacks=[QATCallback(QATConfig())]).fit(batches)
    same = QATCallback(QATConfig(weight_bits=4))
    Trainer(model, _cfg(), callbacks=[same]).fit(batches)  # the config it was prepared with
    fresh = create_model("resnet20", num_classes=10, in_channels=1, input_size=8)
    late = QATCallback(QATConfig(fold_bn=False, freeze_bn_epoch=3))
    with caplog.at_level("WARNING", logger="slimtorch.quant.qat"):
        Trainer(fresh, _cfg(epochs=2), callbacks=[late]).fit(batches)
    assert "freeze_bn_epoch=3 is past the last epoch" in caplog.text


def test_callback_clips_gradient_spikes_only() -> None:
    from slimtorch.quant.qat import SPIKE_WARMUP
    from slimtorch.train import Callback, TrainConfig

    class Probe(Callback):  # step 15's loss is 1000 times larger: one gradient spike
        def __init__(self) -> None:
            self.norms: list[float] = []

        def compute_loss(self, trainer, inputs, outputs, targets, loss):  # type: ignore[no-untyped-def]
            return loss * (1000.0 if trainer.global_step == 15 else 1.0)

        def on_before_optimizer_step(self, trainer, optimizer):  # type: ignore[no-untyped-def]
            grads = [
                p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None
            ]
            self.norms.append(
                float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            )

    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(20)]
    runs = {}
    for spike_clip, train_clip in ((3.0, None), (None, None), (3.0, 1e6)):
        torch.manual_seed(0)
        model = create_model("lenet5", in_channels=1, input_size=28)
        qat, probe = QATCallback(QATConfig(weight_bits=4, spike_clip=spike_clip)), Probe()
        cfg = TrainConfig(epochs=1, lr=1e-9, progress=False, grad_clip_norm=train_clip)
        Trainer(model, cfg, callbacks=[qat, probe]).fit(data)  # qat's hook runs first
        runs[(spike_clip, train_clip)] = (qat, probe.norms)
    qat, norms = runs[(3.0, None)]
    _, raw = runs[(None, None)]
    assert qat.clipped == 1 and len(qat.norms) == 20 and SPIKE_WARMUP < 15
    assert raw[15] > 100 * max(raw[:15])  # the spike, unclipped
    median = float(torch.tensor(raw[:15][-50:]).median())
    assert norms[15] == pytest.approx(3.0 * median, rel=1e-3)  # clipped to 3x the median
    assert norms[:15] == pytest.approx(raw[:15]) and norms[16:] == pytest.approx(raw[16:], rel=1e-3)
    # the Trainer clipping on its own: the callback leaves the gradient alone
    assert runs[(3.0, 1e6)][0].clipped == 0 and runs[(3.0, 1e6)][1][15] > 100 * max(raw[:15])


def test_qat_w4a8_on_fashion_mnist_mlp_trains_and_converts(
    shared_data: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    train, test = _fashion(shared_data, n_train=1024, n_test=256)
    model = create_model("mlp", num_classes=10, in_channels=1, input_size=28, hidden=(128, 64))
    Trainer(model, _cfg(epochs=2, optimizer="adamw", lr=3e-3, weight_decay=0.0)).fit(train)
    float_acc = Trainer(model, _cfg()).evaluate(test)["accuracy"]

    cfg = QATConfig(weight_bits=4, act_bits=8)
    callback = QATCallback(cfg)
    trainer = Trainer(
        model, _cfg(optimizer="adamw", lr=1e-3, weight_decay=0.0), callbacks=[callback]
    )
    steps_before: dict[str, torch.Tensor] = {}

    class Snapshot(QATCallback):
        def on_train_batch_start(self, trainer: Trainer, batch: object, batch_idx: int) -> None:
            if batch_idx == 1:
                steps_before.update(
                    {n: m.weight_quant.step.detach().clone() for n, m in qat_layers(model).items()}
                )

    trainer.callbacks.append(Snapshot(cfg))
    history = trainer.fit(train)
    layers = qat_layers(model)
    assert callback.report is not None and sorted(layers) == sorted(callback.report.layers)
    assert len(layers) == 3  # the MLP's three Linear layers
    assert all(bool(m.input_quant.initialized) for m in layers.values())
    moved = [n for n in layers if not torch.equal(layers[n].weight_quant.step, steps_before[n])]
    assert moved, "the optimiser never updated a learned step size"
    assert history.to_dict()["train_loss"][-1] == history.to_dict()["train_loss"][-1]  # finite
    qat_acc = Trainer(model, _cfg()).evaluate(test)["accuracy"]
    assert qat_acc > 0.5 and qat_acc >= float_acc - 0.1

    x = next(iter(test))[0]
    model.eval()
    with torch.no_grad():
        fake = model(x)
    report = convert_qat_(model)
    assert len(report.quantized) == 3 and {r.mode for r in report.rows} == {"static"}
    assert {r.weight_bits for r in report.rows} == {4}
    assert not qat_layers(model)
    assert all(
        isinstance(m, QDQConv2d | QDQLinear) for n, m in model.named_modules() if n in layers
    )
    with torch.no_grad():
        real = model(x)
    assert _rel(real, fake) < 1e-2
    assert (real.argmax(1) == fake.argmax(1)).float().mean() >= 0.98
    names = [t["name"] for t in model.slimtorch_arch["transforms"]]
    assert names == ["quant.qdq"]  # the LSQ record is replaced by the Q/DQ one
    save_model(model, tmp_path / "q", input_shape=(1, 28, 28), mean=[0.286], std=[0.353],
               class_names=[str(i) for i in range(10)])  # fmt: skip
    loaded, _ = load_model(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), real)


@pytest.mark.parametrize("fold_bn", [True, False])
def test_convert_matches_fake_quant_on_resnet(fold_bn: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(32, 1, 8, 8)
    model = create_model("resnet20", num_classes=10, in_channels=1, input_size=8)
    model.train()
    with torch.no_grad():
        model(x)
    report = prepare_qat_(model.eval(), QATConfig(weight_bits=8, act_bits=8, fold_bn=fold_bn))
    assert len(report.layers) == 22
    assert (report.fold is not None) == fold_bn
    with torch.no_grad():
        model(x[:8])  # initialise activation steps
        fake = model(x)
    convert_qat_(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        real = model(x)
    assert _rel(real, fake) < 2e-2
    assert (real.argmax(1) == fake.argmax(1)).float().mean() >= 0.9


class _Branchy(nn.Module):
    """Conv + batch norm before a value-dependent branch: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.a(h) if x.mean() > 0 else self.b(h)


def test_an_untraceable_model_converts_with_its_batch_norms_kept() -> None:
    # folding needs the traced graph: convert_qat_ failed on such a model after training
    torch.manual_seed(0)
    xs = [torch.randn(16, 1, 8, 8) + 1, torch.randn(16, 1, 8, 8) - 1]  # one per branch
    model = _Branchy().train()
    with torch.no_grad():
        model(xs[0])
    report = prepare_qat_(model.eval(), QATConfig())
    assert report.fold is not None and "cannot be traced" in (report.fold.reason or "")
    with torch.no_grad():
        fake = [model(x) for x in xs]
    quant = convert_qat_(model)
    assert "unfolded" in quant.info["fold_bn"]["reason"]
    assert isinstance(model.conv, QDQConv2d) and isinstance(model.bn, nn.BatchNorm2d)
    with torch.no_grad():
        for x, ref in zip(xs, fake, strict=True):
            assert _rel(model(x), ref) < 1e-4


def test_prepared_model_round_trips_and_converts_the_same(tmp_path: Path) -> None:
    x = torch.rand(4, 1, 28, 28)
    model = create_model("lenet5", num_classes=10, in_channels=1, input_size=28)
    prepare_qat_(model, QATConfig(weight_bits=4, act_bits=8, exclude=("classifier",)))
    assert type(model.classifier) is nn.Linear
    assert isinstance(model.fc1, LSQLinear)
    with torch.no_grad():
        y = model(x)
    save_model(model, tmp_path / "qat", input_shape=(1, 28, 28), mean=[0.5], std=[0.5],
               class_names=[str(i) for i in range(10)])  # fmt: skip
    loaded, _ = load_model(tmp_path / "qat")
    assert any(isinstance(m, LSQConv2d) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y)


def test_four_bit_activations_need_explicit_widening() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    prepare_qat_(model, QATConfig(weight_bits=8, act_bits=4))
    model(torch.randn(4, 8))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="4 bits"):
        convert_qat_(model)
    assert qat_layers(model) and all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )
    with pytest.warns(UserWarning, match="4-bit activations"):
        convert_qat_(model, widen_4bit_activations=True)
    assert isinstance(model[0], QDQLinear)


def test_convert_refuses_uninitialised_and_unprepared_models() -> None:
    model = nn.Sequential(nn.Linear(8, 2))
    with pytest.raises(ValueError, match="no LSQ"):
        convert_qat_(model)
    prepare_qat_(model, QATConfig())
    with pytest.raises(SlimtorchError, match="never saw data"):
        convert_qat_(model)
    assert isinstance(model[0], LSQLinear)
    with pytest.raises(ValueError, match="already"):
        prepare_qat_(model, QATConfig())


def test_frozen_batch_norm_keeps_its_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))  # fmt: skip
    cfg = QATConfig(fold_bn=False, freeze_bn_epoch=0)
    prepare_qat_(model, cfg)
    mean = model[1].running_mean.clone()
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(3)]
    Trainer(model, _cfg(lr=0.01), callbacks=[QATCallback(cfg)]).fit(data)
    torch.testing.assert_close(model[1].running_mean, mean)


def test_an_include_that_selects_nothing_is_refused_before_folding() -> None:
    model = create_model("resnet20", in_channels=1, input_size=28).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"include=\('nothing\*',\) matches no Conv2d/Linear"):
        prepare_qat_(model, QATConfig(include=("nothing*",)))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21
    assert model.state_dict().keys() == before.keys()
    assert not model.slimtorch_arch.get("transforms")


@pytest.mark.parametrize("order", ["prune_first", "qat_first"])
def test_pruning_masks_survive_qat_training_saving_and_loading(order: str, tmp_path: Path) -> None:
    """Swapping in LSQ layers keeps a layer's mask buffer: the layer stays sparse, the
    checkpoint resumes and the saved model reloads (the recorded swap is replayed alike)."""
    from slimtorch.prune import GradualPruning, MagnitudeConfig, masked_params

    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10, in_channels=1, input_size=8)
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(4)]
    gradual = GradualPruning(MagnitudeConfig(sparsity=0.8), start_step=0, end_step=4, frequency=2)
    qat = QATCallback(QATConfig(weight_bits=8, act_bits=8))
    callbacks = [gradual, qat] if order == "prune_first" else [qat, gradual]
    Trainer(model, _cfg(epochs=2), callbacks=callbacks, out_dir=tmp_path).fit(batches)
    layers = {name for name, _, _ in masked_params(model)}
    assert layers and all(isinstance(model.get_submodule(n.rsplit(".", 1)[0]),
                                      (LSQConv2d, LSQLinear)) for n in layers)  # fmt: skip
    for name, param, mask in masked_params(model):
        assert float((param == 0).float().mean()) >= 0.79, name
        assert not bool(param[~mask].any()), name
    save_model(model, tmp_path / "m", input_shape=(1, 8, 8), mean=[0.5], std=[0.25],
               class_names=[str(i) for i in range(10)])  # fmt: skip
    loaded, _ = load_model(tmp_path / "m")
    assert {n for n, _, _ in masked_params(loaded)} == layers
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    resumed = create_model("lenet5", num_classes=10, in_channels=1, input_size=8)
    again = [GradualPruning(MagnitudeConfig(sparsity=0.8), start_step=0, end_step=4, frequency=2),
             QATCallback(QATConfig(weight_bits=8, act_bits=8))]  # fmt: skip
    callbacks = again if order == "prune_first" else again[::-1]
    Trainer(resumed, _cfg(epochs=2), callbacks=callbacks, out_dir=tmp_path).fit(
        batches, resume=True
    )


def test_spike_clipping_sees_the_same_gradients_whatever_the_callback_order() -> None:
    from slimtorch.prune import GradualPruning, MagnitudeConfig

    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(6)]
    results = []
    for qat_first in (True, False):
        torch.manual_seed(0)
        model = create_model("mlp", num_classes=10, in_channels=1, input_size=8)
        gradual = GradualPruning(MagnitudeConfig(sparsity=0.9), 0, 6, 2)
        qat = QATCallback(QATConfig(weight_bits=4, act_bits=4, spike_clip=1.0))
        callbacks = [qat, gradual] if qat_first else [gradual, qat]
        Trainer(model, _cfg(epochs=4), callbacks=callbacks).fit(batches)
        results.append((list(qat.norms), qat.clipped, model.state_dict()))
    (norms_a, clipped_a, state_a), (norms_b, clipped_b, state_b) = results
    assert norms_a == norms_b and clipped_a == clipped_b > 0
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_a_model_saved_with_an_inert_freeze_bn_epoch_still_loads(tmp_path: Path) -> None:
    """Older versions accepted freeze_bn_epoch with folded batch norms (it did nothing) and
    recorded it; such a model directory replays without it."""
    import json

    model = create_model("lenet5", num_classes=10, in_channels=1, input_size=8)
    prepare_qat_(model, QATConfig())
    save_model(model, tmp_path / "m", input_shape=(1, 8, 8), mean=[0.5], std=[0.25],
               class_names=[str(i) for i in range(10)])  # fmt: skip
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    lsq = next(t for t in config["transforms"] if t["name"] == "quant.lsq")
    lsq["params"]["config"]["freeze_bn_epoch"] = 1
    config_path.write_text(json.dumps(config))
    loaded, _ = load_model(tmp_path / "m")
    assert sorted(qat_layers(loaded)) == sorted(qat_layers(model))
