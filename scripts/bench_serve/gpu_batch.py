"""Throughput behind the server vs the raw model, per batch size (resnet20, vgg11-bn).

For each model (3x32x32 inputs, 10 classes, random weights) and each batch size (1..256):

* raw: ``model(x)`` on the device with the input already there, and with a host-to-device
  copy per call (what a server must do), items per second from CUDA-synchronised timings;
* served: ``slimtorch serve`` on the same device, requests of that batch size sent as binary
  tensor data (KServe v2 binary extension) by ``--clients`` closed-loop clients; items/s.

Runs on the CPU too (``--device cpu``) for a smoke test. Results go to ``--out`` as JSON.

Usage:
    python scripts/bench_serve/gpu_batch.py --device cuda --out runs/bench_serve_gpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import closed_loop


def raw_throughput(model: Any, batch: int, device: str, seconds: float) -> dict[str, float]:
    import torch

    from slimtorch.core.devices import synchronize

    x_host = torch.randn(batch, 3, 32, 32)
    x_dev = x_host.to(device)
    out: dict[str, float] = {}
    for label, make in (("resident", lambda: x_dev), ("with_copy", lambda: x_host.to(device))):
        with torch.inference_mode():
            for _ in range(3):
                model(make())
            synchronize(device)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                model(make()).to("cpu") if label == "with_copy" else model(make())
                n += 1
            synchronize(device)
            out[f"raw_{label}_items_per_s"] = round(n * batch / (time.perf_counter() - t0), 1)
    return out


def binary_body(batch: int) -> tuple[bytes, int]:
    import numpy as np

    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)
    raw = x.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + raw, len(head)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="resnet20,vgg11-bn")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--seconds", type=float, default=5.0, help="per point")
    p.add_argument("--clients", type=int, default=4, help="closed-loop clients (served)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    from slimtorch.models import create_model, load_model, save_model

    torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = create_model(name, num_classes=10, in_channels=3, input_size=32)
            save_model(
                model,
                repo / name / "1",
                input_shape=(3, 32, 32),
                mean=[0.5] * 3,
                std=[0.25] * 3,
                class_names=[str(i) for i in range(10)],
            )
            (repo / name / "config.json").write_text(
                json.dumps(
                    {
                        "format": "slimtorch",
                        "max_batch_size": max(sizes),
                        "max_queue_delay_ms": 0,
                        "device": args.device,
                        "pinned": True,
                    }
                )
            )
        from socket import socket

        with socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "slimtorch.serve",
            "--repository",
            str(repo),
            "--port",
            str(port),
            "--threads",
            str(args.threads),
            "--device",
            args.device,
            "--no-access-log",
        ]
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready") as r:
                        if r.status == 200:
                            break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.3)
            for name in args.models.split(","):
                model, _ = load_model(repo / name / "1", device=args.device)
                for b in sizes:
                    row: dict[str, Any] = {"model": name, "batch": b}
                    row.update(raw_throughput(model, b, args.device, args.seconds))
                    body, head_len = binary_body(b)
                    res = asyncio.run(
                        closed_loop(
                            f"http://127.0.0.1:{port}/v2/models/{name}/infer",
                            body,
                            args.clients,
                            args.seconds,
                            warmup=1.0,
                            content_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(head_len)},
                        )
                    )
                    row["served_items_per_s"] = round(res["throughput_rps"] * b, 1)
                    row["served_p50_ms"] = res["latency_ms"]["p50"]
                    row["served_statuses"] = res["statuses"]
                    row["served_vs_raw_with_copy"] = round(
                        row["served_items_per_s"] / max(row["raw_with_copy_items_per_s"], 1e-9), 3
                    )
                    print(json.dumps(row), flush=True)
                    results.append(row)
                del model
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda") and torch.cuda.is_available()
        else "cpu"
    )
    doc = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": device_name,
            "torch": torch.__version__,
            "clients": args.clients,
            "threads": args.threads,
            "command": " ".join(sys.argv),
        },
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(doc, indent=2))
    os.replace(tmp_out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
