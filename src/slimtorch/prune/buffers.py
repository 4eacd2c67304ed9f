"""Mask buffers: ``<module>.weight_mask`` (``bool``) beside each pruned parameter.

The masks live in the state dict, so checkpoints and saved models carry them. The
``"prune.masks"`` architecture transform re-adds the buffers on a freshly built model before
``load_model`` loads the weights; :func:`remove_masks_` drops them (the zeros stay).

Example:
    >>> net = nn.Sequential(nn.Linear(4, 4))
    >>> _ = prune_(net, MagnitudeConfig(sparsity=0.5))
    >>> sorted(k for k in net.state_dict() if k.endswith("_mask"))
    ['0.weight_mask']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from slimtorch.models.transforms import ARCH_TRANSFORMS

TRANSFORM_NAME = "prune.masks"
"""Architecture-transform name; ``load_model`` replays it to re-add the mask buffers."""

PARAMS = ("weight", "bias")


def get_mask(module: nn.Module, param: str = "weight") -> torch.Tensor | None:
    """The ``bool`` mask buffer of ``module.<param>``, or ``None`` if it is not pruned.

    Example:
        >>> get_mask(nn.Linear(2, 2)) is None
        True
    """
    mask = module._buffers.get(f"{param}_mask")
    return mask if isinstance(mask, torch.Tensor) else None


def masked_params(model: nn.Module) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    """``(dotted parameter name, parameter, mask)`` for every masked parameter of ``model``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> _ = prune_(net, MagnitudeConfig(sparsity=0.5))
        >>> [name for name, _, _ in masked_params(net)]
        ['0.weight']
    """
    out = []
    for mod_name, module in model.named_modules():
        for param in PARAMS:
            mask, p = get_mask(module, param), getattr(module, param, None)
            if mask is not None and isinstance(p, nn.Parameter):
                out.append((f"{mod_name}.{param}" if mod_name else param, p, mask))
    return out


@torch.no_grad()
def apply_masks_(model: nn.Module) -> int:
    """Zero every masked parameter where its mask is ``False``; returns how many were masked.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> _ = prune_(net, MagnitudeConfig(sparsity=0.5))
        >>> _ = net[0].weight.data.fill_(1.0)
        >>> apply_masks_(net), net[0].weight.sum().item()
        (1, 8.0)
    """
    items = masked_params(model)
    for _, p, mask in items:
        p.masked_fill_(~mask, 0.0)
    return len(items)


@torch.no_grad()
def mask_grads_(model: nn.Module) -> None:
    """Zero the gradients of masked parameters where the mask is ``False`` (before an
    optimiser step, and before anything measures the gradient norm).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> _ = prune_(net, MagnitudeConfig(sparsity=0.5))
        >>> net(torch.ones(1, 4)).sum().backward()
        >>> mask_grads_(net)
        >>> int((net[0].weight.grad != 0).sum())
        8
    """
    for _, p, mask in masked_params(model):
        if p.grad is not None:
            p.grad.masked_fill_(~mask, 0.0)


@torch.no_grad()
def set_mask_(module: nn.Module, param: str, mask: torch.Tensor) -> None:
    """Add (or narrow, with a logical and) the mask of ``module.<param>`` and apply it.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> set_mask_(lin, "weight", torch.tensor([[True, False], [False, True]]))
        >>> int((lin.weight == 0).sum())
        2
    """
    p = getattr(module, param)
    old = get_mask(module, param)
    mask = mask.to(device=p.device, dtype=torch.bool)
    if old is None:
        module.register_buffer(f"{param}_mask", mask.clone(), persistent=True)
    else:
        old.logical_and_(mask)
    new = get_mask(module, param)
    assert new is not None
    p.masked_fill_(~new, 0.0)  # +0.0, never -0.0


@torch.no_grad()
def remove_masks_(model: nn.Module) -> list[str]:
    """Make pruning permanent: apply and drop every mask buffer (the zeros stay).

    Also drops the ``"prune.masks"`` records from ``model.slimtorch_arch`` so a model saved
    afterwards loads without mask buffers.

    Returns:
        Dotted names of the parameters that were unmasked.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> _ = prune_(net, MagnitudeConfig(sparsity=0.5))
        >>> remove_masks_(net), hasattr(net[0], "weight_mask"), int((net[0].weight == 0).sum())
        (['0.weight'], False, 8)
    """
    done = []
    for mod_name, module in model.named_modules():
        for param in PARAMS:
            mask = get_mask(module, param)
            if mask is None:
                continue
            p = getattr(module, param, None)
            if isinstance(p, torch.Tensor):
                p.masked_fill_(~mask, 0.0)
            del module._buffers[f"{param}_mask"]
            done.append(f"{mod_name}.{param}" if mod_name else param)
    arch = getattr(model, "slimtorch_arch", None)
    if isinstance(arch, dict) and "transforms" in arch:
        arch["transforms"] = [t for t in arch["transforms"] if t.get("name") != TRANSFORM_NAME]
    return done


@torch.no_grad()
def carry_masks_(
    src: nn.Module,
    dst: nn.Module,
    weight_layout: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> bool:
    """Give ``dst`` (a rewritten form of ``src``, holding the same weights) the pruning masks of
    ``src``, reapplied to its parameters; ``weight_layout`` maps the weight mask the way the
    weight was rearranged. Returns whether there was any mask to carry.

    Rewrites that swap a layer for an equivalent one (GEMM or direct convolutions, fused
    Tucker blocks) must carry the masks, or a fine-tune afterwards grows the pruned weights
    back. Call :func:`rerecord_masks_` after the rewrite is recorded.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 1))
        >>> _ = prune_(net, MagnitudeConfig(sparsity=0.5))
        >>> lin = nn.Linear(1, 2)
        >>> carry_masks_(net[0], lin, lambda m: m.reshape(2, 1)), lin.weight_mask.shape
        (True, torch.Size([2, 1]))
    """
    carried = False
    for param in PARAMS:
        mask = get_mask(src, param)
        if mask is None:
            continue
        if param == "weight" and weight_layout is not None:
            mask = weight_layout(mask)
        set_mask_(dst, param, mask.contiguous())
        carried = True
    return carried


def rerecord_masks_(model: nn.Module, moved: Mapping[str, str]) -> None:
    """Re-record masks a rewrite moved (``{old layer name: new layer name}``): the old names
    leave the earlier ``"prune.masks"`` records, and a new record, replayed after the rewrite's
    own, names the new ones, so ``load_model`` re-adds the buffers where the saved model has
    them.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> net.slimtorch_arch = {"transforms": [{"name": TRANSFORM_NAME,
        ...                                        "params": {"layers": ["0"]}}]}
        >>> net[0] = nn.Sequential(nn.Linear(4, 4))  # a rewrite nesting the layer
        >>> net[0][0].register_buffer("weight_mask", torch.ones(4, 4, dtype=torch.bool))
        >>> rerecord_masks_(net, {"0": "0.0"})
        >>> net.slimtorch_arch["transforms"]
        [{'name': 'prune.masks', 'params': {'layers': ['0.0']}}]
    """
    arch = getattr(model, "slimtorch_arch", None)
    if not moved or not isinstance(arch, dict):
        return
    kept = []
    for entry in arch.get("transforms", []):
        if entry.get("name") == TRANSFORM_NAME and isinstance(entry.get("params"), dict):
            params = {
                key: [n for n in names if n not in moved]
                for key, names in entry["params"].items()
                if isinstance(names, list)
            }
            if not params.get("layers") and not params.get("bias"):
                continue
            entry = {**entry, "params": {k: v for k, v in params.items() if v or k == "layers"}}
        kept.append(entry)
    new: dict[str, list[str]] = {"layers": [], "bias": []}
    for name in moved.values():
        module = model.get_submodule(name)
        for key, param in (("layers", "weight"), ("bias", "bias")):
            if get_mask(module, param) is not None:
                new[key].append(name)
    if new["layers"] or new["bias"]:
        kept.append(
            {"name": TRANSFORM_NAME, "params": {k: v for k, v in new.items() if v or k == "layers"}}
        )
    arch["transforms"] = kept


def forget_bias_masks_(model: nn.Module, names: list[str]) -> list[str]:
    """Drop the bias masks of the named layers, from the modules and the ``"prune.masks"``
    records; returns the layers that had one. For a batch-norm fold: the folded bias holds the
    batch norm's shift, which was never pruned, so a pruned bias's mask no longer applies.

    Example:
        >>> conv = nn.Sequential(nn.Conv2d(1, 2, 1))
        >>> conv[0].register_buffer("bias_mask", torch.tensor([True, False]))
        >>> forget_bias_masks_(conv, ["0"]), hasattr(conv[0], "bias_mask")
        (['0'], False)
    """
    had = [n for n in names if get_mask(model.get_submodule(n), "bias") is not None]
    for name in had:
        del model.get_submodule(name)._buffers["bias_mask"]
    arch = getattr(model, "slimtorch_arch", None)
    for entry in arch.get("transforms", []) if isinstance(arch, dict) and had else []:
        params = entry.get("params")
        if entry.get("name") == TRANSFORM_NAME and isinstance(params, dict) and "bias" in params:
            params["bias"] = [n for n in params["bias"] if n not in had]
    return had


def add_mask_buffers_(model: nn.Module, params: dict[str, Any]) -> None:
    """Add all-``True`` mask buffers named by a ``"prune.masks"`` record (the load replay).

    Raises:
        ValueError: the record is malformed or names a layer the model lacks.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> add_mask_buffers_(net, {"layers": ["0"]})
        >>> bool(net[0].weight_mask.all())
        True
    """
    layers = params.get("layers") if isinstance(params, dict) else None
    biases = params.get("bias", []) if isinstance(params, dict) else None
    if not isinstance(layers, list) or not isinstance(biases, list):
        raise ValueError(
            f"a {TRANSFORM_NAME!r} record needs params {{'layers': [names]}}, got {params!r}"
        )
    for names, param in ((layers, "weight"), (biases, "bias")):
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"{TRANSFORM_NAME} names layer {name!r}, which this model lacks; build the "
                    "same architecture that was pruned"
                ) from None
            p = getattr(module, param, None)
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"layer {name!r} has no {param} tensor to mask")
            if get_mask(module, param) is None:
                ones = torch.ones_like(p, dtype=torch.bool)
                module.register_buffer(f"{param}_mask", ones, persistent=True)


ARCH_TRANSFORMS.add(TRANSFORM_NAME, add_mask_buffers_)
