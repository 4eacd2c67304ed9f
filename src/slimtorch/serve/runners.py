"""Runners: a loaded model that maps named numpy inputs to named numpy outputs.

Three formats, none unpickled: slimtorch model directories (:func:`slimtorch.models.load_model`,
safetensors + config.json), ``torch.export`` programs (:func:`slimtorch.models.load_exported`,
which refuses pickled entries) and ONNX files (ONNX Runtime, imported when first used).

Memory rule (bytes a model needs, used by the cache):

* ``memory_bytes`` from the model config when given;
* else, before loading, :func:`estimate_memory`: the bytes of the weight files on disk (for
  ONNX: the ``.onnx`` file and the external-data files its graph names) plus an
  activation allowance of ``8 x max_batch_size x (bytes of one input item + one output item)``;
* after loading, the measured figure replaces the estimate: on a GPU the peak allocated during
  loading and a warm-up batch of ``max_batch_size``; on the CPU the parameter and buffer bytes
  plus the same allowance.

Example (a slimtorch model directory saved into a temporary folder):
    >>> import tempfile
    >>> from slimtorch.models import create_model, save_model
    >>> folder = Path(tempfile.mkdtemp()) / "mlp" / "1"
    >>> _ = save_model(create_model("mlp"), folder, input_shape=(1, 28, 28), mean=[0.5],
    ...                std=[0.5], class_names=list("0123456789"))
    >>> config = ModelConfig(name="mlp", format="slimtorch",
    ...                      inputs=(TensorSpec(name="input", dims=(1, 28, 28)),),
    ...                      outputs=(TensorSpec(name="logits", dims=(10,)),))
    >>> runner = load_runner(folder, config, "cpu")
    >>> runner.run({"input": np.zeros((2, 1, 28, 28), np.float32)})["logits"].shape
    (2, 10)
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from slimtorch.core.errors import ModelLoadError, is_out_of_memory
from slimtorch.models.card import model_root, read_model_card
from slimtorch.serve.model_config import DATATYPES, ModelConfig, TensorSpec
from slimtorch.serve.onnx_graph import ExternalDataError, external_data_files

logger = logging.getLogger(__name__)

FILES = {"torch_export": "model.pt2", "onnx": "model.onnx"}


class Runner(Protocol):
    """A loaded model version."""

    device: str
    memory_bytes: int

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: input name -> array (batch first) to output name -> array."""
        ...

    def close(self) -> None:
        """Release the model's memory."""
        ...


def model_path(version_dir: Path, fmt: str) -> Path:
    """The file or directory of a version that the loader reads.

    Example:
        >>> model_path(Path("repo/m/1"), "onnx")
        PosixPath('repo/m/1/model.onnx')
    """
    if fmt == "slimtorch":
        return model_root(version_dir)
    return version_dir / FILES[fmt]


def _item_bytes(specs: tuple[TensorSpec, ...], trained: tuple[int, ...] | None = None) -> int:
    return sum(math.prod(_warm_dims(s.dims, trained)) * s.dtype.itemsize for s in specs)


def allowance_bytes(config: ModelConfig, trained: tuple[int, ...] | None = None) -> int:
    """Activation allowance: ``8 x max_batch_size x (input item + output item bytes)``, a
    dynamic input size taken from ``trained`` (the warm-up's shape, see :func:`check_outputs`)."""
    item = _item_bytes(config.inputs, trained if len(config.inputs) == 1 else None)
    return 8 * config.max_batch_size * (item + _item_bytes(config.outputs))


def estimate_memory(version_dir: Path, config: ModelConfig) -> int:
    """Bytes a version needs before it is loaded (see the module docstring for the rule).

    Example (1000 bytes of weights plus ``8 x 8 x (16 + 8)`` bytes of activations):
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "model.onnx").write_bytes(bytes(1000))
        >>> config = ModelConfig(name="m", format="onnx", inputs=(TensorSpec(name="x", dims=(4,)),),
        ...                      outputs=(TensorSpec(name="y", dims=(2,)),), max_batch_size=8)
        >>> estimate_memory(folder, config)
        2536
    """
    if config.memory_bytes is not None:
        return config.memory_bytes
    path = model_path(version_dir, config.format)
    trained = None
    if path.is_dir():
        weights = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
        with contextlib.suppress(ModelLoadError, OSError, ValueError):  # the load says why
            trained = tuple(read_model_card(path).input_shape)
    else:
        weights = path.stat().st_size if path.exists() else 0
        if config.format == "onnx" and path.exists():
            with contextlib.suppress(ModelLoadError):  # the load refuses it with the reason
                weights += sum(f.stat().st_size for f in external_data_files(path))
    return weights + allowance_bytes(config, trained)


