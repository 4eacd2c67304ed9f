"""Write the pip constraints used by `make`: keep an installed torch, else pin the CPU wheel.

A user who already has a ROCm or CUDA build of torch in the environment, at least the version
pyproject.toml asks for, keeps it; on a fresh machine torch is pinned to the version in
constraints.txt. An older installed torch stops `make` with a message: pinning the CPU wheel
would install it over the user's GPU build.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torch_floor() -> tuple[int, int]:
    """The ``torch>=X.Y`` of pyproject.toml's dependencies."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "dependencies"
    ]
    for dep in deps:
        found = re.fullmatch(r"torch>=(\d+)\.(\d+)", dep.replace(" ", ""))
        if found:
            return int(found[1]), int(found[2])
    raise SystemExit("pyproject.toml lists no torch>=X.Y dependency")


def main() -> None:
    lines = [
        ln for ln in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
        if ln and not ln.startswith("#")
    ]  # fmt: skip
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is not None:
        major, minor = (int(p) for p in version.split("+")[0].split(".")[:2])
        floor = torch_floor()
        if (major, minor) < floor:
            raise SystemExit(
                f"torch {version} is installed here; slimtorch needs torch >= "
                f"{floor[0]}.{floor[1]}. Install a newer build for your GPU (ROCm, CUDA) or "
                "use a virtual environment without it (make then installs the CPU wheel)"
            )
        lines = [ln for ln in lines if not ln.startswith("torch")] + [f"torch=={version}"]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
