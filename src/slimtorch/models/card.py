"""The model card: what a saved model directory says about itself, and its metrics file.

``config.json`` holds the architecture, the recorded transforms, the input shape, the
normalisation, the class names and the versions; ``metrics.json`` holds results. Both are read
here without touching the weights.

Example:
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = save_model(create_model("lenet5", in_channels=1, input_size=28), d / "lenet",
    ...                input_shape=(1, 28, 28), mean=[0.1307], std=[0.3081],
    ...                class_names=[str(i) for i in range(10)], metrics={"top1": 0.99})
    >>> card = read_model_card(d / "lenet")
    >>> card.architecture["name"], card.input_shape, card.metrics
    ('lenet5', (1, 28, 28), {'top1': 0.99})
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimtorch.core.errors import ModelLoadError, is_out_of_memory
from slimtorch.core.io import atomic_write_json, folder_lock, read_json

if TYPE_CHECKING:
    from slimtorch.data import ImageDataset

logger = logging.getLogger(__name__)

FORMAT_NAME = "slimtorch-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What ``config.json`` (and ``metrics.json``) say about a saved model.

    Attributes:
        architecture: ``{"name", "kwargs"}`` for ``create_model``.
        transforms: Architecture transforms replayed after ``create_model``, in order.
        input_shape: ``(channels, height, width)`` of one input.
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation standard deviation.
        class_names: Name of each output class.
        dtype: Floating dtype of the weights (``"float32"``...), or ``"mixed"``.
        torch_version: ``torch.__version__`` at save time.
        format_version: Version of the directory format.
        tied: Weight names saved once for several state-dict keys (alias -> saved key).
        extra: Free-form JSON data given to ``save_model``.
        metrics: Contents of ``metrics.json`` (empty if absent).
        memory_format: ``"channels_last"`` when the model was saved with its convolution
            weights in that layout (``load_model`` restores it), else ``"contiguous"``.
    """

    architecture: dict[str, Any]
    transforms: list[dict[str, Any]]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    dtype: str
    torch_version: str
    format_version: int = FORMAT_VERSION
    tied: dict[str, str] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    memory_format: str = "contiguous"

    @property
    def dataset(self) -> str | None:
        """The dataset the model was trained on, as recorded (a catalog name or an image
        folder's path), or None."""
        name = self.extra.get("dataset")
        return name if isinstance(name, str) and name else None

    def load_split(
        self,
        split: str,
        *,
        dataset: str | os.PathLike[str] | None = None,
        root: str | os.PathLike[str] | None = None,
        download: bool = True,
    ) -> ImageDataset:
        """A split of ``dataset`` (default: the recorded one) as this model reads it: an image
        folder at its input shape and labelled in its class order (a catalog dataset of
        another shape is refused), normalised by the model's own mean/std.

        Raises:
            ValueError: No dataset given or recorded, or the images do not fit the model.
            DataError: As :func:`~slimtorch.data.load_dataset`; an image folder with a class
                the model does not know.
        """
        from slimtorch.data import is_image_folder, load_dataset, load_folder_split

        name = dataset or self.dataset
        if name is None:
            raise ValueError("the model does not record its dataset; pass one")
        c, h, w = self.input_shape
        if is_image_folder(name):
            classes = self.class_names or None
            ds = load_folder_split(name, split, channels=c, size=(h, w), classes=classes)
        else:
            ds = load_dataset(name, split, root=root, download=download, channels=c, size=(h, w))
        return dataclasses.replace(ds, mean=tuple(self.mean), std=tuple(self.std))


