"""Observers: min-max, percentile and MSE ranges, symmetric/affine, per tensor/channel."""

from __future__ import annotations

import pytest
import torch

from slimtorch.quant.observers import (
    CalibrationError,
    MinMaxObserver,
    make_observer,
    qparams_from_range,
)
from slimtorch.quant.qdq import fake_quantize


def test_minmax_affine_matches_formula() -> None:
    obs = MinMaxObserver(dtype="uint8")
    obs.update(torch.tensor([-1.0, 0.5]))
    obs.update(torch.tensor([2.0, 0.0]))
    scale, zp = obs.qparams()
    assert scale.shape == () and zp.shape == ()
    assert float(scale) == pytest.approx(3.0 / 255)
    assert int(zp) == round(1.0 / (3.0 / 255))
    # zero is exactly representable
    assert float(fake_quantize(torch.tensor(0.0), scale, zp, 0, 255)) == 0.0


def test_symmetric_int8_and_uint8() -> None:
    s, z = qparams_from_range(torch.tensor(-0.5), torch.tensor(2.0), "int8", True)
    assert float(s) == pytest.approx(2.0 / 127) and int(z) == 0
    s, z = qparams_from_range(torch.tensor(-0.5), torch.tensor(2.0), "uint8", True)
    assert float(s) == pytest.approx(4.0 / 255) and int(z) == 128


def test_per_channel_ranges() -> None:
    x = torch.zeros(4, 3, 5, 5)
    for c in range(3):
        x[:, c] = torch.linspace(-(c + 1), c + 1, 25).reshape(5, 5)
    obs = make_observer("minmax", dtype="int8", symmetric=True, per_channel=True, ch_axis=1)
    obs.update(x)
    scale, zp = obs.qparams()
    assert scale.shape == (3,) and zp.shape == (3,)
    torch.testing.assert_close(scale, torch.tensor([1.0, 2.0, 3.0]) / 127)
    assert bool((zp == 0).all())


def test_percentile_ignores_outliers() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g)
    x[0] = 1000.0
    mm = make_observer("minmax")
    pc = make_observer("percentile", percentile=99.9)
    for o in (mm, pc):
        o.update(x)
    assert float(mm.range()[1]) == pytest.approx(1000.0)
    hi = float(pc.range()[1])
    assert hi == pytest.approx(float(torch.quantile(x, 0.999)))  # 3.09 for N(0, 1)
    # an outlier 1e5 times the data: a histogram's bins would be wider than all the rest
    huge = torch.cat([torch.linspace(-1, 1, 100_001), torch.tensor([1e5])])
    for dtype, symmetric in (("uint8", False), ("int8", True)):
        obs = make_observer("percentile", percentile=99.99, dtype=dtype, symmetric=symmetric)
        obs.update(huge)
        lo, hi = (float(v) for v in obs.range())
        assert -1.0 <= lo < -0.99 and 0.99 < hi <= 1.0
    # per channel: the mean of per-batch quantiles
    pcc = make_observer("percentile", percentile=99.0, per_channel=True, ch_axis=0)
    pcc.update(torch.stack([x[:1000], 2 * x[1:1001]]))
    _, hi_c = pcc.range()
    assert hi_c.shape == (2,) and 1.8 < float(hi_c[1] / hi_c[0]) < 2.2


def test_mse_beats_minmax_on_long_tails() -> None:
    torch.manual_seed(1)
    x = torch.distributions.Laplace(0.0, 1.0).sample((50_000,))
    errs = {}
    for kind in ("minmax", "percentile", "mse"):
        o = make_observer(kind, dtype="int8", symmetric=True)
        o.update(x)
        s, z = o.qparams()
        errs[kind] = float(((fake_quantize(x, s, z, -128, 127) - x) ** 2).mean())
    assert errs["mse"] < 0.9 * errs["minmax"] and errs["mse"] < errs["percentile"]
    w = torch.randn(8, 64)
    o = make_observer("mse", dtype="int8", symmetric=True, per_channel=True, ch_axis=0)
    o.update(w)
    s, _ = o.qparams()
    mm = w.abs().amax(1) / 127
    assert s.shape == (8,) and bool((s <= mm + 1e-9).all())


def test_nan_empty_and_no_data_raise() -> None:
    obs = make_observer("mse", name="input of 'conv1'")
    with pytest.raises(CalibrationError, match=r"conv1.*NaN/Inf"):
        obs.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(CalibrationError, match=r"2 NaN/Inf"):
        obs.update(torch.tensor([float("inf"), 1.0, float("-inf")]))
    # finite values whose sum overflows are still finite values
    big = make_observer("minmax")
    big.update(torch.full((4,), 3e38))
    assert big.count == 1
    with pytest.raises(CalibrationError, match="empty"):
        obs.update(torch.empty(0))
    with pytest.raises(CalibrationError, match="no data"):
        obs.qparams()
    with pytest.raises(ValueError, match="observer must be one of"):
        make_observer("kl")
    with pytest.raises(ValueError, match="percentile"):
        make_observer("percentile", percentile=20.0)
