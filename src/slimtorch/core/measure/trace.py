"""Run a model once and record every aten op it dispatches, attributed to its dotted module.

This is the one source of truth for FLOP counts (:mod:`.flops`) and roofline estimates
(:mod:`.roofline`). A ``TorchDispatchMode`` sees each aten op after autograd and the composite
decompositions, so functional code the module tree does not show (a residual ``x + y`` in
``forward``, ``F.relu``, pooling, batch norm) is recorded too. Forward hooks on every submodule
keep a stack of dotted names, and each op goes to the innermost module running when it was
dispatched (the root module is ``""``).

Conventions:

* **kind** ``"matmul"``: ops with a formula in ``torch.utils.flop_counter`` (mm, addmm, bmm,
  baddbmm, convolution, attention...) plus ``_int_mm``; FLOPs from those formulas, i.e.
  2 x multiply-accumulates, bias additions not counted (``addmm`` and ``convolution`` take the
  bias in the same kernel).
* **kind** ``"free"``: views and metadata ops (``op.is_view``, ``_unsafe_view``, ``detach``...)
  and bare allocations (``empty``): no kernel, no bytes, no FLOPs.
* **kind** ``"elementwise"``: everything else (activations, adds, batch norm, pooling,
  reductions, copies): one kernel, one FLOP per element of its first output.
* **bytes**: each distinct tensor input read once and each output written once; a broadcast
  (stride-0) dimension is read once, not once per repeat.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

logger = logging.getLogger(__name__)

OpKind = Literal["matmul", "elementwise", "free"]

_FREE_OPS = frozenset(
    {
        "detach",
        "alias",
        "_unsafe_view",
        "_reshape_alias",
        "lift_fresh",
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "set_",
        "resize_",
        "sym_size",
        "sym_stride",
        "sym_numel",
        "sym_storage_offset",
        "_nested_tensor_size",
    }
)


@dataclasses.dataclass(frozen=True)
class OpRecord:
    """One dispatched aten op.

    Attributes:
        module: Dotted name of the innermost module running it (``""``: the root).
        op: The overload's name, e.g. ``"aten.addmm.default"``.
        kind: ``"matmul"``, ``"elementwise"`` or ``"free"`` (see the module docstring).
        flops: FLOPs by the conventions above.
        dtype: The compute dtype (first tensor input's, else first output's).
        reads: ``(elements, dtype)`` per distinct tensor input.
        writes: ``(elements, dtype)`` per tensor output.
    """

    module: str
    op: str
    kind: OpKind
    flops: int
    dtype: torch.dtype
    reads: tuple[tuple[int, torch.dtype], ...]
    writes: tuple[tuple[int, torch.dtype], ...]

    def bytes_moved(self, dtype: torch.dtype | None = None) -> int:
        """Bytes read + written; with ``dtype``, floating tensors are counted at its size."""

        def size(dt: torch.dtype) -> int:
            if dtype is not None and dt.is_floating_point:
                dt = dtype
            return dt.itemsize

        return sum(n * size(dt) for n, dt in self.reads + self.writes)


@dataclasses.dataclass
class ModuleRecord:
    """A module that ran: its type, own parameter count, first output shape and call count.

    ``new_params`` counts only the parameters no module that ran before owns as well (tied
    weights), so the sum over modules is the model's parameter count.
    """

    name: str
    module_type: str
    params: int
    is_leaf: bool
    new_params: int = 0
    output_shape: tuple[int, ...] | None = None
    calls: int = 0
    kernel: str | None = None  # the module's ``roofline_kernel`` ("int8": an int8 Q/DQ layer)


@dataclasses.dataclass
class OpTrace:
    """Every op of one forward pass and the modules that ran, in call order."""

    ops: list[OpRecord] = dataclasses.field(default_factory=list)
    modules: dict[str, ModuleRecord] = dataclasses.field(default_factory=dict)
    param_ids: set[int] = dataclasses.field(default_factory=set)  # parameters counted so far
    # the model's parameters and buffers, each storage once: (elements, dtype)
    state: tuple[tuple[int, torch.dtype], ...] = ()


def _distinct_elements(t: torch.Tensor) -> int:
    """Elements a kernel must touch: broadcast (stride-0) dimensions count once."""
    if t.layout != torch.strided:
        return t.numel()
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n if t.numel() else 0


def _int_mm_flops(a: torch.Tensor, b: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _mv_flops(a: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return 2 * a.numel()


def _addmv_flops(b: torch.Tensor, a: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return 2 * a.numel()


def _dot_flops(a: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return 2 * a.numel()


def _addbmm_flops(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *args: Any, **kw: Any) -> int:
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _sdpa_cpu_flops(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kw: Any
) -> int:
    """Q K^T and the weighted sum of V: 2 * L_q * L_k * (D_qk + D_v) per batch and head."""
    batch = q.numel() // (q.shape[-2] * q.shape[-1])
    return 2 * batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _mha_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, e: int, heads: int,
               qkv_w: torch.Tensor, *args: Any, **kw: Any) -> int:  # fmt: skip
    """``nn.MultiheadAttention``'s fused CPU op: the input projections, attention and the
    output projection (batch first, embed size ``e``)."""
    n, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    return 2 * n * e * e * (lq + 2 * lk) + 4 * n * lq * lk * e + 2 * n * lq * e * e


def _rnn_layer_flops(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, *args: Any,
                     **kw: Any) -> int:  # fmt: skip
    """One oneDNN RNN layer (LSTM/GRU): both gate GEMMs at every step of every sequence."""
    steps = x.numel() // x.shape[-1]
    return 2 * steps * (w_ih.numel() + w_hh.numel())


def _trilinear_flops(a: torch.Tensor, w: torch.Tensor, *args: Any, **kw: Any) -> int:
    """``nn.Bilinear``: ``x1^T W_o x2`` for every output ``o`` and row: 2 * N * |W|."""
    return 2 * a.shape[0] * w.numel()


@functools.cache
def _formulas() -> dict[Any, Callable[..., int]]:
    from torch.utils.flop_counter import flop_registry  # imported on first use: keeps import cheap

    table: dict[Any, Callable[..., int]] = dict(flop_registry)
    # products torch's registry leaves out (they would count as one FLOP per output element)
    aten = torch.ops.aten
    own = {
        "mv": _mv_flops,
        "addmv": _addmv_flops,
        "dot": _dot_flops,
        "vdot": _dot_flops,
        "addbmm": _addbmm_flops,
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_cpu_flops,
        "_native_multi_head_attention": _mha_flops,
        "mkldnn_rnn_layer": _rnn_layer_flops,
        "_trilinear": _trilinear_flops,
    }
    for name, formula in own.items():
        packet = getattr(aten, name, None)
        if packet is not None and packet not in table:
            table[packet] = formula
    return table


def _classify(func: Any) -> OpKind:
    packet = func.overloadpacket
    if packet in _formulas() or packet is torch.ops.aten._int_mm:
        return "matmul"
    if getattr(func, "is_view", False) or packet.__name__ in _FREE_OPS:
        return "free"
    return "elementwise"


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


class _Recorder(TorchDispatchMode):
    def __init__(self, trace: OpTrace, stack: list[str]) -> None:
        super().__init__()
        self.trace = trace
        self.stack = stack

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = _classify(func)
        module = self.stack[-1] if self.stack else ""
        if kind == "free":
            self.trace.ops.append(OpRecord(module, str(func), kind, 0, torch.float32, (), ()))
            return out
        inputs, seen = [], set()
        for t in _tensors((args, kwargs)):
            if id(t) not in seen:
                seen.add(id(t))
                inputs.append(t)
        outputs = _tensors(out)
        ref = inputs[0] if inputs else (outputs[0] if outputs else None)
        dtype = ref.dtype if ref is not None else torch.float32
        if kind == "matmul":
            packet = func.overloadpacket
            if packet is torch.ops.aten._int_mm:
                flops = _int_mm_flops(*args)
            else:
                flops = int(_formulas()[packet](*args, **kwargs, out_val=out))
        else:
            flops = outputs[0].numel() if outputs else 0
        self.trace.ops.append(
            OpRecord(
                module=module,
                op=str(func),
                kind=kind,
                flops=flops,
                dtype=dtype,
                reads=tuple((_distinct_elements(t), t.dtype) for t in inputs),
                writes=tuple((_distinct_elements(t), t.dtype) for t in outputs),
            )
        )
        return out


def recording_ops() -> bool:
    """Whether the innermost dispatch mode is :func:`trace_ops`'s recorder.

    Layers that run an opaque kernel (``slimtorch.decompose.FusedTuckerConv2d``) run their
    maths as ordinary ops then, so FLOP and byte counts see what they compute.

    Example:
        >>> recording_ops()
        False
    """
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return isinstance(_get_current_dispatch_mode(), _Recorder)


def call_with(model: Callable[..., Any], example_input: Any) -> Any:
    """Call ``model`` with ``example_input``: a tensor, a tuple/list of positional arguments,
    or a dict of keyword arguments.

    Example:
        >>> call_with(nn.Identity(), torch.ones(2)).shape
        torch.Size([2])
    """
    if isinstance(example_input, tuple | list):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def _state_elements(model: nn.Module) -> tuple[tuple[int, torch.dtype], ...]:
    """The model's parameters and buffers as ``(elements, dtype)``, each storage once."""
    seen: set[tuple[int, int]] = set()
    out = []
    for t in [*model.parameters(), *model.buffers()]:
        if t.layout != torch.strided:
            continue  # sparse formats: left out, which keeps the sum a lower bound
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes()) if not t.is_meta else (id(t), 0)
        except (RuntimeError, NotImplementedError):  # tensor subclasses without one storage
            key = (id(t), 0)
        if key not in seen:
            seen.add(key)
            out.append((t.numel(), t.dtype))
    return tuple(out)


