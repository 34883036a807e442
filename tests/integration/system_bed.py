"""What the whole-system tests share: a protego-mode testbed of the default topology and
ways to look at it (SA records, the sites' IKE SAs, the GPNs' counters, probe streams)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from protego.gpn.kernel import parse_xfrm_stat
from protego.testbed import procs
from protego.testbed import testbed as tbmod
from protego.testbed.probe import UdpProbe
from protego.testbed.topology import Topology, load_topology
from tests.conftest import unique_name, wait_until

PREFIX = "/protego/v1/"


def default_testbed(prefix: str, topology: Topology | None = None) -> Iterator[tbmod.Testbed]:
    """Body of a module fixture: the default topology (or ``topology``) in protego mode,
    tunnels up. ``PROTEGO_TEST_KEEP_LOGS=DIR``: the testbed's logs are copied to
    DIR/<name> first."""
    name = unique_name(prefix)
    bed = tbmod.up(topology or load_topology(None), name=name, mode="protego")
    try:
        tbmod.wait_for_tunnels(bed, bed.timings.tunnel_wait_s)
        yield bed
    finally:
        keep = os.environ.get("PROTEGO_TEST_KEEP_LOGS")
        if keep:
            tbmod.copy_logs(bed, os.path.join(keep, name))
        tbmod.down(name)


def records(tb: tbmod.Testbed) -> dict[str, dict[str, Any]]:
    with tb.etcd() as e:
        return {kv.key: kv.json() for kv in e.get_prefix(f"{PREFIX}sas/")[1]}


def placement(tb: tbmod.Testbed, tenant: str, tunnel: str) -> str:
    with tb.etcd() as e:
        return (e.get_json(f"{PREFIX}placement/{tenant}/{tunnel}") or {}).get("gpn", "")


def ike_spis(tb: tbmod.Testbed) -> dict[str, str]:
    return {s: t["ike_spi_i"] for s, t in tbmod.site_tunnels(tb).items()}


def gpn_counters(tb: tbmod.Testbed) -> dict[str, Any]:
    """Each GPN's drop and event counters as next reported (for failure messages)."""
    time.sleep(2.5)  # one report period
    with tb.etcd() as e:
        return {kv.key.rsplit("/", 1)[-1]: {"drops": kv.json().get("drops"), "counters": kv.json().get("counters")}
                for kv in e.get_prefix(f"{PREFIX}gpn/load/")[1]}


def site_xfrm_stats(tb: tbmod.Testbed) -> dict[str, dict[str, int]]:
    """Each site's kernel XFRM error counters that are not zero (``/proc/net/xfrm_stat``
    in its namespace; none where its charon runs libipsec): where a peer dropped our ESP, for failure
    messages (see :func:`stats_delta`)."""
    out: dict[str, dict[str, int]] = {}
    for s in tb.topology.sites:
        res = subprocess.run(["ip", "netns", "exec", tb.ns(f"s-{s.name}"), "cat", "/proc/net/xfrm_stat"],
                             capture_output=True, text=True, check=False)
        out[s.name] = parse_xfrm_stat(res.stdout)
    return out


def stats_delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The counters that moved, per node."""
    return {n: d for n, d in ((n, {k: v - before.get(n, {}).get(k, 0) for k, v in c.items()
                                   if v != before.get(n, {}).get(k, 0)}) for n, c in after.items()) if d}


def site_probe(tb: tbmod.Testbed, site: str, port: int = 7878) -> UdpProbe:
    """A sequence-numbered UDP stream (one datagram every 10 ms, echoed back) from a site host
    to its tenant host: exact losses, by direction, once stopped."""
    s = next(x for x in tb.topology.sites if x.name == site)
    dst = str(tb.topology.tenant(s.tenant).hosts[0])
    return UdpProbe(tb.ns(f"s-{site}-h1"), tb.ns(f"t-{s.tenant}-h1"), dst, port=port)


def rekey_every_child(tb: tbmod.Testbed, timeout: float, step: float = 0.1) -> None:
    """Ask every site's charon to rekey its CHILD_SA (over VICI); wait until each has."""
    old = {s: t["spi_in"] for s, t in tbmod.site_tunnels(tb).items()}
    for s in tb.topology.sites:
        with tb.vici(f"s-{s.name}") as v:
            child = next(iter(v.list_sas(s.name)))
            v.rekey_child(child["child_id"])
    wait_until(lambda: all(t["spi_in"] != old[s] for s, t in tbmod.site_tunnels(tb).items()), timeout,
               "every CHILD_SA rekeyed", step=step)


def restart_gpn(tb: tbmod.Testbed, rec: Any, alive_within: float, step: float = 0.1) -> None:
    """Start a killed GPN agent again (same command); wait until the GIN/GEN declares its
    GPN alive."""
    new = procs.spawn(rec.node, rec.kind, tb.ns(rec.node), rec.cmd, tb.state.logs / f"{rec.node}.gpn-agent.log")
    tb.state.procs.append(new)
    tb.state.save()
    with tb.etcd() as e:
        wait_until(lambda: (e.get_json(f"{PREFIX}gpn/health/{rec.node}") or {}).get("state") == "alive",
                   alive_within, f"{rec.node} to be declared alive again", step=step)
