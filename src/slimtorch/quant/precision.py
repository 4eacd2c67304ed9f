"""Per-layer floating-point precision: cast chosen layers to fp16/bf16 with boundary casts.

A *unit* is a top-most module that owns floating parameters or buffers itself (``Conv2d``,
``Linear``, ``BatchNorm2d``, a Q/DQ layer ...); its children go with it. :func:`set_precision_`
casts the named units to a low dtype and gives every unit a forward pre-hook that casts
floating inputs to the unit's own dtype, so low- and full-precision units can follow each other
in any order and the model still takes float32 inputs. Units without hooks in between (ReLU,
pooling, residual additions) work in whatever dtype arrives; an addition of fp16 and fp32
tensors promotes to fp32. The named ``output_fp32`` units also cast their output back to
float32, and with ``model_output_fp32`` the model's own output is cast back to float32 (every
floating tensor it returns, nested in tuples, lists and dicts too), so callers get float32 on
every branch of a data-dependent forward, whichever layer produced the output.

Parameters the root module owns itself (``self.w`` used as ``F.conv2d(x, self.w)`` in the
model's own ``forward``) belong to no unit: they stay float32, and no hook sees the activations
that meet them. :func:`root_float_parameters` names them; :func:`slimtorch.quant.cast_` and
:func:`slimtorch.quant.mixed_precision_` then cast the output of every low-precision unit back to
float32 (``output_fp32``), so whatever reaches those parameters is float32.

The change is recorded as ``"quant.lowp"`` so ``save_model``/``load_model`` rebuild it.

Example:
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> entry = set_precision_(net, ["0"], torch.float16)
    >>> net(torch.randn(3, 8)).dtype, net[0].weight.dtype
    (torch.float32, torch.float16)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.core.surgery import kept_modes
from slimtorch.models.transforms import ARCH_TRANSFORMS

TRANSFORM_NAME = "quant.lowp"
"""Architecture transform recorded by :func:`set_precision_`."""

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_ATTR = "slimtorch_precision"


def _cast_floating(args: tuple[Any, ...], dtype: torch.dtype) -> tuple[Any, ...]:
    return tuple(
        a.to(dtype)
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype
        else a
        for a in args
    )


class InputCast:
    """Forward pre-hook casting floating positional inputs to ``dtype``."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return _cast_floating(args, self.dtype)


