"""Save and load model directories: safetensors weights, config.json, metrics.json.

A model directory holds ``model.safetensors`` (the state dict), ``config.json`` (architecture,
recorded transforms, input shape, normalisation, class names, versions) and, optionally,
``metrics.json``. Nothing is ever unpickled.

A save writes a complete sibling temporary directory, then swaps it in: the old directory is
renamed to ``.<name>.old``, the new one to ``<name>``, and the old one is deleted. A crash
leaves either the previous complete directory or the new one; in the instant between the two
renames only ``.<name>.old`` exists, and :func:`load_model` (and the next save) use it.

Example:
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> model = create_model("lenet5", in_channels=1, input_size=28)
    >>> save_model(model, d / "lenet", input_shape=(1, 28, 28), mean=[0.1307], std=[0.3081],
    ...            class_names=[str(i) for i in range(10)], metrics={"top1": 0.99})
    PosixPath('.../lenet')
    >>> sorted(f.name for f in (d / "lenet").iterdir())
    ['config.json', 'metrics.json', 'model.safetensors']
    >>> loaded, card = load_model(d / "lenet")
    >>> x = torch.randn(2, 1, 28, 28)
    >>> torch.equal(loaded(x), model.eval()(x)), card.metrics
    (True, {'top1': 0.99})
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.devices import keeps_rng, read_meminfo, resolve_device
from slimtorch.core.errors import ModelLoadError, is_out_of_memory
from slimtorch.core.io import (
    atomic_write,
    atomic_write_json,
    folder_lock,
    fsync_dir,
    read_json,
    remove_stale_temps,
    temp_name,
)
from slimtorch.core.surgery import require_values, sparse_kernel_layers
from slimtorch.models.card import (
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    METRICS_FILE,
    WEIGHTS_FILE,
    ModelCard,
    _backup_dir,
    _check_nothing_else,
    _resolve_dir,
    load_misfit,
    read_model_card,
    shape_misfit,
    weight_mismatches,
)
from slimtorch.models.registry import create_model
from slimtorch.models.transforms import _arch, replay_transforms

logger = logging.getLogger(__name__)

_WEIGHTS_METADATA = {"format": "pt"}
"""Metadata of the weights file (torch tensors)."""


def _floats(name: str, values: Sequence[float], channels: int) -> list[float]:
    if isinstance(values, int | float):
        values = [values]
    vals = list(values)
    if len(vals) not in (1, channels) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in vals
    ):
        raise ValueError(
            f"{name} must be 1 or {channels} numbers (one per input channel), got {values!r}"
        )
    return [float(v) for v in vals]


def _weights_dtype(model: nn.Module) -> str:
    dtypes = {p.dtype for p in model.state_dict().values() if p.is_floating_point()}
    if len(dtypes) > 1:
        return "mixed"
    return str(dtypes.pop()).removeprefix("torch.") if dtypes else "float32"


def _unshared_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU, contiguous tensors that share no memory, plus alias -> saved key for tied ones."""
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[str, int]] = set()
    for key, value in state.items():
        t = value.detach()
        if t.numel() > 0:
            storage = (str(t.device), t.untyped_storage().data_ptr())
            alias = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if alias in seen:
                tied[key] = seen[alias]
                continue
            seen[alias] = key
            shared = storage in storages
            storages.add(storage)
        else:
            shared = True
        t = t.to("cpu")
        # A tensor that overlaps another one (or a view of a larger buffer) gets its own copy.
        full = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        tensors[key] = t.contiguous().clone() if shared or not full else t.contiguous()
    return tensors, tied