def _module_bytes(module: nn.Module) -> int:
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _outputs(config: ModelConfig, values: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The model's outputs under their config names, in the configured datatypes.

    An output is converted only where that keeps every value (``float16`` to ``FP32``, say):
    a config that would round or wrap an output (``FP32`` logits as ``UINT8``) is refused.

    Raises:
        ModelLoadError: The config's datatype cannot hold the output's values.
    """
    out = {}
    for s, v in zip(config.outputs, values, strict=True):
        if v.dtype != s.dtype and not np.can_cast(v.dtype, s.dtype, "safe"):
            have = next((k for k, d in DATATYPES.items() if d == v.dtype), str(v.dtype))
            raise ModelLoadError(
                f"output {s.name!r} of model {config.name!r} is {have} but the config says "
                f"{s.datatype}, which cannot hold its values; set its datatype to {have}"
            )
        out[s.name] = v.astype(s.dtype, copy=False)
    return out


class TorchRunner:
    """A torch module (slimtorch model directory or exported program) behind a runner."""

    def __init__(self, module: nn.Module, config: ModelConfig, device: torch.device) -> None:
        self.module = module
        self.config = config
        self.torch_device = device
        self.device = str(device)
        # floating inputs are cast to what the module takes: an exported program's own input
        # dtypes (its first layer may be float32 in a float16 model), else its parameters'
        graph = getattr(module, "graph", None)
        placeholders = [] if graph is None else [n for n in graph.nodes if n.op == "placeholder"]
        floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
        self.compute_dtype = floats[0] if floats else None
        self.input_dtypes = [getattr(n.meta.get("val"), "dtype", None) for n in placeholders]
        self.memory_bytes = _module_bytes(module) + allowance_bytes(config)

    def _to_tensor(self, arr: np.ndarray, index: int) -> torch.Tensor:
        if not arr.flags.writeable:
            arr = arr.copy()
        t = torch.from_numpy(arr)
        own = self.input_dtypes[index] if index < len(self.input_dtypes) else None
        dtype = own if own is not None and own.is_floating_point else self.compute_dtype
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(self.torch_device, non_blocking=True)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch under ``torch.inference_mode``."""
        args = [self._to_tensor(inputs[s.name], i) for i, s in enumerate(self.config.inputs)]
        with torch.inference_mode():
            out = self.module(*args)
        if isinstance(out, dict):
            values = [out[s.name] for s in self.config.outputs]
        elif isinstance(out, list | tuple):
            values = list(out)
        else:
            values = [out]
        if len(values) != len(self.config.outputs):
            raise ModelLoadError(
                f"model {self.config.name!r} returned {len(values)} outputs but its config "
                f"lists {len(self.config.outputs)}; fix the config's outputs"
            )
        # numpy has no bfloat16; float32 holds every bfloat16 value exactly
        values = [v.float() if v.dtype == torch.bfloat16 else v for v in values]
        return _outputs(self.config, [v.detach().to("cpu").numpy() for v in values])

    def close(self) -> None:
        """Drop the module and return cached GPU memory."""
        self.module = nn.Identity()
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()


class OnnxRunner:
    """An ONNX model run by ONNX Runtime."""

    def __init__(self, path: Path, config: ModelConfig, device: torch.device) -> None:
        import onnxruntime as ort  # heavy: imported when an ONNX model is loaded

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            gpu = [
                p
                for p in (
                    "CUDAExecutionProvider",
                    "ROCMExecutionProvider",
                    "MIGraphXExecutionProvider",
                )
                if p in available
            ]
            providers = (
                [(gpu[0], {"device_id": device.index or 0}), *providers] if gpu else (providers)
            )
        try:  # refuses external data outside the model's folder before ONNX Runtime reads it
            external = external_data_files(path)
        except ExternalDataError:
            raise
        except ModelLoadError:
            external = []  # not a readable graph: ONNX Runtime says why below
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            newer = re.search(r"IR version|opset", str(exc), re.IGNORECASE)
            hint = (
                f"the file is newer than onnxruntime {ort.__version__} reads: upgrade "
                "onnxruntime, or export with the opset it supports"
                if newer
                else "re-export the model"
            )
            raise ModelLoadError(f"ONNX Runtime cannot load {path} ({exc}); {hint}") from None
        names = [i.name for i in self.session.get_inputs()]
        wanted = [s.name for s in config.inputs]
        if sorted(names) != sorted(wanted):
            raise ModelLoadError(
                f"{path} takes inputs {names} but the model config lists {wanted}; make the "
                "config's input names match the ONNX graph"
            )
        outs = [o.name for o in self.session.get_outputs()]
        missing = [s.name for s in config.outputs if s.name not in outs]
        if missing:
            raise ModelLoadError(
                f"{path} has outputs {outs}; the model config lists {missing} that it lacks"
            )
        self.config = config
        self.device = str(device)
        size = path.stat().st_size + sum(f.stat().st_size for f in external)
        self.memory_bytes = size + allowance_bytes(config)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch."""
        names = [s.name for s in self.config.outputs]
        values = self.session.run(names, {s.name: inputs[s.name] for s in self.config.inputs})
        return _outputs(self.config, [np.asarray(v) for v in values])

    def close(self) -> None:
        """Drop the session."""
        self.session = None


def int8_note(module: nn.Module) -> str | None:
    """What runs when a module holding int8 layers is served as a PyTorch module, or ``None``.

    The ONNX export is advised only where it turns the int8 layers into ONNX Runtime's int8
    operators (``QLinearConv``, ``QLinearMatMul``, ...): layers with a static input scale, in a
    model without :class:`~slimtorch.quant.gemm.GemmConv2d` layers or dynamic layers (which
    :func:`slimtorch.quant.export_onnx` refuses). Weight-only layers export as float operators
    fed by dequantized weights, so no int8 kernel runs there either.

    Example:
        >>> from slimtorch.models import create_model
        >>> from slimtorch.quant import PTQConfig, quantize_
        >>> model = create_model("lenet5", in_channels=1, input_size=8).eval()
        >>> int8_note(model) is None
        True
        >>> _ = quantize_(model, PTQConfig(mode="weight_only"))
        >>> int8_note(model)
        'holds weight-only int8 layers: their weights are dequantized to float on every call ...'
    """
    from slimtorch.quant.convert import QDQAct
    from slimtorch.quant.gemm import GemmConv2d
    from slimtorch.quant.qdq import QDQConv2d, QDQLinear

    layers = [m for m in module.modules() if isinstance(m, QDQConv2d | QDQLinear)]
    acts = any(isinstance(m, QDQAct) for m in module.modules())
    if not layers and not acts:
        return None
    dynamic = any(m.input_dynamic for m in layers)
    static = acts or any(m.input_scale is not None and not m.input_dynamic for m in layers)
    lowered = any(isinstance(m, GemmConv2d) for m in module.modules())
    if not static and not dynamic:
        bits = "/".join(f"int{b}" for b in sorted({m.weight_bits for m in layers}))
        return (
            f"holds weight-only {bits} layers: their weights are dequantized to float on every "
            "call and the arithmetic runs in float (smaller files, no int8 kernels; its ONNX "
            "export has no int8 operators either)"
        )
    runs = (
        "holds int8 Q/DQ layers, which run simulated in float when served as a slimtorch "
        "directory (activations quantized and dequantized, weights dequantized on every call; "
        "slower than the float model)"
    )
    if lowered or dynamic:
        why = (
            "GemmConv2d (conv-gemm) layers"
            if lowered
            else "dynamic-quantization layers (their input scale is computed per batch)"
        )
        return (
            f"{runs}; `slimtorch export --format onnx` refuses its {why}, so no ONNX int8 "
            "kernels are available for this model"
        )
    return (
        f"{runs}; serve its ONNX export (slimtorch export --format onnx, format 'onnx') to run "
        "its int8 kernels in ONNX Runtime"
    )


def _warn_if_simulated_int8(module: nn.Module, name: str) -> None:
    """Log what runs when a model directory holding int8 layers is served (:func:`int8_note`)."""
    note = int8_note(module)
    if note is not None:
        logger.warning("model %r %s", name, note)


def load_runner(version_dir: Path, config: ModelConfig, device: str) -> Runner:
    """Load one version and check it against its config with a warm-up batch.

    The warm-up runs zeros of ``max_batch_size`` items on a GPU (to measure the memory peak),
    two items on the CPU (one where the batch is capped at one), and checks every output's shape
    and datatype against the config: each output must keep one row per input row, and its
    datatype must hold the model's values.

    Raises:
        ModelLoadError: A missing or corrupt file, or outputs that do not match the config.

    Example (the warm-up batch refuses a config whose output dims do not match the model):
        >>> import tempfile
        >>> from slimtorch.models import create_model, save_model
        >>> folder = save_model(create_model("mlp"), Path(tempfile.mkdtemp()) / "1",
        ...     input_shape=(1, 28, 28), mean=[0.5], std=[0.5], class_names=list("0123456789"))
        >>> inputs = (TensorSpec(name="input", dims=(1, 28, 28)),)
        >>> good = ModelConfig(name="mlp", format="slimtorch", inputs=inputs,
        ...                    outputs=(TensorSpec(name="logits", dims=(10,)),))
        >>> load_runner(folder, good, "cpu").device
        'cpu'
        >>> bad = ModelConfig(name="mlp", format="slimtorch", inputs=inputs,
        ...                   outputs=(TensorSpec(name="logits", dims=(5,)),))
        >>> load_runner(folder, bad, "cpu")
        Traceback (most recent call last):
        ...
        slimtorch.core.errors.ModelLoadError: output 'logits' of model 'mlp' has shape [2, 10] ...
    """
    dev = torch.device(device)
    path = model_path(version_dir, config.format)
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; put the {config.format} model there")
    on_gpu = dev.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    runner: Runner
    trained: tuple[int, ...] | None = None  # the shape a slimtorch model was trained on
    if config.format == "slimtorch":
        from slimtorch.models import load_model

        module, card = load_model(path, device=dev)
        trained = tuple(card.input_shape)
        _warn_if_simulated_int8(module, config.name)
        runner = TorchRunner(module, config, dev)
    elif config.format == "torch_export":
        from slimtorch.models import load_exported

        runner = TorchRunner(load_exported(path, device=dev), config, dev)
    else:
        runner = OnnxRunner(path, config, dev)
    batch = config.max_batch_size if on_gpu else min(2, config.max_batch_size)
    try:
        shapes = _warm_shapes(config, batch, trained)
        warm = sum(math.prod(shape) * s.dtype.itemsize for s, shape in shapes)
        if warm > (admitted := estimate_memory(version_dir, config)):
            raise ModelLoadError(
                f"the warm-up batch of model {config.name!r} needs {warm} bytes of inputs alone, "
                f"more than the {admitted} bytes it is admitted with (its memory_bytes, or the "
                "estimate); fix the model's input shape, memory_bytes or max_batch_size"
            )
        check_outputs(runner, config, batch, trained)
    except ModelLoadError:
        runner.close()
        raise
    if on_gpu and config.format != "onnx":
        runner.memory_bytes = max(torch.cuda.max_memory_allocated(dev) - base, 1)
    logger.info(
        "loaded %s (%s) from %s on %s: %d bytes",
        config.name,
        config.format,
        version_dir,
        device,
        runner.memory_bytes,
    )
    return runner


def _warm_dims(dims: tuple[int, ...], trained: tuple[int, ...] | None) -> list[int]:
    """``dims`` with each dynamic size taken from ``trained`` (same rank), else 1."""
    same = trained is not None and len(trained) == len(dims)
    return [d if d > 0 else (trained[i] if same and trained else 1) for i, d in enumerate(dims)]


def _warm_shapes(
    config: ModelConfig, batch: int, trained: tuple[int, ...] | None
) -> list[tuple[TensorSpec, tuple[int, ...]]]:
    """Each input with its warm-up shape (see :func:`check_outputs`)."""
    one = len(config.inputs) == 1 and trained is not None
    return [(s, (batch, *_warm_dims(s.dims, trained if one else None))) for s in config.inputs]


def check_outputs(
    runner: Runner, config: ModelConfig, batch: int, trained: tuple[int, ...] | None = None
) -> None:
    """Run zeros through ``runner`` and compare outputs with the config.

    A dynamic (``-1``) dimension is given the size of ``trained`` (the input shape a slimtorch
    model directory records) where the config has one input of that rank, else 1: a model
    whose pooling needs a few pixels takes the warm-up its training size fits.

    Raises:
        ModelLoadError: The model fails on inputs of the configured shape, or an output has
            another shape or datatype than configured.
    """
    shapes = _warm_shapes(config, batch, trained)
    inputs = {s.name: np.zeros(shape, dtype=s.dtype) for s, shape in shapes}
    try:
        outputs = runner.run(inputs)
    except ModelLoadError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        raise ModelLoadError(
            f"model {config.name!r} fails on inputs of the configured shapes "
            f"{[[-1, *s.dims] for s in config.inputs]} ({type(exc).__name__}: {exc}); fix the "
            "config's input dims or the model"
        ) from None
    for spec in config.outputs:
        got = list(outputs[spec.name].shape)
        want = [batch, *spec.dims]
        if len(got) != len(want) or any(w not in (-1, g) for w, g in zip(want, got, strict=True)):
            raise ModelLoadError(
                f"output {spec.name!r} of model {config.name!r} has shape {got} for a batch of "
                f"{batch}, the config says {[-1, *spec.dims]}; fix the config's output dims"
            )


def describe(path: Path) -> dict[str, Any]:
    """Size and modification time of a file or directory (for change detection)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = [path] if path.exists() else []
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in files}


def default_device(name: str) -> str:
    """Resolve ``auto`` and friends to a device string (CUDA/ROCm first, then CPU)."""
    from slimtorch.core.devices import resolve_device

    return str(resolve_device(name))


__all__ = [
    "FILES",
    "OnnxRunner",
    "Runner",
    "TorchRunner",
    "allowance_bytes",
    "check_outputs",
    "default_device",
    "describe",
    "estimate_memory",
    "int8_note",
    "load_runner",
    "model_path",
]
