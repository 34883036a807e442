"""Per-tunnel usage distributions U_i, their convolution Y and the reserve (paper §5.3).

Everything is on an integer grid: one node = ``units_per_node`` CPU units, and a
tunnel's usage α_i is rounded *up* to the next unit (rounding up keeps the reserve
conservative). U_i is a probability mass function over units 0..ceil(σ·units).
Y = Σ U_i under the paper's independence assumption; it is computed by multiplying
Fourier transforms, pairwise in a balanced tree so that 10,000 tunnels stay cheap.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import numpy.typing as npt

from protego.errors import ConfigError

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Slack against floating-point noise when rounding usage to grid units.
_ROUND_SLACK = 1e-9


def quantize(alpha: npt.ArrayLike, units_per_node: int) -> IntArray:
    """CPU usage (fraction of a node) → integer CPU units, rounded up."""
    a = np.asarray(alpha, dtype=np.float64)
    if a.size and (not np.all(np.isfinite(a)) or float(a.min()) < 0.0):
        raise ConfigError("CPU usage must be finite and non-negative")
    q = np.ceil(a * units_per_node - _ROUND_SLACK)
    return np.maximum(q, 0).astype(np.int64)


def usage_distributions(units: npt.ArrayLike, max_units: int) -> FloatArray:
    """Histograms U_i from measurements.

    ``units`` has shape (samples, tunnels): the quantised usage of every tunnel at
    every measurement in the window. Returns shape (tunnels, max_units + 1), each row a
    probability mass function.
    """
    q = np.asarray(units, dtype=np.int64)
    if q.ndim != 2 or q.shape[0] == 0:
        raise ConfigError("usage_distributions needs a non-empty (samples, tunnels) array")
    if q.size and (int(q.min()) < 0 or int(q.max()) > max_units):
        raise ConfigError(f"quantised usage outside [0, {max_units}] units")
    samples, tunnels = q.shape
    width = max_units + 1
    flat = (np.arange(tunnels, dtype=np.int64)[None, :] * width + q).ravel()
    counts = np.bincount(flat, minlength=tunnels * width).astype(np.float64)
    pmfs: FloatArray = counts.reshape(tunnels, width) / samples
    return pmfs


def _next_fast_len(n: int) -> int:
    """Smallest 2^a·3^b >= n (cheap FFT sizes for numpy's pocketfft)."""
    best = 1 << max(0, (n - 1).bit_length())
    p3 = 1
    while p3 < best:
        p2 = p3
        while p2 < n:
            p2 *= 2
        best = min(best, p2)
        p3 *= 3
    return best


def convolve_all(pmfs: npt.ArrayLike) -> FloatArray:
    """The distribution of the sum of independent variables with the given pmfs.

    ``pmfs`` has shape (n, width). The result has length n·(width − 1) + 1. Pairs are
    convolved level by level (a balanced tree) with batched real FFTs, so the cost is
    O(N log N log n) for N = n·width rather than n FFTs of the full length.
    Round-off below zero is clipped and the result renormalised to sum 1.
    """
    level = np.asarray(pmfs, dtype=np.float64)
    if level.ndim != 2 or level.shape[0] == 0 or level.shape[1] == 0:
        raise ConfigError("convolve_all needs a non-empty (n, width) array of pmfs")
    support = level.shape[0] * (level.shape[1] - 1) + 1
    while level.shape[0] > 1:
        count, width = level.shape
        carry = level[-1:] if count % 2 else None
        pairs = level[: count - (count % 2)]
        out_width = 2 * width - 1
        nfft = _next_fast_len(out_width)
        spectra = np.fft.rfft(pairs, n=nfft, axis=1)
        product = spectra[0::2] * spectra[1::2]
        merged = np.fft.irfft(product, n=nfft, axis=1)[:, :out_width]
        np.clip(merged, 0.0, None, out=merged)
        if carry is not None:
            padded = np.zeros((1, out_width))
            padded[0, :width] = carry[0]
            merged = np.vstack([merged, padded])
        level = merged
    y = level[0][:support]  # a padded odd carry can leave trailing zeros
    total = float(y.sum())
    if total <= 0.0:
        raise ConfigError("convolution lost all probability mass")
    result: FloatArray = y / total
    return result


def reserved_capacity(y: npt.ArrayLike, units_per_node: int, epsilon: float) -> int:
    """C: the fewest whole nodes with Pr(Y > C) <= ε (paper §5.3).

    ``y`` is the pmf of the aggregate usage in CPU units.
    """
    pmf = np.asarray(y, dtype=np.float64)
    if not 0.0 < epsilon < 1.0:
        raise ConfigError(f"epsilon must be in (0, 1), got {epsilon:g}")
    # tail[k] = Pr(Y > k units) = 1 - cdf[k]; computed from the right for accuracy.
    tail = np.concatenate([np.cumsum(pmf[::-1])[::-1][1:], [0.0]])
    max_nodes = math.ceil((pmf.size - 1) / units_per_node)
    for c in range(max_nodes + 1):
        k = c * units_per_node
        p_exceed = float(tail[k]) if k < tail.size else 0.0
        if p_exceed <= epsilon + 1e-12:
            return c
    return max_nodes


def reserved_nodes(capacity_c: int, t_h: float) -> int:
    """The number of VMs (active + inactive) to keep: ⌈C / T_H⌉ (paper §5.3)."""
    if not 0.0 < t_h <= 1.0:
        raise ConfigError(f"T_H must be in (0, 1], got {t_h:g}")
    return math.ceil(capacity_c / t_h - 1e-12)


def reserve_for_window(units: npt.ArrayLike, max_units: int, units_per_node: int,
                       epsilon: float, t_h: float) -> tuple[int, int]:
    """(C, reserved node count) from a window of quantised measurements (samples, tunnels)."""
    u = usage_distributions(units, max_units)
    y = convolve_all(u)
    c = reserved_capacity(y, units_per_node, epsilon)
    r = reserved_nodes(c, t_h)
    log.debug("reserve: %d tunnels, C=%d nodes, reserved=%d", u.shape[0], c, r)
    return c, r
