"""The fused Tucker-2 convolution as a PyTorch operator: ``slimtorch::tucker_block``.

The eager implementation calls the C kernel (:mod:`slimtorch.decompose.native`) for float32 CPU
tensors, the CUDA kernel (:mod:`slimtorch.decompose.cuda_kernel`) for float32 CUDA tensors, and
runs the same maths as library convolutions otherwise (:func:`reference`). The
operator has a fake (meta) implementation for ``torch.compile``/``torch.export`` and a FLOP
formula for ``torch.utils.flop_counter``. :class:`~slimtorch.decompose.fused.FusedTuckerConv2d`
is the module that uses it.

Example:
    >>> x = torch.randn(2, 8, 6, 6)
    >>> u, k, v = torch.randn(4, 8), torch.randn(4, 4, 3, 3), torch.randn(8, 4)
    >>> y = tucker_block(x, u, k, v, torch.zeros(8), None, [1, 1], [1, 1], [1, 1], False)
    >>> bool(torch.allclose(y, reference(x, u, k, v, torch.zeros(8), None, [1, 1], [1, 1],
    ...                                  [1, 1], False), atol=1e-4))
    True
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from slimtorch.decompose import cuda_kernel, native

_SCHEMA = (
    "(Tensor x, Tensor u, Tensor k, Tensor v, Tensor bias, Tensor? residual, int[] stride, "
    "int[] padding, int[] dilation, bool relu) -> Tensor"
)


def _out_hw(
    x: torch.Tensor,
    k: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, int]:
    return tuple(  # type: ignore[return-value]
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (k.shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    )


def reference(
    x: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    relu: bool,
) -> torch.Tensor:
    """The fused layer's maths as library convolutions (any device and dtype, differentiable)."""
    z = F.conv2d(x, u[:, :, None, None])  # (N, r1, H, W)
    t = F.conv2d(z, k, stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation))
    y = F.conv2d(t, v[:, :, None, None], bias)  # (N, CO, Ho, Wo)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def check_shapes(
    x: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, int]:
    """Raise ``ValueError`` on inconsistent shapes; return the output's ``(Ho, Wo)``."""
    if x.ndim != 4 or x.shape[1] != u.shape[1]:
        raise ValueError(
            f"fused Tucker conv expects input (N, {u.shape[1]}, H, W), got {tuple(x.shape)}"
        )
    out = _out_hw(x, k, stride, padding, dilation)
    if min(out) < 1:
        raise ValueError(
            f"input {tuple(x.shape)} is too small for the core kernel {tuple(k.shape)}"
        )
    if residual is not None and tuple(residual.shape) != (x.shape[0], v.shape[0], *out):
        raise ValueError(
            f"residual must have the output's shape {(x.shape[0], v.shape[0], *out)}, got "
            f"{tuple(residual.shape)}"
        )
    if not (k.shape[1] == u.shape[0] and v.shape[1] == k.shape[0] and bias.shape == v.shape[:1]):
        raise ValueError(
            f"factor shapes do not chain: u {tuple(u.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}, bias {tuple(bias.shape)}"
        )
    return out


def _tucker_block(
    x: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool,
) -> torch.Tensor:
    """``relu?(conv1x1_v(core_k(conv1x1_u(x))) + bias + residual?)`` in one pass per image.

    Shapes: ``x (N, C, H, W)``, ``u (r1, C)``, ``k (r2, r1, kh, kw)``, ``v (CO, r2)``,
    ``bias (CO,)``, ``residual`` None or the output's shape ``(N, CO, Ho, Wo)``.
    """
    out = check_shapes(x, u, k, v, bias, residual, stride, padding, dilation)
    y = run_native(x, u, k, v, bias, residual, stride, padding, dilation, relu, out)
    if y is not None:
        return y
    return reference(x, u, k, v, bias, residual, stride, padding, dilation, relu)


