"""Devices: what is here (CPU, CUDA, ROCm, MPS), how to name one, how to wait for one.

ROCm builds of PyTorch drive AMD GPUs through the ``torch.cuda`` API; ``torch.version.hip`` tells
the two apart, and :class:`DeviceInfo` reports such a device with ``kind="rocm"`` and its GFX
architecture (``gfx803`` for the RX 580). Nothing here touches CUDA at import: every query runs
when a function is called.

Example:
    >>> from slimtorch.core.devices import detect_devices, resolve_device
    >>> [d.device for d in detect_devices()]  # the CPU, then any GPU ('cuda:0', ..., 'mps')
    ['cpu'...]
    >>> dev = resolve_device("auto")  # cuda:0 where there is a GPU, else mps, else the CPU
    >>> str(dev) in [d.device for d in detect_devices()]
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import os
import platform
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import torch

logger = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

DeviceKind = Literal["cpu", "cuda", "rocm", "mps"]

_MEMINFO = Path("/proc/meminfo")
_CPUINFO = Path("/proc/cpuinfo")


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """One compute device and what it can do.

    Attributes:
        kind: ``"cpu"``, ``"cuda"`` (NVIDIA), ``"rocm"`` (AMD through a HIP build) or ``"mps"``.
        index: Device index (0 for the CPU and MPS).
        device: The ``torch.device`` string to pass to ``.to()`` (ROCm devices are ``"cuda:i"``).
        name: Marketing or CPU model name.
        total_memory_bytes: Device memory (system RAM for the CPU); 0 where unknown.
        free_memory_bytes: Free memory now (``MemAvailable`` for the CPU), ``None`` where unknown.
        compute_capability: ``"major.minor"`` for CUDA/ROCm devices, else ``None``.
        gfx_arch: AMD GFX architecture (``"gfx803"``) on ROCm builds, else ``None``.
        supports_fp16: The hardware has native fp16 arithmetic (for the CPU: AVX512-FP16 or
            AMX-FP16; PyTorch still runs fp16 on other CPUs, slowly).
        supports_bf16: The hardware has native bf16 arithmetic.
        cpu_count: Logical CPUs this process may use (CPU only, else ``None``).
        threads: ``torch.get_num_threads()`` now (CPU only, else ``None``).
        multiprocessors: Streaming multiprocessors / compute units (GPU only, else ``None``).
        torch_version: ``torch.__version__``.
        backend_version: CUDA or HIP runtime version of the torch build, else ``None``.
    """

    kind: DeviceKind
    index: int
    device: str
    name: str
    total_memory_bytes: int
    free_memory_bytes: int | None
    compute_capability: str | None = None
    gfx_arch: str | None = None
    supports_fp16: bool = False
    supports_bf16: bool = False
    cpu_count: int | None = None
    threads: int | None = None
    multiprocessors: int | None = None
    torch_version: str = torch.__version__
    backend_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return dataclasses.asdict(self)


def read_meminfo() -> dict[str, int]:
    """Fields of ``/proc/meminfo`` in bytes (empty where the file does not exist).

    Example:
        >>> read_meminfo().get("MemAvailable", 0) > 0
        True
    """
    try:
        text = _MEMINFO.read_text()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            out[key.strip()] = int(parts[0]) * scale
    return out


def _cpu_name_and_flags() -> tuple[str, set[str]]:
    name, flags = "", set[str]()
    try:
        for line in _CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model Name", "Hardware") and not name:
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
            if name and flags:
                break
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "cpu", flags


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_info() -> DeviceInfo:
    name, flags = _cpu_name_and_flags()
    mem = read_meminfo()
    total = mem.get("MemTotal", 0)
    if total == 0 and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceInfo(
        kind="cpu",
        index=0,
        device="cpu",
        name=name,
        total_memory_bytes=int(total),
        free_memory_bytes=mem.get("MemAvailable"),
        supports_fp16=bool(flags & {"avx512_fp16", "amx_fp16"}),
        supports_bf16=bool(flags & {"avx512_bf16", "amx_bf16"}),
        cpu_count=_usable_cpus(),
        threads=torch.get_num_threads(),
    )


# ROCm architectures with native bf16 arithmetic (CDNA 1+, RDNA 3+).
_ROCM_BF16_PREFIXES = ("gfx908", "gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")


def _gfx_arch(props: Any) -> str | None:
    # "gfx803" or "gfx90a:sramecc+:xnack-": keep the architecture only
    return str(getattr(props, "gcnArchName", "") or "").split(":")[0] or None


def native_bf16(index: int) -> bool:
    """Whether CUDA/ROCm GPU ``index`` computes in bfloat16 natively.

    Not ``torch.cuda.is_bf16_supported()``: that answers whether bfloat16 tensors can be made at
    all, which is true on any ROCm GPU and, by emulation, on NVIDIA GPUs before Ampere, so it
    says yes for the RX 580 (gfx803) and the GTX 1060 (sm_61), where bfloat16 runs emulated or
    not at all.

    Example (on a machine with a GPU; an RX 580 answers ``False``, an H100 ``True``)::

        use_bf16 = native_bf16(torch.cuda.current_device())
    """
    props = torch.cuda.get_device_properties(index)
    if torch.version.hip:
        gfx = _gfx_arch(props)
        return gfx is not None and gfx.startswith(_ROCM_BF16_PREFIXES)
    return int(props.major) >= 8


# ROCm architectures Triton's AMD backend (inductor's GPU code generator) supports: CDNA and
# RDNA 3 and later. Older ones (the RX 580's gfx803, gfx900, gfx906, RDNA 2) are not supported.
_ROCM_TRITON_PREFIXES = _ROCM_BF16_PREFIXES


def compile_problem(device: str | torch.device) -> str | None:
    """Why ``torch.compile`` (inductor: C++ for the CPU, Triton kernels for GPUs) cannot compile
    for ``device``, or ``None`` where it can or where the device is neither the CPU nor a
    CUDA/ROCm GPU.

    Inductor fails without a C++ compiler (Windows without MSVC, macOS without its command-line
    tools) and refuses NVIDIA GPUs below compute capability 7.0 (the GTX 1060 is 6.1) only when it
    generates code, after tracing; on ROCm it lets every GPU through to Triton, whose AMD backend
    supports only CDNA and RDNA 3 and later. Callers check first, so a run does not fail after
    its work is done.

    Example:
        >>> compile_problem("meta") is None
        True
    """
    device = as_device(device)
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except ImportError:  # another torch layout: let inductor say
            return None
        except Exception as exc:  # InvalidCxxCompiler, or a check of its own on Windows
            return f"inductor's CPU code needs a C++ compiler, and none was found ({exc!r})"
        return None
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    if torch.version.hip:
        gfx = _gfx_arch(props)
        if gfx is None or not gfx.startswith(_ROCM_TRITON_PREFIXES):
            return (
                f"Triton's AMD backend does not support {props.name} ({gfx or 'unknown arch'}); "
                "it supports CDNA and RDNA 3 or newer GPUs"
            )
    elif int(props.major) < 7:
        return (
            f"inductor's Triton kernels need compute capability 7.0 or newer; {props.name} has "
            f"{props.major}.{props.minor}"
        )
    from torch.utils._triton import has_triton_package

    if not has_triton_package():
        return "the triton package is not installed"
    return None


def _gpu_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    hip = torch.version.hip
    major, minor = int(props.major), int(props.minor)
    gfx = _gfx_arch(props) if hip else None
    free: int | None = None
    total = int(props.total_memory)
    try:
        free_b, total_b = torch.cuda.mem_get_info(index)
        free, total = int(free_b), int(total_b)
    except RuntimeError as exc:  # pragma: no cover - depends on the driver
        logger.debug("mem_get_info(%d) failed: %s", index, exc)
    # every GCN/CDNA/RDNA GPU has 16-bit ALU instructions
    fp16 = True if hip else (major, minor) >= (5, 3)
    bf16 = native_bf16(index)
    return DeviceInfo(
        kind="rocm" if hip else "cuda",
        index=index,
        device=f"cuda:{index}",
        name=str(props.name),
        total_memory_bytes=total,
        free_memory_bytes=free,
        compute_capability=f"{major}.{minor}",
        gfx_arch=gfx,
        supports_fp16=fp16,
        supports_bf16=bf16,
        multiprocessors=int(props.multi_processor_count),
        backend_version=hip or torch.version.cuda,
    )


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _mps_info() -> DeviceInfo:
    total = 0
    with contextlib.suppress(Exception):
        total = int(torch.mps.recommended_max_memory())
    return DeviceInfo(
        kind="mps",
        index=0,
        device="mps",
        name=f"Apple {platform.machine()} GPU (MPS)",
        total_memory_bytes=total,
        free_memory_bytes=None,
        supports_fp16=True,
        supports_bf16=True,
    )


def detect_devices() -> list[DeviceInfo]:
    """Every device torch can use here: the CPU first, then each CUDA/ROCm GPU, then MPS.

    Querying a GPU creates its CUDA/HIP context, so this is never called at import.

    Example:
        >>> devices = detect_devices()
        >>> devices[0].kind
        'cpu'
    """
    devices = [_cpu_info()]
    if torch.cuda.is_available():
        devices.extend(_gpu_info(i) for i in range(torch.cuda.device_count()))
    if _mps_available():
        devices.append(_mps_info())
    return devices


_SPEC_HELP = "expected 'auto', 'cpu', 'cuda', 'cuda:<i>', 'rocm', 'rocm:<i>' or 'mps'"


def as_device(device: str | torch.device) -> torch.device:
    """Parse ``device``, raising ``ValueError`` (not torch's ``RuntimeError``) when malformed.

    Example:
        >>> as_device("cuda:1").index
        1
    """
    if not isinstance(device, str | torch.device):  # torch.device(0) means an accelerator
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be like 'cpu', 'cuda' or 'cuda:1', got {device!r} ({exc})"
        ) from None


def resolve_device(spec: str | torch.device = "auto", *, any_index: bool = False) -> torch.device:
    """Turn a device spec into an available ``torch.device``.

    ``"auto"`` picks ``cuda:0`` when a CUDA/ROCm GPU is present, then MPS, else the CPU.
    ``"rocm"`` is an alias of ``"cuda"`` (ROCm builds use the CUDA device type). ``"cuda"`` with
    no index becomes the current CUDA device.

    Args:
        spec: ``"auto"``, a device string or a ``torch.device``.
        any_index: Take a CUDA index without checking it against the devices this process
            sees. For data-parallel runs, where each process is given its GPU (its
            ``LOCAL_RANK``, often as the only visible device) and the caller maps it.

    Returns:
        The device, with an explicit index for CUDA.

    Raises:
        TypeError: ``spec`` is neither a string nor a ``torch.device``.
        ValueError: the spec is malformed or names a device that is not available here.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if not isinstance(spec, str | torch.device):
        raise TypeError(f"device must be a str or torch.device, got {type(spec).__name__}")
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", 0)
            if _mps_available():
                return torch.device("mps")
            return torch.device("cpu")
        if text == "rocm" or text.startswith("rocm:"):
            text = "cuda" + text[4:]
        try:
            dev = torch.device(text)
        except (RuntimeError, ValueError):
            raise ValueError(f"invalid device {spec!r}; {_SPEC_HELP}") from None
    else:
        dev = spec
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {spec!r} asked for a CUDA/ROCm GPU but torch "
                f"{torch.__version__} sees none; use 'cpu' or 'auto', or install a CUDA/ROCm build"
            )
        if any_index and dev.index is not None:
            return torch.device("cuda", dev.index)
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if not 0 <= index < count:
            raise ValueError(
                f"device {spec!r} does not exist: {count} CUDA/ROCm device(s) here, indices "
                f"0..{count - 1}; pick one of those"
            )
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not _mps_available():
            raise ValueError(
                f"device {spec!r} asked for MPS, which is not available here; use 'cpu' or 'auto'"
            )
        return torch.device("mps")
    raise ValueError(f"unsupported device {spec!r}; {_SPEC_HELP}")