def _to_float32(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.dtype in (torch.float16, torch.bfloat16) else obj
    if isinstance(obj, dict):
        return {k: _to_float32(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_float32(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_to_float32(v) for v in obj)
    return obj


class OutputCast:
    """Forward hook casting float16/bfloat16 tensor outputs (also inside tuples, lists and
    dicts) to float32."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return _to_float32(output)


def _owns_floats(module: nn.Module) -> bool:
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return any(t.is_floating_point() for t in tensors)


def root_float_parameters(model: nn.Module) -> list[str]:
    """Names of the floating parameters the root module owns itself (in no unit).

    A model's ``forward`` uses them directly (``F.conv2d(x, self.w)``), so whatever meets them
    must be float32: callers cast every low-precision unit's output back to float32 when this is
    not empty.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> net.w = nn.Parameter(torch.ones(2))
        >>> root_float_parameters(net)
        ['w']
    """
    return [n for n, p in model.named_parameters(recurse=False) if p.is_floating_point()]


def precision_units(model: nn.Module) -> dict[str, nn.Module]:
    """Top-most submodules that own floating parameters/buffers, in registration order.

    A module whose class sets ``precision_unit = True`` is one unit with its children (a fused
    layer that reads its children's weights without calling them). The root module is never a
    unit: its own parameters stay float32 (see :func:`root_float_parameters`).

    Example:
        >>> list(precision_units(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())))
        ['0', '1']
    """
    units: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(u + ".") for u in units) or (not name and _owns_floats(module)):
            continue
        if name and (_owns_floats(module) or getattr(module, "precision_unit", False) is True):
            units[name] = module
    return units


@torch.no_grad()
def beyond_range(module: nn.Module, dtype: torch.dtype) -> str | None:
    """Which of ``module``'s floating parameters/buffers hold finite values beyond ``dtype``'s
    largest (float16's 65504: a batch norm's running variance of a raw 0-255 input, say), which
    a cast would turn into Inf; None when all fit (and for meta tensors, which have no values).

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> _ = bn.running_var.fill_(1e5)
        >>> beyond_range(bn, torch.float16)
        "running_var holds 1e+05, beyond float16's largest value 65504"
        >>> beyond_range(bn, torch.bfloat16) is None
        True
    """
    limit = torch.finfo(dtype).max
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t.is_floating_point() and not t.is_meta and t.numel():
            finite = t.detach()[torch.isfinite(t.detach())]
            peak = float(finite.abs().max()) if finite.numel() else 0.0
            if peak > limit:
                what = str(dtype).removeprefix("torch.")
                return f"{name} holds {peak:.3g}, beyond {what}'s largest value {limit:.6g}"
    return None


@torch.no_grad()
def execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Unit names in the order one forward pass on ``example`` calls them (eval mode).

    Units that do not run are left out.

    Example:
        >>> execution_order(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), torch.randn(1, 4))
        ['0', '1']
    """
    order: list[str] = []
    handles = []
    for name, unit in precision_units(model).items():

        def pre(_m: nn.Module, _a: Any, name: str = name) -> None:
            if name not in order:
                order.append(name)

        handles.append(unit.register_forward_pre_hook(pre))
    try:
        with kept_modes(model):
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


def layer_precisions(model: nn.Module) -> dict[str, str]:
    """Unit name -> dtype name for a model changed by :func:`set_precision_` (else empty).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = set_precision_(net, ["0"], torch.float16)
        >>> layer_precisions(net)
        {'0': 'float16', '2': 'float32'}
    """
    return {
        n: getattr(m, _ATTR)
        for n, m in model.named_modules()
        if isinstance(getattr(m, _ATTR, None), str)
    }


def carry_precision_(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (a layer swapped in for ``old``) the boundary casts and precision record
    :func:`set_precision_` put on ``old``: without its input cast a half-precision layer meets
    float32 inputs.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = set_precision_(net, ["0"], torch.float16)
        >>> twin = nn.Linear(8, 8).half()
        >>> carry_precision_(net[0], twin)
        >>> twin.slimtorch_precision, twin(torch.randn(1, 8)).dtype  # float32 in, cast
        ('float16', torch.float16)
    """
    for hook in old._forward_pre_hooks.values():
        if isinstance(hook, InputCast):
            new.register_forward_pre_hook(hook)
    for hook in old._forward_hooks.values():
        if isinstance(hook, OutputCast):
            new.register_forward_hook(hook)
    if isinstance(getattr(old, _ATTR, None), str):
        setattr(new, _ATTR, getattr(old, _ATTR))


def clear_precision_hooks_(module: nn.Module) -> None:
    """Remove the boundary-cast hooks :func:`set_precision_` put on ``module`` (not a cast back)."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(h, InputCast | OutputCast)]:
            del hooks[key]
    if hasattr(module, _ATTR):
        delattr(module, _ATTR)


def set_precision_(
    model: nn.Module,
    low: Sequence[str],
    dtype: torch.dtype,
    *,
    output_fp32: Sequence[str] = (),
    model_output_fp32: bool = False,
    record: bool = True,
) -> dict[str, Any]:
    """Cast the units named in ``low`` to ``dtype`` and put boundary casts on every unit.

    Args:
        model: The model, changed in place.
        low: Unit names (see :func:`precision_units`) to cast.
        dtype: ``torch.float16`` or ``torch.bfloat16``.
        output_fp32: Unit names whose output is cast back to float32 (usually the last layer
            when it is cast, or every cast unit when :func:`root_float_parameters` is not empty).
        model_output_fp32: Also cast the model's own output back to float32 (a forward hook on
            the root), whichever unit produced it.
        record: Append the ``"quant.lowp"`` transform to ``model.slimtorch_arch``.

    Returns:
        The transform entry ``{"name": "quant.lowp", "params": {...}}``.

    Raises:
        ValueError: A name is not a unit, ``dtype`` is not fp16/bf16, a unit to cast holds
            values beyond ``dtype``'s range, or the model already carries boundary casts.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> entry = set_precision_(net, ["0"], torch.bfloat16)
        >>> entry["params"]
        {'dtype': 'bfloat16', 'low': ['0'], 'output_fp32': []}
        >>> net(torch.randn(3, 8)).dtype  # no output_fp32: the last layer runs (and returns) fp32
        torch.float32
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
    if layer_precisions(model):
        raise ValueError(
            "the model already has per-layer precision casts; cast a fresh float32 model"
        )
    units = precision_units(model)
    unknown = [n for n in list(low) + list(output_fp32) if n not in units]
    if unknown:
        raise ValueError(
            f"{', '.join(map(repr, unknown))} are not precision units of {type(model).__name__}; "
            f"units are the modules owning float parameters: {', '.join(list(units)[:6])}, ..."
        )
    low_set = set(low)
    big = {n: why for n in units if n in low_set and (why := beyond_range(units[n], dtype))}
    if big:
        raise ValueError(
            f"{'; '.join(f'{n!r}: {w}' for n, w in big.items())}: the cast would make them Inf; "
            "leave those layers in float32"
        )
    for name, unit in units.items():
        target = dtype if name in low_set else torch.float32
        if name in low_set:
            unit.to(dtype)
        unit.register_forward_pre_hook(InputCast(target))
        setattr(unit, _ATTR, str(target).removeprefix("torch."))
        if name in output_fp32:
            unit.register_forward_hook(OutputCast())
    params: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."),
        "low": [n for n in units if n in low_set],
        "output_fp32": list(output_fp32),
    }
    if model_output_fp32:
        model.register_forward_hook(OutputCast())
        params["model_output_fp32"] = True
    entry = {"name": TRANSFORM_NAME, "params": params}
    arch = getattr(model, "slimtorch_arch", None)
    if record and isinstance(arch, dict):
        arch.setdefault("transforms", []).append(entry)
    return entry


def _replay(model: nn.Module, params: dict[str, Any]) -> None:
    dtype = getattr(torch, str(params["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {params['dtype']!r} in {TRANSFORM_NAME} record")
    set_precision_(
        model,
        params["low"],
        dtype,
        output_fp32=params.get("output_fp32", []),
        model_output_fp32=bool(params.get("model_output_fp32", False)),
        record=False,
    )


if TRANSFORM_NAME not in ARCH_TRANSFORMS:
    ARCH_TRANSFORMS.add(TRANSFORM_NAME, _replay)


def hand_mixed_dtypes(model: nn.Module) -> list[str]:
    """The floating dtypes of ``model``'s weights when it mixes several without the casts
    :func:`set_precision_` records between them (``model.half()`` with some layers set back to
    float), sorted; empty otherwise.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2).half(), nn.Linear(2, 2))
        >>> hand_mixed_dtypes(net), hand_mixed_dtypes(nn.Linear(2, 2))
        (['float16', 'float32'], [])
    """
    kinds = {
        str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()
    }
    return sorted(kinds) if len(kinds) > 1 and not layer_precisions(model) else []


def check_export_dtypes(model: nn.Module, example_input: torch.Tensor) -> None:
    """Refuse, by name, what ONNX export cannot write or the exporter would fail on deep inside:
    an example batch with no rows, float64 weights, a whole model in float16 (``half()``, whose
    float16 inputs the export's float32 example does not fit) or float16 and float32 layers
    mixed by hand (no casts between them), bfloat16 layers (ONNX Runtime has
    no bfloat16 convolution or GEMM kernels on the CPU, so the file would not load there).

    Example:
        >>> check_export_dtypes(nn.Linear(2, 2).double(), torch.randn(1, 2))
        Traceback (most recent call last):
        ...
        ValueError: the model holds float64 weights; export model.float() (ONNX Runtime ...
    """
    if example_input.ndim == 0 or example_input.shape[0] == 0:
        raise ValueError(
            f"example_input has no rows (shape {tuple(example_input.shape)}); give one batch "
            "of at least one input"
        )
    dtypes = {
        name: {p.dtype for p in m.parameters(recurse=False) if p.is_floating_point()}
        for name, m in model.named_modules()
    }
    kinds = set().union(*dtypes.values())
    if torch.float64 in kinds:
        raise ValueError(
            "the model holds float64 weights; export model.float() (ONNX Runtime runs float32, "
            "and dtype='fp16' writes float16)"
        )
    if kinds == {torch.float16} and not layer_precisions(model):
        raise ValueError(
            "every weight of the model is float16 (model.half()); export the float32 model with "
            "dtype='fp16', or cast it with cast_ (which keeps sensitive layers in float32)"
        )
    if {"float16", "float32"} <= set(hand_mixed_dtypes(model)):
        raise ValueError(
            "the model mixes float16 and float32 weights without the casts cast_ records "
            "between them (model.half() with some layers set back to float), so its graph "
            "would not type-check; export the float32 model with dtype='fp16', or cast it with "
            "cast_"
        )
    bf16 = [name or "(model)" for name, d in dtypes.items() if torch.bfloat16 in d]
    if bf16:
        raise ValueError(
            f"layer(s) {', '.join(bf16[:4])}{' ...' if len(bf16) > 4 else ''} hold bfloat16 "
            "weights, which ONNX Runtime has no CPU kernels for; export it to a .pt2 file "
            "(--out FILE.pt2, torch.export), or cast the float model with --method fp16 for ONNX"
        )
