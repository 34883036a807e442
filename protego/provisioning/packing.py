"""Placement rules of paper §5.4: Best Fit, Best Fit Decreasing, hotspot migration.

Sizes and capacities are CPU fractions of one node. A small tolerance absorbs
floating-point noise so that, e.g., three tunnels of 0.3 fit a bin of 0.9.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protego.errors import ConfigError

FIT_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Packing:
    """Result of a bin packing: ``bin_of[i]`` is the bin of item i, bins are 0..bins-1."""

    bin_of: tuple[int, ...]
    bins: int


def best_fit_decreasing(sizes: Sequence[float] | npt.NDArray[np.float64],
                        capacity: float) -> Packing:
    """Best Fit Decreasing: items in decreasing size, each into the fullest bin it fits.

    Uses at most 11/9·OPT + 1 bins (the paper cites 11/9 OPT; the additive constant is
    part of the classical bound). O(n log n + n·b) with a sorted residual list.
    """
    s = np.asarray(sizes, dtype=np.float64)
    if s.ndim != 1:
        raise ConfigError("best_fit_decreasing needs a 1-D list of sizes")
    if s.size and (not np.all(np.isfinite(s)) or float(s.min()) < 0.0):
        raise ConfigError("item sizes must be finite and non-negative")
    if capacity <= 0.0:
        raise ConfigError(f"bin capacity must be positive, got {capacity:g}")
    if s.size and float(s.max()) > capacity + FIT_TOLERANCE:
        raise ConfigError(f"an item of size {float(s.max()):g} exceeds bin capacity {capacity:g}")
    order = np.argsort(-s, kind="stable")
    bin_of = [0] * s.size
    # (residual, bin id), kept sorted: the first entry with residual >= size is the best fit.
    open_bins: list[tuple[float, int]] = []
    bins = 0
    for idx in order.tolist():
        size = float(s[idx])
        pos = bisect.bisect_left(open_bins, (size - FIT_TOLERANCE, -1))
        if pos < len(open_bins):
            residual, b = open_bins.pop(pos)
            bisect.insort(open_bins, (residual - size, b))
        else:
            b = bins
            bins += 1
            bisect.insort(open_bins, (capacity - size, b))
        bin_of[idx] = b
    return Packing(bin_of=tuple(bin_of), bins=bins)


def best_fit_node(beta: npt.NDArray[np.float64], candidates: npt.NDArray[np.bool_],
                  size: float, capacity: float) -> int | None:
    """Best Fit target: among ``candidates``, the node with the least room left that
    still takes ``size`` without exceeding ``capacity``. None if nothing fits."""
    room = capacity - beta
    ok = candidates & (room >= size - FIT_TOLERANCE)
    if not ok.any():
        return None
    masked = np.where(ok, room, np.inf)
    return int(np.argmin(masked))


def hotspots(beta: npt.NDArray[np.float64], t_h: float) -> list[int]:
    """Nodes with β_j > T_H, hottest first (paper §5.4, hotspot node detection)."""
    hot = np.flatnonzero(beta > t_h + FIT_TOLERANCE)
    return [int(j) for j in hot[np.argsort(-beta[hot], kind="stable")]]


def select_migrations(alpha: Sequence[float] | npt.NDArray[np.float64], t_h: float) -> list[int]:
    """Which tunnels to move off a hotspot (paper §5.4, tunnel migration).

    ``alpha`` are the CPU usages of the tunnels on the node, β_j = Σ α. Tunnels are
    taken in decreasing α until the taken sum exceeds β_j − T_H; the indices are
    returned in that order. Taking the largest first moves the fewest tunnels that can
    bring the node below T_H. Empty if the node is not a hotspot.
    """
    a = np.asarray(alpha, dtype=np.float64)
    beta = float(a.sum())
    excess = beta - t_h
    if excess <= FIT_TOLERANCE:
        return []
    order = np.argsort(-a, kind="stable")
    chosen: list[int] = []
    moved = 0.0
    for idx in order.tolist():
        chosen.append(int(idx))
        moved += float(a[idx])
        if moved > excess + FIT_TOLERANCE:
            break
    return chosen
