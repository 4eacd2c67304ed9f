"""Fused Tucker-2 convolutions for inference: ``fuse_tucker_`` and ``FusedTuckerConv2d``.

A :class:`~slimtorch.decompose.layers.TuckerConv2d` runs as three library convolutions (1x1,
core, 1x1). On the small maps and 4-16-channel factors of a CIFAR-style ResNet that is why
factorising barely pays on a CPU: each convolution writes its whole output map and reads it
back, and library kernels tuned for wide layers run the narrow factors at a fraction of their
usual rate (docs/benchmarks.md measured 1.61x compiled for resnet56 at 8.2x fewer FLOPs). The
fused kernel (``kernels/tucker_block.c``, built on first use by :mod:`slimtorch.decompose.native`)
runs the three per image with the intermediate maps in cache, and ends in one epilogue that adds
the bias, the residual and the ReLU. On CUDA GPUs the same fusion is a CUDA kernel
(``kernels/tucker_block.cu``, compiled per layer shape by :mod:`slimtorch.decompose.cuda_kernel`)
that keeps the intermediate maps in shared memory.

:func:`fuse_tucker_` prepares a factorised model for it, in place: it folds the batch norm that
follows each Tucker convolution into the last 1x1 (Jacob et al. 2018, arXiv:1712.05877), takes
in the ReLU that follows, and in a residual block that declares it (``FUSED_RESIDUAL``, as
slimtorch's ResNet ``BasicBlock`` does) the shortcut addition and the block's last ReLU as well.
The change is recorded (``"decompose.fuse_tucker"``) so :func:`slimtorch.models.load_model`
rebuilds it.

On the CPU each layer packs its weights for the kernel once per input size and reuses them
(:mod:`slimtorch.decompose.native_plan`; a weight replaced or changed in place is packed again):
at batch 1 that took a layer call from 20-24 to 12-14 us on one core.

The fused layer is an inference form. It runs a kernel for float32 tensors on the CPU or a CUDA
GPU when one could be built, and otherwise (ROCm, other dtypes, no compiler, gradients needed)
the same maths as library convolutions; outputs agree within float rounding either way. Under
autocast it computes in float32, like autocast's own float32 operators: a half-precision input
or residual is cast up and the kernel runs (its output is float32). On these narrow factors the
float32 kernel outruns half-precision library convolutions: resnet56 under bf16 autocast on an
H100 took 9.98 instead of 31.3 ms at batch 4096, on one CPU core 17.1 instead of 38.1 ms at
batch 32 (docs/benchmarks.md). It goes through ``torch.compile`` and ``torch.export`` as one
custom operator (``slimtorch::tucker_block``); ONNX export has no such operator, so export the
unfused model for ONNX.

Example:
    >>> from slimtorch.decompose import TuckerConfig, decompose_
    >>> from slimtorch.models import create_model
    >>> net = create_model("resnet20", in_channels=1, input_size=28).eval()
    >>> _ = decompose_(net, TuckerConfig(rank=0.25), include=["layer*"])
    >>> x = torch.randn(2, 1, 28, 28)
    >>> with torch.no_grad():
    ...     before = net(x)
    >>> report = fuse_tucker_(net)
    >>> len(report.lowered), sum(r.residual for r in report.rows)
    (20, 9)
    >>> with torch.no_grad():
    ...     bool(torch.allclose(net(x), before, atol=1e-4))
    True
"""

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from slimtorch.core.config import check_bool
from slimtorch.core.globs import check_globs, selected
from slimtorch.core.measure.trace import recording_ops
from slimtorch.core.surgery import carry_frozen, require_float32
from slimtorch.decompose import native
from slimtorch.decompose.fused_op import check_shapes, reference, run_native, tucker_block
from slimtorch.decompose.layers.tucker_conv import TuckerConv2d
from slimtorch.decompose.native_plan import PlanCache
from slimtorch.models.transforms import ARCH_TRANSFORMS
from slimtorch.prune.buffers import carry_masks_, forget_bias_masks_, rerecord_masks_
from slimtorch.quant.fold import fold_conv_bn
from slimtorch.quant.lowering import LoweringReport, layer_entries

