"""Load a benchmark script from ``scripts/`` as a module, to call its ``main(argv)`` in a test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` under the module name ``name`` (``name`` may name a
    sub-folder: ``"bench_serve/run_bench"``).

    ``scripts/`` goes on ``sys.path``, as it is when a script runs, so that the scripts' shared
    module ``_bench_common`` imports.
    """
    if str(SCRIPTS) not in sys.path:
        sys.path.append(str(SCRIPTS))
    module_name = name.rsplit("/", 1)[-1]
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
