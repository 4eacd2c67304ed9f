"""Small helpers shared by the sub-commands (tables, shapes, thread pinning, input and output
paths, inductor's autotune chatter)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from slimtorch.models.card import foreign_files, holds_model, model_root
from slimtorch.train.checkpoint import is_checkpoint
from slimtorch.train.classifier import RUN_FILES, run_files


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table with columns padded to their widest cell.

    Example:
        >>> print(format_table(["a", "b"], [[1, "xy"]]))
        a  b
        -  --
        1  xy
    """
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,28,28"`` into ``(1, 28, 28)``; raises ``ValueError`` with the expected form."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise ValueError(
            f"--input-shape must look like C,H,W (e.g. 1,28,28), got {text!r}"
        ) from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--input-shape must be three positive integers C,H,W, got {text!r}")
    return shape


# The zoo's and catalog's names, listed statically (a test checks them against the registries);
# --model also takes models registered by --import modules (model_choices).
MODELS = ("lenet5", "mlp", "mobilenetv2", "resnet20", "resnet32", "resnet56", "vgg11-bn")
DATASETS = ("cifar10", "digits", "fashion-mnist", "kmnist", "mnist")


def model_choices() -> list[str]:
    """``--model`` choices: the zoo plus models registered by ``--import`` modules."""
    from slimtorch.models.registry import list_models

    return sorted({*MODELS, *list_models()})


NARROW_CONVS = ("measure", "int8", "float")  # slimtorch.quant.ort_graph.NARROW_CONV_MODES
DATASET_HELP = (
    f"{', '.join(DATASETS)}, or an image folder's path (<folder>/train/<class>/<images> and "
    "<folder>/test/<class>/<images>)"
)


def dataset_arg(text: str) -> str:
    """``--dataset``: a catalog name, or a path naming an image folder (the rule of
    :func:`slimtorch.data.is_image_folder`, kept import-free here)."""
    if text in DATASETS or "/" in text or os.sep in text or Path(text).expanduser().is_dir():
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose from {', '.join(DATASETS)}, or give an image "
        "folder's path, e.g. ./my_images)"
    )


def profile_names(text: str) -> list[str]:
    """The device profiles named by ``--profiles``: a comma-separated list, ``all`` or
    ``none``; unknown names fail with the list of choices."""
    from slimtorch.core.profiles import get_profile, list_profiles

    words = text.strip().lower()
    if words == "all":
        return list(list_profiles())
    if words == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(
            f"--profiles {text!r} names no profile; give names such as rx580, all, or none "
            "for no estimates"
        )
    for name in names:
        get_profile(name)
    return names


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads``, shared by the commands that run a model."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )


def apply_threads(args: argparse.Namespace) -> None:
    """Pin torch's CPU thread count when ``--threads`` was given."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def model_dir_arg(path: str, option: str = "--in") -> Path:
    """The model directory that ``option`` names (itself or its ``model/``), checked in the
    command line's terms before anything is loaded.

    Example:
        >>> import tempfile
        >>> model_dir_arg(tempfile.mkdtemp() + "/nope")
        Traceback (most recent call last):
        ...
        ValueError: --in .../nope does not exist; pass a model directory, or the --out folder ...
    """
    p = Path(path)
    what = "a model directory, or the --out folder of slimtorch train or slimtorch compress"
    root = model_root(p)
    if holds_model(root):
        return root
    if not p.exists():
        raise ValueError(f"{option} {path} does not exist; pass {what}")
    if not p.is_dir():
        raise ValueError(f"{option} {path} is a file; pass {what}")
    raise ValueError(
        f"{option} {path} holds no slimtorch model (no config.json in it or in its model/ "
        f"folder); pass {what}"
    )


def check_run_output(
    path: str, *, overwrite: bool, resume: bool | None = None, checkpoint: bool = False
) -> dict[Path, tuple[int, int]]:
    """Refuse an ``--out`` that already holds a run unless ``--overwrite`` (or ``--resume``).

    A run is a model directory in ``--out/model`` or, where ``checkpoint`` is set (train), a
    ``--out/checkpoint.pt``. ``resume`` is None for commands without ``--resume``.

    Returns:
        With ``overwrite``, the run files (``slimtorch.train.classifier.RUN_FILES``) already
        in ``--out`` with their identity; ``remove_stale_outputs`` (same module) removes, after
        a successful run, those the run did not write again, so no report or checkpoint of the
        replaced run stays beside the new model. Empty otherwise.

    Example:
        >>> import tempfile
        >>> from slimtorch.models import create_model, save_model
        >>> out = tempfile.mkdtemp()
        >>> check_run_output(out, overwrite=False)  # empty: fine
        {}
        >>> _ = save_model(create_model("mlp"), f"{out}/model", input_shape=(1, 28, 28),
        ...                mean=[0.5], std=[0.5], class_names=list("0123456789"))
        >>> check_run_output(out, overwrite=False)
        Traceback (most recent call last):
        ...
        ValueError: --out ... already holds a model (model/); pass --overwrite to replace it, ...
        >>> check_run_output(out, overwrite=True)
        {}
    """
    if resume and overwrite:
        raise ValueError(
            "--resume continues the run in --out and --overwrite replaces it; give one of them"
        )
    out = Path(path)
    target = out / "model"
    if target.exists() and not holds_model(target):
        if not target.is_dir() or any(target.iterdir()):
            raise ValueError(
                f"--out {path}: {target} exists and is not a slimtorch model directory, so the "
                "model cannot be written there; choose another --out or move it away"
            )
    if extra := foreign_files(target):  # refused before the work, not when saving after it
        raise ValueError(
            f"--out {path}: {target} holds {', '.join(extra)} besides the model, which "
            "replacing it would delete; move them out of it first"
        )
    present = [name for name in RUN_FILES if (out / name).exists()]
    ours = holds_model(target) or (out / RUN_MARKER).is_file()
    ours = ours or is_checkpoint(out / "checkpoint.pt")
    ours = ours or any(_slimtorch_json(out / name) for name in present)
    if present and not ours:
        raise ValueError(
            f"--out {path} holds {', '.join(present)}: the names of files a run writes, but no "
            "slimtorch run wrote them there, so they would be replaced or removed; choose "
            "another --out or move them away"
        )
    found = [
        name
        for name, there in (
            ("a model (model/)", holds_model(target)),
            (
                "a training checkpoint (checkpoint.pt)",
                checkpoint and (out / "checkpoint.pt").exists(),
            ),
        )
        if there
    ]
    if present and not found:
        found = [f"the files of an earlier run ({', '.join(present)})"]
    if overwrite:
        return run_files(out)
    if not found:
        return {}
    if resume is None:
        raise ValueError(
            f"--out {path} already holds {' and '.join(found)}; pass --overwrite to replace "
            "it, or choose another --out"
        )
    if not resume:
        raise ValueError(
            f"--out {path} already holds {' and '.join(found)}; pass --resume to continue that "
            "run, --overwrite to replace it, or choose another --out"
        )
    if not (out / "checkpoint.pt").exists():
        raise ValueError(
            f"--resume: --out {path} holds no checkpoint.pt to continue from; rerun without "
            "--resume, with --overwrite, to train a new model there, or choose another --out"
        )
    return {}


RUN_MARKER = ".slimtorch-run"
"""The file train and compress keep in ``--out``: it marks the folder as a slimtorch run's, and
the process writing there holds a lock on it."""


def _slimtorch_json(path: Path) -> bool:
    """Whether a run file is JSON slimtorch wrote (a run from before :data:`RUN_MARKER`): a
    compress report, a training config or history."""
    if path.suffix != ".json":
        return False
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    keys = set(doc) if isinstance(doc, dict) else set()
    return (
        {"method", "layers", "before"} <= keys
        or keys == {"type", "config"}
        or ({"epoch", "train_loss", "lr"} <= keys)
    )


@contextlib.contextmanager
def claim_run_folder(path: str) -> Iterator[None]:
    """Hold ``--out`` for this command: a second slimtorch process writing there (a second
    train, a compress into a folder still training) fails at once instead of replacing this
    run's model and removing its checkpoint. The lock is an ``flock`` on :data:`RUN_MARKER`,
    released when the process ends however it ends; data-parallel ranks other than 0 do not
    take it. Where ``fcntl`` or locks are missing the body runs unlocked.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> with claim_run_folder(out):
        ...     with claim_run_folder(out):
        ...         pass
        Traceback (most recent call last):
        ...
        ValueError: --out ... is being written by another slimtorch process (pid ...); ...
    """
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    out = Path(path)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / RUN_MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "pid unknown"
            raise ValueError(
                f"--out {path} is being written by another slimtorch process ({holder}); wait "
                "for it to finish, or choose another --out"
            ) from None
        except (ImportError, OSError):  # Windows, or a file system without locks
            pass
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    except BaseException:
        if created and [e.name for e in out.iterdir()] == [RUN_MARKER]:  # a bad option: as
            with contextlib.suppress(OSError):  # if the command had never run
                (out / RUN_MARKER).unlink()
                out.rmdir()
        raise
    finally:
        os.close(fd)


def report_removed(names: Sequence[str]) -> None:
    """Say which files of a replaced run ``remove_stale_outputs`` removed (if any)."""
    if names:
        # stderr: stdout holds the command's JSON summary alone
        print(f"removed from the replaced run: {', '.join(names)}", file=sys.stderr)


@contextlib.contextmanager
def quiet_autotune(verbose: bool) -> Iterator[None]:
    """Hold back inductor's per-choice autotune report unless ``verbose``.

    With ``max_autotune`` on (``compress --method conv-gemm`` and the int8 runtime check of
    such a model) torch's inductor writes an ``AUTOTUNE ...`` table and an ``Autotune Choices
    Stats`` JSON line to stderr for every GEMM it tunes; the choice it makes is the same
    without them. Options a torch release does not know are left alone.
    """
    if verbose:
        yield
        return
    from torch._inductor import config

    quiet = {"max_autotune_report_choices_stats": False, "autotune_num_choices_displayed": 0}
    with config.patch({k: v for k, v in quiet.items() if hasattr(config, k)}):
        yield


def check_output_path(
    path: str, option: str, *, folder: bool, replaces: tuple[str, ...] = ()
) -> None:
    """Fail before any work when ``path`` cannot be written as ``option`` asks.

    A run directory (``folder=True``) cannot be a file, an output file cannot be a folder, and
    no existing part of the path above it may be a file. An existing output file is replaced
    only when its suffix is one of ``replaces`` (an earlier output of the command): a path
    mistyped onto notes, a photo or a training checkpoint is refused, not overwritten.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> check_output_path(d, "--out", folder=True)
        >>> check_output_path(d, "--out", folder=False)
        Traceback (most recent call last):
        ...
        ValueError: --out ... is a folder; give the path of the file to write
    """
    if not path.strip():
        raise ValueError(f"{option} is empty; give the path to write")
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise ValueError(f"{option} {path} is a file; give a folder (a run directory is written)")
    if not folder and p.is_dir():
        raise ValueError(f"{option} {path} is a folder; give the path of the file to write")
    if not folder and p.exists() and p.suffix.lower() not in replaces:
        kinds = "/".join(replaces) or "output"
        raise ValueError(
            f"{option} {path} exists and is not a {kinds} file this command writes, so writing "
            "would destroy it; give another path, or remove the file first"
        )
    above = next((q for q in p.parents if q.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"{option} {path} cannot be written: {above} is a file, not a folder")
    if above is not None and not os.access(above, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path} cannot be written: {above} is not writable here")
    if not folder and holds_model(p.parent):  # any model directory, not only the one read
        raise ValueError(
            f"{option} {path} is inside the model directory {p.parent}, whose files a write "
            "there would replace or confuse; write it beside the model directory"
        )


def check_not_in_source(path: str, option: str, source: Path, *, run: bool) -> None:
    """Refuse an output that would land in the model directory being read.

    ``source`` is the input model directory. A run folder (``run=True``; its model goes to
    ``path/model``) may be neither that directory nor its run folder; a file may not be
    inside it. Writing there would replace or break the model the command reads.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> check_not_in_source(str(d / "other"), "--out", d / "run" / "model", run=True)
        >>> check_not_in_source(str(d / "run"), "--out", d / "run" / "model", run=True)
        Traceback (most recent call last):
        ...
        ValueError: --out .../run would write over the model it reads (.../run/model); ...
    """
    src = source.resolve()
    out = Path(path).resolve()
    inside = src == out or src in out.parents
    if inside or (run and src == out / "model"):
        raise ValueError(
            f"{option} {path} would write {'over' if run else 'into'} the model it reads "
            f"({source}); choose an {option} outside it"
        )


def options_that_need(
    args: argparse.Namespace, enabled: bool, enabler: str, defaults: dict[str, object]
) -> None:
    """Options that act only with ``enabler``: refuse them without it, else fill defaults.

    Each key of ``defaults`` is an option parsed with ``default=None`` (so that giving it can
    be told from leaving it out); a flag parsed with ``store_true`` has the default ``False``.

    Example:
        >>> args = argparse.Namespace(sparse=None, sparsity=0.5)
        >>> options_that_need(args, args.sparse is not None, "--sparse", {"sparsity": 0.9})
        Traceback (most recent call last):
        ...
        ValueError: --sparsity 0.5 applies only with --sparse; add --sparse or leave it out
    """
    given = []
    for key, default in defaults.items():
        value = getattr(args, key)
        flag = f"--{key.replace('_', '-')}"
        if default is False and value is True:  # a store_true flag
            given.append(flag)
        elif default is not False and value is not None:
            given.append(f"{flag} {value}")
    if given and not enabled:
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(
            f"{', '.join(given)} {verb} only with {enabler}; add {enabler} or leave it out"
        )
    for key, default in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
