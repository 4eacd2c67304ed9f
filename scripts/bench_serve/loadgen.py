"""A small HTTP/1.1 load generator: closed loop (N clients) or open loop (fixed rate).

Raw asyncio streams with keep-alive and pre-built request bytes, so the generator itself costs
little CPU on the same small machine as the server. Every request ends as a status code, a
connection error or a timeout ("hung"); nothing is dropped silently.

Usage:
    python scripts/bench_serve/loadgen.py --url http://127.0.0.1:8000/v2/models/mlp/infer \
        --body payload.json --clients 64 --duration 20 --out result.json
    python scripts/bench_serve/loadgen.py --url ... --body payload.json --rate 200 --warmup 2

Both loops send for ``--warmup`` seconds first and leave those requests out of the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from slimtorch.core.io import atomic_write_text


@dataclass
class Outcome:
    """Per-request results of one run."""

    latencies: list[float] = field(default_factory=list)  # seconds, answered requests
    statuses: Counter[str] = field(default_factory=Counter)
    sent: int = 0

    def summary(self, seconds: float) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None

        ok = sum(v for k, v in self.statuses.items() if k.startswith("2"))
        return {
            "sent": self.sent,
            "answered": len(lat),
            "statuses": dict(self.statuses),
            "ok": ok,
            "seconds": round(seconds, 3),
            "throughput_rps": round(ok / seconds, 1) if seconds else 0.0,
            "latency_ms": {
                "p50": pct(0.50),
                "p90": pct(0.90),
                "p99": pct(0.99),
                "max": round(lat[-1] * 1000, 3) if lat else None,
                "mean": round(statistics.fmean(lat) * 1000, 3) if lat else None,
            },
        }


def build_request(
    url: str,
    body: bytes,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[str, int, bytes]:
    """``(host, port, request bytes)`` of a keep-alive POST."""
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST {u.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}"
        "Connection: keep-alive\r\n\r\n"
    ).encode()
    return host, port, head + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """``(status, keep_alive, body)`` of one response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    else:
        body = await reader.read()
    keep = headers.get("connection", "").lower() != "close"
    return status, keep, body


async def _request(
    conn: list[Any],
    host: str,
    port: int,
    payload: bytes,
    timeout: float,
    out: Outcome,
    record: bool,
) -> None:
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            if conn[0] is None:
                conn[0] = await asyncio.open_connection(host, port)
            reader, writer = conn[0]
            writer.write(payload)
            status, keep, _ = await read_response(reader)
    except TimeoutError:
        _close(conn)
        if record:
            out.statuses["timeout"] += 1
        return
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        _close(conn)
        if record:
            out.statuses[f"error:{type(exc).__name__}:{getattr(exc, 'errno', '')}"] += 1
        return
    if not keep:
        _close(conn)
    if record:
        out.latencies.append(time.perf_counter() - t0)
        out.statuses[str(status)] += 1


def _close(conn: list[Any]) -> None:
    if conn[0] is not None:
        conn[0][1].close()
        conn[0] = None


async def closed_loop(
    url: str,
    body: bytes,
    clients: int,
    duration: float,
    warmup: float = 2.0,
    timeout: float = 60.0,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``clients`` connections, each sending its next request when the last one returns."""
    host, port, payload = build_request(url, body, content_type, headers)
    out = Outcome()
    start = time.perf_counter()
    measure_from = start + warmup
    stop = measure_from + duration

    async def client() -> None:
        conn: list[Any] = [None]
        while (now := time.perf_counter()) < stop:
            record = now >= measure_from
            if record:
                out.sent += 1
            await _request(conn, host, port, payload, timeout, out, record)
        _close(conn)

    await asyncio.gather(*(client() for _ in range(clients)))
    # requests started before `stop` finish after it: divide by the span actually measured
    return {"mode": "closed", "clients": clients, **out.summary(time.perf_counter() - measure_from)}


async def open_loop(
    url: str,
    body: bytes,
    rate: float,
    duration: float,
    timeout: float = 60.0,
    max_conns: int = 512,
    warmup: float = 0.0,
) -> dict[str, Any]:
    """Requests at ``rate`` per second (Poisson arrivals), whatever the answers take.

    Each request uses an idle keep-alive connection or opens a new one (at most ``max_conns``
    open; a request that finds none is counted as ``client_saturated``, never silently lost).
    Requests sent in the first ``warmup`` seconds are not counted; ``duration`` seconds of
    measured arrivals follow.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests per second, got {rate}")
    host, port, payload = build_request(url, body)
    out = Outcome()
    idle: list[list[Any]] = []
    open_conns = 0
    tasks: set[asyncio.Task[None]] = set()
    rng = random.Random(0)

    async def one(conn: list[Any], record: bool) -> None:
        nonlocal open_conns
        await _request(conn, host, port, payload, timeout, out, record)
        if conn[0] is not None:
            idle.append(conn)
        else:
            open_conns -= 1

    start = time.perf_counter()
    measure_from = start + warmup
    next_at = start
    while next_at < measure_from + duration:
        next_at += rng.expovariate(rate)
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        record = next_at >= measure_from
        if record:
            out.sent += 1
        if idle:  # take the connection now, so that no two requests share one
            conn = idle.pop()
        elif open_conns < max_conns:
            conn = [None]
            open_conns += 1
        else:
            if record:
                out.statuses["client_saturated"] += 1
            continue
        task = asyncio.get_running_loop().create_task(one(conn, record))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    elapsed = max(time.perf_counter() - measure_from, 1e-9)
    offered = out.sent / elapsed
    await asyncio.gather(*tasks)
    for conn in idle:
        _close(conn)
    res = out.summary(time.perf_counter() - measure_from)
    lost = out.sent - sum(out.statuses.values())
    reached = out.sent - out.statuses.get("client_saturated", 0)
    return {
        "mode": "open",
        "rate": rate,
        "warmup_s": warmup,
        "offered_rps": round(offered, 1),
        # requests that reached the server (the rest found all max_conns connections busy)
        "sent_to_server_rps": round(reached / elapsed, 1),
        "max_conns": max_conns,
        "lost": lost,
        **res,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="closed- or open-loop HTTP load")
    p.add_argument("--url", required=True)
    p.add_argument("--body", required=True, help="file holding the request body")
    p.add_argument("--clients", type=int, default=64, help="closed loop: concurrent clients")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open loop: requests per second (> 0); without it, the closed loop of --clients",
    )
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    p.add_argument(
        "--warmup", type=float, default=2.0, help="seconds sent first and not counted (both loops)"
    )
    p.add_argument("--out", default=None, help="write the JSON result here (atomically)")
    args = p.parse_args(argv)
    if args.rate is not None and not args.rate > 0:
        p.error(f"--rate must be > 0 requests per second, got {args.rate:g} (leave --rate out "
                "for the closed loop)")  # fmt: skip
    if args.rate is None and args.clients < 1:
        p.error(f"--clients must be >= 1, got {args.clients}")
    if not args.duration > 0:
        p.error(f"--duration must be > 0 seconds, got {args.duration:g}")
    if not args.warmup >= 0:
        p.error(f"--warmup must be >= 0 seconds, got {args.warmup:g}")
    try:
        with open(args.body, "rb") as fh:
            body = fh.read()
    except OSError as exc:
        p.error(f"--body {args.body}: cannot read it ({exc.strerror or exc})")
    if args.rate is not None:
        res = asyncio.run(open_loop(args.url, body, args.rate, args.duration, warmup=args.warmup))
    else:
        res = asyncio.run(closed_loop(args.url, body, args.clients, args.duration, args.warmup))
    text = json.dumps(res, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
