"""Side-by-side serving benchmark: slimtorch serve vs LitServe (batching) vs plain FastAPI.

For each model (an MLP 784-512-512-10 and LeNet-5, both on 1x28x28 float32) and each server,
in one run on the same machine: start the server as its own process with torch threads fixed,
check it answers correctly, run a closed loop of each client count (64 and 1 by default) for
``--duration`` seconds, then (slimtorch by default) an open loop at ``--overload`` times the
throughput the server itself reached at the largest client count, counting every answer (2xx, 503,
errors, timeouts) and sampling the server's resident memory. Results go to ``--out`` as JSON.

Nothing is installed: LitServe must be importable by ``--peer-python`` (``pip install
litserve==0.2.19``), else the run stops with a clear message (or pass ``--servers
slimtorch,fastapi``).

Usage:
    python scripts/bench_serve/run_bench.py --out runs/bench_serve.json --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import closed_loop, open_loop

HERE = Path(__file__).resolve().parent
READY_PATH = {"slimtorch": "/v2/health/ready", "litserve": "/health", "fastapi": "/v2/health/ready"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_models(root: Path, max_batch: int, delay_ms: float) -> dict[str, Path]:
    """Save the two models as slimtorch model directories in a repository under ``root``."""
    import torch

    from slimtorch.models import create_model, save_model

    specs = {
        "mlp": ("mlp", {"hidden": (512, 512)}),
        "cnn": ("lenet5", {}),
    }
    dirs = {}
    for name, (arch, kw) in specs.items():
        torch.manual_seed(0)
        model = create_model(arch, num_classes=10, in_channels=1, input_size=28, **kw)
        folder = root / name
        save_model(
            model,
            folder / "1",
            input_shape=(1, 28, 28),
            mean=[0.1307],
            std=[0.3081],
            class_names=[str(i) for i in range(10)],
        )
        (folder / "config.json").write_text(
            json.dumps(
                {
                    "format": "slimtorch",
                    "max_batch_size": max_batch,
                    "max_queue_delay_ms": delay_ms,
                    "max_queue_size": 256,
                }
            )
        )
        dirs[name] = folder / "1"
    return dirs


def payload(name: str) -> tuple[bytes, str]:
    """A v2 request body of one real MNIST test digit (random pixels without the data)."""
    import numpy as np

    data = os.environ.get("SLIMTORCH_DATA")
    source = "random"
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    if data and (Path(data) / "mnist" / "t10k-images-idx3-ubyte.gz").exists():
        from slimtorch.data.idx import read_idx

        img = read_idx(Path(data) / "mnist" / "t10k-images-idx3-ubyte.gz")[0]
        x = ((img.astype(np.float32) / 255 - 0.1307) / 0.3081).reshape(1, 1, 28, 28)
        source = "mnist t10k[0]"
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 1, 28, 28],
                "datatype": "FP32",
                "data": [round(float(v), 6) for v in x.ravel()],
            }
        ]
    }
    return json.dumps(body).encode(), source


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    parents: dict[int, int] = {}
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return 0
    for d in entries:
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    family, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in family]
        family.update(kids)
        frontier.extend(kids)
    total = 0
    for p in family:
        try:  # processes come and go; a busy client may also be short of file descriptors
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class RssSampler:
    """Samples a process tree's resident memory every ``period`` seconds."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((round(time.perf_counter() - t0, 2), tree_rss(self.pid)))
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        values = [v for _, v in self.samples]
        if not values:
            return {}
        return {
            "start_mb": round(values[0] / 2**20, 1),
            "end_mb": round(values[-1] / 2**20, 1),
            "max_mb": round(max(values) / 2**20, 1),
            # growth once connections and buffers are set up: flat memory means about 0
            "growth_after_first_quarter_mb": round(
                (values[-1] - values[len(values) // 4]) / 2**20, 1
            ),
            "samples": len(values),
        }


def server_cmd(
    kind: str, args: argparse.Namespace, repo: Path, model_dir: Path, name: str, port: int
) -> list[str]:
    t = str(args.threads)
    if kind == "slimtorch":
        return [
            sys.executable,
            "-m",
            "slimtorch.serve",
            "--repository",
            str(repo),
            "--port",
            str(port),
            "--threads",
            t,
            "--device",
            "cpu",
            "--no-access-log",
            "--load-policy",
            "startup",
        ]
    script = HERE / ("peer_litserve.py" if kind == "litserve" else "peer_fastapi.py")
    py = args.peer_python if kind == "litserve" else sys.executable
    cmd = [
        py,
        str(script),
        "--model-dir",
        str(model_dir),
        "--name",
        name,
        "--port",
        str(port),
        "--threads",
        t,
    ]
    if kind == "litserve":
        # the same batching as slimtorch's (set in the model directories by build_models)
        cmd += [
            "--max-batch-size",
            str(args.max_batch_size),
            "--batch-timeout",
            repr(args.delay_ms / 1000),
        ]
    return cmd


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode} before ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready at {url} within {timeout} s")


def check_answer(url: str, body: bytes) -> list[float]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.loads(r.read())
    return [round(v, 4) for v in out["outputs"][0]["data"]]


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM the server's process group (LitServe runs worker processes), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = None
    time.sleep(1)  # give the workers a moment to exit after their parent
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
    return proc.wait() if code is None else code


def run_one(
    kind: str,
    name: str,
    args: argparse.Namespace,
    repo: Path,
    model_dir: Path,
    body: bytes,
    overload_factor: float | None,
) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if kind == "litserve" and args.peer_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([args.peer_pythonpath, env.get("PYTHONPATH", "")])
    cmd = server_cmd(kind, args, repo, model_dir, name, port)
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=None if args.verbose else subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so stop() reaches every worker
    )
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v2/models/{name}/infer"
    result: dict[str, Any] = {"server": kind, "model": name, "command": " ".join(cmd)}
    try:
        wait_ready(base + READY_PATH[kind], proc)
        result["logits"] = check_answer(url, body)
        with RssSampler(proc.pid) as rss:
            for clients in args.clients:
                res = asyncio.run(closed_loop(url, body, clients, args.duration, args.warmup))
                result[f"closed_{clients}"] = res
                print(
                    f"{kind:9s} {name}: {clients:3d} clients: {res['throughput_rps']:8.1f} "
                    f"req/s, p50 {res['latency_ms']['p50']} ms, p99 "
                    f"{res['latency_ms']['p99']} ms, statuses {res['statuses']}",
                    flush=True,
                )
        result["rss_closed"] = rss.summary()
        top = result.get(f"closed_{max(args.clients)}") if args.clients else None
        overload_rate = overload_factor * top["throughput_rps"] if overload_factor and top else 0
        if overload_rate:
            with RssSampler(proc.pid) as rss:
                res = asyncio.run(
                    open_loop(
                        url,
                        body,
                        overload_rate,
                        args.overload_duration,
                        timeout=args.hang_timeout,
                        max_conns=args.overload_conns,
                    )
                )
            res["rss"] = rss.summary()
            res["rss_trace"] = rss.samples
            result["overload"] = res
            print(
                f"{kind:9s} {name}: overload at {overload_rate:.0f} req/s offered "
                f"{res['offered_rps']}: statuses {res['statuses']}, lost {res['lost']}, "
                f"RSS {res['rss']}",
                flush=True,
            )
    finally:
        result["exit_status"] = stop(proc)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--servers", default="slimtorch,litserve,fastapi")
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--clients", default="64,1", help="closed-loop client counts")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per closed loop")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of every server")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=32,
        help="largest batch, both batching servers (slimtorch, litserve)",
    )
    p.add_argument(
        "--delay-ms",
        type=float,
        default=5.0,
        help="batch timeout in ms, both batching servers (slimtorch, litserve)",
    )
    p.add_argument("--overload", type=float, default=4.0, help="x slimtorch's throughput")
    p.add_argument("--overload-servers", default="slimtorch")
    p.add_argument("--overload-duration", type=float, default=20.0)
    p.add_argument(
        "--overload-conns",
        type=int,
        default=512,
        help="open-loop connection cap (client_saturated counts requests beyond it)",
    )
    p.add_argument("--hang-timeout", type=float, default=60.0, help="a request is hung after")
    p.add_argument("--peer-python", default=sys.executable, help="python with litserve")
    p.add_argument("--peer-pythonpath", default=None, help="extra PYTHONPATH for litserve")
    p.add_argument("--verbose", action="store_true", help="show the servers' logs")
    args = p.parse_args(argv)
    if args.max_batch_size < 1:
        p.error(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if not args.delay_ms >= 0:
        p.error(f"--delay-ms must be >= 0, got {args.delay_ms:g}")
    args.clients = [int(c) for c in args.clients.split(",")]
    servers = args.servers.split(",")
    if "litserve" in servers:
        probe = subprocess.run(
            [args.peer_python, "-c", "import litserve; print(litserve.__version__)"],
            capture_output=True,
            text=True,
            env={
                **os.environ,
                **({"PYTHONPATH": args.peer_pythonpath} if args.peer_pythonpath else {}),
            },
        )
        if probe.returncode != 0:
            raise SystemExit(
                "litserve is not importable by --peer-python; install it with "
                "`pip install litserve==0.2.19` (this script installs nothing) or "
                "leave it out with --servers slimtorch,fastapi"
            )
        litserve_version = probe.stdout.strip()
    import torch

    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": args.threads,
        "litserve": litserve_version if "litserve" in servers else None,
        "uvloop": importlib.util.find_spec("uvloop") is not None,
        "httptools": importlib.util.find_spec("httptools") is not None,
        "duration_s": args.duration,
        "max_batch_size": args.max_batch_size,
        "batch_timeout_ms": args.delay_ms,
        "command": " ".join(sys.argv),
    }
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        dirs = build_models(repo, args.max_batch_size, args.delay_ms)
        for name in args.models.split(","):
            body, source = payload(name)
            meta["input"] = source
            order = ["slimtorch", *[s for s in servers if s != "slimtorch"]]
            for kind in [s for s in order if s in servers]:
                factor = args.overload if kind in args.overload_servers.split(",") else None
                res = run_one(kind, name, args, repo, dirs[name], body, factor)
                results.append(res)
    summary = compare(results, args)
    doc = {"meta": meta, "results": results, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".tmp")
    tmp_out.write_text(json.dumps(doc, indent=2))
    os.replace(tmp_out, args.out)
    print(json.dumps(summary, indent=2))
    return 0


