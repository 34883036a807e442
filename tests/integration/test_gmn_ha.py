"""GMN high availability through the whole system (paper §3.1, §4.2, §7.1; DESIGN.md flow 4).

One protego-mode testbed of the default topology: two GMNs (charon with kernel-protego
and the ha plugin, each with its agent), two GPNs, the GIN/GEN, three sites. Every site
sends a sequence-numbered UDP stream through its tunnel while the active GMN fails:

* SIGKILL of the active GMN's charon: the standby takes over the established IKE SAs
  (same IKE SPIs at every site, no ESP datagram lost), the sites' next IKE exchanges
  succeed against it; the old GMN's charon restarts, catches up from etcd as the
  standby, and a second failover works (failback);
* the active GMN's links go down (it loses the GIN and etcd): it makes its own IKE SAs
  passive before its lease expires, the standby takes over, and when the links come
  back the old GMN stays standby;
* a tunnel added right after a failover comes up through the new active GMN.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from protego.bench.e2e import _cli, _site_bulk_conn, bulk_prefix
from protego.bench.gmn_failover import (fail_gmn, gmn_ike_states, gmn_leader, other_gmn, restore_gmn,
                                        site_ike_spis, site_rekey, wait_standby_caught_up, wait_takeover)
from protego.gmn import ha
from protego.testbed import testbed as tbmod
from protego.testbed.probe import UdpProbe
from tests.conftest import wait_until
from tests.integration.system_bed import PREFIX, default_testbed, records

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def tb() -> Iterator[tbmod.Testbed]:
    yield from default_testbed("h")


@contextlib.contextmanager
def streams(tb: tbmod.Testbed, base_port: int) -> Iterator[list[Any]]:
    """One probe stream per site (a datagram every 5 ms, echoed); the results are
    appended to the yielded list when the block ends."""
    probes = []
    for i, s in enumerate(tb.topology.sites):
        dst = str(tb.topology.tenant(s.tenant).hosts[0])
        probes.append((s.name, UdpProbe(tb.ns(f"s-{s.name}-h1"), tb.ns(f"t-{s.tenant}-h1"), dst,
                                        port=base_port + i, interval_ms=5)))
    results: list[Any] = []
    try:
        time.sleep(0.5)
        yield results
    finally:
        for name, p in probes:
            results.append((name, p.stop()))


def assert_nothing_lost(results: list[Any]) -> None:
    assert results and all(r.sent > 100 for _n, r in results), [(n, r.sent) for n, r in results]
    lost = {n: r.describe() for n, r in results if r.lost_forward or r.lost_reverse}
    assert not lost, f"ESP datagrams lost during the GMN failover: {lost}"


def fail_over(tb: tbmod.Testbed, mode: str) -> dict[str, Any]:
    """Fail the active GMN; return what happened (asserting the takeover itself)."""
    active = gmn_leader(tb)
    assert active in ("gmn1", "gmn2")
    standby = other_gmn(active)
    spis = site_ike_spis(tb)
    assert all(spis.values()), spis
    assert wait_standby_caught_up(tb, standby, spis), \
        f"{standby}'s charon does not hold every IKE SA passive: {gmn_ike_states(tb, standby)} vs {spis}"
    sas_before = {k: (r["gpn"], r["spi"]) for k, r in records(tb).items()}
    t0 = fail_gmn(tb, active, mode)
    t_active = wait_takeover(tb, standby, spis, timeout=15)
    assert t_active is not None, f"{standby} did not take over: leader {gmn_leader(tb)}, " \
                                 f"its IKE SAs {gmn_ike_states(tb, standby)}"
    return {"active": active, "standby": standby, "spis": spis, "takeover_s": t_active - t0,
            "sas_before": sas_before}


def gmn_child_spis(tb: tbmod.Testbed, node: str) -> set[str]:
    with tb.vici(node) as v:
        return {str(c.get("spi-in")) for entry in v.raw_sas() for sa in entry.values()
                for c in (sa.get("child-sas") or {}).values() if c.get("state") == "INSTALLED"}


def gmn_children(tb: tbmod.Testbed, node: str) -> int:
    with tb.vici(node) as v:
        return sum(1 for entry in v.raw_sas() for sa in entry.values()
                   for c in (sa.get("child-sas") or {}).values() if c.get("state") == "INSTALLED")


def site_children(tb: tbmod.Testbed) -> dict[str, Any]:
    return {s: (t.get("spi_in"), t.get("spi_out")) for s, t in tbmod.site_tunnels(tb).items()}


def check_after(tb: tbmod.Testbed, ev: dict[str, Any], exact_children: bool = True) -> None:
    # the data path was not touched: the same SA records on the same GPNs
    assert {k: (r["gpn"], r["spi"]) for k, r in records(tb).items()} == ev["sas_before"]
    # every site's next IKE exchange (its own CHILD_SA rekey) succeeds on the same IKE SA
    for s in tb.topology.sites:
        site_rekey(tb, s.name)
    assert site_ike_spis(tb) == ev["spis"], "an IKE SA was renegotiated"
    with tb.etcd() as e:
        events = [kv.json() for kv in e.get_prefix(f"{PREFIX}events/")[1]]
    assert any(x["kind"] == "gmn-takeover" and x["node"] == ev["standby"] for x in events)
    # every site's current CHILD_SA is held by the new active GMN (its inbound SPI is
    # the site's outbound SPI)
    held = gmn_child_spis(tb, ev["standby"])
    current = {s: t[1] for s, t in site_children(tb).items()}
    assert set(current.values()) <= held, f"{ev['standby']} holds {held}, the sites use {current}"
    if not exact_children:
        # Known issue (docs/gmn-ha.md): after a link failure the new active GMN sometimes
        # also keeps one stale CHILD_SA (not used by any site; gone at its lifetime)
        extra = held - set(current.values())
        print(f"{ev['standby']} holds {len(held)} CHILD_SAs for {len(current)} tunnels")
        if extra:  # evidence for the known issue: is the stale one in the mirror?
            with tb.etcd() as e:
                mirrored = {f"{ha.spi_of(m.inbound_spi):08x}" for kv in e.get_prefix(ha.HA_PREFIX)[1]
                            for m in map(ha.parse, ha.decode_entry(kv.value))
                            if m.type == ha.CHILD_ADD and m.inbound_spi}
            print(f"  stale CHILD_SAs {sorted(extra)}; in the etcd mirror: {sorted(extra & mirrored)}")
        return
    # no CHILD_SA comes back to life: once the rekeyed ones are gone (charon's 5 s
    # delete_rekeyed_delay), the new active GMN holds one per tunnel, like the sites
    try:
        wait_until(lambda: gmn_children(tb, ev["standby"]) == len(tb.topology.sites), 20,
                   f"{ev['standby']} to hold one CHILD_SA per tunnel")
    except AssertionError:
        with tb.vici(ev["standby"]) as v:
            held = [(c.get("spi-in"), c.get("state")) for e in v.raw_sas() for sa in e.values()
                    for c in (sa.get("child-sas") or {}).values()]
        raise AssertionError(f"{ev['standby']} holds CHILD_SAs {held}; sites {site_children(tb)}") from None


def test_kill9_of_the_active_charon_then_failback(tb: tbmod.Testbed) -> None:
    with streams(tb, 7950) as results:
        ev = fail_over(tb, "charon")
        print(f"{ev['standby']} took over from {ev['active']} in {ev['takeover_s'] * 1000:.0f} ms")
        check_after(tb, ev)
    assert_nothing_lost(results)
    assert ev["takeover_s"] < 5.0

    # failback: the old GMN's charon returns as the standby and catches up from etcd
    # (the CHILD_SAs rekeyed meanwhile included), then a second failover hands back
    restore_gmn(tb, ev["active"], "charon")
    spis = site_ike_spis(tb)
    assert wait_standby_caught_up(tb, ev["active"], spis), gmn_ike_states(tb, ev["active"])
    assert gmn_leader(tb) == ev["standby"]
    with streams(tb, 7960) as results2:
        ev2 = fail_over(tb, "charon")
        assert ev2["standby"] == ev["active"]
        check_after(tb, ev2)
    assert_nothing_lost(results2)
    restore_gmn(tb, ev2["active"], "charon")
    assert wait_standby_caught_up(tb, ev2["active"], site_ike_spis(tb))


def test_links_down_on_the_active_gmn(tb: tbmod.Testbed) -> None:
    active = gmn_leader(tb)
    assert active is not None
    passive_at: list[float] = []

    def watch_old() -> None:  # the cut-off GMN must make its IKE SAs passive by itself
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = gmn_ike_states(tb, active)
            if states and all(v == "PASSIVE" for v in states.values()):
                passive_at.append(time.time())
                return
            time.sleep(0.02)

    import threading

    with streams(tb, 7970) as results:
        t = threading.Thread(target=watch_old)
        t.start()
        try:
            ev = fail_over(tb, "link")
            t.join()
            t_leader = time.time()
        finally:
            restore_gmn(tb, active, "link")
        check_after(tb, ev, exact_children=False)
    assert_nothing_lost(results)
    assert passive_at, f"{active} kept its IKE SAs active although cut off from etcd"
    assert passive_at[0] < t_leader
    print(f"links down: {ev['standby']} active after {ev['takeover_s'] * 1000:.0f} ms")
    # back online, the old GMN stays the standby and follows the mirror again
    wait_until(lambda: gmn_leader(tb) == ev["standby"], 5, "the new leader to stay")
    assert wait_standby_caught_up(tb, active, site_ike_spis(tb), timeout=30)
    # its lease expired while it was cut off: it takes a new one and registers again
    with tb.etcd() as e:
        wait_until(lambda: e.get(f"{PREFIX}gmn/members/{active}") is not None, 15, f"{active} to register again")


def test_new_tunnel_right_after_a_failover(tb: tbmod.Testbed) -> None:
    ev = fail_over(tb, "charon")
    site = tb.topology.sites[0]
    tenant = tb.topology.tenant(site.tenant)
    name, prefix = "hanew", bulk_prefix(201)
    rid = f"{name}.{site.name}.example"
    psk = b"ha-new-tunnel-psk-0123456789abcdef0123456789"
    node = f"s-{site.name}"
    try:
        with tb.vici(node) as v:
            v.load_psk(f"psk-{name}", psk, [rid, str(tenant.vip)])
            v.load_conn(name, _site_bulk_conn(site, tenant, name, rid, str(prefix)))
        subprocess.run(["ip", "-n", tb.ns(node), "address", "replace", f"{prefix[1]}/32", "dev", "lo"], check=True)
        _dur, _cpu, err = _cli(tb, ["tunnel", "add", f"{tenant.name}/{name}", "--remote-addrs", str(site.public),
                                    "--remote-id", rid, "--remote-ts", str(prefix), "--psk-file", "-"], psk)
        assert not err, err
        # the new active GMN loads it and answers the site's IKE_SA_INIT/IKE_AUTH
        def up() -> bool:
            with tb.vici(node) as v:
                for _ in v.session.initiate({"child": name, "timeout": "5000", "loglevel": "-1"}):
                    pass
            return True

        wait_until(lambda: _try(up), 30, "the new tunnel to come up")
        ok = subprocess.run(["ip", "netns", "exec", tb.ns(node), "ping", "-c", "3", "-W", "1", "-I", str(prefix[1]),
                             str(tenant.hosts[0])], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        # ... and it is mirrored: the standby (once back) holds it too
        restore_gmn(tb, ev["active"], "charon")
        spis = site_ike_spis(tb)
        with tb.vici(node) as v:
            new_spi = next(iter(v.list_sas(name)))["ike_spi_i"]
        assert wait_standby_caught_up(tb, ev["active"], {**spis, name: new_spi})
    finally:
        _cli(tb, ["tunnel", "remove", f"{tenant.name}/{name}"])
        with contextlib.suppress(Exception), tb.vici(node) as v:
            v.unload_conn(name)


def _try(fn: Any) -> bool:
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001 - retried by wait_until
        time.sleep(0.5)
        return False
