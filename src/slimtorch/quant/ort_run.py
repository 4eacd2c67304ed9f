"""Running an exported graph in ONNX Runtime on the CPU: one session, one tensor in and out.

:func:`ort_session` opens a file with fixed threads and every graph optimisation;
:func:`run_onnx` runs it on a torch tensor with as little work around the call as it can, since
at batch 1 the time spent in Python beside ONNX Runtime shows in every speed-up measured with it.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtorch.core.errors import is_onnxruntime_error


def ort_session(
    path: str | os.PathLike[str],
    threads: int = 1,
    *,
    optimized_path: str | None = None,
    spin: bool = False,
) -> Any:
    """An ONNX Runtime CPU session with fixed threads and all graph optimisations.

    Args:
        path: The ``.onnx`` file.
        threads: Intra-op threads (inter-op is 1, sequential execution).
        optimized_path: If given, ORT writes the optimised graph there.
        spin: Let the intra-op workers spin between runs (ORT's default). Off here: two
            sessions timed in alternating rounds on few cores then fight for them. resnet20's
            fp32 and int8 graphs at batch 32 with 2 threads on a 2-core VM read per-round ratios
            of 0.8-4.1x with spinning (int8 3 of 9 rounds slower) and 1.7-2.0x without, and
            int8 ran 3.6 instead of 4.9 ms. With 1 thread there is no worker to spin.

    Example:
        >>> import pathlib, tempfile
        >>> from slimtorch.models import create_model
        >>> from slimtorch.quant.export import export_onnx
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.onnx"
        >>> _ = export_onnx(create_model("lenet5"), path, torch.randn(1, 1, 28, 28))
        >>> sess = ort_session(path, threads=2)
        >>> x = torch.randn(1, 1, 28, 28)
        >>> sess.run(None, {"input": x.numpy()})[0].shape
        (1, 10)
    """
    import onnxruntime as ort

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if optimized_path is not None:
        opts.optimized_model_filepath = optimized_path
    if not Path(path).is_file():
        raise FileNotFoundError(f"no ONNX file at {path}; export one with export_onnx first")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own error types
        raise ValueError(
            f"ONNX Runtime cannot load {path} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); the file is corrupt or not an "
            "ONNX model: export it again"
        ) from None


def run_onnx(session: Any, x: torch.Tensor) -> torch.Tensor:
    """Run a session on one tensor input (cast to the model's input type) and return a tensor.

    Built for batch-1 latency, where every microsecond around ONNX Runtime shows in the ratio
    of two small models: the session's input and output names are read once per session, a
    contiguous CPU tensor of the input's dtype is handed over without a copy, and the shape is
    checked against the graph's only when ONNX Runtime refuses the input (the clear error is
    then raised from that check).

    Example:
        >>> import pathlib, tempfile
        >>> from slimtorch.models import create_model
        >>> from slimtorch.quant.export import export_onnx
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.onnx"
        >>> _ = export_onnx(create_model("lenet5"), path, torch.randn(1, 1, 28, 28))
        >>> run_onnx(ort_session(path), torch.randn(2, 1, 28, 28)).shape  # dynamic batch
        torch.Size([2, 10])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    name, dtype, outputs = _session_io(session)
    if len(outputs) != 1:  # the first alone would pass for the model's answer
        raise ValueError(
            f"the ONNX model has {len(outputs)} outputs ({', '.join(outputs)}); run_onnx and "
            "check_onnx compare models with one output tensor"
        )
    t = x.detach()
    if t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous():
        arr = t.numpy()  # shares memory; ORT only reads it
    else:
        arr = np.ascontiguousarray(t.cpu().numpy(), _NUMPY[dtype])
    try:
        out = session.run(outputs, {name: arr})[0]
    except Exception as exc:
        if not is_onnxruntime_error(exc):
            raise
        _check_input_shape(session, x)  # raises the clear error for a shape ORT refused
        raise
    return torch.from_numpy(np.asarray(out)).float()


_ORT_TYPES = {"tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
              "tensor(int32)": torch.int32}  # fmt: skip
"""Input types run_onnx feeds as they are; every other input is fed as float32."""
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
          torch.int32: np.int32}  # fmt: skip
_SESSION_IO: weakref.WeakKeyDictionary[Any, tuple[str, torch.dtype, list[str]]] = (
    weakref.WeakKeyDictionary()
)


def _session_io(session: Any) -> tuple[str, torch.dtype, list[str]]:
    """The session's first input name, the torch dtype it takes, and its output names (cached)."""
    try:
        return _SESSION_IO[session]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable (a stand-in session)
        pass
    inp = session.get_inputs()[0]
    outputs = [o.name for o in session.get_outputs()]
    io = (inp.name, _ORT_TYPES.get(inp.type, torch.float32), outputs)
    with contextlib.suppress(TypeError):
        _SESSION_IO[session] = io
    return io


def _check_input_shape(session: Any, x: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming both shapes if ``x`` does not fit the session's input."""
    inp = session.get_inputs()[0]
    want = list(inp.shape)  # ints, or names/None for dynamic dimensions
    if x.ndim != len(want) or any(
        isinstance(w, int) and w != n for w, n in zip(want, x.shape, strict=True)
    ):
        raise ValueError(
            f"input of shape {tuple(x.shape)} does not fit the ONNX model's input "
            f"{inp.name!r} of shape {tuple(want)}; give inputs of that shape"
        )
