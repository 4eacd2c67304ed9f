"""Pieces shared by the layer lowerings (:mod:`~slimtorch.quant.direct`,
:mod:`~slimtorch.quant.gemm`): convolution geometry with input checks, and the report they
return.

A module whose ``forward`` calls :func:`conv_output_size` registers it with
``torch.fx.wrap("conv_output_size")`` at its top level: the checks branch on shapes, so under
``torch.fx`` the call must stay one opaque node for models that hold the lowered layers to
trace (batch-norm folding, PTQ's residual adds and Q/DQ placement all trace the model).

Example:
    >>> conv_output_size(torch.zeros(2, 3, 28, 28), "layer", 3, (3, 3), (1, 1), (1, 1), (1, 1), 2)
    (14, 14)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from slimtorch.core.errors import TransformSkipError
from slimtorch.core.table import text_table


def conv_output_size(
    x: torch.Tensor,
    layer: str,
    in_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    pool: int = 1,
) -> tuple[int, int]:
    """``(H_out, W_out)`` of a convolution (then a ``pool`` x ``pool`` max-pool) on ``x``.

    Raises a ``ValueError`` naming ``layer`` for an input that is not ``(N, in_channels, H, W)``
    or is too small. The lowered layers call it from their ``forward``; it is one opaque node
    when ``torch.fx`` traces them (its checks branch on shapes), so fx-based passes (batch-norm
    folding, PTQ's residual adds, Q/DQ placement) still trace models that hold them.
    """
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"{layer} expects (N, {in_channels}, H, W) input, got shape {tuple(x.shape)}"
        )
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    h_out = ((x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1) // pool
    w_out = ((x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1) // pool
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"input of {x.shape[2]}x{x.shape[3]} is too small for {layer} (kernel {kh}x{kw}, "
            f"padding {padding}, dilation {dilation}, pool {pool})"
        )
    return h_out, w_out


def stored_weight_skips(model: nn.Module, include: Any, exclude: Any) -> list[tuple[str, str]]:
    """``(name, reason)`` for each selected convolution that keeps its weights as int8 (a
    quantized model): a lowering of float convolutions leaves it, and says why."""
    from slimtorch.core.globs import selected
    from slimtorch.core.measure.params import stored_weights_reason, weight_buffer_layers

    return [
        (name, stored_weights_reason(module, dtype, "lower"))
        for name, (module, _, dtype, _) in weight_buffer_layers(model).items()
        if selected(name, include, exclude)
        and any(b.dim() == 4 for b in module.buffers(recurse=False))  # a conv's weights
    ]


def as_pair(v: Any) -> tuple[int, int]:
    """``(v, v)`` for an int, else the first two entries as ints (``nn.Conv2d`` arguments)."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def int_padding(conv: nn.Conv2d) -> Any:
    """``conv.padding`` with ``"valid"`` as 0 (``"same"`` is refused by the lowerings)."""
    return 0 if conv.padding == "valid" else conv.padding


def layer_entries(params: dict[str, Any], transform: str, keys: set[str]) -> list[dict[str, Any]]:
    """The ``"layers"`` list of a recorded lowering, each entry checked to hold ``keys``.

    Raises:
        ValueError: no such list, or an entry that is not a dict with those keys (a damaged
            ``config.json``); the message names the transform.

    Example:
        >>> layer_entries({"layers": [{"conv": "0"}]}, "demo", {"conv"})
        [{'conv': '0'}]
    """
    layers = params.get("layers")
    if not isinstance(layers, list):
        raise ValueError(f"{transform} params need a 'layers' list, got {params!r}")
    for layer in layers:
        if not isinstance(layer, dict) or not keys <= set(layer):
            raise ValueError(f"{transform}: malformed layer entry {layer!r}")
    return layers


RowT = TypeVar("RowT", bound=Any)


@dataclasses.dataclass
class LoweringReport(Generic[RowT]):
    """Rows for every considered convolution of a lowering (``action`` is ``"skipped"`` or
    what it became), the batch norms folded first, and the recorded transform entry.

    Subclasses name the ``method``; rows give ``HEADER`` and ``cells()`` for the table.
    """

    rows: list[RowT]
    folded: list[str] = dataclasses.field(default_factory=list)
    entry: dict[str, Any] | None = None

    method: ClassVar[str] = ""

    @property
    def lowered(self) -> list[RowT]:
        """Rows whose convolution was lowered."""
        return [r for r in self.rows if r.action != "skipped"]

    def to_table(self) -> str:
        """One line per convolution."""
        header = type(self.rows[0]).HEADER if self.rows else ("conv", "action", "reason")
        return text_table([header, *(r.cells() for r in self.rows)])

    def check_strict(self, strict: bool, function: str) -> None:
        """Raise :class:`~slimtorch.core.errors.TransformSkipError` listing the skipped rows
        when ``strict`` (called before the model is changed)."""
        skipped = [r for r in self.rows if r.action == "skipped"]
        if strict and skipped:
            listing = "; ".join(f"{r.conv}: {r.reason}" for r in skipped)
            raise TransformSkipError(
                f"{function} (strict) skipped {len(skipped)} conv(s), model left unchanged: "
                f"{listing}"
            )

    def record(self, model: nn.Module, name: str, params: dict[str, Any]) -> None:
        """Set :attr:`entry` and append it to the model's recorded transforms, if it has any."""
        self.entry = {"name": name, "params": params}
        arch = getattr(model, "slimtorch_arch", None)
        if isinstance(arch, dict):
            arch.setdefault("transforms", []).append(self.entry)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "method": self.method,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "lowered": len(self.lowered),
            "skipped": len(self.rows) - len(self.lowered),
            "bn_folded": self.folded,
            "entry": self.entry,
        }
