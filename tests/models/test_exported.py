"""Tests for slimtorch.models.exported: torch.export round trip without unpickling."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from slimtorch.core.errors import ModelLoadError
from slimtorch.models import create_model, load_exported, save_exported

CALLS: list[str] = []


def _record_call(tag: str) -> str:
    CALLS.append(tag)
    return tag


class _Evil:
    """Unpickling this calls _record_call: the proof that a file was unpickled."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_record_call, ("unpickled",))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, input_size=28)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 1, 28, 28))  # non-trivial state, still exported in eval mode
    path = save_exported(model, torch.randn(1, 1, 28, 28), tmp_path_factory.mktemp("ex") / "l.pt2")
    return model, path


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes]) -> Path:
    """Copy the archive, replacing entries whose name ends with a key of ``replace``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(info.filename, data)
        for suffix, new in replace.items():
            if suffix.startswith("+"):
                root = zin.namelist()[0].split("/")[0]
                zout.writestr(f"{root}/{suffix[1:]}", new)
    return dst


def test_round_trip_reproduces_outputs_with_any_batch(
    exported: tuple[torch.nn.Module, Path],
) -> None:
    model, path = exported
    assert model.training  # save_exported restored the mode
    module = load_exported(path)
    model.eval()
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(module(x), model(x))
    model.train()
    assert not list(path.parent.glob(".*.tmp"))


def test_pickled_weight_is_refused(exported: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, path = exported
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(z.read(name))
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    bad = _rewrite(path, tmp_path / "p.pt2", {"_weights_config.json": json.dumps(config).encode()})
    with pytest.raises(ModelLoadError, match=rf"stores '{first}' as a pickle"):
        load_exported(bad)


def test_malicious_sample_inputs_are_never_unpickled(
    exported: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    _, path = exported
    buffer = io.BytesIO()
    torch.save(_Evil(), buffer)  # torch.export.load would fall back to the full unpickler
    bad = _rewrite(path, tmp_path / "e.pt2", {"sample_inputs/model.pt": buffer.getvalue()})
    CALLS.clear()
    with pytest.raises(ModelLoadError, match="needs more than the weights-only unpickler"):
        load_exported(bad)
    assert CALLS == []


@pytest.mark.parametrize("order", [("bad", "bad", "good"), ("bad", "good"), ("good", "bad")])
def test_duplicate_entries_cannot_hide_a_pickle(
    exported: tuple[torch.nn.Module, Path], tmp_path: Path, order: tuple[str, ...]
) -> None:
    # Python's zipfile reads the last copy of a name, torch's reader may read another: with a
    # clean copy where one reader looks and a pickle flag where the other does, both are read
    _, path = exported
    payload = io.BytesIO()
    torch.save(_Evil(), payload)
    with zipfile.ZipFile(path) as z:
        items = [(info.filename, z.read(info.filename)) for info in z.infolist()]
    name = next(n for n, _ in items if n.endswith("_weights_config.json"))
    good = json.loads(dict(items)[name])
    bad = json.loads(json.dumps(good))
    first = next(iter(bad["config"]))
    bad["config"][first]["use_pickle"] = True
    copies = {"good": json.dumps(good).encode(), "bad": json.dumps(bad).encode()}
    evil = tmp_path / "dup.pt2"
    with warnings.catch_warnings(), zipfile.ZipFile(evil, "w") as out:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        for entry, data in items:
            if entry == name:
                for which in order:
                    out.writestr(entry, copies[which])
            else:
                is_weight = entry.endswith("/" + bad["config"][first]["path_name"])
                out.writestr(entry, payload.getvalue() if is_weight else data)
    CALLS.clear()
    with pytest.raises(ModelLoadError, match="appears more than once"):
        load_exported(evil)
    assert CALLS == []


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("+data/aotinductor/model/model.so", "'data/aotinductor/model/model.so' is not part"),
        ("+data/weights/model.pt", "'data/weights/model.pt' is not part"),
        ("+data/constants/opaque_obj_0", "'data/constants/opaque_obj_0' is not part"),
    ],
)
def test_entries_outside_the_plain_layout_are_refused(
    exported: tuple[torch.nn.Module, Path], tmp_path: Path, entry: str, match: str
) -> None:
    _, path = exported
    bad = _rewrite(path, tmp_path / "x.pt2", {entry: b"\x80\x02N."})
    with pytest.raises(ModelLoadError, match=match):
        load_exported(bad)


@pytest.mark.parametrize("folder", ["weights", "constants"])
def test_a_second_program_cannot_bring_a_legacy_pickle(
    exported: tuple[torch.nn.Module, Path], tmp_path: Path, folder: str
) -> None:
    # torch loads every models/<name>.json and unpickles data/{weights,constants}/<name>.pt if
    # there is one; a program named weight_x (tensor_x) makes that file fit the plain names
    _, path = exported
    payload = io.BytesIO()
    torch.save({"x": _Evil()}, payload)
    program = "weight_x" if folder == "weights" else "tensor_x"
    with zipfile.ZipFile(path) as z:
        files = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
    extra = {
        f"+models/{program}.json": files["models/model.json"],
        f"+data/sample_inputs/{program}.pt": files["data/sample_inputs/model.pt"],
        f"+data/{folder}/{program}.pt": payload.getvalue(),
    }
    other = "constants" if folder == "weights" else "weights"
    extra[f"+data/{other}/{program}_{other}_config.json"] = files[
        f"data/{other}/model_{other}_config.json"
    ]
    bad = _rewrite(path, tmp_path / "two.pt2", extra)
    CALLS.clear()
    with pytest.raises(ModelLoadError, match=rf"'data/{folder}/{program}.pt' holds the pickled"):
        load_exported(bad)
    assert CALLS == []
    del extra[f"+data/{folder}/{program}.pt"]  # no payload at all: named, not a torch error
    with pytest.raises(ModelLoadError, match=rf"program '{program}' has no"):
        load_exported(_rewrite(path, tmp_path / "three.pt2", extra))


def test_legacy_top_level_layout_and_non_archives(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(legacy, "w") as z:
        z.writestr("version", "8.0")
        z.writestr("serialized_state_dict.pt", b"\x80\x02N.")
    with pytest.raises(ModelLoadError, match="legacy pickled layout"):
        load_exported(legacy)
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match=r"not a torch\.export archive"):
        load_exported(junk)
    with pytest.raises(ModelLoadError, match="cannot read exported program"):
        load_exported(tmp_path / "missing.pt2")


def test_save_exported_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        save_exported("lenet", torch.zeros(1, 1), tmp_path / "a.pt2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="example_input must be a tensor with a batch dimension"):
        save_exported(torch.nn.Identity(), torch.tensor(1.0), tmp_path / "a.pt2")


@pytest.mark.gpu
def test_load_exported_onto_cuda(
    exported: tuple[torch.nn.Module, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare true float32
    model, path = exported
    module = load_exported(path, device="cuda")
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x.cuda()).cpu(), model(x), rtol=1e-3, atol=1e-3)
    model.train()


def test_an_operator_not_registered_here_is_named(tmp_path: Path) -> None:
    import subprocess
    import sys

    save = (
        "import sys, torch\n"
        "@torch.library.custom_op('slimtest::twice', mutates_args=())\n"
        "def twice(x: torch.Tensor) -> torch.Tensor:\n"
        "    return x * 2\n"
        "@twice.register_fake\n"
        "def _(x):\n"
        "    return torch.empty_like(x)\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.ops.slimtest.twice(x)\n"
        "from slimtorch.models import save_exported\n"
        "save_exported(M(), torch.randn(2, 3), sys.argv[1])\n"
    )
    path = tmp_path / "op.pt2"
    proc = subprocess.run([sys.executable, "-c", save, str(path)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with pytest.raises(ModelLoadError, match=r"calls the operator torch\.ops\.slimtest\.twice"):
        load_exported(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_gpu_that_is_not_there_is_named(exported: tuple[torch.nn.Module, Path]) -> None:
    _, path = exported
    with pytest.raises(ValueError, match="asked for a CUDA/ROCm GPU"):
        load_exported(path, device="cuda")
    assert next(load_exported(path, device="auto").parameters()).device.type in ("cpu", "mps")


def test_a_flipped_bit_in_a_weight_is_refused(
    exported: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    # torch's archive reader checks no CRC: the damaged weight loaded and the outputs moved
    _, path = exported
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest weight
        assert info.compress_type == zipfile.ZIP_STORED
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x40
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"bad\.pt2 is corrupt: its entry '.+' does not match"):
        load_exported(bad)
