"""The fused Tucker-2 kernel on CUDA GPUs (``kernels/tucker_block.cu``), compiled with NVRTC.

On a GPU a :class:`~slimtorch.decompose.layers.TuckerConv2d` run as three library
convolutions writes two intermediate maps to memory and reads them back, and the narrow
factor convolutions are memory- and launch-bound: on the H100 that ate the whole FLOP saving
of resnet56's factorised blocks (docs/benchmarks.md). The CUDA kernel computes the first 1x1
once per tile into shared memory, runs the core taps and the last 1x1 from there, and writes
only the output, after the bias, residual and ReLU.

Each layer shape gets its own build: the shape goes in as ``#define`` constants so all loop
bounds are known to the compiler. Small batches, whose grid would fill under a quarter of the
multiprocessors, run a second build with 2 or 4 threads per output pixel (``SPLIT``), made on
first use; inside CUDA-graph capture on Hopper and later, small grids are launched with
programmatic dependent launch, so a layer stages its weights while the previous kernel ends.
Together they took fused resnet56 in a CUDA graph on the H100 from 0.78x to 1.11x the fastest
dense form at batch 1 (docs/benchmarks.md); ``SLIMTORCH_NO_PDL=1`` turns the second off.
Builds go through ``torch.cuda._compile_kernel`` (NVRTC, which ships with PyTorch's CUDA
wheels), once per shape and device per process (about a second each). ROCm builds of PyTorch,
float16/bfloat16, and shapes whose weights and tile do not fit in shared memory run the library
convolutions instead; so does everything when ``SLIMTORCH_NO_NATIVE=1``.

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
    split: int = 1,
) -> LaunchPlan | None:
    """Tile an output map of ``out_hw`` for the kernel, or None if even one output row of one
    image does not fit in ``shared_limit`` bytes of shared memory.

    Large maps are cut into bands of whole rows of about :data:`TARGET_PIXELS` pixels, of
    equal height; small maps are grouped, several images to a block. With ``split`` > 1 (the
    small-batch form: ``split`` threads per output pixel) a block takes one image or a band
    of it, and the plan is None unless ``split`` divides the padded ranks' float4 counts and
    ``co``.
    """
    ho, wo = out_hw
    in_cols = (wo - 1) * stride[1] + (kernel[1] - 1) * dilation[1] + 1
    taps = kernel[0] * kernel[1]
    if split > 1 and (_round4(r1) // 4 % split or _round4(r2) // 4 % split or co % split):
        return None

    def in_rows(rows: int) -> int:
        return (rows - 1) * stride[0] + (kernel[0] - 1) * dilation[0] + 1

    def threads(rows: int, images: int) -> int:
        return -(-(rows * wo * images) // 32) * 32 * split

    per_image = ho * wo
    if per_image >= TARGET_PIXELS:
        bands = -(-per_image // TARGET_PIXELS)
        rows, images = -(-ho // bands), 1
    else:
        rows, images = ho, 1 if split > 1 else max(1, TARGET_PIXELS // per_image)
    while True:
        shared = _shared_bytes(c, r1, r2, co, taps, in_rows(rows), in_cols, images)
        if split > 1:
            shared += 4 * images * rows * wo * _round4(r2)  # the core outputs, exchanged
        if shared <= shared_limit and (split == 1 or threads(rows, images) <= 1024):
            break
        if images > 1:
            images -= 1
        elif rows > 1:
            rows -= 1
        else:
            return None
    return LaunchPlan(rows, images, min(1024, threads(rows, images)), shared, -(-ho // rows))


_lock = threading.Lock()


@functools.cache
def _source() -> str:
    return (
        resources.files("slimtorch.decompose")
        .joinpath("kernels", SOURCE)
        .read_text(encoding="utf-8")
    )


def _disabled_reason() -> str | None:
    if os.environ.get("SLIMTORCH_NO_NATIVE", "") not in ("", "0"):
        return "disabled by SLIMTORCH_NO_NATIVE"
    if torch.version.cuda is None:
        return "not a CUDA build of PyTorch"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return "this PyTorch has no torch.cuda._compile_kernel (NVRTC)"
    return None


_failed: dict[tuple[Any, ...], str] = {}


SPLITS = (4, 2)
"""Threads per output pixel the small-batch form tries, most first."""
SMALL_GRID = 4
"""A grid is small when it would fill at most 1/SMALL_GRID of the multiprocessors: then the
small-batch form runs, and inside graph capture the launch is programmatic."""


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
    split: int | None = None,
) -> Callable[..., torch.Tensor] | None:
    """A function ``f(x, u, k, v, bias, residual) -> y`` that runs the CUDA kernel on CUDA
    device ``device`` for inputs ``(N, *in_shape)`` and a core of ``core_shape``, or None
    where it cannot run (see the module docstring). A failed build is logged once.

    ``split`` None (the default) runs batches whose blocks would fill under a quarter of the
    GPU's multiprocessors in the small-batch form (several threads per output pixel, built on
    first use), others in the one-thread-per-pixel form; an int forces that many threads per
    pixel (1: never split).

    Arguments are plain ints and tuples so a layer's launcher is found by one dictionary
    lookup per call.
    """
    if _disabled_reason() is not None:
        return None
    shape = (in_shape, r1, core_shape, co, stride, padding, dilation, out_hw, relu, residual)
    base = _build(device, shape, 1 if split is None else split)
    if base is None:
        return None
    small: list[_Launch | None] = []  # the small-batch form, built on first use

    def small_form() -> _Launch | None:
        if not small:
            built = None
            for k in SPLITS:
                built = _build(device, shape, k)
                if built is not None:
                    break
            small.append(built)
        return small[0]

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
            launch = base
            if split is None and base.is_small(n):
                launch = small_form() or base
            launch(n, (x, u, k, v, bias, res, y))
        return y

    return run


def _build(device: int, shape: tuple[Any, ...], split: int) -> _Launch | None:
    """Plan and compile one form of the kernel for one layer ``shape`` (the launcher's
    arguments from ``in_shape`` to ``residual``); None where it cannot."""
    in_shape, r1, core_shape, co, stride, padding, dilation, out_hw, relu, residual = shape
    c, h, w = in_shape
    r2, _, kh, kw = core_shape
    plan = plan_launch(
        c=c, r1=r1, r2=r2, co=co, kernel=(kh, kw), stride=stride, dilation=dilation,
        out_hw=out_hw, split=split,
    )  # fmt: skip
    if plan is None:
        return None
    defines = (
        ("C", c), ("R1", r1), ("R2", r2), ("CO", co), ("KH", kh), ("KW", kw),
        ("SH", stride[0]), ("SW", stride[1]), ("PH", padding[0]), ("PW", padding[1]),
        ("DH", dilation[0]), ("DW", dilation[1]), ("H", h), ("W", w),
        ("HO", out_hw[0]), ("WO", out_hw[1]), ("TH", plan.rows), ("NIMG", plan.images),
        ("RELU", int(relu)), ("RES", int(residual)), ("NTHREADS", plan.threads),
        ("R1P", _round4(r1)), ("R2P", _round4(r2)), ("PDL", int(_pdl_supported(device))),
        ("SPLIT", split),
    )  # fmt: skip
    header = "".join(f"#define {name} {value}\n" for name, value in defines)
    try:
        with _lock, torch.cuda.device(device):
            fn = torch.cuda._compile_kernel(header + _source(), SYMBOL)
    except (RuntimeError, OSError) as exc:  # OSError: no NVRTC library found
        with _lock:
            _failed[(device, *defines)] = str(exc)
        logger.warning("fused Tucker CUDA kernel unavailable for %s: %s", defines, exc)
        return None
    return _Launch(fn, device, plan)


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
        self.pdl = self.driver is not None and _pdl_supported(device)
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count

    def blocks(self, n: int) -> int:
        """Blocks of the grid for ``n`` images."""
        return -(-n // self.plan.images) * self.plan.tiles

    def is_small(self, n: int) -> bool:
        """Whether the grid for ``n`` images is small (see :data:`SMALL_GRID`)."""
        return self.blocks(n) * SMALL_GRID <= self.sms

    def __call__(self, n: int, tensors: tuple[torch.Tensor, ...]) -> None:
        plan = self.plan
        blocks = self.blocks(n)
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
        if self.pdl and self.is_small(n) and torch.cuda.is_current_stream_capturing():
            # in a captured forward pass no kernel before this one writes the weights, so the
            # kernel may stage them while the previous kernel finishes (the source's PDL note).
            # Small grids only: on larger ones the next kernel's early blocks took
            # multiprocessors from this one's later waves (resnet56 at batch 1024: 0.91x).
            config = _LaunchConfig(
                blocks, 1, 1, plan.threads, 1, 1, plan.shared_bytes, stream,
                ctypes.pointer(_PDL_ATTRIBUTE), 1,
            )  # fmt: skip
            launch: tuple[Any, ...] = (ctypes.byref(config), self.func, args)
            call = self.driver.cuLaunchKernelEx
        else:
            launch = (self.func, blocks, 1, 1, plan.threads, 1, 1, plan.shared_bytes, stream, args)
            call = self.driver.cuLaunchKernel
        if torch.cuda.current_device() == self.device:
            rc = call(*launch, None)
        else:  # the kernel belongs to its device's context
            with torch.cuda.device(self.device):
                rc = call(*launch, None)
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
    if hasattr(lib, "cuLaunchKernelEx"):  # CUDA 12 drivers and later
        lib.cuLaunchKernelEx.argtypes = [p, p, p, p]
        lib.cuLaunchKernelEx.restype = ctypes.c_int
    return lib


class _LaunchAttribute(ctypes.Structure):
    """The driver's ``CUlaunchAttribute``: an id, padding to 8 bytes, a 64-byte value union."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):
    """The driver's ``CUlaunchConfig`` for ``cuLaunchKernelEx``."""

    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_bytes", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)),
        ("num_attrs", ctypes.c_uint),
    ]

    def __init__(
        self, gx: int, gy: int, gz: int, bx: int, by: int, bz: int, shared: int, stream: int,
        attrs: Any, num_attrs: int,
    ) -> None:  # fmt: skip
        super().__init__((gx, gy, gz), (bx, by, bz), shared, stream, attrs, num_attrs)


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_PDL_ATTRIBUTE = _LaunchAttribute(_PROGRAMMATIC_STREAM_SERIALIZATION, b"", (ctypes.c_int * 16)(1))


@functools.cache
def _pdl_supported(device: int) -> bool:
    """Programmatic dependent launch: sm_90 or later, a driver with ``cuLaunchKernelEx``, and
    not turned off with ``SLIMTORCH_NO_PDL=1``."""
    if os.environ.get("SLIMTORCH_NO_PDL", "") not in ("", "0"):
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        return hasattr(_driver(), "cuLaunchKernelEx")
    except OSError:
        return False


def cuda_status() -> str:
    """Why the CUDA kernel cannot run here, or ``"available"`` (shapes that failed to build
    are listed after it)."""
    reason = _disabled_reason()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device"
    with _lock:  # another thread may be recording a failed build
        failed = list(_failed.items())
    return "available" + "".join(f"; {dict(k[1:])} failed: {v}" for k, v in failed)
