"""The model registry: build any zoo model by name and record how to rebuild it.

Every model built by :func:`create_model` carries ``model.slimtorch_arch``, a JSON-ready dict
``{"name": ..., "kwargs": {...every construction argument, defaults included...},
"transforms": []}``. :func:`slimtorch.models.save_model` stores it in ``config.json`` and
:func:`slimtorch.models.load_model` rebuilds the architecture from it.

Example:
    >>> from slimtorch.models import create_model, list_models
    >>> "lenet5" in list_models()
    True
    >>> model = create_model("lenet5", num_classes=10, in_channels=1, input_size=28)
    >>> model.slimtorch_arch["name"]
    'lenet5'
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from slimtorch.core.registry import Registry

logger = logging.getLogger(__name__)

ModelBuilder = Callable[..., nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model")

_COMMON_ARGS = ("num_classes", "in_channels", "input_size")


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a model builder under ``name``.

    The builder must accept the keyword arguments ``num_classes``, ``in_channels`` and
    ``input_size`` (plus any model-specific keywords with defaults) and return an ``nn.Module``.
    A duplicate name raises :class:`~slimtorch.core.errors.RegistryError` at import.

    Args:
        name: The name passed to :func:`create_model`.

    Returns:
        A decorator that registers the builder and returns it unchanged.

    Example:
        >>> @register_model("tiny")
        ... def tiny(*, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size**2,
        ...                                                   num_classes))
        >>> model = create_model("tiny", num_classes=3, in_channels=1, input_size=8)
        >>> model(torch.randn(2, 1, 8, 8)).shape, model.slimtorch_arch["name"]
        (torch.Size([2, 3]), 'tiny')
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def deco(builder: ModelBuilder) -> ModelBuilder:
        params = inspect.signature(builder).parameters
        missing = [a for a in _COMMON_ARGS if a not in params]
        if missing:
            raise TypeError(
                f"model builder {builder.__name__!r} for {name!r} must accept the keyword "
                f"argument(s) {', '.join(missing)}; add them to its signature"
            )
        return MODELS.add(name, builder)

    return deco


def list_models() -> list[str]:
    """Names of every registered model, sorted.

    Example:
        >>> list_models()[:2]
        ['lenet5', 'mlp']
    """
    return [str(n) for n in MODELS.names()]


def _check_positive_int(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _jsonable(value: Any) -> Any:
    """Tuples become lists (recursively) so the record equals what JSON gives back."""
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model and record how to rebuild it in ``model.slimtorch_arch``.

    Args:
        name: A name from :func:`list_models`.
        num_classes: Number of output classes (>= 1).
        in_channels: Number of input channels (>= 1), e.g. 1 for MNIST, 3 for CIFAR.
        input_size: Height (= width) of the square input images (>= 1).
        **kwargs: Model-specific arguments (``hidden`` for ``mlp``, ``width_mult`` for
            ``mobilenetv2`` ...); they must be JSON-serialisable.

    Returns:
        The model in training mode, on the CPU, in float32.

    Raises:
        ValueError: Unknown model name (the message lists the choices), a bad common argument,
            an unknown or non-JSON keyword argument.

    Example:
        >>> model = create_model("mlp", num_classes=10, in_channels=1, input_size=8,
        ...                      hidden=(32,))
        >>> model.slimtorch_arch["kwargs"]["hidden"]
        [32]
    """
    builder = MODELS.get(name)
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    _check_positive_int("input_size", input_size)

    sig = inspect.signature(builder)
    accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    named = [
        p.name
        for p in sig.parameters.values()
        if p.name not in _COMMON_ARGS
        and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(kwargs) - set(named))
    if unknown and not accepts_var_kw:
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)} for model {name!r}; "
            f"valid model-specific arguments: {', '.join(named) or '(none)'}"
        )
    bound = sig.bind(
        num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs
    )
    bound.apply_defaults()
    args: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        if sig.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
            args.update(value)
        else:
            args[key] = value
    record = _jsonable(args)
    try:
        json.dumps(record)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"arguments of model {name!r} must be JSON-serialisable so the model can be "
            f"rebuilt from config.json ({exc}); pass numbers, strings, lists or dicts"
        ) from None

    model = builder(**args)
    arch: dict[str, Any] = {"name": name, "kwargs": record, "transforms": []}
    model.slimtorch_arch = arch  # type: ignore[assignment]
    logger.debug("created model %s with %s", name, record)
    return model
