"""Slice conv, linear and batch-norm layers to kept channels, and rebuild them from widths.

:func:`slice_layer` makes the smaller dense layer that a pruning plan asks for (weights copied,
mask buffers of :mod:`slimtorch.prune.buffers` sliced alongside). :func:`layer_widths` and
:func:`resized` are the two halves of the ``"prune.channels"`` architecture transform:
the widths are what a saved model records, and :func:`replay_channel_widths` rebuilds those
shapes on a freshly created model before ``load_model`` loads the weights.

Example:
    >>> conv = nn.Conv2d(4, 6, 3, groups=2)
    >>> small = slice_layer(conv, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 3, 5]))
    >>> tuple(small.weight.shape), small.groups
    ((4, 2, 3, 3), 2)
    >>> layer_widths(small)
    {'type': 'Conv2d', 'in_channels': 4, 'out_channels': 4, 'groups': 2}
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from slimtorch.core.surgery import set_submodule
from slimtorch.models.transforms import ARCH_TRANSFORMS
from slimtorch.prune.channel.graph import BN_TYPES, CONV_TYPES

logger = logging.getLogger(__name__)

TRANSFORM_NAME = "prune.channels"
"""Architecture-transform name; its params are ``{"layers": {name: widths}}``."""

_KNOWN = {"weight", "bias", "weight_mask", "bias_mask", "running_mean", "running_var"}
_KNOWN_BN = _KNOWN | {"num_batches_tracked"}
_TYPES = {t.__name__: t for t in (*CONV_TYPES, nn.Linear, *BN_TYPES)}


def unknown_tensors(module: nn.Module) -> list[str]:
    """Direct parameters/buffers of ``module`` that slicing would not know how to cut.

    Example:
        >>> unknown_tensors(nn.Linear(2, 2))
        []
    """
    known = _KNOWN_BN if isinstance(module, BN_TYPES) else _KNOWN
    tensors = {**module._parameters, **module._buffers}
    return [n for n, t in tensors.items() if t is not None and n not in known]


def _nm_counts(mask: torch.Tensor, m: int) -> torch.Tensor | None:
    """Kept entries in each group of ``m`` consecutive mask entries along dim 1 (the input
    dimension, grouped at each kernel position as ``nm_mask`` does), or None if m does not fit."""
    if mask.dim() < 2 or mask.shape[1] % m or mask.shape[1] == 0:
        return None
    return mask.movedim(1, -1).reshape(-1, m).sum(dim=1)  # (groups,)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` entries along dim 1 of ``mask`` keeps exactly ``n``.

    Example:
        >>> is_nm(torch.tensor([[True, False, False, True]]), 2, 4)
        True
    """
    counts = _nm_counts(mask.to(torch.bool), m)
    return counts is not None and bool((counts == n).all())


def nm_pattern(
    mask: torch.Tensor, ms: tuple[int, ...] = (2, 4, 8, 16, 32)
) -> tuple[int, int] | None:
    """``(n, m)`` when ``mask`` is an N:M mask (what ``prune_(model, NMConfig(n, m))`` leaves:
    exactly ``1 <= n < m`` kept in every group of ``m`` along dim 1), trying the ``m`` of ``ms``
    in order; ``None`` for any other mask (unstructured, all kept). A mask whose N:M groups were
    narrowed further by a later unstructured mask is not recognised.

    Example:
        >>> nm_pattern(torch.tensor([[True, True, False, False], [False, True, True, False]]))
        (2, 4)
        >>> nm_pattern(torch.ones(2, 4, dtype=torch.bool)) is None
        True
    """
    mask = mask.to(torch.bool)
    for m in ms:
        counts = _nm_counts(mask, m)
        if counts is not None and counts.numel() and bool((counts == counts[0]).all()):
            if 1 <= int(counts[0]) < m:
                return int(counts[0]), m
    return None


def layer_widths(module: nn.Module) -> dict[str, Any]:
    """The widths that define a layer's shape (what ``"prune.channels"`` records).

    Example:
        >>> layer_widths(nn.Linear(3, 5))
        {'type': 'Linear', 'in_features': 3, 'out_features': 5}
    """
    if isinstance(module, CONV_TYPES):
        return {
            "type": type(module).__name__,
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "groups": module.groups,
        }
    if isinstance(module, nn.Linear):
        out = module.out_features
        return {"type": "Linear", "in_features": module.in_features, "out_features": out}
    if isinstance(module, BN_TYPES):
        return {"type": type(module).__name__, "num_features": module.num_features}
    raise TypeError(f"no channel widths for {type(module).__name__}; expected conv, Linear or BN")


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    t = getattr(module, name, None)
    return t if isinstance(t, torch.Tensor) else None


