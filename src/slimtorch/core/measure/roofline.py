"""Roofline latency estimate of a model on a device profile.

The roofline model (Williams, Waterman & Patterson, "Roofline: an insightful visual performance
model for multicore architectures", CACM 2009) bounds a kernel's time by the larger of its
arithmetic time and its memory time. Here every layer gets

    time = max(compute_s, memory_s) + kernels * launch_overhead_s
    compute_s = sum over its ops of flops / peak rate
    memory_s  = bytes moved / memory bandwidth

and the model's estimate is the sum of its layers. Ops come from one traced forward pass (see
:mod:`.trace`): every non-view aten op is one kernel, reads each tensor input once and writes each
output once. Matmul/conv ops are timed at the profile's rate for their dtype; elementwise and
normalisation ops (one FLOP per output element) at the fp32 rate, because PyTorch computes
half-precision elementwise maths in fp32 registers. An int8 Q/DQ layer (its input quantized
too: ``roofline_kernel`` starting with ``"int8"``) is priced as the int8 kernel a runtime runs
it as (its product at the profile's int8 rate; int8 input and weights at one byte per element,
a float output at four), not as the eager simulation of quantize, dequantize and a float
kernel; a dynamically quantized input adds its quantize kernel (the float input read twice,
written once as int8). On the RX 580, which has no int8 dot product, the int8 rate is its fp32
rate, so there only the bytes shrink, and dynamic int8 is slower than fp32.

A module's own kernels are taken together, as one fused kernel would run them (a fused
Tucker layer, a TT layer): where such kernels run one after another, a compute-bound one and a
memory-bound one do not overlap, and the estimate is low by up to the smaller of the two (14%
for a fused Tucker layer of resnet20 at batch 256 on the RX 580). What the estimate also
misses: caches (a layer whose weights stay in L2 reads less DRAM), kernel
efficiency (small or odd-shaped GEMMs reach a fraction of peak; treat the estimate as a lower
bound), operator fusion and BN folding (compiled graphs launch fewer kernels and move fewer
bytes), overlap of launches with execution, host-side Python time, and im2col/workspace traffic of
convolution algorithms, and TF32: on Ampere and newer GPUs cuDNN runs fp32 convolutions on tensor
cores by default, so those can beat an fp32 estimate. Use it to rank variants on a device you do
not have; measure on the ones you do.

Example:
    >>> est = estimate_latency(nn.Linear(100, 10), torch.randn(4, 100), "rx580")
    >>> est.rows[0].bound, est.kernels
    ('memory', 1)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from slimtorch.core.measure.trace import ModuleRecord, OpRecord, OpTrace, trace_ops
from slimtorch.core.profiles import DeviceProfile, get_profile


@dataclasses.dataclass(frozen=True)
class LayerEstimate:
    """Estimated time of the kernels one module launches itself (not its children's).

    Attributes:
        name: Dotted module name (``""``: the root module's own ops).
        module_type: Class name.
        flops: Matmul FLOPs plus one per output element of other ops.
        bytes: Bytes read and written.
        compute_s: Arithmetic time at the profile's peak rates.
        memory_s: ``bytes / memory_bandwidth``.
        bound: ``"compute"`` if ``compute_s >= memory_s`` else ``"memory"``.
        kernels: Kernel launches (non-view aten ops).
        overhead_s: ``kernels * launch_overhead_s``.
        total_s: ``max(compute_s, memory_s) + overhead_s``.
    """

    name: str
    module_type: str
    flops: int
    bytes: int
    compute_s: float
    memory_s: float
    bound: Literal["compute", "memory"]
    kernels: int
    overhead_s: float
    total_s: float


@dataclasses.dataclass(frozen=True)
class RooflineEstimate:
    """A model's roofline estimate on one profile; ``total_s`` is the sum of the rows."""

    profile: str
    dtype: str | None
    rows: tuple[LayerEstimate, ...]
    total_s: float
    memory_needed_bytes: int = 0
    memory_bytes: int = 0

    @property
    def fits(self) -> bool:
        """Whether the profile's memory holds :attr:`memory_needed_bytes`: a lower bound of
        what the forward pass needs resident at once (the weights and buffers with the largest
        op output, or the largest op's inputs and outputs together), so a False is certain."""
        return self.memory_bytes <= 0 or self.memory_needed_bytes <= self.memory_bytes

    def fit_note(self) -> str | None:
        """One line saying the model does not fit the profile's memory (None when it fits)."""
        if self.fits:
            return None
        return (
            f"does not fit {self.profile}: needs at least {self.memory_needed_bytes / 1e9:.2f} "
            f"GB of its {self.memory_bytes / 1e9:.2f} GB at this batch; the time estimate "
            "assumes it did"
        )

    @property
    def flops(self) -> int:
        """All FLOPs counted (matmul and elementwise)."""
        return sum(r.flops for r in self.rows)

    @property
    def bytes(self) -> int:
        """All bytes moved."""
        return sum(r.bytes for r in self.rows)

    @property
    def kernels(self) -> int:
        """All kernel launches."""
        return sum(r.kernels for r in self.rows)

    @property
    def bound(self) -> Literal["compute", "memory", "overhead"]:
        """What dominates the total: compute, memory or launch overhead."""
        compute = sum(r.compute_s for r in self.rows if r.bound == "compute")
        memory = sum(r.memory_s for r in self.rows if r.bound == "memory")
        overhead = sum(r.overhead_s for r in self.rows)
        best = max(compute, memory, overhead)
        if best == overhead and overhead > 0:
            return "overhead"
        return "compute" if compute >= memory else "memory"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "profile": self.profile,
            "dtype": self.dtype,
            "total_s": self.total_s,
            "flops": self.flops,
            "bytes": self.bytes,
            "kernels": self.kernels,
            "bound": self.bound,
            "memory_needed_bytes": self.memory_needed_bytes,
            "memory_bytes": self.memory_bytes,
            "fits": self.fits,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    def to_table(self) -> str:
        """A plain text table, one row per layer."""
        head = (
            f"{'layer':<32} {'MFLOPs':>9} {'KB':>10} {'compute us':>11} {'memory us':>10} "
            f"{'kern':>5} {'total us':>9}  bound"
        )
        lines = [f"roofline estimate on {self.profile}", head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.name or '(root)':<32} {r.flops / 1e6:>9.3f} {r.bytes / 1e3:>10.1f} "
                f"{r.compute_s * 1e6:>11.2f} {r.memory_s * 1e6:>10.2f} {r.kernels:>5d} "
                f"{r.total_s * 1e6:>9.2f}  {r.bound}"
            )
        lines.append(
            f"{'total':<32} {self.flops / 1e6:>9.3f} {self.bytes / 1e3:>10.1f} "
            f"{'':>11} {'':>10} {self.kernels:>5d} {self.total_s * 1e6:>9.2f}  "
            f"{self.bound}"
        )
        if (note := self.fit_note()) is not None:
            lines.append(note)
        return "\n".join(lines)


def _check_dtype(dtype: Any) -> None:
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    if dtype is not None and not (dtype.is_floating_point or dtype in (torch.int8, torch.uint8)):
        raise ValueError(
            f"dtype must be a floating-point dtype, torch.int8 or torch.uint8 (what floating "
            f"tensors would be stored in), got {dtype}"
        )


def estimate_latency(
    model: nn.Module,
    example_input: Any,
    profile: DeviceProfile | str,
    *,
    dtype: torch.dtype | None = None,
) -> RooflineEstimate:
    """Estimate one forward pass's latency on ``profile`` with the roofline model.

    The model runs once here, in eval mode under ``torch.no_grad`` (flags restored), to trace its
    ops; see the module docstring for the formula and what it misses.

    Args:
        model: The module.
        example_input: A tensor, a tuple/list of positional arguments or a dict of keywords.
        profile: A :class:`DeviceProfile` or a registered profile name.
        dtype: Estimate as if every floating-point tensor were in this dtype (bytes at its size,
            matmuls at its rate); ``None`` uses the dtypes the model actually runs in.

    Returns:
        A :class:`RooflineEstimate`, one row per module that launched a kernel, in call order.

    Example:
        >>> from slimtorch.models import create_model
        >>> model = create_model("lenet5", in_channels=1, input_size=28)
        >>> est = estimate_latency(model, torch.randn(1, 1, 28, 28), "rx580", dtype=torch.float16)
        >>> round(est.total_s * 1e6), est.dtype  # microseconds
        (111, 'float16')
    """
    _check_dtype(dtype)
    prof = get_profile(profile)
    return roofline_from_trace(trace_ops(model, example_input), prof, dtype=dtype)


def _add_int8_op(row: list[float], op: OpRecord, record: ModuleRecord, prof: DeviceProfile) -> None:
    """Price an op of an int8 Q/DQ layer as what a runtime runs (the eager quantize and
    dequantize steps are not priced). The product is one int8 kernel: int8 input and weights
    (one byte per element; the bias, ``C_out`` values, too), the output at one byte when
    quantized and four when float (``roofline_kernel`` ``"...>fp32"``). A dynamic input's
    range pass (``amin``) stands for the quantize kernel: the float input read twice (its
    range, then its values) and written as int8."""
    kernel = record.kernel or ""
    if op.kind == "matmul":
        out_size = 4 if kernel.endswith(">fp32") else 1
        row[0] += op.flops
        row[1] += sum(n for n, _ in op.reads) + sum(n * out_size for n, _ in op.writes)
        row[2] += op.flops / prof.peak_rate(torch.int8)
        row[3] += 1
    elif kernel.startswith("int8-dynamic") and op.op.startswith("aten.amin") and op.reads:
        x = op.reads[0][0]
        row[0] += 2 * x
        row[1] += 2 * 4 * x + x
        row[2] += 2 * x / prof.peak_rate(torch.float32)
        row[3] += 1


def roofline_from_trace(
    trace: OpTrace, profile: DeviceProfile | str, *, dtype: torch.dtype | None = None
) -> RooflineEstimate:
    """The roofline estimate of an already traced forward pass (see :func:`estimate_latency`).

    Example:
        >>> trace = trace_ops(nn.Linear(1024, 1024), torch.randn(64, 1024))  # traced once
        >>> [round(roofline_from_trace(trace, p).total_s * 1e6) for p in ("rx580", "h100-sxm")]
        [32, 6]
    """
    _check_dtype(dtype)
    prof = get_profile(profile)
    fp32_rate = prof.peak_rate(torch.float32)
    acc: dict[str, list[float]] = {}  # name -> [flops, bytes, compute_s, kernels]
    for op in trace.ops:
        if op.kind == "free":
            continue
        record = trace.modules.get(op.module)
        if record is not None and (record.kernel or "").startswith("int8"):
            _add_int8_op(acc.setdefault(op.module, [0, 0, 0.0, 0]), op, record, prof)
            continue
        if op.kind == "matmul":
            op_dtype = dtype if dtype is not None and op.dtype.is_floating_point else op.dtype
            rate = prof.peak_rate(op_dtype)
        else:
            rate = fp32_rate
        row = acc.setdefault(op.module, [0, 0, 0.0, 0])
        row[0] += op.flops
        row[1] += op.bytes_moved(dtype)
        row[2] += op.flops / rate
        row[3] += 1
    rows = []
    for name, (flops, nbytes, compute_s, kernels) in acc.items():
        memory_s = nbytes / prof.memory_bandwidth
        overhead_s = kernels * prof.launch_overhead_s
        rows.append(
            LayerEstimate(
                name=name,
                module_type=trace.modules[name].module_type,
                flops=int(flops),
                bytes=int(nbytes),
                compute_s=compute_s,
                memory_s=memory_s,
                bound="compute" if compute_s >= memory_s else "memory",
                kernels=int(kernels),
                overhead_s=overhead_s,
                total_s=max(compute_s, memory_s) + overhead_s,
            )
        )
    position = {name: i for i, name in enumerate(trace.modules)}
    rows.sort(key=lambda r: position[r.name])
    return RooflineEstimate(
        profile=prof.name,
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        rows=tuple(rows),
        total_s=sum(r.total_s for r in rows),
        memory_needed_bytes=_memory_needed(trace, dtype),
        memory_bytes=prof.memory_bytes,
    )


def _memory_needed(trace: OpTrace, dtype: torch.dtype | None) -> int:
    """A lower bound of the memory the forward pass holds at once: the weights and buffers
    with the largest op output (outputs are new tensors), or the largest op's inputs and
    outputs together."""

    def size(n: int, dt: torch.dtype) -> int:
        return n * (dtype if dtype is not None and dt.is_floating_point else dt).itemsize

    state = sum(size(n, dt) for n, dt in trace.state)
    ops = [op for op in trace.ops if op.kind != "free"]
    out = max((sum(size(n, dt) for n, dt in op.writes) for op in ops), default=0)
    whole = max((op.bytes_moved(dtype) for op in ops), default=0)
    return max(state + out, whole)
