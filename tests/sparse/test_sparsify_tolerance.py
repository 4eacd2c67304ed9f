"""The dense reference's own precision sets the tolerance sparse kernels are held to."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.sparse.sparsify import _default_tolerance

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def ampere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))


def test_tf32_convolutions_on_cuda_get_tf32_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = nn.Conv2d(4, 4, 3)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert _default_tolerance(conv, torch.float32, CUDA) == (2e-3, 2e-3)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert _default_tolerance(conv, torch.float32, CUDA) == (1e-4, 1e-4)


def test_linear_follows_the_matmul_switch() -> None:
    lin = nn.Linear(4, 4)
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert _default_tolerance(lin, torch.float32, CUDA) == (1e-4, 1e-4)
        matmul.allow_tf32 = True
        assert _default_tolerance(lin, torch.float32, CUDA) == (2e-3, 2e-3)
    finally:
        matmul.allow_tf32 = before


def test_cpu_and_half_precision_keep_their_tolerances() -> None:
    conv = nn.Conv2d(4, 4, 3)
    assert _default_tolerance(conv, torch.float32, CPU) == (1e-4, 1e-4)
    assert _default_tolerance(conv, torch.float16, CUDA) == (1e-2, 1e-2)
    assert _default_tolerance(conv, torch.bfloat16, CPU) == (2e-2, 2e-2)


@pytest.mark.parametrize(("hip", "capability"), [(None, (6, 1)), (None, (7, 5)), ("6.0", (8, 0))])
def test_gpus_without_tf32_keep_the_float32_tolerance(
    monkeypatch: pytest.MonkeyPatch, hip: str | None, capability: tuple[int, int]
) -> None:
    # allow_tf32 defaults to True everywhere, but only NVIDIA Ampere and later have TF32: the
    # GTX 1060, a T4 and the RX 580 accepted kernels 20x less exact than float32
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert _default_tolerance(nn.Conv2d(4, 4, 3), torch.float32, CUDA) == (1e-4, 1e-4)
