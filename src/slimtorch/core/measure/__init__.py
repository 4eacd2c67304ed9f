"""Measurement: parameters and bytes, FLOPs, roofline estimates, measured latency and memory.

Every "smaller and faster" claim of slimtorch is made with these functions.

Example:
    >>> from slimtorch.core.measure import count_flops, estimate_latency, measure_latency
    >>> count_flops(model, x).total_flops
    >>> estimate_latency(model, x, "rx580").total_s
    >>> measure_latency(model, x).median_s
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
