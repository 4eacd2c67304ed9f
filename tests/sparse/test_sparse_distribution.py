"""ERK and uniform layer densities, exact counts, random masks, and the drop-and-grow maths."""

from __future__ import annotations

import math

import pytest
import torch

from slimtorch.sparse import (
    cosine_drop_fraction,
    drop_and_grow,
    drop_count,
    erk_densities,
    layer_densities,
    layer_nonzeros,
    random_mask,
    uniform_densities,
)

SHAPES = {
    "conv1": (16, 3, 3, 3),
    "conv2": (32, 16, 3, 3),
    "conv3": (64, 32, 3, 3),
    "fc1": (128, 1024),
    "fc2": (10, 128),
}
NUMEL = {n: math.prod(s) for n, s in SHAPES.items()}


def _raw(shape: tuple[int, ...]) -> float:
    return sum(shape) / math.prod(shape)


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95])
def test_erk_keeps_the_total_budget_and_the_erk_ratios(sparsity: float) -> None:
    d = erk_densities(SHAPES, sparsity)
    total = sum(d[n] * NUMEL[n] for n in SHAPES)
    assert total == pytest.approx((1 - sparsity) * sum(NUMEL.values()), rel=1e-9)
    assert all(0 < v <= 1 for v in d.values())
    sparse = [n for n in SHAPES if d[n] < 1.0]
    eps = d[sparse[0]] / _raw(SHAPES[sparse[0]])
    for n in sparse:  # density proportional to (sum of dims) / (product of dims)
        assert d[n] == pytest.approx(eps * _raw(SHAPES[n]), rel=1e-9)
    for n in SHAPES:
        if d[n] == 1.0:  # a dense layer is one whose ERK density would have exceeded 1
            assert eps * _raw(SHAPES[n]) >= 1.0 - 1e-9


def test_erk_redistributes_when_a_layer_would_exceed_density_one() -> None:
    # the tiny first conv has by far the largest ERK ratio: at 50% sparsity it saturates
    d = erk_densities(SHAPES, 0.5)
    assert d["conv1"] == 1.0
    naive_eps = 0.5 * sum(NUMEL.values()) / sum(_raw(SHAPES[n]) * NUMEL[n] for n in SHAPES)
    assert naive_eps * _raw(SHAPES["conv1"]) > 1.0  # what the naive scale would have given
    # the others share exactly what is left
    dense_weights = sum(NUMEL[n] for n in SHAPES if d[n] == 1.0)
    rest = sum(d[n] * NUMEL[n] for n in SHAPES if d[n] < 1.0)
    assert rest == pytest.approx(0.5 * sum(NUMEL.values()) - dense_weights)


def test_dense_layers_count_towards_the_erk_budget_but_not_the_uniform_one() -> None:
    d = erk_densities(SHAPES, 0.9, dense=["conv1", "fc2"])
    assert d["conv1"] == d["fc2"] == 1.0
    assert sum(d[n] * NUMEL[n] for n in SHAPES) == pytest.approx(0.1 * sum(NUMEL.values()))
    u = uniform_densities(SHAPES, 0.9, dense=["conv1"])
    assert u["conv1"] == 1.0 and all(u[n] == pytest.approx(0.1) for n in SHAPES if n != "conv1")
    assert layer_densities(SHAPES, 0.9, "uniform") == uniform_densities(SHAPES, 0.9)
    with pytest.raises(ValueError, match="already use the whole budget"):
        erk_densities(SHAPES, 0.99, dense=["fc1"])
    with pytest.raises(ValueError, match="distribution must be one of"):
        layer_densities(SHAPES, 0.9, "normal")
    with pytest.raises(ValueError, match="not among the layers"):
        erk_densities(SHAPES, 0.9, dense=["fc9"])
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        erk_densities(SHAPES, 1.0)


def test_power_zero_is_uniform_over_the_sparse_layers() -> None:
    d = erk_densities(SHAPES, 0.8, power=0.0)
    assert all(v == pytest.approx(0.2) for v in d.values())


