"""Build and load the fused Tucker-2 CPU kernel (``kernels/tucker_block.c``).

The kernel is plain C (vector extensions, optional OpenMP) compiled on first use with the
machine's C compiler for the CPU it runs on (``-march=native``), then cached. It is loaded with
``ctypes``: no PyTorch headers, no build step at install time, and a machine without a compiler
simply runs the library convolutions instead (:func:`kernel_status` says why).

Environment:
    ``SLIMTORCH_CC``: the compiler (default ``cc``).
    ``SLIMTORCH_CACHE``: cache folder (default ``~/.cache/slimtorch``); the library is kept under
        ``native/`` keyed by a hash of the source, the flags, the compiler's version and the CPU.
    ``SLIMTORCH_NO_NATIVE=1``: never build or load it.

Example:
    >>> status = kernel_status()  # builds on first call where a compiler exists
    >>> status.available in (True, False) and isinstance(status.detail, str)
    True
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from importlib import resources
from pathlib import Path

from slimtorch.core.io import scratch_dir

logger = logging.getLogger(__name__)

SOURCE = "tucker_block.c"
SYMBOL = "slimtorch_tucker_block"
# tried in order: the first set that compiles is used
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)
_BASE_FLAGS = ("-shared", "-fPIC", "-std=gnu11")


@dataclasses.dataclass(frozen=True)
class KernelStatus:
    """Whether the fused kernel can run here, and the library path or the reason it cannot."""

    available: bool
    detail: str


def cache_dir() -> Path:
    """Where built kernels are kept: ``$SLIMTORCH_CACHE/native``, else
    ``~/.cache/slimtorch/native``."""
    root = os.environ.get("SLIMTORCH_CACHE") or Path.home() / ".cache" / "slimtorch"
    return Path(root) / "native"


def _cpu_signature() -> str:
    """The CPU model and feature flags (what ``-march=native`` compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"C compiler {cc!r} not usable ({exc})") from None
    if out.returncode != 0:
        raise RuntimeError(f"C compiler {cc!r} --version failed: {out.stderr.strip()[:200]}")
    return out.stdout


def _build(source: bytes, cc: str, target_dir: Path) -> Path:
    """Compile ``source`` into ``target_dir`` (atomically) and return the library path."""
    version = _compiler_version(cc)
    errors = []
    for flags in FLAG_SETS:
        parts = [source, " ".join(flags).encode(), version.encode(), _cpu_signature().encode()]
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
        lib = target_dir / f"tucker_block-{key}.so"
        if lib.is_file():
            return lib
        target_dir.mkdir(parents=True, exist_ok=True)
        with scratch_dir(lib) as tmp:  # (what a killed build left is swept first)
            src = tmp / SOURCE
            src.write_bytes(source)
            out = tmp / lib.name
            cmd = [cc, *flags, *_BASE_FLAGS, str(src), "-o", str(out)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{' '.join(flags)}: {exc}")
                continue
            if proc.returncode != 0:
                errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[:300]}")
                continue
            os.replace(out, lib)  # atomic: a concurrent build of the same key writes the same file
        logger.info("built the fused Tucker kernel with %s %s", cc, " ".join(flags))
        return lib
    raise RuntimeError("compiling the fused Tucker kernel failed: " + " | ".join(errors))


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    fn = getattr(lib, SYMBOL)
    i, p = ctypes.c_int, ctypes.c_void_p
    # x, N, C, H, W, u, r1, k, r2, kh, kw, sh, sw, ph, pw, dh, dw, v, bias, CO, y, res, relu,
    # threads
    fn.argtypes = [p, i, i, i, i, p, i, p, i, i, i, i, i, i, i, i, i, p, p, i, p, p, i, i]
    fn.restype = i
    # a layer's packed weights for one input size, built once (see FusedTuckerConv2d): C, H, W,
    # u, r1, k, r2, kh, kw, sh, sw, ph, pw, dh, dw, v, bias, CO -> plan (NULL: out of memory)
    lib.slimtorch_tucker_plan.argtypes = [i, i, i, p, i, p, i, i, i, i, i, i, i, i, i, p, p, i]
    lib.slimtorch_tucker_plan.restype = p
    # plan, x, N, y, res, relu, threads
    lib.slimtorch_tucker_run.argtypes = [p, p, i, p, p, i, i]
    lib.slimtorch_tucker_run.restype = i
    lib.slimtorch_tucker_free.argtypes = [p]
    lib.slimtorch_tucker_free.restype = None
    return lib


_LOAD_LOCK = threading.Lock()  # threads asking at once build once (8 threads built 8 times)


def _load() -> tuple[ctypes.CDLL | None, str]:
    with _LOAD_LOCK:
        return _load_once()


@functools.cache
def _load_once() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("SLIMTORCH_NO_NATIVE", "") not in ("", "0"):
        return None, "disabled by SLIMTORCH_NO_NATIVE"
    cc = os.environ.get("SLIMTORCH_CC", "cc")
    if shutil.which(cc) is None:
        return None, f"no C compiler {cc!r} on PATH (set SLIMTORCH_CC)"
    source = resources.files("slimtorch.decompose").joinpath("kernels", SOURCE).read_bytes()
    try:
        path = _build(source, cc, cache_dir())
        return _bind(path), str(path)
    except (RuntimeError, OSError, AttributeError) as exc:
        logger.warning("fused Tucker kernel unavailable, using library convolutions: %s", exc)
        return None, str(exc)


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot be built (see :func:`kernel_status`)."""
    return _load()[0]


def kernel_status() -> KernelStatus:
    """Build (once per process, cached on disk) and report whether the kernel is usable."""
    lib, detail = _load()
    return KernelStatus(lib is not None, detail)
