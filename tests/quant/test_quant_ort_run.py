"""run_onnx: the session's names read once, inputs handed over without a copy where they can be,
every other input cast, and ONNX Runtime's own failures passed on unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from slimtorch.quant.export import export_onnx
from slimtorch.quant.ort_run import ort_session, run_onnx

pytest.importorskip("onnxruntime")


class _Counting:
    """A session that counts how often its input and output names are read."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.reads = 0
        self.fed: list[np.ndarray] = []

    def get_inputs(self) -> Any:
        self.reads += 1
        return self.session.get_inputs()

    def get_outputs(self) -> Any:
        self.reads += 1
        return self.session.get_outputs()

    def run(self, names: Any, feed: dict[str, np.ndarray]) -> Any:
        self.fed.extend(feed.values())
        return self.session.run(names, feed)


def _path(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    return export_onnx(net.eval(), tmp_path / "m.onnx", torch.randn(1, 1, 4, 4))


def test_names_are_read_once_per_session_and_a_float32_input_is_not_copied(
    tmp_path: Path,
) -> None:
    real = ort_session(_path(tmp_path))
    session = _Counting(real)
    x = torch.randn(2, 1, 4, 4)
    want = torch.from_numpy(real.run(None, {"input": x.numpy()})[0])
    for _ in range(3):
        assert torch.equal(run_onnx(session, x), want)
    assert session.reads == 2  # one get_inputs, one get_outputs, on the first call only
    assert all(np.shares_memory(a, x.numpy()) for a in session.fed)
    other = _Counting(real)  # a second session reads its own names
    run_onnx(other, x)
    assert other.reads == 2


def test_inputs_of_another_dtype_layout_or_autograd_state_are_cast_and_give_the_same_answer(
    tmp_path: Path,
) -> None:
    session = ort_session(_path(tmp_path))
    x = torch.randn(2, 1, 4, 4)
    want = run_onnx(session, x)
    wide = x.double()
    strided = torch.randn(2, 1, 4, 8)[..., ::2]
    strided.copy_(x)
    assert not strided.is_contiguous()
    for variant in (wide, strided, x.clone().requires_grad_(True)):
        assert torch.allclose(run_onnx(session, variant), want, atol=1e-6)
    assert run_onnx(session, x).dtype == torch.float32


def test_a_failure_that_is_not_the_shape_is_passed_on_unchanged(tmp_path: Path) -> None:
    real = ort_session(_path(tmp_path))

    class Failing(_Counting):
        def run(self, names: Any, feed: dict[str, np.ndarray]) -> Any:
            raise RuntimeError("out of memory in the provider")

    with pytest.raises(RuntimeError, match="out of memory in the provider"):
        run_onnx(Failing(real), torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"input of shape \(1, 1, 5, 4\) does not fit"):
        run_onnx(real, torch.randn(1, 1, 5, 4))  # ORT refuses it; the check names both shapes