def test_exact_counts_and_random_masks() -> None:
    d = erk_densities(SHAPES, 0.9)
    counts = layer_nonzeros(SHAPES, d)
    for n in SHAPES:
        assert counts[n] == min(NUMEL[n], max(1, round(d[n] * NUMEL[n])))
    assert layer_nonzeros({"a": (1000,)}, {"a": 1e-6}) == {"a": 1}  # never an empty layer
    m1 = random_mask(SHAPES["conv3"], counts["conv3"], torch.Generator().manual_seed(4))
    m2 = random_mask(SHAPES["conv3"], counts["conv3"], torch.Generator().manual_seed(4))
    m3 = random_mask(SHAPES["conv3"], counts["conv3"], torch.Generator().manual_seed(5))
    assert m1.dtype == torch.bool and m1.shape == SHAPES["conv3"]
    assert int(m1.sum()) == counts["conv3"]
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    with pytest.raises(ValueError, match="nonzeros must be in"):
        random_mask((2, 2), 5)


def test_cosine_drop_fraction() -> None:
    alpha, t_end = 0.3, 1000
    for t in (0, 100, 250, 500, 999):
        assert cosine_drop_fraction(t, alpha, t_end) == pytest.approx(
            alpha / 2 * (1 + math.cos(math.pi * t / t_end))
        )
    assert cosine_drop_fraction(1000, alpha, t_end) == 0.0
    assert cosine_drop_fraction(5000, alpha, t_end) == 0.0
    values = [cosine_drop_fraction(t, alpha, t_end) for t in range(0, 1000, 50)]
    assert values == sorted(values, reverse=True)
    assert drop_count(100, 0.3) == 30 and drop_count(7, 0.3) == 2 and drop_count(5, 0.0) == 0


def test_drop_and_grow_drops_smallest_and_grows_highest_inactive() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(20, 30, generator=gen)
    mask = random_mask((20, 30), 150, gen)
    w = w.masked_fill(~mask, 0.0)
    scores = torch.rand(20, 30, generator=gen)
    n = 40
    new = drop_and_grow(w, mask, scores, n)
    assert int(new.sum()) == int(mask.sum()) == 150
    dropped = mask & ~new
    grown = new & ~mask
    assert int(dropped.sum()) == int(grown.sum())
    # the survivors of the old mask are exactly the (150 - n) largest magnitudes
    survivors = torch.zeros_like(mask)
    order = torch.sort(torch.where(mask, w.abs(), torch.tensor(-1.0)).flatten(), descending=True)
    survivors.view(-1)[order.indices[: 150 - n]] = True
    assert bool(new[survivors].all())
    # every newly active entry outscores every inactive entry left out
    after_drop = survivors
    candidates = ~after_drop
    chosen = new & candidates
    assert int(chosen.sum()) == n
    assert scores[chosen].min() >= scores[candidates & ~new].max()


def test_drop_and_grow_can_regrow_a_just_dropped_weight_and_handles_edge_cases() -> None:
    w = torch.tensor([0.1, 5.0, 0.0, 0.0])
    mask = torch.tensor([True, True, False, False])
    # the dropped weight (index 0) has the best grow score: it comes straight back
    assert drop_and_grow(w, mask, torch.tensor([9.0, 0.0, 1.0, 2.0]), 1).tolist() == [
        True,
        True,
        False,
        False,
    ]
    # NaN / inf scores never pick an active entry, the count stays exact
    nan_scores = torch.tensor([float("nan"), float("nan"), float("nan"), float("-inf")])
    assert int(drop_and_grow(w, mask, nan_scores, 2).sum()) == 2
    assert torch.equal(drop_and_grow(w, mask, torch.zeros(4), 0), mask)
    assert int(drop_and_grow(w, mask, torch.zeros(4), 99).sum()) == 2  # clamped
    with pytest.raises(ValueError, match="same shape"):
        drop_and_grow(w, mask, torch.zeros(5), 1)


@pytest.mark.parametrize("sparsity", [0.8, 0.9, 0.999])
def test_the_total_is_exact_at_every_sparsity(sparsity: float) -> None:
    from slimtorch.models import create_model
    from slimtorch.sparse.distribution import exact_nonzeros

    model = create_model("resnet20", num_classes=10, in_channels=1, input_size=28)
    shapes = {
        n: tuple(m.weight.shape)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    }
    total = sum(math.prod(s) for s in shapes.values())
    counts = exact_nonzeros(shapes, sparsity, "erk")
    assert sum(counts.values()) == round((1 - sparsity) * total)  # each rounded alone: 27,087
    assert all(1 <= counts[n] <= math.prod(shapes[n]) for n in shapes)
