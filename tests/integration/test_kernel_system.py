"""The whole system on kernel XFRM GPNs, in the kernel lane (issue #18's must-show).

One protego-mode testbed of the lane topology (the default tenants and sites, relaxed
timings for emulation) with three GPNs: gpn1 and gpn2 on the xfrm backend, gpn3 on the
userspace engine (a mixed pool); the sites are strongSwan with kernel-netlink (kernel
ESP), as production peers are. gpn3 is drained first, so every tunnel runs through an
xfrm GPN until the mixed-pool test lets it take one. Shown: traffic both ways and
isolation (two tenants on the same prefix); VICI and lifetime rekeys with 0 lost probes;
10 migrations between the two xfrm GPNs with 0 lost probes; a migration to the
userspace GPN and back; a killed xfrm GPN's tunnels recovered on another GPN; no XFRM
state, policy or tenant device left on a GPN once the tunnels are removed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protego.control.migrate import migrate
from protego.gpn.kernel import KernelConfig
from protego.testbed import procs
from protego.testbed import testbed as tbmod
from protego.testbed.demo import site_traffic
from protego.testbed.probe import UdpProbe
from protego.testbed.topology import load_topology
from protego.testbed.traffic import ping
from tests.conftest import wait_until
from tests.integration.system_bed import (PREFIX, default_testbed, gpn_counters, ike_spis, placement, records,
                                          rekey_every_child, restart_gpn, site_xfrm_stats, stats_delta)

pytestmark = [pytest.mark.root, pytest.mark.kernel]

LIFETIME_SITE, REKEY_S = "initech-hq", 40  # that tunnel rekeys by its lifetime, the others do not
MIGRATE_S = 180.0  # one migration's limit under emulation


def lane_topology(folder: Path) -> Path:
    """The lane topology with three GPNs (xfrm, xfrm, userspace) and a lifetime-rekeyed
    tunnel, as a file (a testbed is reopened from its topology's file)."""
    from importlib.resources import files

    text = (files("protego") / "data" / "topology-lane.toml").read_text()
    text = text.replace("gpns = 2 ", 'gpns = 3\ngpn_backends = ["xfrm", "xfrm", "userspace"]\n', 1)
    marker = f'name = "{LIFETIME_SITE}"\n'
    text = text.replace(marker, f"{marker}rekey_time = {REKEY_S}\n", 1)
    path = folder / "lane-mixed.toml"
    path.write_text(text)
    topo = load_topology(path)
    assert topo.gpns == 3 and next(s for s in topo.sites if s.name == LIFETIME_SITE).rekey_time == REKEY_S
    return path


@pytest.fixture(scope="module")
def tb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tbmod.Testbed]:
    bed_gen = default_testbed("k", load_topology(lane_topology(tmp_path_factory.mktemp("topo"))))
    bed = next(bed_gen)
    try:
        # gpn3 (userspace) takes no tunnel until the mixed-pool test
        tbmod.protego_cli(bed, "gpn", "drain", "gpn3", "--timeout", str(MIGRATE_S), timeout=900)
        yield bed
    finally:
        bed_gen.close()  # down (logs kept first with PROTEGO_TEST_KEEP_LOGS)


def probe(tb: tbmod.Testbed, site: str, port: int = 7878) -> UdpProbe:
    s = next(x for x in tb.topology.sites if x.name == site)
    dst = str(tb.topology.tenant(s.tenant).hosts[0])
    return UdpProbe(tb.ns(f"s-{site}-h1"), tb.ns(f"t-{s.tenant}-h1"), dst, port=port, interval_ms=20, linger=3.0)


def backends(tb: tbmod.Testbed) -> dict[str, str]:
    with tb.etcd() as e:
        return {kv.key.rsplit("/", 1)[-1]: kv.json()["backend"] for kv in e.get_prefix(f"{PREFIX}gpn/nodes/")[1]}


def xfrm(tb: tbmod.Testbed, node: str, what: str) -> str:
    return subprocess.run(["ip", "-n", tb.ns(node), "xfrm", what], capture_output=True, text=True,
                          check=True).stdout


def test_the_pool_is_mixed_and_every_tunnel_runs_through_an_xfrm_gpn(tb: tbmod.Testbed) -> None:
    assert backends(tb) == {"gpn1": "xfrm", "gpn2": "xfrm", "gpn3": "userspace"}
    for s in tb.topology.sites:
        gpn = placement(tb, s.tenant, s.name)
        assert gpn in ("gpn1", "gpn2"), f"{s.name} on {gpn}"
        spis = [r["spi"] for r in records(tb).values() if r["tunnel"] == s.name]
        states = xfrm(tb, gpn, "state")
        for spi in spis:  # the tunnel's SAs are kernel states on its GPN
            assert f"spi 0x{spi}" in states, (s.name, spi)