logger = logging.getLogger(__name__)

TRANSFORM_NAME = "decompose.fuse_tucker"
"""Architecture-transform name recorded by :func:`fuse_tucker_`."""


class FusedTuckerConv2d(TuckerConv2d):
    """A :class:`TuckerConv2d` (same ``first``/``core``/``last`` weights, ``last`` always with a
    bias) that runs as one fused kernel, optionally ending in ``+ residual`` and a ReLU.

    Args:
        relu: Apply a ReLU to the output (after the residual, when there is one).
        residual: ``forward`` takes a second tensor, added before the ReLU.
        Other arguments as for :class:`TuckerConv2d`.

    Example:
        >>> layer = FusedTuckerConv2d(8, 8, 3, ranks=(4, 4), padding=1, relu=True).eval()
        >>> with torch.no_grad():
        ...     bool((layer(torch.randn(2, 8, 6, 6)) >= 0).all())
        True
    """

    #: one unit for per-layer precision (``cast_``): the fused kernel reads its children's
    #: weights itself and never calls them, so their input casts would never run
    precision_unit = True

    def __init__(self, *args: Any, relu: bool = False, residual: bool = False, **kwargs: Any):
        kwargs["bias"] = True
        super().__init__(*args, **kwargs)
        if isinstance(self.core.padding, str):
            raise ValueError("FusedTuckerConv2d needs integer padding, not 'same'/'valid'")
        self.relu = relu
        self.adds_residual = residual
        core = self.core
        # stride, padding and dilation as int lists, fixed at construction (integers: checked
        # above), so a call does not rebuild them
        self._geometry = (
            [int(n) for n in core.stride],
            [int(n) for n in core.padding],
            [int(n) for n in core.dilation],
        )
        self._plans = PlanCache()

    @classmethod
    def from_tucker(
        cls, layer: TuckerConv2d, *, relu: bool = False, residual: bool = False
    ) -> "FusedTuckerConv2d":
        """The fused form of ``layer`` (a zero bias is added where it had none)."""
        core = layer.core
        fused = cls(
            layer.first.in_channels,
            layer.last.out_channels,
            core.kernel_size,
            layer.ranks,
            stride=core.stride,
            padding=core.padding,
            dilation=core.dilation,
            relu=relu,
            residual=residual,
            device="meta",  # built empty, not initialised: no draw from the caller's generator
            dtype=core.weight.dtype,
        ).to_empty(device=core.weight.device)
        with torch.no_grad():
            fused.first.weight.copy_(layer.first.weight)
            fused.core.weight.copy_(core.weight)
            fused.last.weight.copy_(layer.last.weight)
            assert fused.last.bias is not None
            if layer.last.bias is not None:
                fused.last.bias.copy_(layer.last.bias)
            else:
                fused.last.bias.zero_()
        return fused

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, relu={self.relu}, residual={self.adds_residual}"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.adds_residual != (residual is not None):
            raise ValueError(
                "this fused layer "
                + (
                    "adds a residual: call it as layer(x, residual)"
                    if self.adds_residual
                    else "takes no residual: call it as layer(x)"
                )
            )
        weights = self._factors()
        if (
            type(x) is torch.Tensor  # not an fx proxy, fake or subclass tensor
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.ndim == 4
            and _plain(x, residual, weights)
        ):
            lib = native.kernel()
            if lib is not None:  # the kernel with this layer's weights packed once
                y = self._plans.run(
                    lib, x.contiguous(), residual, weights, self._geometry, self.relu
                )
                if y is not None:
                    return y
        return _fused_forward(x, residual, *weights, *self._geometry, self.relu)

    def clear_plans(self) -> None:
        """Forget the CPU kernel's packed weights. Needed only after changing a weight through
        ``.data``, which its version counter does not see (see
        :mod:`slimtorch.decompose.native_plan`)."""
        self._plans.clear()

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three weights and the bias, read from the submodules' parameter dictionaries:
        ``nn.Module.__getattr__`` costs about 1 us a lookup, a quarter of the fused layer's
        own Python time at batch 1. Parametrised weights go through ordinary attributes."""
        mods = self._modules
        try:
            last = mods["last"]._parameters  # type: ignore[union-attr]
            return (
                mods["first"]._parameters["weight"],  # type: ignore[union-attr,return-value]
                mods["core"]._parameters["weight"],  # type: ignore[union-attr]
                last["weight"],
                last["bias"],
            )
        except KeyError:
            bias = self.last.bias
            assert bias is not None  # the fused layer always has one
            return self.first.weight, self.core.weight, self.last.weight, bias


def _fused_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    w_first: torch.Tensor,
    w_core: torch.Tensor,
    w_last: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool,
) -> torch.Tensor:
    """Run the fused layer the fastest way the context allows.

    One node under ``torch.fx`` (``torch.fx.wrap`` below), so fx passes such as ``fold_bn_``
    trace models that hold fused layers.
    """
    assert bias is not None
    if torch.compiler.is_compiling():  # one operator in the graph
        u, v = w_first.flatten(1), w_last.flatten(1)
        return tucker_block(x, u, w_core, v, bias, residual, stride, padding, dilation, relu)
    grad = torch.is_grad_enabled() and _needs_grad(x, residual, w_first, w_core, w_last, bias)
    plain = not grad and _get_current_dispatch_mode() is None
    if plain:  # eager inference: no dispatcher, so no second check in the operator
        # the kernels read the 1x1 weights as memory, (r1, C, 1, 1) as (r1, C): no flatten
        args = (x, w_first, w_core, w_last, bias, residual, stride, padding, dilation)
        out = check_shapes(*args)
        y = run_native(*args, relu, out)
        if y is None and _under_autocast(x, residual):  # in float32, as the operator
            up = (x.float(), w_first, w_core, w_last, bias, _float(residual), *args[6:])
            y = run_native(*up, relu, out)
        if y is not None:
            return y
    args = (x, w_first.flatten(1), w_core, w_last.flatten(1), bias, residual, stride, padding,
            dilation)  # fmt: skip
    if plain or grad or recording_ops():  # no kernel here, gradients, or slimtorch's counters
        if not plain:
            check_shapes(*args)
        return reference(*args, relu)  # library convolutions: differentiable, countable
    return tucker_block(*args, relu)  # export, torch's FLOP counter, other devices


torch.fx.wrap("_fused_forward")


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _plain(
    x: torch.Tensor, residual: torch.Tensor | None, weights: tuple[torch.Tensor, ...]
) -> bool:
    """Eager inference: not compiling, no dispatch mode (export, counters), no gradient wanted."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return not (torch.is_grad_enabled() and _needs_grad(x, residual, *weights))


