"""The dense reference's own precision sets the tolerance sparse kernels are held to."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.sparse.sparsify import _default_tolerance

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


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
