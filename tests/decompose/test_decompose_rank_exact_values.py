"""Exact values of EVBMF rank selection and CP-ALS stopping rules.

Every expected number is worked out by hand in the test (or by plain math arithmetic).
"""

from __future__ import annotations

import math

import pytest
import torch

from slimtorch.core.errors import DecompositionError
from slimtorch.decompose.cp import cp_als
from slimtorch.decompose.vbmf import _minimise, evbmf


def test_evbmf_threshold_with_known_noise_follows_the_nakajima_formula() -> None:
    # square matrix: alpha = L/M = 1, tau_bar = 2.5129 sqrt(alpha) = 2.5129, sigma2 = 1
    y = torch.diag(torch.tensor([6.85] + [0.1] * 9, dtype=torch.float64))
    result = evbmf(y, sigma2=1.0)
    tau = 2.5129
    expected = math.sqrt(10 * 1.0 * (1 + tau) * (1 + 1.0 / tau))
    assert result.threshold == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(7.0077433, rel=1e-6)
    # 6.85 lies just under the threshold, so no component survives
    assert result.rank == 0
    assert result.sigma2 == 1.0


def test_golden_section_minimiser_finds_the_minimum_of_a_log_parabola() -> None:
    def f(v: float) -> float:
        return (math.log(v) - math.log(0.37)) ** 2

    assert _minimise(f, 0.01, 10.0) == pytest.approx(0.37, rel=1e-6)


def test_cp_als_reports_divergence_when_the_fit_is_worse_than_zero() -> None:
    # a huge damping with one sweep leaves the random init far from the one-hot tensor,
    # whose zero approximation has relative error 1
    t = torch.zeros(4, 4, 4, dtype=torch.float64)
    t[0, 0, 0] = 1.0
    with pytest.raises(DecompositionError, match="diverged"):
        cp_als(t, 8, reg=1e8, n_iter=1, init="random", require_convergence=False)


def test_cp_als_stops_at_the_first_sweep_whose_error_change_is_below_tol() -> None:
    g = torch.Generator().manual_seed(0)
    torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    t = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    result = cp_als(t, 2, tol=1e-2)
    # the second sweep already changes the error by less than 1e-2
    assert result.converged
    assert result.iterations == 2
    assert len(result.errors) == 2