def _under_autocast(x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether autocast is on for ``x``'s device and ``x`` or ``residual`` is in half precision."""
    half = (torch.float16, torch.bfloat16)
    if x.dtype not in half and (residual is None or residual.dtype not in half):
        return False
    return torch.is_autocast_enabled(x.device.type)


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


@dataclasses.dataclass
class FuseRow:
    """One Tucker convolution: ``fused`` or ``skipped`` (with the reason), and what it took in."""

    conv: str
    action: str
    bn: str | None = None
    relu: str | None = None
    residual: bool = False
    reason: str | None = None

    HEADER: ClassVar[tuple[str, ...]] = ("conv", "action", "bn", "relu", "residual", "reason")

    def cells(self) -> tuple[str, ...]:
        return (
            self.conv,
            self.action,
            self.bn or "-",
            self.relu or "-",
            "yes" if self.residual else "-",
            self.reason or "",
        )


@dataclasses.dataclass
class FuseReport(LoweringReport[FuseRow]):
    """What :func:`fuse_tucker_` did, and whether the kernel runs here (``kernel``)."""

    kernel: str = ""

    method: ClassVar[str] = "fuse_tucker"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "kernel": self.kernel}


def _sole_module_user(node: torch.fx.Node, calls: Counter[str]) -> str | None:
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or calls[str(user.target)] != 1:
        return None
    return str(user.target)


