"""External data the scan's check follows like a parser does: symlinks, every graph field,
sparse initializers."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from slimtorch.serve.onnx_graph import ExternalDataError, external_data_files


def _external(name: str, location: str) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4])
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _graph(inits: list[TensorProto], sparse: tuple[onnx.SparseTensorProto, ...] = ()) -> bytes:
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    g.sparse_initializer.extend(sparse)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def _varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.bin"
    path.write_bytes(b"TOPSECRETKEY1234")
    return path


def _model(folder: Path, data: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(data)
    return folder / "model.onnx"


def test_a_symlink_out_of_the_folder_is_refused(tmp_path: Path, secret: Path) -> None:
    path = _model(tmp_path / "m", _graph([_external("W", "model.onnx.data")]))
    os.symlink(secret, tmp_path / "m" / "model.onnx.data")
    with pytest.raises(ExternalDataError, match=r"links to .*outside the model's folder"):
        external_data_files(path)
    (tmp_path / "m" / "model.onnx.data").unlink()
    (tmp_path / "m" / "model.onnx.data").write_bytes(secret.read_bytes())  # a copy: fine
    assert external_data_files(path) == [tmp_path / "m" / "model.onnx.data"]


def test_every_graph_field_and_sparse_initializers_are_checked(
    tmp_path: Path, secret: Path
) -> None:
    first = onnx.GraphProto()
    first.initializer.extend([_external("W", str(secret))])
    hidden = first.SerializeToString()  # a second ModelProto.graph field: parsers merge them
    two = _model(tmp_path / "two", b"\x3a" + _varint(len(hidden)) + hidden + _graph([]))
    values = _external("W", str(secret))
    index = helper.make_tensor("W_idx", TensorProto.INT64, [4], [0, 1, 2, 3])
    sparse = _model(
        tmp_path / "sparse", _graph([], (helper.make_sparse_tensor(values, index, [4]),))
    )
    for path in (two, sparse):
        with pytest.raises(ExternalDataError, match="outside the model's"):
            external_data_files(path)


def test_a_model_linked_from_a_shared_store_reads_its_data_there(
    tmp_path: Path, secret: Path
) -> None:
    """ONNX Runtime reads external data beside the model file's real location: a version
    folder of links into a store (as a download cache makes) is a valid layout."""
    store = tmp_path / "store"
    real = _model(store, _graph([_external("W", "model.onnx.data")]))
    (store / "model.onnx.data").write_bytes(secret.read_bytes())
    (tmp_path / "v").mkdir()
    os.symlink(real, tmp_path / "v" / "model.onnx")
    os.symlink(store / "model.onnx.data", tmp_path / "v" / "model.onnx.data")
    assert external_data_files(tmp_path / "v" / "model.onnx") == [store / "model.onnx.data"]
