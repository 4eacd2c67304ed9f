"""``slimtorch compress``: compress a trained model, fine-tune it, report before/after.

Example:
    $ slimtorch compress --in runs/base --out runs/tucker --method tucker --rank 0.25
    $ slimtorch compress --in runs/base --out runs/p90 --method prune --sparsity 0.9 \\
        --scope global --gradual --finetune-epochs 20
    $ slimtorch compress --in runs/base --out runs/x --method nm --set n=2 --set m=4
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from slimtorch.cli.common import (
    DATASET_HELP,
    add_device_args,
    apply_threads,
    check_not_in_source,
    check_output_path,
    check_run_output,
    claim_run_folder,
    dataset_arg,
    model_dir_arg,
    options_that_need,
    profile_names,
    quiet_autotune,
    report_removed,
)
from slimtorch.train.classifier import remove_stale_outputs

# defaults of the options that act only with --distill (parsed as None so that giving one
# without --distill can be refused)
DISTILL_DEFAULTS: dict[str, object] = {"distill_temperature": 4.0, "distill_alpha": 0.9}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compress",
        help="compress a trained model (factorise, prune ...), fine-tune, report before/after",
        description="Compress a saved model (low-rank factorisation: svd, tucker, cp, tt; "
        "pruning: prune (unstructured magnitude), nm (N:M), channel-prune (structured); "
        "and the other registered methods), then fine-tune. Writes --out/model (a loadable "
        "model directory), and in --out report.json and report.txt with the per-layer report "
        "and the before/after table (accuracy, params, FLOPs, measured latency, estimated "
        "latency on the target profiles); a fine-tune adds checkpoint.pt, history.json and "
        "train_config.json, prune and nm add model.compact.safetensors. An --out that already "
        "holds a run is refused unless --overwrite is given, and one that another slimtorch "
        "command is writing is refused (the file .slimtorch-run marks and locks the folder).",
    )
    p.add_argument("--in", dest="model_dir", required=True, help="model or run directory")
    p.add_argument("--out", required=True, help="run directory to write (the model in --out/model)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the model (and reports) --out already holds, and remove the run files "
        "the new run does not write again (an old checkpoint.pt); without it such an --out "
        "is refused",
    )
    p.add_argument("--method", required=True, choices=_methods())
    p.add_argument(
        "--rank",
        default=None,
        help="decomposition rank: fraction in (0,1], integer rank, vbmf, energy:0.9, or "
        "budget:params=0.33 or budget:params=0.33,flops=0.5 (default 0.25)",
    )
    p.add_argument("--sparsity", type=float, default=None, help="prune: fraction of zeros")
    p.add_argument(
        "--scope", default=None, help="prune: layer or global; channel-prune: local or global"
    )
    p.add_argument(
        "--ratio", type=float, default=None, help="channel-prune: fraction of channels removed"
    )
    p.add_argument(
        "--gradual",
        action="store_true",
        help="prune: raise sparsity gradually during fine-tuning (Zhu & Gupta schedule)",
    )
    p.add_argument(
        "--set",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any field of the method's config, value as JSON or text (repeatable)",
    )
    p.add_argument("--include", action="append", default=None, help="layer glob (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="layer glob (repeatable)")
    p.add_argument("--round-to", type=int, default=None, help="round ranks to a multiple")
    p.add_argument(
        "--min-speedup",
        type=float,
        default=None,
        help="keep a factorised layer only if it is at least this much faster",
    )
    p.add_argument(
        "--speed-on", default=None, help="measured (default) or a device profile name, e.g. rx580"
    )
    p.add_argument(
        "--speed-batch",
        default=None,
        help="batch size(s) of the speed check, comma-separated (a layer must be faster at all)",
    )
    p.add_argument(
        "--speed-channels-last",
        action="store_true",
        help="run the speed check in channels-last (NHWC) layout, as the model will be deployed",
    )
    p.add_argument(
        "--speed-scope",
        choices=("layer", "model"),
        default=None,
        help="time each factorised layer alone (layer, default) or the whole model with and "
        "without it (model)",
    )
    p.add_argument(
        "--speed-compile",
        action="store_true",
        help="with --speed-scope model: time the models under torch.compile",
    )
    p.add_argument("--strict", action="store_true", help="fail instead of skipping layers")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    p.add_argument(
        "--bn-recalibration",
        type=int,
        default=100,
        metavar="N",
        help="after fine-tuning, re-estimate batch-norm statistics over N training batches "
        "with the weights fixed (0: keep the running averages)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--amp", choices=("off", "auto", "bf16", "fp16"), default="auto")
    p.add_argument(
        "--dataset",
        type=dataset_arg,
        default=None,
        help=f"{DATASET_HELP}; default: the dataset it was trained on",
    )
    p.add_argument("--data-root", default=None, help="dataset folder (else $SLIMTORCH_DATA)")
    p.add_argument("--profile-batch", type=int, default=32, help="batch of the latency figures")
    p.add_argument(
        "--profiles", default="rx580", help="comma-separated profiles to estimate on, all, or none"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--distill",
        action="store_true",
        help="fine-tune by distillation from the uncompressed model (frozen teacher)",
    )
    p.add_argument(
        "--distill-temperature",
        type=float,
        default=None,
        help="with --distill: softmax temperature (default 4)",
    )
    p.add_argument(
        "--distill-alpha",
        type=float,
        default=None,
        help="with --distill: weight of the soft loss (default 0.9)",
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=None,
        metavar="POINTS",
        help="accuracy guard: do not write the model if test accuracy falls by more than this "
        "many percentage points (exit status 3; report.json is still written)",
    )
    p.add_argument("--no-progress", action="store_true")
    add_device_args(p)
    p.set_defaults(handler=run)


def _summary(report: dict[str, Any]) -> str:
    """One line on what the method changed, whatever shape its report has; report.txt is
    pointed to only where some layers were left as they were.

    Example:
        >>> _summary({"layers": [{"action": "gemm"}, {"action": "skipped"}]})
        'layers changed: 1 of 2 (see report.txt for the 1 left unchanged)'
        >>> _summary({"layers": [{"dtype": "float32"}, {"dtype": "float16"}]})  # a cast
        'layers changed: 1 of 2 (see report.txt for the 1 left unchanged)'
        >>> _summary({"layers": ["conv1", "fc"], "skipped": {}})
        'layers changed: 2 of 2'
    """

    def line(unit: str, done: int, total: int) -> str:
        rest = f" (see report.txt for the {total - done} left unchanged)" if done < total else ""
        return f"{unit} changed: {done} of {total}{rest}"

    for key, unit in (("layers", "layers"), ("groups", "channel groups"), ("rows", "layers")):
        rows = [r for r in report.get(key, []) if isinstance(r, dict)]
        if rows:
            unchanged = ("skipped", "kept", "unchanged", "fixed")
            done = sum(
                1
                for r in rows
                # a cast's rows name the dtype a layer has now; float32 is left as it was
                if r.get("action") not in unchanged and r.get("dtype") != "float32"
            )
            return line(unit, done, len(rows))
    names = [r for r in report.get("layers", []) if isinstance(r, str)]
    skipped = report.get("skipped") or {}
    return line("layers", len(names), len(names) + len(skipped))


def _methods() -> list[str]:
    from slimtorch.pipeline.methods import COMPRESS_METHODS

    return sorted(str(n) for n in COMPRESS_METHODS.names())


_DECOMPOSE = ("svd", "tucker", "cp", "tt")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key.strip() in options:
            raise ValueError(f"--set {key.strip()} is given twice; keep one")
        options[key.strip()] = _value(value)

    def put(key: str, value: Any, flag: str) -> None:
        if key in options:
            raise ValueError(f"{flag} and --set {key}=... both set {key}; keep one")
        options[key] = value

    if args.method in _DECOMPOSE:
        if args.rank is not None:
            put("rank", rank_arg(args.rank), "--rank")
        options.setdefault("rank", 0.25)
    elif args.rank is not None:
        raise ValueError(f"--rank applies to {', '.join(_DECOMPOSE)}, not {args.method}")
    for key in ("sparsity", "scope", "ratio", "round_to", "min_speedup", "speed_on"):
        if getattr(args, key) is not None:
            put(key, getattr(args, key), f"--{key.replace('_', '-')}")
    if args.speed_batch is not None:
        try:
            batches = [int(b) for b in args.speed_batch.split(",") if b.strip()]
            if not batches:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"--speed-batch must be integers like 1,32,256, got {args.speed_batch!r}"
            ) from None
        put("speed_batch", batches[0] if len(batches) == 1 else batches, "--speed-batch")
    if args.speed_scope is not None:
        put("speed_scope", args.speed_scope, "--speed-scope")
    for key in ("gradual", "speed_channels_last", "speed_compile"):
        if getattr(args, key):
            put(key, True, f"--{key.replace('_', '-')}")
    if args.method in _DECOMPOSE:
        _check_speed_options(options)
    if args.method == "prune" and options.get("gradual") is True and args.finetune_epochs == 0:
        raise ValueError(
            "--gradual raises the sparsity during fine-tuning; it needs --finetune-epochs >= 1"
        )
    return options


def _check_speed_options(options: dict[str, Any]) -> None:
    """The speed check's settings act only with ``min_speedup``; refuse them without it."""
    speed = [k for k in ("speed_on", "speed_batch", "speed_channels_last", "speed_scope",
                         "speed_compile") if k in options]  # fmt: skip
    if speed and options.get("min_speedup") is None:
        names = ", ".join(f"--{k.replace('_', '-')}" for k in speed)
        verb = "tunes" if len(speed) == 1 else "tune"
        raise ValueError(
            f"{names} {verb} the speed check, which runs only with --min-speedup; add "
            "--min-speedup (e.g. 1.0: keep a factorised layer only where it is not slower)"
        )
    if options.get("speed_compile") is True and options.get("speed_scope") != "model":
        raise ValueError(
            "--speed-compile times the whole model; it needs --speed-scope model "
            f"(got speed scope {options.get('speed_scope', 'layer')!r})"
        )


