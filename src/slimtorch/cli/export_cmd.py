"""``slimtorch export``: write a saved model as ONNX or a torch.export program, and check it.

Example:
    $ slimtorch export --in runs/ptq --format onnx --out runs/ptq/model.onnx
    $ slimtorch export --in runs/base --format onnx --dtype fp16 --out base-fp16.onnx
    $ slimtorch export --in runs/base --format pt2 --out base.pt2
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from slimtorch.cli.common import resolve_model_dir


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a saved model to ONNX or torch.export, checked against PyTorch",
        description="Export a model directory (float, cast, pruned, factorised or int8 Q/DQ) "
        "to ONNX (dynamo exporter; int8 models become QuantizeLinear/DequantizeLinear pairs "
        "that ONNX Runtime runs with int8 kernels) or to a torch.export program (.pt2). The "
        "written file is run on random inputs and compared with the PyTorch model.",
    )
    p.add_argument("--in", dest="model_dir", required=True, help="model or run directory")
    p.add_argument("--out", required=True, help="file to write (.onnx or .pt2)")
    p.add_argument("--format", choices=("onnx", "pt2"), default="onnx")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="ONNX only")
    p.add_argument("--no-check", action="store_true", help="skip the comparison run")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from slimtorch.models import load_model

    model_dir = resolve_model_dir(args.model_dir)
    model, card = load_model(model_dir, device="cpu")
    model.eval()
    shape = tuple(card.input_shape)
    example = torch.randn(2, *shape)
    result: dict[str, Any] = {"source": str(model_dir), "format": args.format, "out": args.out}
    if args.format == "onnx":
        from slimtorch.quant import compare_onnx, export_onnx, ort_int8_ops

        path = export_onnx(model, args.out, example, dtype=args.dtype)
        result["dtype"] = args.dtype
        if not args.no_check:
            inputs = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
            result["max_abs_diff"] = compare_onnx(model, path, inputs)
            result["int8_ops"] = ort_int8_ops(path)
    else:
        if args.dtype != "fp32":
            raise ValueError("--dtype applies to --format onnx only")
        from slimtorch.models import load_exported, save_exported

        path = save_exported(model, example, args.out)
        if not args.no_check:
            inputs = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                diff = (load_exported(path)(inputs) - model(inputs)).abs().max().item()
            result["max_abs_diff"] = diff
    result["bytes"] = path.stat().st_size
    print(json.dumps(result))
    return 0
