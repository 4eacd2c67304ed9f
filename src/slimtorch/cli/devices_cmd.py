"""``slimtorch devices``: the devices found here and the known device profiles."""

from __future__ import annotations

import argparse
import json
from typing import Any

from slimtorch.cli.common import format_table


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "devices",
        help="list the devices found here and the known profiles",
        description="List the devices found here (memory, architecture, fp16/bf16 support) and "
        "the known device profiles (peak rates, memory bandwidth); the cpu profile is measured "
        "here with a short GEMM/copy probe unless --no-probe. Writes nothing.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--no-probe", action="store_true", help="skip measuring the cpu profile (GEMM/copy probe)"
    )
    p.set_defaults(handler=run)


def _gib(n: int | float | None) -> str:
    """Memory sizes in GiB, as cards are sold (the RX 580's 8 GB is 8 GiB)."""
    return "-" if n is None else f"{n / 2**30:.1f}"


def _tera(rate: float) -> str:
    """A peak rate in TFLOP/s (TOP/s) with two decimals; one under 0.01 with two significant
    digits, since "0.00" would read as missing (a CPU without native fp16 runs fp16 matmuls at a
    few GFLOP/s).

    Example:
        >>> _tera(6.17e12), _tera(2.87e9), _tera(0.0)
        ('6.17', '0.0029', '0.00')
    """
    t = rate / 1e12
    return f"{t:.2f}" if t >= 0.01 or t == 0 else f"{t:.2g}"


def run(args: argparse.Namespace) -> int:
    from slimtorch.core.devices import detect_devices
    from slimtorch.core.profiles import get_profile, list_profiles

    devices = detect_devices()
    names = [n for n in list_profiles() if not (args.no_probe and n == "cpu")]
    profiles = [get_profile(n) for n in names]
    if args.json:
        from dataclasses import asdict

        print(
            json.dumps(
                {
                    "devices": [asdict(d) for d in devices],
                    "profiles": [asdict(p) for p in profiles],
                },
                indent=2,
                default=str,
            )
        )
        return 0
    rows = [
        [
            d.device,
            d.kind,
            d.name,
            _gib(d.total_memory_bytes),
            _gib(d.free_memory_bytes),
            d.gfx_arch or d.compute_capability or "-",
            "yes" if d.supports_fp16 else "no",
            "yes" if d.supports_bf16 else "no",
        ]
        for d in devices
    ]
    print("Devices found here")
    print(
        format_table(
            ["device", "kind", "name", "mem GiB", "free GiB", "arch", "fp16", "bf16"], rows
        )
    )
    prow = [
        [
            p.name,
            _tera(p.peak_flops["fp32"]),
            _tera(p.peak_flops["fp16"]),
            _tera(p.peak_flops["bf16"]),
            _tera(p.peak_flops["int8"]),
            _tera(p.peak_flops["fp64"]) if "fp64" in p.peak_flops else "-",
            f"{p.memory_bandwidth / 1e9:.0f}",
            _gib(p.memory_bytes),
            ",".join(
                f
                for f, on in (
                    ("packed-fp16", p.packed_fp16),
                    ("int8-dot", p.int8_dot),
                    ("tensor-cores", p.tensor_cores),
                )
                if on
            )
            or "-",
        ]
        for p in profiles
    ]
    print()
    print("Device profiles (peak rates in TFLOP/s or TOP/s, bandwidth GB/s)")
    print(
        format_table(
            ["profile", "fp32", "fp16", "bf16", "int8", "fp64", "GB/s", "mem GiB", "flags"], prow
        )
    )
    return 0
