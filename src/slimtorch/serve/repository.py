"""The model repository on disk: one folder per model, numbered version sub-folders.

Layout (as Triton and KServe users know it)::

    repository/
      mnist-mlp/
        config.json          # serving config (see slimtorch.serve.model_config)
        1/                   # a slimtorch model directory (model.safetensors + config.json)
        2/model.pt2          # or a torch.export program, or 2/model.onnx
      fashion-cnn/ ...

``config.json`` may be left out for slimtorch model directories (the input shape and class
names come from the directory's own config.json) and for ONNX files and torch.export programs
whose inputs and outputs have a dynamic first dimension (names, datatypes and dims come from the
graph, see :mod:`slimtorch.serve.onnx_graph` and :mod:`slimtorch.serve.pt2_graph`). Without a
repository folder, the embedded default serves each slimtorch model directory found under
``runs/`` (``runs/demo`` ...) as a model of that name with a single version 1.

A scan only reads small files and headers (configs, the safetensors header, the serialized
program of a .pt2 without its weights, the inputs and outputs of an .onnx graph); nothing is
unpickled. A broken model is recorded with its reason and never stops the scan.

Example (a repository of one slimtorch model directory, without a serving config):
    >>> import tempfile
    >>> from slimtorch.models import create_model, save_model
    >>> root = Path(tempfile.mkdtemp())
    >>> _ = save_model(create_model("mlp"), root / "mnist-mlp" / "1", input_shape=(1, 28, 28),
    ...                mean=[0.5], std=[0.5], class_names=list("0123456789"))
    >>> repo = Repository(root, ServeSettings())
    >>> changed = repo.scan()
    >>> [(m.name, m.error) for m in repo.models.values()]
    [('mnist-mlp', '')]
    >>> repo.index()
    [{'name': 'mnist-mlp', 'version': '1', 'state': 'AVAILABLE', 'reason': ''}]
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

from slimtorch.core.errors import ModelLoadError
from slimtorch.models.card import holds_model
from slimtorch.serve.errors import NotFound, NotReady
from slimtorch.serve.model_config import ModelConfig, parse_model_config
from slimtorch.serve.onnx_graph import (
    check_onnx_config,
    derive_onnx_config,
    external_data_files,
)
from slimtorch.serve.pt2_graph import check_pt2_config, derive_pt2_config
from slimtorch.serve.runners import describe, model_path
from slimtorch.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
UNLOADED_REASON = "unloaded through the management API"


class State(enum.StrEnum):
    """Life cycle of a model version."""

    AVAILABLE = "AVAILABLE"  # servable, not in memory (loads on the next request)
    LOADING = "LOADING"
    READY = "READY"  # in memory
    UNAVAILABLE = "UNAVAILABLE"  # broken: see reason
    UNLOADED = "UNLOADED"  # unloaded by the management API until loaded again


_GENERATIONS = itertools.count()


@dataclasses.dataclass(eq=False)
class VersionEntry:
    """One version of a model and where it stands."""

    model: str
    version: int
    path: Path
    state: State = State.AVAILABLE
    reason: str = ""
    # scan order: a rescan of a changed model makes new entries, later than the old ones
    generation: int = dataclasses.field(default_factory=lambda: next(_GENERATIONS))

    @property
    def servable(self) -> bool:
        """Whether requests are accepted (ready, or loadable on demand)."""
        return self.state in (State.AVAILABLE, State.LOADING, State.READY)


@dataclasses.dataclass(eq=False)
class ModelEntry:
    """A model folder: its config (``None`` when broken), versions and fingerprint."""

    name: str
    root: Path
    config: ModelConfig | None
    versions: dict[int, VersionEntry]
    error: str = ""
    fingerprint: dict[str, Any] = dataclasses.field(default_factory=dict)

    def latest(self) -> VersionEntry | None:
        """The highest servable version, else the highest one."""
        ok = [v for v in self.versions.values() if v.servable]
        pool = ok or list(self.versions.values())
        return max(pool, key=lambda v: v.version) if pool else None


def version_dirs(folder: Path) -> dict[int, Path]:
    """A model folder's numbered version folders, by version number (OSError: unreadable).

    A save into folder ``N`` that crashed between its two renames (see
    :func:`slimtorch.models.save_model`) leaves the old model at ``.N.old``, served as ``N``.
    """
    dirs = {n: p for p in folder.iterdir() if (n := version_number(p.name)) is not None}
    for p in folder.glob(".*.old"):
        n = version_number(p.name[1:-4])
        if n is not None and n not in dirs and holds_model(folder / p.name[1:-4]):
            dirs[n] = p
    return {n: p for n, p in dirs.items() if p.is_dir()}


def _still_there(models: dict[str, ModelEntry], name: str, version: int) -> bool:
    """Whether version ``version`` of model ``name`` is read, or at least its folder exists."""
    if name not in models:
        return False
    if version in models[name].versions:
        return True
    try:
        return version in version_dirs(models[name].root)
    except OSError:
        return False


def version_number(text: str) -> int | None:
    """The version number written in ``text`` (a URL part or a folder name), else ``None``.

    Example:
        >>> version_number("2"), version_number("v2"), version_number("\u00b2")
        (2, None, None)
    """
    if not text.isdigit():
        return None
    try:
        return int(text)
    except ValueError:  # digits int() refuses: superscripts, or more than 4300 of them
        return None


def _slimtorch_derived(path: Path) -> dict[str, Any]:
    from slimtorch.models import read_model_card

    card = read_model_card(path)
    # a float64 model's logits are float64; half, bfloat16 and mixed ones are served as FP32
    logits = "FP64" if card.dtype == "float64" else "FP32"
    return {
        "format": "slimtorch",
        "inputs": [{"name": "input", "datatype": "FP32", "dims": list(card.input_shape)}],
        "outputs": [{"name": "logits", "datatype": logits, "dims": [len(card.class_names)]}],
        "labels": list(card.class_names),
    }


def _served(data: dict[str, Any], dirs: dict[int, Path]) -> list[int]:
    """The versions a config's ``versions`` serves, oldest first, read before the config is
    checked (a bad value is reported by the check): the model's inputs and outputs are taken
    from these, never from a newer folder the config leaves out."""
    listed = data.get("versions", "latest")
    if listed == "all":
        return sorted(dirs)
    if isinstance(listed, list):
        known = sorted({v for v in listed if type(v) is int and v in dirs})
        if known:
            return known
    return [max(dirs)]


def _slimtorch_source(dirs: dict[int, Path], served: list[int]) -> tuple[int, dict[str, Any]]:
    """The newest served version whose model card reads, and the config it gives: a newer
    version that is broken (or of a newer format) is then unavailable alone, not the model."""
    first: ModelLoadError | None = None
    for v in reversed(served):
        try:
            return v, _slimtorch_derived(model_path(dirs[v], "slimtorch"))
        except ModelLoadError as exc:
            first = first or exc
    assert first is not None
    raise first


def _same_as_source(
    dirs: dict[int, Path], v: int, source: int, derived: dict[str, Any], data: dict[str, Any]
) -> None:
    """Refuse a version whose card gives other inputs, outputs or labels than the version the
    config was derived from (where the config does not set them): it would be served with the
    other version's class names."""
    own = _slimtorch_derived(model_path(dirs[v], "slimtorch"))
    diff = [k for k in ("inputs", "outputs", "labels") if k not in data and own[k] != derived[k]]
    if diff:
        raise ModelLoadError(
            f"version {v} has other {' and '.join(diff)} than version {source}, which the "
            f"served config is taken from ({', '.join(f'{k}: {own[k]}' for k in diff)}); set "
            f"them in {CONFIG_FILE} or serve one version"
        )


