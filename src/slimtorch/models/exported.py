"""Users' own models as ``torch.export`` programs (``.pt2`` archives), loaded without pickle.

What ``torch.export.load`` unpickles (read in torch 2.13, ``torch/export/__init__.py`` and
``torch/export/pt2_archive/_package.py``, ``torch/_export/serde/serialize.py``):

* weights and constants flagged ``use_pickle`` in ``data/weights/*_weights_config.json`` /
  ``data/constants/*_constants_config.json`` (tensor subclasses) go through
  ``torch.load`` with ``weights_only=False``, i.e. the full unpickler;
* ``data/constants/custom_obj_*`` (TorchBind objects) go through torch's C++ pickle reader
  and ``data/constants/opaque_obj_*`` through the ``pickle`` module's ``loads``;
* ``data/sample_inputs/*.pt`` goes through ``torch.load(weights_only=True)`` and, if that fails,
  **falls back to** ``weights_only=False``;
* legacy archives (``data/weights/<model>.pt`` or ``data/constants/<model>.pt``, for every
  program ``models/<model>.json`` in the archive, which may be named ``weight_*`` or
  ``tensor_*`` like a plain payload file; or the pre-2.7 zip layout with a top-level
  ``version`` and ``serialized_*.pt`` files) are unpickled the same way, and an archive that
  fails to parse as a new one is retried as a legacy one;
* ``data/aotinductor/`` holds compiled shared libraries that are loaded (native code).

Plain weights (``use_pickle: false``) are raw bytes and the program itself is JSON. So
:func:`load_exported` reads the archive into memory once, accepts only entries of the plain
layout (JSON program, raw weights and tensor constants, extra text files), refuses any entry
flagged for pickle, checks the sample inputs with the weights-only unpickler itself (so torch
never reaches its fallback), and then hands the same bytes to ``torch.export.load``.
"""

from __future__ import annotations

import fnmatch
import importlib
import io
import json
import logging
import os
import re
import threading
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from slimtorch.core.devices import resolve_device
from slimtorch.core.errors import ModelLoadError
from slimtorch.core.io import atomic_write
from slimtorch.core.surgery import kept_modes, refuse_sparse_kernels
from slimtorch.models.pt2_program import program_problem

logger = logging.getLogger(__name__)

#: Archive entries (below the archive's root folder) that load without the full unpickler.
_ALLOWED = (
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    "models/*.json",
    "data/weights/weight_*",
    "data/weights/*_weights_config.json",
    "data/constants/tensor_*",
    "data/constants/*_constants_config.json",
    "data/sample_inputs/*.pt",
    "extra/*",
)


def _refuse(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is refused: {why}. slimtorch never unpickles user files; re-export the model "
        "with plain tensors (no tensor subclasses, TorchBind or opaque objects) using "
        "slimtorch.models.save_exported or torch.export.save from torch >= 2.7"
    )


