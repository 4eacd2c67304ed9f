"""What one client's input, or a model that breaks the serving contract, can do to the others:
a batch that fails is re-run request by request, outputs that lose the batch dimension are
refused, outputs are never converted into a datatype that cannot hold them."""

from __future__ import annotations

import asyncio
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from serve_helpers import (
    IN8,
    KEY,
    app_client,
    make_mlp,
    pair_config,
    save_slimtorch,
    write_config,
    write_onnx,
)
from slimtorch.serve import ServeSettings
from slimtorch.serve.batcher import Batcher
from slimtorch.serve.errors import BadRequest, InputFailed, ModelFault
from slimtorch.serve.protocol.codec import parse_request
from slimtorch.serve.server import ModelServer

TABLE = np.arange(30, dtype=np.float32).reshape(10, 3)


def _write_graph(path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> None:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _lookup_model(root: Path) -> None:
    """``emb``: rows of a 10-row table gathered by INT64 index (index 10+ fails in ORT)."""
    from onnx import TensorProto, helper, numpy_helper

    write_config(
        root / "emb",
        format="onnx",
        inputs=[{"name": "idx", "datatype": "INT64", "dims": [2]}],
        outputs=[{"name": "rows", "dims": [2, 3]}],
        max_queue_delay_ms=0,
    )
    _write_graph(
        root / "emb" / "1" / "model.onnx",
        [helper.make_node("Gather", ["table", "idx"], ["rows"], axis=0)],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 2])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", 2, 3])],
        [numpy_helper.from_array(TABLE, "table")],
    )


def _request(idx: list[int]) -> bytes:
    x = {"name": "idx", "shape": [1, 2], "datatype": "INT64", "data": idx}
    return json.dumps({"inputs": [x]}).encode()


def test_a_bad_input_fails_only_its_own_request_in_a_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _lookup_model(tmp_path)
    requests = [[i % 10, (i + 1) % 10] for i in range(12)]
    requests[6] = [1, 99]  # out of the table: ORT raises

    async def main() -> list[object]:
        server = ModelServer(ServeSettings(repository=str(tmp_path), device="cpu", threads=1))
        await server.start()
        try:
            calls = [server.infer("emb", None, parse_request(_request(r), None)) for r in requests]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await server.stop()

    with caplog.at_level("INFO", logger="slimtorch.serve.batcher"):
        results = asyncio.run(main())
    assert any("running them one by one" in m for m in caplog.messages)  # a batch did fail
    for r, res in zip(requests, results, strict=True):
        if r == [1, 99]:
            assert isinstance(res, InputFailed) and res.status == 400
            assert "model 'emb' could not run on this input" in res.message
        else:
            assert not isinstance(res, BaseException), res
            np.testing.assert_array_equal(res[2]["rows"], TABLE[r][None])


def test_a_bad_input_alone_is_a_400_naming_the_model_error(tmp_path: Path) -> None:
    _lookup_model(tmp_path)
    with app_client(tmp_path, api_key=KEY) as c:
        r = c.post("/v2/models/emb/infer", content=_request([1, 99]))
        assert r.status_code == 400
        assert r.json()["error"].startswith("model 'emb' could not run on this input (")
        good = c.post("/v2/models/emb/infer", content=_request([1, 9]))
        assert good.status_code == 200
        assert good.json()["outputs"][0]["data"] == TABLE[[1, 9]].ravel().tolist()


def test_outputs_that_lose_the_batch_rows_fail_every_request_of_the_batch() -> None:
    def summed(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"].sum(axis=0, keepdims=True)}  # one row whatever the batch

    async def main() -> list[object]:
        b = Batcher("m", pair_config(max_batch_size=8), summed)
        b.start()
        try:
            calls = [b.submit({"x": np.full((1, 2), i, np.float32)}, rows=1) for i in range(5)]
            calls.append(b.submit({"x": np.ones((3, 2), np.float32)}, rows=3))
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await b.close()

    results = asyncio.run(main())
    for res in results:  # never a row of another request's sum
        assert isinstance(res, ModelFault) and res.status == 500
        assert "returned output 'y' of shape [1, 2] for a batch of" in res.message


def test_a_model_that_reduces_over_the_batch_is_not_ready(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    write_config(
        tmp_path / "bsum",
        format="onnx",
        inputs=[{"name": "x", "dims": [4]}],
        outputs=[{"name": "y", "dims": [4]}],
    )
    _write_graph(
        tmp_path / "bsum" / "1" / "model.onnx",
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [0])],
    )
    with app_client(tmp_path, api_key=KEY, load_policy="startup") as c:
        r = c.get("/v2/models/bsum/ready")
        assert r.status_code == 503
        assert "output 'y' of model 'bsum' has shape [1, 4] for a batch of 2" in r.json()["reason"]


