"""``protego bench gmn-failover``: the active GMN fails; the standby takes over the
established IKE SAs (paper §7.1; DESIGN.md flow 4).

A protego-mode testbed of the default topology (taken down at the end, whatever
happens). Every site's host sends a sequence-numbered UDP stream to its tenant's host
(:mod:`protego.testbed.probe`, echoed back) for the whole run. ``--trials`` times:

1. the standby's charon must hold every site's IKE SA (PASSIVE, same SPIs): the mirror
   has caught up;
2. every site rekeys its CHILD_SA (IKE state changes on the active GMN that must reach
   etcd: message IDs, CHILD_ADD, CHILD_DELETE);
3. the active GMN's charon is killed with SIGKILL (``--mode charon``), or the active
   GMN's links go down (``--mode link``: fabric and management, so it loses the GIN and
   etcd);
4. once the standby is the leader and its charon holds the IKE SAs as ESTABLISHED, every
   site starts an IKE exchange of its own (a CHILD_SA rekey) and must complete it on the
   same IKE SA;
5. the killed charon is restarted (or the links come back): that GMN catches up from
   etcd as the standby, and the next trial fails the other GMN.

Figures: ``replication_ms_p99`` (a datagram of charon's HA stream, by its kernel receive
time on the active GMN, to etcd's acknowledgement of the mirror write; from the agents'
histograms over all trials; also its median, and the p99 of the samples more than 1 s
after any takeover, apart), ``takeover_ms`` (median kill → the first site's exchange
answered by the new active GMN), ``esp_lost_packets`` (probe datagrams lost, both
directions, summed over the run), ``renegotiated_tunnels`` (sites whose IKE SA changed,
summed over trials).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import click

from protego.bench.migration import keep_logs_option

PREFIX = "/protego/v1/"
TARGETS = {"esp_lost_packets": ("==", 0), "renegotiated_tunnels": ("==", 0), "takeover_ms": ("<=", 1000.0),
           "replication_ms_p99": ("<=", 20.0)}
Progress = Callable[[str], None]


# ---------------------------------------------------------------------------- primitives
def gmn_leader(tb: Any) -> str | None:
    with tb.etcd() as e:
        return (e.get_json(f"{PREFIX}gmn/leader") or {}).get("node")


def other_gmn(node: str) -> str:
    return "gmn2" if node == "gmn1" else "gmn1"


def charon_record(tb: Any, node: str) -> Any:
    return next(r for r in tb.state.procs if r.node == node and r.kind == "charon")


def gmn_ike_states(tb: Any, node: str) -> dict[str, str]:
    """``initiator-spi`` → IKE state in a GMN's charon ({} if it does not answer)."""
    from protego.gmn.ha_service import charon_holds

    try:
        ikes, _children = charon_holds(tb.charon_files(node).vici_socket)
    except Exception:  # noqa: BLE001 - OSError, ProtegoError, vici's session errors when charon just died
        return {}
    return {spis.split("_", 1)[0]: state for spis, state in ikes.items()}


def site_ike_spis(tb: Any) -> dict[str, str]:
    from protego.testbed import testbed as tbmod

    return {s: str(t.get("ike_spi_i")) for s, t in tbmod.site_tunnels(tb).items()}


