"""Calls that run a model in eval (or train) mode give each submodule back its own mode."""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.quant import LowPrecisionConfig, cast_
from slimtorch.train import TrainConfig, Trainer, recalibrate_batchnorm_


def _frozen_inside_training() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    )  # fmt: skip
    net.train()
    net[1].eval()  # a batch norm the user froze
    net[3].eval()  # and a dropout
    return net


def _modes(net: nn.Module) -> list[bool]:
    return [m.training for m in net.modules()]


def test_evaluate_cast_and_recalibration_keep_frozen_modules_frozen() -> None:
    # model.train(was) set every submodule to the root's flag: the frozen batch norm came
    # back in train mode and its running statistics moved on the next forward
    x = torch.randn(8, 1, 8, 8)
    batches = [(x, torch.randint(0, 3, (8,)))]
    for call in (
        lambda net: Trainer(net, TrainConfig()).evaluate(batches),
        lambda net: cast_(
            net, LowPrecisionConfig(dtype="bf16", max_output_error=10.0), check_inputs=x
        ),
        lambda net: recalibrate_batchnorm_(net, [x]),
    ):
        net = _frozen_inside_training()
        before = _modes(net)
        call(net)
        assert _modes(net) == before
        stats = net[1].running_mean.clone()
        net(x.to(next(net.parameters()).dtype))
        torch.testing.assert_close(net[1].running_mean, stats)