def test_an_output_datatype_that_cannot_hold_the_values_is_refused(tmp_path: Path) -> None:
    write_config(
        tmp_path / "u8",
        format="slimtorch",
        inputs=IN8,
        outputs=[{"name": "logits", "datatype": "UINT8", "dims": [10]}],
    )
    save_slimtorch(tmp_path / "u8" / "1", make_mlp(1))
    with app_client(tmp_path, api_key=KEY, load_policy="startup") as c:
        r = c.get("/v2/models/u8/ready")
        assert r.status_code == 503
        assert r.json()["reason"] == (
            "output 'logits' of model 'u8' is FP32 but the config says UINT8, which cannot hold "
            "its values; set its datatype to FP32"
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_answer_in_fp32(tmp_path: Path, dtype: torch.dtype) -> None:
    model = make_mlp(2).to(dtype)
    save_slimtorch(tmp_path / "half" / "1", model)
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    with app_client(tmp_path, api_key=KEY) as c:
        r = c.post("/v2/models/half/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["datatype"] == "FP32"
    with torch.no_grad():
        want = model(torch.from_numpy(x).to(dtype)).float().numpy()
    np.testing.assert_array_equal(np.array(out["data"], np.float32), want.ravel())


@pytest.mark.parametrize(
    ("datatype", "data"),
    [("UINT8", [0, 7, 255]), ("UINT16", [0, 65535, 1]), ("UINT64", [0, 2**64 - 1, 5])],
)
def test_unsigned_inputs_parse_from_json_integers(datatype: str, data: list[int]) -> None:
    body = {"inputs": [{"name": "x", "shape": [3], "datatype": datatype, "data": data}]}
    arr = parse_request(json.dumps(body).encode(), None).tensors["x"]
    assert arr.dtype.name == datatype.lower() and arr.tolist() == data


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("UINT8", [1, 256], "has values in [1, 256], outside the range of uint8 [0, 255]"),
        ("UINT8", [-1, 0], "has values in [-1, 0], outside the range of uint8"),
        ("UINT64", [-1, 2**64 - 1], "outside the range of uint64"),
        ("UINT64", [1.5, 2**64 - 1], "got non-integer numbers such as 1.5"),
        (
            "INT8",
            [1, 2, 2.5],
            "must hold integers for datatype int8, got non-integer numbers such as 2.5",
        ),
    ],
)
def test_integer_inputs_out_of_range_or_fractional_are_refused(
    datatype: str, data: list[float], message: str
) -> None:
    body = {"inputs": [{"name": "x", "shape": [len(data)], "datatype": datatype, "data": data}]}
    with pytest.raises(BadRequest) as info:
        parse_request(json.dumps(body).encode(), None)
    assert message in info.value.message


def _parse_one(datatype: str, data: list[float], shape: list[int] | None = None) -> np.ndarray:
    x = {"name": "x", "shape": shape or [len(data)], "datatype": datatype, "data": data}
    return parse_request(json.dumps({"inputs": [x]}).encode(), None).tensors["x"]


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("INT64", [2**63, 1, 2], "in [1, 9223372036854775808], outside the range of int64"),
        ("INT64", [-(2**63) - 1, 1], "in [-9223372036854775809, 1], outside the range of int64"),
        ("UINT64", [2**64, 1, 2], "in [1, 18446744073709551616], outside the range of uint64"),
    ],
)
def test_integers_beyond_64_bits_get_the_out_of_range_message(
    datatype: str, data: list[int], message: str
) -> None:
    # numpy parses these as float64 or Python objects: they used to be refused as
    # "non-integer numbers" or "values of mixed types"
    with pytest.raises(BadRequest) as info:
        _parse_one(datatype, data)
    assert message in info.value.message


