"""Calibration observers: min-max, percentile and MSE ranges, per tensor or per channel.

An observer sees tensors (:meth:`Observer.update`) and returns quantization parameters
(:meth:`Observer.qparams`): ``scale`` (float32) and ``zero_point`` (int64), of shape ``()``
per tensor or ``(C,)`` per channel along ``ch_axis``. Symmetric parameters map
``[-max|x|, max|x|]`` onto a signed range with zero point 0; affine ones map ``[min, max]``
(always widened to include 0, so zero is exact) onto the full range.

- :class:`MinMaxObserver`: the running minimum and maximum.
- :class:`PercentileObserver`: clips at the ``percentile`` of the values seen (the mean of
  per-batch quantiles, per tensor or per channel).
- :class:`MSEObserver`: searches the clipping range that minimises the mean squared
  quantization error over (an even subsample of) the values seen, as in
  Banner, Nahshan & Soudry, 2019, "Post-training 4-bit quantization of convolutional networks
  for rapid-deployment", arXiv:1810.05723 (there solved analytically for Laplace/Gauss priors;
  here by a grid search on the observed distribution).

NaN or Inf in observed values raise :class:`CalibrationError`.

Example:
    >>> obs = make_observer("minmax", dtype="uint8")
    >>> obs.update(torch.tensor([0.0, 1.0, 2.55]))
    >>> [round(float(t), 4) for t in obs.qparams()]
    [0.01, 0.0]
"""

from __future__ import annotations

import math

import torch

from slimtorch.quant.lsq import CalibrationError

__all__ = [
    "OBSERVERS",
    "CalibrationError",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
    "qparams_from_range",
]