def compare(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Ratios against the targets: throughput and p99 at most clients, p50 at one client."""
    out: dict[str, Any] = {}
    hi, lo = max(args.clients), min(args.clients)
    by = {(r["server"], r["model"]): r for r in results}
    for model in args.models.split(","):
        ours = by.get(("slimtorch", model))
        if ours is None:
            continue
        row: dict[str, Any] = {}
        lit = by.get(("litserve", model))
        if lit is not None:
            a, b = ours[f"closed_{hi}"], lit[f"closed_{hi}"]
            row[f"throughput_x_litserve_at_{hi}"] = round(
                a["throughput_rps"] / max(b["throughput_rps"], 1e-9), 2
            )
            row[f"p99_ms_at_{hi}"] = {
                "slimtorch": a["latency_ms"]["p99"],
                "litserve": b["latency_ms"]["p99"],
            }
        plain = by.get(("fastapi", model))
        if plain is not None:
            row[f"p50_ms_at_{lo}"] = {
                "slimtorch": ours[f"closed_{lo}"]["latency_ms"]["p50"],
                "fastapi": plain[f"closed_{lo}"]["latency_ms"]["p50"],
            }
        if "overload" in ours:
            ov = ours["overload"]
            row["overload"] = {
                "offered_rps": ov["offered_rps"],
                "sent_to_server_rps": ov["sent_to_server_rps"],
                "statuses": ov["statuses"],
                "lost": ov["lost"],
                "rss": ov["rss"],
            }
        out[model] = row
    return out


if __name__ == "__main__":
    sys.exit(main())
