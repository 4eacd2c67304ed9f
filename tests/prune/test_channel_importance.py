"""Channel importance: filter norms, BN scale, first-order Taylor against a direct reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.data import DeviceLoader, load_dataset
from slimtorch.models import create_model
from slimtorch.prune.channel import (
    ChannelPruneConfig,
    build_graph,
    channel_scores,
    prune_channels_,
)


def _scores(model: nn.Module, x: torch.Tensor, method: str, **kw):
    graph = build_graph(model, x)
    groups = [g for g in graph.groups if not g.fixed]
    return graph, {
        g.name: channel_scores(model, graph, groups, method, **kw)[g.root] for g in groups
    }


def test_l1_l2_normalise_each_layer_of_a_residual_group() -> None:
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4, bias=False)
            self.b = nn.Linear(3, 4, bias=False)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.a(x) + self.b(x))

    net = Res()
    with torch.no_grad():
        net.a.weight.copy_(torch.tensor([[1.0, 0, 0], [2, 0, 0], [3, 0, 0], [2, 0, 0]]))
        net.b.weight.copy_(100 * torch.tensor([[4.0, 0, 0], [1, 0, 0], [1, 0, 0], [2, 0, 0]]))
    _, s = _scores(net, torch.randn(2, 3), "l1")
    scores, used = s["a"]
    # a / mean(a) = [.5, 1, 1.5, 1]; b / mean(b) = [2, .5, .5, 1]; averaged
    torch.testing.assert_close(scores, torch.tensor([1.25, 0.75, 1.0, 1.0], dtype=torch.float64))
    assert used == "l1"
    l2, _ = _scores(net, torch.randn(2, 3), "l2")[1]["a"]
    torch.testing.assert_close(l2, scores)  # one non-zero weight per row: l1 == l2


def test_bn_scale_and_fallback_without_batchnorm() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.ReLU(),
        nn.Conv2d(5, 2, 1),
    )  # fmt: skip
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, -2.0, 0.1, 1.0]))
    _, s = _scores(net, torch.randn(1, 3, 2, 2), "bn_scale")
    torch.testing.assert_close(s["0"][0], torch.tensor([0.5, 2.0, 0.1, 1.0], dtype=torch.float64))
    assert s["0"][1] == "bn_scale"
    assert s["3"][1] == "l1 (no BatchNorm in group)"
    report = prune_channels_(net, ChannelPruneConfig(ratio=0.5, importance="bn_scale", round_to=1),
                             torch.randn(1, 3, 2, 2))  # fmt: skip
    assert net[0].out_channels == 2 and net[1].weight.abs().tolist() == [2.0, 1.0]
    assert report.rows[0].importance == "bn_scale"


def test_taylor_matches_a_direct_computation() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    want = torch.zeros(6, dtype=torch.float64)
    for x, y in batches:
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        w, b = net[0].weight, net[0].bias
        t = (w.grad * w).sum(1) + b.grad * b
        want += t.double().detach() ** 2
    want /= len(batches)
    net.zero_grad(set_to_none=True)
    net.train()
    net[2].weight.requires_grad_(False)
    _, s = _scores(net, torch.randn(2, 4), "taylor", calibration=batches)
    torch.testing.assert_close(s["0"][0], want)
    assert net.training and not net[2].weight.requires_grad and net[0].weight.grad is None


def test_taylor_needs_calibration() -> None:
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="calibration"):
        prune_channels_(net, ChannelPruneConfig(importance="taylor"), torch.randn(2, 4))
    with pytest.raises(ValueError, match="no calibration batches"):
        prune_channels_(net, ChannelPruneConfig(importance="taylor"), torch.randn(2, 4),
                        calibration=[])  # fmt: skip
    assert net[0].out_features == 16


def test_taylor_on_real_mnist_batches(shared_data: Path) -> None:
    test = load_dataset("mnist", "test", root=shared_data / "mnist", download=False)
    loader = DeviceLoader(test, 64)
    model = create_model("lenet5", num_classes=10, in_channels=1, input_size=28)
    x = next(iter(loader))[0][:4]
    cfg = ChannelPruneConfig(ratio=0.5, importance="taylor", calibration_batches=2)
    report = prune_channels_(model, cfg, x, calibration=loader)
    assert {r.importance for r in report.pruned} == {"taylor"}
    assert model.fc1.out_features == 64 and model.fc2.out_features == 40
    assert torch.isfinite(model(x)).all()


def test_row_norms_are_the_same_in_chunks() -> None:
    # rows are reduced a chunk at a time (a float64 copy of a whole VGG fc6 took 1.5 GB)
    from slimtorch.prune.channel.importance import _reduce_rows

    w = torch.randn(10, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    for p in (1, 2):
        whole = w.double().reshape(10, -1).norm(p=p, dim=1)
        torch.testing.assert_close(_reduce_rows(w, p, chunk=3), whole)
