"""End to end: tenants' tunnels through the whole Protego system (paper flow 1).

One protego-mode testbed: etcd, two GMNs (charon + kernel-protego + agent), two GPNs
(userspace ESP engines + agents), the GIN/GEN agent, three tenants (two with the same
prefix), each with a site whose real strongSwan peer initiates to the tenant's VIP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from protego.testbed import procs
from protego.testbed import testbed as tbmod
from protego.testbed.demo import site_traffic
from protego.testbed.traffic import ping
from tests.conftest import wait_until
from tests.integration.system_bed import (PREFIX, default_testbed, gpn_counters, ike_spis, records,
                                          rekey_every_child, site_probe)

pytestmark = pytest.mark.root

@pytest.fixture(scope="module")
def tb() -> Iterator[tbmod.Testbed]:
    yield from default_testbed("e")


def steering(tb: tbmod.Testbed) -> set[str]:
    with tb.etcd() as e:
        return {kv.key[len(PREFIX):] for kv in e.get_prefix(f"{PREFIX}steer/")[1]}


def test_tunnels_spread_over_gpns(tb: tbmod.Testbed) -> None:
    with tb.etcd() as e:
        placements = {kv.key: kv.json()["gpn"] for kv in e.get_prefix(f"{PREFIX}placement/")[1]}
    assert len(placements) == len(tb.topology.sites)
    assert len(set(placements.values())) >= 2


@pytest.mark.parametrize("site", ["acme-hq", "globex-hq", "initech-hq"])
def test_ping_and_iperf3_both_ways_and_isolation(tb: tbmod.Testbed, site: str) -> None:
    row = site_traffic(tb, site, seconds=3.0, pings=10)
    assert row["errors"] == []
    assert row["lost"] == 0 and row["tenant_echos"] == 10
    assert row["isolated"], f"echo requests leaked to {row['leaked_to']}"
    assert row["site_to_tenant_mbps"] > 10 and row["tenant_to_site_mbps"] > 10


def test_rekey_every_child_sa_under_traffic_loses_nothing(tb: tbmod.Testbed) -> None:
    before = records(tb)
    with contextlib.ExitStack() as stack:
        streams = {s.name: stack.enter_context(site_probe(tb, s.name)) for s in tb.topology.sites}
        time.sleep(1)
        rekey_every_child(tb, 15)
        time.sleep(7)  # past charon's delete_rekeyed_delay: the old inbound SAs are gone
        results = {site: st.stop() for site, st in streams.items()}
    lost = {site: res.describe() for site, res in results.items() if res.lost}
    assert not lost, f"lost across the rekey: {lost}; GPN counters: {gpn_counters(tb)}"
    assert all(res.sent > 500 for res in results.values())
    after = records(tb)
    assert not set(before) & set(after), "old SA records must be gone"
    assert len(after) == 2 * len(tb.topology.sites)
    steer = steering(tb)
    for rec in before.values():
        assert f"steer/in/{rec['vip']}/{rec['spi']}" not in steer


def _kill_and_restart(tb: tbmod.Testbed, kind: str, node: str) -> None:
    [rec] = [r for r in tb.state.procs if r.kind == kind and r.node == node and procs.is_alive(r)]
    os.kill(rec.pid, signal.SIGKILL)
    wait_until(lambda: not procs.is_alive(rec), 5, f"{kind} on {node} to die")
    new = procs.spawn(rec.node, rec.kind, tb.ns(rec.node), rec.cmd, tb.state.logs / f"{node}.{kind}.log")
    tb.state.procs.append(new)
    tb.state.save()


@pytest.mark.parametrize("kind,node", [("gmn-agent", "gmn1"), ("gpn-agent", "busiest"), ("lb-agent", "lb")])
def test_agent_kill9_under_traffic_renegotiates_nothing(tb: tbmod.Testbed, kind: str, node: str) -> None:
    ikes = ike_spis(tb)
    full = records(tb)
    recs = {k: (r["spi"], r["gpn"]) for k, r in full.items()}
    if node == "busiest":  # the GPN carrying the most SAs now (earlier tests may have moved tunnels)
        node = max(sorted({g for _s, g in recs.values()}), key=lambda g: sum(1 for _s, x in recs.values() if x == g))
    _kill_and_restart(tb, kind, node)
    if kind == "gpn-agent":
        # the engine's workers went with it: its outbound sequence counters are lost, so the
        # GMN rekeys the CHILD_SAs it carried (new SAs, same IKE SAs, same placement)
        carried = {r["tunnel"] for r in full.values() if r["gpn"] == node}
        assert carried
        # (the new SAs go to any healthy GPN: the restarted one may not be healthy yet)
        wait_until(lambda: {r["tunnel"] for k, r in records(tb).items() if k not in recs} >= carried
                   and not [k for k in recs if k in records(tb) and recs[k][1] == node], 30,
                   "the CHILD_SAs on the restarted GPN to be rekeyed and the old SAs to go")
    else:
        # state converges: same SAs, same placement
        wait_until(lambda: {k: (r["spi"], r["gpn"]) for k, r in records(tb).items()} == recs, 20, "records")
    for s in tb.topology.sites:
        dst = str(tb.topology.tenant(s.tenant).hosts[0])
        wait_until(lambda s=s, dst=dst: ping(tb.ns(f"s-{s.name}-h1"), dst, count=3, interval=0.1).lost == 0, 30,
                   f"traffic over {s.name} after the restart of {kind}")
    assert ike_spis(tb) == ikes, "no tunnel may be renegotiated"


def test_removing_a_tunnel_and_tenant_removes_every_trace(tb: tbmod.Testbed) -> None:
    s = tb.topology.sites[-1]
    ten = tb.topology.tenant(s.tenant)
    tbmod.protego_cli(tb, "tenant", "remove", ten.name, "--with-tunnels")
    with tb.etcd() as e:
        wait_until(lambda: not [kv for kv in e.get_prefix(PREFIX)[1] if f"/{ten.name}/" in kv.key
                                or kv.key.endswith(f"/{ten.name}") or str(ten.vip) in kv.key], 20,
                   "every etcd key of the tenant to go")
    with tbmod.ViciClient(tbmod.gmn_paths(tb, "gmn1")[1]) as v:
        assert not [c for c in v.get_conns() if c.startswith(f"{ten.name}_")]
    # the other tenants are untouched
    for other in tb.topology.sites[:-1]:
        dst = str(tb.topology.tenant(other.tenant).hosts[0])
        assert ping(tb.ns(f"s-{other.name}-h1"), dst, count=3, interval=0.1).lost == 0
    # nftables of the GIN/GEN hold nothing of the removed tunnel
    nft = subprocess.run(["ip", "netns", "exec", tb.ns("lb"), "nft", "list", "ruleset"],
                         capture_output=True, text=True, check=True).stdout
    assert str(ten.vip) not in nft
