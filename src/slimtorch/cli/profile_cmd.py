"""``slimtorch profile``: params, size, FLOPs, measured latency here, estimates per profile."""

from __future__ import annotations

import argparse
from typing import Any

from slimtorch.cli.common import (
    add_device_args,
    apply_threads,
    check_not_in_source,
    check_output_path,
    model_choices,
    model_dir_arg,
    parse_shape,
    profile_names,
)
from slimtorch.core.errors import is_out_of_memory


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "profile",
        help="measure a model and estimate its latency on each device profile",
        description="One table: parameters, size, FLOPs, measured latency and peak memory on "
        "the device here, and the roofline latency estimate on each device profile. Writes "
        "nothing unless --json is given.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--in", dest="model_dir", help="a saved model or run directory")
    src.add_argument("--model", choices=model_choices(), help="a zoo model with random weights")
    src.add_argument(
        "--exported",
        help="your own model: a torch.export program (.pt2) with one image input",
    )
    p.add_argument(
        "--input-shape",
        default=None,
        help="C,H,W for --model (default 1,28,28) and --exported (default: read from the program)",
    )
    p.add_argument("--num-classes", type=int, default=None, help="for --model (default 10)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--profiles", default="all", help="comma-separated profile names, all (default), or none"
    )
    p.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    add_device_args(p)
    p.set_defaults(handler=run)


def _int8_note(model: Any) -> str | None:
    """What the latency measured here means for a Q/DQ int8 model (``None`` for others): int8
    kernels exist only for calibrated (static) int8 activations; weight-only int8 is
    dequantized to float by every runtime.

    Example:
        >>> from slimtorch.quant import PTQConfig, quantize_
        >>> from slimtorch.models import create_model
        >>> model = create_model("lenet5")
        >>> _ = quantize_(model, PTQConfig(mode="weight_only"))
        >>> print(_int8_note(model))
        note: this model's int8 layers are weight-only: ...
    """
    from slimtorch.quant.export import is_qdq_model, qdq_activation_kinds

    if not is_qdq_model(model):
        return None
    kinds = qdq_activation_kinds(model)
    if "static" in kinds:
        return (
            "note: this model's int8 layers run simulated in float here (slower than the float "
            "model); its int8 kernels run compiled (slimtorch.quant.compile_int8_x86) or in ONNX "
            "Runtime (slimtorch export --format onnx), and `compress --method ptq` reports both"
        )
    if set(kinds) <= {"float"}:
        return (
            "note: this model's int8 layers are weight-only: their weights are stored int8 and "
            "every runtime (here, compiled or ONNX Runtime) dequantizes them to float, so int8 "
            "saves memory, not time"
        )
    return (
        "note: this model's int8 layers run simulated in float here (slower than the float "
        "model); they quantize their inputs per batch (dynamic), with no calibrated int8 "
        "activations"
    )


def _check_sources(args: argparse.Namespace) -> None:
    """Refuse the shape options where they would be ignored, and require them where needed."""
    if args.model_dir:
        for flag, value in (
            ("--input-shape", args.input_shape),
            ("--num-classes", args.num_classes),
        ):
            if value is not None:
                raise ValueError(
                    f"{flag} {value} applies to --model and --exported; a model directory "
                    "(--in) records its own input shape and classes"
                )
    if args.exported:
        if args.num_classes is not None:
            raise ValueError(
                f"--num-classes {args.num_classes} applies to --model; an exported program "
                "has its classes built in"
            )


def _exported_shape(path: str) -> tuple[int, ...]:
    """The C,H,W of a program's one image input, read from the archive (no weights loaded)."""
    import zipfile
    from pathlib import Path

    from slimtorch.core.errors import ModelLoadError
    from slimtorch.serve.pt2_graph import read_pt2_signature

    try:
        inputs, _ = read_pt2_signature(Path(path))
    except ModelLoadError as exc:
        # --input-shape helps only where the archive opens but is laid out otherwise: a file
        # that is no zip (or a corrupt one) fails to load with it too
        other = "; or pass --input-shape C,H,W" if zipfile.is_zipfile(path) else ""
        raise ValueError(f"--exported {path}: {exc}{other}") from None
    shape = inputs[0].shape if len(inputs) == 1 else None
    if shape is None or len(shape) != 4 or any(d is None for d in shape[1:]):
        what = (
            f"{len(inputs)} inputs"
            if len(inputs) != 1
            else f"an input of shape {['?' if d is None else d for d in shape or ()]}"
        )
        raise ValueError(
            f"--exported {path} has {what}, not one fixed-size image (N, C, H, W); pass the C,H,W "
            "to profile with as --input-shape"
        )
    return tuple(int(d) for d in shape[1:] if d is not None)