def _check_archive(path: Path, data: bytes) -> None:
    """Refuse anything but the plain layout, as Python's zip reader and as torch's own reader
    (the one ``torch.export.load`` reads through) each see the archive: two readers can
    disagree on a crafted file (duplicate entry names: each may pick another copy)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} is not a torch.export archive (not a zip file: {exc}); pass a file "
            "written by torch.export.save"
        ) from None
    entries: dict[str, str] = {}
    names: list[str] = []
    roots = set()
    for info in infos:
        if info.is_dir():
            continue
        root, sep, rest = info.filename.partition("/")
        if not sep:
            raise _refuse(path, f"top-level entry {info.filename!r} (legacy pickled layout)")
        roots.add(root)
        entries[rest] = info.filename
        names.append(rest)
    if len(roots) != 1:
        raise _refuse(path, f"expected one archive root folder, found {sorted(roots)}")
    try:  # torch's reader checks no CRC: a flipped bit in a weight would load as another value
        bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        bad = f"? ({exc})"
    if bad is not None:
        raise ModelLoadError(
            f"{path} is corrupt: its entry {bad!r} does not match its stored CRC (a damaged disk "
            "or copy); export the model again"
        )
    _check_entries(path, names, lambda name: archive.read(entries[name]))
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = list(reader.get_all_records())
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is not an archive torch can read ({exc}); pass a file written by "
            "torch.export.save"
        ) from None
    _check_entries(path, records, reader.get_record)


def _check_entries(path: Path, names: list[str], read: Callable[[str], bytes]) -> None:
    """The checks of :func:`_check_archive` on one reader's view: entry names below the root
    folder, and ``read(name)`` for an entry's bytes."""
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise _refuse(path, f"entry {twice[0]!r} appears more than once (a crafted archive)")
    for name in names:
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in _ALLOWED):
            raise _refuse(path, f"entry {name!r} is not part of the plain (pickle-free) layout")
    if "archive_format" not in names or read("archive_format") != b"pt2":
        raise ModelLoadError(
            f"{path} lacks the 'pt2' archive_format marker; pass a file written by "
            "torch.export.save"
        )
    if "models/model.json" not in names:
        raise ModelLoadError(
            f"{path} holds no program named 'model'; save it with torch.export.save(ep, path)"
        )
    # torch loads every program in models/ and, for each, unpickles data/weights/<name>.pt and
    # data/constants/<name>.pt if present (the legacy layout) instead of reading its configs:
    # a program named weight_x or tensor_x would slip its pickle past the name patterns above
    for name in names:
        if not (name.startswith("models/") and name.endswith(".json")):
            continue
        try:  # loading runs the strings it names through eval and exec: see pt2_program
            problem = program_problem(json.loads(read(name)))
        except (ValueError, RecursionError) as exc:
            why = type(exc).__name__
            raise ModelLoadError(f"{path}: {name} is not valid JSON ({why})") from None
        if problem is not None:
            raise ModelLoadError(
                f"{path} is refused: {name} {problem}. torch.export.load would evaluate it as "
                "Python; slimtorch loads programs of registered operators and size arithmetic"
            )
        program = name[len("models/") : -len(".json")]
        for legacy in (f"data/weights/{program}.pt", f"data/constants/{program}.pt"):
            if legacy in names:
                raise _refuse(path, f"entry {legacy!r} holds the pickled payload of program "
                                    f"{program!r} (legacy layout)")  # fmt: skip
        for config in (f"data/weights/{program}_weights_config.json",
                       f"data/constants/{program}_constants_config.json"):  # fmt: skip
            if config not in names:
                raise _refuse(path, f"program {program!r} has no {config!r} (legacy layout)")
    for name in names:
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            try:
                config = json.loads(read(name))["config"]
                items = list(config.items())
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
                raise ModelLoadError(f"{path}: {name} is malformed ({exc!r})") from None
            for key, meta in items:
                if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
                    raise _refuse(path, f"{name} stores {key!r} as a pickle")
                if not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                    raise _refuse(path, f"{name} stores {key!r} as a non-tensor object")
        elif name.startswith("data/sample_inputs/"):
            try:
                torch.load(io.BytesIO(read(name)), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise _refuse(
                    path, f"{name} needs more than the weights-only unpickler ({exc})"
                ) from None


def load_exported(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> nn.Module:
    """Load a ``torch.export.save`` archive as a callable module, never unpickling it.

    The archive is checked first (see the module docstring for what ``torch.export.load``
    would unpickle and how it is avoided). The returned module is the program's
    ``ExportedProgram.module()``: it runs as exported (in eval mode if exported in eval mode)
    and does not support ``.train()``/``.eval()``.

    Args:
        path: The ``.pt2`` file.
        device: Where to move the module's parameters and buffers.

    Returns:
        The exported program as an ``nn.Module``.

    Raises:
        ModelLoadError: The file is missing, is not a plain torch.export archive, would need
            the pickle unpickler, or fails to deserialise.

    Example:
        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        >>> _ = save_exported(model, torch.randn(2, 1, 28, 28), d / "model.pt2")
        >>> module = load_exported(d / "model.pt2")
        >>> module(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 10])
        >>> torch.save(model, d / "model.pt")  # a pickle: refused, never unpickled
        >>> load_exported(d / "model.pt")
        Traceback (most recent call last):
        ...
        slimtorch.core.errors.ModelLoadError: ...model.pt is refused: entry 'data.pkl' is not ...
    """
    path = Path(path)
    dev = resolve_device(device)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(
            f"cannot read exported program {path} ({exc}); pass an existing .pt2 file"
        ) from None
    _check_archive(path, data)
    _register_custom_ops()
    with _TorchExportLog() as said:
        try:
            with warnings.catch_warnings():
                # Some torch versions warn that weights viewing the in-memory archive are
                # read-only buffers; the archive bytes are private to this call: harmless.
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                program = torch.export.load(io.BytesIO(data))
            module = program.module()
        except Exception as exc:
            # torch logs the operator it cannot resolve, then raises a generic error
            texts = said.texts()
            op = re.search(r"torch\.ops\.[\w.]+", " ".join([str(exc), *texts]))
            said.drop()  # the error below says it; no torch traceback on the console
            if op is not None:
                raise ModelLoadError(
                    f"{path} calls the operator {op.group(0)}, which is not registered in this "
                    "process; import the module that defines it before loading"
                ) from exc
            cause = texts[-1] if texts else str(exc)  # torch logs the cause, raises a generic one
            raise ModelLoadError(
                f"{path} could not be deserialised by torch {torch.__version__} ({cause}); "
                "export it again with this torch version"
            ) from exc
    return module.to(dev)


class _TorchExportLog(logging.Handler):
    """Hold what the ``torch.export`` logger says while a program loads; pass it on afterwards
    unless :meth:`drop` was called (the load failed and the error says it all)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._log = logging.getLogger("torch.export")

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def texts(self) -> list[str]:
        out = []
        for r in self.records:
            out.append(r.getMessage())
            if r.exc_info and r.exc_info[1] is not None:
                out.append(str(r.exc_info[1]))
        return out

    def drop(self) -> None:
        self.records.clear()

    _LOCK = threading.Lock()  # one load at a time swaps the logger's handlers (server threads)

    def __enter__(self) -> _TorchExportLog:
        self._LOCK.acquire()
        self._propagate = self._log.propagate
        self._handlers = self._log.handlers[:]  # torch's own console handler among them
        for handler in self._handlers:
            self._log.removeHandler(handler)
        self._log.addHandler(self)
        self._log.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._log.removeHandler(self)
            for handler in self._handlers:
                self._log.addHandler(handler)
            self._log.propagate = self._propagate
        finally:
            self._LOCK.release()
        for record in self.records:
            self._log.handle(record)


CUSTOM_OP_MODULES = ("slimtorch.decompose.fused_op",)
"""Modules that define slimtorch's own operators (``torch.ops.slimtorch.*``). A program exported
from a model that uses them (a ``fuse-tucker`` model) names the operators, and loading it in a
fresh process needs them registered first."""


def _register_custom_ops() -> None:
    for name in CUSTOM_OP_MODULES:
        importlib.import_module(name)


def save_exported(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` with ``torch.export`` (in eval mode) and save it atomically.

    The model is traced in eval mode (BatchNorm uses running statistics, Dropout is off) and
    put back in its previous mode afterwards. With ``dynamic_batch`` the first dimension may
    vary at run time; a batch of one in ``example_input`` is repeated to two for tracing,
    since torch.export specialises dimensions of size 1.

    Args:
        model: Any exportable module.
        example_input: One example input tensor, batch first.
        path: Output file (``.pt2`` by convention).
        dynamic_batch: Let the batch size vary.

    Returns:
        The written path.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "lenet.pt2"
        >>> model = create_model("lenet5", in_channels=1, input_size=28)
        >>> save_exported(model, torch.randn(1, 1, 28, 28), path)
        PosixPath('.../lenet.pt2')
        >>> load_exported(path)(torch.randn(3, 1, 28, 28)).shape  # any batch size
        torch.Size([3, 10])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise ValueError("example_input must be a tensor with a batch dimension")
    refuse_sparse_kernels(model, "torch.export")
    with kept_modes(model):
        x = example_input
        dynamic_shapes = None
        if dynamic_batch:
            if x.shape[0] == 1:
                x = x.repeat(2, *([1] * (x.dim() - 1)))
            dynamic_shapes = ({0: torch.export.Dim.DYNAMIC},)
        program = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)

    def write(tmp: str) -> None:
        # through memory: torch's archive writer aborts the process when a write fails (a full
        # disk); Python's own write raises OSError instead
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())

    out = atomic_write(path, write)
    logger.debug("exported %s to %s", type(model).__name__, out)
    return out
