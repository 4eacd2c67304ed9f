"""Parameter counts and storage bytes of a model.

Example:
    >>> model = nn.Linear(4, 2)
    >>> count_params(model), model_size_bytes(model)
    (10, 40)
"""

from __future__ import annotations

from torch import nn


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


WEIGHT_BUFFERS_ATTR = "weight_buffers"
"""Class attribute naming the buffers in which a layer keeps its weights (e.g. an int8 layer's
``("weight_int8",)``): :func:`count_params` counts them as parameters, since they are the
layer's weights in another storage type."""


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of weight elements; a tensor shared by several modules counts once.

    Parameters count, and so do the buffers a layer names in its ``weight_buffers`` class
    attribute (quantized layers keep their weights as int8 buffers: a quantized model has as
    many weights as its float original, in fewer bytes), or, in a torch.export program, the
    buffers of :data:`EXPORTED_WEIGHT_BUFFERS` names.

    Args:
        model: The module.
        trainable_only: Count only parameters with ``requires_grad`` (no weight buffers).

    Example:
        >>> count_params(nn.Linear(4, 2))
        10
        >>> class Int8Linear(nn.Module):
        ...     weight_buffers = ("weight_int8",)
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.register_buffer("weight_int8", torch.zeros(2, 4, dtype=torch.int8))
        ...         self.bias = nn.Parameter(torch.zeros(2))
        >>> count_params(Int8Linear()), count_params(Int8Linear(), trainable_only=True)
        (10, 2)
    """
    _check_module(model)
    # named_parameters() removes duplicates (tied weights) by identity
    total = sum(
        p.numel() for _, p in model.named_parameters() if p.requires_grad or not trainable_only
    )
    if trainable_only:
        return total
    seen: set[int] = set()
    for module in model.modules():
        names = getattr(type(module), WEIGHT_BUFFERS_ATTR, None)
        if names is None:  # a torch.export program's modules keep the buffers' names only
            names = [n for n in module._buffers if n.rpartition(".")[2] in EXPORTED_WEIGHT_BUFFERS]
        for name in names:
            buf = module._buffers.get(name)
            if buf is not None and id(buf) not in seen:
                seen.add(id(buf))
                total += buf.numel()
    return total


EXPORTED_WEIGHT_BUFFERS = ("weight_int8",)
"""Buffer names that hold a layer's weights in a torch.export program of a quantized model
(whose modules no longer carry the ``weight_buffers`` attribute of their classes)."""


def weight_buffer_layers(model: nn.Module) -> dict[str, tuple[nn.Module, int, str, int]]:
    """The layers that keep their weights in buffers (quantized layers): dotted name ->
    (module, number of weights, their dtype, output channels: the first buffer's first size).

    Float transforms (pruning, factorisation) cannot change such weights; they report these
    layers as skipped so that a quantized model is never "compressed" without a word.

    Example:
        >>> class Int8Linear(nn.Module):
        ...     weight_buffers = ("weight_int8",)
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.register_buffer("weight_int8", torch.zeros(2, 4, dtype=torch.int8))
        >>> net = nn.Sequential(nn.Linear(4, 4), Int8Linear())
        >>> {n: info[1:] for n, info in weight_buffer_layers(net).items()}
        {'1': (8, 'int8', 2)}
    """
    out = {}
    for name, module in model.named_modules():
        bufs = [module._buffers.get(b) for b in getattr(type(module), WEIGHT_BUFFERS_ATTR, ())]
        bufs = [b for b in bufs if b is not None]
        if name and bufs:
            dtype = str(bufs[0].dtype).removeprefix("torch.")
            out[name] = (module, sum(b.numel() for b in bufs), dtype, int(bufs[0].shape[0]))
    return out


def stored_weights_reason(module: nn.Module, dtype: str, verb: str) -> str:
    """The skip reason of a float transform (``verb``: "prune", "factorise") for such a layer."""
    return (
        f"its weights are stored as {dtype} ({type(module).__name__}); {verb} the float model, "
        "then quantize it"
    )


def storage_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers, by dtype name (shared tensors counted once).

    Example:
        >>> m = nn.BatchNorm1d(4)  # weight, bias, running mean/var: 16 fp32; 1 int64 counter
        >>> storage_bytes(m)
        {'float32': 64, 'int64': 8}
    """
    _check_module(model)
    out: dict[str, int] = {}
    seen: set[int] = set()
    tensors = [p for _, p in model.named_parameters()] + [b for _, b in model.named_buffers()]
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        key = str(t.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return dict(sorted(out.items()))


def model_size_bytes(model: nn.Module) -> int:
    """Total bytes of parameters and buffers (the sum of :func:`storage_bytes`).

    Example:
        >>> model_size_bytes(nn.Linear(4, 2))
        40
    """
    return sum(storage_bytes(model).values())
