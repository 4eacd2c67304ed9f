"""Batch-norm folding: merge each ``Conv2d -> BatchNorm2d`` pair into the convolution.

In eval mode a batch norm is an affine map per channel, ``y = gamma * (x - mean) / sqrt(var +
eps) + beta``, so a convolution followed by it equals one convolution with

    w' = w * gamma / sqrt(var + eps)              # per output channel
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

(Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-
Only Inference", arXiv:1712.05877, section 3.2). The folded model computes the same eval-mode
outputs within float rounding, runs one kernel less per pair and is what an integer runtime
quantizes: the scales of a deployed int8 convolution are those of the folded weights.

Pairs are found on the ``torch.fx`` graph: a ``BatchNorm2d`` whose only input is a ``Conv2d``
output that nothing else reads. The folded batch norm becomes ``nn.Identity``; the change is
recorded (``"quant.fold_bn"``) so :func:`slimtorch.models.load_model` rebuilds it.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> report = fold_bn_(net)
    >>> [(r.conv, r.bn, r.action) for r in report.rows], type(net[1]).__name__
    ([('0', '1', 'folded')], 'Identity')
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.core.config import check_bool
from slimtorch.core.errors import TransformSkipError
from slimtorch.core.globs import check_globs, selected
from slimtorch.core.surgery import fx_graph, parameter_sharing, require_values
from slimtorch.core.table import text_table
from slimtorch.models.transforms import ARCH_TRANSFORMS
from slimtorch.prune.buffers import forget_bias_masks_

logger = logging.getLogger(__name__)

TRANSFORM_NAME = "quant.fold_bn"
"""Architecture-transform name recorded by :func:`fold_bn_` and replayed by ``load_model``."""

_LOGGED: contextvars.ContextVar[set[tuple[Any, ...]] | None] = contextvars.ContextVar(
    "fold_bn_logged", default=None
)


@contextlib.contextmanager
def repeats_at_debug() -> Iterator[None]:
    """Within it, :func:`fold_bn_` logs its summary at debug level where an earlier call in the
    block logged the same pairs: static PTQ folds a scratch copy to calibrate it, then the
    model, and the second line would only repeat the first.

    Example:
        >>> nets = [nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval() for _ in "ab"]
        >>> with repeats_at_debug():  # the second summary is logged at debug level
        ...     [len(fold_bn_(net).folded) for net in nets]
        [1, 1]
    """
    if _LOGGED.get() is not None:  # nested: the outer block's record holds
        yield
        return
    token = _LOGGED.set(set())
    try:
        yield
    finally:
        _LOGGED.reset(token)


def fold_conv_bn(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of a convolution with the following eval-mode batch norm merged in.

    Args:
        weight: Convolution weight, ``(C_out, C_in/groups, kh, kw)`` (any rank with C_out first).
        bias: Convolution bias ``(C_out,)`` or ``None``.
        running_mean: Batch-norm running mean ``(C_out,)``.
        running_var: Batch-norm running variance ``(C_out,)``.
        gamma: Batch-norm weight ``(C_out,)`` (``None``: not affine, ones).
        beta: Batch-norm bias ``(C_out,)`` (``None``: zeros).
        eps: Batch-norm epsilon.

    Returns:
        ``(folded_weight, folded_bias)`` in the weight's dtype (computed in float64).

    Example:
        >>> w, b = fold_conv_bn(torch.ones(2, 1, 1, 1), None, torch.zeros(2), torch.ones(2),
        ...                     torch.tensor([2.0, 3.0]), torch.zeros(2), 0.0)
        >>> w.flatten().tolist(), b.tolist()
        ([2.0, 3.0], [0.0, 0.0])
    """
    c_out = weight.shape[0]
    for label, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t.shape != (c_out,):
            raise ValueError(
                f"{label} must have shape ({c_out},) to match the weight's {c_out} output "
                f"channels, got {tuple(t.shape)}"
            )
    f64 = torch.float64
    g = torch.ones(c_out, dtype=f64) if gamma is None else gamma.detach().to("cpu", f64)
    be = torch.zeros(c_out, dtype=f64) if beta is None else beta.detach().to("cpu", f64)
    b0 = torch.zeros(c_out, dtype=f64) if bias is None else bias.detach().to("cpu", f64)
    inv_std = g / torch.sqrt(running_var.detach().to("cpu", f64) + eps)  # (C_out,)
    shape = (c_out,) + (1,) * (weight.ndim - 1)
    w = weight.detach().to("cpu", f64) * inv_std.reshape(shape)
    b = (b0 - running_mean.detach().to("cpu", f64)) * inv_std + be
    return w.to(weight.device, weight.dtype), b.to(weight.device, weight.dtype)


