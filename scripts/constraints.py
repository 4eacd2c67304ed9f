"""Write the pip constraints used by `make`: keep an installed torch, else pin the CPU wheel.

A user who already has a ROCm or CUDA build of torch >= 2.4 in the environment keeps it; on a
fresh machine torch is pinned to the version in constraints.txt.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path


def main() -> None:
    base = Path(__file__).resolve().parent.parent / "constraints.txt"
    lines = [ln for ln in base.read_text().splitlines() if ln and not ln.startswith("#")]
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is not None:
        major, minor = (int(p) for p in version.split("+")[0].split(".")[:2])
        if (major, minor) >= (2, 4):
            lines = [ln for ln in lines if not ln.startswith("torch")] + [f"torch=={version}"]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
