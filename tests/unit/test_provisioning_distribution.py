"""U_i, the FFT convolution Y and the reserve C (paper §5.3)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protego.errors import ConfigError
from protego.provisioning.distribution import (
    convolve_all,
    quantize,
    reserve_for_window,
    reserved_capacity,
    reserved_nodes,
    usage_distributions,
)


def _random_pmfs(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    raw = rng.random((n, width)) ** 3  # lumpy, not uniform
    raw[rng.random((n, width)) < 0.4] = 0.0
    raw[:, 0] += 1e-3
    return raw / raw.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33])
def test_fft_convolution_equals_direct_convolution(n: int) -> None:
    rng = np.random.default_rng(n)
    pmfs = _random_pmfs(rng, n, 31)
    direct = np.array([1.0])
    for row in pmfs:
        direct = np.convolve(direct, row)
    y = convolve_all(pmfs)
    assert y.shape == direct.shape == (n * 30 + 1,)
    np.testing.assert_allclose(y, direct, atol=1e-12)


def test_convolution_matches_monte_carlo_sum_of_independent_draws() -> None:
    rng = np.random.default_rng(7)
    n, width, draws = 12, 31, 200_000
    pmfs = _random_pmfs(rng, n, width)
    y = convolve_all(pmfs)
    total = np.zeros(draws, dtype=np.int64)
    for row in pmfs:
        total += rng.choice(width, size=draws, p=row)
    empirical_cdf = np.cumsum(np.bincount(total, minlength=y.size)) / draws
    model_cdf = np.cumsum(y)
    # Kolmogorov–Smirnov: 1.63/sqrt(draws) is the 1 % critical value (≈ 0.0036).
    assert np.max(np.abs(empirical_cdf - model_cdf)) < 1.63 / math.sqrt(draws)
    support = np.arange(width)
    mean = sum(float(row @ support) for row in pmfs)
    var = sum(float(row @ support**2) - float(row @ support) ** 2 for row in pmfs)
    assert float(y @ np.arange(y.size)) == pytest.approx(mean, rel=1e-9)
    assert float(y @ np.arange(y.size) ** 2) - mean**2 == pytest.approx(var, rel=1e-9)


def test_usage_distributions_are_histograms_of_the_window() -> None:
    units = np.array([[0, 3], [1, 3], [1, 2], [3, 3]])
    u = usage_distributions(units, max_units=3)
    np.testing.assert_allclose(u, [[0.25, 0.5, 0.0, 0.25], [0.0, 0.0, 0.25, 0.75]])


def test_quantize_rounds_up_to_the_grid() -> None:
    np.testing.assert_array_equal(quantize([0.0, 0.3, 0.301, 0.2999999999999], 100),
                                  [0, 30, 31, 30])
    with pytest.raises(ConfigError):
        quantize([-0.1], 100)


def test_reserved_capacity_on_a_known_binomial() -> None:
    # 40 tunnels, each uses a whole node (100 units) with probability 0.5, else nothing:
    # Y/100 ~ Binomial(40, 0.5). C is the smallest c with Pr(Bin > c) <= eps.
    pmf = np.zeros((40, 101))
    pmf[:, 0] = pmf[:, 100] = 0.5
    y = convolve_all(pmf)
    for eps in (0.5, 0.05, 0.01):
        tail = [sum(math.comb(40, k) for k in range(c + 1, 41)) / 2**40 for c in range(41)]
        expected = next(c for c in range(41) if tail[c] <= eps)
        assert reserved_capacity(y, 100, eps) == expected


def test_reserved_nodes_divides_by_the_hotspot_threshold() -> None:
    assert reserved_nodes(9, 0.9) == 10
    assert reserved_nodes(10, 0.9) == 12
    assert reserved_nodes(0, 0.9) == 0
    assert reserved_nodes(7, 1.0) == 7


def test_reserve_for_constant_tunnels_is_their_sum() -> None:
    # 10 tunnels always at 0.25 node: Y is a point mass at 2.5 nodes → C = 3 → ⌈3/0.9⌉ = 4.
    units = np.full((60, 10), 25)
    assert reserve_for_window(units, 30, 100, 0.05, 0.9) == (3, 4)


def test_convolve_rejects_empty_input() -> None:
    with pytest.raises(ConfigError):
        convolve_all(np.zeros((0, 3)))