@pytest.mark.parametrize("site", ["acme-hq", "globex-hq", "initech-hq"])
def test_ping_and_tcp_both_ways_and_isolation(tb: tbmod.Testbed, site: str) -> None:
    row = site_traffic(tb, site, seconds=3.0, pings=10)
    assert row["errors"] == []
    assert row["lost"] == 0 and row["tenant_echos"] == 10
    assert row["isolated"], f"echo requests leaked to {row['leaked_to']}"
    assert row["site_to_tenant_mbps"] > 0.5 and row["tenant_to_site_mbps"] > 0.5  # emulated: slow


def test_vici_rekeys_of_every_child_sa_lose_nothing(tb: tbmod.Testbed) -> None:
    sites_before = site_xfrm_stats(tb)
    with contextlib.ExitStack() as stack:
        streams = {s.name: stack.enter_context(probe(tb, s.name, 7800 + i))
                   for i, s in enumerate(tb.topology.sites)}
        time.sleep(3)
        rekey_every_child(tb, 120, step=1.0)
        time.sleep(8)  # past charon's delete_rekeyed_delay: the old inbound SAs are gone
        results = {site: st.stop() for site, st in streams.items()}
    lost = {site: res.describe() for site, res in results.items() if res.lost}
    assert not lost, (f"lost across the rekeys: {lost}; GPN counters: {gpn_counters(tb)}; "
                      f"the sites' XFRM errors meanwhile: {stats_delta(sites_before, site_xfrm_stats(tb))}")
    assert all(res.sent > 200 for res in results.values())


def test_lifetime_rekeys_lose_nothing(tb: tbmod.Testbed) -> None:
    """initech-hq's CHILD_SA is rekeyed by its 40 s lifetime on Protego's side."""
    def inbound() -> set[str]:
        return {r["spi"] for r in records(tb).values() if r["tunnel"] == LIFETIME_SITE and r["direction"] == "in"}

    seen = inbound()
    with probe(tb, LIFETIME_SITE, 7810) as p:
        deadline = time.monotonic() + 2.2 * REKEY_S
        while time.monotonic() < deadline:
            seen |= inbound()
            time.sleep(1)
        res = p.stop()
    assert len(seen) >= 3, f"only {len(seen)} inbound SAs in {2.2 * REKEY_S:.0f} s: no lifetime rekey"
    assert res.lost == 0, f"{res.describe()} across lifetime rekeys; GPN counters: {gpn_counters(tb)}"


def test_ten_migrations_between_the_xfrm_gpns_lose_nothing(tb: tbmod.Testbed) -> None:
    site = tb.topology.sites[0]
    ikes = ike_spis(tb)
    done = []
    with probe(tb, site.name, 7820) as p:
        time.sleep(2)
        with tb.etcd() as e:
            for _ in range(10):
                here = placement(tb, site.tenant, site.name)
                target = "gpn2" if here == "gpn1" else "gpn1"
                res = migrate(e, site.tenant, site.name, target, timeout=MIGRATE_S)
                assert res.state == "done", res.detail
                done.append(target)
        time.sleep(2)
        lost = p.stop()
    assert len(done) == 10 and set(done) == {"gpn1", "gpn2"}
    assert lost.lost == 0, f"{lost.describe()} over 10 migrations; GPN counters: {gpn_counters(tb)}"
    assert ike_spis(tb) == ikes, "no IKE SA may be renegotiated"
    # the tunnel's SAs are on the target only, as kernel states there; none left on the source
    target = done[-1]
    source = "gpn2" if target == "gpn1" else "gpn1"
    spis = [r["spi"] for r in records(tb).values() if r["tunnel"] == site.name]
    wait_until(lambda: all(f"spi 0x{s}" not in xfrm(tb, source, "state") for s in spis), 30,
               "no state of the tunnel left on the source GPN")
    assert all(f"spi 0x{s}" in xfrm(tb, target, "state") for s in spis)


