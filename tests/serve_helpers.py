"""Model repositories, reference outputs and a live uvicorn server for the serving tests.

A module of its own (not ``conftest``) so that test files can import these helpers by a name
no other test folder uses.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.models import create_model, save_model
from slimtorch.serve.model_config import ModelConfig, TensorSpec

KEY = "test-management-key"
"""The management API key of the test apps that use one."""


def app_client(root: Path, *, api_key: str | None = None, **kw: object) -> Any:
    """A FastAPI test client of a server over the repository ``root`` (1 thread, CPU)."""
    from fastapi.testclient import TestClient

    from slimtorch.serve import ServeSettings, create_app

    settings = ServeSettings(repository=str(root), api_key=api_key, threads=1, device="cpu", **kw)  # type: ignore[arg-type]
    return TestClient(create_app(settings))


def pair_config(**kw: object) -> ModelConfig:
    """A model config with one input ``x`` and one output ``y`` of two values each."""
    return ModelConfig(
        name="m",
        format="onnx",
        inputs=(TensorSpec(name="x", dims=(2,)),),
        outputs=(TensorSpec(name="y", dims=(2,)),),
        **kw,
    )  # type: ignore[arg-type]


def write_config(folder: Path, **config: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))


def make_mlp(seed: int = 0, in_size: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(
        "mlp", num_classes=10, in_channels=1, input_size=in_size, hidden=(16,)
    ).eval()


def save_slimtorch(folder: Path, model: nn.Module, in_size: int = 8) -> None:
    save_model(
        model,
        folder,
        input_shape=(1, in_size, in_size),
        mean=[0.0],
        std=[1.0],
        class_names=[str(i) for i in range(10)],
    )


def write_onnx(path: Path, weight: np.ndarray, bias: np.ndarray, batch: str | int = "N") -> None:
    """``y = x @ weight + bias`` as an ONNX graph with a dynamic batch (or a fixed one)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


ONNX_W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
ONNX_B = np.array([1.0, -1.0, 0.5], dtype=np.float32)

IN8 = [{"name": "input", "datatype": "FP32", "dims": [1, 8, 8]}]
OUT10 = [{"name": "logits", "datatype": "FP32", "dims": [10]}]


DOCS = Path(__file__).resolve().parents[1] / "docs" / "serve.md"


class GatedModel:
    """Doubles its first input as ``y``; records batch sizes; held busy while its gate is clear."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.gate.wait(10)
        time.sleep(self.delay)
        first = next(iter(inputs.values()))
        self.sizes.append(first.shape[0])
        return {"y": first * 2}


def onnx_repo(
    root: Path, names: list[str], memory: int = 1000, pinned: tuple[str, ...] = ()
) -> Any:
    """A scanned repository of ONNX models ``x`` (4) -> ``y`` (3) declaring ``memory`` bytes each;
    model ``name``'s weights are ``eye(4, 3) * (1 + len(name))``."""
    from slimtorch.serve.repository import Repository
    from slimtorch.serve.settings import ServeSettings

    for name in names:
        write_config(
            root / name,
            format="onnx",
            memory_bytes=memory,
            inputs=[{"name": "x", "dims": [4]}],
            outputs=[{"name": "y", "dims": [3]}],
        )
        weight = np.eye(4, 3, dtype=np.float32) * (1 + len(name))
        write_onnx(root / name / "1" / "model.onnx", weight, np.zeros(3, np.float32))
    repo = Repository(root, ServeSettings(pinned=pinned))
    repo.scan()
    return repo


def docs_blocks(lang: str) -> list[str]:
    """The fenced code blocks of docs/serve.md in language ``lang``, in order."""
    import re

    return re.findall(rf"^```{lang}\n(.*?)^```", DOCS.read_text(), flags=re.M | re.S)


def slimtorch_export(model_dir: Path, out: Path, fmt: str) -> Path:
    """Run ``slimtorch export --format FMT`` (without the comparison run); returns ``out``."""
    from slimtorch.cli.main import build_parser

    args = build_parser().parse_args(
        ["export", "--in", str(model_dir), "--format", fmt, "--out", str(out), "--no-check"]
    )
    assert args.handler(args) == 0
    return out


def train_digits(out_dir: Path) -> Path:
    """A lenet5 trained on the bundled digits as `make demo` trains it; its model directory."""
    from slimtorch.train import TrainConfig
    from slimtorch.train.classifier import train_classifier

    cfg = TrainConfig(epochs=30, lr=0.05, progress=False)
    train_classifier(
        model="lenet5", dataset="digits", out_dir=out_dir, train_config=cfg, batch_size=64
    )
    return out_dir / "model"


def reference(folder: Path, x: np.ndarray) -> np.ndarray:
    from slimtorch.models import load_model

    model, _ = load_model(folder)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def live_server(settings: object) -> Iterator[str]:
    """Run ``create_app(settings)`` under uvicorn in a thread; yields ``host:port``."""
    import uvicorn

    from slimtorch.serve import create_app

    port = settings.port  # type: ignore[attr-defined]
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,  # type: ignore[arg-type]
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def logged_request_ids() -> Iterator[list[tuple[str, str]]]:
    """Collect ``(message, request id)`` of every slimtorch log record at INFO and above, the
    id as the server's log handler adds it."""
    import logging

    from slimtorch.serve.logs import RequestIdFilter

    seen: list[tuple[str, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.getMessage(), getattr(record, "request_id", "")))

    handler = Keep(logging.INFO)
    handler.addFilter(RequestIdFilter())
    log = logging.getLogger("slimtorch")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
