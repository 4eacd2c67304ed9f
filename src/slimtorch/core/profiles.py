"""Device profiles as data: the peak rates a roofline estimate divides by.

A :class:`DeviceProfile` holds a device's peak arithmetic rate per dtype, its memory bandwidth and
size, what its hardware accelerates, and a per-kernel launch overhead. The built-in GPU profiles
come from the vendors' datasheets (cited in ``source``); the ``cpu`` profile is measured on this
machine by :func:`measure_cpu_profile` the first time it is asked for.

``peak_flops[dtype]`` is the matmul/convolution rate a layer in that dtype actually gets, not the
best number on the box: the RX 580 has no packed FP16 (fp16 = fp32 rate) and no int8 dot product
(int8 at best the fp32 rate: int8 saves memory and bandwidth there, not arithmetic time).

Example:
    >>> from slimtorch.core.profiles import get_profile
    >>> p = get_profile("rx580")
    >>> p.peak_flops["fp16"] == p.peak_flops["fp32"], p.memory_bandwidth
    (True, 256000000000.0)
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from slimtorch.core.config import Config, check_range
from slimtorch.core.devices import _cpu_name_and_flags, cpu_threads, read_meminfo
from slimtorch.core.registry import Registry

logger = logging.getLogger(__name__)

#: dtype keys every profile's ``peak_flops`` must hold.
REQUIRED_DTYPES = ("fp32", "fp16", "bf16", "int8")

_DTYPE_KEYS = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int8: "int8",
    torch.uint8: "int8",
    torch.float64: "fp64",  # optional in a profile: the fp32 rate where it has none
}


def dtype_key(dtype: torch.dtype | str) -> str:
    """The ``peak_flops`` key for a dtype: fp32, fp16, bf16, int8 or fp64 (others map to fp32).

    Example:
        >>> dtype_key(torch.bfloat16)
        'bf16'
    """
    if not isinstance(dtype, str | torch.dtype):  # numpy types, None: not a silent fp32
        raise TypeError(f"dtype must be a torch.dtype or its name, got {dtype!r}")
    if isinstance(dtype, str):
        if dtype in (*REQUIRED_DTYPES, "fp64"):
            return dtype
        resolved = getattr(torch, dtype, None)  # "float16" -> torch.float16
        if not isinstance(resolved, torch.dtype):
            raise ValueError(
                f"unknown dtype name {dtype!r}; expected one of {REQUIRED_DTYPES} or a torch "
                "dtype name such as 'float16'"
            )
        dtype = resolved
    return _DTYPE_KEYS.get(dtype, "fp32")


class FrozenRates(dict[str, float]):
    """A read-only dict of peak rates: JSON- and ``dataclasses.asdict``-friendly, immutable."""

    def _read_only(self, *args: object, **kwargs: object) -> None:
        raise TypeError("DeviceProfile.peak_flops is read-only; build a new profile instead")

    __setitem__ = __delitem__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]
    __ior__ = _read_only  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self) -> tuple[type[FrozenRates], tuple[dict[str, float]]]:
        return (FrozenRates, (dict(self),))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceProfile(Config):
    """Peak rates of one device, for roofline estimates.

    Attributes:
        name: Registry key (``"rx580"``).
        description: One line naming the device.
        peak_flops: Matmul/conv rate per dtype key (``fp32``, ``fp16``, ``bf16``, ``int8``) in
            FLOP/s (OP/s for int8): the rate a layer in that dtype actually gets.
        memory_bandwidth: Device memory bandwidth in bytes/s.
        memory_bytes: Device memory in bytes.
        packed_fp16: Two fp16 operations per lane per clock (fp16 faster than fp32).
        int8_dot: A 4-way int8 dot-product instruction (dp4a, VNNI...).
        tensor_cores: Matrix units (tensor cores, matrix cores, AMX).
        launch_overhead_s: Fixed cost of one kernel launch in seconds.
        source: Where the figures come from (datasheet or ``measured on this machine <date>``).
    """

    name: str
    description: str
    peak_flops: Mapping[str, float]
    memory_bandwidth: float
    memory_bytes: int
    packed_fp16: bool = False
    int8_dot: bool = False
    tensor_cores: bool = False
    launch_overhead_s: float = 5e-6
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"DeviceProfile.name must be a non-empty str, got {self.name!r}")
        for text in ("description", "source"):
            if not isinstance(getattr(self, text), str):
                raise ValueError(f"DeviceProfile.{text} must be a str, got {getattr(self, text)!r}")
        for flag in ("packed_fp16", "int8_dot", "tensor_cores"):  # "false" would read as True
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(
                    f"DeviceProfile.{flag} must be true or false, got {getattr(self, flag)!r}"
                )
        if not isinstance(self.peak_flops, Mapping):
            raise TypeError(
                f"DeviceProfile.peak_flops must be a mapping of dtype key to FLOP/s, "
                f"got {type(self.peak_flops).__name__}"
            )
        missing = [k for k in REQUIRED_DTYPES if k not in self.peak_flops]
        if missing:
            raise ValueError(
                f"DeviceProfile {self.name!r}: peak_flops lacks {', '.join(missing)}; every "
                f"profile needs {', '.join(REQUIRED_DTYPES)} (give the fp32 rate where a dtype "
                "has no faster path)"
            )
        rates: dict[str, float] = {}
        for key, value in self.peak_flops.items():
            check_range(self, f"peak_flops[{key!r}]", value, low=0.0, low_inclusive=False)
            rates[str(key)] = float(value)
        object.__setattr__(self, "peak_flops", FrozenRates(rates))
        check_range(self, "memory_bandwidth", self.memory_bandwidth, low=0.0, low_inclusive=False)
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int):
            raise ValueError(
                f"DeviceProfile.memory_bytes must be an int, got {self.memory_bytes!r}"
            )
        check_range(self, "memory_bytes", self.memory_bytes, low=0)
        check_range(self, "launch_overhead_s", self.launch_overhead_s, low=0.0, high=1.0)

    def peak_rate(self, dtype: torch.dtype | str) -> float:
        """Matmul/conv rate in FLOP/s for ``dtype`` (unknown dtypes, and fp64 on a profile
        that gives no fp64 rate, get the fp32 rate).

        Example:
            >>> rx580 = get_profile("rx580")  # fp16 at the fp32 rate on Polaris
            >>> rx580.peak_rate(torch.float16) == rx580.peak_rate("fp32")
            True
        """
        key = dtype_key(dtype)
        return float(self.peak_flops.get(key, self.peak_flops["fp32"]))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        out = super().to_dict()
        out["peak_flops"] = dict(self.peak_flops)
        return out

    def __hash__(self) -> int:
        return hash((self.name, self.peak_flops, self.memory_bandwidth, self.source))


_PROFILES: Registry[Callable[[], DeviceProfile]] = Registry("device profile")


def register_profile(profile: DeviceProfile) -> DeviceProfile:
    """Add a profile under ``profile.name``; a duplicate name raises ``RegistryError``.

    Example:
        >>> toy = DeviceProfile(name="toy-gpu", description="a made-up GPU", memory_bytes=2**30,
        ...     peak_flops=dict(fp32=1e12, fp16=2e12, bf16=2e12, int8=4e12),
        ...     memory_bandwidth=1e11)
        >>> register_profile(toy) is get_profile("toy-gpu")
        True
        >>> register_profile(toy)
        Traceback (most recent call last):
        ...
        slimtorch.core.errors.RegistryError: device profile 'toy-gpu' is already registered; ...
    """
    if not isinstance(profile, DeviceProfile):
        raise TypeError(f"register_profile expects a DeviceProfile, got {type(profile).__name__}")
    _PROFILES.add(profile.name, lambda: profile)
    return profile


def get_profile(name: str | DeviceProfile) -> DeviceProfile:
    """The profile registered as ``name`` (``"cpu"`` is measured here on first use).

    A :class:`DeviceProfile` passed in is returned as is. Unknown names raise ``ValueError``
    listing the registered ones.

    Example:
        >>> get_profile("h100-sxm").memory_bandwidth
        3350000000000.0
    """
    if isinstance(name, DeviceProfile):
        return name
    if not isinstance(name, str):
        raise TypeError(f"profile name must be a str, got {type(name).__name__}")
    return _PROFILES.get(name)()


def list_profiles() -> list[str]:
    """Names of the registered profiles, sorted.

    Example:
        >>> "rx580" in list_profiles()
        True
    """
    return [str(n) for n in _PROFILES.names()]


# --------------------------------------------------------------------------------------------
# Datasheet profiles. Launch overheads are estimates of the host-side cost of one eager kernel
# launch (PyTorch dispatch plus driver), not datasheet figures.

_GB = 1e9
_GIB = 1024**3

register_profile(
    DeviceProfile(
        name="rx580",
        description="AMD Radeon RX 580 8 GB (Polaris 20, gfx803, 36 CUs at 1340 MHz)",
        # 2304 lanes x 2 FLOP (FMA) x 1.340 GHz. Polaris has no packed FP16: fp16 runs at the fp32
        # rate. No int8 dot product: int8 runs at best at the fp32 rate (saves memory, not time).
        # No native bf16: emulated through fp32 at best, so the fp32 rate is an upper bound.
        # fp64 at 1/16 of the fp32 rate.
        peak_flops={
            "fp32": 6.17e12,
            "fp16": 6.17e12,
            "bf16": 6.17e12,
            "int8": 6.17e12,
            "fp64": 0.386e12,
        },
        memory_bandwidth=256 * _GB,
        memory_bytes=8 * _GIB,
        packed_fp16=False,
        int8_dot=False,
        tensor_cores=False,
        launch_overhead_s=10e-6,
        source=(
            "AMD Radeon RX 580 product specifications (amd.com): 6.17 TFLOPS peak FP32, 386 "
            "GFLOPS FP64, 8 GB GDDR5, 256 GB/s; Polaris ISA has no packed FP16 or int8 dot "
            "instructions; launch overhead ~10 us is an estimate for ROCm/HIP eager launches"
        ),
    )
)

register_profile(
    DeviceProfile(
        name="gtx1060-6gb",
        description="NVIDIA GeForce GTX 1060 6 GB (Pascal GP106, sm_61, 1280 cores at 1708 MHz)",
        # Native fp16 arithmetic on sm_61 runs at 1/64 of the fp32 rate, but PyTorch's fp16
        # convolutions (cuDNN with a float math type) and matmuls (cuBLAS with 32-bit compute)
        # read and write fp16 and multiply in the fp32 units: fp16 runs at the fp32 rate and
        # only halves the bytes. dp4a gives int8 at 4x fp32. bf16 is not native on Pascal: the
        # fp32 rate is an upper bound.
        # fp64 at 1/32 of the fp32 rate.
        peak_flops={
            "fp32": 4.375e12,
            "fp16": 4.375e12,
            "bf16": 4.375e12,
            "int8": 17.5e12,
            "fp64": 0.137e12,
        },
        memory_bandwidth=192 * _GB,
        memory_bytes=6 * _GIB,
        packed_fp16=False,
        int8_dot=True,
        tensor_cores=False,
        launch_overhead_s=5e-6,
        source=(
            "NVIDIA GeForce GTX 1060 specifications (nvidia.com): 1280 CUDA cores, 1708 MHz boost, "
            "192 GB/s GDDR5; CUDA C++ Programming Guide throughput table for compute capability "
            "6.1 (native fp16 1/64 of fp32, fp64 1/32, dp4a 4x); PyTorch's cuDNN convolution "
            "descriptor (float math type for half data) and half GEMM (CUBLAS_COMPUTE_32F) "
            "compute fp16 models in fp32; launch overhead ~5 us is an estimate"
        ),
    )
)

register_profile(
    DeviceProfile(
        name="rtx3060-12gb",
        description="NVIDIA GeForce RTX 3060 12 GB (Ampere GA106, sm_86, 3584 cores at 1777 MHz)",
        # fp32 without tensor cores (PyTorch keeps TF32 matmul off by default, but cuDNN
        # convolutions use TF32 by default, so fp32 convs can beat this estimate); fp16/bf16 on
        # tensor cores with fp32 accumulation (GeForce Ampere runs that at half the
        # fp16-accumulate rate); int8 on tensor cores; all dense (no 2:4 sparsity).
        # fp64 at 1/64 of the fp32 rate.
        peak_flops={
            "fp32": 12.74e12,
            "fp16": 25.4e12,
            "bf16": 25.4e12,
            "int8": 101.6e12,
            "fp64": 0.199e12,
        },
        memory_bandwidth=360 * _GB,
        memory_bytes=12 * _GIB,
        packed_fp16=True,
        int8_dot=True,
        tensor_cores=True,
        launch_overhead_s=5e-6,
        source=(
            "NVIDIA GeForce RTX 3060 specifications (nvidia.com) and NVIDIA Ampere GA102 GPU "
            "architecture whitepaper (GA10x tensor core rates): 12.7 TFLOPS fp32, 25.4 TFLOPS "
            "fp16/bf16 dense with fp32 accumulate, 101.6 TOPS int8 dense, fp64 at 1/64 of fp32, "
            "360 GB/s GDDR6; "
            "launch overhead ~5 us is an estimate"
        ),
    )
)

register_profile(
    DeviceProfile(
        name="h100-sxm",
        description="NVIDIA H100 SXM5 80 GB (Hopper GH100, sm_90)",
        # fp64 without its tensor cores (34 TFLOPS; 67 on them, which cuBLAS uses for DGEMM)
        peak_flops={"fp32": 67e12, "fp16": 989e12, "bf16": 989e12, "int8": 1979e12, "fp64": 34e12},
        memory_bandwidth=3.35e12,
        memory_bytes=80 * _GIB,
        packed_fp16=True,
        int8_dot=True,
        tensor_cores=True,
        launch_overhead_s=4e-6,
        source=(
            "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com, SXM5): 67 TFLOPS fp32, "
            "989 TFLOPS fp16/bf16 tensor dense (1979 with sparsity), 1979 TOPS int8 dense, "
            "34 TFLOPS fp64 (67 on tensor cores), "
            "80 GB HBM3 at 3.35 TB/s; "
            "launch overhead ~4 us is an estimate"
        ),
    )
)


# --------------------------------------------------------------------------------------------
# The CPU profile, measured here.

_CPU_CACHE: dict[int, DeviceProfile] = {}


def _median_time(fn: Callable[[], object], budget_s: float, min_reps: int = 3) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times: list[float] = []
    spent = 0.0
    while len(times) < min_reps or (spent < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    times.sort()
    return max(times[len(times) // 2], 1e-9)


def _gemm_rate(dtype: torch.dtype, n: int, budget_s: float) -> float:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.int8:
        a = torch.randint(-64, 64, (n, n), dtype=torch.int8, generator=gen)
        b = torch.randint(-64, 64, (n, n), dtype=torch.int8, generator=gen)
        fn: Callable[[], object] = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        fn = lambda: torch.mm(a, b)  # noqa: E731
    return 2.0 * n**3 / _median_time(fn, budget_s)


def _copy_bandwidth(budget_s: float) -> float:
    avail = read_meminfo().get("MemAvailable", 8 * _GIB)
    nbytes = int(min(64 * 2**20, max(avail // 16, 4 * 2**20)))  # 64 MiB, less on small machines
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    # a copy reads every byte of src and writes every byte of dst
    return 2.0 * nbytes / _median_time(lambda: dst.copy_(src), budget_s)


def _op_overhead(budget_s: float) -> float:
    x = torch.zeros(1)
    reps = 200

    def run() -> None:
        for _ in range(reps):
            torch.add(x, 1.0)

    return _median_time(run, budget_s) / reps


def measure_cpu_profile(
    threads: int | None = None, seconds: float = 0.5, *, refresh: bool = False
) -> DeviceProfile:
    """Measure this CPU's peak rates with short probes (cached per process per thread count).

    * ``peak_flops``: a median-timed 512 x 512 square matmul per dtype (fp32, fp16, bf16; int8
      through ``torch._int_mm``, with the fp32 rate where that op is missing). A 512 matmul
      under-reads the peak of big many-core CPUs a little; it is what small layers get.
    * ``memory_bandwidth``: a median-timed copy of a 64 MiB array, counting bytes read + written.
    * ``launch_overhead_s``: the median per-call time of a one-element ``torch.add``.
    * ``memory_bytes``: ``MemTotal`` from ``/proc/meminfo``.

    Args:
        threads: Thread count to measure with (``None``: the current ``torch.get_num_threads()``).
        seconds: Rough time budget for all probes together.
        refresh: Measure again even if a cached profile exists.

    Example:
        >>> p = measure_cpu_profile(threads=1, seconds=0.2)
        >>> p.peak_flops["fp32"] > 0
        True
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise ValueError(f"seconds must be a positive number of seconds, got {seconds!r}")
    with cpu_threads(threads) as n:
        if not refresh and n in _CPU_CACHE:
            return _CPU_CACHE[n]
        started = time.perf_counter()
        rates = {"fp32": _gemm_rate(torch.float32, 512, 0.35 * seconds)}
        for key, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            try:
                rates[key] = _gemm_rate(dt, 512, 0.1 * seconds)
            except RuntimeError as exc:  # dtype not implemented on this CPU build
                logger.info("cpu %s matmul probe failed (%s); using the fp32 rate", key, exc)
                rates[key] = rates["fp32"]
        rates["fp64"] = _gemm_rate(torch.float64, 256, 0.05 * seconds)
        try:
            rates["int8"] = _gemm_rate(torch.int8, 512, 0.1 * seconds)
        except (RuntimeError, AttributeError) as exc:
            logger.info("cpu int8 matmul probe failed (%s); using the fp32 rate", exc)
            rates["int8"] = rates["fp32"]
        bandwidth = _copy_bandwidth(0.25 * seconds)
        overhead = _op_overhead(0.05 * seconds)
        elapsed = time.perf_counter() - started
        cpu_name, flags = _cpu_name_and_flags()
        mem = read_meminfo().get("MemTotal", 0)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        profile = DeviceProfile(
            name="cpu",
            description=f"{cpu_name}, {n} torch thread(s)",
            peak_flops=rates,
            memory_bandwidth=bandwidth,
            memory_bytes=int(mem),
            packed_fp16=bool(flags & {"avx512_fp16", "asimdhp"}),
            int8_dot=bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"}),
            tensor_cores=bool(flags & {"amx_tile"}),
            launch_overhead_s=min(overhead, 1.0),
            source=(
                f"measured on this machine {stamp} with {n} thread(s) in {elapsed:.2f} s "
                "(512x512 matmul per dtype, 64 MiB copy, one-element add)"
            ),
        )
        logger.info(
            "measured cpu profile: %.1f GFLOP/s fp32, %.1f GB/s, %.1f us/op",
            rates["fp32"] / 1e9,
            bandwidth / 1e9,
            overhead * 1e6,
        )
        _CPU_CACHE[n] = profile
        return profile


_PROFILES.add("cpu", measure_cpu_profile)
