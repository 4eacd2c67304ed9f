"""Guards of ``decompose_`` against degenerate values: a result is kept only if it is usable.

:func:`checked` runs one layer's factorisation and turns into a skip, with its reason, what
would otherwise be written into the model: a layer whose weights hold NaN/Inf, a rank spec that
found no rank (:class:`~slimtorch.decompose.ranks.NoRankError`), and factors or an error that
came out non-finite. :func:`prefactor_tucker` runs the batched Tucker-2 of
:mod:`slimtorch.decompose.prefactor` on kernels divided by their
:func:`~slimtorch.decompose.linalg.unit_scale`, as :func:`~slimtorch.decompose.tucker.tucker2`
does, so batched factors do not depend on the weights' scale either.

Example:
    >>> from slimtorch.decompose.handlers import build_svd
    >>> layer = nn.Linear(16, 16)
    >>> checked(layer, lambda: build_svd(layer, 4)).ranks
    [4]
    >>> with torch.no_grad():
    ...     _ = layer.weight.fill_(float("nan"))
    >>> checked(layer, lambda: build_svd(layer, 4))
    Traceback (most recent call last):
        ...
    slimtorch.decompose.handlers.SkipLayer: weights hold NaN/Inf; ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.decompose import prefactor
from slimtorch.decompose.handlers import Factorised, SkipLayer
from slimtorch.decompose.linalg import unit_scale
from slimtorch.decompose.ranks import NoRankError
from slimtorch.decompose.tucker import Tucker2Factors


def checked(module: nn.Module, make: Callable[[], Factorised]) -> Factorised:
    """``make()``, the factorisation of ``module``, if its inputs and result are usable.

    Args:
        module: The layer being factorised.
        make: Builds the factorised layer (a handler call or a budget plan's choice).

    Returns:
        What ``make`` returned.

    Raises:
        SkipLayer: ``module``'s parameters hold NaN/Inf (``make`` is then not called), the
            rank spec found no rank, or the factorised layer has a non-finite parameter or
            relative error; the original layer is then kept.
    """
    if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
        raise SkipLayer("weights hold NaN/Inf; fix or re-initialise the layer first")
    try:
        result = make()
    except NoRankError as exc:
        raise SkipLayer(str(exc)) from None
    bad = [n for n, p in result.module.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad or not math.isfinite(result.rel_error):
        peak = max((float(p.detach().abs().max()) for p in module.parameters()), default=0.0)
        raise SkipLayer(
            f"decomposition gave non-finite factors (rel_error {result.rel_error:.4g}, "
            f"non-finite parameters: {', '.join(bad) or 'none'}) from weights of max |w| = "
            f"{peak:.3g}; kept the original layer; rescale the weights or try another method "
            "or rank"
        )
    return result


def prefactor_tucker(
    requests: Sequence[prefactor.Request], **options: Any
) -> dict[tuple[Any, ...], Any]:
    """:func:`~slimtorch.decompose.prefactor.prefactor` of Tucker-2 requests, scale-invariant.

    Each kernel is divided by its :func:`~slimtorch.decompose.linalg.unit_scale` (a power of
    two, so exactly) before the batch and its core multiplied by it after; the keys stay those
    of the original kernels, so the handlers find the results as before.
    """
    units = {key: unit_scale(weight) for _, key, weight, _ in requests}
    scaled = [(m, key, weight / units[key], ranks) for m, key, weight, ranks in requests]
    out = prefactor.prefactor(scaled, **options)
    return {key: Tucker2Factors(f.core * units[key], f.u_out, f.u_in) for key, f in out.items()}


__all__ = ["checked", "prefactor_tucker"]
