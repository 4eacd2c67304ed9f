"""Project exceptions. Bad arguments raise ``ValueError``/``TypeError``; the rest raise these.

Every message says what was wrong, what was expected, and what to do.
"""

from __future__ import annotations

import re


class SlimtorchError(Exception):
    """Base class of every slimtorch-specific error."""


class DataError(SlimtorchError):
    """A dataset could not be read."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The dataset files are not where slimtorch looked, and could not be downloaded."""


class ChecksumError(DataError):
    """A file's checksum differs from the published one (corrupt or truncated download)."""


class DataFormatError(DataError):
    """A file is not in the format its name promises (bad magic number, short payload...)."""


class ModelLoadError(SlimtorchError):
    """A saved model directory or exported program could not be loaded."""


class RegistryError(SlimtorchError, KeyError):
    """A registry key was registered twice."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CheckpointError(SlimtorchError):
    """A training checkpoint is missing, corrupt or does not match the run."""


class TransformSkipError(SlimtorchError):
    """A transform was run with ``strict=True`` and skipped one or more layers."""


class DecompositionError(SlimtorchError):
    """A tensor decomposition failed (NaN/Inf, divergence or no convergence within its budget)."""


def is_onnxruntime_error(exc: BaseException) -> bool:
    """Whether ``exc`` is one of ONNX Runtime's own errors (``Fail``, ``RuntimeException``,
    ``InvalidArgument`` ...), which derive from ``Exception`` only.

    Example:
        >>> is_onnxruntime_error(ValueError("x"))
        False
    """
    return type(exc).__module__.startswith("onnxruntime")


ONE_VALUE_ERROR = "Expected more than 1 value per channel when training"
"""How torch's batch norm refuses a training batch with one value per channel."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation: torch on a CPU or GPU, ONNX Runtime, Python.

    Read from the type name and message, so that torch need not be imported.

    Example:
        >>> is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
        True
        >>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
        True
    """
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return any(
        s in text
        for s in (
            "out of memory",
            "failed to allocate memory",
            "can't allocate memory",
            "cannot allocate memory",  # ENOMEM's text (safetensors: "(os error 12)")
        )
    )


EXTRAS = {
    "sklearn": "data", "PIL": "data",
    "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve",
    "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx",
    "torchao": "quant",
}  # fmt: skip
"""The optional dependencies by top-level module, and the ``slimtorch[...]`` extra of each."""


def install_hint(module: str) -> str:
    """How to install the optional dependency that provides ``module`` (its extra).

    Example:
        >>> install_hint("uvicorn.config")
        "pip install 'slimtorch[serve]'"
        >>> install_hint("somewhere_else")
        'pip install somewhere_else'
    """
    top = module.split(".")[0]
    return f"pip install 'slimtorch[{EXTRAS[top]}]'" if top in EXTRAS else f"pip install {top}"


def require_modules(*modules: str, purpose: str) -> None:
    """Raise ``ImportError`` naming the extra to install unless every module can be imported.

    Example:
        >>> require_modules("json", purpose="reading reports")
        >>> require_modules("onnx_not_here", purpose="a test")
        Traceback (most recent call last):
        ...
        ImportError: a test needs onnx_not_here, which is not installed: pip install onnx_not_here
    """
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"{purpose} needs {', '.join(missing)}, which is not installed: "
            f"{install_hint(missing[0])}",
            name=missing[0],
        )


def missing_module_message(exc: ImportError) -> str:
    """``exc``'s message, with the install command when it names a module and has none.

    Example:
        >>> missing_module_message(ModuleNotFoundError("No module named 'onnx'", name="onnx"))
        "No module named 'onnx'; install it with pip install 'slimtorch[onnx]'"
    """
    text = str(exc)
    if exc.name and "pip install" not in text:
        text += f"; install it with {install_hint(exc.name)}"
    return text


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException) -> str:
    r"""The first non-blank line of an error's message, terminal colour codes removed.

    Example:
        >>> first_line(RuntimeError("\x1b[96mstep 3/3\x1b[0m failed\nmore"))
        'step 3/3 failed'
    """
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    return lines[0] if lines else ""
