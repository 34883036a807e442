"""Next-hop slots and policy routing plan (pure)."""

from __future__ import annotations

import pytest

from protego.errors import DataplaneError
from protego.lb import policy
from protego.lb.policy import PolicyRoute


def test_assign_slots_sticky_and_lowest_free() -> None:
    assert policy.assign_slots({}, ["192.0.2.22", "192.0.2.21"]) == {"192.0.2.21": 1, "192.0.2.22": 2}
    # an installed next hop keeps its slot; a stale one keeps its slot busy until removed
    got = policy.assign_slots({"192.0.2.22": 2, "192.0.2.23": 1}, ["192.0.2.22", "192.0.2.24"])
    assert got == {"192.0.2.22": 2, "192.0.2.24": 3}


def test_assign_slots_exhausted() -> None:
    installed = {f"10.0.{i // 250}.{i % 250}": i + 1 for i in range(policy.MAX_SLOT)}
    with pytest.raises(DataplaneError, match="no free next-hop slot"):
        policy.assign_slots(installed, ["192.0.2.99"])


def test_plan_routes_adds_before_and_removes_after() -> None:
    installed = {PolicyRoute(1, "192.0.2.21"), PolicyRoute(2, "192.0.2.22"), PolicyRoute(3, "")}
    desired = {PolicyRoute(1, "192.0.2.21"), PolicyRoute(3, "192.0.2.23"), PolicyRoute(4, "192.0.2.24")}
    plan = policy.plan_routes(installed, desired)
    assert plan.add == (PolicyRoute(3, "192.0.2.23"), PolicyRoute(4, "192.0.2.24"))
    assert plan.remove == (PolicyRoute(2, "192.0.2.22"),)  # slot 3 is repaired, not removed


def test_reserved_ranges() -> None:
    pr = PolicyRoute(5, "192.0.2.21")
    assert pr.mark == 0x50470005 and pr.table == 7005 and pr.prio == 7005
    assert policy.is_our_table(7005) and not policy.is_our_table(7000) and not policy.is_our_table(254)
    assert policy.is_our_prio(7250) and not policy.is_our_prio(32766)