def _is_model_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        return read_json(path / CONFIG_FILE).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def state_bytes(module: nn.Module) -> int:
    """Bytes of the tensors ``module`` saves (its state dict, as :func:`save_model` writes it:
    int4 weights packed two to a byte; shared tensors counted once).

    Example:
        >>> state_bytes(nn.Linear(4, 2))  # 8 weights and 2 biases in float32
        40
    """
    seen: set[int] = set()
    total = 0
    for t in module.state_dict().values():
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def saved_bytes(module: nn.Module) -> int:
    """Size of the ``model.safetensors`` file :func:`save_model` writes for ``module``: the
    bytes of :func:`state_bytes` plus the file's header (serialised in memory, not written).

    Example:
        >>> net = nn.Linear(4, 2)
        >>> saved_bytes(net) > state_bytes(net) == 40  # the 40 bytes of its tensors and a header
        True
    """
    from safetensors.torch import save

    return len(save(_unshared_state_dict(module)[0], metadata=_WEIGHTS_METADATA))


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to the directory ``path`` (replacing a model saved there before).

    Args:
        model: A model built by ``create_model`` (it carries ``slimtorch_arch``).
        path: The model directory; created if missing.
        input_shape: ``(channels, height, width)`` of one input.
        mean: Normalisation mean, one value per channel (or one for all).
        std: Normalisation standard deviation (> 0), one per channel (or one for all).
        class_names: One name per output class.
        metrics: Results to write to ``metrics.json`` (accuracy, latency ...).
        extra: Free-form JSON data stored in ``config.json``.

    Returns:
        The model directory.

    Raises:
        ValueError: Bad arguments, a model without ``slimtorch_arch``, a model whose state does
            not match its recorded architecture (it would not load), or ``path`` is an
            existing file or a non-empty directory that is not a slimtorch model directory.

    Example:
        >>> import pathlib, tempfile
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "mlp"
        >>> save_model(create_model("mlp"), out, input_shape=(1, 28, 28), mean=[0.5],
        ...            std=[0.5], class_names=list("0123456789"))
        PosixPath('.../mlp')
        >>> save_model(create_model("mlp"), out, input_shape=(3, 28, 28), mean=[0.5],
        ...            std=[0.5], class_names=list("0123456789"))
        Traceback (most recent call last):
        ...
        ValueError: input_shape has 3 channels but the model was built with in_channels=1; ...
    """
    require_values(model, "save_model")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise TypeError(
            f"{type(model).__name__} is a torch.compile wrapper; save the model it wraps: "
            "save_model(model._orig_mod, ...) (compile again after loading)"
        )
    arch = _arch(model)
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(
            f"input_shape must be (channels, height, width) of positive ints, got {input_shape!r}"
        )
    kwargs = arch.get("kwargs", {})
    if "in_channels" in kwargs and kwargs["in_channels"] != shape[0]:
        raise ValueError(
            f"input_shape has {shape[0]} channels but the model was built with in_channels="
            f"{kwargs['in_channels']}; pass the shape the model takes"
        )
    if (misfit := shape_misfit(arch["name"], kwargs, shape)) is not None:
        raise ValueError(f"{misfit}; pass the shape the model takes")
    mean_l = _floats("mean", mean, shape[0])
    std_l = _floats("std", std, shape[0])
    if not all(math.isfinite(v) for v in mean_l + std_l):
        raise ValueError(f"mean and std must be finite numbers, got mean={mean_l}, std={std_l}")
    if any(s <= 0 for s in std_l):
        raise ValueError(f"std must be > 0 in every channel, got {std_l}")
    if isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names):
        raise ValueError(f"class_names must be a sequence of strings, got {class_names!r}")
    names = list(class_names)
    if "num_classes" in kwargs and len(names) != kwargs["num_classes"]:
        raise ValueError(
            f"{len(names)} class_names given but the model has num_classes="
            f"{kwargs['num_classes']}; pass one name per class"
        )
    for label, obj in (("metrics", metrics), ("extra", extra)):
        if obj is not None and not isinstance(obj, dict):
            raise ValueError(f"{label} must be a dict or None, got {type(obj).__name__}")

    _check_rebuildable(model, arch)

    path = Path(path)
    if path.is_symlink():  # latest -> run-3: save into run-3, the link stays
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path, shared=False):  # one save at a time; loads wait for the swap
        backup = _backup_dir(path)
        if backup.is_symlink():  # left by an earlier version that renamed a link
            backup.unlink()
        if not path.exists() and _is_model_dir(backup):
            os.replace(backup, path)  # finish undoing a swap interrupted by a crash
        if path.exists() and not _is_model_dir(path):
            raise ValueError(
                f"{path} exists and is not a slimtorch model directory; choose a new or empty "
                "directory (save_model replaces the whole directory)"
            )
        _check_nothing_else(path, backup, _is_model_dir)

        tensors, tied = _unshared_state_dict(model)
        config = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "architecture": {"name": arch["name"], "kwargs": kwargs},
            "transforms": list(arch.get("transforms", [])),
            "input_shape": list(shape),
            "mean": mean_l,
            "std": std_l,
            "class_names": names,
            "dtype": _weights_dtype(model),
            "torch_version": torch.__version__,
            "tied": tied,
            "extra": extra or {},
        }
        if _channels_last(model):
            config["memory_format"] = "channels_last"

        from safetensors.torch import save_file

        remove_stale_temps(path)  # what a killed save left
        tmp = path.with_name(temp_name(path))
        tmp.mkdir()  # unlike mkdtemp, honours the umask like any other directory
        try:
            atomic_write(
                tmp / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata=_WEIGHTS_METADATA)
            )
            if metrics is not None:
                atomic_write_json(tmp / METRICS_FILE, metrics)
            atomic_write_json(tmp / CONFIG_FILE, config)
            if path.exists():
                if backup.exists():  # a model a crash left there (checked above)
                    shutil.rmtree(backup)
                os.replace(path, backup)
                os.replace(tmp, path)
                shutil.rmtree(backup)
            else:
                os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("saved %s (%d tensors) to %s", arch["name"], len(tensors), path)
    return path


def _channels_last(model: nn.Module) -> bool:
    """Whether the model's 4-D weights (parameters, and int8 weight buffers) are in
    channels-last layout (those for which the two layouts differ: not 1x1 kernels, not
    single-channel ones)."""
    fmt = torch.channels_last
    weights = [
        p
        for p in [*model.parameters(), *(b for b in model.buffers() if b.dtype != torch.bool)]
        if p.dim() == 4 and not (p.is_contiguous() and p.is_contiguous(memory_format=fmt))
    ]
    return bool(weights) and all(p.is_contiguous(memory_format=fmt) for p in weights)


def _dtypes_as_saved(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give each floating parameter and buffer of a model saved with mixed dtypes the dtype
    it was saved in (a half model with float32 batch norms, made by hand, records nothing
    that would rebuild it so)."""
    for key, value in model.state_dict(keep_vars=True).items():
        saved = tensors.get(key)
        if (
            saved is not None
            and value.is_floating_point()
            and saved.is_floating_point()
            and saved.dtype != value.dtype
        ):
            with torch.no_grad():
                value.data = value.data.to(saved.dtype)