def _backup_dir(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def holds_model(path: str | os.PathLike[str]) -> bool:
    """``path`` is a saved model directory, or is missing while the copy an interrupted save
    left beside it (which :func:`~slimtorch.models.load_model` loads in its place) is there.

    Example:
        >>> import tempfile
        >>> holds_model(tempfile.mkdtemp())
        False
    """
    path = Path(path)
    return (path / CONFIG_FILE).is_file() or (
        not path.exists() and (_backup_dir(path) / CONFIG_FILE).is_file()
    )


def model_root(path: str | os.PathLike[str]) -> Path:
    """``path``, or its ``model/`` folder (a run's ``--out``) when that one holds the model;
    either counts as holding it when an interrupted save left only its copy (see
    :func:`holds_model`). ``path`` itself when neither does: the loader then says what is
    missing.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> model_root(d) == d
        True
    """
    root = Path(path)
    if not holds_model(root) and holds_model(root / "model"):
        return root / "model"
    return root


def _resolve_dir(path: Path) -> Path:
    if path.is_dir():
        return path
    backup = _backup_dir(path)
    if backup.is_dir() and (backup / CONFIG_FILE).is_file():
        logger.warning(
            "%s is missing; loading the copy an interrupted save left at %s", path, backup
        )
        return backup
    raise ModelLoadError(
        f"model directory {path} does not exist; pass a directory written by save_model"
    )


def _read_json_file(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path.name} is missing from {path.parent}; {what}")
    try:
        data = read_json(path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{path} is unreadable or not valid JSON ({exc}); re-save the model or restore the file"
        ) from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object; re-save the model")
    return data


MEMORY_FORMATS = ("contiguous", "channels_last")


def _memory_format(cfg: dict[str, Any]) -> str:
    value = cfg.get("memory_format", "contiguous")
    if value not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {value!r}")
    return str(value)


def _check_card(cfg: dict[str, Any], kwargs: dict[str, Any], shape: list[int]) -> None:
    """Refuse a config.json whose preprocessing or class names contradict its architecture."""
    channels = shape[0]
    if kwargs.get("in_channels", channels) != channels:
        raise ValueError(
            f"input_shape {shape!r} has {channels} channels but the architecture has "
            f"in_channels={kwargs['in_channels']!r}"
        )
    for name in ("mean", "std"):
        vals = [float(v) for v in cfg[name]]
        if len(vals) not in (1, channels) or not all(math.isfinite(v) for v in vals):
            raise ValueError(f"{name} must be 1 or {channels} finite numbers, got {cfg[name]!r}")
        if name == "std" and any(v <= 0 for v in vals):
            raise ValueError(f"std must be > 0 in every channel, got {cfg[name]!r}")
    classes = kwargs.get("num_classes")
    if isinstance(classes, int) and len(cfg["class_names"]) != classes:
        raise ValueError(
            f"class_names has {len(cfg['class_names'])} names but the architecture has "
            f"num_classes={classes}"
        )


def _check_records(cfg: dict[str, Any]) -> None:
    """Refuse fields of the wrong JSON type that would otherwise be coerced (a string of class
    names split into characters) or fail later without naming config.json."""
    names = cfg["class_names"]
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise TypeError(f"class_names must be a list of strings, got {names!r}")
    for field in ("tied", "extra"):
        if not isinstance(cfg.get(field, {}), dict):
            raise TypeError(f"{field} must be an object, got {cfg[field]!r}")
    records = cfg.get("transforms", [])
    if not isinstance(records, list):
        raise TypeError(f"transforms must be a list of records, got {records!r}")
    for i, record in enumerate(records):
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("name"), str)
            or not isinstance(record.get("params", {}), dict)
        ):
            raise TypeError(
                f'transforms[{i}] must be {{"name": str, "params": object}}, got {record!r}'
            )


