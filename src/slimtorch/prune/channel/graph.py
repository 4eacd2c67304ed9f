"""The channel dependency graph: which layers' channels must be pruned together.

The model to study is Torch-Pruning's DepGraph (Fang, Ma, Song, Mi & Wang, 2023, "DepGraph:
Towards Any Structural Pruning", arXiv:2301.12900): channels coupled through residual
additions, concatenations, depthwise convolutions and batch norms form groups that are pruned as
one. slimtorch builds its own graph instead of depending on Torch-Pruning: it adds no
dependency, and the op set our model zoo and common CNNs use (conv, linear, batch norm,
elementwise activations and arithmetic, pooling, flatten/view, concatenation, channel-preserving
reductions) is small enough to cover completely and to refuse everything else by name.

**Tracing.** The graph is built with ``torch.fx.symbolic_trace`` plus one shape-propagation pass
on the example input. fx keeps what the graph needs and the other tracers lose: ``call_module``
nodes carry the dotted module names that the include/exclude globs and the saved widths use, and
``torch.cat``/``flatten``/``view`` nodes carry their ``dim`` and shape arguments (so a
hard-coded ``view(-1, 400)`` is caught before it breaks). The aten-level trace of
:mod:`slimtorch.core.measure.trace` sees ops after decomposition, far from the module calls,
and autograd ``grad_fn`` traversal needs gradients and loses the arguments of views. A
submodule fx cannot trace on its own (data-dependent control flow, a TT layer's loop over its
cores) is kept as one opaque call whose input channels are blocked by name; a model whose own
forward fx cannot trace raises :class:`ChannelGraphError`. fx evaluates
``if self.training:`` at trace time, so the model is traced as its flags stand and in train and
eval mode, and the walks feed one graph (a layer that several traces call is coupled like a
module called twice): a branch that only one mode runs, an auxiliary head read in training, is
sliced with the channels it reads.

**Rules.** Each conv/linear output is a new channel :class:`~.spaces.Leaf`; elementwise ops
couple their operands (a resnet stage, with its projection shortcut, becomes one group);
``cat`` along channels builds a :class:`~.spaces.Cat`; ``flatten``/``view`` of a ``(C, H, W)``
map builds an :class:`~.spaces.Expand` (each channel owns ``H * W`` features of the next
Linear); a depthwise conv passes its input channels through (in = out coupling); a grouped conv
requires equal pruning in each of its groups. Channels reaching the model input or output are
fixed. Channels that reach an op outside these rules are *blocked*: their group is skipped with
the op's name, never pruned into a broken model.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> graph = build_graph(net, torch.randn(1, 3, 8, 8))
    >>> [(g.producers, g.members) for g in graph.groups if not g.fixed]
    [(['0'], ['0', '1', '3'])]
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import fx, nn

from slimtorch.core.errors import SlimtorchError
from slimtorch.core.surgery import kept_modes
from slimtorch.prune.channel.spaces import SpaceSet
from slimtorch.prune.channel.walk import BN_TYPES, CONV_TYPES, ChannelWalker, LayerUse

logger = logging.getLogger(__name__)

__all__ = [
    "BN_TYPES",
    "CONV_TYPES",
    "ChannelGraph",
    "ChannelGraphError",
    "ChannelGroup",
    "LayerUse",
    "build_graph",
]


class ChannelGraphError(SlimtorchError):
    """The channel dependency graph could not be built, or a pruned model failed its check."""


@dataclasses.dataclass
class ChannelGroup:
    """Channels that must be pruned together, with the layers they touch.

    Attributes:
        root: Union-find id of the group.
        size: Number of channels.
        producers: Layers whose output channels form the group (graph order).
        members: Every layer sliced when the group is pruned (producers, batch norms,
            depthwise convs and consumers).
        fixed: Why the size cannot change (model input/output); empty when it can.
        blocked: Why the graph cannot resolve the group (unknown op ...); empty when it can.
        blocks: The group must be pruned equally in this many blocks (grouped convs).
        writers: The members whose output channels (batch-norm features) are the group's:
            producers, batch norms and depthwise convs, not the layers that only read it.
    """

    root: int
    size: int
    producers: list[str]
    members: list[str]
    fixed: list[str]
    blocked: list[str]
    blocks: int
    writers: list[str] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        """The group's name: its first producer."""
        return self.producers[0]


@dataclasses.dataclass
class ChannelGraph:
    """The result of :func:`build_graph`: spaces, per-layer uses and channel groups."""

    spaces: SpaceSet
    layers: dict[str, LayerUse]
    groups: list[ChannelGroup]


class _OpaqueTracer(fx.Tracer):
    """fx's tracer that also keeps as one call every submodule it cannot trace on its own (a
    TT layer's loop over its cores, a block with data-dependent control flow): the channels
    flowing into it are then blocked by name and the rest of the model is still pruned."""

    def __init__(self, opaque: dict[int, bool] | None = None) -> None:
        super().__init__()
        self._opaque: dict[int, bool] = {} if opaque is None else opaque

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if super().is_leaf_module(m, module_qualified_name):
            return True
        if id(m) not in self._opaque:
            try:  # with its own untraceable children opaque: a Sequential holding a TT layer
                _OpaqueTracer(self._opaque).trace(m)  # stays open, its other layers seen
                self._opaque[id(m)] = False
            except Exception:  # fx raises many error types on untraceable code
                self._opaque[id(m)] = True
        return self._opaque[id(m)]