def _check_runs(model: Any, example: Any, subject: str, fix: str) -> None:
    """Run ``model`` once on ``example``, turning a shape it refuses into one clear error."""
    import torch

    from slimtorch.quant.precision import hand_mixed_dtypes

    try:
        with torch.no_grad():
            model(example)
    except (AssertionError, RuntimeError, ValueError) as exc:
        if is_out_of_memory(exc):
            raise
        lines = str(exc).strip().splitlines()
        why = lines[0] if lines else type(exc).__name__
        # torch's dtype clashes all say "type" ("Input type (float) and bias type (c10::Half)")
        if "type" in why.lower() and (dtypes := hand_mixed_dtypes(model)):
            raise ValueError(
                f"{subject} does not run on {str(example.dtype).removeprefix('torch.')} inputs "
                f"({why}): its weights mix {', '.join(dtypes)} with no casts between the "
                "layers; load it, call model.float() and save it again (then `slimtorch "
                "compress --method fp16` casts it with the needed casts)"
            ) from None
        raise ValueError(
            f"{subject} does not run on inputs of shape {tuple(example.shape)} ({why}); {fix}"
        ) from None


def run(args: argparse.Namespace) -> int:
    import torch

    from slimtorch.core.devices import resolve_device
    from slimtorch.core.io import atomic_write_json
    from slimtorch.core.measure import profile_model

    apply_threads(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_sources(args)
    if args.json_out is not None:
        check_output_path(args.json_out, "--json", folder=False, replaces=(".json",))
        if args.model_dir:
            check_not_in_source(args.json_out, "--json", model_dir_arg(args.model_dir), run=False)
    device = resolve_device(args.device)
    if args.model_dir:
        from slimtorch.models import load_model

        model, card = load_model(model_dir_arg(args.model_dir), device=device)
        shape = tuple(card.input_shape)
        name = args.model_dir
    elif args.exported:
        from pathlib import Path

        from slimtorch.models import load_exported

        if not Path(args.exported).is_file():
            raise ValueError(f"--exported {args.exported} does not exist or is not a file")
        if Path(args.exported).suffix.lower() == ".onnx":
            raise ValueError(
                f"--exported takes a torch.export program (.pt2), not the ONNX file "
                f"{args.exported}; profile the model it was exported from with --in"
            )
        shape = (
            parse_shape(args.input_shape) if args.input_shape else _exported_shape(args.exported)
        )
        model = load_exported(args.exported, device=device)
        name = args.exported
    else:
        from slimtorch.models import create_model

        shape = parse_shape(args.input_shape or "1,28,28")
        if shape[1] != shape[2]:
            raise ValueError(
                f"--input-shape {args.input_shape}: the zoo models take square images (H == W), "
                f"got {shape[1]}x{shape[2]}"
            )
        model = create_model(
            args.model,
            num_classes=10 if args.num_classes is None else args.num_classes,
            in_channels=shape[0],
            input_size=shape[1],
        ).to(device)
        name = args.model
    names = profile_names(args.profiles)
    if not args.exported:
        model.eval()  # an exported program keeps the mode it was exported in
    example = torch.randn(args.batch_size, *shape, device=device)
    if args.exported:
        _check_runs(model, example, f"the exported program {args.exported}",
                    "pass the C,H,W it was exported for as --input-shape (and a --batch-size "
                    "it accepts)")  # fmt: skip
    elif args.model_dir:
        _check_runs(model, example, f"the model in {args.model_dir}",
                    "the input_shape its config.json records does not fit its architecture; "
                    "re-save the model")  # fmt: skip
    result = profile_model(model, example, device=device, profiles=names, threads=args.threads)
    print(f"{name}: batch {args.batch_size}, input {tuple(shape)}")
    print(result.to_table())
    if isinstance(model, torch.nn.Module):
        note = _int8_note(model)
        if note:
            print(note)
    if args.json_out:
        atomic_write_json(args.json_out, result.to_dict())
    return 0
