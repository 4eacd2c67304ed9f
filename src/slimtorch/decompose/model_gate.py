"""Keep a factorised layer only where the whole model is faster with it.

The per-layer gate (:func:`~slimtorch.decompose.speed.layer_speedup`) times a layer alone. In a
compiled model on a GPU that can mislead both ways: the compiler fuses batch norms and
activations into the neighbours of a dense convolution but not around the three kernels of a
Tucker-2 layer, picks layouts for the whole graph, and a layer's share of the forward time
decides what its saving is worth. On an H100 (vgg11-bn, 28x28 inputs, batch 4096, compiled) the
per-layer gate kept 2 of 9 layers for 1.13x, while the six 256/512-channel layers chosen by
timing the whole model gave 1.25x (``docs/benchmarks.md``).

:func:`model_gate` does that choice by measurement: starting from every factorised layer, it
takes out one layer at a time, those saving the fewest FLOPs first, and times the model with
and without it side by side (interleaved rounds, median, the worst ratio over the speed
batches). A layer stays factorised only if the model is at least ``min_speedup`` faster with it;
otherwise the original layer goes back and the row records both whole-model times. This is
backward elimination, one model timing pair per candidate layer: ``n`` layers cost ``n`` pairs
(plus compiles with ``speed_compile``), not ``2^n``.

Example:
    >>> net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))
    >>> cfg = SVDConfig(rank=0.25, min_speedup=100.0, speed_scope="model")  # demands 100x
    >>> row = decompose_(net, cfg, include=["0"], example_input=torch.randn(4, 256)).rows[0]
    >>> row.action, row.speed_source, type(net[0]).__name__
    ('skipped', 'measured-model:cpu', 'Linear')
    >>> row.reason.startswith("whole model not faster with it")
    True
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimtorch.core.devices import compile_problem
from slimtorch.core.surgery import set_submodule
from slimtorch.decompose.speed import layer_speedup

if TYPE_CHECKING:
    from slimtorch.decompose.config import DecomposeConfig
    from slimtorch.decompose.transform import LayerReport

logger = logging.getLogger(__name__)


def _saving(row: LayerReport) -> float:
    if row.flops_before is None or row.flops_after is None:
        return float(row.params_before - row.params_after)
    return float(row.flops_before - row.flops_after)


def check_speed_request(model: nn.Module, config: DecomposeConfig, example_input: Any) -> None:
    """Refuse, before any work, a speed gate that cannot run: ``min_speedup`` without
    ``example_input``, or ``speed_compile`` (whole-model timing under ``torch.compile``) where
    inductor cannot compile (:func:`~slimtorch.core.devices.compile_problem`: a CPU without a
    C++ compiler, an old GPU), which would otherwise fail after every layer was factorised."""
    if config.min_speedup is None:
        return
    if example_input is None:
        raise ValueError(
            f"{type(config).__name__}.min_speedup={config.min_speedup} needs example_input (one "
            "batch of real inputs) to know each layer's input shape; pass example_input or set "
            "min_speedup=None"
        )
    if config.speed_scope == "model" and config.speed_compile:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if (problem := compile_problem(device)) is not None:
            raise ValueError(
                f"speed_compile=True times the models under torch.compile, which cannot compile "
                f"for {device}: {problem}; set speed_compile=False to time them eagerly"
            )


def model_gate(
    model: nn.Module,
    replacements: dict[str, nn.Module],
    rows: list[LayerReport],
    config: DecomposeConfig,
    example_input: Any,
) -> None:
    """Drop from ``replacements`` every layer the whole model is not faster with.

    Args:
        model: The model before any replacement (not changed; copies are timed).
        replacements: Factorised module per layer name; reverted layers are removed.
        rows: The report rows; a reverted layer's row becomes a ``"skipped"`` one with the
            reason, and every candidate's row gets the whole-model times (``latency_before_s``
            without the layer factorised, ``latency_after_s`` with it) and their ratio.
        config: Its ``min_speedup``, ``speed_batch``, ``speed_channels_last`` and
            ``speed_compile`` are used. One layer's share of the whole model's time is small,
            so a whole-model ``min_speedup`` of 1.0-1.01 is the useful range (1.0: keep every
            layer the model is not slower with).

    With ``speed_compile`` it ends with ``torch._dynamo.reset()``: the trial models' graphs
    would otherwise stay cached on the model's ``forward`` and count against dynamo's
    recompile limit when the chosen model is compiled (it then silently runs eagerly).
        example_input: One input tensor (its batch is replaced by each speed batch).

    Raises:
        ValueError: ``example_input`` is not a single tensor.
    """
    if not isinstance(example_input, torch.Tensor):
        raise ValueError(
            "speed_scope='model' times the whole model on one input tensor; example_input is a "
            f"{type(example_input).__name__}. Use speed_scope='layer' for models with several "
            "inputs"
        )
    assert config.min_speedup is not None
    by_name = {r.name: r for r in rows}
    kept = list(replacements)
    layout = torch.channels_last if config.speed_channels_last else None
    tag = ",compiled" if config.speed_compile else ""

    def build(names: list[str]) -> nn.Module:
        m = copy.deepcopy(model).eval()
        for n in names:
            set_submodule(m, n, copy.deepcopy(replacements[n]).eval())
        if layout is not None and example_input.ndim == 4:
            m = m.to(memory_format=layout)  # type: ignore[call-overload]
        if config.speed_compile:
            return torch.compile(m, dynamic=False)  # type: ignore[return-value]
        return m

    # imported here: it costs about a second, which loading a model (its transforms import
    # this package) must not pay
    import torch._dynamo as dynamo

    batches = config.speed_batches() or (int(example_input.shape[0]),)
    shapes = [(b, *example_input.shape[1:]) for b in batches]
    # every trial is a new module over the same forward code: room for all their graphs
    limit = 4 * (len(kept) + 2) * len(shapes) + 8
    with dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=10 * limit):
        current = build(kept)
        for name in sorted(kept, key=lambda n: _saving(by_name[n])):
            trial = build([n for n in kept if n != name])
            worst = None
            for shape in shapes:
                check = layer_speedup(
                    trial, current, shape, repeats=5, calls=3, warmup=2,
                    channels_last="input" if layout is not None else False,
                )  # fmt: skip
                if worst is None or check.speedup < worst.speedup:
                    worst = check
            assert worst is not None
            row = by_name[name]
            row.latency_before_s, row.latency_after_s = worst.original_s, worst.factorised_s
            row.speedup = worst.speedup
            row.speed_source = worst.source.replace("measured:", "measured-model:", 1) + tag
            logger.info("model gate %s: %.2fx (%s)", name, worst.speedup, row.speed_source)
            if worst.speedup >= config.min_speedup:
                continue
            kept.remove(name)
            replacements.pop(name)
            row.info = {**row.info, "tried_ranks": row.ranks, "tried_rel_error": row.rel_error}
            row.action, row.ranks, row.rel_error = "skipped", None, None
            row.params_after, row.flops_after = row.params_before, row.flops_before
            row.reason = (
                f"whole model not faster with it: {worst.original_s * 1e3:.3f} ms -> "
                f"{worst.factorised_s * 1e3:.3f} ms ({worst.speedup:.2f}x < min_speedup "
                f"{config.min_speedup}, {row.speed_source}); kept dense"
            )
            current = trial
    if config.speed_compile:
        # the trial graphs stay in dynamo's cache on the model's forward and would count against
        # the recompile limit when the chosen model is compiled next: drop them
        dynamo.reset()
