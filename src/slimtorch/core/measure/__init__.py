"""Measurement: parameters and bytes, FLOPs, roofline estimates, measured latency and memory.

Every "smaller and faster" claim of slimtorch is made with these functions.

Example:
    >>> from slimtorch.core.measure import count_flops, estimate_latency, measure_latency
    >>> from slimtorch.models import create_model
    >>> model = create_model("lenet5", in_channels=1, input_size=28)
    >>> x = torch.randn(1, 1, 28, 28)
    >>> count_flops(model, x).total_flops
    833040
    >>> est = estimate_latency(model, x, "rx580")
    >>> round(est.total_s * 1e6), est.kernels, est.bound  # microseconds, launches dominate
    (111, 11, 'overhead')
    >>> r = measure_latency(model, x, warmup=1, repeats=5, min_time_s=0)
    >>> r.repeats, r.device, r.median_s < 1.0  # seconds
    (5, 'cpu', True)
"""

from __future__ import annotations

from slimtorch.core.devices import cpu_threads
from slimtorch.core.measure.flops import FlopReport, LayerFlops, count_flops
from slimtorch.core.measure.graphs import GraphedForward
from slimtorch.core.measure.latency import LatencyResult, measure_latency
from slimtorch.core.measure.memory import MemoryResult, measure_peak_memory
from slimtorch.core.measure.params import count_params, model_size_bytes, storage_bytes
from slimtorch.core.measure.profile import ModelProfile, compare_profiles, profile_model
from slimtorch.core.measure.roofline import (
    LayerEstimate,
    RooflineEstimate,
    estimate_latency,
    roofline_from_trace,
)
from slimtorch.core.measure.trace import OpRecord, OpTrace, trace_ops

__all__ = [
    "FlopReport",
    "GraphedForward",
    "LatencyResult",
    "LayerEstimate",
    "LayerFlops",
    "MemoryResult",
    "ModelProfile",
    "OpRecord",
    "OpTrace",
    "RooflineEstimate",
    "compare_profiles",
    "count_flops",
    "count_params",
    "cpu_threads",
    "estimate_latency",
    "measure_latency",
    "measure_peak_memory",
    "model_size_bytes",
    "profile_model",
    "roofline_from_trace",
    "storage_bytes",
    "trace_ops",
]
