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

Example (a made-up transform that narrows LeNet-5's ``fc1``):
    >>> @ARCH_TRANSFORMS.register("demo.fc1_width")
    ... def narrow_fc1(model: nn.Module, params: dict[str, Any]) -> None:
    ...     model.fc1 = nn.Linear(model.fc1.in_features, params["width"])
    ...     model.fc2 = nn.Linear(params["width"], model.fc2.out_features)
    >>> model = create_model("lenet5", in_channels=1, input_size=28)
    >>> narrow_fc1(model, {"width": 60})  # the method changes the model ...
    >>> record_transform(model, "demo.fc1_width", {"width": 60})  # ... and records the change
    >>> fresh = create_model("lenet5", in_channels=1, input_size=28)
    >>> replay_transforms(fresh, model.slimtorch_arch["transforms"])  # as load_model does
    >>> fresh.fc1.out_features, fresh.load_state_dict(model.state_dict())
    (60, <All keys matched successfully>)
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

TRANSFORM_VERSIONS: dict[str, int] = {}
"""Version of each transform's params (absent: 1). A transform whose params change meaning, or
gain one an older replay would ignore, sets a higher version here: its records then carry it
(``"version"``, written above 1), and a slimtorch that replays only older versions refuses
them instead of rebuilding another model."""


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

    Example (recording a channel pruning of LeNet-5's ``fc1``):
        >>> model = create_model("lenet5", in_channels=1, input_size=28)
        >>> model.fc1, model.fc2 = nn.Linear(400, 60), nn.Linear(60, 84)
        >>> widths = {"fc1": {"type": "Linear", "in_features": 400, "out_features": 60},
        ...           "fc2": {"type": "Linear", "in_features": 60, "out_features": 84}}
        >>> record_transform(model, "prune.channels", {"layers": widths})
        >>> model.slimtorch_arch["transforms"][-1]["name"]
        'prune.channels'
        >>> record_transform(model, "prune.tucker2", {})
        Traceback (most recent call last):
        ...
        ValueError: unknown architecture transform 'prune.tucker2'; valid choices: ...
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
    record: dict[str, Any] = {"name": name, "params": params}
    if TRANSFORM_VERSIONS.get(name, 1) > 1:
        record["version"] = TRANSFORM_VERSIONS[name]
    arch.setdefault("transforms", []).append(record)


def replay_transforms(model: nn.Module, transforms: Sequence[dict[str, Any]]) -> None:
    """Apply recorded transforms to ``model`` in order and record them on it.

    Raises:
        ModelLoadError: A record is malformed, names an unknown transform, or the transform
            function fails.

    Example (``transforms`` is usually ``read_model_card(path).transforms``):
        >>> model = create_model("lenet5", in_channels=1, input_size=28)
        >>> widths = {"fc1": {"type": "Linear", "in_features": 400, "out_features": 60},
        ...           "fc2": {"type": "Linear", "in_features": 60, "out_features": 84}}
        >>> replay_transforms(model, [{"name": "prune.channels", "params": {"layers": widths}}])
        >>> model.fc1.out_features, model(torch.randn(2, 1, 28, 28)).shape
        (60, torch.Size([2, 10]))
        >>> len(model.slimtorch_arch["transforms"])
        1
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
        version, known = record.get("version", 1), TRANSFORM_VERSIONS.get(name, 1)
        if not isinstance(version, int) or isinstance(version, bool) or version > known:
            raise ModelLoadError(
                f"architecture transform {name!r} (record {i}) is of version {version!r}, "
                f"written by a newer slimtorch; this one replays up to version {known}: "
                "upgrade slimtorch"
            )
        try:
            fn(model, copy.deepcopy(params))
        except Exception as exc:
            raise ModelLoadError(
                f"replaying architecture transform {name!r} (record {i}) failed: {exc}; check "
                "that the saved params match this version of the transform"
            ) from exc
        arch.setdefault("transforms", []).append({**record, "params": copy.deepcopy(params)})
        logger.debug("replayed architecture transform %s", name)
