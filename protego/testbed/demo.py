"""``protego testbed demo``: traffic over every tunnel of a testbed, as a table."""

from __future__ import annotations

from typing import Any

from protego.errors import TestbedError
from protego.testbed import testbed as tbmod
from protego.testbed.plan import Mode
from protego.testbed.state import list_testbeds
from protego.testbed.topology import load_topology
from protego.testbed.traffic import icmp_counters, iperf3, ping


def ensure_up(name: str, mode: Mode, progress: tbmod.Progress) -> tbmod.Testbed:
    if name in list_testbeds():
        tb = tbmod.Testbed.open(name)
        if tb.state.mode != mode or tb.state.phase != "up":
            raise TestbedError(
                f"testbed '{name}' exists in {tb.state.mode} mode, phase {tb.state.phase}; "
                f"take it down first (protego testbed down --name {name})"
            )
        progress(f"using the running testbed '{name}'")
        return tb
    return tbmod.up(load_topology(None), name=name, mode=mode, progress=progress)


def site_traffic(tb: tbmod.Testbed, site_name: str, seconds: float, pings: int = 10) -> dict[str, Any]:
    """Ping and iperf3 both ways between a site's first host and its tenant's first host.

    ``isolated`` is True when no host of any *other* tenant saw one of the echo
    requests (counted by the kernel in each host's namespace).
    """
    topo = tb.topology
    site = next(s for s in topo.sites if s.name == site_name)
    tenant = topo.tenant(site.tenant)
    site_ns = tb.ns(f"s-{site.name}-h1")
    ten_ns = tb.ns(f"t-{tenant.name}-h1")
    others = [tb.ns(f"t-{t.name}-h{j}") for t in topo.tenants if t.name != tenant.name
              for j in range(1, len(t.hosts) + 1)]
    before = {ns: icmp_counters(ns)["InEchos"] for ns in [ten_ns, *others]}
    fwd = ping(site_ns, str(tenant.hosts[0]), count=pings)
    rev = ping(ten_ns, str(site.hosts[0]), count=pings)
    after = {ns: icmp_counters(ns)["InEchos"] for ns in [ten_ns, *others]}
    leaked = {ns: after[ns] - before[ns] for ns in others if after[ns] != before[ns]}
    up = iperf3(ten_ns, str(tenant.hosts[0]), site_ns, seconds=seconds)
    down = iperf3(ten_ns, str(tenant.hosts[0]), site_ns, seconds=seconds, reverse=True)
    tunnel = tbmod.site_tunnels(tb)[site.name]
    if tb.state.mode == "baseline":
        gateway = f"bg-{tenant.name}"
    else:
        with tb.etcd() as store:
            place = store.get_json(f"/protego/v1/placement/{tenant.name}/{site.name}") or {}
        gateway = place.get("gpn", "?")
    return {
        "tenant": tenant.name, "site": site.name, "gateway": gateway,
        "spi_in": tunnel.get("spi_in") or "-", "spi_out": tunnel.get("spi_out") or "-",
        "site_to_tenant_mbps": up.receiver_bps / 1e6, "tenant_to_site_mbps": down.receiver_bps / 1e6,
        "rtt_ms": fwd.rtt_ms, "lost": fwd.lost + rev.lost, "pings": fwd.sent + rev.sent,
        "tenant_echos": after[ten_ns] - before[ten_ns], "leaked_to": leaked, "isolated": not leaked,
    }


def run_demo(name: str, mode: Mode, seconds: float, progress: tbmod.Progress) -> list[dict[str, Any]]:
    tb = ensure_up(name, mode, progress)
    if mode == "protego":
        progress("waiting for every site's tunnel")
        tbmod.wait_for_tunnels(tb, 60)
    rows = []
    for s in tb.topology.sites:
        progress(f"traffic over {s.name}'s tunnel ({seconds:.0f} s each way)")
        rows.append(site_traffic(tb, s.name, seconds))
    return rows