def _tensors_derived(
    fmt: str, newest: Path, config_file: Path, has_config: bool, batch_one: bool
) -> dict[str, Any]:
    """The inputs and outputs of an ONNX graph or a torch.export program, for a config that
    leaves them out (or none); ``batch_one``: the config sets ``max_batch_size`` 1, so a first
    dimension fixed at 1 is the batch."""
    where = (
        f"{config_file} lacks 'inputs' or 'outputs'" if has_config else f"{config_file} is missing"
    )
    derive = {"onnx": derive_onnx_config, "torch_export": derive_pt2_config}.get(fmt)
    if derive is None:
        return {}
    try:
        return derive(model_path(newest, fmt), batch_one=batch_one)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{where}, and {exc}") from None


def _detect_format(version_dir: Path) -> str | None:
    if (version_dir / "model.onnx").is_file():
        return "onnx"
    if (version_dir / "model.pt2").is_file():
        return "torch_export"
    if (model_path(version_dir, "slimtorch") / "config.json").is_file():
        return "slimtorch"
    return None


def check_version(version_dir: Path, config: ModelConfig) -> None:
    """Cheap checks of one version's files; raises ``ModelLoadError`` with the reason.

    Reads only headers: the slimtorch config and safetensors header, the program of a ``.pt2``
    (inputs and outputs in order; :func:`slimtorch.serve.pt2_graph.check_pt2_config`), the
    graph inputs and outputs of an ``.onnx`` (names, types, shapes; checked against the config
    by :func:`slimtorch.serve.onnx_graph.check_onnx_config`).
    """
    path = model_path(version_dir, config.format)
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; put the {config.format} model there")
    if config.format == "slimtorch":
        from safetensors import safe_open

        from slimtorch.models import read_model_card

        card = read_model_card(path)
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise ModelLoadError(f"{weights} is missing; restore it or re-save the model")
        try:
            with safe_open(str(weights), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"{weights} is corrupt or truncated ({exc})") from None
        dims = tuple(config.inputs[0].dims)
        if len(config.inputs) == 1 and -1 not in dims and dims != tuple(card.input_shape):
            raise ModelLoadError(
                f"the config gives input dims {list(dims)} but {path} was saved for "
                f"{list(card.input_shape)}; fix the config's dims"
            )
    elif config.format == "torch_export":
        if not zipfile.is_zipfile(path):
            raise ModelLoadError(f"{path} is not a torch.export archive (not a zip file)")
        check_pt2_config(path, config)
    elif path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty; copy the ONNX file again")
    else:
        check_onnx_config(path, config)
        external_data_files(path)


