"""Start ``slimtorch serve`` on the demo's models, send real requests, stop it gracefully.

Serves every slimtorch model directory under ``--runs-dir`` (``make demo`` writes runs/demo,
runs/demo-svd and runs/demo-svd-guarded: LeNet-5 on scikit-learn's 8x8 digits), then for each
model that takes 8x8 inputs sends real test-split digits through the KServe v2 endpoint and the
simple JSON endpoint (other models found there are served but not sent digits),
prints the predictions against the true labels, and stops the server with SIGTERM.
Only the standard library talks HTTP here, so the demo needs nothing beyond slimtorch[serve].

Usage:
    python scripts/bench_serve/demo_client.py --runs-dir runs --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before ready")
        try:
            if call(base + "/v2/health/ready")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready within {timeout:.0f} s")


def digits(n: int) -> tuple[Any, Any]:
    from slimtorch.data.digits import load_digits_dataset

    test = load_digits_dataset("test")
    return test.images[:n].float() / 255.0, test.labels[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default="runs", help="folder holding the model directories")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    p.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    p.add_argument("--requests", type=int, default=8, help="digits sent per model")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for ready")
    args = p.parse_args(argv)

    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    key = secrets.token_hex(16)
    env = {**os.environ, "SLIMTORCH_SERVE_API_KEY": key}
    cmd = [
        sys.executable,
        "-m",
        "slimtorch.serve",
        "--runs-dir",
        args.runs_dir,
        "--port",
        str(port),
        "--threads",
        str(args.threads),
        "--device",
        "cpu",
        "--no-access-log",
    ]
    print("starting:", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)
    failures = 0
    try:
        wait_ready(base, proc, args.timeout)
        status, index = call(base + "/v2/repository/index", {}, {"X-API-Key": key})
        if status != 200 or not index:
            raise SystemExit(f"no models to serve under {args.runs_dir} ({status}: {index})")
        images, labels = digits(args.requests)
        from slimtorch.cli.common import model_dir_arg
        from slimtorch.models import read_model_card

        sent = 0
        for row in index:
            name = row["name"]
            card = read_model_card(model_dir_arg(str(Path(args.runs_dir) / name), "--runs-dir"))
            if tuple(card.input_shape) != tuple(images.shape[1:]):
                # another model under the same runs folder (e.g. a Fashion-MNIST run): it is
                # served too, but 8x8 digits are not its input
                print(f"{name}: served; input {list(card.input_shape)}, not sent 8x8 digits")
                continue
            sent += 1
            mean = images.new_tensor(card.mean).view(-1, 1, 1)
            std = images.new_tensor(card.std).view(-1, 1, 1)
            x = ((images - mean) / std).numpy()
            body = {
                "id": f"demo-{name}",
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "data": x.ravel().tolist(),
                    }
                ],
            }
            t0 = time.perf_counter()
            status, out = call(f"{base}/v2/models/{name}/infer", body)
            ms = (time.perf_counter() - t0) * 1000
            if status != 200:
                print(f"{name}: v2 infer failed with {status}: {out}")
                failures += 1
                continue
            logits = out["outputs"][0]["data"]
            k = len(card.class_names)
            preds = [max(range(k), key=lambda j, r=r: logits[r * k + j]) for r in range(len(x))]
            right = sum(int(p_ == int(t)) for p_, t in zip(preds, labels, strict=True))
            print(
                f"{name}: v2 infer of {len(x)} digits in {ms:.1f} ms: predicted {preds}, "
                f"true {labels.tolist()} ({right}/{len(x)} right)"
            )
            status, simple = call(f"{base}/v1/models/{name}/predict", {"data": x[0].tolist()})
            if status != 200:
                print(f"{name}: simple predict failed with {status}: {simple}")
                failures += 1
                continue
            top = simple["predictions"][0]
            print(
                f"{name}: simple JSON predict of one digit (true {int(labels[0])}): label "
                f"{top['label']} with probability {top['score']:.3f}"
            )
        if sent == 0:
            print(f"no model under {args.runs_dir} takes 8x8 digits")
            failures += 1
        status, _ = call(f"{base}/v2/models/{index[0]['name']}/infer", {"inputs": []})
        print(f"a malformed request is refused with {status}")
        failures += status != 400
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            failures += 1
        # uvicorn re-raises the signal after its graceful shutdown: -SIGTERM is a clean stop
        clean = code in (0, -signal.SIGTERM)
        failures += not clean
        print(f"server stopped {'gracefully' if clean else 'with an error'} (status {code})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