def run_native(
    x: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    relu: bool,
    out: tuple[int, int],
) -> torch.Tensor | None:
    """The fused layer by this device's kernel (C on the CPU, CUDA on a CUDA GPU) for float32
    tensors on one device whose shapes :func:`check_shapes` accepted (``out`` is what it
    returned); None where no kernel can run them (then nothing ran)."""
    device = x.device
    for t in (x, u, k, v, bias) if residual is None else (x, u, k, v, bias, residual):
        if t.dtype != torch.float32 or t.device != device:
            return None
    args = (x, u, k, v, bias, residual, stride, padding, dilation, relu, out)
    if device.type == "cpu":
        lib = native.kernel()
        return None if lib is None else run_kernel(lib, *args)
    if device.type == "cuda":
        run = cuda_launcher(x, u, k, v, residual, stride, padding, dilation, relu, out)
        return None if run is None else run(x, u, k, v, bias, residual)
    return None


def cuda_launcher(
    x: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    residual: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    relu: bool,
    out: tuple[int, int],
) -> Any:
    """The CUDA kernel's launcher for float32 tensors on one CUDA device whose shapes
    :func:`check_shapes` accepted (``out`` is what it returned), or None where it cannot run."""
    index = x.device.index
    return cuda_kernel.launcher(
        torch.cuda.current_device() if index is None else index,
        (x.shape[1], x.shape[2], x.shape[3]),
        u.shape[0],
        (k.shape[0], k.shape[1], k.shape[2], k.shape[3]),
        v.shape[0],
        (stride[0], stride[1]),
        (padding[0], padding[1]),
        (dilation[0], dilation[1]),
        out,
        relu,
        residual is not None,
    )


def run_kernel(
    lib: Any,
    x: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    relu: bool,
    out: tuple[int, int],
) -> torch.Tensor:
    """Call the C kernel ``lib`` on float32 CPU tensors whose shapes :func:`check_shapes`
    accepted; ``out`` is the ``(Ho, Wo)`` it returned."""
    x, u, k, v, bias = (
        x.contiguous(),
        u.contiguous(),
        k.contiguous(),
        v.contiguous(),
        bias.contiguous(),
    )
    res = None if residual is None else residual.contiguous()  # kept alive for the call
    n, c, h, w = x.shape
    co = v.shape[0]
    y = torch.empty(n, co, out[0], out[1], dtype=x.dtype)
    rc = lib.slimtorch_tucker_block(
        x.data_ptr(), n, c, h, w, u.data_ptr(), u.shape[0], k.data_ptr(), k.shape[0],
        k.shape[2], k.shape[3], stride[0], stride[1], padding[0], padding[1], dilation[0],
        dilation[1], v.data_ptr(), bias.data_ptr(), co, y.data_ptr(),
        None if res is None else res.data_ptr(), int(relu),
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError(f"fused Tucker conv could not allocate its scratch for {tuple(x.shape)}")
    return y


tucker_block = torch.library.custom_op("slimtorch::tucker_block", mutates_args=(), schema=_SCHEMA)(
    _tucker_block
)
"""The fused layer as one operator, so ``torch.compile`` and ``torch.export`` see one node."""


@tucker_block.register_fake
def _(
    x: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], v.shape[0], *_out_hw(x, k, stride, padding, dilation))


# Under autocast the operator computes in float32, its kernels' dtype: on these narrow factors
# they outrun half-precision library convolutions (docs/benchmarks.md, "under autocast").
# torch < 2.5 has no register_autocast; there the operator follows its inputs' dtype.
if hasattr(torch.library, "register_autocast"):
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast("slimtorch::tucker_block", _device, torch.float32)


@register_flop_formula(torch.ops.slimtorch.tucker_block)
def _flops(
    x_shape: Sequence[int],
    u_shape: Sequence[int],
    k_shape: Sequence[int],
    v_shape: Sequence[int],
    *args: Any,
    out_shape: Sequence[int] | None = None,
    **kwargs: Any,
) -> int:
    """FLOPs (2 per multiply-add) of the three factor convolutions, for torch's FLOP counter."""
    assert out_shape is not None
    n, c, h, w = x_shape
    r2, r1, kh, kw = k_shape
    ho, wo = out_shape[2], out_shape[3]
    return 2 * n * (h * w * c * r1 + ho * wo * (r2 * r1 * kh * kw + v_shape[0] * r2))


__all__ = ["check_shapes", "cuda_launcher", "reference", "run_native", "tucker_block"]
