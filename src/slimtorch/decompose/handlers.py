"""Layer handlers: how each config factorises each module type.

Handlers live in :data:`HANDLERS`, keyed by ``(config type, module type)``. A handler picks the
ranks, refuses what it cannot do by raising :class:`SkipLayer` with the reason, checks that the
factorised layer saves parameters, and returns the new module with its reconstruction error.
Register a new one with ``HANDLERS.add((MyConfig, nn.Conv3d), handler)``.

Example:
    >>> handler = HANDLERS.get((TuckerConfig, nn.Conv2d))
    >>> out = handler(nn.Conv2d(16, 16, 3), TuckerConfig(rank=0.25), "conv")
    >>> out.ranks
    [4, 4]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import DecompositionError
from slimtorch.core.registry import Registry
from slimtorch.decompose import prefactor
from slimtorch.decompose.config import (
    CPConfig,
    DecomposeConfig,
    SVDConfig,
    TTConfig,
    TuckerConfig,
)
from slimtorch.decompose.cp import cp_als
from slimtorch.decompose.layers import (
    CPConv2d,
    LowRankConv2d,
    LowRankLinear,
    TTLinear,
    TuckerConv2d,
)
from slimtorch.decompose.layers.tucker_conv import check_plain_conv
from slimtorch.decompose.linalg import relative_error, unfold
from slimtorch.decompose.ranks import rank_from_fraction, round_rank, select_mode_rank
from slimtorch.decompose.svd import truncated_svd
from slimtorch.decompose.tt import tt_matrix, tt_matrix_to_full
from slimtorch.decompose.tucker import tucker2, tucker2_to_full


class SkipLayer(Exception):
    """Raised by a handler to leave a layer untouched; ``args[0]`` is the reason."""


@dataclasses.dataclass
class Factorised:
    """What a handler produced: the new module, its ranks, the weight's relative error."""

    module: nn.Module
    ranks: list[int]
    rel_error: float
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


Handler = Callable[[nn.Module, Any, str], Factorised]
HANDLERS: Registry[Handler] = Registry("decompose handler")


