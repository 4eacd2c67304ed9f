"""``slimtorch export``: write a saved model as ONNX or a torch.export program, and check it.

Example:
    $ slimtorch export --in runs/ptq --format onnx --out runs/ptq/model.onnx
    $ slimtorch export --in runs/base --format onnx --dtype fp16 --out base-fp16.onnx
    $ slimtorch export --in runs/base --out base.pt2     # the format follows the suffix
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slimtorch.cli.common import (
    NARROW_CONVS,
    check_not_in_source,
    check_output_path,
    model_dir_arg,
)
from slimtorch.core.io import fsync_dir, scratch_dir

logger = logging.getLogger(__name__)

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
"""The --out suffix of each --format."""

MIN_AGREEMENT = {"float": 0.99, "half": 0.97, "int8": 0.85}
"""Top-1 agreement an export needs by default, by the lowest precision it holds. int8 models
differ from their PyTorch form where ONNX Runtime requantizes (a QAT resnet20 agreed on 92% of
test images); a broken export (a forward that depends on the batch size) agrees on a few %."""


def _judge(result: dict[str, Any], precision: str, minimum: float | None) -> None:
    """Raise ``ValueError`` when the checked export agrees too little with the model."""
    kind = "int8" if "int8" in precision else "half" if "16" in precision else "float"
    if kind == "int8" and minimum is None and str(result["checked_on"]).startswith("random"):
        return  # int8 on random inputs leaves the calibrated ranges: no measure of the export
    bound = MIN_AGREEMENT[kind] if minimum is None else minimum
    agreement = result.get("top1_agreement")
    diff = float(result["max_abs_diff"])
    if (agreement is not None and agreement < bound) or diff != diff:  # NaN: broken outputs
        raise ValueError(
            f"the export disagrees with the model on {result['checked_on']}: top-1 agreement "
            f"{agreement} < {bound} ({precision}), largest output difference {diff:.4g}; not "
            "written. A forward that depends on the batch size or on values (exported for one "
            "path) does this; --min-agreement sets the bound"
        )


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a saved model to ONNX or torch.export, checked against PyTorch",
        description="Export a model directory (float, cast, pruned, factorised or int8 Q/DQ) "
        "to ONNX (dynamo exporter; int8 models become QuantizeLinear/DequantizeLinear pairs "
        "that ONNX Runtime runs with int8 kernels) or to a torch.export program (.pt2). The "
        "written file is run on 64 test images of the model's dataset (local files only; else "
        "on random inputs) and compared with the PyTorch model: largest output difference and "
        "top-1 agreement. Writes that one file and prints one JSON line.",
    )
    p.add_argument("--in", dest="model_dir", required=True, help="model or run directory")
    p.add_argument("--out", required=True, help="file to write (.onnx or .pt2)")
    p.add_argument(
        "--format",
        choices=("onnx", "pt2"),
        default=None,
        help="default: from the --out suffix (.pt2: pt2, else onnx); refused if it contradicts "
        "the suffix",
    )
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="ONNX only")
    p.add_argument("--no-check", action="store_true", help="skip the comparison run")
    p.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        help="top-1 agreement with the model the check needs for the file to be written "
        f"(default: {MIN_AGREEMENT['float']} in float32, {MIN_AGREEMENT['half']} with fp16/bf16 "
        f"weights, {MIN_AGREEMENT['int8']} with int8 ones, which are judged on test images only, "
        "not random inputs)",
    )
    p.add_argument(
        "--calibration-batches",
        type=int,
        default=8,
        help="int8 ONNX: training batches (64 images, from the model's dataset, never downloaded) "
        "to calibrate the outputs ONNX Runtime wants quantized that PTQ left float; 0: none",
    )
    p.add_argument(
        "--narrow-convs",
        choices=NARROW_CONVS,
        default="measure",
        help="int8 ONNX: run convolutions with 1-3 input channels (stems) int8 or float in ONNX "
        "Runtime; measure: time both at --batch and keep the faster",
    )
    p.add_argument("--batch", type=int, default=1, help="example batch size the choice is timed at")
    p.add_argument("--data-root", default=None, help="dataset folder (else $SLIMTORCH_DATA)")
    p.set_defaults(handler=run)


def output_format(out: str, given: str | None) -> str:
    """The format to write: ``given`` (``--format``), which must agree with the suffix of
    ``out``, else the one the suffix names, else onnx.

    Example:
        >>> output_format("m.pt2", None), output_format("m.onnx", None), output_format("m", None)
        ('pt2', 'onnx', 'onnx')
        >>> output_format("m.onnx", "pt2")
        Traceback (most recent call last):
        ...
        ValueError: --out m.onnx names a .onnx file but --format is pt2; leave --format out ...
    """
    named = FORMATS.get(Path(out).suffix.lower())
    if given is None:
        return named or "onnx"
    if named is not None and named != given:
        raise ValueError(
            f"--out {out} names a .{named} file but --format is {given}; leave --format out "
            f"(or pass --format {named}), or give an --out ending in .{given}"
        )
    return given


def _is_qdq(card: Any) -> bool:
    from slimtorch.quant.convert import TRANSFORM_NAME

    return any(t.get("name") == TRANSFORM_NAME for t in card.transforms)


def calibration_batches(card: Any, n: int, data_root: str | None) -> list[Any] | None:
    """Up to ``n`` batches of 64 training images of the model's dataset, or None with a warning.

    Only local files are used (no download): an export must not reach the network.
    """
    from slimtorch.core.errors import DataError
    from slimtorch.data import DATA_ENV_VAR, DeviceLoader
    from slimtorch.data.resolve import DOWNLOAD_OFF

    name = card.dataset
    if n <= 0:
        return None
    if not name:
        logger.warning(
            "the model does not record its dataset: int8 ONNX export without calibration"
        )
        return None
    try:
        train = card.load_split("train", root=data_root, download=False)
    except (FileNotFoundError, ValueError, DataError) as exc:  # missing, or damaged
        why = str(exc)
        if DOWNLOAD_OFF in why:  # its "what to do" names the download, which export never does
            why = (f"{why.split(DOWNLOAD_OFF)[0]}export reads local files only: pass --data-root "
                   f"DIR or set {DATA_ENV_VAR}=DIR")  # fmt: skip
        logger.warning(
            "no readable local %s training data (%s): int8 ONNX export without calibration",
            name, why,
        )  # fmt: skip
        return None
    if len(train) == 0:
        logger.warning("the local %s training split is empty: no calibration", name)
        return None
    loader = DeviceLoader(train, 64, shuffle=True, seed=0, device="cpu")
    out = []
    for i, (x, _) in enumerate(loader):
        if i >= n:
            break
        out.append(x)
    return out


CHECK_IMAGES = 64
"""Test images the written file is checked on."""


def check_inputs(card: Any, shape: tuple[int, ...], data_root: str | None) -> tuple[Any, str]:
    """The inputs the export is checked on, and what they are: the first test images of the
    model's dataset where the files are here (never downloaded), else seeded random normals.
    Random inputs leave an int8 model's calibrated ranges, so only real images say how close
    ONNX Runtime's int8 outputs are (see :func:`~slimtorch.quant.check_onnx`)."""
    import torch

    from slimtorch.core.errors import DataError
    from slimtorch.data import DeviceLoader

    name = card.dataset
    if name:
        try:
            test = card.load_split("test", root=data_root, download=False)
        except (FileNotFoundError, ValueError, DataError) as exc:
            if not isinstance(exc, FileNotFoundError):  # there, but damaged: say so
                logger.warning("the %s test split cannot be read (%s); checking the export "
                               "on random inputs", name, exc)  # fmt: skip
            test = None
        if test is not None and len(test) > 0 and tuple(test.input_shape) == shape:
            x, _ = next(iter(DeviceLoader(test, CHECK_IMAGES, device="cpu")))
            return x, f"{name} test, {x.shape[0]} images"
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
    return x, "random normal, 8 inputs"