def _factory(module: nn.Module) -> dict[str, Any]:
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    floats = [t for t in tensors if t.is_floating_point()]
    ref = floats[0] if floats else torch.empty(0)
    dtype = ref.dtype if ref.is_floating_point() else None
    return {"device": ref.device, "dtype": dtype}


def resized(module: nn.Module, widths: dict[str, Any]) -> nn.Module:
    """A new, uninitialised-weight layer like ``module`` with the given widths.

    Every other hyper-parameter (kernel, stride, padding, bias, eps, momentum ...), the device,
    the dtype, the train/eval mode, ``requires_grad`` and mask buffers carry over.

    Raises:
        ValueError: ``widths`` does not describe a layer of ``module``'s type.

    Example:
        >>> resized(nn.Linear(3, 5), {"type": "Linear", "in_features": 3, "out_features": 2})
        Linear(in_features=3, out_features=2, bias=True)
    """
    if widths.get("type") != type(module).__name__:
        raise ValueError(
            f"widths {widths!r} are for a {widths.get('type')}, but the layer is a "
            f"{type(module).__name__}; rebuild the same architecture that was pruned"
        )
    kw = _factory(module)
    new: nn.Module
    if isinstance(module, CONV_TYPES):
        new = type(module)(
            int(widths["in_channels"]),
            int(widths["out_channels"]),
            module.kernel_size,  # type: ignore[arg-type]
            stride=module.stride,  # type: ignore[arg-type]
            padding=module.padding,  # type: ignore[arg-type]
            dilation=module.dilation,  # type: ignore[arg-type]
            groups=int(widths["groups"]),
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            **kw,
        )
    elif isinstance(module, nn.Linear):
        new = nn.Linear(
            int(widths["in_features"]), int(widths["out_features"]), module.bias is not None, **kw
        )
    elif isinstance(module, BN_TYPES):
        new = type(module)(
            int(widths["num_features"]),
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            **kw,
        )
    else:
        raise TypeError(f"cannot resize {type(module).__name__}; expected conv, Linear or BN")
    for pname, p in module.named_parameters(recurse=False):
        getattr(new, pname).requires_grad_(p.requires_grad)
    for mname in ("weight_mask", "bias_mask"):
        if isinstance(module._buffers.get(mname), torch.Tensor):
            target = getattr(new, mname.removesuffix("_mask"))
            new.register_buffer(mname, torch.ones_like(target, dtype=torch.bool))
    return new.train(module.training)


def _gather_conv(
    t: torch.Tensor, groups: int, in_idx: torch.Tensor, out_idx: torch.Tensor, where: str
) -> tuple[torch.Tensor, int]:
    """Slice a conv weight ``(C_out, C_in / groups, *k)`` group by group; returns new groups.

    ``in_idx`` and ``out_idx`` are sorted; each kept group must keep as many channels as the
    others on each side, and the same groups must be kept on both sides.
    """
    out_per, in_per = t.shape[0] // groups, t.shape[1]
    out_g = torch.div(out_idx, out_per, rounding_mode="floor")
    in_g = torch.div(in_idx, in_per, rounding_mode="floor")
    kept, out_counts = torch.unique(out_g, return_counts=True)
    kept_in, in_counts = torch.unique(in_g, return_counts=True)
    if not torch.equal(kept, kept_in):
        raise ValueError(
            f"{where}: kept input and output channels fall in different groups; a grouped conv "
            "must keep channels in the same groups on both sides"
        )
    if len(set(out_counts.tolist())) > 1 or len(set(in_counts.tolist())) > 1:
        raise ValueError(
            f"{where}: groups keep unequal channel counts (out {out_counts.tolist()}, in "
            f"{in_counts.tolist()}); prune the same number in every group"
        )
    k_in = len(in_idx) // len(kept)
    local = (in_idx - in_g * in_per).reshape(len(kept), k_in)  # (G', k_in)
    rows = local[torch.searchsorted(kept, out_g)]  # (C_out', k_in)
    w = t.index_select(0, out_idx.to(t.device))  # (C_out', C_in / groups, *k)
    shape = (len(out_idx), k_in, *t.shape[2:])
    idx = rows.reshape(len(out_idx), k_in, *([1] * (t.dim() - 2))).expand(shape)
    return torch.gather(w, 1, idx.to(t.device)).contiguous(), len(kept)


