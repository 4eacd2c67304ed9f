"""Which version a served config is taken from, and versions that do not match it."""

from __future__ import annotations

import json
from pathlib import Path

from serve_helpers import make_mlp, write_config
from slimtorch.models import save_model
from slimtorch.serve import ServeSettings
from slimtorch.serve.repository import Repository, State


def _save(folder: Path, names: list[str], seed: int = 0) -> None:
    save_model(make_mlp(seed), folder, input_shape=(1, 8, 8), mean=[0.0], std=[1.0],
               class_names=names)  # fmt: skip


DIGITS = [f"digit{i}" for i in range(10)]
ANIMALS = ["cat", "dog", "car", "ship", "frog", "horse", "bird", "deer", "truck", "plane"]


def _scan(root: Path) -> Repository:
    repo = Repository(root, ServeSettings(repository=str(root)))
    repo.scan()
    return repo


def test_an_older_version_with_other_classes_is_not_served_with_the_newer_labels(
    tmp_path: Path,
) -> None:
    _save(tmp_path / "clf" / "1", DIGITS)
    _save(tmp_path / "clf" / "2", ANIMALS)
    write_config(tmp_path / "clf", versions="all")
    entry = _scan(tmp_path).get("clf")
    assert entry.config is not None and entry.config.labels == tuple(ANIMALS)
    assert entry.versions[2].state is not State.UNAVAILABLE
    v1 = entry.versions[1]
    assert v1.state is State.UNAVAILABLE and "other labels than version 2" in v1.reason
    # labels set in the config apply to every version: both served
    write_config(tmp_path / "clf", versions="all", labels=[str(i) for i in range(10)])
    entry = _scan(tmp_path).get("clf")
    assert all(v.state is not State.UNAVAILABLE for v in entry.versions.values())


def test_a_pinned_version_is_served_whatever_a_newer_folder_holds(tmp_path: Path) -> None:
    _save(tmp_path / "clf" / "1", DIGITS)
    _save(tmp_path / "clf" / "2", ANIMALS)
    card = tmp_path / "clf" / "2" / "config.json"
    doc = json.loads(card.read_text())
    doc["format_version"] = 99  # written by a newer release
    card.write_text(json.dumps(doc))
    write_config(tmp_path / "clf", versions=[1])
    entry = _scan(tmp_path).get("clf")
    assert entry.error == "" and entry.config is not None
    assert entry.config.labels == tuple(DIGITS) and list(entry.versions) == [1]
    # served alongside: the newer one alone is unavailable, with the card's reason
    write_config(tmp_path / "clf", versions="all")
    entry = _scan(tmp_path).get("clf")
    assert entry.error == "" and entry.config is not None
    assert entry.versions[1].state is not State.UNAVAILABLE
    assert entry.versions[2].state is State.UNAVAILABLE
    assert "format_version" in entry.versions[2].reason


def test_a_deeply_nested_json_file_breaks_only_its_model(tmp_path: Path) -> None:
    """json raises RecursionError, not ValueError, on deep nesting: one such file stopped the
    whole scan, so the server did not start."""
    deep = "[" * 100_000 + "]" * 100_000
    _save(tmp_path / "good" / "1", DIGITS)
    _save(tmp_path / "config" / "1", DIGITS)
    (tmp_path / "config" / "config.json").write_text(f'{{"labels": {deep}}}')
    _save(tmp_path / "card" / "1", DIGITS)
    (tmp_path / "card" / "1" / "config.json").write_text(f'{{"x": {deep}}}')
    repo = _scan(tmp_path)
    assert repo.get("good").error == ""
    assert "not valid JSON" in repo.get("config").error
    card = repo.get("card")
    assert "not valid JSON" in card.error or "not valid JSON" in card.versions[1].reason


def test_an_onnx_file_newer_than_onnxruntime_says_to_upgrade(tmp_path: Path) -> None:
    import onnx
    import pytest

    from serve_helpers import ONNX_B, ONNX_W, write_onnx
    from slimtorch.core.errors import ModelLoadError
    from slimtorch.serve.runners import load_runner

    write_onnx(tmp_path / "m" / "1" / "model.onnx", ONNX_W, ONNX_B)
    entry = _scan(tmp_path).get("m")
    assert entry.config is not None
    proto = onnx.load(str(tmp_path / "m" / "1" / "model.onnx"))
    proto.ir_version = 99  # written by a newer onnx than this onnxruntime reads
    onnx.save(proto, str(tmp_path / "m" / "1" / "model.onnx"))
    with pytest.raises(ModelLoadError, match=r"newer than onnxruntime .* upgrade onnxruntime"):
        load_runner(tmp_path / "m" / "1", entry.config, "cpu")


