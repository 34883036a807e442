"""``protego testbed demo``: traffic over every tunnel of a testbed, as a table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from protego.errors import TestbedError
from protego.testbed import testbed as tbmod
from protego.testbed.plan import Mode
from protego.testbed.state import list_testbeds
from protego.testbed.topology import Topology, load_topology
from protego.testbed.traffic import icmp_counters, iperf3, ping

T = TypeVar("T")


def ensure_up(name: str, mode: Mode, progress: tbmod.Progress, keep_on_failure: bool = False,
              topology: Topology | None = None, backend: str | None = None) -> tbmod.Testbed:
    """Testbed ``name`` as it runs, or brought up from ``topology`` (default: the
    packaged default) with ``backend`` for its GPNs."""
    if name in list_testbeds():
        tb = tbmod.Testbed.open(name)
        if tb.state.mode != mode or tb.state.phase != "up":
            raise TestbedError(
                f"testbed '{name}' exists in {tb.state.mode} mode, phase {tb.state.phase}; "
                f"take it down first (protego testbed down --name {name})"
            )
        progress(f"using the running testbed '{name}' (topology {tb.state.topology_source})")
        return tb
    return tbmod.up(topology or load_topology(None), name=name, mode=mode, progress=progress,
                    keep_on_failure=keep_on_failure, backend=backend)


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
    errors: list[str] = []

    def measure(what: str, fn: Callable[[], T]) -> T | None:
        """A measurement that failed or timed out goes into the row, not a traceback."""
        try:
            return fn()
        except TestbedError as exc:
            errors.append(f"{what}: {exc}")
            return None

    before = {ns: icmp_counters(ns)["InEchos"] for ns in [ten_ns, *others]}
    fwd = measure("ping site->tenant", lambda: ping(site_ns, str(tenant.hosts[0]), count=pings))
    rev = measure("ping tenant->site", lambda: ping(ten_ns, str(site.hosts[0]), count=pings))
    after = {ns: icmp_counters(ns)["InEchos"] for ns in [ten_ns, *others]}
    leaked = {ns: after[ns] - before[ns] for ns in others if after[ns] != before[ns]}
    up = measure("iperf3 site->tenant", lambda: iperf3(ten_ns, str(tenant.hosts[0]), site_ns, seconds=seconds))
    down = measure("iperf3 tenant->site",
                   lambda: iperf3(ten_ns, str(tenant.hosts[0]), site_ns, seconds=seconds, reverse=True))
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
        "site_to_tenant_mbps": up.receiver_bps / 1e6 if up else None,
        "tenant_to_site_mbps": down.receiver_bps / 1e6 if down else None,
        "rtt_ms": fwd.rtt_ms if fwd else None,
        "lost": sum(p.lost for p in (fwd, rev) if p), "pings": sum(p.sent for p in (fwd, rev) if p),
        "tenant_echos": after[ten_ns] - before[ten_ns], "leaked_to": leaked, "isolated": not leaked,
        "errors": errors,
    }


def row_failed(row: dict[str, Any]) -> bool:
    """A tunnel whose demo did not pass: a lost packet, a leak, or a failed measurement."""
    return bool(row["lost"] or not row["isolated"] or row.get("errors"))


def run_demo(name: str, mode: Mode, seconds: float, progress: tbmod.Progress,
             keep_on_failure: bool = False, topology: Topology | None = None,
             backend: str | None = None) -> list[dict[str, Any]]:
    tb = ensure_up(name, mode, progress, keep_on_failure, topology, backend)
    if mode == "protego":
        progress("waiting for every site's tunnel")
        tbmod.wait_for_tunnels(tb, tb.timings.tunnel_wait_s)
    rows = []
    for s in tb.topology.sites:
        progress(f"traffic over {s.name}'s tunnel ({seconds:.0f} s each way)")
        rows.append(site_traffic(tb, s.name, seconds))
    return rows


def _mbps(v: float | None) -> str:
    return f"{v:>7.0f} Mb" if v is not None else f"{'FAILED':>10}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The demo's table; a failed measurement shows as FAILED, its reason below."""
    lines = [f"{'TENANT':<9} {'SITE':<11} {'GATEWAY':<14} {'SPI IN/OUT':<19} {'SITE->TEN':>10} "
             f"{'TEN->SITE':>10} {'RTT ms':>7} {'LOST':>5} {'ISOLATED':>8}"]
    notes = []
    for r in rows:
        rtt = f"{r['rtt_ms']:>7.2f}" if r["rtt_ms"] is not None else f"{'-':>7}"
        lines.append(
            f"{r['tenant']:<9} {r['site']:<11} {r['gateway']:<14} {r['spi_in'] + '/' + r['spi_out']:<19} "
            f"{_mbps(r['site_to_tenant_mbps'])} {_mbps(r['tenant_to_site_mbps'])} {rtt} {r['lost']:>5} "
            f"{'yes' if r['isolated'] else 'NO':>8}")
        notes += [f"  {r['tenant']}/{r['site']}: {e}" for e in r.get("errors", [])]
    if notes:
        lines += ["", "failed measurements:", *notes]
    return "\n".join(lines)
