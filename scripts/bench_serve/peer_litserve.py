"""The LitServe peer: the same slimtorch model directory behind LitServe with batching.

LitServe (Lightning AI) 0.2.19, max_batch_size 32 and batch_timeout 5 ms by default (run_bench.py
passes its ``--max-batch-size`` and ``--delay-ms`` as ``--max-batch-size`` and
``--batch-timeout``), one inference worker, the same request and response JSON as the KServe v2
endpoint, on the same URL path. Needs ``litserve==0.2.19`` installed; this script installs nothing.

Usage:
    python scripts/bench_serve/peer_litserve.py --model-dir repo/mlp/1 --name mlp --port 8001
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

try:
    import litserve as ls
except ImportError:
    ls = None


_Base: Any = ls.LitAPI if ls is not None else object


class SlimAPI(_Base):  # type: ignore[misc]
    """Decode one v2 JSON request, batch, run the model, encode one v2 JSON response each."""

    model_dir = ""
    name = ""
    threads = 1

    def setup(self, device: str) -> None:
        import torch

        from slimtorch.models import load_model

        torch.set_num_threads(self.threads)
        self.model, _ = load_model(self.model_dir, device="cpu")

    # No annotations here: LitServe derives the request and response types from them.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        import torch

        inp = request["inputs"][0]
        return torch.tensor(inp["data"], dtype=torch.float32).view(inp["shape"])

    def batch(self, inputs: list[Any]) -> Any:
        import torch

        return torch.cat(inputs)

    def predict(self, x: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.model(x)

    def unbatch(self, output: Any) -> list[Any]:
        return list(output.split(1))

    def encode_response(self, output):  # type: ignore[no-untyped-def]
        return {
            "model_name": self.name,
            "outputs": [
                {
                    "name": "logits",
                    "datatype": "FP32",
                    "shape": list(output.shape),
                    "data": output.flatten().tolist(),
                }
            ],
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    args = p.parse_args(argv)
    if ls is None:
        print(
            "litserve is not installed: pip install litserve==0.2.19 (the benchmark installs "
            "nothing itself)",
            file=sys.stderr,
        )
        return 3
    api = SlimAPI(
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        api_path=f"/v2/models/{args.name}/infer",
    )
    api.model_dir, api.name, api.threads = args.model_dir, args.name, args.threads
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=60)
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
