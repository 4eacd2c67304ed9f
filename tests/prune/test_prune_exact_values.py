"""Exact values of magnitude pruning, mask buffers, the mask callbacks and Taylor importance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.prune import (
    GradualPruning,
    MagnitudeConfig,
    MaskCallback,
    add_mask_buffers_,
    get_mask,
    prune_,
)
from slimtorch.prune.channel import build_graph, channel_scores
from slimtorch.train import Callback, TrainConfig, Trainer


def _batches(n: int = 32, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _sgd(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        epochs=1,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        schedule="constant",
        amp="off",
        seed=5,
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


def test_repruning_treats_already_pruned_weights_as_zero_even_if_revived() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 10))
    prune_(net, MagnitudeConfig(sparsity=0.5))
    old = get_mask(net[0])
    assert old is not None
    old = old.clone()
    with torch.no_grad():  # masked entries revived far above every kept magnitude
        net[0].weight.add_(torch.where(old, 0.0, 1.0))
    kept = net[0].weight.detach().clone()
    prune_(net, MagnitudeConfig(sparsity=0.6))
    # 60 of 100: the 50 old ones plus the 10 smallest |w| among the 50 kept
    order = torch.where(old, kept.abs(), torch.inf).flatten().argsort()
    want = old.clone().flatten()
    want[order[:10]] = False
    mask = get_mask(net[0])
    assert mask is not None
    assert torch.equal(mask, want.view(10, 10))
    assert int((~mask).sum()) == 60
    assert int((net[0].weight == 0).sum()) == 60


def test_a_layer_with_exactly_min_params_weights_is_pruned() -> None:
    net = nn.Sequential(nn.Linear(4, 4))  # 16 weights == min_params: not below it
    report = prune_(net, MagnitudeConfig(sparsity=0.5, min_params=16))
    assert report.rows[0].action == "pruned"
    assert report.rows[0].zeros_after == 8
    assert int((net[0].weight == 0).sum()) == 8


def test_a_lower_sparsity_never_revives_pruned_weights() -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    prune_(net, MagnitudeConfig(sparsity=0.5))
    first = net[0].weight_mask.clone()
    prune_(net, MagnitudeConfig(sparsity=0.0))
    assert int(net[0].weight_mask.sum()) == 8
    assert torch.equal(net[0].weight_mask, first)


def test_replaying_mask_buffers_keeps_an_existing_mask() -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    prune_(net, MagnitudeConfig(sparsity=0.5))
    first = net[0].weight_mask.clone()
    add_mask_buffers_(net, {"layers": ["0"]})
    assert int(net[0].weight_mask.sum()) == 8
    assert torch.equal(net[0].weight_mask, first)


def test_gradual_pruning_clears_the_momentum_of_newly_pruned_weights() -> None:
    model = _mlp()
    cb = GradualPruning(MagnitudeConfig(sparsity=0.5), start_step=2, end_step=2, frequency=1)
    trainer = Trainer(model, _sgd(), callbacks=[cb])
    trainer.fit(_batches())
    assert trainer.global_step == 4 and cb.history == [(2, 0.5)]
    assert trainer.optimizer is not None
    for i in (0, 2):
        mask = get_mask(model[i])
        assert mask is not None and int((~mask).sum()) == mask.numel() // 2
        buf = trainer.optimizer.state[model[i].weight]["momentum_buffer"]
        assert torch.equal(buf[~mask], torch.zeros(mask.numel() // 2))


class _RawGrads(Callback):
    """The gradients as backward left them, before any callback masks them."""

    def __init__(self) -> None:
        self.grads: dict[int, torch.Tensor] = {}

    def on_after_backward(self, trainer: Trainer) -> None:
        for p in trainer.unwrapped_model.parameters():
            assert p.grad is not None
            self.grads[id(p)] = p.grad.detach().clone()


def test_clipping_sees_only_the_gradients_of_unpruned_weights() -> None:
    model = _mlp()
    prune_(model, MagnitudeConfig(sparsity=0.8))
    raw = _RawGrads()
    trainer = Trainer(model, _sgd(grad_clip_norm=0.1), callbacks=[raw, MaskCallback()])
    trainer.fit(_batches(n=8))  # one step
    squares = torch.zeros((), dtype=torch.float64)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            g = raw.grads[id(p)].double()
            mask = get_mask(module, name)
            squares += (g if mask is None else g * mask).pow(2).sum()
    assert trainer.last_grad_norm is not None
    torch.testing.assert_close(trainer.last_grad_norm.double(), squares.sqrt(), rtol=1e-6, atol=0.0)


def test_taylor_max_batches_uses_exactly_the_first_batches() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    graph = build_graph(net, torch.randn(2, 4))
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
    x, y = batches[0]
    w, b = net[0].weight, net[0].bias
    gw, gb = torch.autograd.grad(F.cross_entropy(net(x), y), [w, b])
    want = ((gw * w).sum(1) + gb * b).double().detach() ** 2  # first batch only, mean of one
    group = graph.groups[0]
    got = channel_scores(net, graph, [group], "taylor", calibration=batches, max_batches=1)
    torch.testing.assert_close(got[group.root][0], want)
