"""Best Fit, Best Fit Decreasing and the hotspot migration rule (paper §5.4)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from protego.errors import ConfigError
from protego.provisioning.packing import (
    best_fit_decreasing,
    best_fit_node,
    hotspots,
    select_migrations,
)


def _optimum(sizes: list[float], capacity: float) -> int:
    """Exact minimum number of bins, by depth-first search with pruning."""
    items = sorted(sizes, reverse=True)
    best = len(items)

    def place(i: int, loads: list[float]) -> None:
        nonlocal best
        if len(loads) >= best:
            return
        if i == len(items):
            best = len(loads)
            return
        seen: set[float] = set()
        for b, load in enumerate(loads):
            if load + items[i] <= capacity + 1e-12 and round(load, 12) not in seen:
                seen.add(round(load, 12))
                loads[b] += items[i]
                place(i + 1, loads)
                loads[b] -= items[i]
        loads.append(items[i])
        place(i + 1, loads)
        loads.pop()

    place(0, [])
    return best


def test_bfd_is_within_11_9_opt_plus_1_on_random_small_instances() -> None:
    rng = np.random.default_rng(11)
    worse_than_opt = 0
    for _ in range(400):
        n = int(rng.integers(2, 10))
        capacity = 1.0
        # Sizes between 1/6 and 1/2 of a bin are where BFD can lose to the optimum.
        sizes = [float(x) for x in rng.uniform(0.15, 0.55, n).round(3)]
        packing = best_fit_decreasing(sizes, capacity)
        loads = np.bincount(packing.bin_of, weights=sizes, minlength=packing.bins)
        assert loads.max() <= capacity + 1e-9  # a valid packing
        assert sorted(set(packing.bin_of)) == list(range(packing.bins))  # no empty bin
        opt = _optimum(sizes, capacity)
        assert opt <= packing.bins <= 11 / 9 * opt + 1
        worse_than_opt += packing.bins > opt
    assert worse_than_opt > 0  # the instances were not all trivial


def test_bfd_on_a_known_instance_where_it_is_not_optimal() -> None:
    # Optimal: {0.43, 0.28, 0.28} and {0.42, 0.3, 0.22}: 2 bins. BFD opens a third.
    sizes = [0.43, 0.42, 0.3, 0.28, 0.28, 0.22]
    assert _optimum(sizes, 1.0) == 2
    assert best_fit_decreasing(sizes, 1.0).bins == 3


def test_bfd_puts_each_item_in_the_fullest_bin_that_fits() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        sizes = [float(x) for x in rng.uniform(0.01, 0.9, int(rng.integers(1, 25)))]
        packing = best_fit_decreasing(sizes, 0.9)
        loads: list[float] = []
        for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
            fits = [b for b, load in enumerate(loads) if load + sizes[i] <= 0.9 + 1e-9]
            if fits:
                fullest = max(loads[b] for b in fits)
                assert loads[packing.bin_of[i]] == pytest.approx(fullest)
            else:
                assert packing.bin_of[i] == len(loads)  # a new bin only when none fits
                loads.append(0.0)
            loads[packing.bin_of[i]] += sizes[i]


def test_bfd_rejects_an_item_larger_than_a_bin() -> None:
    with pytest.raises(ConfigError, match="exceeds bin capacity"):
        best_fit_decreasing([0.95], 0.9)


def test_best_fit_node_takes_the_least_room_that_fits() -> None:
    beta = np.array([0.2, 0.55, 0.65, 0.6, 0.0])
    candidates = np.array([True, True, True, False, True])
    assert best_fit_node(beta, candidates, 0.3, 0.9) == 1  # 0.65 leaves too little room
    assert best_fit_node(beta, candidates, 0.25, 0.9) == 2
    assert best_fit_node(beta, np.zeros(5, dtype=bool), 0.1, 0.9) is None


def test_hotspots_are_nodes_above_th_hottest_first() -> None:
    assert hotspots(np.array([0.9, 0.95, 0.2, 1.1]), 0.9) == [3, 1]


def _fewest_moves(alpha: list[float], t_h: float) -> int:
    beta = sum(alpha)
    for k in range(len(alpha) + 1):
        for subset in itertools.combinations(alpha, k):
            if beta - sum(subset) < t_h:
                return k
    raise AssertionError("unreachable")


def test_migration_moves_the_fewest_tunnels_the_rule_allows() -> None:
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(500):
        n = int(rng.integers(2, 9))
        alpha = [float(x) for x in rng.uniform(0.0, 0.3, n)]
        chosen = select_migrations(alpha, 0.9)
        beta = sum(alpha)
        if beta <= 0.9:
            assert chosen == []
            continue
        checked += 1
        moved = [alpha[i] for i in chosen]
        assert beta - sum(moved) < 0.9  # the node is no longer a hotspot
        assert len(chosen) == _fewest_moves(alpha, 0.9)  # and no other choice moves fewer
        assert moved == sorted(alpha, reverse=True)[: len(chosen)]  # largest α first
    assert checked > 50


def test_migration_of_a_known_hotspot() -> None:
    # β = 0.95, excess 0.05: the single largest tunnel (index 1) is enough.
    assert select_migrations([0.2, 0.3, 0.15, 0.3], 0.9) == [1]
    # β = 1.2, excess 0.3: 0.28 is not enough, 0.28 + 0.27 is.
    assert select_migrations([0.28, 0.27, 0.25, 0.2, 0.2], 0.9) == [0, 1]