def _bn_reason(bn: nn.Module, channels: int) -> str | None:
    if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != channels:
        return "not a BatchNorm2d over the conv's outputs"
    if bn.running_mean is None or bn.running_var is None:
        return "the batch norm tracks no running statistics"
    if not all(bool(torch.isfinite(t).all()) for t in (*bn.parameters(), *bn.buffers())):
        return "the batch norm's weights or running statistics hold NaN/Inf"
    return None


class _Tracer(torch.fx.Tracer):
    """Keeps Tucker convolutions as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, TuckerConv2d) or super().is_leaf_module(m, module_qualified_name)


def _plan(model: nn.Module, names: list[str], rows: dict[str, FuseRow]) -> None:
    """Fill each candidate row with the batch norm, ReLU and residual it can take in."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many error types on untraceable code
        raise TypeError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
            "replace layers by hand with FusedTuckerConv2d.from_tucker"
        ) from None
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    nodes = {str(n.target): n for n in graph.nodes if n.op == "call_module"}
    modules = dict(model.named_modules())
    for name in names:
        row, conv = rows[name], modules[name]
        if calls[name] != 1:
            row.action, row.reason = "skipped", f"called {calls[name]} times in forward, not once"
            continue
        node, nxt = nodes[name], _sole_module_user(nodes[name], calls)
        if nxt is not None and isinstance(modules[nxt], nn.BatchNorm2d):
            why = _bn_reason(modules[nxt], conv.last.out_channels)
            if why is None:
                row.bn, node = nxt, nodes[nxt]
                nxt = _sole_module_user(node, calls)
            else:
                row.reason = f"batch norm {nxt} left as is: {why}"
        if nxt is not None and type(modules[nxt]) is nn.ReLU:
            row.relu = nxt
        parent_name, _, attr = name.rpartition(".")
        spec = getattr(type(modules[parent_name]), "FUSED_RESIDUAL", None)
        if spec and attr == spec[0] and row.bn is not None and row.relu is None:
            prefix = f"{parent_name}." if parent_name else ""
            bn_name, relu_name = prefix + spec[1], prefix + spec[2]
            if row.bn == bn_name and type(modules.get(relu_name)) is nn.ReLU:
                row.residual, row.relu = True, relu_name


def _apply(model: nn.Module, layer: dict[str, Any], carry: bool = True) -> list[str]:
    """Swap in the fused layer (weights as they are) and drop the modules it took in; returns
    the names of its factors that carried pruning masks over."""
    conv = model.get_submodule(layer["conv"])
    if not isinstance(conv, TuckerConv2d):
        raise ValueError(f"{layer['conv']!r} is a {type(conv).__name__}, expected a TuckerConv2d")
    fused = FusedTuckerConv2d.from_tucker(
        conv, relu=layer["relu"] is not None, residual=bool(layer["residual"])
    ).train(conv.training)
    moved = []
    for part in ("first", "core", "last"):
        src, dst = getattr(conv, part), getattr(fused, part)
        carry_frozen(src, dst)
        if carry and carry_masks_(src, dst):
            moved.append(f"{layer['conv']}.{part}")
    model.set_submodule(layer["conv"], fused)
    for name in (layer["bn"], layer["relu"]):
        if name:
            model.set_submodule(name, nn.Identity())
    return moved


def _kernel_status(device: torch.device) -> native.KernelStatus:
    """The kernel the fused layers run on ``device``: the C kernel on the CPU, the NVRTC one on
    NVIDIA GPUs; there is none on ROCm or MPS, where they run library convolutions."""
    if device.type == "cpu":
        return native.kernel_status()
    if device.type != "cuda":
        return native.KernelStatus(False, f"no fused kernel for {device.type} devices")
    from slimtorch.decompose.cuda_kernel import cuda_status

    detail = cuda_status()
    return native.KernelStatus(detail.startswith("available"), f"CUDA kernel: {detail}")


