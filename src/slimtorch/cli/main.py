"""The ``slimtorch`` command: thin sub-commands that parse, call the public API and print.

Every sub-command has ``--help``; bad arguments give a one-line error that lists the valid
choices, and library errors are printed as ``slimtorch: error: ...`` with exit status 2.

Example:
    $ slimtorch train --model resnet20 --dataset fashion-mnist --epochs 30 --out runs/x
    $ slimtorch eval --in runs/x
    $ slimtorch profile --in runs/x --batch-size 1
    $ slimtorch devices
    $ slimtorch export --in runs/x --format onnx --out x.onnx
    $ slimtorch serve --repository models/
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from slimtorch import __version__
from slimtorch.core.errors import (
    ONE_VALUE_ERROR,
    SlimtorchError,
    is_onnxruntime_error,
    is_out_of_memory,
    missing_module_message,
)

Handler = Callable[[argparse.Namespace], int]

RESUME_HINTS = {
    "train": "; rerun the same command with --resume to continue from it",
    "compress": "; compress does not resume a fine-tune: rerun the command",
}
"""What a command interrupted during a fit tells the user to do next."""

QUIET_LOGGERS = ("torchao", "torch.utils._pytree")
"""Libraries' loggers held at ERROR unless ``--verbose`` (their warnings are about internals)."""


ONE_VALUE_HINT = (
    "a batch norm saw one value per channel in training: batches of one sample (per process) "
    "reach a 1x1 map in this model; use a --batch-size of 2 or more per process"
)

IMPORT_ENV = "SLIMTORCH_IMPORT"
"""Environment variable of modules to import first, comma-separated (as ``--import``)."""


def _env_imports() -> list[str]:
    return [m.strip() for m in os.environ.get(IMPORT_ENV, "").split(",") if m.strip()]


def import_user_modules(names: Sequence[str]) -> None:
    """Import each module (a dotted name, looked up from the current directory too, or a path
    to a ``.py`` file), so the models and transforms it registers are known.

    Raises:
        ValueError: a module cannot be found or fails to import (the message says which).

    Example:
        >>> import_user_modules(["json"])
    """
    for name in names:
        try:
            if name.endswith(".py") or os.sep in name:
                path = Path(name).resolve()
                loaded = [m for m in list(sys.modules.values()) if _file_of(m) == path]
                if loaded:
                    continue  # given twice (by name and by file): registered once
                # its own name unless that is taken (a file named copy.py must not replace copy)
                mod = path.stem if path.stem not in sys.modules else f"slimtorch_user_{path.stem}"
                spec = importlib.util.spec_from_file_location(mod, path)
                if spec is None or spec.loader is None or not path.is_file():
                    raise FileNotFoundError(f"no Python file {str(path)!r}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod] = module
                spec.loader.exec_module(module)
            else:
                if "" not in sys.path and os.getcwd() not in sys.path:
                    sys.path.insert(0, os.getcwd())  # first, as `python -m` finds modules here
                importlib.import_module(name)
        except Exception as exc:  # whatever the user's module raises while importing
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ValueError(f"--import {name}: {type(exc).__name__}: {first}") from exc


def _file_of(module: object) -> Path | None:
    file = getattr(module, "__file__", None)
    return Path(file).resolve() if isinstance(file, str) else None


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``slimtorch train: error: ...``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (sub-commands registered by their modules)."""
    from slimtorch.cli import (
        compress_cmd,
        devices_cmd,
        eval_cmd,
        export_cmd,
        profile_cmd,
        serve_cmd,
        train_cmd,
    )

    parser = _Parser(
        prog="slimtorch",
        description="Make models fit and run fast on the GPU you have.",
    )
    parser.add_argument("--version", action="version", version=f"slimtorch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a Python module (a name, found from the current directory too, or a .py "
        "file) before the command runs: one that registers your own models with "
        "register_model, so model directories of them load and train --model takes them; "
        "repeatable; also "
        f"${IMPORT_ENV} (comma-separated)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in (
        train_cmd,
        eval_cmd,
        compress_cmd,
        export_cmd,
        profile_cmd,
        serve_cmd,
        devices_cmd,
    ):
        module.add_parser(sub)
    return parser


class _AfterProgress(logging.StreamHandler):
    """Log records on a line of their own: a terminal progress bar's open line is ended first."""

    def emit(self, record: logging.LogRecord) -> None:
        from slimtorch.train.progress import end_progress_line

        end_progress_line()
        super().emit(record)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slimtorch`` console script; returns the exit status."""
    # modules named by --import first: the models they register are --model choices
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --in is not --import
    pre.add_argument("--import", dest="imports", action="append", default=[])
    try:
        import_user_modules([*_env_imports(), *pre.parse_known_args(argv)[0].imports])
    except ValueError as exc:
        print(f"slimtorch: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # left over by the sub-command's parser: its --help lists what it takes
        given = list(sys.argv[1:] if argv is None else argv)
        at = given.index(args.command) if args.command in given else len(given)
        # options before the command are the top-level parser's to name (slimtorch --bogus x)
        prog = parser.prog if set(unknown) & set(given[:at]) else f"{parser.prog} {args.command}"
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(unknown)} "
                    f"(see {prog} --help)\n")  # fmt: skip
    # our progress at INFO; other libraries' INFO chatter (the ONNX exporter's passes, ...)
    # only with --verbose
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        handlers=[_AfterProgress(sys.stderr)],
    )
    logging.getLogger("slimtorch").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # notes about library internals nobody running a command can act on, shown only with
    # --verbose: torchao's import warns about its optional CUDA/Triton kernels, torch about
    # torchao's use of a deprecated pytree call, inductor's int8 lowering about its own copies
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if args.verbose else logging.ERROR)
    if not args.verbose:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._inductor\.")
    handler: Handler = args.handler
    try:
        return handler(args)
    except (SlimtorchError, ValueError, TypeError, OSError, FloatingPointError) as exc:
        # OSError: an output path that is a file where a folder is needed (or the reverse), a
        # folder that cannot be written, a full disk; its message names the path.
        # FloatingPointError: a training run that diverged (the message says what to change)
        print(f"slimtorch {args.command}: error: {exc}", file=sys.stderr)
        if str(exc).startswith(ONE_VALUE_ERROR):
            print(f"  {ONE_VALUE_HINT}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):  # e.g. which batch of which loader
            print(f"  {note}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        batch = "--batch" if hasattr(args, "batch") else "batch"  # export's example batch
        device = ", or another --device" if hasattr(args, "device") else ""
        print(
            f"slimtorch {args.command}: error: out of memory ({first}); use a smaller {batch}, "
            f"input shape or model{device}",
            file=sys.stderr,
        )
        return 2
    except ImportError as exc:  # an optional dependency is missing: say which extra has it
        print(f"slimtorch {args.command}: error: {missing_module_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a training run says where its checkpoint is
        from slimtorch.train.interrupt import TrainingInterrupted

        detail = f" ({exc})" if str(exc) else ""
        if isinstance(exc, TrainingInterrupted):
            detail = f" ({exc.summary}{RESUME_HINTS.get(args.command, '')})"
        print(f"slimtorch {args.command}: interrupted{detail}", file=sys.stderr)
        return 130
    except Exception as exc:  # ONNX Runtime refusing a graph it loaded: its own error types
        if not is_onnxruntime_error(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"slimtorch {args.command}: error: ONNX Runtime cannot run the model "
            f"({type(exc).__name__}: {first})",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