def _check_weights(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    problems = weight_mismatches(model.state_dict(), tensors)
    if problems:
        raise ModelLoadError(
            f"the weights in {where} do not fit the rebuilt architecture; {problems}. Register "
            "and record (record_transform) every architecture change made before saving, or "
            "re-save the model"
        )


def _check_rebuildable(model: nn.Module, arch: dict[str, Any]) -> None:
    """Refuse to write a model that :func:`load_model` could not rebuild.

    The architecture and recorded transforms are replayed on the meta device (no memory, no
    arithmetic; on the CPU if a transform's replay reads values) and the state dict's keys and
    shapes compared with ``model``'s, so a model whose layers were swapped without a record (a
    sparse kernel left in by ``sparsify_``, a hand-edited layer) is refused before anything is
    written.
    """
    expected: dict[str, torch.Tensor] = {}
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                rebuilt = create_model(arch["name"], **arch.get("kwargs", {}))
                replay_transforms(rebuilt, arch.get("transforms", []))
                expected = rebuilt.state_dict()
            break
        except (ValueError, TypeError, RuntimeError, NotImplementedError, ModelLoadError) as exc:
            if device == "cpu":
                raise ValueError(
                    f"the model's recorded architecture cannot be rebuilt, so it would not "
                    f"load: {exc}. Nothing was written"
                ) from None
    problems = weight_mismatches(expected, model.state_dict(), dtypes=False)
    if problems:
        sparse = sparse_kernel_layers(model)
        hint = (
            f"layers {', '.join(sparse)} are sparse kernels: call "
            "slimtorch.sparse.densify_(model) before saving"
            if sparse
            else "record every architecture change made since create_model (record_transform)"
        )
        raise ValueError(
            f"the model does not match its recorded architecture, so it would not load "
            f"({problems}); {hint}. Nothing was written"
        )


class _InputsTo:
    """Forward pre-hook casting a model's floating tensor inputs to the dtype its parameters
    hold now (so ``model.float()`` after loading still works)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        p = next((t for t in module.parameters() if t.is_floating_point()), None)
        dtype = self.dtype if p is None else p.dtype
        return tuple(
            a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args
        )


@keeps_rng  # the rebuilt model's initial weights are overwritten by the file's
def load_model(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelCard]:
    """Rebuild a model saved by :func:`save_model` and load its weights, in eval mode.

    Steps: ``create_model`` from the recorded architecture, replay the recorded transforms,
    cast to the saved dtype, load ``model.safetensors`` strictly (missing, unexpected and
    mismatched keys raise), move to ``device``. A model saved in one dtype other than float32
    (after ``model.half()``, say) casts its floating inputs to that dtype (a forward pre-hook),
    so it takes the float32 batches every loader and command gives.

    Args:
        path: The model directory.
        device: Where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` ...;
            see :func:`slimtorch.core.devices.resolve_device`).

    Returns:
        ``(model, card)``.

    Raises:
        ModelLoadError: A file is missing or corrupt, or the weights do not fit.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "lenet"
        >>> _ = save_model(create_model("lenet5", in_channels=1, input_size=28), path,
        ...                input_shape=(1, 28, 28), mean=[0.1307], std=[0.3081],
        ...                class_names=[str(i) for i in range(10)])
        >>> model, card = load_model(path, device="cpu")
        >>> card.input_shape, model.training, next(model.parameters()).device
        ((1, 28, 28), False, device(type='cpu'))
    """
    dev = resolve_device(device)  # an unavailable device is named before anything is read
    with folder_lock(path, shared=True):  # a save's swap waits: one save's files only
        card = read_model_card(path)
        root = _resolve_dir(Path(path))
        weights = root / WEIGHTS_FILE
        why = load_misfit(card, root, read_meminfo().get("MemAvailable"))
        if why is not None:  # before the model is allocated
            raise ModelLoadError(why)
        try:
            model = create_model(card.architecture["name"], **card.architecture["kwargs"])
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(
                f"cannot rebuild the architecture recorded in {root / CONFIG_FILE}: {exc}; import "
                "the module that registers the model (on the command line: slimtorch --import "
                "MODULE ...), or re-save it"
            ) from exc
        try:
            replay_transforms(model, card.transforms)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{root / CONFIG_FILE}: {exc}") from exc.__cause__
        if card.dtype != "mixed":
            dtype = getattr(torch, card.dtype, None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ModelLoadError(
                    f"{root / CONFIG_FILE} records dtype {card.dtype!r}, not a floating dtype; "
                    "re-save the model"
                )
            model.to(dtype)
            if dtype != torch.float32:  # a model.half() one: takes the float32 inputs loaders give
                model.register_forward_pre_hook(_InputsTo(dtype))

        if not weights.is_file():
            raise ModelLoadError(
                f"{WEIGHTS_FILE} is missing from {root}; restore it or re-save the model"
            )
        from safetensors.torch import load_file

        try:
            tensors = load_file(weights, device="cpu")
        except Exception as exc:  # safetensors raises its own error types and OSError
            if is_out_of_memory(exc):  # a sound file that did not fit: not "corrupt"
                raise MemoryError(f"out of memory reading {weights} ({exc})") from exc
            raise ModelLoadError(
                f"{weights} is corrupt or truncated ({exc}); restore it or re-save the model"
            ) from None
        for alias, key in card.tied.items():
            if key not in tensors:
                raise ModelLoadError(
                    f"{root / CONFIG_FILE} ties {alias!r} to {key!r}, which {WEIGHTS_FILE} lacks; "
                    "re-save the model"
                )
            tensors[alias] = tensors[key]
        if card.dtype == "mixed":
            _dtypes_as_saved(model, tensors)
        _check_weights(model, tensors, weights)
        model.load_state_dict(tensors, strict=True)
        model.to(dev)
        if card.memory_format == "channels_last":  # as it was saved (the file holds NCHW)
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        model.eval()
    logger.info("loaded %s from %s", card.architecture["name"], root)
    return model, card
