"""Module surgery: replace a submodule by its dotted name, and find the ones that cannot be."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")

# Modules whose forward reads these children's ``weight``/``bias`` instead of calling them.
_READ_DIRECTLY: dict[type[nn.Module], tuple[str, ...]] = {
    nn.MultiheadAttention: ("out_proj",),
    nn.TransformerEncoderLayer: ("linear1", "linear2"),  # its eval-mode fast path
}


# What a torch layer computes with: a subclass overriding one of them computes something else.
_FORWARDS = ("forward", "_conv_forward")


@contextlib.contextmanager
def kept_modes(model: nn.Module, training: bool | None = False) -> Iterator[nn.Module]:
    """Run the block with ``model`` in train (or eval) mode (``None``: with the modules' own
    flags), then give every submodule back its own mode. ``model.train(was)`` would not: it
    sets every submodule to the root's flag, so a batch norm the user froze in eval mode inside
    a training model came back in train mode and its running statistics moved on the next
    forward.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> with kept_modes(net):
        ...     net[1].training
        False
        >>> net.training, net[1].training
        (True, False)
    """
    modes = [(m, m.training) for m in model.modules()]
    if training is not None:
        model.train(training)
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def eval_held(model: nn.Module) -> dict[str, nn.Module]:
    """The submodules a training-mode ``model`` holds in eval mode, by name: a batch norm the
    user froze for a small-batch fine-tune, a dropout switched off. :func:`train_keeping` leaves
    them in eval mode. A model in eval mode as a whole (as ``load_model`` returns it) holds
    none: it trains whole.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> list(eval_held(net)), eval_held(net.eval())
        (['1'], {})
    """
    if not model.training:
        return {}
    return {n: m for n, m in model.named_modules() if not m.training}


def train_keeping(model: nn.Module, held: dict[str, nn.Module]) -> None:
    """``model.train()``, then the ``held`` modules (from :func:`eval_held`) back to eval mode.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> held = eval_held(net)
        >>> train_keeping(net.eval(), held)  # an evaluation left every module in eval mode
        >>> net.training, net[0].training, net[1].training
        (True, True, False)
    """
    model.train()
    for m in held.values():
        m.eval()


def fx_graph(model: nn.Module) -> torch.fx.Graph:
    """The graph ``torch.fx.symbolic_trace(model)`` holds, without building its GraphModule:
    torch keeps every GraphModule's generated source for the life of the process, so a
    transform that only reads the graph grew the process by ~20 KB a call.

    Example:
        >>> [n.op for n in fx_graph(nn.Sequential(nn.Linear(2, 2), nn.ReLU())).nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    return torch.fx.Tracer().trace(model)


def nonfinite_tensors(module: nn.Module, *, recurse: bool = True) -> list[str]:
    """Names of ``module``'s floating parameters and buffers that hold NaN/Inf (meta tensors,
    which have no values, are left out).

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> _ = bn.running_var.fill_(float("nan"))
        >>> nonfinite_tensors(bn)
        ['running_var']
    """
    named = (*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse))
    return [
        n for n, t in named
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())
    ]  # fmt: skip


def require_values(model: nn.Module, verb: str) -> None:
    """Raise ``ValueError`` when ``model`` holds meta-device tensors: they have shapes but no
    values, and every transform reads the values. Anything that is not a module is left to the
    caller's own type check.

    Example:
        >>> require_values(nn.Linear(2, 2, device="meta"), "prune_")
        Traceback (most recent call last):
        ...
        ValueError: prune_ needs the model's values, but 2 of its tensors (weight, bias) are ...
    """
    if not isinstance(model, nn.Module):
        return
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        names = ", ".join(meta[:4]) + (", ..." if len(meta) > 4 else "")
        raise ValueError(
            f"{verb} needs the model's values, but {len(meta)} of its tensors ({names}) are on "
            "the meta device, which holds shapes only; load its weights first "
            "(model.to_empty(device='cpu'), then load_state_dict)"
        )


def require_submodules(model: nn.Module, verb: str) -> None:
    """Raise ``ValueError`` when ``model`` has no submodules: transforms change a model's layers
    by their dotted names, so a bare layer would be left as it is without a word.

    Example:
        >>> require_submodules(nn.Linear(2, 2), "decompose_")
        Traceback (most recent call last):
        ...
        ValueError: decompose_ changes the layers of a model by name, and Linear has none ...
    """
    if isinstance(model, nn.Module) and next(model.children(), None) is None:
        raise ValueError(
            f"{verb} changes the layers of a model by name, and {type(model).__name__} has none "
            "(it is a single layer); wrap it: nn.Sequential(layer)"
        )


