"""Lifetime-driven rekeys through the whole system.

Every tunnel has a 10 s CHILD_SA rekey time on Protego's side (the site peers keep 1 h):
no kernel raises expire events on the GMN, so the kernel-protego plugin does, and the GMN's
charon rekeys as the initiator, over and over, while a sequence-numbered UDP stream flows.
Nothing may be lost, and the old SAs and their steering entries must go each time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from protego.testbed import testbed as tbmod
from protego.testbed.probe import UdpProbe
from protego.testbed.topology import default_topology_text, parse_topology
from tests.conftest import unique_name, wait_until

pytestmark = pytest.mark.root

PREFIX = "/protego/v1/"
REKEY_S = 10


@pytest.fixture(scope="module")
def tb() -> Iterator[tbmod.Testbed]:
    text = default_topology_text().replace("[[sites]]\n", f"[[sites]]\nrekey_time = {REKEY_S}\n")
    topo = parse_topology(text, "<default topology, 10 s rekey>")
    assert all(s.rekey_time == REKEY_S for s in topo.sites)
    name = unique_name("l")
    bed = tbmod.up(topo, name=name, mode="protego")
    try:
        tbmod.wait_for_tunnels(bed, 60)
        yield bed
    finally:
        tbmod.down(name)


def inbound_spis(tb: tbmod.Testbed) -> dict[str, set[str]]:
    """Tunnel -> SPIs of its inbound SA records in etcd."""
    out: dict[str, set[str]] = {}
    with tb.etcd() as e:
        for kv in e.get_prefix(f"{PREFIX}sas/")[1]:
            rec: dict[str, Any] = kv.json()
            if rec.get("direction") == "in":
                out.setdefault(rec["tunnel"], set()).add(rec["spi"])
    return out


def test_lifetime_rekeys_under_traffic_lose_nothing(tb: tbmod.Testbed) -> None:
    ikes = {s: t["ike_spi_i"] for s, t in tbmod.site_tunnels(tb).items()}
    seen: dict[str, set[str]] = {}
    most: dict[str, int] = {}  # the most inbound SAs a tunnel had at once
    with contextlib.ExitStack() as stack:
        probes = {}
        for s in tb.topology.sites:
            dst = str(tb.topology.tenant(s.tenant).hosts[0])
            probes[s.name] = stack.enter_context(
                UdpProbe(tb.ns(f"s-{s.name}-h1"), tb.ns(f"t-{s.tenant}-h1"), dst))
        deadline = time.monotonic() + 3.5 * REKEY_S
        while time.monotonic() < deadline:
            for tun, spis in inbound_spis(tb).items():
                seen.setdefault(tun, set()).update(spis)
                most[tun] = max(most.get(tun, 0), len(spis))
            time.sleep(0.2)
        results = {site: p.stop() for site, p in probes.items()}
    for site, res in results.items():
        assert res.sent > 2000 and res.lost == 0, f"{site}: {res.describe()} across lifetime rekeys"
    assert set(seen) == {s.name for s in tb.topology.sites}
    for tun, spis in seen.items():
        # 35 s at a 9-10 s rekey time: at least three rekeys, so at least four inbound SAs
        assert len(spis) >= 4, f"{tun}: only {len(spis)} inbound SAs seen in {3.5 * REKEY_S:.0f} s"
    # the rekeys were CHILD_SA rekeys: no IKE SA was renegotiated
    assert {s: t["ike_spi_i"] for s, t in tbmod.site_tunnels(tb).items()} == ikes
    # old SAs go: at most the new and the old inbound SA of a tunnel exist at once (the old
    # one lives for charon's delete_rekeyed_delay after each rekey)
    assert max(most.values()) <= 2, f"old SAs pile up: {most}"

    # and each steering entry belongs to a live inbound SA
    def steering_matches_records() -> bool:
        with tb.etcd() as e:
            recs = {(kv.json()["vip"], kv.json()["spi"]) for kv in e.get_prefix(f"{PREFIX}sas/")[1]
                    if kv.json()["direction"] == "in"}
            steer = {tuple(kv.key[len(f"{PREFIX}steer/in/"):].split("/")) for kv in e.get_prefix(f"{PREFIX}steer/in/")[1]}
        return steer == recs
    wait_until(steering_matches_records, 10, "steering entries to match the live inbound SAs")
