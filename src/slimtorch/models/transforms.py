"""Architecture transforms: changes to a model's structure that a saved model must replay.

Decomposition, channel pruning and similar methods change a model's layers in place, so a
freshly created model no longer fits the saved weights. Such a method registers a function
``(model, params) -> None`` in :data:`ARCH_TRANSFORMS` that makes the same structural change
(weights need not be right: they are loaded afterwards) and calls :func:`record_transform`
after changing a model. :func:`slimtorch.models.save_model` stores the records in
``config.json`` and :func:`slimtorch.models.load_model` replays them, in order, on the freshly
created model before loading the weights.

Names of the form ``"<subpackage>.<name>"`` (``"prune.channels"``) are looked up after
importing ``slimtorch.<subpackage>``, so a model loads without importing the package that
changed it first.

Example:
    >>> @ARCH_TRANSFORMS.register("prune.channels")
    ... def _replay(model: nn.Module, params: dict[str, Any]) -> None:
    ...     ...  # rebuild the pruned layers with params["widths"]
    >>> record_transform(model, "prune.channels", {"widths": {"layer1.0.conv1": 12}})
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from slimtorch.core.errors import ModelLoadError
from slimtorch.core.registry import Registry

logger = logging.getLogger(__name__)

ArchTransform = Callable[[nn.Module, dict[str, Any]], None]

ARCH_TRANSFORMS: Registry[ArchTransform] = Registry("architecture transform")


def _arch(model: nn.Module) -> dict[str, Any]:
    arch = getattr(model, "slimtorch_arch", None)
    if not isinstance(arch, dict) or "name" not in arch:
        raise ValueError(
            f"{type(model).__name__} has no slimtorch_arch record; build it with "
            "slimtorch.models.create_model (or load it with load_model) so its architecture "
            "can be rebuilt"
        )
    return arch


def _lookup(name: str) -> ArchTransform:
    if name not in ARCH_TRANSFORMS and "." in name:
        package = name.split(".", 1)[0]
        if package.isidentifier() and importlib.util.find_spec(f"slimtorch.{package}"):
            importlib.import_module(f"slimtorch.{package}")
    return ARCH_TRANSFORMS.get(name)


def record_transform(model: nn.Module, name: str, params: dict[str, Any]) -> None:
    """Append ``{"name": name, "params": params}`` to ``model.slimtorch_arch["transforms"]``.

    Args:
        model: A model built by ``create_model`` (it has ``slimtorch_arch``).
        name: A name registered in :data:`ARCH_TRANSFORMS`.
        params: JSON-serialisable arguments of the transform; they are copied.

    Raises:
        ValueError: ``model`` has no ``slimtorch_arch``, ``name`` is not registered, or
            ``params`` is not a JSON-serialisable dict.

    Example:
        >>> record_transform(model, "decompose.tucker2", {"layers": {"conv1": [4, 4]}})
        >>> model.slimtorch_arch["transforms"][-1]["name"]
        'decompose.tucker2'
    """
    arch = _arch(model)
    _lookup(name)  # unknown names raise ValueError listing the choices
    if not isinstance(params, dict):
        raise ValueError(f"transform params must be a dict, got {type(params).__name__}")
    try:
        params = json.loads(json.dumps(params))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"params of transform {name!r} must be JSON-serialisable ({exc}); store numbers, "
            "strings, lists and dicts only"
        ) from None
    arch.setdefault("transforms", []).append({"name": name, "params": params})


def replay_transforms(model: nn.Module, transforms: Sequence[dict[str, Any]]) -> None:
    """Apply recorded transforms to ``model`` in order and record them on it.

    Raises:
        ModelLoadError: A record is malformed, names an unknown transform, or the transform
            function fails.

    Example:
        >>> model = create_model("resnet20", in_channels=3, input_size=32)
        >>> replay_transforms(model, card.transforms)
    """
    arch = _arch(model)
    for i, record in enumerate(transforms):
        if not isinstance(record, dict) or not isinstance(record.get("name"), str):
            raise ModelLoadError(
                f"transform record {i} is malformed ({record!r}); expected "
                '{"name": str, "params": dict}; re-save the model'
            )
        name, params = record["name"], record.get("params", {})
        try:
            fn = _lookup(name)
        except ValueError as exc:
            raise ModelLoadError(
                f"the model was saved after architecture transform {name!r}, which is not "
                f"registered here ({exc}); import the module that registers it before loading"
            ) from None
        try:
            fn(model, copy.deepcopy(params))
        except Exception as exc:
            raise ModelLoadError(
                f"replaying architecture transform {name!r} (record {i}) failed: {exc}; check "
                "that the saved params match this version of the transform"
            ) from exc
        arch.setdefault("transforms", []).append({"name": name, "params": copy.deepcopy(params)})
        logger.debug("replayed architecture transform %s", name)