def test_integers_beyond_64_bits_are_read_as_floats_by_float_datatypes() -> None:
    # valid FP32 / FP64 values used to be refused as "values of mixed types"
    assert _parse_one("FP32", [2**70, 1, 2]).tolist() == [2.0**70, 1.0, 2.0]
    assert _parse_one("FP64", [[2**64], [3]], [2, 1]).tolist() == [[2.0**64], [3.0]]
    with pytest.raises(BadRequest, match="holds an integer of 1329 bits, outside the range of"):
        _parse_one("FP64", [10**400])


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("FP16", [70000, 1, 2], "holds 70000, outside the range of datatype FP16 "),
        ("FP16", [1.5, -65520.0], "holds -65520.0, outside the range of datatype FP16 "),
        ("FP32", [1e39], "holds 1e+39, outside the range of datatype FP32 "),
    ],
)
def test_finite_values_beyond_a_float_datatype_are_refused(
    datatype: str, data: list[float], message: str
) -> None:
    # the cast used to turn them into infinity (with a numpy overflow warning), refused as
    # "NaN or infinite" or, with allow_nan, passed to the model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadRequest) as info:
            _parse_one(datatype, data)
    assert info.value.message.startswith("inputs[0].data of input 'x' holds")
    assert message in info.value.message and "largest finite value" in info.value.message
    # a value that rounds to the largest finite one is in range; infinities stay for allow_nan
    assert _parse_one("FP16", [65519.0]).tolist() == [65504.0]
    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP16", "data": [Infinity]}]}'
    assert np.isinf(parse_request(body, None).tensors["x"]).all()


def test_binary_bool_bytes_other_than_0_and_1_are_refused() -> None:
    # numpy kept any byte as a BOOL element: bytes [2, 0, 1] came back as output bytes [2, 0, 1]
    x = {"name": "flags", "shape": [1, 3], "datatype": "BOOL"}
    head = json.dumps({"inputs": [{**x, "parameters": {"binary_data_size": 3}}]}).encode()
    with pytest.raises(BadRequest) as info:
        parse_request(head + bytes([1, 0, 2]), str(len(head)))
    assert info.value.message.startswith("inputs[0] ('flags') of datatype BOOL has byte 2 at")
    ok = parse_request(head + bytes([1, 0, 1]), str(len(head))).tensors["flags"]
    assert ok.tolist() == [[True, False, True]]


def test_an_empty_dimension_of_any_size_is_a_400(tmp_path: Path) -> None:
    write_config(
        tmp_path / "any",
        format="onnx",
        inputs=[{"name": "x", "dims": [-1]}],
        outputs=[{"name": "y", "dims": [-1]}],
    )
    from onnx import TensorProto, helper

    _write_graph(
        tmp_path / "any" / "1" / "model.onnx",
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "K"])],
        [],
    )
    with app_client(tmp_path, api_key=KEY) as c:
        x = {"name": "x", "shape": [1, 0], "datatype": "FP32", "data": []}
        r = c.post("/v2/models/any/infer", json={"inputs": [x]})
        assert r.status_code == 400
        assert "a dimension of any size (-1) still needs at least one element" in r.json()["error"]


def test_predict_writes_non_finite_outputs_and_picks_infinite_logits(tmp_path: Path) -> None:
    write_config(
        tmp_path / "lin",
        format="onnx",
        inputs=[{"name": "x", "dims": [4], "allow_nan": True}],
        outputs=[{"name": "y", "dims": [3]}],
        labels=["a", "b", "c"],
    )
    weight = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]], np.float32)
    write_onnx(tmp_path / "lin" / "1" / "model.onnx", weight, np.zeros(3, np.float32))
    with app_client(tmp_path, api_key=KEY) as c:
        data = [[1.0, 2.0, 3e38, 3e38], [float("nan"), 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]]
        r = c.post("/v1/models/lin/predict", content=json.dumps({"data": data}))
    assert r.status_code == 200, r.text
    assert '"y":[[1.0,2.0,Infinity],[NaN,NaN,NaN],[1.0,2.0,0.0]]' in r.text
    predictions = r.json()["predictions"]
    assert predictions[0] == {"index": 2, "label": "c", "score": 1.0}
    assert predictions[1] == {"index": None, "label": None, "score": None}
    assert predictions[2]["index"] == 1 and predictions[2]["label"] == "b"