_RANGES = {"uint8": (0, 255), "int8": (-128, 127), "int4": (-8, 7)}


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, dtype: str, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[lo, hi]`` onto the integer range of ``dtype``.

    ``lo``/``hi`` are widened to include 0. With ``symmetric`` the zero point is 0 for signed
    types and the midpoint (128) for ``uint8``.

    Example:
        >>> s, z = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), "int8", True)
        >>> round(float(s), 6), int(z)
        (0.007874, 0)
    """
    if dtype not in _RANGES:
        raise ValueError(f"dtype must be one of {', '.join(_RANGES)}, got {dtype!r}")
    qmin, qmax = _RANGES[dtype]
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        amax = torch.maximum(-lo, hi)
        if qmin < 0:
            scale = (amax / qmax).clamp(min=eps)
            return scale, torch.zeros_like(scale, dtype=torch.int64)
        scale = (2 * amax / (qmax - qmin)).clamp(min=eps)
        return scale, torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int64)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=eps)
    zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int64)
    return scale, zp


class Observer:
    """Base observer: validation and per-channel reshaping; subclasses track a range.

    Args:
        dtype: Target integer type: ``"uint8"``, ``"int8"`` or ``"int4"``.
        symmetric: Symmetric (zero point 0 for signed types) or affine parameters.
        per_channel: One range per index of ``ch_axis`` instead of one per tensor.
        ch_axis: The channel dimension (0 for weights, 1 for NCHW activations).
        name: Shown in error messages (the layer being calibrated).
    """

    def __init__(
        self,
        *,
        dtype: str = "uint8",
        symmetric: bool = False,
        per_channel: bool = False,
        ch_axis: int = 1,
        name: str = "tensor",
    ) -> None:
        if dtype not in _RANGES:
            raise ValueError(f"dtype must be one of {', '.join(_RANGES)}, got {dtype!r}")
        self.dtype, self.symmetric, self.per_channel = dtype, symmetric, per_channel
        self.ch_axis, self.name = ch_axis, name
        self.count = 0

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32 ``(C, N)`` per channel or ``(1, N)`` per tensor, checked finite."""
        x = x.detach().float()
        if x.numel() == 0:
            raise CalibrationError(f"{self.name}: observed an empty tensor; feed real batches")
        # one reduction instead of a mask as large as x: a NaN/Inf makes the sum non-finite
        # (so can an overflow of finite values, hence the exact count before raising)
        bad = 0 if math.isfinite(float(x.sum())) else int((~torch.isfinite(x)).sum())
        if bad:
            raise CalibrationError(
                f"{self.name}: {bad} NaN/Inf value(s) during calibration; check the input "
                "data and the layers before it (a diverged model or unnormalised inputs)"
            )
        if not self.per_channel:
            return x.reshape(1, -1)
        if x.ndim <= self.ch_axis:
            raise CalibrationError(
                f"{self.name}: per-channel observer on axis {self.ch_axis} got a tensor of "
                f"shape {tuple(x.shape)}; use per-tensor or pass NCHW/(N, features) data"
            )
        return x.movedim(self.ch_axis, 0).reshape(x.shape[self.ch_axis], -1)  # (C, N)

    def update(self, x: torch.Tensor) -> None:
        """Observe ``x``.

        Raises:
            CalibrationError: ``x`` is empty, holds NaN/Inf, or has no channel axis.
        """
        self._update(self._rows(x))
        self.count += 1

    def _update(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range ``(lo, hi)`` chosen so far."""
        raise NotImplementedError

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)``; shape ``()`` per tensor, ``(C,)`` per channel.

        Raises:
            CalibrationError: Nothing was observed.
        """
        if self.count == 0:
            raise CalibrationError(
                f"{self.name}: no data observed; the calibration set was empty or never "
                "reached this layer"
            )
        lo, hi = self.range()
        scale, zp = qparams_from_range(lo, hi, self.dtype, self.symmetric)
        return (scale, zp) if self.per_channel else (scale.reshape(()), zp.reshape(()))


class MinMaxObserver(Observer):
    """The running minimum and maximum of everything observed."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _update(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        elif lo.shape != self.lo.shape:
            raise CalibrationError(
                f"{self.name}: channel count changed from {self.lo.numel()} to {lo.numel()} "
                "between calibration batches; feed batches of one shape"
            )
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.lo is not None and self.hi is not None
        return self.lo, self.hi


class PercentileObserver(MinMaxObserver):
    """Clip at the ``percentile`` (and ``100 - percentile``) of the observed values: the mean
    over batches of each batch's exact quantiles (per channel, or of the whole tensor).

    A histogram over ``[min, max]`` would put its quantiles on bins of width ``range / bins``:
    one outlier a thousand times the typical value puts all the other data in the first bin,
    and the clipping range at that bin's centre, far outside the data.

    Args:
        percentile: In ``(50, 100]``; 100 is min-max.
        **kwargs: As :class:`Observer`.

    Example:
        >>> obs = PercentileObserver(percentile=99.0, dtype="int8", symmetric=True)
        >>> obs.update(torch.cat([torch.linspace(-1, 1, 10001), torch.tensor([1e5])]))
        >>> [round(float(v), 2) for v in obs.range()]
        [-0.98, 0.98]
    """

    def __init__(self, percentile: float = 99.99, **kwargs: object) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        super().__init__(**kwargs)
        self.percentile = percentile
        self.q_lo: list[torch.Tensor] = []
        self.q_hi: list[torch.Tensor] = []

    def _update(self, rows: torch.Tensor) -> None:
        super()._update(rows)  # min and max: the range at percentile 100
        q = torch.tensor(
            [1 - self.percentile / 100, self.percentile / 100], dtype=rows.dtype, device=rows.device
        )
        # torch.quantile sorts (and takes at most 16M elements): subsample wide rows evenly to
        # 100k values, where the 99.99th percentile still rests on ten of them
        per_row = max(1, min(100_000, 16_000_000 // rows.shape[0]))
        step = max(1, math.ceil(rows.shape[1] / per_row))
        qs = torch.quantile(rows[:, ::step], q, dim=1)  # (2, C), one C per tensor
        self.q_lo.append(qs[0])
        self.q_hi.append(qs[1])

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.percentile == 100:
            return super().range()
        return torch.stack(self.q_lo).mean(0).float(), torch.stack(self.q_hi).mean(0).float()


def _fq_error(
    values: torch.Tensor, weights: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dtype: str,
    symmetric: bool,
) -> torch.Tensor:  # fmt: skip
    """Weighted squared quantization error of ``values`` (N,) for K candidate ranges (K,)."""
    qmin, qmax = _RANGES[dtype]
    scale, zp = qparams_from_range(lo, hi, dtype, symmetric)  # (K,)
    s, z = scale.double()[:, None], zp.double()[:, None]
    q = torch.clamp(torch.round(values[None, :] / s) + z, qmin, qmax)
    return (((q - z) * s - values[None, :]) ** 2 * weights[None, :]).sum(1)  # (K,)


class MSEObserver(MinMaxObserver):
    """Choose the clipping range (a shrink of min-max) with the least quantization MSE.

    Candidates are ``[lo * a, hi * a]`` for ``a`` in ``grid`` geometric steps from 1 down to
    ``min_shrink``; the error is measured on an even subsample of the values seen (up to
    ``max_samples`` per channel, or per tensor).

    Args:
        grid: Number of candidate shrink factors.
        min_shrink: Smallest factor tried, in ``(0, 1]``.
        max_samples: Values kept per channel (or per tensor) to measure the error on.
        **kwargs: As :class:`Observer`.
    """

    def __init__(
        self, grid: int = 100, min_shrink: float = 0.01, max_samples: int = 65536,
        **kwargs: object,
    ) -> None:  # fmt: skip
        if not 0 < min_shrink <= 1:
            raise ValueError(f"min_shrink must be in (0, 1], got {min_shrink!r}")
        super().__init__(**kwargs)
        self.grid, self.min_shrink, self.max_samples = grid, min_shrink, max_samples
        self.samples: list[torch.Tensor] = []

    def _update(self, rows: torch.Tensor) -> None:
        super()._update(rows)
        per_batch = max(1, self.max_samples // 4)
        step = max(1, math.ceil(rows.shape[1] / per_batch))
        self.samples.append(rows[:, ::step].double())
        kept = sum(t.shape[1] for t in self.samples)
        if kept > self.max_samples:  # thin the kept values evenly
            self.samples = [torch.cat(self.samples, 1)[:, ::2]]

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super().range()
        factors = torch.logspace(0.0, math.log10(self.min_shrink), self.grid, dtype=torch.float64)
        values = torch.cat(self.samples, 1)  # (C, S)
        ones = torch.ones(values.shape[1], dtype=torch.float64)
        out_lo, out_hi = lo.clone(), hi.clone()
        for c in range(values.shape[0]):
            err = _fq_error(
                values[c], ones, lo[c].double() * factors, hi[c].double() * factors,
                self.dtype, self.symmetric,
            )  # fmt: skip
            best = factors[int(torch.argmin(err))]
            out_lo[c], out_hi[c] = lo[c] * best, hi[c] * best
        return out_lo, out_hi


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(kind: str, *, percentile: float = 99.99, **kwargs: object) -> Observer:
    """An observer by name: ``"minmax"``, ``"percentile"`` or ``"mse"``.

    Example:
        >>> make_observer("mse", dtype="int8", symmetric=True, per_channel=True, ch_axis=0)
        <slimtorch.quant.observers.MSEObserver object at ...>
    """
    if kind not in OBSERVERS:
        raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {kind!r}")
    if kind == "percentile":
        return PercentileObserver(percentile=percentile, **kwargs)
    return OBSERVERS[kind](**kwargs)