@torch.no_grad()
def slice_layer(
    module: nn.Module, in_idx: torch.Tensor | None, out_idx: torch.Tensor, where: str = "layer"
) -> nn.Module:
    """A copy of a conv, linear or batch-norm layer keeping only the given channels.

    Args:
        module: The layer.
        in_idx: Kept input channels (sorted; ``None``: all). Ignored for a batch norm.
        out_idx: Kept output channels (sorted); a batch norm's kept features.
        where: The layer's name, for error messages.

    Returns:
        A new layer of the same type with the sliced weights, biases, statistics and masks.

    Example:
        >>> lin = nn.Linear(3, 4)
        >>> small = slice_layer(lin, torch.tensor([0, 2]), torch.tensor([1]))
        >>> torch.equal(small.weight, lin.weight[1:2][:, [0, 2]])
        True
    """
    out_idx = out_idx.to(torch.long)
    if isinstance(module, BN_TYPES):
        new = resized(module, {"type": type(module).__name__, "num_features": len(out_idx)})
        for name in ("weight", "bias", "running_mean", "running_var", "weight_mask", "bias_mask"):
            src, dst = _tensor(module, name), _tensor(new, name)
            if src is not None and dst is not None:
                dst.copy_(src.index_select(0, out_idx.to(src.device)))
        src, dst = _tensor(module, "num_batches_tracked"), _tensor(new, "num_batches_tracked")
        if src is not None and dst is not None:
            dst.copy_(src)
        return new
    weight = _tensor(module, "weight")
    if weight is None:
        raise TypeError(f"{where!r} has no weight tensor to slice")
    if isinstance(module, nn.Linear):
        n_in = module.in_features
    elif isinstance(module, CONV_TYPES):
        n_in = module.in_channels
    else:
        raise TypeError(f"cannot slice {type(module).__name__} {where!r}")
    keep_in = torch.arange(n_in) if in_idx is None else in_idx.to(torch.long)
    groups = module.groups if isinstance(module, CONV_TYPES) else 1

    def cut(t: torch.Tensor) -> torch.Tensor:  # (C_out, C_in / groups, ...) -> kept
        return _gather_conv(t, groups, keep_in, out_idx, where)[0]

    w, new_groups = _gather_conv(weight, groups, keep_in, out_idx, where)
    widths: dict[str, Any] = {"type": type(module).__name__}
    if isinstance(module, nn.Linear):
        widths.update(in_features=w.shape[1], out_features=w.shape[0])
    else:
        widths.update(in_channels=len(keep_in), out_channels=w.shape[0], groups=new_groups)
    new = resized(module, widths)
    for name, fn in (("weight", cut), ("weight_mask", cut)):
        src, dst = _tensor(module, name), _tensor(new, name)
        if src is not None and dst is not None:
            dst.copy_(fn(src))
    for name in ("bias", "bias_mask"):
        src, dst = _tensor(module, name), _tensor(new, name)
        if src is not None and dst is not None:
            dst.copy_(src.index_select(0, out_idx.to(src.device)))
    return new


def replay_channel_widths(model: nn.Module, params: dict[str, Any]) -> None:
    """Rebuild the layer shapes recorded by a ``"prune.channels"`` entry (the load replay).

    Weights are not restored here; ``load_model`` loads them afterwards.

    Raises:
        ValueError: The record is malformed or names a layer the model lacks.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        >>> replay_channel_widths(net, {"layers": {
        ...     "0": {"type": "Linear", "in_features": 4, "out_features": 3},
        ...     "1": {"type": "Linear", "in_features": 3, "out_features": 2}}})
        >>> net[1].in_features
        3
    """
    layers = params.get("layers") if isinstance(params, dict) else None
    if not isinstance(layers, dict):
        raise ValueError(
            f"a {TRANSFORM_NAME!r} record needs params {{'layers': {{name: widths}}}}, got "
            f"{params!r}; re-save the model"
        )
    for name, widths in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{TRANSFORM_NAME} names layer {name!r}, which this model lacks; build the same "
                "architecture that was pruned"
            ) from None
        if not isinstance(widths, dict) or widths.get("type") not in _TYPES:
            raise ValueError(f"{TRANSFORM_NAME} widths of {name!r} are malformed: {widths!r}")
        set_submodule(model, name, resized(old, widths))
    logger.debug("replayed %s on %d layers", TRANSFORM_NAME, len(layers))


ARCH_TRANSFORMS.add(TRANSFORM_NAME, replay_channel_widths)
