"""``sparsify_``: swap a layer for a sparse kernel only where it is measured faster, same outputs.

Zeros save time only if a kernel skips them faster than a dense kernel multiplies them, and
that depends on the device, the thread count, the layer shape, the batch and the sparsity
pattern. So :func:`sparsify_` runs ``example_input`` once to record each layer's real input,
builds each candidate kernel (CSR, BSR, 2:4 semi-structured), checks its outputs equal the dense
layer's within a tolerance, times it against the dense layer with
:func:`slimtorch.core.measure.measure_latency`, and swaps in the fastest only when it beats dense
by ``min_speedup``. Kernels that win alone can lose inside the model (caches, layouts), so the
whole model is then timed with and without the swaps, alternately, and every swap is undone
unless the model is faster. The report lists every layer, each candidate's time or why it was
not timed, the choice and the reason, and the whole-model check.

**A deployment step, applied after loading.** The choice is a measurement on the device at hand,
not a property of the model: the same weights may run best as CSR on one CPU and dense on a GPU.
So a saved model keeps dense weights and masks (``save_model``, or compact storage via
:func:`slimtorch.sparse.save_packed`), and :func:`sparsify_` runs after ``load_model`` on the
machine that serves it. The sparse modules keep their weight out of the state dict; call
:func:`densify_` before saving a sparsified model.

Example:
    >>> net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    >>> _ = prune_(net, MagnitudeConfig(sparsity=0.95))
    >>> report = sparsify_(net, torch.randn(64, 256), threads=1, min_time_s=0.0)
    >>> [r.name for r in report.rows], report.rows[0].action in ("sparse", "dense")
    (['0', '2'], True)
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.core.config import check_bool
from slimtorch.core.devices import keeps_rng, resolve_device
from slimtorch.core.errors import TransformSkipError
from slimtorch.core.measure import measure_latency
from slimtorch.core.surgery import kept_modes, replacement_blockers, require_values
from slimtorch.sparse._select import layer_weight, select_layers
from slimtorch.sparse.formats import is_2to4
from slimtorch.sparse.kernels import (
    KERNEL_FORMATS,
    SparseConv2d,
    SparseLinear,
    build_sparse_layer,
    conv_lowering_skip,
    semi_structured_support,
)
from slimtorch.sparse.report import Candidate, SparsifyReport, SparsifyRow

logger = logging.getLogger(__name__)

_TOLERANCE = {torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}
# A float32 dense layer on CUDA runs in TF32 (10-bit mantissa, relative rounding ~5e-4 per
# product) where PyTorch allows it: cuDNN convolutions do by default, matmuls only when
# enabled. The dense reference then carries TF32 error while the sparse kernels accumulate in
# full float32, so exact float32 tolerances would reject kernels more exact than the reference.
_TF32_TOLERANCE = (2e-3, 2e-3)


def _default_tolerance(
    module: nn.Module, dtype: torch.dtype, dev: torch.device
) -> tuple[float, float]:
    """Output tolerance against the dense layer, allowing for TF32 in the dense reference
    (NVIDIA Ampere and later only: older GPUs and ROCm ones compute float32 in float32)."""
    if dtype == torch.float32 and dev.type == "cuda" and torch.version.hip is None:
        tf32 = (
            torch.backends.cudnn.allow_tf32
            if isinstance(module, nn.Conv2d)
            else torch.backends.cuda.matmul.allow_tf32
        )
        if tf32 and torch.cuda.get_device_capability(dev)[0] >= 8:
            return _TF32_TOLERANCE
    return _TOLERANCE.get(dtype, (1e-4, 1e-4))


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _capture_inputs(
    model: nn.Module, layers: list[tuple[str, nn.Module]], example_input: Any
) -> dict[str, torch.Tensor]:
    """Each layer's first input tensor during one forward pass of ``example_input``."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in layers:

        def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), kept_modes(model):
            if isinstance(example_input, tuple | list):
                model(*example_input)
            else:
                model(example_input)
    except Exception as exc:
        raise ValueError(
            f"example_input does not run through {type(model).__name__} ({type(exc).__name__}: "
            f"{exc}); pass one batch the model accepts, on its device"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    return seen


def _to_device(example_input: Any, device: torch.device) -> Any:
    """``example_input`` (a tensor, or a tuple/list of arguments) with its tensors on ``device``."""
    if isinstance(example_input, torch.Tensor):
        return example_input.to(device)
    if isinstance(example_input, tuple | list):
        return type(example_input)(_to_device(x, device) for x in example_input)
    return example_input


def _unavailable(fmt: str, module: nn.Module, device: torch.device) -> str | None:
    if isinstance(module, nn.Conv2d):
        reason = conv_lowering_skip(module)
        if reason is not None:
            return reason
    if fmt == "semi_structured":
        reason = semi_structured_support(device)
        if reason is not None:
            return reason
        if not is_2to4(layer_weight(module).detach(), bitwise=False):
            return "weight is not 2:4 sparse along its input dimension; prune it with NMConfig"
    return None


def _try_candidate(
    fmt: str,
    module: nn.Module,
    x: torch.Tensor,
    ref: torch.Tensor,
    dense_s: float,
    device: torch.device,
    tol: tuple[float, float],
    timing: dict[str, Any],
) -> tuple[Candidate, nn.Module | None]:
    reason = _unavailable(fmt, module, device)
    if reason is not None:
        return Candidate(fmt, "unavailable", reason=reason), None
    try:
        layer = build_sparse_layer(module, fmt)
    except (ValueError, RuntimeError) as exc:  # the format does not fit this layer (no BSR
        # block divides it, a 2:4 weight whose sides are not multiples of the kernel's tile)
        return Candidate(fmt, "unavailable", reason=f"{type(exc).__name__}: {exc}"[:300]), None
    try:
        with torch.inference_mode():
            out = layer(x)
    except (ValueError, RuntimeError, NotImplementedError, TypeError) as exc:
        return Candidate(fmt, "error", reason=f"{type(exc).__name__}: {exc}"[:300]), None
    err = float((out.float() - ref.float()).abs().max()) if out.numel() else 0.0
    if out.shape != ref.shape or not torch.allclose(
        out.float(), ref.float(), atol=tol[0], rtol=tol[1]
    ):
        why = f"outputs differ from dense (max abs error {err:.3g}, atol {tol[0]}, rtol {tol[1]})"
        return Candidate(fmt, "mismatch", max_abs_err=err, reason=why), None
    median = measure_latency(layer, x, device=device, **timing).median_s
    return Candidate(fmt, "ok", median, dense_s / median if median > 0 else None, err), layer


def _run(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, tuple | list):
        return model(*example_input)
    return model(example_input)


def _check_outputs(
    model: nn.Module, example_input: Any, originals: dict[str, nn.Module], tol: tuple[float, float]
) -> None:
    """Run the whole model with the swaps and without; undo them and raise ``ValueError`` when
    it fails or its outputs move (a forward that reads a swapped layer's weight by name where
    torch.fx could not trace it to see so). ``tol`` is the loosest per-layer (atol, rtol) the
    swaps were accepted with; the whole model may drift ten times that."""
    swapped = {name: model.get_submodule(name) for name in originals}
    why = ""
    try:
        with torch.inference_mode(), kept_modes(model):
            _swap(model, originals)
            ref = _run(model, example_input)
            _swap(model, swapped)
            out = _run(model, example_input)
        if isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor):
            bound = 10 * (tol[0] + tol[1] * float(ref.abs().max() if ref.numel() else 0))
            err = float((out.float() - ref.float()).abs().max()) if out.numel() else 0.0
            if out.shape != ref.shape or not err <= bound:
                why = f"gives outputs off by {err:.3g} (bound {bound:.3g})"
    except Exception as exc:  # whatever the user's forward raises with the sparse layers in it
        why = f"fails ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if why:
        _swap(model, originals)
        raise ValueError(
            f"with the sparse layers {', '.join(originals)} swapped in, the whole model "
            f"{why}: its forward may read one of their weights directly, or their rounding "
            "adds up over the layers (atol/rtol loosen the bound). The model is unchanged; "
            "exclude those layers"
        )