@dataclasses.dataclass
class FoldRow:
    """One candidate pair: what happened and why."""

    conv: str
    bn: str
    action: str
    reason: str | None = None


@dataclasses.dataclass
class FoldReport:
    """Rows for every ``Conv2d -> BatchNorm2d`` pair found, plus the recorded transform entry."""

    rows: list[FoldRow]
    entry: dict[str, Any] | None = None
    reason: str | None = None

    @property
    def folded(self) -> list[FoldRow]:
        """Rows with ``action == "folded"``."""
        return [r for r in self.rows if r.action == "folded"]

    def to_table(self) -> str:
        """One line per pair: conv, batch norm, action, reason."""
        lines = [("conv", "batch norm", "action", "reason")]
        lines += [(r.conv, r.bn, r.action, r.reason or "") for r in self.rows]
        if self.reason:
            lines.append(("-", "-", "nothing folded", self.reason))
        return text_table(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "method": "fold_bn",
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "folded": len(self.folded),
            "skipped": len(self.rows) - len(self.folded),
            "reason": self.reason,
            "entry": self.entry,
        }


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` pairs where a BatchNorm2d reads only a Conv2d's sole output.

    Raises:
        TypeError: ``model`` cannot be traced by ``torch.fx`` (data-dependent control flow);
            the message says so, fold by hand with :func:`fold_conv_bn` then.

    Example:
        >>> find_conv_bn_pairs(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
        [('0', '1')]
    """
    return _traced_pairs(model)[0]


def _traced_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], Counter[str]]:
    """The pairs, and how often the traced forward calls each module (a module called twice
    is shared: folding it would change its other uses)."""
    try:
        graph = fx_graph(model)
    except Exception as exc:  # fx raises many error types on untraceable code
        raise TypeError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
            "Conv2d -> BatchNorm2d pairs are found on the traced graph. Fold such models by hand "
            "with fold_conv_bn"
        ) from None
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if isinstance(modules.get(src.target), nn.Conv2d) and len(src.users) == 1:
            pairs.append((str(src.target), str(node.target)))
    return pairs, calls


def _skip_reason(
    conv: nn.Conv2d, bn: nn.BatchNorm2d, used: set[str], names: tuple[str, str]
) -> str | None:
    if names[0] in used or names[1] in used:
        return "module appears in more than one pair (shared module); left unfolded"
    if bn.num_features != conv.out_channels:
        return (
            f"BatchNorm2d has {bn.num_features} features but the conv {conv.out_channels} outputs"
        )
    if bn.running_mean is None or bn.running_var is None:
        return "BatchNorm2d tracks no running statistics (track_running_stats=False); cannot fold"
    tensors = [conv.weight, bn.running_mean, bn.running_var]
    tensors += [t for t in (conv.bias, bn.weight, bn.bias) if t is not None]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        return "weights or running statistics hold NaN/Inf; fix the layer first"
    return None


def _apply_fold(model: nn.Module, conv: nn.Conv2d, bn_name: str) -> None:
    if conv.bias is None:
        conv.bias = nn.Parameter(
            torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype),
            requires_grad=conv.weight.requires_grad,
        )
    model.set_submodule(bn_name, nn.Identity())


def fold_bn_(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    strict: bool = False,
) -> FoldReport:
    """Fold every ``Conv2d -> BatchNorm2d`` pair of ``model`` in place (batch norm -> Identity).

    Eval-mode outputs are unchanged within float rounding; train-mode behaviour changes (there
    are no batch statistics any more), which is why quantization-aware fine-tuning here folds
    before it starts (see :mod:`slimtorch.quant.qat`).

    Args:
        model: The model, changed in place.
        include: Globs of conv names to fold (all when ``None``).
        exclude: Globs of conv names to leave alone.
        strict: Raise :class:`~slimtorch.core.errors.TransformSkipError` (model unchanged)
            when any pair is skipped or the model cannot be traced.

    Returns:
        A :class:`FoldReport`.

    Example:
        >>> from slimtorch.models import create_model
        >>> model = create_model("resnet20", in_channels=1, input_size=28).eval()
        >>> len(fold_bn_(model).folded)
        21
    """
    require_values(model, "fold_bn_")
    check_bool("fold_bn_", "strict", strict)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_globs(model, include, exclude, "fold_bn_")
    try:
        pairs, calls = _traced_pairs(model)
    except TypeError as exc:
        if strict:
            raise TransformSkipError(str(exc)) from None
        logger.warning("fold_bn_: %s", exc)
        return FoldReport(rows=[], reason=str(exc))
    rows: list[FoldRow] = []
    todo: list[tuple[str, str]] = []
    used: set[str] = set()
    sharing = parameter_sharing(model)
    for conv_name, bn_name in pairs:
        if not selected(conv_name, include, exclude):
            continue
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        reason = _skip_reason(conv, bn, used, (conv_name, bn_name))
        shared = " and ".join(
            f"{n} ({calls[n]} calls)" for n in (conv_name, bn_name) if calls[n] > 1
        )
        if reason is None and shared:
            reason = f"{shared} used more than once in forward; folding would change its other uses"
        tied = [p for n in (conv_name, bn_name) for p in sharing(n)]
        if reason is None and tied:
            reason = (
                f"parameters shared with {', '.join(tied)} (tied weights); folding would change "
                "their other uses"
            )
        used.update((conv_name, bn_name))
        rows.append(FoldRow(conv_name, bn_name, "skipped" if reason else "folded", reason))
        if reason is None:
            todo.append((conv_name, bn_name))
    skipped = [r for r in rows if r.action == "skipped"]
    if strict and skipped:
        listing = "; ".join(f"{r.conv}+{r.bn}: {r.reason}" for r in skipped)
        raise TransformSkipError(
            f"fold_bn_ (strict) skipped {len(skipped)} pair(s), model left unchanged: {listing}"
        )
    forget_bias_masks_(model, [conv_name for conv_name, _ in todo])
    for conv_name, bn_name in todo:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert bn.running_mean is not None and bn.running_var is not None
        w, b = fold_conv_bn(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
        )
        _apply_fold(model, conv, bn_name)
        assert conv.bias is not None
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
    report = FoldReport(rows=rows)
    if todo:
        report.entry = {"name": TRANSFORM_NAME, "params": {"pairs": [list(p) for p in todo]}}
        arch = getattr(model, "slimtorch_arch", None)
        if isinstance(arch, dict):
            arch.setdefault("transforms", []).append(report.entry)
    logged, key = _LOGGED.get(), (tuple(todo), len(rows))
    level = logging.DEBUG if logged is not None and key in logged else logging.INFO
    if logged is not None:
        logged.add(key)
    logger.log(level, "fold_bn_: folded %d of %d conv+bn pair(s)", len(todo), len(rows))
    return report


def _replay_fold(model: nn.Module, params: dict[str, Any]) -> None:
    pairs = params.get("pairs")
    if not isinstance(pairs, list):
        raise ValueError(f"{TRANSFORM_NAME} params need a 'pairs' list, got {params!r}")
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{conv_name!r} is a {type(conv).__name__}, expected a Conv2d")
        _apply_fold(model, conv, bn_name)


if TRANSFORM_NAME not in ARCH_TRANSFORMS:
    ARCH_TRANSFORMS.add(TRANSFORM_NAME, _replay_fold)
