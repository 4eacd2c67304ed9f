"""A request body is bounded by what the model can take, and big ones are parsed off the loop."""

from __future__ import annotations

import gzip
import json
import threading
from pathlib import Path

import pytest

from serve_helpers import app_client, make_mlp, save_slimtorch, write_config
from slimtorch.serve import infer
from slimtorch.serve.protocol import codec


def _body(batch: int) -> bytes:
    x = {"name": "input", "shape": [batch, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64 * batch}
    return json.dumps({"inputs": [x]}).encode()


def test_a_small_gzip_body_cannot_inflate_past_what_the_model_takes(tmp_path: Path) -> None:
    save_slimtorch(tmp_path / "m" / "1", make_mlp(3))
    write_config(tmp_path / "m", max_batch_size=2)  # 2 x 64 values: a cap of 72 KiB
    cap = 2 * 64 * infer.JSON_BYTES_PER_VALUE + 64 * 1024
    padded = _body(1).replace(b"{", b"{" + b" " * (cap + 10), 1)  # valid JSON, too long
    bomb = gzip.compress(padded)
    assert len(bomb) < 2048
    with app_client(tmp_path) as c:
        assert c.post("/v2/models/m/infer", content=_body(2)).status_code == 200
        for route, body in (("/v2/models/m/infer", bomb), ("/v1/models/m/predict", bomb)):
            r = c.post(route, content=body, headers={"Content-Encoding": "gzip"})
            assert r.status_code == 413, r.text
            assert f"over {cap} bytes, more than model 'm' can take" in r.json()["error"]
        r = c.post("/v2/models/m/infer", content=padded)  # sent uncompressed: the same cap
        assert r.status_code == 413 and "max_batch_size 2" in r.json()["error"]


def test_big_bodies_are_parsed_on_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[tuple[int, int]] = []
    parse = codec.parse_request

    def spy(body: bytes, header_length: str | None) -> codec.DecodedRequest:
        threads.append((len(body), threading.get_ident()))
        return parse(body, header_length)

    monkeypatch.setattr(infer, "parse_request", spy)
    save_slimtorch(tmp_path / "m" / "1", make_mlp(3))
    write_config(tmp_path / "m", max_batch_size=1024)
    big = _body(1024)  # 65,536 values: over OFF_LOOP_BYTES as JSON
    assert len(big) > infer.OFF_LOOP_BYTES
    with app_client(tmp_path) as c:
        assert c.post("/v2/models/m/infer", content=_body(1)).status_code == 200
        assert c.post("/v2/models/m/infer", content=big).status_code == 200
    (_, small_thread), (_, big_thread) = threads
    assert small_thread != big_thread  # the small one on the event loop, the big one not
