"""A .pt2 program whose JSON would run code when torch.export.load reads it is refused first."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.core.errors import ModelLoadError
from slimtorch.models import load_exported, save_exported
from slimtorch.models.pt2_program import guard_problem, sym_expr_problem, target_problem


class _Sizes(nn.Module):
    """Sizes computed from the batch: the program holds symbolic expressions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        y = x.reshape(b * 2, -1)
        return y.sum() + x[: b // 2 + 1].mean() + x.view(-1)[: (b * 3) % 7 + 1].sum()


class _Two(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x[: y.shape[0]] * 2 + y.sum()


@pytest.fixture(scope="module")
def sizes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "sizes.pt2"
    return save_exported(_Sizes(), torch.randn(4, 2, 8, 8), path)


def _edit(src: Path, dst: Path, change: Callable[[dict], None]) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("models/model.json"):
                doc = json.loads(data)
                change(doc)
                data = json.dumps(doc).encode()
            zout.writestr(info.filename, data)
    return dst


def test_programs_with_size_expressions_and_guards_still_load(sizes: Path, tmp_path: Path) -> None:
    x = torch.randn(6, 2, 8, 8)
    assert torch.allclose(load_exported(sizes)(x), _Sizes()(x))
    b, c = torch.export.Dim("b", min=2, max=1000), torch.export.Dim("c", min=1, max=500)
    program = torch.export.export(
        _Two(), (torch.randn(8, 3), torch.randn(4, 3)), dynamic_shapes={"x": {0: b}, "y": {0: c}}
    )
    torch.export.save(program, tmp_path / "two.pt2")
    with zipfile.ZipFile(tmp_path / "two.pt2") as z:
        name = next(n for n in z.namelist() if n.endswith("models/model.json"))
        assert json.loads(z.read(name))["guards_code"]  # a guard relating the two inputs
    x, y = torch.randn(9, 3), torch.randn(5, 3)
    assert torch.equal(load_exported(tmp_path / "two.pt2")(x, y), _Two()(x, y))


def _first(doc: dict, key: str) -> dict:
    stack: list[object] = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get(key), str):
                return item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    raise AssertionError(f"no {key}")


def test_code_in_a_size_expression_or_guard_never_runs(sizes: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"

    def in_expr(doc: dict) -> None:
        node = _first(doc, "expr_str")
        node["expr_str"] = f"{node['expr_str']} + 0*({code} is None)"

    def in_guard(doc: dict) -> None:
        doc["guards_code"] = [f"({code} is None) == 1"]

    for name, change in (("expr", in_expr), ("guard", in_guard)):
        path = _edit(sizes, tmp_path / f"{name}.pt2", change)
        with pytest.raises(ModelLoadError, match="would evaluate it as Python"):
            load_exported(path)
        assert not marker.exists()


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("torch.os.system", "not a registered operator"),
        ("torch.ops.aten.__class__.__init__", "not a registered operator"),
        ("torch.ops.aten.save.default", "reads or writes files"),
        ("torch.ops.aten.from_file.default", "reads or writes files"),
        ("torch.ops.symm_mem.one_shot_all_reduce.default", "'symm_mem' operators"),
        ("#extension", "not a registered operator"),
    ],
)
def test_targets_other_than_known_operators_are_refused(
    sizes: Path, tmp_path: Path, target: str, why: str
) -> None:
    assert why in (target_problem(target) or "")

    def swap(doc: dict) -> None:
        _first(doc, "target")["target"] = target

    with pytest.raises(ModelLoadError, match="refused"):
        load_exported(_edit(sizes, tmp_path / "t.pt2", swap))


@pytest.mark.parametrize(
    "text",
    [
        "Symbol('s1').__class__",
        "Integer(1)[0]",
        "(lambda: 1)()",
        "eval('1')",
        "Symbol(*['s1'])",
        "Symbol('s1', positive=__import__('os'))",
        "[Integer(1) for _ in ()]",
        "Symbol('s1'",
    ],
)
def test_size_expressions_are_call_trees_of_shape_functions(text: str) -> None:
    assert sym_expr_problem(text) is not None


@pytest.mark.parametrize(
    "text",
    [
        "L['x'].__class__ == 1",
        "L['x'].size().__class__ == 1",
        "open('f') == 1",
        "L['x'].size(__import__('os'))[0] == 1",
        "L['x\\\\'].size()[0] == 1",  # a backslash in a key: torch pastes keys into literals
        "math.__dict__ == 1",
        "().__class__ == 1",
    ],
)
def test_guards_are_comparisons_of_input_sizes(text: str) -> None:
    assert guard_problem(text) is not None
    fine = "Max(2, L['x'].size()[0]) % 8 == math.floor(L['x'].stride()[1] / 2)"
    assert guard_problem(fine) is None


def test_a_deeply_nested_program_is_a_clear_error(sizes: Path, tmp_path: Path) -> None:
    def nest(doc: dict) -> None:
        doc["extra"] = None

    path = _edit(sizes, tmp_path / "deep.pt2", nest)
    deep = "[" * 100_000 + "]" * 100_000
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp_path / "d.pt2", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("models/model.json"):
                data = data.replace(b'"extra": null', f'"extra": {deep}'.encode())
            zout.writestr(info.filename, data)
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_exported(tmp_path / "d.pt2")


def test_a_program_of_another_schema_names_the_cause(
    sizes: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """torch logs why it cannot read a program (to the console, through its own handler) and
    raises "check the warnings above": the error now carries the cause itself."""

    def newer(doc: dict) -> None:
        doc["schema_version"]["major"] += 1

    with pytest.raises(ModelLoadError, match="does not match our current schema version"):
        load_exported(_edit(sizes, tmp_path / "newer.pt2", newer))
    assert "deserializing" not in capfd.readouterr().err


class _Half(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, scale_factor=0.5).flatten(1)


def test_guards_torch_writes_for_float_sizes_and_odd_keys_pass() -> None:
    """An interpolate by 0.5 on dynamic sizes guards with math.trunc(torch.sym_float(...)),
    and a dict input may have any key without quotes: both were refused."""
    for fine in (
        "math.trunc(0.5*torch.sym_float(L['x'].size()[2])) >= 2",
        "L['rgb-image'].size()[0] >= 2",
        "(L['x'].size()[0] & 7) == 0",
        "L['x'].size()[0] < math.inf",
    ):
        assert guard_problem(fine) is None, fine
    for bad in ("L['a\"b'].size()[0] == 1", "torch.sym_float.__globals__ == 1"):
        assert guard_problem(bad) is not None, bad


def test_an_interpolating_program_with_dynamic_sizes_loads(tmp_path: Path) -> None:
    h, w = torch.export.Dim("h", min=4, max=512), torch.export.Dim("w", min=4, max=512)
    program = torch.export.export(
        _Half(), (torch.randn(2, 3, 16, 20),), dynamic_shapes={"x": {2: h, 3: w}}
    )
    torch.export.save(program, tmp_path / "half.pt2")
    x = torch.randn(2, 3, 24, 30)
    assert torch.equal(load_exported(tmp_path / "half.pt2")(x), _Half()(x))


def test_loads_in_threads_leave_torch_export_logger_as_they_found_it(sizes: Path) -> None:
    """Each load swaps the torch.export logger's handlers; two at once (a server's first
    requests to two models) left load handlers behind that kept every record."""
    import logging
    import threading

    log = logging.getLogger("torch.export")
    before = list(log.handlers)
    threads = [threading.Thread(target=load_exported, args=(sizes,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.handlers == before
