"""The checks around :func:`~slimtorch.prune.channel.transform.prune_channels_`.

A pruned model must still run in **both** modes: fx bakes ``if self.training:`` in at trace
time, and a model pruned in eval mode is fine-tuned in train mode, so :func:`reference_outputs`
and :func:`swap_and_check` run the forward once in each. Each run leaves no trace on the model:
it runs under ``torch.no_grad()``, puts back every buffer (batch-norm running statistics, the
batch counter), the random number generators (dropout) and every module's train/eval flag.
:func:`check_nm_masks` refuses a slicing that would break N:M weight masks.

Example:
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).eval()
    >>> before = net[1].running_mean.clone()
    >>> [tuple(t.shape) for t in forward_outputs(net, torch.randn(5, 4), training=True)]
    [(5, 3)]
    >>> net.training, net[1].training, torch.equal(net[1].running_mean, before)
    (False, False, True)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from slimtorch.core.devices import kept_rng
from slimtorch.core.surgery import kept_modes, set_submodule
from slimtorch.prune.channel.graph import ChannelGraphError
from slimtorch.prune.channel.layers import is_nm, nm_pattern

logger = logging.getLogger(__name__)

MODES = (False, True)
"""The modes a pruned model is checked in: eval, then train."""


def _mode(training: bool) -> str:
    return "train" if training else "eval"


def forward_outputs(model: nn.Module, example_input: Any, *, training: bool) -> list[torch.Tensor]:
    """The output tensors of one forward with every module in train (or eval) mode.

    Runs under ``torch.no_grad()``; afterwards the buffers (the same tensor objects, with their
    old values), the CPU and CUDA random states and every module's flag are as they were.

    Example:
        >>> [tuple(t.shape) for t in forward_outputs(nn.Linear(2, 3), torch.ones(1, 2),
        ...                                           training=False)]
        [(1, 3)]
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    saved = [
        (m, name, b, b.detach().clone())
        for m in model.modules()
        for name, b in m._buffers.items()
        if b is not None
    ]
    try:
        with torch.no_grad(), kept_modes(model, training), kept_rng():
            out = model(*args)
    finally:
        with torch.no_grad():
            for m, name, b, value in saved:
                m._buffers[name] = b
                b.copy_(value)
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def reference_outputs(model: nn.Module, example_input: Any) -> dict[bool, list[torch.Tensor]]:
    """The unpruned model's outputs in eval and train mode (keyed by ``training``).

    A train-mode forward that fails on the original model already (a batch of one through a
    BatchNorm1d) is left out with a warning: the pruned model is then checked in eval mode only.

    Example:
        >>> sorted(reference_outputs(nn.Sequential(nn.Linear(2, 3)), torch.ones(2, 2)))
        [False, True]
    """
    ref = {False: forward_outputs(model, example_input, training=False)}
    try:
        ref[True] = forward_outputs(model, example_input, training=True)
    except Exception as exc:
        logger.warning(
            "the unpruned %s fails in train mode on example_input (%s: %s), so the pruned model "
            "is checked in eval mode only; pass a batch that also runs in train mode (two or "
            "more samples for batch norms)",
            type(model).__name__, type(exc).__name__, exc,
        )  # fmt: skip
    return ref


def _compare(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    shapes = [tuple(t.shape) for t in got]
    want = [tuple(t.shape) for t in ref]
    if shapes != want:
        raise ValueError(f"output shapes {shapes} differ from the original {want}")
    for t, r in zip(got, ref, strict=True):
        if t.is_floating_point() and bool(torch.isfinite(r).all()):
            if not bool(torch.isfinite(t).all()):
                raise ValueError("the outputs hold NaN/Inf where the original's did not")


def swap_and_check(
    model: nn.Module,
    new: dict[str, nn.Module],
    example_input: Any,
    ref: dict[bool, list[torch.Tensor]],
) -> None:
    """Put the ``new`` layers into ``model`` and check it in every mode of ``ref``.

    Raises:
        ChannelGraphError: the outputs' shapes changed or turned non-finite in some mode (the
            original layers are put back first).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 1))
        >>> x = torch.ones(3, 2)
        >>> swap_and_check(net, {"0": nn.Linear(2, 3)}, x, reference_outputs(net, x))
        Traceback (most recent call last):
        ...
        slimtorch.prune.channel.graph.ChannelGraphError: the pruned Sequential failed ...
    """
    originals = {name: model.get_submodule(name) for name in new}
    for name, module in new.items():
        set_submodule(model, name, module)
    for training, want in ref.items():
        try:
            _compare(forward_outputs(model, example_input, training=training), want)
        except Exception as exc:
            for name, module in originals.items():
                set_submodule(model, name, module)
            raise ChannelGraphError(
                f"the pruned {type(model).__name__} failed its forward check in "
                f"{_mode(training)} mode on example_input ({type(exc).__name__}: {exc}); every "
                "layer was restored. The forward probably uses a channel count the graph cannot "
                "see: exclude the groups involved"
            ) from exc


def check_nm_masks(model: nn.Module, new: dict[str, nn.Module]) -> None:
    """Raise ``ValueError`` when a sliced layer's N:M weight mask (see
    :func:`~.layers.nm_pattern`) would no longer be N:M; ``model`` is not changed.

    Cutting output channels keeps every group of ``m`` input weights; cutting input channels
    regroups them, so a layer that holds a 2:4 mask is refused when its input is pruned.

    Example:
        >>> from slimtorch.prune import NMConfig, prune_
        >>> net = nn.Sequential(nn.Linear(8, 8))
        >>> _ = prune_(net, NMConfig(n=2, m=4))
        >>> keep = torch.tensor([0, 1, 2, 5])
        >>> check_nm_masks(net, {"0": slice_layer(net[0], keep, torch.arange(8))})
        Traceback (most recent call last):
        ...
        ValueError: channel pruning would break the N:M weight masks of '0' (2:4): ...
    """
    broken = []
    for name, module in new.items():
        old = model.get_submodule(name)._buffers.get("weight_mask")
        pattern = None if old is None else nm_pattern(old)
        if pattern is None:
            continue
        mask = module._buffers.get("weight_mask")
        if mask is None or not is_nm(mask, *pattern):
            broken.append(f"{name!r} ({pattern[0]}:{pattern[1]})")
    if broken:
        raise ValueError(
            f"channel pruning would break the N:M weight masks of {', '.join(broken)}: slicing "
            "their input channels regroups the weights along the input dimension. The model is "
            "unchanged; channel-prune first and apply N:M after (prune_(model, NMConfig(...))), "
            "or exclude the groups whose channels these layers read"
        )