def wait_standby_caught_up(tb: Any, node: str, spis: dict[str, str], timeout: float = 30.0) -> bool:
    """``node``'s charon holds every site's IKE SA as PASSIVE."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = gmn_ike_states(tb, node)
        if all(states.get(s) == "PASSIVE" for s in spis.values()):
            return True
        time.sleep(0.1)
    return False


def site_rekey(tb: Any, site: str, timeout: float = 15.0, poll: float = 0.005) -> float:
    """The site rekeys its newest CHILD_SA (an IKE exchange it initiates); seconds until
    its new CHILD_SA is installed. Raises on failure."""
    from protego.errors import PeerError

    node = f"s-{site}"
    t0 = time.monotonic()
    with tb.vici(node) as v:
        cur = next(iter(v.list_sas(site)), None)
        if not cur or not cur.get("child_id"):
            raise PeerError(f"site {site} has no CHILD_SA to rekey")
        old = cur["spi_in"]
        v.rekey_child(cur["child_id"])
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            now = next(iter(v.list_sas(site)), None)
            if now and now.get("child_state") == "INSTALLED" and now.get("spi_in") != old:
                return time.monotonic() - t0
            time.sleep(poll)
    raise PeerError(f"site {site}: CHILD_SA rekey did not complete within {timeout:.0f} s")


def set_links(tb: Any, node: str, up: bool) -> None:
    """A GMN's fabric and management links down, or up again with the routes the kernel
    removed with them (the testbed plan's)."""
    ns = tb.ns(node)
    for dev in ("fab0", "mgmt0"):
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up" if up else "down"], check=True)
    if up:
        for r in tb.plan.routes:
            if r.ns == ns:
                subprocess.run(["ip", "-n", ns, "route", "replace", r.dst, "via", r.via], check=True)


def ha_stats(tb: Any, node: str) -> dict[str, Any]:
    with tb.etcd() as e:
        return e.get_json(f"{PREFIX}gmn/ha/{node}") or {}


def fail_gmn(tb: Any, node: str, mode: str) -> float:
    """Fail ``node`` (``charon``: SIGKILL of its charon; ``link``: its links down);
    the ``time.time()`` of the failure."""
    if mode == "charon":
        rec = charon_record(tb, node)
        t0 = time.time()
        os.kill(rec.pid, signal.SIGKILL)
        return t0
    t0 = time.time()
    set_links(tb, node, False)
    return t0


def restore_gmn(tb: Any, node: str, mode: str) -> None:
    from protego.testbed import procs
    from protego.testbed import testbed as tbmod

    if mode == "charon":
        rec = charon_record(tb, node)
        deadline = time.monotonic() + 5
        while procs.is_alive(rec) and time.monotonic() < deadline:
            time.sleep(0.02)
        tbmod.start_gmn_charon(tb, node)
    else:
        set_links(tb, node, True)


def wait_takeover(tb: Any, new: str, spis: dict[str, str], timeout: float = 15.0) -> float | None:
    """``time.time()`` when ``new`` led and held every site's IKE SA as ESTABLISHED."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gmn_leader(tb) == new:
            states = gmn_ike_states(tb, new)
            if all(states.get(s) == "ESTABLISHED" for s in spis.values()):
                return time.time()
        time.sleep(0.005)
    return None


# ---------------------------------------------------------------------------- the run
def run_gmn_failover(trials: int, mode: str, progress: Progress, keep_logs: str | None = None) -> dict[str, Any]:
    from protego.gmn.ha import histogram_quantile
    from protego.testbed import testbed as tbmod
    from protego.testbed.probe import UdpProbe
    from protego.testbed.topology import load_topology

    name = f"gf{secrets.token_hex(2)}"
    t_start = time.monotonic()
    tb = tbmod.up(load_topology(None), name=name, mode="protego", progress=lambda m: progress(f"testbed {name}: {m}"))
    probes: list[Any] = []
    rows: list[dict[str, Any]] = []
    try:
        tbmod.wait_for_tunnels(tb, 60)
        sites = [s.name for s in tb.topology.sites]
        for i, s in enumerate(tb.topology.sites):
            dst = str(tb.topology.tenant(s.tenant).hosts[0])
            probes.append(UdpProbe(tb.ns(f"s-{s.name}-h1"), tb.ns(f"t-{s.tenant}-h1"), dst, port=7900 + i,
                                   interval_ms=2, prefix=tbmod.cpus_prefix(tb, "data")))
        hist_before = {n: ha_stats(tb, n) for n in ("gmn1", "gmn2")}
        for trial in range(1, trials + 1):
            active = gmn_leader(tb)
            if active not in ("gmn1", "gmn2"):
                raise click.ClickException(f"trial {trial}: no active GMN")
            standby = other_gmn(active)
            spis = site_ike_spis(tb)
            if not wait_standby_caught_up(tb, standby, spis):
                raise click.ClickException(f"trial {trial}: {standby} did not catch up with the mirror")
            for s in sites:  # IKE state changes to replicate (polled gently: not what is timed)
                site_rekey(tb, s, poll=0.05)
            time.sleep(1.3)  # the agents publish their histograms every second
            t_fail = fail_gmn(tb, active, mode)
            t_active = wait_takeover(tb, standby, spis)
            row: dict[str, Any] = {"trial": trial, "failed": active, "mode": mode}
            if t_active is None:
                row["error"] = f"{standby} did not take over"
                rows.append(row)
                restore_gmn(tb, active, mode)
                continue
            answered: dict[str, float] = {}
            errors: dict[str, str] = {}

            def exchange(site: str) -> None:
                try:
                    site_rekey(tb, site)
                    answered[site] = time.time()
                except Exception as exc:  # noqa: BLE001 - reported per site
                    errors[site] = str(exc)

            threads = [threading.Thread(target=exchange, args=(s,)) for s in sites]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            after = site_ike_spis(tb)
            row.update({
                "active_ms": round((t_active - t_fail) * 1000, 1),
                "takeover_ms": round((min(answered.values()) - t_fail) * 1000, 1) if answered else None,
                "all_answered_ms": round((max(answered.values()) - t_fail) * 1000, 1)
                if len(answered) == len(sites) else None,
                "exchange_errors": errors,
                "renegotiated": sum(1 for s in sites if after.get(s) != spis.get(s)),
            })
            rows.append(row)
            progress(f"trial {trial}: {active} failed ({mode}); {standby} active after {row['active_ms']} ms, "
                     f"first site exchange answered after {row['takeover_ms']} ms")
            restore_gmn(tb, active, mode)
        time.sleep(1.3)
        hist_after = {n: ha_stats(tb, n) for n in ("gmn1", "gmn2")}
        results = [p.stop() for p in probes]
        probes = []
    finally:
        for p in probes:
            try:
                p.stop()
            except Exception:  # noqa: BLE001 - cleanup
                pass
        if keep_logs:
            progress(f"testbed logs copied to {tbmod.copy_logs(tb, keep_logs)}")
        tbmod.down(name)
    def quantile(field: str, q: float) -> float | None:
        """Over both GMNs' samples of the run (the histograms merged)."""
        merged_b: dict[str, int] = {}
        merged_a: dict[str, int] = {}
        for n in hist_after:
            for src, dst in ((hist_before.get(n) or {}).get(field) or {}, merged_b), \
                            ((hist_after[n] or {}).get(field) or {}, merged_a):
                for k, v in (src.get("buckets") or {}).items():
                    dst[k] = dst.get(k, 0) + int(v)
        return histogram_quantile({"buckets": merged_b}, {"buckets": merged_a, "width_ms": 0.25}, q)

    samples = sum(int(((hist_after[n] or {}).get("latency") or {}).get("count", 0))
                  - int(((hist_before.get(n) or {}).get("latency") or {}).get("count", 0)) for n in hist_after)
    takeovers = [r["takeover_ms"] for r in rows if r.get("takeover_ms") is not None]
    res: dict[str, Any] = {
        "trials": trials, "mode": mode,
        "replication_ms_p99": quantile("latency", 0.99),
        "replication_ms_p50": quantile("latency", 0.5),
        "replication_ms_p99_steady": quantile("latency_steady", 0.99),
        # the replication time split: waiting for the txn that carries it, and that txn
        "replication_queue_ms_p99": quantile("latency_queue", 0.99),
        "replication_txn_ms_p50": quantile("latency_txn", 0.5),
        "replication_txn_ms_p99": quantile("latency_txn", 0.99),
        "replication_samples": samples,
        "takeover_ms": round(statistics.median(takeovers), 1) if takeovers else None,
        "takeover_max_ms": max(takeovers) if takeovers else None,
        "active_ms_median": round(statistics.median([r["active_ms"] for r in rows if "active_ms" in r]), 1)
        if any("active_ms" in r for r in rows) else None,
        "esp_lost_packets": sum(len(r.lost_forward) + len(r.lost_reverse) for r in results),
        "esp_sent_packets": sum(r.sent for r in results),
        "esp_max_gap_ms": max((r.max_gap_ms or 0) for r in results),
        "renegotiated_tunnels": sum(r.get("renegotiated", 0) for r in rows),
        "failed_trials": sum(1 for r in rows if "error" in r or r.get("exchange_errors")),
        "rows": rows, "wall_s": round(time.monotonic() - t_start, 1), "cpus": os.cpu_count(),
    }
    res["met"] = {k: _met(res.get(k), *TARGETS[k]) for k in TARGETS}
    return res


def _met(v: Any, op: str, target: float) -> bool | None:
    if v is None:
        return None
    return v == target if op == "==" else v <= target


def format_table(res: dict[str, Any]) -> str:
    def t(k: str) -> list[str]:
        op, target = TARGETS[k]
        m = res["met"].get(k)
        return [f"{op} {target:g}", "-" if m is None else ("yes" if m else "NO")]

    rows = [
        ["trials (failed)", f"{res['trials']} ({res['failed_trials']})", ">= 10", "yes" if res["trials"] >= 10 else "NO"],
        ["replication_ms_p99", str(res["replication_ms_p99"]), *t("replication_ms_p99")],
        ["replication_ms p50", str(res["replication_ms_p50"]), "-", "-"],
        ["replication_ms p99, > 1 s after takeovers", str(res["replication_ms_p99_steady"]), "-", "-"],
        ["  of which queued before the txn, p99", str(res.get("replication_queue_ms_p99")), "-", "-"],
        ["  etcd txn p50 / p99", f"{res.get('replication_txn_ms_p50')} / {res.get('replication_txn_ms_p99')}",
         "-", "-"],
        ["takeover_ms (median)", str(res["takeover_ms"]), *t("takeover_ms")],
        ["takeover_ms (max)", str(res["takeover_max_ms"]), "-", "-"],
        ["standby active (median ms)", str(res["active_ms_median"]), "-", "-"],
        ["esp_lost_packets", f"{res['esp_lost_packets']} of {res['esp_sent_packets']}", *t("esp_lost_packets")],
        ["renegotiated_tunnels", str(res["renegotiated_tunnels"]), *t("renegotiated_tunnels")],
    ]
    from protego.bench.migration import metric_table

    return metric_table(rows) + (f"\n(mode {res['mode']}; {res['replication_samples']} replicated HA messages; "
                               f"probe gap max {res['esp_max_gap_ms']} ms; {res['wall_s']} s wall on "
                               f"{res['cpus']} CPUs; paper: IKE state update 89 ms)")


@click.command("gmn-failover")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--trials", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--mode", type=click.Choice(["charon", "link"]), default="charon", show_default=True,
              help="charon: SIGKILL of the active GMN's charon; link: the active GMN's links go down.")
@keep_logs_option
def bench_gmn_failover(as_json: bool, trials: int, mode: str, keep_logs: str | None) -> None:
    """The active GMN fails under traffic: replication latency, takeover time, ESP loss."""
    from protego.errors import ProtegoError

    if os.geteuid() != 0:
        raise click.ClickException("needs root (network namespaces, charon, etcd)")
    try:
        res = run_gmn_failover(trials, mode, lambda m: click.echo(f"[bench gmn-failover] {m}", err=True),
                               keep_logs)
    except ProtegoError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(res) if as_json else format_table(res))
