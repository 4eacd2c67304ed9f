"""Module surgery: replace a submodule by its dotted name."""

from __future__ import annotations

from torch import nn


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (which must already exist).

    Works through ``nn.Sequential``/``nn.ModuleList`` indices (``"features.3"``) and
    ``nn.ModuleDict`` keys, keeping the container's order.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: ``name`` is empty or does not name an existing submodule.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> set_submodule(net, "0", nn.Identity())
        >>> type(net[0]).__name__
        'Identity'
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not name:
        raise ValueError("name must be a dotted submodule name, got ''; the root cannot be set")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise ValueError(
            f"{name!r} is not a submodule of {type(model).__name__}; list valid names with "
            "model.named_modules()"
        ) from None
    if child not in parent._modules:
        raise ValueError(
            f"{name!r} is not a submodule of {type(model).__name__} ({type(parent).__name__} "
            f"has no child {child!r}); list valid names with model.named_modules()"
        )
    setattr(parent, child, module)
