"""``slimtorch profile``: params, size, FLOPs, measured latency here, estimates per profile."""

from __future__ import annotations

import argparse
from typing import Any

from slimtorch.cli.common import (
    MODELS,
    add_device_args,
    apply_threads,
    parse_shape,
    resolve_model_dir,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "profile",
        help="measure a model and estimate its latency on each device profile",
        description="One table: parameters, size, FLOPs, measured latency and peak memory on "
        "the device here, and the roofline latency estimate on each device profile.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--in", dest="model_dir", help="a saved model directory")
    src.add_argument("--model", choices=MODELS, help="a zoo model with random weights")
    src.add_argument(
        "--exported", help="your own model: a torch.export program (.pt2); pass --input-shape"
    )
    p.add_argument("--input-shape", default="1,28,28", help="C,H,W for --model (default 1,28,28)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--profiles", default="all", help="comma-separated profile names, or all (default)"
    )
    p.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    add_device_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from slimtorch.core.devices import resolve_device
    from slimtorch.core.io import atomic_write_json
    from slimtorch.core.measure import profile_model
    from slimtorch.core.profiles import get_profile, list_profiles

    apply_threads(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    if args.model_dir:
        from slimtorch.models import load_model

        model, card = load_model(resolve_model_dir(args.model_dir), device=device)
        shape = tuple(card.input_shape)
        name = args.model_dir
    elif args.exported:
        from slimtorch.models import load_exported

        shape = parse_shape(args.input_shape)
        model = load_exported(args.exported, device=device)
        name = args.exported
    else:
        from slimtorch.models import create_model

        shape = parse_shape(args.input_shape)
        model = create_model(
            args.model,
            num_classes=args.num_classes,
            in_channels=shape[0],
            input_size=shape[1],
        ).to(device)
        name = args.model
    names = list_profiles() if args.profiles == "all" else args.profiles.split(",")
    for n in names:
        get_profile(n)  # unknown names fail here with the list of choices
    if not args.exported:
        model.eval()  # an exported program keeps the mode it was exported in
    example = torch.randn(args.batch_size, *shape, device=device)
    result = profile_model(model, example, device=device, profiles=names, threads=args.threads)
    print(f"{name}: batch {args.batch_size}, input {tuple(shape)}")
    print(result.to_table())
    from slimtorch.quant.export import is_qdq_model

    if isinstance(model, torch.nn.Module) and is_qdq_model(model):
        print(
            "note: this model's int8 layers run simulated in float here (slower than the float "
            "model); its int8 kernels run compiled (slimtorch.quant.compile_int8_x86) or in ONNX "
            "Runtime (slimtorch export --format onnx), and `compress --method ptq` reports both"
        )
    if args.json_out:
        atomic_write_json(args.json_out, result.to_dict())
    return 0