def synchronize(device: str | torch.device) -> None:
    """Wait until every queued kernel on ``device`` has finished (a no-op on the CPU).

    Example:
        >>> synchronize("cpu")
    """
    dev = as_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[int]:
    """Run the body with ``torch.set_num_threads(n)``, restoring the previous count after.

    ``None`` keeps the current count. Yields the thread count in force.

    Example:
        >>> with cpu_threads(1) as n:
        ...     assert torch.get_num_threads() == n == 1
    """
    previous = torch.get_num_threads()
    if n is None:
        yield previous
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int or None, got {n!r}")
    torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def kept_rng() -> Iterator[None]:
    """Run the body without moving the process's torch generators (the CPU's, and each CUDA
    device's once CUDA is initialised): layers a transform builds and then overwrites, or a
    timed dropout, would otherwise shift every random draw the caller makes afterwards.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> expected = torch.rand(1)
        >>> _ = torch.manual_seed(0)
        >>> with kept_rng():
        ...     _ = torch.nn.Linear(64, 64)  # its initial weights draw from the generator
        >>> torch.equal(torch.rand(1), expected)
        True
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def keeps_rng(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate ``fn`` to run under :func:`kept_rng`.

    Example:
        >>> keeps_rng(lambda: torch.rand(1))().shape
        torch.Size([1])
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with kept_rng():
            return fn(*args, **kwargs)

    return wrapper


def run_info(device: str | torch.device, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Where and how a benchmark ran, for its JSON record.

    Returns the command line (``argv``, default ``sys.argv``, shell-quoted), the UTC date,
    the device and its name (the GPU's, or the CPU model), the torch version and the CPU
    thread count in force.

    Example:
        >>> sorted(run_info("cpu", ["bench.py", "--x", "1"]))
        ['command', 'date', 'device', 'device_name', 'threads', 'torch']
    """
    dev = as_device(device)
    if isinstance(argv, str):  # would be split into characters
        raise TypeError(f"argv must be a list of arguments, got the string {argv!r}")
    args = list(sys.argv if argv is None else argv)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = _cpu_name_and_flags()[0]
    return {
        "command": "python " + shlex.join(args),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": str(dev),
        "device_name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