def rank_arg(text: str) -> float | int | str:
    """A ``--rank`` as the decomposition configs take it: ``"16"`` the integer rank 16,
    ``"0.25"`` the fraction 0.25, anything else a rank spec (``vbmf``, ``energy:0.9``, ...).

    Example:
        >>> rank_arg("16"), rank_arg("0.25"), rank_arg("vbmf")
        (16, 0.25, 'vbmf')
    """
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run(args: argparse.Namespace) -> int:
    """Under ``torchrun`` the fine-tune runs data-parallel; rank 0 writes and prints."""
    from slimtorch.train.distributed import cleanup, init_distributed

    init_distributed()  # a no-op outside torchrun
    try:
        return _run(args)
    finally:
        cleanup()


def _run(args: argparse.Namespace) -> int:
    from slimtorch.core.devices import resolve_device
    from slimtorch.distill import DistillConfig
    from slimtorch.pipeline import compress_run
    from slimtorch.train import TrainConfig
    from slimtorch.train.distributed import is_main_process

    if args.finetune_epochs < 0:
        raise ValueError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if args.bn_recalibration < 0:
        raise ValueError(f"--bn-recalibration must be >= 0, got {args.bn_recalibration}")
    options_that_need(args, args.distill, "--distill", DISTILL_DEFAULTS)
    options = _options(args)
    check_output_path(args.out, "--out", folder=True)
    check_not_in_source(args.out, "--out", model_dir_arg(args.model_dir), run=True)
    replaced = check_run_output(args.out, overwrite=args.overwrite)
    with claim_run_folder(args.out):  # a second process writing --out fails at once
        apply_threads(args)
        finetune = (
            TrainConfig(
                epochs=args.finetune_epochs,
                lr=args.lr,
                amp=args.amp,
                seed=args.seed,
                warmup_epochs=0.0,
                progress=not args.no_progress,
            )
            if args.finetune_epochs > 0
            else None
        )
        distill = (
            DistillConfig(temperature=args.distill_temperature, alpha=args.distill_alpha)
            if args.distill
            else None
        )
        with quiet_autotune(args.verbose):
            result = compress_run(
                in_dir=args.model_dir,
                out_dir=args.out,
                method=args.method,
                method_options=options,
                include=args.include,
                exclude=args.exclude,
                strict=args.strict,
                finetune=finetune,
                seed=args.seed,
                batch_size=args.batch_size,
                device=resolve_device(args.device),
                data_root=args.data_root,
                dataset=args.dataset,
                profile_batch=args.profile_batch,
                profiles=profile_names(args.profiles),
                threads=args.threads,
                distill=distill,
                max_drop=args.max_drop,
                bn_recalibration=args.bn_recalibration,
            )
        if not is_main_process():
            return 0
        layers = result.report["layers"]
        guard = result.report.get("accuracy_guard")
        refused = guard is not None and not guard["passed"]
        where = "refused: not written" if refused else f"{args.out}/model"
        print(f"{args.method} on {args.model_dir} -> {where}")
        print(_summary(layers))
        finished = result.report.get("finish") or {}
        if "storage" in finished and not refused:
            st = finished["storage"]
            original = result.report["saved_bytes"]["before"]
            ratio = original / max(1, st["compact_bytes"])
            print(
                f"compact file: {st['compact_bytes']} bytes, {ratio:.2f}x smaller than the "
                f"original model's weights file ({original}; the model directory keeps dense "
                f"weights and masks: {st['dense_bytes']})"
            )
        print(result.table)
        if refused:
            assert guard is not None
            print(
                f"slimtorch compress: accuracy guard: {guard['drop_points']:.2f} points lost > "
                f"--max-drop {guard['max_drop_points']:g}; the model was not written (see "
                f"{result.report_path})",
                file=sys.stderr,
            )
            return 3
        acc = result.report.get("accuracy") or {}
        drop = 100 * (acc.get("before", 0.0) - acc.get("after_finetune", 0.0))
        if guard is None and drop > 1.0 and result.report.get("history") is None:
            print(
                f"(accuracy fell {drop:.2f} points and nothing was fine-tuned: --finetune-epochs N "
                "recovers it where the method allows; --max-drop refuses such a result)"
            )
        report_removed(remove_stale_outputs(replaced))
        return 0
