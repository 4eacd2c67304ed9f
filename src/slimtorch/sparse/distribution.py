"""Layer-wise sparsity distributions for sparse training: uniform and Erdos-Renyi-Kernel (ERK).

ERK (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners", arXiv:1911.11134,
after the Erdos-Renyi scaling of Mocanu et al. 2018, arXiv:1707.04780) gives a layer of shape
``(n_out, n_in, k_h, k_w)`` a density proportional to ``(n_out + n_in + k_h + k_w) /
(n_out * n_in * k_h * k_w)`` (``(n_out + n_in) / (n_out * n_in)`` for a linear layer), scaled so
the layers together keep ``(1 - sparsity)`` of their weights. Small layers end up denser than
large ones. When the scale would push a layer's density above 1, that layer is made dense, its
weights are charged to the budget, and the scale is solved again for the rest (repeated until
no density exceeds 1).

``uniform`` gives every sparse layer the same ``sparsity``. Layers named in ``dense`` (e.g. the
first and last layer) are kept dense by both; ERK charges them to the budget, so the total
density is still ``1 - sparsity``, while uniform leaves the other layers at ``sparsity``.

Example:
    >>> shapes = {"conv": (64, 64, 3, 3), "fc": (10, 256)}
    >>> d = erk_densities(shapes, 0.9)  # the small fc layer would exceed 1: it goes dense
    >>> round(d["conv"], 4), d["fc"]
    (0.0375, 1.0)
    >>> layer_nonzeros(shapes, d)
    {'conv': 1382, 'fc': 2560}
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import torch

from slimtorch.prune.masks import check_sparsity

DISTRIBUTIONS = ("erk", "uniform")


def _check_shapes(shapes: Mapping[str, Sequence[int]], dense: Collection[str]) -> None:
    if not shapes:
        raise ValueError("shapes is empty; pass at least one layer shape")
    for name, shape in shapes.items():
        if not shape or any(int(s) < 1 for s in shape):
            raise ValueError(f"layer {name!r} has shape {tuple(shape)}; every size must be >= 1")
    unknown = sorted(set(dense) - set(shapes))
    if unknown:
        raise ValueError(f"dense names {unknown} are not among the layers {sorted(shapes)}")


def uniform_densities(
    shapes: Mapping[str, Sequence[int]], sparsity: float, *, dense: Collection[str] = ()
) -> dict[str, float]:
    """Density ``1 - sparsity`` for every layer, ``1.0`` for those named in ``dense``.

    Example:
        >>> uniform_densities({"a": (4, 4), "b": (8, 4)}, 0.75, dense=["a"])
        {'a': 1.0, 'b': 0.25}
    """
    sparsity = check_sparsity(sparsity)
    _check_shapes(shapes, dense)
    return {name: 1.0 if name in dense else 1.0 - sparsity for name in shapes}


def erk_densities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    *,
    dense: Collection[str] = (),
    power: float = 1.0,
) -> dict[str, float]:
    """ERK densities whose weighted total is ``1 - sparsity`` (see the module docstring).

    Args:
        shapes: Layer name -> weight shape.
        sparsity: Fraction of all the weights to remove, in [0, 1).
        dense: Layers kept dense (their weights count towards the budget).
        power: Exponent on the ERK ratio (1 is ERK; 0 is uniform over the sparse layers).

    Returns:
        Layer name -> density in (0, 1], in the order of ``shapes``.

    Raises:
        ValueError: the dense layers alone hold more than ``1 - sparsity`` of the weights, or
            the arguments are out of range.

    Example:
        >>> d = erk_densities({"big": (512, 512), "small": (10, 512)}, 0.95)
        >>> round(d["big"], 4), round(d["small"], 4)
        (0.0338, 0.8813)
    """
    sparsity = check_sparsity(sparsity)
    _check_shapes(shapes, dense)
    if not isinstance(power, int | float) or isinstance(power, bool) or power < 0:
        raise ValueError(f"power must be a number >= 0, got {power!r}")
    numel = {name: math.prod(int(s) for s in shape) for name, shape in shapes.items()}
    budget = (1.0 - sparsity) * sum(numel.values())
    fixed = set(dense)
    while True:
        free = [n for n in shapes if n not in fixed]
        left = budget - sum(numel[n] for n in fixed)
        if not free:
            if left < -0.5:
                raise ValueError(
                    f"the dense layers hold {budget - left:.0f} weights, more than "
                    f"the budget {budget:.0f} at sparsity {sparsity}; lower the sparsity or keep "
                    "fewer layers dense"
                )
            return {n: 1.0 for n in shapes}
        if left <= 0:
            raise ValueError(
                f"the dense layers {sorted(fixed)} already use the whole budget of {budget:.0f} "
                f"weights at sparsity {sparsity}; lower the sparsity or keep fewer layers dense"
            )
        raw = {n: (sum(shapes[n]) / numel[n]) ** power for n in free}
        eps = left / sum(raw[n] * numel[n] for n in free)
        top = max(raw.values())
        if eps * top <= 1.0:
            return {n: 1.0 if n in fixed else eps * raw[n] for n in shapes}
        fixed |= {n for n in free if raw[n] == top}


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: str = "erk",
    *,
    dense: Collection[str] = (),
) -> dict[str, float]:
    """Densities by name of the distribution: ``"erk"`` or ``"uniform"``.

    Example:
        >>> layer_densities({"a": (4, 4)}, 0.5, "uniform")
        {'a': 0.5}
    """
    if distribution == "erk":
        return erk_densities(shapes, sparsity, dense=dense)
    if distribution == "uniform":
        return uniform_densities(shapes, sparsity, dense=dense)
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def layer_nonzeros(
    shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float]
) -> dict[str, int]:
    """The exact number of nonzeros each layer keeps: ``round(density * numel)``, at least 1.

    Example:
        >>> layer_nonzeros({"a": (10, 10)}, {"a": 0.123})
        {'a': 12}
    """
    out = {}
    for name, shape in shapes.items():
        n = math.prod(int(s) for s in shape)
        out[name] = min(n, max(1, round(densities[name] * n)))
    return out


def exact_nonzeros(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: str = "erk",
    *,
    dense: Collection[str] = (),
) -> dict[str, int]:
    """Active weights per layer at :func:`layer_densities`, their total exact, refusing a layer
    left with no weight.

    Each layer gets ``floor(density * numel)`` and the weights the floors leave out of the
    total go one each to the layers with the largest remainders (rounding each layer on its
    own, as :func:`layer_nonzeros` does, missed the total by a few weights); a share under one
    weight is raised to one and the surplus taken back from the layers with the smallest
    remainders. Where a layer's share rounds to zero, or one weight per layer is already more
    than the total, the sparsity could not be exact; this raises instead.

    Raises:
        ValueError: a layer would keep no weight at this sparsity (``{"a": (2, 2)}`` at 0.9),
            or the layers cannot each keep one weight within the total.

    Example:
        >>> exact_nonzeros({"a": (10, 10)}, 0.9, "uniform")
        {'a': 10}
    """
    densities = layer_densities(shapes, sparsity, distribution, dense=dense)
    numel = {name: math.prod(int(s) for s in shape) for name, shape in shapes.items()}
    empty = [n for n in shapes if round(densities[n] * numel[n]) < 1]
    if empty:
        listing = ", ".join(
            f"{n!r} ({numel[n]} weights, {densities[n] * numel[n]:.2f} at density "
            f"{densities[n]:.3g})"
            for n in empty
        )
        raise ValueError(
            f"sparsity {sparsity} ({distribution}) cannot be met: layer(s) {listing} would keep "
            "no weight at all; lower the sparsity, keep these layers dense "
            "(dense_first/dense_last) or exclude them"
        )
    share = {n: densities[n] * numel[n] for n in shapes}
    out = {n: min(numel[n], max(1, math.floor(share[n]))) for n in shapes}
    left = round(sum(share.values())) - sum(out.values())
    by_remainder = sorted(shapes, key=lambda n: share[n] - math.floor(share[n]), reverse=True)
    for name in by_remainder[: max(left, 0)]:  # largest remainders first, one weight each
        out[name] = min(numel[name], out[name] + 1)
    for name in reversed(by_remainder):  # shares under 1 raised to 1: take the surplus back
        if left >= 0:
            break
        if out[name] > 1:
            out[name], left = out[name] - 1, left + 1
    if left < 0:
        raise ValueError(
            f"sparsity {sparsity} ({distribution}) cannot be met exactly: {len(out)} layers "
            f"keeping one weight each already exceed the {round(sum(share.values()))} weights "
            "it leaves; lower the sparsity or exclude some of the layers"
        )
    return out


def random_mask(
    shape: Sequence[int], nonzeros: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A ``bool`` mask of ``shape`` with exactly ``nonzeros`` ``True`` entries, uniformly at random.

    Drawn on the CPU from ``generator``, so the same seed gives the same mask on every device
    and every DDP rank.

    Example:
        >>> m = random_mask((8, 8), 10, torch.Generator().manual_seed(0))
        >>> int(m.sum()), m.shape
        (10, torch.Size([8, 8]))
    """
    numel = math.prod(int(s) for s in shape)
    if not 0 <= nonzeros <= numel:
        raise ValueError(
            f"nonzeros must be in [0, {numel}] for shape {tuple(shape)}, got {nonzeros}"
        )
    keep = torch.zeros(numel, dtype=torch.bool)
    keep[torch.randperm(numel, generator=generator)[:nonzeros]] = True
    return keep.view(*shape)


@torch.no_grad()
def scale_to_active_fan_in_(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Scale each output unit's weights by ``sqrt(fan_in / active fan_in)`` (in place), so a
    sparse unit starts with the dense unit's pre-activation variance; units with no active
    weight are left alone (see :attr:`SparseTrainingConfig.scale_init`).

    Example:
        >>> w = torch.ones(2, 4)
        >>> scale_to_active_fan_in_(w, torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]]).bool())
        >>> w[:, 0].tolist()
        [2.0, 1.0]
    """
    rows = mask.reshape(mask.shape[0], -1)  # (out, fan_in)
    active = rows.sum(dim=1).clamp(min=1).to(weight.dtype)
    scale = (rows.shape[1] / active).sqrt()
    weight.mul_(scale.view(-1, *([1] * (weight.ndim - 1))))