def _swap(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    for name, layer in layers.items():
        model.set_submodule(name, layer)


def _check_whole_model(
    model: nn.Module,
    example_input: Any,
    originals: dict[str, nn.Module],
    report: SparsifyReport,
    device: torch.device,
    timing: dict[str, Any],
) -> None:
    """Time the model with and without the swaps, alternately; undo them if not faster."""
    swapped = {name: model.get_submodule(name) for name in originals}

    def call() -> Any:
        with torch.inference_mode():
            return _run(model, example_input)

    dense_s, sparse_s, ratios = [], [], []
    with kept_modes(model):
        for _ in range(3):
            _swap(model, originals)
            a = measure_latency(call, device=device, **timing).median_s
            _swap(model, swapped)
            b = measure_latency(call, device=device, **timing).median_s
            dense_s.append(a)
            sparse_s.append(b)
            ratios.append(a / b if b > 0 else 0.0)
    ratio = statistics.median(ratios)
    report.model = {
        "dense_s": statistics.median(dense_s),
        "sparse_s": statistics.median(sparse_s),
        "speedup_per_round": ratios,
        "speedup": ratio,
        "kept": ratio >= 1.0,
    }
    if ratio >= 1.0:
        return
    _swap(model, originals)
    for row in report.rows:
        if row.action == "sparse":
            row.action, row.choice = "dense", "dense"
            row.reason = (
                f"{row.reason}, but the whole model ran {ratio:.2f}x as fast with the "
                f"{len(originals)} swap(s) (median of 3 alternating rounds): all undone"
            )


def sparsify_(
    model: nn.Module,
    example_input: Any,
    *,
    formats: Sequence[str] = KERNEL_FORMATS,
    device: str | torch.device | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    min_speedup: float = 1.05,
    atol: float | None = None,
    rtol: float | None = None,
    min_sparsity: float = 0.3,
    threads: int | None = None,
    min_time_s: float = 0.05,
    check_model: bool = True,
    strict: bool = False,
) -> SparsifyReport:
    """Swap each ``nn.Linear``/``nn.Conv2d`` for a sparse kernel where measured faster.

    Args:
        model: The model (e.g. pruned with :func:`slimtorch.prune.prune_`), changed in place.
        example_input: A representative input (the batch size matters); a tuple is unpacked.
        formats: Candidates, among ``"csr"``, ``"bsr"``, ``"semi_structured"``.
        device: Where to measure and run; the model (and ``example_input``) is moved there.
            ``None``: where it is.
        include: Globs of dotted layer names to consider (all conv/linear layers if ``None``).
        exclude: Globs of names to leave alone.
        min_speedup: The dense-time / sparse-time ratio a kernel must reach (>= 1).
        atol: Output tolerance (``None``: 1e-4 for float32, 1e-2 float16, 2e-2 bfloat16;
            2e-3 for float32 on CUDA where the dense layer runs in TF32).
        rtol: Relative tolerance (same defaults).
        min_sparsity: Layers with a smaller fraction of zero weights are left dense without
            timing (no sparse kernel beats dense there); 0 measures every layer.
        threads: CPU threads for the timings (``None``: keep the current setting).
        min_time_s: Least total timed time per measurement (more calls on fast layers).
        check_model: After swapping, time the whole model with and without the swaps
            (alternately, 3 rounds) and undo them all unless the median per-round speed-up
            is at least 1: kernels that win alone can lose inside the model.
        strict: Raise one :class:`~slimtorch.core.errors.TransformSkipError` naming every
            skipped layer, leaving the model unchanged.

    Returns:
        A :class:`~slimtorch.sparse.report.SparsifyReport`.

    Raises:
        ValueError: an unknown format, ``min_speedup < 1``, a negative tolerance, a device
            that is not available, a glob that matches nothing, or an ``example_input`` the
            model does not run on. The model is then left as it was.
        TransformSkipError: ``strict`` and some layer was skipped.

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 64))
        >>> sparsify_(net, torch.randn(1, 64), min_time_s=0.0).rows[0].reason[:40]
        'weight sparsity 0.000 < min_sparsity 0.3'
    """
    require_values(model, "sparsify_")
    check_bool("sparsify_", "strict", strict)
    unknown = [f for f in formats if f not in KERNEL_FORMATS]
    if isinstance(formats, str) or unknown or not formats:
        raise ValueError(
            f"formats must be a non-empty list among {', '.join(KERNEL_FORMATS)}, got {formats!r}"
        )
    if not isinstance(min_speedup, int | float) or not min_speedup >= 1.0:  # NaN fails too
        raise ValueError(f"min_speedup must be a number >= 1, got {min_speedup!r}")
    if not isinstance(min_sparsity, int | float) or not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    for name, tol_value in (("atol", atol), ("rtol", rtol)):
        if tol_value is not None and (
            isinstance(tol_value, bool)
            or not isinstance(tol_value, int | float)
            or not 0.0 <= tol_value < float("inf")
        ):
            raise ValueError(f"{name} must be None or a finite number >= 0, got {tol_value!r}")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    if not isinstance(min_time_s, int | float) or not min_time_s >= 0:
        raise ValueError(f"min_time_s must be a number >= 0, got {min_time_s!r}")
    target = None if device is None else resolve_device(device)
    layers = select_layers(model, include, exclude)
    blocked = replacement_blockers(model, layers)  # own forward, read directly, shared, tied
    home = _model_device(model)
    if target is not None:  # moved only once every argument is known to be good
        model.to(target)
        example_input = _to_device(example_input, target)
    dev = _model_device(model)
    try:  # on any failure the model goes back where it was (the docstring's "unchanged")
        inputs = _capture_inputs(model, layers, example_input)
        timing: dict[str, Any] = {"threads": threads, "min_time_s": min_time_s, "warmup": 3}
        rows: list[SparsifyRow] = []
        swaps: dict[str, nn.Module] = {}
        loosest = (0.0, 0.0)  # the loosest tolerance any layer was held to
        for name, module in layers:
            w = layer_weight(module).detach()
            row = SparsifyRow(name, type(module).__name__, "dense")
            row.sparsity = float((w == 0).float().mean()) if w.numel() else 0.0
            rows.append(row)
            x = inputs.get(name)  # (the layer's real input during example_input)
            if x is None:
                row.action, row.reason = "skipped", "not called by example_input: nothing to time"
                continue
            row.input_shape = list(x.shape)
            if name in blocked:
                row.action, row.reason = "skipped", blocked[name]
                continue
            if isinstance(module, nn.Conv2d) and conv_lowering_skip(module):
                row.action = "skipped"
                row.reason = f"no sparse conv kernel on {dev}: {conv_lowering_skip(module)}"
                continue
            if row.sparsity < min_sparsity:
                row.reason = (
                    f"weight sparsity {row.sparsity:.3f} < min_sparsity {min_sparsity:.3f}: a "
                    "sparse kernel cannot pay; lower min_sparsity to measure anyway"
                )
                continue
            default = _default_tolerance(module, w.dtype, dev)
            tol = (default[0] if atol is None else atol, default[1] if rtol is None else rtol)
            loosest = (max(loosest[0], tol[0]), max(loosest[1], tol[1]))
            with torch.inference_mode():
                ref = module(x)
            row.dense_s = measure_latency(module, x, device=dev, **timing).median_s
            best: tuple[float, nn.Module] | None = None
            for fmt in formats:
                cand, layer = _try_candidate(fmt, module, x, ref, row.dense_s, dev, tol, timing)
                row.candidates.append(cand)
                if layer is not None and cand.median_s is not None:
                    if best is None or cand.median_s < best[0]:
                        best = (cand.median_s, layer)
            if best is None:
                why = "; ".join(f"{c.fmt} {c.status}: {c.reason}" for c in row.candidates)
                row.reason = f"no sparse kernel ran with the dense outputs on {dev} ({why})"
                continue
            layer = best[1]
            speedup = row.dense_s / best[0] if best[0] > 0 else 0.0
            fmt = layer.fmt  # type: ignore[assignment]
            if speedup >= min_speedup:
                row.action, row.choice = "sparse", str(fmt)
                row.reason = f"{fmt} measured {speedup:.2f}x faster than dense"
                swaps[name] = layer
            else:
                row.reason = f"fastest sparse kernel ({fmt}): {speedup:.2f}x dense < {min_speedup}"
        n_threads = threads if threads is not None else torch.get_num_threads()
        report = SparsifyReport(str(dev), n_threads, float(min_speedup), list(formats), rows)
        if "semi_structured" in formats and semi_structured_support(dev) is not None:
            report.notes.append(str(semi_structured_support(dev)))
        if strict and report.skipped:
            listing = "; ".join(f"{r.name}: {r.reason}" for r in report.skipped)
            raise TransformSkipError(
                f"sparsify_ (strict) skipped {len(report.skipped)} layer(s), model left unchanged: "
                f"{listing}. Exclude these layers or run without strict"
            )
        originals = {name: model.get_submodule(name) for name in swaps}
        _swap(model, swaps)
        if swaps:
            _check_outputs(model, example_input, originals, loosest)
        if swaps and check_model:
            _check_whole_model(model, example_input, originals, report, dev, timing)
    except BaseException:
        model.to(home)
        raise
    for r in rows:  # the report has every row: the log only when debugging
        logger.debug("sparsify %s: %s (%s)", r.name, r.action, r.reason)
    return report


def to_semi_structured_(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> SparsifyReport:
    """Convert every 2:4-sparse layer to PyTorch's semi-structured kernels, without timing.

    On devices without those kernels (CPU, ROCm, NVIDIA below compute capability 8.0) nothing
    changes and every row says that 2:4 is storage-only here. Prefer :func:`sparsify_` with
    ``formats=("semi_structured",)`` to keep a layer only where it is measured faster.

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 64))
        >>> _ = prune_(net, NMConfig(n=2, m=4))
        >>> to_semi_structured_(net).rows[0].reason.startswith("2:4 is storage-only on cpu")
        True
    """
    require_values(model, "to_semi_structured_")
    dev = _model_device(model)
    rows: list[SparsifyRow] = []
    for name, module in select_layers(model, include, exclude):
        w = layer_weight(module).detach()
        row = SparsifyRow(name, type(module).__name__, "skipped")
        row.sparsity = float((w == 0).float().mean()) if w.numel() else 0.0
        rows.append(row)
        row.reason = _unavailable("semi_structured", module, dev)
        if row.reason is not None:
            continue
        try:
            layer = build_sparse_layer(module, "semi_structured")
        except (ValueError, RuntimeError, NotImplementedError, TypeError) as exc:
            row.reason = f"{type(exc).__name__}: {exc}"[:300]
            continue
        model.set_submodule(name, layer)
        row.action, row.choice, row.reason = "sparse", "semi_structured", "converted (not timed)"
    report = SparsifyReport(str(dev), torch.get_num_threads(), 1.0, ["semi_structured"], rows)
    if semi_structured_support(dev) is not None:
        report.notes.append(str(semi_structured_support(dev)))
    return report


@keeps_rng  # the dense layers' own initial weights are overwritten
def densify_(model: nn.Module) -> list[str]:
    """Turn every sparse-kernel layer back into ``nn.Linear``/``nn.Conv2d`` (e.g. to save it).

    Pruning masks the layers carried (see :func:`~slimtorch.sparse.build_sparse_layer`) come
    back as buffers, so a pruned model saves and reloads with its masks.

    Returns:
        Dotted names of the layers converted.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8))
        >>> net[0] = SparseLinear(torch.eye(8), None, "csr")
        >>> densify_(net), type(net[0]).__name__
        (['0'], 'Linear')
    """
    names = [n for n, m in model.named_modules() if isinstance(m, SparseLinear | SparseConv2d)]
    for name in names:
        module = model.get_submodule(name)
        assert isinstance(module, SparseLinear | SparseConv2d)
        model.set_submodule(name, module.to_dense_module())
    return names
