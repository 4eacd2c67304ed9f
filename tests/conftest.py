"""Shared test set-up: markers, real-data location, seeded defaults."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with `make test-all` (pytest --run-slow)")
    skip_gpu_flag = pytest.mark.skip(reason="gpu: run with `make test-all` (pytest --run-gpu)")
    skip_no_gpu = pytest.mark.skip(reason="gpu: no CUDA/ROCm device on this machine")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords:
            if not config.getoption("--run-gpu"):
                item.add_marker(skip_gpu_flag)
            elif not torch.cuda.is_available():
                item.add_marker(skip_no_gpu)


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """Python's own SIGINT handler during the test, restored after it.

    A process started with SIGINT ignored (a shell's background job, ``nohup ... &``) keeps it
    ignored, and the trainer rightly leaves an ignored signal alone; the tests of what a SIGINT
    does to a run need the handler a terminal's Ctrl-C would meet.
    """
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (../shared/data), set by the Makefile as SLIMTORCH_DATA.

    Fails loudly, never skips: a test that needs the real files must not pass vacuously.
    """
    root = os.environ.get("SLIMTORCH_DATA")
    if not root:
        pytest.fail("SLIMTORCH_DATA is not set; run the tests through `make test`")
    path = Path(root)
    if not (path / "fashion-mnist").is_dir() or not (path / "mnist").is_dir():
        pytest.fail(f"SLIMTORCH_DATA={path} does not hold fashion-mnist/ and mnist/")
    return path
