"""FLOPs and MACs per layer, counted at the aten-op level.

Convention: a multiply-accumulate (MAC) is 2 FLOPs, and ``flops`` counts the matmul-like ops only
(linear, conv of any groups/stride/dilation, transposed conv, mm/bmm, attention), with the formulas
of ``torch.utils.flop_counter``; so ``total_macs == total_flops / 2`` exactly. A layer's bias is not
counted (it is added inside the same ``addmm``/``convolution`` kernel): ``Conv2d(3, 8, 3,
padding=1)`` on a 1x3x16x16 input is ``2 * (8*16*16) * (3*3*3) = 110592`` FLOPs with or without
bias. Everything else (activations, residual adds, batch norm, pooling) is reported apart as
``elementwise_flops``, one per output element.

Example:
    >>> report = count_flops(nn.Linear(100, 10), torch.randn(4, 100))
    >>> report.total_flops, report.total_macs
    (8000, 4000)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from slimtorch.core.measure.trace import OpTrace, trace_ops


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """FLOPs of the ops a module runs itself (not those of its children).

    Attributes:
        name: Dotted module name (``""`` for the root module).
        module_type: Class name (``"Conv2d"``).
        flops: Matmul-like FLOPs (2 per MAC).
        macs: ``flops // 2``.
        elementwise_flops: One per output element of each other op.
        params: Parameters the module owns directly.
        output_shape: Shape of its first output on the first call.
        calls: How many times the module ran in the forward pass.
    """

    name: str
    module_type: str
    flops: int
    macs: int
    elementwise_flops: int
    params: int
    output_shape: tuple[int, ...] | None
    calls: int


@dataclasses.dataclass(frozen=True)
class FlopReport:
    """FLOPs of one forward pass, per layer and in total."""

    rows: tuple[LayerFlops, ...]
    total_flops: int
    total_macs: int
    elementwise_flops: int
    total_params: int = -1  # parameters of the modules that ran, tied ones once (-1: the rows')

    @property
    def params(self) -> int:
        """Parameters of the modules that ran, each tied (shared) parameter counted once."""
        return self.total_params if self.total_params >= 0 else sum(r.params for r in self.rows)

    def module_flops(self, prefix: str) -> int:
        """Matmul FLOPs of the module ``prefix`` and everything under it (``""``: all).

        Example:
            >>> from slimtorch.models import create_model
            >>> model = create_model("resnet20", num_classes=10, in_channels=3, input_size=32)
            >>> report = count_flops(model, torch.randn(1, 3, 32, 32))
            >>> report.module_flops("layer1")  # layer1, layer1.0.conv1, ...
            28311552
            >>> report.module_flops("") == report.total_flops
            True
        """
        dot = prefix + "."
        return sum(
            r.flops for r in self.rows if not prefix or r.name == prefix or r.name.startswith(dot)
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {
            "total_flops": self.total_flops,
            "total_macs": self.total_macs,
            "elementwise_flops": self.elementwise_flops,
            "total_params": self.params,
            "rows": [
                {**dataclasses.asdict(r), "output_shape": list(r.output_shape or [])}
                for r in self.rows
            ],
        }

    def to_table(self) -> str:
        """A plain text table, one row per layer.

        Example:
            >>> model = nn.Sequential(nn.Linear(100, 10), nn.ReLU())
            >>> table = count_flops(model, torch.randn(4, 100)).to_table().splitlines()
            >>> table[0]
            'layer                            type                   MFLOPs     params  output'
            >>> table[2]
            '0                                Linear                  0.008       1010  4x10'
            >>> table[-1].split()
            ['total', '0.008', '1010', '(0.004', 'MMACs)']
        """
        head = f"{'layer':<32} {'type':<18} {'MFLOPs':>10} {'params':>10}  output"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            shape = "x".join(map(str, r.output_shape)) if r.output_shape else "-"
            lines.append(
                f"{r.name or '(root)':<32} {r.module_type:<18} {r.flops / 1e6:>10.3f} "
                f"{r.params:>10d}  {shape}"
            )
        lines.append(
            f"{'total':<32} {'':<18} {self.total_flops / 1e6:>10.3f} "
            f"{self.params:>10d}  ({self.total_macs / 1e6:.3f} MMACs)"
        )
        shared = sum(r.params for r in self.rows) - self.params
        if shared > 0:
            lines.append(
                f"({shared} parameters are shared between layers: the total counts them once)"
            )
        return "\n".join(lines)


def flop_report_from_trace(trace: OpTrace) -> FlopReport:
    """Aggregate a trace into one row per module that ran ops or is a leaf, in call order.

    Example:
        >>> flop_report_from_trace(trace_ops(nn.Linear(100, 10), torch.randn(4, 100))).total_flops
        8000
    """
    flops: dict[str, int] = {}
    other: dict[str, int] = {}
    for op in trace.ops:
        if op.kind == "matmul":
            flops[op.module] = flops.get(op.module, 0) + op.flops
        elif op.kind == "elementwise":
            other[op.module] = other.get(op.module, 0) + op.flops
    rows = []
    for name, rec in trace.modules.items():
        if not (rec.is_leaf or name in flops or name in other):
            continue
        f = flops.get(name, 0)
        rows.append(
            LayerFlops(
                name=name,
                module_type=rec.module_type,
                flops=f,
                macs=f // 2,
                elementwise_flops=other.get(name, 0),
                params=rec.params,
                output_shape=rec.output_shape,
                calls=rec.calls,
            )
        )
    total = sum(r.flops for r in rows)
    listed = {r.name for r in rows}
    return FlopReport(
        rows=tuple(rows),
        total_flops=total,
        total_macs=total // 2,
        elementwise_flops=sum(r.elementwise_flops for r in rows),
        total_params=sum(rec.new_params for rec in trace.modules.values() if rec.name in listed),
    )


def count_flops(model: nn.Module, example_input: Any) -> FlopReport:
    """Count FLOPs and MACs of one forward pass, per layer (see the module docstring).

    The model runs once in eval mode under ``torch.no_grad`` (train/eval flags are restored).

    Args:
        model: The module.
        example_input: A tensor, a tuple/list of positional arguments or a dict of keywords,
            on the model's device.

    Returns:
        A :class:`FlopReport`; ``total_flops`` is the sum of the rows' ``flops``.

    Example:
        >>> count_flops(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 16, 16)).total_flops
        110592
    """
    return flop_report_from_trace(trace_ops(model, example_input))