def read_model_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read ``config.json`` and ``metrics.json`` of a model directory without the weights.

    Raises:
        ModelLoadError: A file is missing, corrupt, or of a newer format.

    Example:
        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = save_model(create_model("lenet5", in_channels=1, input_size=28), d / "lenet",
        ...                input_shape=(1, 28, 28), mean=[0.1307], std=[0.3081],
        ...                class_names=[str(i) for i in range(10)], metrics={"top1": 0.99})
        >>> read_model_card(d / "lenet").class_names[:2]
        ('0', '1')
    """
    with folder_lock(path, shared=True):  # a save's swap waits: one save's files only
        return _read_card(Path(path))


def _read_card(path: Path) -> ModelCard:
    root = _resolve_dir(path)
    cfg = _read_json_file(
        root / CONFIG_FILE,
        "it is not a slimtorch model directory (save_model writes config.json); re-save it",
    )
    if cfg.get("format") != FORMAT_NAME:
        raise ModelLoadError(
            f"{root / CONFIG_FILE} is not a slimtorch model config (format "
            f"{cfg.get('format')!r}, expected {FORMAT_NAME!r}); pass a directory from save_model"
        )
    version = cfg.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelLoadError(
            f"{root / CONFIG_FILE} has format_version {version!r}, not a version number "
            f"(1 to {FORMAT_VERSION}); the file is corrupt: re-save the model"
        )
    if version > FORMAT_VERSION:
        raise ModelLoadError(
            f"{root / CONFIG_FILE} has format_version {version!r}; this slimtorch reads up to "
            f"{FORMAT_VERSION}; upgrade slimtorch"
        )
    metrics: dict[str, Any] = {}
    if (root / METRICS_FILE).exists():
        metrics = _read_json_file(root / METRICS_FILE, "")
    try:
        arch = cfg["architecture"]
        if not isinstance(arch.get("name"), str) or not isinstance(arch.get("kwargs"), dict):
            raise TypeError("architecture needs a name and a kwargs dict")
        shape = cfg["input_shape"]
        if (
            not isinstance(shape, list)
            or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
        ):
            raise ValueError(f"input_shape must be [channels, height, width] >= 1, got {shape!r}")
        _check_card(cfg, arch["kwargs"], shape)
        _check_records(cfg)
        why = shape_misfit(arch["name"], arch["kwargs"], shape)
        if why is not None:
            raise ValueError(why)
        return ModelCard(
            architecture={"name": arch["name"], "kwargs": dict(arch["kwargs"])},
            transforms=list(cfg.get("transforms", [])),
            input_shape=tuple(shape),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            class_names=tuple(str(c) for c in cfg["class_names"]),
            dtype=str(cfg["dtype"]),
            torch_version=str(cfg["torch_version"]),
            format_version=version,
            tied=dict(cfg.get("tied", {})),
            extra=dict(cfg.get("extra", {})),
            metrics=metrics,
            memory_format=_memory_format(cfg),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(
            f"{root / CONFIG_FILE} lacks or has a malformed field ({exc!r}); re-save the model"
        ) from None


def update_metrics(path: str | os.PathLike[str], metrics: dict[str, Any]) -> dict[str, Any]:
    """Merge ``metrics`` into the model directory's ``metrics.json`` (atomically).

    Keys in ``metrics`` replace existing ones; others are kept. Concurrent writers are not
    serialised: the last one wins.

    Returns:
        The merged metrics.

    Raises:
        ValueError: ``metrics`` is not a dict.
        ModelLoadError: ``path`` is not a model directory or its metrics.json is corrupt.

    Example:
        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = save_model(create_model("lenet5", in_channels=1, input_size=28), d / "lenet",
        ...                input_shape=(1, 28, 28), mean=[0.1307], std=[0.3081],
        ...                class_names=[str(i) for i in range(10)], metrics={"top1": 0.99})
        >>> update_metrics(d / "lenet", {"latency_ms": 0.4})
        {'top1': 0.99, 'latency_ms': 0.4}
        >>> read_model_card(d / "lenet").metrics["latency_ms"]
        0.4
    """
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be a dict, got {type(metrics).__name__}")
    root = Path(path)
    card = read_model_card(root)
    merged = {**card.metrics, **metrics}
    atomic_write_json(_resolve_dir(root) / METRICS_FILE, merged)
    return merged


def shape_misfit(name: str, kwargs: dict[str, Any], shape: Sequence[int]) -> str | None:
    """Why the zoo architecture ``name(**kwargs)`` cannot run on ``(1, *shape)`` inputs, or
    None (it runs, or is not one this can build). Built and run on the meta device: no weights,
    no arithmetic. resnet20 built for 28x28 images runs on 32x32 ones; an mlp or a lenet5 does
    not.

    Example:
        >>> shape_misfit("mlp", {"in_channels": 1, "input_size": 28}, (1, 32, 32))[:42]
        "input_shape (1, 32, 32) does not fit mlp's"
    """
    import torch

    from slimtorch.models.registry import create_model  # (the registry imports this module)

    try:
        with torch.device("meta"):
            model = create_model(name, **kwargs)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        return None  # not buildable here: the rebuild on load says why
    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, *shape, device="meta"))
    except NotImplementedError:
        return None  # an op without a meta kernel: the shape cannot be judged here
    except Exception as exc:  # a shape error, in whatever type the layer raises it
        if is_out_of_memory(exc):
            raise
        if "meta" in str(exc):  # .item() or a branch on values, a tensor made on another
            return None  # device: the forward needs real values, which says nothing of shapes
        return (
            f"input_shape {tuple(shape)} does not fit {name}'s layers as built with {kwargs} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        )
    return None


def weight_mismatches(
    expected: dict[str, Any], tensors: dict[str, Any], *, dtypes: bool = True
) -> str:
    """What differs between two state dicts (keys, shapes and, with ``dtypes``, dtypes)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: saved {tuple(tensors[k].shape)} {tensors[k].dtype}, model "
        f"{tuple(expected[k].shape)} {expected[k].dtype}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
        or (dtypes and tensors[k].dtype != expected[k].dtype)
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mismatched", wrong)):
        if items:
            more = f" (+{len(items) - 20} more)" if len(items) > 20 else ""
            parts.append(f"{label} keys: {', '.join(items[:20])}{more}")
    return "; ".join(parts)


