"""Project exceptions. Bad arguments raise ``ValueError``/``TypeError``; the rest raise these.

Every message says what was wrong, what was expected, and what to do.
"""

from __future__ import annotations


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