def test_pin_wins_over_the_model_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_config(tmp_path / "m", format="slimtorch", inputs=IN8, pinned=False)
    save_slimtorch(tmp_path / "m" / "1", make_mlp(3))
    with caplog.at_level("WARNING", logger="slimtorch.serve"):
        with app_client(tmp_path, api_key=KEY, pinned=("m", "nosuch")) as c:
            assert c.get("/v2/models/m/config").json()["pinned"] is True
            index = c.post("/v2/repository/index", headers={"X-API-Key": KEY}).json()
            assert [(e["name"], e["state"]) for e in index] == [("m", "READY")]
    assert any("pinned model(s) ['nosuch'] are not in the repository" in m for m in caplog.messages)


def test_repository_index_reads_its_body_whatever_the_content_type(tmp_path: Path) -> None:
    save_slimtorch(tmp_path / "m" / "1", make_mlp(3))
    h = {"X-API-Key": KEY, "Content-Type": "application/x-www-form-urlencoded"}
    with app_client(tmp_path, api_key=KEY) as c:
        r = c.post("/v2/repository/index", content=b'{"ready": true}', headers=h)
        assert r.status_code == 200 and [e["name"] for e in r.json()] == ["m"]
        bad = c.post("/v2/repository/index", content=b'{"ready": tru', headers=h)
        assert bad.status_code == 400 and "error" in bad.json()
        wrong = c.post("/v2/repository/index", json={"ready": "maybe"}, headers={"X-API-Key": KEY})
        assert wrong.status_code == 400 and "ready" in wrong.json()["error"]


def test_compressed_bodies_inflate_within_the_size_limit(tmp_path: Path) -> None:
    import gzip
    import zlib

    save_slimtorch(tmp_path / "m" / "1", make_mlp(3))
    x = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
    body = json.dumps({"inputs": [x]}).encode()
    with app_client(tmp_path, api_key=KEY, max_request_bytes=4096) as c:
        plain = c.post("/v2/models/m/infer", content=body).json()["outputs"]
        for encoding, packed in (
            ("gzip", gzip.compress(body)),
            ("deflate", zlib.compress(body)),
            ("deflate", zlib.compress(body)[2:-4]),  # raw deflate, without zlib's wrapper
        ):
            r = c.post("/v2/models/m/infer", content=packed, headers={"Content-Encoding": encoding})
            assert r.status_code == 200 and r.json()["outputs"] == plain, r.text
        bomb = gzip.compress(b" " * 100_000)  # inflates past the 4096-byte limit
        r = c.post("/v2/models/m/infer", content=bomb, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413 and "inflates to more than the limit" in r.json()["error"]
        r = c.post(
            "/v2/models/m/infer",
            content=gzip.compress(body)[:-9],
            headers={"Content-Encoding": "gzip"},
        )
        assert r.status_code == 400 and "not complete gzip data" in r.json()["error"]
        r = c.post("/v2/models/m/infer", content=body, headers={"Content-Encoding": "br"})
        assert r.status_code == 400 and "'br' is not supported" in r.json()["error"]
        # the simple predict route reads encoded bodies alike
        simple = json.dumps({"data": [[[0.5] * 8] * 8]}).encode()
        want = c.post("/v1/models/m/predict", content=simple).json()["outputs"]
        for encoding, packed in (
            ("gzip", gzip.compress(simple)),
            ("deflate", zlib.compress(simple)),
        ):
            r = c.post(
                "/v1/models/m/predict", content=packed, headers={"Content-Encoding": encoding}
            )
            assert r.status_code == 200 and r.json()["outputs"] == want, r.text
        r = c.post("/v1/models/m/predict", content=bomb, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413
        r = c.post("/v1/models/m/predict", content=simple, headers={"Content-Encoding": "br"})
        assert r.status_code == 400 and "'br' is not supported" in r.json()["error"]


def test_an_unknown_model_is_a_404_even_with_a_bad_body(tmp_path: Path) -> None:
    save_slimtorch(tmp_path / "m" / "1", make_mlp(3))
    with app_client(tmp_path, api_key=KEY) as c:
        r = c.post("/v2/models/nosuch/infer", content=b"{not json")
        assert r.status_code == 404 and "nosuch" in r.json()["error"]
        r = c.post("/v2/models/m/versions/7/infer", content=b"{not json")
        assert r.status_code == 404
        assert c.post("/v2/models/m/infer", content=b"{not json").status_code == 400