def test_migration_between_an_xfrm_and_a_userspace_gpn(tb: tbmod.Testbed) -> None:
    """xfrm -> userspace (gpn3) -> xfrm, each migration under its own probe; between them
    the tunnel carries a TCP load and pings on gpn3 (outside the probes: under emulation
    that load alone can cost a probe datagram in a full queue, which says nothing about
    a migration)."""
    site = tb.topology.sites[1]
    tbmod.protego_cli(tb, "gpn", "undrain", "gpn3")
    with tb.etcd() as e:
        start = placement(tb, site.tenant, site.name)
        for i, target in enumerate(("gpn3", start)):  # xfrm -> userspace -> xfrm
            with probe(tb, site.name, 7830 + i) as p:
                time.sleep(2)
                res = migrate(e, site.tenant, site.name, target, timeout=MIGRATE_S)
                assert res.state == "done", res.detail
                time.sleep(2)
                lost = p.stop()
            assert placement(tb, site.tenant, site.name) == target
            assert lost.lost == 0, f"{lost.describe()} across the migration to {target}; {gpn_counters(tb)}"
            if target == "gpn3":
                row = site_traffic(tb, site.name, seconds=2.0, pings=5)
                assert row["lost"] == 0 and row["errors"] == [] and row["gateway"] == "gpn3"


def test_a_killed_xfrm_gpn_is_recovered_on_another_gpn(tb: tbmod.Testbed) -> None:
    with tb.etcd() as e:
        places = {kv.key.split("/")[-1]: kv.json()["gpn"] for kv in e.get_prefix(f"{PREFIX}placement/")[1]}
    victim = next(g for g in ("gpn1", "gpn2") if g in places.values())
    carried = sorted(t for t, g in places.items() if g == victim)
    ikes = ike_spis(tb)
    rec = next(r for r in tb.state.procs if r.node == victim and r.kind == "gpn-agent" and procs.is_alive(r))
    t0 = time.monotonic()
    os.kill(rec.pid, signal.SIGKILL)
    wait_until(lambda: not procs.is_alive(rec), 30, "the GPN agent to die")
    procs.reap(rec.pid)
    for s in tb.topology.sites:
        if s.name in carried:
            dst = str(tb.topology.tenant(s.tenant).hosts[0])
            wait_until(lambda s=s, dst=dst: ping(tb.ns(f"s-{s.name}-h1"), dst, count=2, interval=0.2,
                                                 timeout=1).lost == 0, 180,
                       f"traffic over {s.name} after {victim} died", step=1.0)
    recovered_s = time.monotonic() - t0
    with tb.etcd() as e:
        wait_until(lambda: not [kv for kv in e.get_prefix(f"{PREFIX}placement/")[1]
                                if kv.json()["gpn"] == victim], 120, f"every tunnel to leave {victim}", step=1.0)
        health = e.get_json(f"{PREFIX}gpn/health/{victim}") or {}
    assert health.get("state") == "dead"
    assert ike_spis(tb) == ikes, "no tunnel may be renegotiated at the IKE level"
    print(f"{len(carried)} tunnel(s) of the killed xfrm {victim} back on other GPNs {recovered_s:.1f} s after")
    # it comes back: a restarted xfrm GPN removes what its previous incarnation left
    restart_gpn(tb, rec, 300, step=1.0)
    assert xfrm(tb, victim, "state").strip() == "" and xfrm(tb, victim, "policy").strip() == ""


def test_removing_the_tunnels_leaves_no_state_policy_or_device_on_the_gpns(tb: tbmod.Testbed) -> None:
    for s in tb.topology.sites:
        tbmod.protego_cli(tb, "tunnel", "remove", f"{s.tenant}/{s.name}", timeout=300)
    with tb.etcd() as e:
        wait_until(lambda: not e.get_prefix(f"{PREFIX}sas/")[1], 180, "every SA record to go", step=1.0)
    for gpn in ("gpn1", "gpn2"):
        wait_until(lambda gpn=gpn: xfrm(tb, gpn, "state").strip() == "" and xfrm(tb, gpn, "policy").strip() == "",
                   60, f"{gpn}'s XFRM states and policies to go", step=1.0)

    def tenant_links(gpn: str) -> list[str]:
        links = subprocess.run(["ip", "-n", tb.ns(gpn), "-o", "link"], capture_output=True, text=True).stdout
        # pgc0 is the ESP canary's link, there while the agent runs
        return [x for x in links.splitlines() if ": pg" in x and ": pgc0@" not in x]

    # a tenant's devices stay KernelConfig.tenant_keep_s after its last SA left, then go
    keep = KernelConfig("192.0.2.1").tenant_keep_s
    for gpn in ("gpn1", "gpn2"):
        wait_until(lambda gpn=gpn: not tenant_links(gpn), keep + 60, f"{gpn}'s tenant devices to go", step=1.0)