@contextlib.contextmanager
def _checked_output(out: Path) -> Iterator[Path]:
    """A sibling temporary path to export to and check; it replaces ``out`` only once the
    check has passed. A file already at ``out`` (an earlier export) is kept when the export or
    its check fails, and no file that failed is left to be used."""
    out.parent.mkdir(parents=True, exist_ok=True)  # as train and compress make their --out
    with scratch_dir(out) as scratch:  # (what a killed export left is swept first)
        tmp = scratch / out.name
        try:
            yield tmp
        except Exception:
            if tmp.exists():
                kept = " (the file already there is unchanged)" if out.exists() else ""
                print(f"the export did not pass its check and was removed{kept}", file=sys.stderr)
            raise
        os.replace(tmp, out)
    fsync_dir(out.parent)


def run(args: argparse.Namespace) -> int:
    import torch

    from slimtorch.models import load_model

    check_output_path(args.out, "--out", folder=False, replaces=tuple(FORMATS))
    args.format = output_format(args.out, args.format)
    model_dir = model_dir_arg(args.model_dir)
    check_not_in_source(args.out, "--out", model_dir, run=False)
    model, card = load_model(model_dir, device="cpu")
    model.eval()
    shape = tuple(card.input_shape)
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    example = torch.randn(args.batch, *shape)
    result: dict[str, Any] = {"source": str(model_dir), "format": args.format, "out": args.out}
    if args.format == "onnx":
        from slimtorch.quant import check_onnx, export_onnx, ort_int8_ops
        from slimtorch.quant.export import export_precision, qdq_activation_kinds

        if args.calibration_batches < 0:
            raise ValueError(f"--calibration-batches must be >= 0, got {args.calibration_batches}")
        calib = None
        # calibrated int8 activations only: weight-only and dynamic layers need no data
        if args.dtype == "fp32" and _is_qdq(card) and "static" in qdq_activation_kinds(model):
            calib = calibration_batches(card, args.calibration_batches, args.data_root)
            result["calibration_batches"] = len(calib) if calib else 0
        with _checked_output(Path(args.out)) as path:
            export_onnx(model, path, example, dtype=args.dtype, calibration=calib,
                        narrow_convs=args.narrow_convs)  # fmt: skip
            result["precision"] = export_precision(model, args.dtype)
            if not args.no_check:
                inputs, result["checked_on"] = check_inputs(card, shape, args.data_root)
                result.update(check_onnx(model, path, inputs))
                result["int8_ops"] = ort_int8_ops(path)
                _judge(result, result["precision"], args.min_agreement)
    else:
        if args.dtype != "fp32":
            raise ValueError("--dtype applies to --format onnx only")
        from slimtorch.models import load_exported, save_exported
        from slimtorch.quant.export import export_precision

        with _checked_output(Path(args.out)) as path:
            save_exported(model, example, path)
            if not args.no_check:
                from slimtorch.quant.export import output_agreement

                with torch.no_grad():
                    inputs, result["checked_on"] = check_inputs(card, shape, args.data_root)
                    try:
                        got = load_exported(path)(inputs)
                    except Exception as exc:  # the program's guards (batch size ...)
                        first = str(exc).splitlines()[0] if str(exc) else ""
                        raise ValueError(
                            f"the exported program fails on {result['checked_on']} (inputs "
                            f"{tuple(inputs.shape)}: {type(exc).__name__}: {first}); not "
                            "written. Export with --batch of the batches it will be given"
                        ) from None
                    result.update(output_agreement(got, model(inputs)))
                _judge(result, export_precision(model), args.min_agreement)
    result["bytes"] = Path(args.out).stat().st_size
    print(json.dumps(result))
    return 0
