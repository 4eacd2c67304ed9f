"""The fx walk behind :func:`~slimtorch.prune.channel.graph.build_graph`: one rule per op.

Each node of the traced graph gets the channel space of its output tensor and the axis that
carries it (1 for ``(N, C, ...)`` maps, the last axis for Linear features). Layers
(conv/linear/batch norm) record a :class:`LayerUse`; elementwise ops unify their operands'
spaces; ``cat``, ``flatten`` and ``view`` build composite spaces; pooling, activations and
channel-preserving reductions pass the space through (the ops each rule covers are listed in
:mod:`.ops`). Every other op *blocks* the spaces that reach it, with a reason naming the op
(see :mod:`.spaces`). Parameters, constants and whatever is computed from them alone
(``gamma[:, None, None]``) are not tracked: an elementwise op that combines channels with such
a tensor, not broadcast over the channel axis, blocks them.

Example:
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    >>> ShapeProp(gm).propagate(torch.randn(2, 4))
    tensor(...)
    >>> walker = ChannelWalker(gm)
    >>> walker.run()
    >>> {name: use.kind for name, use in walker.layers.items()}
    {'0': 'linear', '2': 'linear'}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp  # noqa: F401  (used by the example)
from torch.nn.utils import parametrize

from slimtorch.prune.channel.ops import (
    BINARY,
    BINARY_METHODS,
    BN_TYPES,
    CASTS,
    CONV_TYPES,
    META_METHODS,
    NEW_METHODS,
    POOL_FUNCS,
    POOL_MODULES,
    REDUCE,
    REDUCE_METHODS,
    UNARY_FUNCS,
    UNARY_METHODS,
    UNARY_MODULES,
)
from slimtorch.prune.channel.spaces import Cat, Space, SpaceSet, expand

_UNTRACKED = "the graph does not track (a parameter or constant)"


@dataclasses.dataclass
class LayerUse:
    """How one prunable layer reads and writes channel spaces.

    Attributes:
        name: Dotted module name.
        kind: ``"conv"``, ``"linear"`` or ``"bn"``.
        in_space: The channels a conv/linear reads (``None``: not tracked, never sliced).
        out_space: The channels it writes (for a batch norm: its features).
    """

    name: str
    kind: Literal["conv", "linear", "bn"]
    in_space: Space | None
    out_space: Space


@dataclasses.dataclass
class _T:
    """What the walk knows of one tensor: its channel space (None: untracked) and axis."""

    space: Space | None
    cdim: int
    shape: tuple[int, ...]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def _arg(node: fx.Node, pos: int, key: str, default: Any) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(key, default)


class ChannelWalker:
    """Walks a shape-propagated fx graph and records channel spaces and layer uses."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.spaces = SpaceSet()
        self.info: dict[fx.Node, _T] = {}
        self.layers: dict[str, LayerUse] = {}
        self.input_leaves: dict[int, str] = {}  # id of a model input's space -> its node name
        self.label = ""  # the trace being walked, when there are several (see run)

    # ---- helpers -------------------------------------------------------------------------
    def _inputs(self, node: fx.Node) -> list[_T]:
        found: list[fx.Node] = []

        def visit(n: fx.Node) -> fx.Node:
            found.append(n)
            return n

        fx.node.map_arg((node.args, node.kwargs), visit)
        return [self.info[n] for n in found if n in self.info]

    def _describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            mod = self.modules[str(node.target)]
            return f"{type(mod).__name__} module {node.target!r}"
        if node.op == "call_method":
            return f"method .{node.target}() (node {node.name!r})"
        name = getattr(node.target, "__name__", str(node.target))
        return f"function {name} (node {node.name!r})"

    def _set(self, node: fx.Node, space: Space | None, cdim: int) -> None:
        shape = _shape(node)
        if shape is not None:
            self.info[node] = _T(space, cdim, shape)

    def _opaque(self, node: fx.Node, reason: str | None) -> None:
        """Block every tracked input; the output gets a fresh leaf blocked for the same reason."""
        for t in self._inputs(node):
            if t.space is not None and reason is not None:
                self.spaces.block(t.space, reason)
        shape = _shape(node)
        if shape is None:
            return
        cdim = 1 if len(shape) >= 2 else 0
        if not shape:
            self.info[node] = _T(None, 0, shape)
            return
        leaf = self.spaces.new_leaf(shape[cdim])
        if reason is not None:
            self.spaces.block(leaf, reason)
        self.info[node] = _T(leaf, cdim, shape)

    def _unsupported(self, node: fx.Node) -> None:
        if all(t.space is None for t in self._inputs(node)):
            # builds a tensor from shapes, constants and parameters only (``gamma[:, None]``):
            # it stays untracked, so an op that combines it with channels sees it (elementwise)
            self._set(node, None, 0)
            return
        self._opaque(node, f"channels flow into unsupported {self._describe(node)}")

    def _first(self, node: fx.Node) -> _T | None:
        first = node.args[0] if node.args else None
        return self.info.get(first) if isinstance(first, fx.Node) else None

    def _reanchored(self, t: _T, axis: int) -> _T:
        """``t`` with its space on ``axis`` when it is a model input: an input's channel axis
        is a guess (axis 1) until a layer reads it (a Linear on ``(N, T, C)`` tokens reads the
        last axis) or an add meets a layer output; inputs are never pruned, so the new space is
        fixed like the first. Any other tensor is returned as it is."""
        name = self.input_leaves.get(id(t.space))
        if name is None or axis == t.cdim or not 0 <= axis < len(t.shape):
            return t
        leaf = self.spaces.new_leaf(t.shape[axis])
        self.spaces.fix(leaf, f"model input {name!r}")
        self.input_leaves[id(leaf)] = name
        return _T(leaf, axis, t.shape)

    def _channel_first(self, node: fx.Node, t: _T) -> bool:
        if t.space is not None and t.cdim != 1:
            self._opaque(node, f"{self._describe(node)} needs channels on axis 1")
            return False
        return True

    # ---- rules ---------------------------------------------------------------------------
    def passthrough(self, node: fx.Node) -> None:
        """A channel-preserving one-input op. Handed a second tracked tensor (a tensor
        ``min``/``max`` of ``clamp``), it combines it elementwise: see :meth:`elementwise`."""
        others: list[fx.Node] = []

        def visit(n: fx.Node) -> fx.Node:
            others.append(n)
            return n

        fx.node.map_arg((node.args[1:], node.kwargs), visit)
        cast = node.op == "call_method" and node.target in CASTS
        if node.op != "call_module" and not cast and any(n in self.info for n in others):
            self.elementwise(node)
            return
        t = self._first(node)
        shape = _shape(node)
        if t is None or shape is None or len(shape) != len(t.shape):
            self._unsupported(node)
            return
        self._set(node, t.space, t.cdim)

    def pool(self, node: fx.Node) -> None:
        """Keeps the axis C of ``(N, C, *spatial)``; a ``...1d`` pool on ``(N, C)`` pools C."""
        t = self._first(node)
        out = _shape(node)
        if t is None:
            self._unsupported(node)
            return
        op = self.modules[str(node.target)] if node.op == "call_module" else node.target
        name = type(op).__name__ if isinstance(op, nn.Module) else getattr(op, "__name__", "")
        dims = int(name[-2]) if name[-2:] in ("1d", "2d", "3d") else None
        kept = out is not None and len(out) == len(t.shape) and out[t.cdim] == t.shape[t.cdim]
        if t.space is not None and (not kept or (dims is not None and len(t.shape) != dims + 2)):
            self._opaque(node, f"{self._describe(node)} pools over the channel axis (input "
                               f"{tuple(t.shape)})")  # fmt: skip
        elif self._channel_first(node, t):
            self._set(node, t.space, 1)

    def elementwise(self, node: fx.Node) -> None:
        out = _shape(node)
        ins = self._inputs(node)
        if out is None or not ins:
            self._unsupported(node)
            return
        nd = len(out)
        aligned = [(t, t.cdim + nd - len(t.shape)) for t in ins if t.space is not None]
        if not aligned:  # parameters and constants only: the result is not tracked either
            self._set(node, None, 0)
            return
        layer_axes = [d for t, d in aligned if id(t.space) not in self.input_leaves]
        if layer_axes:  # a model input takes the channel axis of the layer output it meets
            moved = [self._reanchored(t, layer_axes[0] - nd + len(t.shape)) for t, _ in aligned]
            aligned = [(t, t.cdim + nd - len(t.shape)) for t in moved]
        full = [(t, d) for t, d in aligned if t.shape[t.cdim] == out[d]]
        if not full:
            self._opaque(node, f"{self._describe(node)} broadcasts tracked channels")
            return
        first, d0 = full[0]
        assert first.space is not None
        where = self._describe(node)
        for t, d in full[1:]:
            assert t.space is not None
            if d != d0:
                self._opaque(node, f"{where} adds channel axes that do not line up")
                return
            self.spaces.unify(first.space, t.space, where)
        # any other operand not broadcast over axis d0 (a parameter or constant, or a tensor with
        # its channels on another axis) holds values that cannot be sliced with those channels
        others = [t for t, _ in aligned if all(t is not f for f, _ in full)]
        for t in [t for t in ins if t.space is None] + others:
            k = d0 - (nd - len(t.shape))
            if 0 <= k < len(t.shape) and t.shape[k] != 1:
                what = _UNTRACKED if t.space is None else "whose channels lie on another axis"
                self.spaces.block(first.space, f"{where} combines channels with a tensor {what}")
        self._set(node, first.space, d0)

    def reduce(self, node: fx.Node) -> None:
        t = self._first(node)
        if t is None or t.space is None:
            self._unsupported(node)
            return
        dims = _arg(node, 1, "dim", None)
        keepdim = bool(_arg(node, 2, "keepdim", False))
        if dims is None:
            self._opaque(node, f"{self._describe(node)} reduces over the channel axis")
            return
        nd = len(t.shape)
        dims = [d % nd for d in (dims if isinstance(dims, list | tuple) else [dims])]
        if t.cdim in dims:
            self._opaque(node, f"{self._describe(node)} reduces over the channel axis")
            return
        self._set(node, t.space, t.cdim if keepdim else t.cdim - sum(d < t.cdim for d in dims))

    def softmax(self, node: fx.Node, dim: Any) -> None:
        t = self._first(node)
        if t is None or t.space is None or not isinstance(dim, int) or dim % len(t.shape) == t.cdim:
            self._unsupported(node)
        else:
            self._set(node, t.space, t.cdim)

    def flatten(self, node: fx.Node, start: int, end: int) -> None:
        t = self._first(node)
        out = _shape(node)
        if t is None or t.space is None or out is None:
            self._unsupported(node)
            return
        nd = max(len(t.shape), 1)
        start, end = start % nd, end % nd
        c = t.cdim
        if c < start:
            self._set(node, t.space, c)
        elif c > end:
            self._set(node, t.space, c - (end - start))
        elif math.prod(t.shape[start:c]) != 1:
            self._opaque(node, f"{self._describe(node)} flattens channels that are not outermost")
        else:
            self._set(node, expand(t.space, math.prod(t.shape[c + 1 : end + 1])), start)

    def reshape(self, node: fx.Node, sizes: list[Any]) -> None:
        t = self._first(node)
        out = _shape(node)
        if t is None or t.space is None or out is None:
            self._unsupported(node)
            return
        c, s = t.cdim, t.shape
        factor = None
        if out[:c] == s[:c]:
            for m in range(1, len(s) - c + 1):
                if out[c : c + 1] == (math.prod(s[c : c + m]),) and out[c + 1 :] == s[c + m :]:
                    factor = math.prod(s[c + 1 : c + m])
                    break
        where = self._describe(node)
        if factor is None:
            self._opaque(node, f"{where} reshapes the channel axis")
        elif c < len(sizes) and isinstance(sizes[c], int) and sizes[c] != -1:
            self._opaque(node, f"{where} hard-codes the size {sizes[c]} of the channel axis; "
                         "compute it (x.flatten(1), x.view(x.size(0), -1))")  # fmt: skip
        else:
            self._set(node, expand(t.space, factor), c)

    def cat(self, node: fx.Node) -> None:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = _arg(node, 1, "dim", 0)
        ts = [self.info.get(p) for p in parts] if isinstance(parts, list | tuple) else [None]
        if any(t is None or t.space is None for t in ts) or not isinstance(dim, int):
            self._opaque(node, f"{self._describe(node)} joins tensors the graph does not track")
            return
        tracked = [t for t in ts if t is not None]
        spaces = [t.space for t in tracked if t.space is not None]
        cdims = {t.cdim for t in tracked}
        if len(cdims) != 1:
            self._opaque(node, f"{self._describe(node)} joins tensors with different channel axes")
            return
        cdim = cdims.pop()
        if dim % len(tracked[0].shape) == cdim:
            self._set(node, Cat(tuple(spaces)), cdim)
            return
        for sp in spaces[1:]:
            self.spaces.unify(spaces[0], sp, self._describe(node))
        self._set(node, spaces[0], cdim)

    def module(self, node: fx.Node) -> None:
        name = str(node.target)
        mod = self.modules[name]
        t = self._first(node)
        if type(mod) in UNARY_MODULES:
            self.passthrough(node)
        elif type(mod) in POOL_MODULES:
            self.pool(node)
        elif type(mod) is nn.Flatten:
            self.flatten(node, mod.start_dim, mod.end_dim)
        elif type(mod) in (nn.Softmax, nn.LogSoftmax):
            self.softmax(node, mod.dim)
        elif parametrize.is_parametrized(mod):
            self._opaque(node, f"{self._describe(node)} is parametrized")
        elif type(mod) in CONV_TYPES or type(mod) is nn.Linear or type(mod) in BN_TYPES:
            if t is None:
                self._unsupported(node)
            else:
                self.layer(node, name, mod, t)
        else:
            self._unsupported(node)

    def layer(self, node: fx.Node, name: str, mod: nn.Module, t: _T) -> None:
        nd = len(t.shape)
        if isinstance(mod, nn.Linear):
            t = self._reanchored(t, nd - 1)
            if t.space is not None and t.cdim != nd - 1:
                # the channels it is handed stay as they are; its own output features are a
                # group of their own (its input features are then not tracked: never sliced)
                self.spaces.block(t.space, f"{self._describe(node)} reads features on another axis")
                t = _T(None, nd - 1, t.shape)
        elif not self._channel_first(node, t):
            return
        prev = self.layers.get(name)
        if prev is not None:  # a module called twice: both inputs meet the same weights
            where = f"{self.label} call of {name!r}" if self.label else f"second call of {name!r}"
            read = prev.out_space if prev.kind == "bn" else prev.in_space
            if read is not None and t.space is not None:
                self.spaces.unify(read, t.space, where)
            for sp in (read, t.space) if (read is None) != (t.space is None) else ():
                if sp is not None:  # one call reads tracked channels, the other does not
                    self.spaces.block(sp, f"{where} reads channels another call does not")
            self._set(node, prev.out_space, nd - 1 if prev.kind == "linear" else 1)
            return
        if isinstance(mod, BN_TYPES):
            space = t.space if t.space is not None else self.spaces.new_leaf(t.shape[1])
            self.layers[name] = LayerUse(name, "bn", None, space)
            self._set(node, space, 1)
            return
        if isinstance(mod, nn.Linear):
            out = self.spaces.new_leaf(mod.out_features, name)
            self.layers[name] = LayerUse(name, "linear", t.space, out)
            self._set(node, out, nd - 1)
            return
        assert isinstance(mod, CONV_TYPES)
        g = mod.groups
        out_space: Space
        if g > 1 and g == mod.in_channels and t.space is not None:  # depthwise: in = out
            out_space = expand(t.space, mod.out_channels // g)
        else:
            out_space = self.spaces.new_leaf(mod.out_channels, name)
            if g > 1:
                self.spaces.require_blocks(out_space, g, name)
                if t.space is not None:
                    self.spaces.require_blocks(t.space, g, name)
        self.layers[name] = LayerUse(name, "conv", t.space, out_space)
        self._set(node, out_space, 1)

    def function(self, node: fx.Node) -> None:
        f = node.target
        if f in UNARY_FUNCS:
            self.passthrough(node)
        elif f in BINARY:
            self.elementwise(node)
        elif f in POOL_FUNCS:
            self.pool(node)
        elif f in REDUCE:
            self.reduce(node)
        elif f is torch.flatten:
            self.flatten(node, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        elif f is torch.reshape:
            sizes = _arg(node, 1, "shape", ())
            self.reshape(node, list(sizes) if isinstance(sizes, list | tuple) else [])
        elif f in (torch.cat, torch.concat, torch.concatenate):
            self.cat(node)
        elif f in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax):
            self.softmax(node, _arg(node, 1, "dim", None))
        elif f is getattr:
            self.attribute(node)
        elif not self._inputs(node):
            self._set(node, None, 0)
        else:
            self._unsupported(node)

    def attribute(self, node: fx.Node) -> None:
        """``x.data`` is ``x``; ``.T``, ``.mT`` block the channels; ``.shape`` is untracked."""
        t = self._first(node)
        attr = node.args[1] if len(node.args) > 1 else None
        if t is None or t.space is None or _shape(node) is None:
            self._set(node, None, 0)
        elif attr in ("data", "real"):
            self._set(node, t.space, t.cdim)
        else:
            self._opaque(node, f"channels flow into the attribute .{attr} (node {node.name!r})")

    def method(self, node: fx.Node) -> None:
        m = str(node.target)
        if m in META_METHODS:
            return
        if m in NEW_METHODS:
            self._set(node, None, 0)
            return
        if m in UNARY_METHODS:
            self.passthrough(node)
        elif m in BINARY_METHODS:
            self.elementwise(node)
        elif m in REDUCE_METHODS:
            self.reduce(node)
        elif m == "flatten":
            self.flatten(node, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        elif m in ("view", "reshape"):
            rest = list(node.args[1:])
            sizes = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], list | tuple) else rest
            self.reshape(node, sizes)
        elif m in ("softmax", "log_softmax"):
            self.softmax(node, _arg(node, 1, "dim", None))
        else:
            self._unsupported(node)

    def run(self, gm: fx.GraphModule | None = None, label: str = "") -> None:
        """Walk ``self.gm``, or another trace ``gm`` of the same model (its train-mode forward,
        say): a layer both traces call is treated as a module called twice, so the constraints
        of the two traces are merged; ``label`` names that trace in the reasons."""
        if gm is not None:
            self.gm, self.modules = gm, dict(gm.named_modules())
        self.label = label
        handlers: dict[str, Callable[[fx.Node], None]] = {
            "call_module": self.module,
            "call_function": self.function,
            "call_method": self.method,
        }
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                shape = _shape(node)
                if shape:
                    cdim = 1 if len(shape) >= 2 else 0
                    leaf = self.spaces.new_leaf(shape[cdim])
                    self.spaces.fix(leaf, f"model input {node.name!r}")
                    self.info[node] = _T(leaf, cdim, shape)
                    self.input_leaves[id(leaf)] = node.name
            elif node.op == "get_attr":
                self._set(node, None, 0)
            elif node.op == "output":
                for t in self._inputs(node):
                    if t.space is not None:
                        self.spaces.fix(t.space, "model output")
            else:
                handlers[node.op](node)