def fuse_tucker_(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    strict: bool = False,
) -> FuseReport:
    """Replace every ``TuckerConv2d`` by a :class:`FusedTuckerConv2d`, taking in the batch norm,
    ReLU and (where the block declares it) residual addition that follow.

    Args:
        model: The model, changed in place; put it in eval mode (batch norms are folded).
        include: Globs of Tucker conv names to consider (all when ``None``).
        exclude: Globs to leave alone.
        strict: Raise :class:`~slimtorch.core.errors.TransformSkipError` (model unchanged)
            when a considered layer is skipped.

    Returns:
        A :class:`FuseReport` (per layer: fused or skipped with the reason, and what it took in).

    Raises:
        TypeError: ``model`` is not a module or cannot be traced by ``torch.fx``.
        ValueError: an ``include``/``exclude`` glob matches no module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_globs(model, include, exclude, "fuse_tucker_")
    check_bool("fuse_tucker_", "strict", strict)
    require_float32(model, "fuse_tucker_", "fuse, then cast", also=(torch.float64,))
    rows: dict[str, FuseRow] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, TuckerConv2d) or isinstance(mod, FusedTuckerConv2d):
            continue
        if not selected(name, include, exclude):
            continue
        row = rows[name] = FuseRow(name, "fused")
        odd = [
            type(f).__name__ for f in (mod.first, mod.core, mod.last) if type(f) is not nn.Conv2d
        ]
        if odd:
            row.reason = f"its factors are {', '.join(odd)}, not float Conv2d: fuse, then quantize"
        elif isinstance(mod.core.padding, str):
            row.reason = f"padding={mod.core.padding!r}; the kernel takes integer padding"
        if row.reason:
            row.action = "skipped"
    _plan(model, [n for n, r in rows.items() if r.action == "fused"], rows)
    status = _kernel_status(next((p.device for p in model.parameters()), torch.device("cpu")))
    report = FuseReport(rows=list(rows.values()), kernel=status.detail)
    report.check_strict(strict, "fuse_tucker_")
    layers, moved = [], []
    for row in report.lowered:
        conv = model.get_submodule(row.conv)
        assert isinstance(conv, TuckerConv2d)
        if row.bn is not None:
            forget_bias_masks_(model, [f"{row.conv}.last"])
            bn = model.get_submodule(row.bn)
            assert isinstance(bn, nn.BatchNorm2d)
            assert bn.running_mean is not None and bn.running_var is not None
            w, b = fold_conv_bn(
                conv.last.weight,
                conv.last.bias,
                bn.running_mean,
                bn.running_var,
                bn.weight,
                bn.bias,
                bn.eps,
            )
            with torch.no_grad():
                conv.last.weight.copy_(w)
                conv.last.bias = nn.Parameter(b, requires_grad=conv.last.weight.requires_grad)
        layer = {"conv": row.conv, "bn": row.bn, "relu": row.relu, "residual": row.residual}
        moved += _apply(model, layer)
        layers.append(layer)
    if layers:
        report.record(model, TRANSFORM_NAME, {"layers": layers})
        rerecord_masks_(model, {n: n for n in moved})
    if not status.available:
        logger.warning(
            "fuse_tucker_: the kernel is unavailable (%s); the fused layers run "
            "library convolutions",
            status.detail,
        )
    logger.info("fuse_tucker_: fused %d of %d Tucker conv(s)", len(layers), len(rows))
    return report


def _replay(model: nn.Module, params: dict[str, Any]) -> None:
    for layer in layer_entries(params, TRANSFORM_NAME, {"conv", "bn", "relu", "residual"}):
        _apply(model, layer, carry=False)


if TRANSFORM_NAME not in ARCH_TRANSFORMS:
    ARCH_TRANSFORMS.add(TRANSFORM_NAME, _replay)

__all__ = ["FuseReport", "FuseRow", "FusedTuckerConv2d", "fuse_tucker_", "tucker_block"]