class Repository:
    """The models found in a repository folder (or the embedded default under ``runs/``).

    Args:
        root: Repository folder, or ``None`` for the embedded default.
        settings: Server settings (defaults for configs, ``runs_dir``).
    """

    def __init__(self, root: Path | None, settings: ServeSettings) -> None:
        self.root = root
        self.settings = settings
        self.models: dict[str, ModelEntry] = {}
        # versions unloaded through the management API: they stay so across re-reads
        self.unloaded: set[tuple[str, int]] = set()

    def _folders(self) -> list[tuple[str, Path, bool]]:
        """``(name, folder, embedded)`` of every candidate model."""
        if self.root is not None:
            if not self.root.is_dir():
                raise FileNotFoundError(
                    f"model repository {self.root} is not a folder; pass --repository DIR "
                    "holding one folder per model"
                )
            return [
                (p.name, p, False)
                for p in sorted(self.root.iterdir())
                if p.is_dir() and not p.name.startswith(".")
            ]
        runs = Path(self.settings.runs_dir)
        if not runs.is_dir():
            return []
        out = []
        for p in sorted(runs.iterdir()):
            if (
                p.is_dir()
                and not p.name.startswith(".")
                and (model_path(p, "slimtorch") / "config.json").is_file()
            ):
                out.append((p.name, p, True))
        return out

    def _read(self, name: str, folder: Path, embedded: bool) -> ModelEntry:
        fingerprint = describe(folder)
        entry = ModelEntry(name, folder, None, {}, fingerprint=fingerprint)
        try:
            if embedded:
                dirs = {1: folder}
                data: dict[str, Any] = {}
            else:
                dirs = version_dirs(folder)
                if not dirs:
                    raise ModelLoadError(
                        f"{folder} has no numbered version folders; put the model in {folder}/1"
                    )
                data = {}
                if (folder / CONFIG_FILE).is_file():
                    try:
                        data = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
                    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                        why = "nested too deeply" if isinstance(exc, RecursionError) else exc
                        bad = f"{folder / CONFIG_FILE} is not valid JSON ({why})"
                        raise ModelLoadError(bad) from None
                    if not isinstance(data, dict):
                        raise ModelLoadError(f"{folder / CONFIG_FILE} must hold a JSON object")
            served = _served(data, dirs)
            source, newest = served[-1], dirs[served[-1]]
            fmt = data.get("format") or _detect_format(newest)
            if fmt is None:
                raise ModelLoadError(
                    f"{newest} holds no model.onnx, model.pt2 or slimtorch model directory, and "
                    f"{folder / CONFIG_FILE} names no format"
                )
            derived: dict[str, Any] = {"format": fmt}
            if fmt == "slimtorch":
                source, derived = _slimtorch_source(dirs, served)
            elif "inputs" not in data or "outputs" not in data:
                has_config = (folder / CONFIG_FILE).is_file()
                one = data.get("max_batch_size") == 1 and data.get("max_batch_size") is not True
                derived.update(_tensors_derived(fmt, newest, folder / CONFIG_FILE, has_config, one))
            try:
                config = parse_model_config(
                    data, name=name, settings=self.settings, derived=derived
                )
            except ValueError as exc:
                raise ModelLoadError(f"{folder / CONFIG_FILE}: {exc}") from None
            if name in self.settings.pinned:  # the server's --pin wins over the model config
                config = dataclasses.replace(config, pinned=True)
            entry.config = config
            if config.versions == "latest":
                chosen = [max(dirs)]
            elif config.versions == "all":
                chosen = sorted(dirs)
            else:
                missing = [v for v in config.versions if v not in dirs]
                if missing:
                    raise ModelLoadError(
                        f"versions {missing} listed in the config have no folder in {folder}"
                    )
                chosen = sorted(int(v) for v in config.versions)
            for v in chosen:
                ver = VersionEntry(name, v, dirs[v])
                if dirs[v].name != str(v):
                    logger.warning("%s/%d is missing; serving the copy at %s", name, v, dirs[v])
                try:
                    check_version(dirs[v], config)
                    if fmt == "slimtorch" and v != source:
                        _same_as_source(dirs, v, source, derived, data)
                except (ModelLoadError, OSError) as exc:
                    ver.state, ver.reason = State.UNAVAILABLE, str(exc)
                entry.versions[v] = ver
        except (ModelLoadError, OSError) as exc:
            entry.error = str(exc)
        for ver in entry.versions.values():
            if ver.state is State.UNAVAILABLE:
                logger.warning(
                    "model %s version %d is not ready: %s", name, ver.version, ver.reason
                )
        if entry.error:
            logger.warning("model %s is not ready: %s", name, entry.error)
        return entry

    def scan(self) -> set[str]:
        """Re-read the repository; returns the names of models added, changed or removed.

        Unchanged models keep their entries (and their states); a version unloaded through the
        management API stays unloaded when its model is re-read, until it is loaded again.
        """
        found = {name: (folder, emb) for name, folder, emb in self._folders()}
        changed = set(self.models) - set(found)
        models: dict[str, ModelEntry] = {}
        for name, (folder, embedded) in found.items():
            old = self.models.get(name)
            if old is not None and old.fingerprint == describe(folder):
                models[name] = old
                continue
            entry = self._read(name, folder, embedded)
            for ver in entry.versions.values():
                if ver.state is State.AVAILABLE and (name, ver.version) in self.unloaded:
                    ver.state, ver.reason = State.UNLOADED, UNLOADED_REASON
            models[name] = entry
            changed.add(name)
        # a deleted version's mark goes too (it would also mark a new folder of its number); one
        # whose folder is still there keeps it (its model read with an error: a config rewritten)
        self.unloaded = {(m, v) for m, v in self.unloaded if _still_there(models, m, v)}
        self.models = models
        return changed

    def get(self, name: str) -> ModelEntry:
        """The model called ``name``.

        Raises:
            NotFound: No such model; the message lists the models there are, unless the
                repository index is kept behind an API key.
        """
        entry = self.models.get(name)
        if entry is None:
            if self.settings.api_key:
                raise NotFound(f"no model named {name!r}; the repository index lists them")
            names = sorted(self.models)
            shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            raise NotFound(f"no model named {name!r}; the repository has: {shown or 'none'}")
        return entry

    def version(self, name: str, version: str | None) -> tuple[ModelEntry, VersionEntry]:
        """Resolve a model and version (``None``: the latest servable one).

        Raises:
            NotFound: Unknown model or version.
            NotReady: The model or version is broken or unloaded; the reason is in the message.
        """
        entry = self.get(name)
        if entry.config is None:
            raise NotReady(f"model {name!r} is not ready: {entry.error}")
        if version is None:
            ver = entry.latest()
            if ver is None:
                raise NotReady(f"model {name!r} has no version to serve")
        else:
            number = version_number(version)
            if number is None or number not in entry.versions:
                raise NotFound(
                    f"model {name!r} has no version {version!r}; it serves versions "
                    f"{sorted(entry.versions)}"
                )
            ver = entry.versions[number]
        if not ver.servable:
            raise NotReady(
                f"model {name!r} version {ver.version} is {ver.state.value.lower()}: "
                f"{ver.reason or 'load it through the management API'}"
            )
        return entry, ver

    def index(self) -> list[dict[str, str]]:
        """One row per model version: name, version, state, reason (a broken model: one row)."""
        rows = []
        for entry in self.models.values():
            if entry.config is None or not entry.versions:
                rows.append(_row(entry.name, "", "UNAVAILABLE", entry.error))
                continue
            for ver in sorted(entry.versions.values(), key=lambda v: v.version):
                rows.append(_row(entry.name, str(ver.version), ver.state.value, ver.reason))
        return rows


def _row(name: str, version: str, state: str, reason: str) -> dict[str, str]:
    return {"name": name, "version": version, "state": state, "reason": reason}


def not_ready_reason(entry: ModelEntry, ver: VersionEntry | None) -> str | None:
    """Why a model (version) is not ready, or ``None`` when it is."""
    if entry.config is None:
        return entry.error
    if ver is None:
        return "no version to serve"
    if not ver.servable:
        return ver.reason or f"state {ver.state.value}"
    return None
