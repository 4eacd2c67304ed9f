"""Choosing layers by dotted-name globs: the ``include``/``exclude`` arguments of every transform.

A name is selected when it matches some ``include`` glob (every name when ``include`` is None)
and no ``exclude`` glob; globs are :func:`fnmatch.fnmatchcase` patterns over the names of
``model.named_modules()``. A glob that matches no module at all is an error (a typo must not
silently select nothing).

Example:
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> check_globs(net, ["0", "2"], None)
    >>> selected("2", include=None, exclude=["0"]), selected("0", include=["2"], exclude=None)
    (True, False)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from torch import nn

from slimtorch.core.surgery import require_submodules


def check_globs(
    model: nn.Module, include: Any, exclude: Any, verb: str = "a slimtorch transform"
) -> None:
    """Raise unless ``include``/``exclude`` are None or lists of globs that each match a module
    of ``model``, and ``model`` has submodules (``verb`` names the transform in that error).

    Raises:
        TypeError: a glob list is a string, not a list/tuple/set, or holds non-strings.
        ValueError: a glob matches no module name (the message shows some real names), or
            the model is a single layer without submodules.
    """
    require_submodules(model, verb)
    names = [n for n, _ in model.named_modules() if n]
    for arg, value in (("include", include), ("exclude", exclude)):
        if value is None:
            continue
        # a one-shot iterator would be used up here and select nothing later
        not_list = isinstance(value, str) or not isinstance(value, list | tuple | set | frozenset)
        if not_list or not all(isinstance(p, str) for p in value):
            raise TypeError(f"{arg} must be a list of glob strings or None, got {value!r}")
        unmatched = [p for p in value if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ValueError(
                f"{arg} pattern(s) {', '.join(map(repr, unmatched))} match no module of "
                f"{type(model).__name__}; module names look like {', '.join(names[:6])}, ..."
            )


def selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    """Whether ``name`` matches an ``include`` glob (or include is None) and no ``exclude`` glob."""
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))


def check_include_hits(
    model: nn.Module, include: Sequence[str] | None, targets: Sequence[str], what: str
) -> None:
    """Raise ``ValueError`` unless every ``include`` glob selects at least one of ``targets``.

    A glob that matches only containers or other modules (``"layer1"`` for the blocks of a
    resnet stage, a ReLU) would otherwise select nothing and change nothing without a word.

    Example:
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.ReLU())
        >>> check_include_hits(net, ["0"], ["0.0"], "nn.Linear")
        Traceback (most recent call last):
        ...
        ValueError: include pattern(s) '0' select no nn.Linear layer ...
    """
    if include is None:
        return
    missed = [p for p in include if not any(fnmatch.fnmatchcase(t, p) for t in targets)]
    if missed:
        kinds = {n: type(m).__name__ for n, m in model.named_modules() if n}
        hits = [
            f"{n} ({kinds[n]})" for n in kinds if any(fnmatch.fnmatchcase(n, p) for p in missed)
        ]
        raise ValueError(
            f"include pattern(s) {', '.join(map(repr, missed))} select no {what} layer of "
            f"{type(model).__name__} (they match only {', '.join(hits[:6])}); match the layers "
            f"themselves, e.g. '{missed[0]}.*' for the layers inside {missed[0]!r}"
        )


_OTHER_WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Bilinear, nn.RNNBase, nn.Embedding)


def untargeted_layers(
    model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> list[str]:
    """Selected layers with weights that a Conv2d/Linear transform passes over (Conv1d/3d,
    transposed convs, recurrent layers, embeddings): callers warn, so a model of such layers
    is not reported sparse while most of its weights stay dense.

    Example:
        >>> untargeted_layers(nn.Sequential(nn.Conv1d(2, 4, 3), nn.Linear(4, 2)), None, None)
        ['0 (Conv1d)']
    """
    return [
        f"{n} ({type(m).__name__})"
        for n, m in model.named_modules()
        if n
        and isinstance(m, _OTHER_WEIGHT_LAYERS)
        and not isinstance(m, nn.Conv2d)
        and selected(n, include, exclude)
    ]
