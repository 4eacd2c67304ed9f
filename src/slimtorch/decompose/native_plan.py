"""Prepared calls of the fused Tucker CPU kernel: a layer's weights packed once, not per call.

At batch 1 a fused layer spent most of its 24 us call (one core of the development VM, resnet56
at rank 0.25) outside the arithmetic: the Python checks and 24 ctypes arguments of the generic
path, and the C kernel packing the three weights into its blocked layout and building its tap
tables on every call (2.5-4.4 us). A :class:`PlanCache` keeps, per input size, a plan built by
``slimtorch_tucker_plan`` (packed weights and tap tables, immutable, safe to share between
threads) and runs it with ``slimtorch_tucker_run`` (7 arguments).

A plan is used only while its weights are the same: the same tensor objects, at the same memory
address, with the same version counter (every in-place change made with autograd's knowledge
bumps it: ``copy_``, optimiser steps, ``load_state_dict``). A change made through ``.data``
bypasses the version counter, as it bypasses autograd; call :meth:`PlanCache.clear` after one.
Weights created under ``torch.inference_mode`` keep no version counter, so a layer holding them
packs its weights on every call, as before plans.
Copies and pickles of a layer start with an empty cache (a plan is a C pointer).

Example:
    >>> import copy
    >>> cache = PlanCache()
    >>> copy.deepcopy(cache) is not cache, len(copy.deepcopy(cache))
    (True, 0)
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from slimtorch.decompose.fused_op import check_shapes

MAX_PLANS = 8
"""Input sizes a layer keeps plans for; the oldest is dropped past this."""

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""The first 1x1's, the core's and the last 1x1's weights, and the bias."""
Geometry = tuple[Sequence[int], Sequence[int], Sequence[int]]
"""The core's stride, padding and dilation."""


class _Plan:
    """One layer's packed weights for one input size, freed when the object is collected."""

    def __init__(
        self,
        lib: Any,
        x: torch.Tensor,
        weights: Weights,
        geometry: Geometry,
        out: tuple[int, int],
    ) -> None:
        u, k, v, bias = (w.contiguous() for w in weights)  # packed (copied) by the call below
        stride, padding, dilation = geometry
        handle = lib.slimtorch_tucker_plan(
            x.shape[1], x.shape[2], x.shape[3], u.data_ptr(), u.shape[0], k.data_ptr(),
            k.shape[0], k.shape[2], k.shape[3], stride[0], stride[1], padding[0], padding[1],
            dilation[0], dilation[1], v.data_ptr(), bias.data_ptr(), v.shape[0],
        )  # fmt: skip
        if not handle:
            raise MemoryError("the fused Tucker kernel could not allocate a layer's packed weights")
        self.handle = ctypes.c_void_p(handle)
        # the weights themselves are held, so a replaced tensor's id cannot be reused meanwhile
        self.u, self.k, self.v, self.bias = weights
        self.stamp = _stamp(*weights)
        self.channels = int(x.shape[1])
        self.out_channels = int(v.shape[0])
        self.out = out
        weakref.finalize(self, lib.slimtorch_tucker_free, self.handle)


def _stamp(u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    """Version counters and addresses: what changes when a weight does (see the module doc)."""
    return (
        u._version, k._version, v._version, b._version,
        u.data_ptr(), k.data_ptr(), v.data_ptr(), b.data_ptr(),
    )  # fmt: skip


class PlanCache:
    """A fused layer's plans by input size ``(H, W)``.

    Example:
        >>> cache = PlanCache()
        >>> cache.clear(); len(cache)
        0
    """

    def __init__(self) -> None:
        self._plans: dict[tuple[int, int], _Plan] = {}
        self._lock = threading.Lock()  # two threads building at once kept one plan only

    def __len__(self) -> int:
        return len(self._plans)

    def __deepcopy__(self, memo: dict[int, Any]) -> PlanCache:
        return PlanCache()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return PlanCache, ()

    def clear(self) -> None:
        """Drop every plan (the next call packs the weights again)."""
        self._plans = {}

    def _build(
        self, lib: Any, x: torch.Tensor, res: torch.Tensor | None, weights: Weights, geo: Geometry
    ) -> _Plan | None:
        if any(w.dtype != torch.float32 or w.device.type != "cpu" for w in weights):
            return None
        out = check_shapes(x, *weights, res, *geo)
        key = (x.shape[2], x.shape[3])
        with self._lock:
            plans = dict(self._plans)  # replaced whole: a concurrent reader sees old or new
            if len(plans) >= MAX_PLANS and key not in plans:
                del plans[next(iter(plans))]
            plan = plans[key] = _Plan(lib, x, weights, geo, out)
            self._plans = plans
        return plan

    def run(
        self,
        lib: Any,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weights: Weights,
        geometry: Geometry,
        relu: bool,
    ) -> torch.Tensor | None:
        """The layer on ``x`` (contiguous float32 NCHW on the CPU, no gradient wanted), or None
        where the generic path must run it (float32 CPU weights and residual are checked when a
        plan is built; a residual of another shape or type goes to the generic path, which
        raises the right error). Bad shapes raise ``ValueError`` as the generic path does."""
        n, c, h, w = x.shape
        u, k, v, b = weights
        try:
            stamp = _stamp(u, k, v, b)
        except RuntimeError:  # inference tensors keep no version: a change could not be seen
            return None
        plan = self._plans.get((h, w))
        if (
            plan is None
            or u is not plan.u
            or k is not plan.k
            or v is not plan.v
            or b is not plan.bias
            or stamp != plan.stamp
        ):
            plan = self._build(lib, x, residual, weights, geometry)
            if plan is None:
                return None
        if c != plan.channels:
            return None
        ho, wo = plan.out
        co = plan.out_channels
        res = None
        if residual is not None:
            if (
                residual.dtype != torch.float32
                or residual.device.type != "cpu"
                or residual.shape != (n, co, ho, wo)
            ):
                return None
            residual = residual.contiguous()
            res = residual.data_ptr()
        y = torch.empty(n, co, ho, wo, dtype=torch.float32)  # what the kernel writes
        rc = lib.slimtorch_tucker_run(
            plan.handle, x.data_ptr(), n, y.data_ptr(), res, relu, torch.get_num_threads()
        )
        if rc != 0:
            raise MemoryError(
                f"fused Tucker conv could not allocate its scratch for {tuple(x.shape)}"
            )
        return y
