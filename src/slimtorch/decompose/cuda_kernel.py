"""The fused Tucker-2 kernel on CUDA GPUs (``kernels/tucker_block.cu``), compiled with NVRTC.

On a GPU a :class:`~slimtorch.decompose.layers.TuckerConv2d` run as three library
convolutions writes two intermediate maps to memory and reads them back, and the narrow
factor convolutions are memory- and launch-bound: on the H100 that ate the whole FLOP saving
of resnet56's factorised blocks (docs/benchmarks.md). The CUDA kernel computes the first 1x1
once per tile into shared memory, runs the core taps and the last 1x1 from there, and writes
only the output, after the bias, residual and ReLU.

Each layer shape gets its own build: the shape goes in as ``#define`` constants so all loop
bounds are known to the compiler. Builds go through ``torch.cuda._compile_kernel`` (NVRTC,
which ships with PyTorch's CUDA wheels), once per shape and device per process (about a
second each). ROCm builds of PyTorch, float16/bfloat16, and shapes whose weights and tile
do not fit in shared memory run the library convolutions instead; so does everything when
``SLIMTORCH_NO_NATIVE=1``.

Example (the tiling plan; running the kernel needs a CUDA GPU):
    >>> from slimtorch.decompose.cuda_kernel import plan_launch
    >>> plan = plan_launch(c=16, r1=4, r2=4, co=16, kernel=(3, 3), stride=(1, 1),
    ...                    dilation=(1, 1), out_hw=(28, 28))
    >>> plan.rows, plan.images, plan.threads
    (7, 1, 224)
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCE = "tucker_block.cu"
SYMBOL = "slimtorch_tucker_block_cuda"
TARGET_PIXELS = 256
"""Output pixels a block aims for (one per thread): enough warps to hide the loads' latency,
few enough that the tile's halo stays a small overhead."""
SHARED_LIMIT = 48 * 1024
"""Bytes of shared memory a block may use without opting in to more (every CUDA GPU)."""


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How one layer shape is tiled: ``rows`` output rows of ``images`` images per block."""

    rows: int
    images: int
    threads: int
    shared_bytes: int
    tiles: int  # tiles per image


def _round4(n: int) -> int:
    return (n + 3) // 4 * 4


def _shared_bytes(
    c: int, r1: int, r2: int, co: int, taps: int, in_rows: int, in_cols: int, images: int
) -> int:
    weights = c * _round4(r1) + taps * r1 * _round4(r2) + co * _round4(r2) + _round4(co)
    return 4 * (weights + images * r1 * in_rows * in_cols)


def plan_launch(
    *,
    c: int,
    r1: int,
    r2: int,
    co: int,
    kernel: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    out_hw: Sequence[int],
    shared_limit: int = SHARED_LIMIT,
) -> LaunchPlan | None:
    """Tile an output map of ``out_hw`` for the kernel, or None if even one output row of one
    image does not fit in ``shared_limit`` bytes of shared memory.

    Large maps are cut into bands of whole rows of about :data:`TARGET_PIXELS` pixels, of
    equal height; small maps are grouped, several images to a block.
    """
    ho, wo = out_hw
    in_cols = (wo - 1) * stride[1] + (kernel[1] - 1) * dilation[1] + 1
    taps = kernel[0] * kernel[1]

    def in_rows(rows: int) -> int:
        return (rows - 1) * stride[0] + (kernel[0] - 1) * dilation[0] + 1

    per_image = ho * wo
    if per_image >= TARGET_PIXELS:
        bands = -(-per_image // TARGET_PIXELS)
        rows, images = -(-ho // bands), 1
    else:
        rows, images = ho, max(1, TARGET_PIXELS // per_image)
    while True:
        shared = _shared_bytes(c, r1, r2, co, taps, in_rows(rows), in_cols, images)
        if shared <= shared_limit:
            break
        if images > 1:
            images -= 1
        elif rows > 1:
            rows -= 1
        else:
            return None
    threads = min(1024, -(-(rows * wo * images) // 32) * 32)
    return LaunchPlan(rows, images, threads, shared, -(-ho // rows))


_lock = threading.Lock()


@functools.cache
def _source() -> str:
    return resources.files("slimtorch.decompose").joinpath("kernels", SOURCE).read_text()


def _disabled_reason() -> str | None:
    if os.environ.get("SLIMTORCH_NO_NATIVE", "") not in ("", "0"):
        return "disabled by SLIMTORCH_NO_NATIVE"
    if torch.version.cuda is None:
        return "not a CUDA build of PyTorch"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return "this PyTorch has no torch.cuda._compile_kernel (NVRTC)"
    return None


_failed: dict[tuple[Any, ...], str] = {}


@functools.lru_cache(maxsize=4096)
def launcher(
    device: int,
    in_shape: tuple[int, int, int],
    r1: int,
    core_shape: tuple[int, int, int, int],
    co: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
    relu: bool,
    residual: bool,
) -> Callable[..., torch.Tensor] | None:
    """A function ``f(x, u, k, v, bias, residual) -> y`` that runs the CUDA kernel on CUDA
    device ``device`` for inputs ``(N, *in_shape)`` and a core of ``core_shape``, or None
    where it cannot run (see the module docstring). A failed build is logged once.

    Arguments are plain ints and tuples so a layer's launcher is found by one dictionary
    lookup per call.
    """
    if _disabled_reason() is not None:
        return None
    c, h, w = in_shape
    r2, _, kh, kw = core_shape
    plan = plan_launch(
        c=c, r1=r1, r2=r2, co=co, kernel=(kh, kw), stride=stride, dilation=dilation,
        out_hw=out_hw,
    )  # fmt: skip
    if plan is None:
        return None
    defines = (
        ("C", c), ("R1", r1), ("R2", r2), ("CO", co), ("KH", kh), ("KW", kw),
        ("SH", stride[0]), ("SW", stride[1]), ("PH", padding[0]), ("PW", padding[1]),
        ("DH", dilation[0]), ("DW", dilation[1]), ("H", h), ("W", w),
        ("HO", out_hw[0]), ("WO", out_hw[1]), ("TH", plan.rows), ("NIMG", plan.images),
        ("RELU", int(relu)), ("RES", int(residual)), ("NTHREADS", plan.threads),
        ("R1P", _round4(r1)), ("R2P", _round4(r2)),
    )  # fmt: skip
    header = "".join(f"#define {name} {value}\n" for name, value in defines)
    try:
        with _lock, torch.cuda.device(device):
            fn = torch.cuda._compile_kernel(header + _source(), SYMBOL)
    except RuntimeError as exc:
        _failed[(device, *defines)] = str(exc)
        logger.warning("fused Tucker CUDA kernel unavailable for %s: %s", defines, exc)
        return None

    launch = _Launch(fn, device, plan)

    def run(
        x: torch.Tensor,
        u: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
        res: torch.Tensor | None,
    ) -> torch.Tensor:
        x, u, k, v, bias = (t.contiguous() for t in (x, u, k, v, bias))
        res = x if res is None else res.contiguous()  # an unused pointer when RES is 0
        n = x.shape[0]
        y = torch.empty(n, co, out_hw[0], out_hw[1], device=x.device, dtype=x.dtype)
        if n:
            launch(n, (x, u, k, v, bias, res, y))
        return y

    return run


class _Launch:
    """Launch a compiled kernel on the current stream of its device with ``cuLaunchKernel``
    through ctypes, with the driver library loaded once. The generic launcher of
    ``torch.cuda._compile_kernel`` reloads the library and rebuilds its argument list on every
    call: replacing it took eager resnet56 (54 fused layers) at batch 1 on the H100 from 6.1 to
    4.0 ms, host-bound, about 40 us per call."""

    def __init__(self, fn: Any, device: int, plan: LaunchPlan) -> None:
        self.fn, self.device, self.plan = fn, device, plan
        self.func = getattr(fn, "func", None)
        self.driver = _driver() if self.func is not None else None

    def __call__(self, n: int, tensors: tuple[torch.Tensor, ...]) -> None:
        plan = self.plan
        blocks = -(-n // plan.images) * plan.tiles
        if self.driver is None:  # a PyTorch whose kernel object hides its handle
            with torch.cuda.device(self.device):
                self.fn((blocks, 1, 1), (plan.threads, 1, 1), [*tensors, n], plan.shared_bytes)
            return
        values = [ctypes.c_void_p(t.data_ptr()) for t in tensors]
        count = ctypes.c_int(n)
        args = (ctypes.c_void_p * (len(values) + 1))(
            *(ctypes.addressof(v) for v in values), ctypes.addressof(count)
        )
        stream = torch.cuda.current_stream(self.device).cuda_stream
        launch = (self.func, blocks, 1, 1, plan.threads, 1, 1, plan.shared_bytes, stream, args)
        if torch.cuda.current_device() == self.device:
            rc = self.driver.cuLaunchKernel(*launch, None)
        else:  # the kernel belongs to its device's context
            with torch.cuda.device(self.device):
                rc = self.driver.cuLaunchKernel(*launch, None)
        if rc != 0:
            message = ctypes.c_char_p()
            self.driver.cuGetErrorString(rc, ctypes.byref(message))
            detail = (message.value or b"unknown error").decode()
            raise RuntimeError(f"fused Tucker CUDA kernel launch failed ({rc}): {detail}")


@functools.cache
def _driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    p, u = ctypes.c_void_p, ctypes.c_uint
    lib.cuLaunchKernel.argtypes = [p, u, u, u, u, u, u, u, p, p, p]
    lib.cuLaunchKernel.restype = ctypes.c_int
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.cuGetErrorString.restype = ctypes.c_int
    return lib


def cuda_status() -> str:
    """Why the CUDA kernel cannot run here, or ``"available"`` (shapes that failed to build
    are listed after it)."""
    reason = _disabled_reason()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device"
    return "available" + "".join(f"; {dict(k[1:])} failed: {v}" for k, v in _failed.items())