def test_a_warm_up_batch_beyond_the_admitted_memory_is_refused_before_it_is_made(
    tmp_path: Path,
) -> None:
    """A card's input shape fills a dynamic config dim at warm-up: a crafted one made the
    server allocate whatever it said, past the memory_bytes the model was admitted with."""
    import pytest

    from slimtorch.core.errors import ModelLoadError
    from slimtorch.models import create_model
    from slimtorch.serve.runners import load_runner

    save_model(create_model("resnet20", in_channels=1).eval(), tmp_path / "m" / "1",
               input_shape=(1, 600, 600), mean=[0.0], std=[1.0], class_names=DIGITS)  # fmt: skip
    inputs = [{"name": "input", "datatype": "FP32", "dims": [1, -1, -1]}]
    outputs = [{"name": "logits", "datatype": "FP32", "dims": [10]}]
    write_config(tmp_path / "m", inputs=inputs, outputs=outputs, memory_bytes=1_000_000)
    entry = _scan(tmp_path).get("m")
    assert entry.config is not None, entry.error
    with pytest.raises(ModelLoadError, match="warm-up batch of model 'm' needs 2880000 bytes"):
        load_runner(tmp_path / "m" / "1", entry.config, "cpu")


def test_dynamic_dims_are_admitted_at_the_size_the_warm_up_uses(tmp_path: Path) -> None:
    """The estimate counted a dynamic dimension as 1 while the warm-up used the trained size,
    so the warm-up bound refused an ordinary model configured with dynamic dims."""
    from slimtorch.models import create_model
    from slimtorch.serve.runners import estimate_memory, load_runner

    save_model(create_model("resnet20", in_channels=1).eval(), tmp_path / "m" / "1",
               input_shape=(1, 64, 64), mean=[0.0], std=[1.0], class_names=DIGITS)  # fmt: skip
    inputs = [{"name": "input", "datatype": "FP32", "dims": [1, -1, -1]}]
    outputs = [{"name": "logits", "datatype": "FP32", "dims": [10]}]
    write_config(tmp_path / "m", inputs=inputs, outputs=outputs)
    entry = _scan(tmp_path).get("m")
    assert entry.config is not None, entry.error
    weights = (tmp_path / "m" / "1" / "model.safetensors").stat().st_size
    need = estimate_memory(tmp_path / "m" / "1", entry.config)
    assert need == weights + 8 * entry.config.max_batch_size * (64 * 64 * 4 + 10 * 4)
    load_runner(tmp_path / "m" / "1", entry.config, "cpu").close()


def test_a_version_a_crashed_save_left_at_its_backup_is_still_served(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from serve_helpers import app_client

    _save(tmp_path / "clf" / "1", DIGITS)
    # a save into clf/1 crashed between its two renames: only the old model, at .1.old
    (tmp_path / "clf" / "1").rename(tmp_path / "clf" / ".1.old")
    entry = _scan(tmp_path).get("clf")
    assert entry.error == "" and entry.config is not None
    assert entry.config.labels == tuple(DIGITS)
    assert list(entry.versions) == [1] and entry.versions[1].state is State.AVAILABLE
    x = torch.randn(1, 1, 8, 8)
    want = make_mlp(0)(x).detach().numpy().ravel()
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip
    with app_client(tmp_path) as client:
        r = client.post("/v2/models/clf/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["outputs"][0]["data"], want, atol=1e-5)
    # the next save finishes the swap: folder 1 again, and no second version from the backup
    _save(tmp_path / "clf" / "1", ANIMALS, seed=1)
    assert not (tmp_path / "clf" / ".1.old").exists()
    entry = _scan(tmp_path).get("clf")
    assert entry.config is not None and entry.config.labels == tuple(ANIMALS)
    assert entry.versions[1].path == tmp_path / "clf" / "1"
