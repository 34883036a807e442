"""Drain planning and the placement view of draining and failed GPNs."""

from __future__ import annotations

import pytest

from protego.control.drain import Pool, plan_targets
from protego.errors import ConfigError
from protego.gmn.placement import GpnView, NoGpnError, choose_gpn


def pool(**kw: object) -> Pool:
    base = dict(registered=frozenset({"gpn1", "gpn2", "gpn3"}), dead=frozenset(), draining=frozenset(),
                tunnels={})
    base.update(kw)
    return Pool(**base)  # type: ignore[arg-type]


def test_targets_spread_over_the_least_loaded_and_never_the_source() -> None:
    p = pool(tunnels={"gpn1": [("a", str(i)) for i in range(5)], "gpn2": [("b", "x")] * 3, "gpn3": []})
    t = plan_targets(p, "gpn1", p.tunnels["gpn1"])
    assert set(t.values()) <= {"gpn2", "gpn3"}
    counts = {g: list(t.values()).count(g) for g in ("gpn2", "gpn3")}
    # 3 + counts[gpn2] and 0 + counts[gpn3] end within one of each other
    assert abs((3 + counts["gpn2"]) - counts["gpn3"]) <= 1 and sum(counts.values()) == 5


def test_dead_and_draining_gpns_take_nothing() -> None:
    p = pool(dead=frozenset({"gpn2"}), draining=frozenset({"gpn3"}), tunnels={"gpn1": [("a", "1")]})
    with pytest.raises(ConfigError, match="no healthy GPN"):
        plan_targets(p, "gpn1", p.tunnels["gpn1"])
    assert p.usable() == ["gpn1"]


def test_a_draining_gpn_is_not_failed_but_takes_no_new_sa() -> None:
    gpns = {"gpn1": GpnView("gpn1", True, True, 0, draining=True), "gpn2": GpnView("gpn2", True, True, 9)}
    assert not gpns["gpn1"].failed and not gpns["gpn1"].usable
    # a rekey of a tunnel on the draining GPN moves it
    assert choose_gpn(gpns, current="gpn1") == "gpn2"
    dead = GpnView("gpn3", True, False)
    gone = GpnView("gpn4", False, True)
    assert dead.failed and gone.failed and not dead.usable
    with pytest.raises(NoGpnError):
        choose_gpn({"gpn1": gpns["gpn1"], "gpn3": dead})