def _trace(model: nn.Module, training: bool | None) -> fx.GraphModule:
    """``fx.symbolic_trace`` of ``model`` with every module in train (or eval) mode, or with the
    modules' own flags (``None``); the flags are restored. When that fails, submodules that
    cannot be traced on their own become single calls (:class:`_OpaqueTracer`)."""
    with kept_modes(model, training):
        try:
            return fx.symbolic_trace(model)
        except Exception:  # fx raises many error types on untraceable code
            tracer = _OpaqueTracer()
            graph = tracer.trace(model)
            return fx.GraphModule(tracer.root, graph)


def _propagate_shapes(gm: fx.GraphModule, model: nn.Module, example_input: Any) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with kept_modes(model), torch.no_grad():
        # the traced copy drops the root's own pre-hooks (load_model's input cast for a
        # float64 or half model): run them here, as calling the model would
        for hook_id, hook in model._forward_pre_hooks.items():
            if hook_id not in model._forward_pre_hooks_with_kwargs:
                out = hook(model, args)
                if out is not None:
                    args = out if isinstance(out, tuple) else (out,)
        ShapeProp(gm).propagate(*args)


def build_graph(model: nn.Module, example_input: Any) -> ChannelGraph:
    """Trace ``model`` with torch.fx and group its coupled channels (see the module docstring).

    Args:
        model: The model (its weights, buffers and train/eval flags are left as they are).
            Its forward is traced in both modes, the current one first.
        example_input: A tensor (or tuple of positional inputs) for the shape pass (run with
            every module in eval mode, under ``torch.no_grad()``).

    Returns:
        The :class:`ChannelGraph`; one :class:`ChannelGroup` per set of coupled conv/linear
        output channels, in graph order.

    Raises:
        ChannelGraphError: fx cannot trace the model in train or eval mode, or the example
            input does not run through either trace.

    Example:
        >>> graph = build_graph(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)),
        ...                     torch.randn(3, 4))
        >>> [(g.name, g.size, g.fixed) for g in graph.groups]
        [('0', 6, []), ('2', 2, ['model output'])]
    """
    walker: ChannelWalker | None = None
    # fx bakes `if self.training:` in at trace time: walk the forward as the flags stand, then
    # with every module in train and in eval mode, merging the walks as calls of each layer, so
    # a branch that one mode only runs (an auxiliary head) is sliced consistently too
    flags = {m.training for m in model.modules()}
    for training in (None, True, False):
        if training is not None and flags == {training}:
            continue  # the trace as the flags stand is this one
        mode = {None: " as its flags stand", True: " in train mode", False: " in eval mode"}[
            training
        ]
        try:
            gm = _trace(model, training)
        except Exception as exc:
            raise ChannelGraphError(
                f"torch.fx cannot trace {type(model).__name__}{mode} ({type(exc).__name__}: "
                f"{exc}); channel pruning needs a forward that traces in train and eval mode: "
                "move data-dependent control flow out of forward, or prune the traceable "
                "submodules one by one"
            ) from exc
        try:
            _propagate_shapes(gm, model, example_input)
        except Exception as exc:
            raise ChannelGraphError(
                f"{type(model).__name__} failed on example_input while propagating shapes "
                f"through its forward traced{mode} ({type(exc).__name__}: {exc}); pass one "
                "batch the model accepts"
            ) from exc
        if walker is None:
            walker = ChannelWalker(gm)
            walker.run()
        else:
            walker.run(gm, label=f"the {'train' if training else 'eval'}-mode forward's")
    assert walker is not None
    spaces = walker.spaces
    producers: dict[int, list[str]] = {}
    for leaf in spaces.leaves:
        if leaf.origin is not None:
            producers.setdefault(spaces.find(leaf), []).append(leaf.origin)
    members: dict[int, list[str]] = {root: [] for root in producers}
    writers: dict[int, list[str]] = {root: [] for root in producers}
    for name, use in walker.layers.items():
        written = spaces.roots_of(use.out_space)
        touched = written | (set() if use.in_space is None else spaces.roots_of(use.in_space))
        for root in touched & members.keys():
            members[root].append(name)
            if root in written:
                writers[root].append(name)
    groups = [
        ChannelGroup(
            root=root,
            size=_size_of(spaces, root),
            producers=names,
            members=members[root],
            fixed=list(spaces.fixed.get(root, [])),
            blocked=list(spaces.blocked.get(root, [])),
            blocks=spaces.blocks.get(root, 1),
            writers=writers[root],
        )
        for root, names in producers.items()
    ]
    logger.debug("channel graph: %d layers, %d groups", len(walker.layers), len(groups))
    return ChannelGraph(spaces, walker.layers, groups)


def _size_of(spaces: SpaceSet, root: int) -> int:
    for leaf in spaces.leaves:
        if spaces.find(leaf) == root:
            return leaf.size
    raise KeyError(root)
