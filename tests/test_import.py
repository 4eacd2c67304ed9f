"""`import slimtorch` stays lean: no server/CLI/plotting libraries and no CUDA initialisation."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("fastapi", "uvicorn", "typer", "onnxruntime", "matplotlib", "sklearn", "PIL")


def _modules_after(code: str) -> dict[str, object]:
    probe = (
        f"{code}\n"
        "import sys, json, torch\n"
        "print(json.dumps({'mods': sorted(sys.modules), "
        "'cuda_init': bool(torch.cuda.is_initialized())}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_slimtorch_is_lean() -> None:
    info = _modules_after(
        "import slimtorch, slimtorch.core, slimtorch.data, slimtorch.models, slimtorch.train"
    )
    mods = info["mods"]
    assert isinstance(mods, list)
    heavy = [m for m in mods if m.split(".")[0] in HEAVY]
    assert heavy == [], f"heavy modules imported by `import slimtorch`: {heavy[:10]}"
    assert info["cuda_init"] is False


def test_cli_module_import_is_lean() -> None:
    info = _modules_after("import slimtorch.cli.main")
    mods = info["mods"]
    assert isinstance(mods, list)
    assert not [m for m in mods if m.split(".")[0] in HEAVY]


def test_loading_a_transformed_model_does_not_import_the_compiler() -> None:
    """load_model imports the packages whose transforms a model records; torch._dynamo costs
    about a second of import and only compiling needs it."""
    for package in (
        "slimtorch.decompose",
        "slimtorch.prune",
        "slimtorch.quant",
        "slimtorch.sparse",
    ):
        mods = _modules_after(f"import slimtorch.models, {package}")["mods"]
        assert isinstance(mods, list)
        assert "torch._dynamo" not in mods, package


def test_every_subpackage_is_reached_on_first_use() -> None:
    # slimtorch.quant, .sparse and .serve raised AttributeError after a bare `import slimtorch`
    code = (
        "import slimtorch\n"
        "names = ['core', 'data', 'models', 'train', 'decompose', 'prune', 'distill', 'quant',\n"
        "         'sparse', 'pipeline', 'serve', 'cli']\n"
        "got = [getattr(slimtorch, n).__name__ for n in names]\n"
        "assert got == ['slimtorch.' + n for n in names], got"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
