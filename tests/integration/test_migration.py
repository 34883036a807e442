"""Live tunnel migration by rekey and recovery from GPN failure, through the whole system
(paper §4.5 and §7.2; DESIGN.md flows 2 and 3).

One protego-mode testbed from the default topology (two GPNs). Migrations run while a
sequence-numbered UDP stream (both directions: every datagram is echoed) and an iperf3
TCP stream flow; nothing may be lost. Then a GPN's engine is killed with SIGKILL and its
tunnels must come back on the other GPN without an IKE renegotiation.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from protego.control.migrate import migrate
from protego.testbed import procs
from protego.testbed import testbed as tbmod
from protego.testbed.traffic import Iperf3Stream, ping
from tests.conftest import wait_until
from tests.integration.system_bed import (PREFIX, default_testbed, gpn_counters, ike_spis, placement, records,
                                          restart_gpn, site_probe)

pytestmark = pytest.mark.root

@pytest.fixture(scope="module")
def tb() -> Iterator[tbmod.Testbed]:
    yield from default_testbed("m")


def test_migration_back_and_forth_under_load_loses_nothing(tb: tbmod.Testbed) -> None:
    site = tb.topology.sites[0]
    tenant = tb.topology.tenant(site.tenant)
    gpns = [f"gpn{i}" for i in range(1, tb.topology.gpns + 1)]
    ikes = ike_spis(tb)
    results = []
    with contextlib.ExitStack() as stack:
        probe = stack.enter_context(site_probe(tb, site.name))
        load = Iperf3Stream(tb.ns(f"t-{tenant.name}-h1"), str(tenant.hosts[0]), tb.ns(f"s-{site.name}-h1"),
                            seconds=600, bitrate=50e6)
        stack.callback(load.close)
        time.sleep(1)
        with tb.etcd() as e:
            for _ in range(20):
                here = placement(tb, tenant.name, site.name)
                target = next(g for g in gpns if g != here)
                res = migrate(e, tenant.name, site.name, target, timeout=40)
                assert res.state == "done", res.detail
                assert placement(tb, tenant.name, site.name) == target
                results.append(res)
        time.sleep(1)
        lost = probe.stop()
        assert load.client.poll() is None, "iperf3 stopped during the migrations"
    assert lost.sent > 1000
    assert lost.lost == 0, f"{lost.describe()} over 20 migrations; GPN counters: {gpn_counters(tb)}"
    assert ike_spis(tb) == ikes, "no IKE SA may be renegotiated"
    switch = sorted(r.switch_ms for r in results if r.switch_ms is not None)
    assert len(switch) == 20
    # every migration leaves exactly one inbound and one outbound SA, all on the target
    recs = [r for r in records(tb).values() if r["tunnel"] == site.name]
    assert sorted(r["direction"] for r in recs) == ["in", "out"]
    assert {r["gpn"] for r in recs} == {results[-1].target}


def test_migration_to_the_gpn_the_tunnel_is_on_changes_nothing(tb: tbmod.Testbed) -> None:
    """Said done ("already on"), not pretended: no rekey, the same SAs, no switch time."""
    site = tb.topology.sites[0]
    tenant = tb.topology.tenant(site.tenant)
    here = placement(tb, tenant.name, site.name)
    before = sorted(k for k, r in records(tb).items() if r["tunnel"] == site.name)
    ikes = ike_spis(tb)
    with tb.etcd() as e:
        res = migrate(e, tenant.name, site.name, here, timeout=20)
    assert (res.state, res.detail, res.source, res.target, res.switch_ms) == ("done", f"already on {here}", here,
                                                                           here, None)
    assert sorted(k for k, r in records(tb).items() if r["tunnel"] == site.name) == before
    assert ike_spis(tb) == ikes


def test_migration_while_the_peer_rekeys_loses_nothing(tb: tbmod.Testbed) -> None:
    site = tb.topology.sites[1]
    tenant = tb.topology.tenant(site.tenant)
    gpns = [f"gpn{i}" for i in range(1, tb.topology.gpns + 1)]
    ikes = ike_spis(tb)
    with contextlib.ExitStack() as stack:
        probe = stack.enter_context(site_probe(tb, site.name, port=7879))
        time.sleep(0.5)
        with tb.etcd() as e:
            for i in range(4):
                here = placement(tb, tenant.name, site.name)
                target = next(g for g in gpns if g != here)
                from protego.control.migrate import request_migration, wait_migration

                request_migration(e, tenant.name, site.name, target)
                if i % 2:
                    time.sleep(0.002)  # the GMN starts first, then the peer: a rekey collision
                with tb.vici(f"s-{site.name}") as v:
                    child = next(iter(v.list_sas(site.name)))
                    v.rekey_child(child["child_id"])
                res = wait_migration(e, tenant.name, site.name, timeout=40)
                assert res.state == "done", res.detail
                assert placement(tb, tenant.name, site.name) == target
                # both CHILD_SAs of the collision settle: one in, one out, on the target
                wait_until(lambda: sorted(r["direction"] for r in records(tb).values()
                                          if r["tunnel"] == site.name) == ["in", "out"], 15,
                           "the losing CHILD_SA of the collision to go")
        time.sleep(1)
        res_probe = probe.stop()
    assert res_probe.lost == 0, f"{res_probe.describe()}; GPN counters: {gpn_counters(tb)}"
    assert ike_spis(tb) == ikes


def test_drain_of_a_gpn_carrying_20_tunnels_moves_all_and_drops_nothing(tb: tbmod.Testbed) -> None:
    from protego.bench.e2e import bulk_prefix, bulk_setup

    site0 = tb.topology.sites[0]
    tenant0 = tb.topology.tenant(site0.tenant)
    # gather everything on gpn1: drain gpn2, add 20 tunnels (they can only go to gpn1)
    tbmod.protego_cli(tb, "gpn", "drain", "gpn2", timeout=180)
    try:
        setup = bulk_setup(tb, 20, 4, 180, progress=lambda m: None)
    finally:
        tbmod.protego_cli(tb, "gpn", "undrain", "gpn2")
    assert setup["passed"] == 20, setup.get("errors")
    with tb.etcd() as e:
        places = {kv.key.split("/")[-1]: kv.json()["gpn"] for kv in e.get_prefix(f"{PREFIX}placement/")[1]}
    carried = sorted(t for t, g in places.items() if g == "gpn1")
    assert len(carried) >= 20
    with tb.vici(f"s-{site0.name}") as v:
        ikes_before = {sa["ike"]: sa["ike_spi_i"] for sa in v.list_sas()}
    import json as _json

    try:
        with contextlib.ExitStack() as stack:
            probes = {s.name: stack.enter_context(site_probe(tb, s.name, port=7880 + i))
                      for i, s in enumerate(tb.topology.sites)}
            time.sleep(0.5)
            out = tbmod.protego_cli(tb, "gpn", "drain", "gpn1", "--parallel", "8", "--json", timeout=300)
            time.sleep(1)
            results = {n: p.stop() for n, p in probes.items()}
    finally:
        tbmod.protego_cli(tb, "gpn", "undrain", "gpn1")
    report = _json.loads(out)
    assert report["failed"] == 0 and report["moved"] == len(carried), report["errors"]
    with tb.etcd() as e:
        places = {kv.key.split("/")[-1]: kv.json()["gpn"] for kv in e.get_prefix(f"{PREFIX}placement/")[1]}
    assert not [t for t, g in places.items() if g == "gpn1"], "every tunnel left gpn1"
    lost = {n: r.describe() for n, r in results.items() if r.lost}
    assert not lost, f"lost during the drain: {lost}; GPN counters: {gpn_counters(tb)}"
    # every bulk tunnel still carries traffic, over the same IKE SA
    gw = tb.ns(f"s-{site0.name}")
    for i in range(20):
        src = str(bulk_prefix(i).network_address + 1)
        r = subprocess.run(["ip", "netns", "exec", gw, "ping", "-n", "-q", "-c", "1", "-W", "2", "-I", src,
                            str(tenant0.hosts[0])], capture_output=True)
        assert r.returncode == 0, f"bulk{i} does not pass traffic after the drain"
    with tb.vici(f"s-{site0.name}") as v:
        ikes_after = {sa["ike"]: sa["ike_spi_i"] for sa in v.list_sas()}
    assert ikes_after == ikes_before, "no tunnel may be renegotiated at the IKE level"


def _engine_pids(tb: tbmod.Testbed, node: str) -> tuple[Any, list[int]]:
    [rec] = [r for r in tb.state.procs if r.kind == "gpn-agent" and r.node == node and procs.is_alive(r)]
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(rec.pid)], capture_output=True, text=True).stdout
    return rec, [int(p) for p in out.split()]


def test_kill9_of_a_gpn_engine_moves_its_tunnels_without_renegotiation(tb: tbmod.Testbed) -> None:
    with tb.etcd() as e:
        places = {kv.key.split("/")[-1]: kv.json()["gpn"] for kv in e.get_prefix(f"{PREFIX}placement/")[1]}
    victim = max(set(places.values()), key=lambda g: sum(1 for p in places.values() if p == g))
    carried = sorted(t for t, g in places.items() if g == victim)
    ikes = ike_spis(tb)
    old = {k for k, r in records(tb).items() if r["gpn"] == victim}
    rec, workers = _engine_pids(tb, victim)
    t0 = time.monotonic()
    for pid in [rec.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not procs.is_alive(rec), 5, "the GPN agent to die")
    # the GIN declares it dead; the GMN rekeys each of its tunnels onto the other GPN
    for s in tb.topology.sites:
        if s.name not in carried:
            continue
        dst = str(tb.topology.tenant(s.tenant).hosts[0])
        wait_until(lambda s=s, dst=dst: ping(tb.ns(f"s-{s.name}-h1"), dst, count=2, interval=0.05,
                                             timeout=0.5).lost == 0, 30,
                   f"traffic over {s.name} after {victim} died")
    recovered_s = time.monotonic() - t0
    with tb.etcd() as e:
        wait_until(lambda: not [kv.key for kv in e.get_prefix(f"{PREFIX}placement/")[1]
                                if kv.json()["gpn"] == victim], 20, f"every tunnel to leave {victim}")
    assert ike_spis(tb) == ikes, "no tunnel may be renegotiated at the IKE level"
    with tb.etcd() as e:
        health = e.get_json(f"{PREFIX}gpn/health/{victim}") or {}
        events = [kv.json() for kv in e.get_prefix(f"{PREFIX}events/")[1]]
    assert health.get("state") == "dead"
    assert {ev["tunnel"] for ev in events if ev["kind"] == "gpn-failure-rekey"} >= set(carried)
    # the dead GPN's SAs are never reused: their records go as charon deletes them
    wait_until(lambda: not old & set(records(tb)), 20, "the dead GPN's SA records to go")
    print(f"{len(carried)} tunnel(s) back on other GPNs {recovered_s:.2f} s after the kill")

    # the GPN comes back: it takes no tunnel until the GIN has seen it healthy, then it can
    restart_gpn(tb, rec, 30)
    with tb.etcd() as e:
        site = next(s for s in tb.topology.sites if s.name in carried)
        res = migrate(e, site.tenant, site.name, victim, timeout=40)
    assert res.state == "done", res.detail
    dst = str(tb.topology.tenant(site.tenant).hosts[0])
    assert ping(tb.ns(f"s-{site.name}-h1"), dst, count=5, interval=0.05).lost == 0
