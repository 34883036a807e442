"""Fair-share violations, the daily guarantee and its 99th percentile, the saving."""

from __future__ import annotations

import pytest

from protego.sim.metrics import (
    fair_share_violations,
    guarantee_percentile,
    resource_saving,
    tunnel_guarantees,
)


def test_no_violation_when_the_node_has_enough_capacity() -> None:
    assert not fair_share_violations([0.3, 0.3, 0.4], 1.0).any()


def test_only_tunnels_above_the_fair_share_are_violated() -> None:
    # Capacity 1, demands 0.1, 0.3, 0.35, 0.4: 0.1 served; 0.9 left for three →
    # level 0.3, so 0.3 is served in full and 0.35, 0.4 are not (level ends at 0.3).
    assert fair_share_violations([0.4, 0.1, 0.35, 0.3], 1.0).tolist() == [
        True, False, True, False]


def test_equal_demands_over_capacity_are_all_violated() -> None:
    assert fair_share_violations([0.3] * 4, 1.0).all()


def test_guarantee_percentile_is_met_by_99_percent_of_tunnels() -> None:
    # 200 tunnels: the two worst may be below the 99th-percentile guarantee, not three.
    g = [1.0] * 197 + [0.97, 0.95, 0.5]
    assert guarantee_percentile(g, 99.0) == 0.97
    # 170 tunnels: ceil(0.99·170) = 169 must meet it, so the second-worst is the answer.
    g = [1.0] * 168 + [0.9, 0.8]
    assert guarantee_percentile(g, 99.0) == 0.9
    assert guarantee_percentile([0.7, 0.9], 100.0) == 0.7


def test_daily_guarantee_counts_violated_minutes() -> None:
    assert tunnel_guarantees([0, 144, 1440], 1440).tolist() == [1.0, 0.9, 0.0]


def test_saving_against_dedicated_vms_with_ha_matches_the_paper() -> None:
    # Table 2, 10-minute row: 73.97 Gbit/s active for 170 tunnels of 1.5 Gbit/s → 85.50 %.
    assert 100 * resource_saving(73.97, 170, 1.5) == pytest.approx(85.50, abs=0.005)
    assert 100 * resource_saving(61.23, 170, 1.5) == pytest.approx(88.00, abs=0.01)  # paper rounds 87.994
