"""The plain FastAPI peer: one endpoint that runs the model per request, no batching.

The same request and response JSON and URL path as the KServe v2 endpoint; a synchronous
handler (FastAPI runs it in its thread pool), as a person would first write it.

Usage:
    python scripts/bench_serve/peer_fastapi.py --model-dir repo/mlp/1 --name mlp --port 8002
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch
    import uvicorn
    from fastapi import Body, FastAPI

    from slimtorch.models import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model_dir, device="cpu")
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post(f"/v2/models/{args.name}/infer")
    def infer(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        inp = body["inputs"][0]
        x = torch.tensor(inp["data"], dtype=torch.float32).view(inp["shape"])
        with torch.inference_mode():
            y = model(x)
        return {
            "model_name": args.name,
            "outputs": [
                {
                    "name": "logits",
                    "datatype": "FP32",
                    "shape": list(y.shape),
                    "data": y.flatten().tolist(),
                }
            ],
        }

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