def count_params(module: nn.Module) -> int:
    """Number of parameter elements of ``module``.

    Example:
        >>> count_params(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in module.parameters())


def require_saving(before: int, after: int, config: DecomposeConfig, ranks: list[int]) -> None:
    """Raise :class:`SkipLayer` unless ``after`` saves at least ``config.min_saving``."""
    saving = 1.0 - after / before if before else 0.0
    if after >= before or saving < config.min_saving:
        raise SkipLayer(
            f"would not reduce params enough: {before} -> {after} at ranks {ranks} "
            f"(saving {saving:.1%}, min_saving {config.min_saving:.0%}); lower the rank"
        )


def _plain(conv: nn.Module, method: str, *, spatial: bool = False) -> nn.Conv2d:
    try:
        return check_plain_conv(conv, method, spatial=spatial)
    except (TypeError, ValueError) as exc:
        raise SkipLayer(str(exc)) from None


def _bias_count(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return 0 if bias is None else bias.numel()


def _svd_rank(matrix: torch.Tensor, config: SVDConfig) -> int:
    wide = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.mT  # rows = min(m, n)
    return select_mode_rank(config.rank_spec, wide, round_to=config.round_to)


@HANDLERS.register((SVDConfig, nn.Linear))
def svd_linear(linear: nn.Module, config: SVDConfig, name: str) -> Factorised:
    """Truncated SVD of an ``nn.Linear`` into :class:`LowRankLinear`."""
    assert isinstance(linear, nn.Linear)
    w = linear.weight.detach()  # (out, in)
    rank = _svd_rank(w, config)
    after = rank * (w.shape[0] + w.shape[1]) + _bias_count(linear)
    require_saving(count_params(linear), after, config, [rank])
    return build_svd(linear, rank)


@HANDLERS.register((SVDConfig, nn.Conv2d))
def svd_conv1x1(conv: nn.Module, config: SVDConfig, name: str) -> Factorised:
    """Truncated SVD of a 1x1 ``nn.Conv2d`` into :class:`LowRankConv2d`."""
    conv = _plain(conv, "SVDConfig")
    if tuple(conv.kernel_size) != (1, 1):
        raise SkipLayer(
            f"SVDConfig handles 1x1 convs only, got kernel {tuple(conv.kernel_size)}; use "
            "TuckerConfig or CPConfig for spatial kernels"
        )
    w = conv.weight.detach()[:, :, 0, 0]  # (C_out, C_in)
    rank = _svd_rank(w, config)
    after = rank * (w.shape[0] + w.shape[1]) + _bias_count(conv)
    require_saving(count_params(conv), after, config, [rank])
    return build_svd(conv, rank)


def build_svd(module: nn.Module, rank: int) -> Factorised:
    """Truncated SVD at ``rank`` of an ``nn.Linear`` or a plain 1x1 ``nn.Conv2d`` (no checks of
    the saving: the caller picked the rank).

    Example:
        >>> build_svd(nn.Linear(16, 8), 2).module.rank
        2
    """
    bias: torch.Tensor | None
    if isinstance(module, nn.Linear):
        w = module.weight.detach()  # (out, in)
        a, b = truncated_svd(w, rank)
        bias = None if module.bias is None else module.bias.detach()
        layer: nn.Module = LowRankLinear.from_factors(a, b, bias)
    else:
        conv = _plain(module, "SVDConfig")
        w = conv.weight.detach()[:, :, 0, 0]  # (C_out, C_in)
        a, b = truncated_svd(w, rank)
        bias = None if conv.bias is None else conv.bias.detach()
        layer = LowRankConv2d.from_factors(a, b, bias, stride=conv.stride, padding=conv.padding)
    return Factorised(layer, [rank], float(relative_error(a @ b, w)))


def tucker_ranks(conv: nn.Module, config: TuckerConfig) -> tuple[int, int]:
    """The ``(r_out, r_in)`` the rank spec gives a plain ``nn.Conv2d`` (``SkipLayer`` when the
    factorisation would not save parameters)."""
    conv = _plain(conv, "TuckerConfig")
    w = conv.weight.detach()
    c_out, c_in = w.shape[:2]
    w3 = w.reshape(c_out, c_in, -1)  # (C_out, C_in, kh kw)
    spec = config.rank_spec
    r_out = select_mode_rank(spec, unfold(w3, 0), round_to=config.round_to)
    r_in = select_mode_rank(spec, unfold(w3, 1), round_to=config.round_to)
    k = w3.shape[2]
    after = c_in * r_in + r_in * r_out * k + r_out * c_out + _bias_count(conv)
    require_saving(count_params(conv), after, config, [r_out, r_in])
    return r_out, r_in


@HANDLERS.register((TuckerConfig, nn.Conv2d))
def tucker_conv(conv: nn.Module, config: TuckerConfig, name: str) -> Factorised:
    """Tucker-2 of a dense ``nn.Conv2d`` into :class:`TuckerConv2d`."""
    return build_tucker(conv, tucker_ranks(conv, config), config)


def clamp_tucker_ranks(shape: tuple[int, ...], ranks: tuple[int, int]) -> tuple[int, int]:
    """Ranks within what the kernel's unfoldings allow.

    A mode-n unfolding has rank at most min(rows, cols): a fraction of C_out can ask for more
    (e.g. Conv2d(3, 64, 3): 32 output ranks, but the (64, 27) unfolding has rank 27).

    Example:
        >>> clamp_tucker_ranks((64, 3, 3, 3), (32, 2))
        (27, 2)
    """
    c_out, c_in, kh, kw = shape
    return max(1, min(ranks[0], c_out, c_in * kh * kw)), max(
        1, min(ranks[1], c_in, c_out * kh * kw)
    )


def build_tucker(conv: nn.Module, ranks: tuple[int, int], config: TuckerConfig) -> Factorised:
    """Tucker-2 at ``ranks = (r_out, r_in)`` of a plain ``nn.Conv2d`` (HOOI settings from
    ``config``; no checks of the saving: the caller picked the ranks). Takes the factors from a
    batched run of ``decompose_`` when there is one (:mod:`slimtorch.decompose.prefactor`).

    Example:
        >>> build_tucker(nn.Conv2d(8, 8, 3), (2, 4), TuckerConfig()).ranks
        [2, 4]
    """
    conv = _plain(conv, "TuckerConfig")
    w = conv.weight.detach()
    r_out, r_in = clamp_tucker_ranks(tuple(w.shape), ranks)
    found = prefactor.lookup(prefactor.tucker_key(w, (r_out, r_in), config.n_iter, config.tol))
    if found is not None:
        core, u_out, u_in = found
    else:
        core, u_out, u_in = tucker2(w, (r_out, r_in), n_iter=config.n_iter, tol=config.tol)
    bias = None if conv.bias is None else conv.bias.detach()
    layer = TuckerConv2d.from_factors(
        core, u_out, u_in, bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation
    )
    return Factorised(
        layer, [r_out, r_in], float(relative_error(tucker2_to_full(core, u_out, u_in), w))
    )


def cp_rank(spec_kind: str, value: float, weight_shape: tuple[int, ...]) -> int:
    """CP rank of a conv kernel: an int as given, or a fraction of the parameter-neutral rank.

    Example:
        >>> cp_rank("fraction", 0.5, (16, 16, 3, 3))
        30
    """
    c_out, c_in, kh, kw = weight_shape
    neutral = max(1, (c_out * c_in * kh * kw) // (c_out + c_in + kh + kw))
    return int(value) if spec_kind == "int" else rank_from_fraction(neutral, value)


def cp_conv_rank(conv: nn.Module, config: CPConfig) -> int:
    """The CP rank the rank spec gives a plain spatial ``nn.Conv2d`` (``SkipLayer`` when the
    factorisation would not save parameters)."""
    conv = _plain(conv, "CPConfig", spatial=True)
    w = conv.weight.detach()
    spec = config.rank_spec
    c_out, c_in, kh, kw = w.shape
    rank = cp_rank(spec.kind, spec.value, tuple(w.shape))
    if config.round_to > 1:
        rank = max(config.round_to, config.round_to * math.floor(rank / config.round_to + 0.5))
    after = rank * (c_out + c_in + kh + kw) + _bias_count(conv)
    require_saving(count_params(conv), after, config, [rank])
    return rank


def cp_options(config: CPConfig) -> dict[str, Any]:
    """The ALS settings of ``config`` as keyword arguments of ``cp_als``/``cp_als_many``."""
    return {"n_iter": config.n_iter, "tol": config.tol, "reg": config.reg, "init": config.init}


@HANDLERS.register((CPConfig, nn.Conv2d))
def cp_conv(conv: nn.Module, config: CPConfig, name: str) -> Factorised:
    """CP by damped ALS of a dense spatial ``nn.Conv2d`` into :class:`CPConv2d` (from a batched
    run of ``decompose_`` when there is one)."""
    rank = cp_conv_rank(conv, config)
    conv = _plain(conv, "CPConfig", spatial=True)
    w = conv.weight.detach()
    options = cp_options(config)
    result = prefactor.lookup(prefactor.cp_key(w, rank, options))
    if result is None:
        result = cp_als(w, rank, require_convergence=config.require_convergence, **options)
    elif config.require_convergence and not result.converged:
        raise DecompositionError(
            f"cp_als did not converge at rank {rank}: error change still >= tol={config.tol:g} "
            f"after {result.iterations} sweeps (relative error {result.rel_error:.4g}); raise "
            "n_iter or tol, or lower the rank"
        )
    info = {"iterations": result.iterations, "converged": result.converged}
    return Factorised(CPConv2d.from_result(result, conv), [rank], result.rel_error, info)


def batch_request(
    module: nn.Module, config: DecomposeConfig, ranks: tuple[int, ...] | None
) -> prefactor.Request | None:
    """What ``decompose_`` may factorise in a batch for this layer (``None``: nothing).

    ``ranks`` are the budget plan's choice, or ``None`` to take them from the rank spec as the
    handler would. Any reason the handler would skip the layer gives ``None``.
    """
    if type(module) is not nn.Conv2d or not isinstance(config, TuckerConfig | CPConfig):
        return None
    try:
        w = module.weight.detach()
        if not bool(torch.isfinite(w).all()):
            return None
        if isinstance(config, TuckerConfig):
            pair = tucker_ranks(module, config) if ranks is None else (ranks[0], ranks[1])
            pair = clamp_tucker_ranks(tuple(w.shape), (int(pair[0]), int(pair[1])))
            return ("tucker", prefactor.tucker_key(w, pair, config.n_iter, config.tol), w, pair)
        rank = cp_conv_rank(module, config) if ranks is None else int(ranks[0])
        return ("cp", prefactor.cp_key(w, rank, cp_options(config)), w, rank)
    except (SkipLayer, ValueError, TypeError):
        return None


def split_modes(n: int, d: int) -> tuple[int, ...]:
    """Split ``n`` into ``d`` near-equal integer factors, largest first (``64, 3 -> (4, 4, 4)``).

    Prime factors are dealt, largest first, to the currently smallest slot; a slot may stay 1.

    Example:
        >>> split_modes(120, 3), split_modes(7, 2)
        ((6, 5, 4), (7, 1))
    """
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    slots = [1] * d
    for prime in sorted(primes, reverse=True):
        slots[slots.index(min(slots))] *= prime
    return tuple(sorted(slots, reverse=True))


@HANDLERS.register((TTConfig, nn.Linear))
def tt_linear(linear: nn.Module, config: TTConfig, name: str) -> Factorised:
    """TT-matrix of an ``nn.Linear`` into :class:`TTLinear`."""
    assert isinstance(linear, nn.Linear)
    w = linear.weight.detach()  # (out, in)
    if config.in_modes is not None and config.out_modes is not None:
        ins, outs = config.in_modes, config.out_modes
        if math.prod(ins) != w.shape[1] or math.prod(outs) != w.shape[0]:
            raise SkipLayer(
                f"TTConfig modes do not match the layer: prod(in_modes)={math.prod(ins)} vs "
                f"in_features={w.shape[1]}, prod(out_modes)={math.prod(outs)} vs "
                f"out_features={w.shape[0]}; give modes per layer or leave them None"
            )
    else:
        ins, outs = split_modes(w.shape[1], config.n_cores), split_modes(w.shape[0], config.n_cores)
        if 1 in ins or 1 in outs:
            raise SkipLayer(
                f"features ({w.shape[1]} in, {w.shape[0]} out) cannot be split into "
                f"{config.n_cores} modes > 1 (got {ins}, {outs}); set TTConfig.n_cores lower or "
                "give in_modes/out_modes"
            )
    spec = config.rank_spec
    sizes = [m * n for m, n in zip(outs, ins, strict=True)]
    full = [
        min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)
    ]
    eps: float | None = None
    caps: list[int] | None = None
    if spec.kind == "int":
        caps = [min(int(spec.value), f) for f in full]
    elif spec.kind == "fraction":
        caps = [rank_from_fraction(f, spec.value) for f in full]
    else:
        eps = math.sqrt(max(1.0 - spec.value, 0.0))
    cores = tt_matrix(w, ins, outs, eps=eps, max_rank=caps)
    if config.round_to > 1:
        ranks = [
            round_rank(c.shape[3], f, config.round_to) for c, f in zip(cores, full, strict=False)
        ]
        cores = tt_matrix(w, ins, outs, max_rank=ranks)
    ranks = [int(c.shape[3]) for c in cores[:-1]]
    after = sum(c.numel() for c in cores) + _bias_count(linear)
    require_saving(count_params(linear), after, config, ranks)
    bias = None if linear.bias is None else linear.bias.detach()
    err = float(relative_error(tt_matrix_to_full(cores), w))
    info = {"in_modes": list(ins), "out_modes": list(outs)}
    return Factorised(TTLinear.from_factors(cores, bias), ranks, err, info)


def find_handler(config: DecomposeConfig, module: nn.Module) -> Handler:
    """The handler for ``(type(config), type(module))``, searching the module type's MRO.

    Raises:
        SkipLayer: no handler is registered for this pair (the reason lists what is supported).
    """
    for cls in type(module).__mro__:
        key = (type(config), cls)
        if key in HANDLERS:
            return HANDLERS.get(key)
    supported = sorted(
        k[1].__name__ for k in HANDLERS.names() if isinstance(k, tuple) and k[0] is type(config)
    )
    raise SkipLayer(
        f"{type(config).__name__} does not handle {type(module).__name__} layers (it handles: "
        f"{', '.join(supported) or 'none'}); exclude the layer or use another method"
    )


__all__ = [
    "HANDLERS",
    "Factorised",
    "SkipLayer",
    "build_svd",
    "build_tucker",
    "count_params",
    "find_handler",
    "split_modes",
]