def load_misfit(card: ModelCard, root: Path, available: int | None) -> str | None:
    """Why the model directory ``root`` cannot be loaded as ``card`` describes it, found
    before :func:`~slimtorch.models.load_model` allocates anything, or None.

    The architecture is built once on the meta device. As ``create_model`` builds it (what the
    load allocates first) it must fit in ``available`` bytes of memory: a config.json changed
    after saving (``input_size: 100000``) would otherwise ask for terabytes. With its transforms
    replayed, its state dict's keys and shapes must match the safetensors header of the weights
    file. What cannot be built, replayed or laid out on the meta device (int4 layers pack their
    values when the state dict is taken, some replays read values) is left to the full load,
    which names it.
    """
    import itertools

    import torch
    from safetensors import safe_open

    from slimtorch.models.registry import create_model
    from slimtorch.models.transforms import replay_transforms

    config, weights = root / CONFIG_FILE, root / WEIGHTS_FILE
    try:
        with torch.device("meta"):
            model = create_model(card.architecture["name"], **card.architecture["kwargs"])
    except Exception:
        return None
    need = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(),
                                                                      model.buffers()))  # fmt: skip
    if available is not None and need > available:
        return (
            f"{config} describes a {card.architecture['name']} of {need / 2**30:,.1f} GiB "
            f"before its transforms, more than the {available / 2**30:,.1f} GiB of memory "
            "available; if the config was not changed after saving, load it on a machine with "
            "more memory"
        )
    try:
        with torch.device("meta"):
            replay_transforms(model, card.transforms)
            expected = model.state_dict()
        with safe_open(str(weights), framework="pt") as f:
            saved = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception:
        return None
    for alias, key in card.tied.items():
        if key in saved:
            saved[alias] = saved[key]
    problems = weight_mismatches(expected, saved, dtypes=False)
    if not problems:
        return None
    return (
        f"the weights in {weights} do not fit the architecture {config} records; {problems}. "
        "One of the two was changed after saving: restore it or re-save the model"
    )


CLUTTER = frozenset([".DS_Store", ".ipynb_checkpoints", "Thumbs.db", "desktop.ini"])
"""What file managers and notebooks leave in any folder: replaced with a model directory."""


def foreign_files(path: Path) -> list[str]:
    """Names in the model directory ``path`` that a save did not write (the user's notes or
    exports), which replacing the directory would delete; OS clutter and temporaries aside."""
    if not path.is_dir():
        return []
    own = {CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE}
    return sorted(
        e.name
        for e in path.iterdir()
        if e.name not in own and e.name not in CLUTTER and not e.name.startswith("._")
        and not (e.name.startswith(".") and e.name.endswith(".tmp"))
    )  # fmt: skip


def _check_nothing_else(path: Path, backup: Path, is_model_dir: Callable[[Path], bool]) -> None:
    """Refuse to replace a model directory holding files of the user's (notes, exports), which
    the replaced directory takes with it, or to delete a ``backup`` folder that is not a model
    a crash left (a hand-made backup of that name)."""
    if extra := foreign_files(path):
        raise ValueError(
            f"{path} holds {', '.join(extra)} besides the model, which saving over it "
            "would delete with the directory it replaces; move them out of it first"
        )
    if backup.exists() and not is_model_dir(backup):
        raise ValueError(
            f"{backup} exists and is not a slimtorch model directory; save_model keeps the "
            "model it replaces under that name for a moment: move the folder away"
        )