def require_float32(
    model: nn.Module, verb: str, fix: str, *, also: tuple[torch.dtype, ...] = ()
) -> None:
    """Raise ``ValueError`` when ``model`` holds floating tensors other than float32 (and the
    dtypes in ``also``): a cast model, ``half()``, ``double()``; naming them and ``fix``.

    Example:
        >>> require_float32(nn.Linear(2, 2).half(), "decompose_", "factorise, then cast")
        Traceback (most recent call last):
        ...
        ValueError: the model holds torch.float16 tensors; decompose_ takes a float32 model ...
    """
    other = sorted(
        {
            str(t.dtype)
            for t in (*model.parameters(), *model.buffers())
            if t.is_floating_point() and t.dtype not in (torch.float32, *also)
        }
    )
    if other:
        raise ValueError(
            f"the model holds {', '.join(other)} tensors; {verb} takes a float32 model ({fix})"
        )


def sparse_kernel_layers(model: nn.Module) -> list[str]:
    """Names of the layers :func:`~slimtorch.sparse.sparsify_` swapped for sparse kernels
    (they can give their dense layer back: ``to_dense_module``)."""
    return [name for name, m in model.named_modules() if hasattr(m, "to_dense_module")]


def some_of(names: list[str]) -> str:
    """``names[0]``, with how many more there are (``"conv1 (and 2 more)"``).

    Example:
        >>> some_of(["fc"]), some_of(["a", "b", "c"])
        ('fc', 'a (and 2 more)')
    """
    return names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more)"


def refuse_sparse_kernels(model: nn.Module, doing: str) -> None:
    """Raise ``ValueError`` naming the sparse-kernel layers of ``model``: their weights are
    sparse CSR/BSR tensors, which cannot be deep-copied, exported or traced, so ``doing``
    (an export, a compile for int8) would fail deep inside torch.

    Example:
        >>> refuse_sparse_kernels(nn.Linear(2, 2), "export_onnx")
    """
    found = sparse_kernel_layers(model)
    if found:
        raise ValueError(
            f"{some_of(found)} is a sparse kernel from sparsify_, which "
            f"{doing} cannot take (sparse tensors do not copy, trace or export); call "
            "slimtorch.sparse.densify_(model) first: the dense layers keep the pruned zeros"
        )


def carry_frozen(old: nn.Module, new: nn.Module) -> None:
    """Give ``new``'s parameters ``old``'s ``requires_grad``: a frozen weight's replacement
    (its factors, say) stays frozen, and a bias keeps its own setting (a model may train only
    its biases).

    Example:
        >>> old = nn.Linear(4, 4)
        >>> new = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 4))  # its factors
        >>> _ = old.weight.requires_grad_(False)
        >>> carry_frozen(old, new)
        >>> [p.requires_grad for p in new.parameters()]
        [False, False, True]
    """
    bias = getattr(old, "bias", None)
    for name, param in new.named_parameters():
        source = bias if name.endswith("bias") and isinstance(bias, torch.Tensor) else old.weight
        param.requires_grad_(bool(source.requires_grad))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (which must already exist).

    Works through ``nn.Sequential``/``nn.ModuleList`` indices (``"features.3"``) and
    ``nn.ModuleDict`` keys, keeping the container's order.

    Raises:
        TypeError: ``model`` or ``module`` is not an ``nn.Module``, or ``name`` not a str.
        ValueError: ``name`` is empty or does not name an existing submodule.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> set_submodule(net, "0", nn.Identity())
        >>> type(net[0]).__name__
        'Identity'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):  # 0 would read as the empty (root) name
        raise TypeError(f"name must be a dotted submodule name (a str), got {name!r}")
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
    old = parent._modules[child]
    if old is not None and old is not module:  # a replacement: what the old layer had
        if hooked := _hooked(old, name):
            logger.warning(
                "hooks on %s are not carried over to %s's replacement (%s); register them "
                "again on the new layer if they are still wanted",
                ", ".join(hooked),
                name,
                type(module).__name__,
            )
        if _channels_last(old):
            _to_channels_last(module)
    setattr(parent, child, module)


def _channels_last(module: nn.Module) -> bool:
    """Whether ``module`` holds a 4-D weight laid out channels-last (and not also NCHW)."""
    return any(
        t.dim() == 4
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
        for t in (*module.parameters(), *module.buffers())
    )


def _to_channels_last(module: nn.Module) -> None:
    """Lay out the torch layers of a replacement channels-last, as the layer it replaces was
    (a ``model.to(memory_format=torch.channels_last)`` model keeps its layout through
    transforms). Only torch's own leaf layers: custom kernels may read their weights raw."""
    for sub in module.modules():
        if type(sub).__module__.startswith("torch.nn.modules.") and not any(sub.children()):
            sub.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def _hooked(module: nn.Module, name: str) -> list[str]:
    """``module``'s own and its submodules' hooks, as ``"<name> (<n> forward hooks)"``."""
    found = []
    for sub_name, sub in module.named_modules(prefix=name):
        counts = [(d.strip("_").replace("_", " ")[:-1], len(getattr(sub, d))) for d in _HOOK_DICTS]
        if listed := [f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in counts if n]:
            found.append(f"{sub_name} ({', '.join(listed)})")
    return found


