"""Mixed-precision plans, fp16 with a gradient scaler, and AMP on CUDA/ROCm (gpu marker)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from slimtorch.core.devices import native_bf16
from slimtorch.train import Callback, TrainConfig, Trainer, resolve_amp
from train_helpers import ListLoader, make_blobs, make_mlp


def test_resolve_amp_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert (resolve_amp("off", cpu).dtype, resolve_amp("off", cpu).use_scaler) == (None, False)
    assert resolve_amp("auto", cpu).name == "off"
    assert (resolve_amp("bf16", cpu).dtype, resolve_amp("bf16", cpu).use_scaler) == (
        torch.bfloat16,
        False,
    )
    fp16 = resolve_amp("fp16", cpu)
    assert (fp16.dtype, fp16.use_scaler) == (torch.float16, True)
    with pytest.raises(ValueError, match="amp must be one of"):
        resolve_amp("int8", cpu)


@pytest.mark.parametrize(
    ("hip", "major", "gfx", "auto"),
    [
        ("6.0.32830", 8, "gfx803:xnack-", "fp16"),  # RX 580: torch says bf16 "supported"
        ("6.0.32830", 9, "gfx90a:sramecc+:xnack-", "bf16"),  # MI200
        (None, 6, "", "fp16"),  # GTX 1060: bf16 only by emulation
        (None, 8, "", "bf16"),  # A100
    ],
)
def test_auto_amp_picks_bf16_only_where_the_gpu_computes_in_it(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    hip: str | None,
    major: int,
    gfx: str,
    auto: str,
) -> None:
    props = SimpleNamespace(major=major, minor=0, gcnArchName=gfx)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    plan = resolve_amp("auto", torch.device("cuda:0"))
    assert plan.name == auto and plan.use_scaler == (auto == "fp16")
    with caplog.at_level("WARNING", logger="slimtorch.train.amp"):
        assert resolve_amp("bf16", torch.device("cuda:0")).name == "bf16"  # asked for: kept
    assert ("no native bfloat16" in caplog.text) == (auto == "fp16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    if auto == "fp16":
        with pytest.raises(ValueError, match="does not support bfloat16"):
            resolve_amp("bf16", torch.device("cuda:0"))


class _Spy(Callback):
    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []
        self.scales: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, outputs: Any, loss: Any, batch_idx: int) -> None:
        self.dtypes.append(outputs.dtype)
        if trainer.scaler is not None:
            self.scales.append(trainer.scaler.get_scale())


def _fit(amp: str, device: str, channels_last: bool = False) -> tuple[Trainer, _Spy, Any]:
    x, y = make_blobs(256)
    if channels_last:
        x = x.view(256, 2, 2, 2)
    spy = _Spy()
    model = (
        make_mlp()
        if not channels_last
        else torch.nn.Sequential(
            torch.nn.Conv2d(2, 8, 1), torch.nn.Flatten(), torch.nn.Linear(32, 4)
        )
    )
    cfg = TrainConfig(epochs=2, lr=0.05, amp=amp, progress=False, channels_last=channels_last)
    trainer = Trainer(model, cfg, device=device, callbacks=[spy])
    history = trainer.fit(ListLoader(x, y, 32), ListLoader(x, y, 64, shuffle=False))
    return trainer, spy, history


def test_fp16_with_grad_scaler_on_cpu() -> None:
    trainer, spy, history = _fit("fp16", "cpu")
    assert trainer.scaler is not None and trainer.scaler.is_enabled()
    assert set(spy.dtypes) == {torch.float16}
    assert spy.scales and all(s > 1.0 for s in spy.scales)
    assert all(math.isfinite(v) for v in history.train_loss)
    assert history.train_loss[-1] < history.train_loss[0]


def test_channels_last_converts_model_and_inputs() -> None:
    trainer, _, history = _fit("off", "cpu", channels_last=True)
    conv = trainer.model[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert math.isfinite(history.train_loss[-1])


@pytest.mark.gpu
def test_auto_amp_on_cuda_picks_bf16_or_fp16_with_scaler() -> None:
    trainer, spy, history = _fit("auto", "cuda")
    if native_bf16(torch.cuda.current_device()):
        assert trainer.amp is not None and trainer.amp.name == "bf16"
        assert set(spy.dtypes) == {torch.bfloat16} and trainer.scaler is None
    else:
        assert trainer.amp is not None and trainer.amp.name == "fp16"
        assert set(spy.dtypes) == {torch.float16} and trainer.scaler is not None
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert history.val_accuracy[-1] > 0.9


@pytest.mark.gpu
def test_fp16_on_cuda_uses_grad_scaler_and_learns() -> None:
    trainer, spy, history = _fit("fp16", "cuda")
    assert trainer.scaler is not None and trainer.scaler.is_enabled()
    assert set(spy.dtypes) == {torch.float16}
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.val_accuracy[-1] > 0.9


@pytest.mark.gpu
def test_bf16_on_cuda_matches_fp32_closely() -> None:
    if not native_bf16(torch.cuda.current_device()):
        pytest.skip("this GPU has no native bfloat16")
    _, spy, h_bf16 = _fit("bf16", "cuda")
    _, _, h_fp32 = _fit("off", "cuda")
    assert set(spy.dtypes) == {torch.bfloat16}
    assert h_bf16.val_loss[-1] == pytest.approx(h_fp32.val_loss[-1], rel=0.1, abs=0.02)