def trace_ops(model: nn.Module, example_input: Any, *, eval_mode: bool = True) -> OpTrace:
    """Run ``model`` once under ``torch.no_grad`` and record its aten ops and modules.

    Args:
        model: The module to run (left where it is; its device decides where the ops run).
        example_input: A tensor, a tuple/list of positional arguments or a dict of keywords.
        eval_mode: Run in eval mode (batch norm with running statistics, no dropout); the
            previous train/eval flags are restored after.

    Example:
        >>> trace = trace_ops(nn.Linear(4, 2), torch.ones(3, 4))
        >>> [op.op for op in trace.ops if op.kind != "free"]
        ['aten.addmm.default']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    empty = [tuple(t.shape) for t in _tensors(example_input) if t.numel() == 0]
    if empty:
        raise ValueError(
            f"example_input holds an empty tensor of shape {empty[0]}: nothing would be counted "
            "or estimated; pass at least one sample (batch >= 1)"
        )
    trace = OpTrace(state=_state_elements(model))
    stack: list[str] = []
    handles = []
    for name, mod in model.named_modules():

        def pre(mod: nn.Module, args: Any, name: str = name) -> None:
            stack.append(name)
            rec = trace.modules.get(name)
            if rec is None:
                own = list(mod.parameters(recurse=False))
                new = [p for p in own if id(p) not in trace.param_ids]
                trace.param_ids.update(id(p) for p in new)
                rec = ModuleRecord(
                    name=name,
                    module_type=type(mod).__name__,
                    params=sum(p.numel() for p in own),
                    is_leaf=next(iter(mod.children()), None) is None,
                    new_params=sum(p.numel() for p in new),
                    kernel=getattr(mod, "roofline_kernel", None),
                )
                trace.modules[name] = rec
            rec.calls += 1

        def post(mod: nn.Module, args: Any, output: Any, name: str = name) -> None:
            if name in stack:
                while stack and stack.pop() != name:
                    pass
            rec = trace.modules.get(name)
            if rec is not None and rec.output_shape is None:
                outs = _tensors(output)
                rec.output_shape = tuple(outs[0].shape) if outs else None

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post, always_call=True))
    flags = {name: m.training for name, m in model.named_modules()}
    try:
        if eval_mode:
            for m in model.modules():  # eval mode; exported programs refuse .eval()
                m.training = False
        with torch.no_grad(), _Recorder(trace, stack):
            call_with(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for name, m in model.named_modules():
            m.training = flags.get(name, m.training)
    return trace