def own_forward_reason(module: nn.Module) -> str | None:
    """Why no other module can stand in for ``module``: its class subclasses a torch layer
    (``nn.Conv2d``, ``nn.Linear`` ...) and overrides its ``forward``, whose own computation a
    replacement would drop; None otherwise.

    Example:
        >>> class Doubled(nn.Linear):
        ...     def forward(self, x):
        ...         return 2 * super().forward(x)
        >>> own_forward_reason(Doubled(2, 2))
        'Doubled subclasses nn.Linear with a forward of its own, which a replacement would drop'
        >>> own_forward_reason(nn.Linear(2, 2)) is None
        True
    """
    kind = type(module)
    base = next((c for c in kind.__mro__ if c.__module__.startswith("torch.nn.")), nn.Module)
    if base in (kind, nn.Module):
        return None
    if any(getattr(kind, f, None) is not getattr(base, f, None) for f in _FORWARDS):
        return (
            f"{kind.__name__} subclasses nn.{base.__name__} with a forward of its own, which a "
            "replacement would drop"
        )
    return None


def parameter_sharing(model: nn.Module) -> Callable[[str], list[str]]:
    """A lookup built in one pass over ``model``: submodule name -> the parameters outside it
    that are the very tensors of its own (tied weights, or the module registered under
    another name too), by dotted name.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> net[1].weight = net[0].weight
        >>> shared = parameter_sharing(net)
        >>> shared("1"), shared("0")
        (['0.weight'], ['1.weight'])
    """
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, param in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append(f"{mname}.{pname}" if mname else pname)

    def shared(name: str) -> list[str]:
        mine = model.get_submodule(name).parameters()
        return sorted(
            {o for p in mine for o in owners.get(id(p), []) if not o.startswith(f"{name}.")}
        )

    return shared


def _traced_reads(model: nn.Module) -> set[str]:
    """Parameters and buffers the model's forward reads by name (``F.linear(x, self.fc.weight)``),
    found on its torch.fx trace; empty when it cannot be traced (then only ``_READ_DIRECTLY``
    guards the known torch modules that do this)."""
    try:
        graph = _LayerTracer().trace(model)
    except Exception:  # fx raises many error types on untraceable code
        return set()
    return {str(n.target) for n in graph.nodes if n.op == "get_attr"}


class _LayerTracer(torch.fx.Tracer):
    """torch.fx's tracer, also keeping subclasses of torch layers that compute what the torch
    layer does (no forward of their own) as leaves: tracing into them would read as their
    forward reading their weight by name."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if super().is_leaf_module(m, module_qualified_name):
            return True
        base = next((c for c in type(m).__mro__ if c.__module__.startswith("torch.nn.")), None)
        containers = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)
        return base is not None and base not in containers and own_forward_reason(m) is None


def replacement_blockers(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """Targets that another module cannot stand in for, by name, with the reason: a class with
    a forward of its own (:func:`own_forward_reason`), a forward that reads the layer's weight
    instead of (or besides) calling it (``_READ_DIRECTLY``, and the torch.fx trace of ``model``),
    or a parameter that another module shares (tied weights, or one module registered under
    several names).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> net[1].weight = net[0].weight
        >>> list(replacement_blockers(net, [("1", net[1])]))
        ['1']
    """
    readers: dict[int, str] = {}
    for mname, mod in model.named_modules():
        for kind, children in _READ_DIRECTLY.items():
            if isinstance(mod, kind):
                for child in children:
                    readers[id(getattr(mod, child))] = (
                        f"{mname or 'the model'} (nn.{kind.__name__})"
                    )
    shared_with = parameter_sharing(model)
    traced_reads = _traced_reads(model)
    reasons: dict[str, str] = {}
    for name, module in targets:
        own = own_forward_reason(module)
        if own is not None:
            reasons[name] = f"{own}; exclude it"
            continue
        if id(module) in readers:
            reasons[name] = (
                f"{readers[id(module)]} reads this layer's weight directly instead of calling "
                "it, so replacing it breaks the parent's forward; exclude it"
            )
            continue
        read = sorted(t for t in traced_reads if t.startswith(f"{name}."))
        if read:
            reasons[name] = (
                f"the forward reads {', '.join(read)} directly, besides or instead of calling "
                "the layer, so a replacement would break it; exclude it"
            )
            continue
        shared = shared_with(name)
        if shared:
            reasons[name] = (
                f"its parameters are shared with {', '.join(shared)} (tied weights); replacing "
                "would untie them and add parameters; exclude it"
            )
    return reasons
