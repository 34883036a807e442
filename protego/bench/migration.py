"""``protego bench migration`` and ``protego bench failover``: live migration by rekey and
recovery from a GPN failure, measured through the whole system (paper §7.1, §7.2).

Both bring up a protego-mode testbed of the default topology (taken down at the end,
whatever happens) and work on the first site's tunnel, with two kinds of traffic from the
site's first host to its tenant's first host:

* a sequence-numbered UDP stream (:mod:`protego.testbed.probe`), one datagram every
  ``--probe-ms`` echoed back: exact losses in both directions and the longest gap between
  received replies;
* load from iperf3 (TCP for ``migration``, paced by the kernel at ``--rate``; UDP at
  ``--rate`` for ``failover``, from the tenant's host to the site's by default, see
  ``--direction``), whose *receiver* prints a throughput figure every 100 ms that the
  benchmark timestamps as it arrives.

``migration``: ``--count`` migrations back and forth between two GPNs through the same
API the CLI uses. ``lost_packets``: probe datagrams lost over all of them (either
direction). ``switch_ms``: median time from the request until traffic runs through the
target both ways, the later of (outbound) the GMN's record that the new outbound SA is
installed on the target and the GIN/GEN steer the tunnel's traffic there, as the GMN took
it when the last acknowledgement arrived, and (inbound) the first packet of the peer on
the new inbound SA, as the target GPN's worker saw it (``first_use`` in its SA counters;
the peer sends on it once charon's DELETE of the old SA reached it). Both are printed
too. ``dip_pct``: per migration, the lowest 100 ms throughput
from the request until 100 ms after the switch, relative to the median of the second
before the request; the worst migration is reported.

``failover``: ``--trials`` times, SIGKILL of the engine (agent and workers) of the GPN
carrying the tunnel. ``detect_ms``: kill → the GIN's dead declaration (its ``since``).
``outage_ms``: the longest gap in the probe's received replies around the kill (median
and p95 over trials). The killed GPN is then restarted and must be declared alive again
before the next trial, which kills wherever the tunnel is then. ``false_declarations``:
healthy GPNs whose health changed during a trial (a declaration that should not have
happened). ``--direction from-site`` offers the load from the site's host: the test
site's ``kernel-libipsec`` sender carries about 95 Mbit/s here and queues the rest
without bound ahead of its IKE messages, so that measures the test peer (docs/bench.md).

``--cc`` (default ``cubic``) is the TCP load's congestion control: with ``bbr``, this
machine's default, the stream dips by 40-60 % for 200 ms every 10 s (PROBE_RTT), with or
without a migration. ``PROTEGO_TESTBED_CPUS=split`` runs either benchmark with the control
plane and the data path on separate CPUs (docs/testbed.md); the output says which.

``--keep-logs DIR`` copies the testbed's logs (agents, charons with millisecond
timestamps, etcd) before the teardown.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import click

__all__ = ["MIGRATION_TARGETS", "FAILOVER_TARGETS", "dip_pct", "parse_interval_line", "bench_migration",
           "bench_failover"]

PREFIX = "/protego/v1/"
MIGRATION_TARGETS = {"lost_packets": ("==", 0), "switch_ms": ("<=", 50.0), "dip_pct": ("<=", 5.0)}
FAILOVER_TARGETS = {"outage_ms": ("<=", 100.0)}

Progress = Callable[[str], None]

_INTERVAL = re.compile(r"^\[\s*\d+\]\s+([\d.]+)-([\d.]+)\s+sec\s+[\d.]+\s+\w?Bytes\s+([\d.]+)\s+(\w?)bits/sec")
_SCALE = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9}


def parse_interval_line(line: str) -> tuple[float, float, float] | None:
    """iperf3's human-readable interval line → (start s, end s, bits/s); None for others
    (headers, summaries, which iperf3 marks with sender/receiver)."""
    if "sender" in line or "receiver" in line:
        return None
    m = _INTERVAL.match(line.strip())
    if not m:
        return None
    return float(m.group(1)), float(m.group(2)), float(m.group(3)) * _SCALE[m.group(4)]


def dip_pct(samples: list[tuple[float, float]], t_start: float, t_end: float) -> float | None:
    """``samples``: (arrival time, bits/s) per 100 ms. The worst sample in
    [t_start, t_end + 0.1] relative to the median of the second before t_start, in %."""
    before = [bps for t, bps in samples if t_start - 1.0 <= t < t_start]
    during = [bps for t, bps in samples if t_start <= t <= t_end + 0.1]
    if not before or not during:
        return None
    ref = statistics.median(before)
    if ref <= 0:
        return None
    return max(0.0, (1 - min(during) / ref) * 100)


def _met(targets: dict[str, tuple[str, float]], name: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, bound = targets[name]
    return value == bound if op == "==" else value <= bound


def _median(xs: list[float | None]) -> float | None:
    got = [x for x in xs if x is not None]
    return round(statistics.median(got), 1) if got else None


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class RateMonitor:
    """iperf3 in the background, the *receiver's* report every 100 ms, each line
    timestamped on arrival. ``udp``: UDP at ``rate`` bits/s; else TCP paced by the kernel
    at ``rate`` (``--fq-rate``: SO_MAX_PACING_RATE, smooth at 100 ms; iperf3's own ``-b``
    pacing alternates 94/105 Mbit/s between 100 ms intervals at 100 Mbit/s, a 10 % "dip"
    with nothing happening)."""

    def __init__(self, server_ns: str, server_addr: str, client_ns: str, rate: float, udp: bool = False,
                 port: int = 5202, seconds: int = 3600, prefix: list[str] | None = None,
                 congestion: str | None = None) -> None:
        self.samples: list[tuple[float, float]] = []
        pre = list(prefix or [])  # e.g. taskset -c 1: on the testbed's data-path CPUs
        self.server = subprocess.Popen(
            [*pre, "ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server_addr, "-p", str(port),
             "-i", "0.1", "--forceflush"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True, name="iperf3-intervals")
        self._reader.start()
        time.sleep(0.3)
        cmd = [*pre, "ip", "netns", "exec", client_ns, "iperf3", "-c", server_addr, "-p", str(port), "-t", str(seconds),
               "-i", "1", "--connect-timeout", "3000"]
        if udp:
            cmd += ["-u", "-l", "1400", "-b", str(int(rate))]
        else:
            cmd += ["--fq-rate", str(int(rate))]
            if congestion:
                cmd += ["-C", congestion]
        self.client = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True)
        self.started = time.time()  # the load's start (with bbr the stream dips every ~10 s of it: PROBE_RTT)

    def _read(self) -> None:
        assert self.server.stdout is not None
        for line in self.server.stdout:
            parsed = parse_interval_line(line)
            if parsed is not None:
                self.samples.append((time.time(), parsed[2]))

    def median_bps(self, since: float) -> float | None:
        xs = [b for t, b in self.samples if t >= since]
        return statistics.median(xs) if xs else None

    def close(self) -> None:
        for p in (self.client, self.server):  # the client first: the server then reports its last interval
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._reader.join(timeout=5)


def _testbed(progress: Progress) -> Any:
    from protego.testbed import testbed as tbmod
    from protego.testbed.topology import load_topology

    name = "b" + secrets.token_hex(3)
    tb = tbmod.up(load_topology(None), name=name, mode="protego", progress=lambda m: progress(f"testbed {name}: {m}"))
    tbmod.wait_for_tunnels(tb, 60)
    return tb


def _placement(e: Any, tenant: str, tunnel: str) -> str:
    return str((e.get_json(f"{PREFIX}placement/{tenant}/{tunnel}") or {}).get("gpn", ""))


def _first_inbound(e: Any, tenant: str, tunnel: str, gpn: str, since: float, timeout: float = 5.0) -> float | None:
    """When the first packet on the tunnel's newest inbound SA on ``gpn`` arrived there
    (the GPN reports it with the SA's counters, ``first_use``, every couple of seconds):
    the peer's traffic runs through the new GPN from then. None if not reported in
    ``timeout`` seconds, or if that SA is older than ``since``."""
    deadline = time.monotonic() + timeout
    while True:
        _rev, kvs = e.get_prefix(f"{PREFIX}sas/")
        recs = [kv.json() for kv in kvs]
        new = [r for r in recs if isinstance(r, dict) and r.get("tenant") == tenant and r.get("tunnel") == tunnel
               and r.get("direction") == "in" and r.get("gpn") == gpn]
        if new:
            rec = max(new, key=lambda r: float(r.get("created", 0)))
            if float(rec.get("created", 0)) >= since:
                first = (e.get_json(f"{PREFIX}sastats/{rec['vip']}/{rec['spi']}") or {}).get("first_use")
                if first:
                    return float(first)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.25)


def _wait(cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> None:
    from protego.errors import TestbedError

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TestbedError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


# ---------------------------------------------------------------------------- migration


def run_migration(count: int, rate: float, probe_ms: float, progress: Progress,
                  keep_logs: str | None = None, congestion: str | None = "cubic") -> dict[str, Any]:
    from protego.control.migrate import migrate
    from protego.testbed import testbed as tbmod
    from protego.testbed.probe import UdpProbe

    t0 = time.monotonic()
    tb = _testbed(progress)
    split = tb.state.extra.get("cpus")  # PROTEGO_TESTBED_CPUS=split: control / data CPUs
    try:
        site = tb.topology.sites[0]
        tenant = tb.topology.tenant(site.tenant)
        gpns = [f"gpn{i}" for i in range(1, tb.topology.gpns + 1)]
        ikes = {s: t.get("ike_spi_i") for s, t in tbmod.site_tunnels(tb).items()}
        rows: list[dict[str, Any]] = []
        data = tbmod.cpus_prefix(tb, "data")
        with UdpProbe(tb.ns(f"s-{site.name}-h1"), tb.ns(f"t-{tenant.name}-h1"), str(tenant.hosts[0]),
                      interval_ms=probe_ms, prefix=data) as probe:
            mon = RateMonitor(*_load_ends(tb, site, tenant, "from-site"), rate, prefix=data, congestion=congestion)
            try:
                time.sleep(2.0)
                with tb.etcd() as e:
                    for i in range(count):
                        here = _placement(e, tenant.name, site.name)
                        target = next(g for g in gpns if g != here)
                        t_req = time.time()
                        res = migrate(e, tenant.name, site.name, target, timeout=60)
                        first_in = _first_inbound(e, tenant.name, site.name, target, t_req)
                        in_ms = None if first_in is None else (first_in - t_req) * 1000
                        both = None if res.switch_ms is None or in_ms is None else max(res.switch_ms, in_ms)
                        switched = t_req + (both or res.switch_ms or 0) / 1000
                        time.sleep(0.3)  # the samples after the switch arrive
                        dip = dip_pct(mon.samples, t_req, switched)
                        rows.append({"n": i + 1, "at_s": round(t_req - mon.started, 2),
                                     "from": res.source, "to": res.target, "state": res.state,
                                     "switch_ms": None if both is None else round(both, 1),
                                     "out_ms": None if res.switch_ms is None else round(res.switch_ms, 1),
                                     "in_ms": None if in_ms is None else round(in_ms, 1),
                                     "done_ms": round(res.total_ms, 1),
                                     "dip_pct": None if dip is None else round(dip, 1), "detail": res.detail})
                        progress(f"migration {i + 1}/{count}: {res.source} -> {res.target} {res.state}, "
                                 f"switched in {rows[-1]['switch_ms']} ms, dip {rows[-1]['dip_pct']} %")
                        time.sleep(1.0)  # a clean second before the next one
                load_bps = mon.median_bps(0)
            finally:
                mon.close()
            time.sleep(1.0)
            pr = probe.stop()
        renegotiated = {s: t.get("ike_spi_i") for s, t in tbmod.site_tunnels(tb).items()} != ikes
    finally:
        if keep_logs:
            progress(f"testbed logs copied to {tbmod.copy_logs(tb, keep_logs)}")
        progress(f"taking testbed {tb.name} down")
        tbmod.down(tb.name)
    switch = [r["switch_ms"] for r in rows if r["switch_ms"] is not None]
    dips = [r["dip_pct"] for r in rows if r["dip_pct"] is not None]
    res_: dict[str, Any] = {
        "migrations": count, "done": sum(1 for r in rows if r["state"] == "done"),
        "lost_packets": pr.lost, "lost_forward": len(pr.lost_forward), "lost_reverse": len(pr.lost_reverse),
        "probe_sent": pr.sent, "probe_interval_ms": probe_ms,
        "switch_ms": round(statistics.median(switch), 1) if switch else None,
        "switch_p95_ms": _pct(switch, 95),
        "switch_unmeasured": sum(1 for r in rows if r["switch_ms"] is None),
        "out_ms_median": _median([r["out_ms"] for r in rows]),
        "in_ms_median": _median([r["in_ms"] for r in rows]),
        "done_ms_median": round(statistics.median([r["done_ms"] for r in rows]), 1) if rows else None,
        "dip_pct": max(dips) if dips else None, "dip_median_pct": round(statistics.median(dips), 1) if dips else None,
        "load_mbps": None if load_bps is None else round(load_bps / 1e6, 1), "load_cap_mbps": round(rate / 1e6, 1),
        "ike_renegotiated": renegotiated, "per_migration": rows, "congestion": congestion,
        "wall_s": round(time.monotonic() - t0, 1), "cpus": os.cpu_count(), "cpu_split": split,
    }
    res_["targets"] = {k: {"op": op, "bound": b, "met": _met(MIGRATION_TARGETS, k, res_[k])}
                       for k, (op, b) in MIGRATION_TARGETS.items()}
    return res_


# ---------------------------------------------------------------------------- failover


def _engine_pids(tb: Any, node: str) -> tuple[Any, list[int]]:
    from protego.testbed import procs

    recs = [r for r in tb.state.procs if r.kind == "gpn-agent" and r.node == node and procs.is_alive(r)]
    if not recs:
        from protego.errors import TestbedError

        raise TestbedError(f"no running GPN agent on {node}")
    rec = recs[-1]
    return rec, procs.children(rec.pid)


LOAD_DIRECTIONS = ("to-site", "from-site")


def _load_ends(tb: Any, site: Any, tenant: Any, direction: str) -> tuple[str, str, str]:
    """(receiver namespace, receiver address, sender namespace) of the load."""
    if direction == "to-site":
        return tb.ns(f"s-{site.name}-h1"), str(site.hosts[0]), tb.ns(f"t-{tenant.name}-h1")
    return tb.ns(f"t-{tenant.name}-h1"), str(tenant.hosts[0]), tb.ns(f"s-{site.name}-h1")


def run_failover(trials: int, rate: float, probe_ms: float, progress: Progress,
                 direction: str = "to-site", keep_logs: str | None = None) -> dict[str, Any]:
    from protego.testbed import procs
    from protego.testbed import testbed as tbmod
    from protego.testbed.probe import UdpProbe

    t0 = time.monotonic()
    tb = _testbed(progress)
    split = tb.state.extra.get("cpus")  # PROTEGO_TESTBED_CPUS=split: control / data CPUs
    rows: list[dict[str, Any]] = []
    try:
        site = tb.topology.sites[0]
        tenant = tb.topology.tenant(site.tenant)
        ikes = {s: t.get("ike_spi_i") for s, t in tbmod.site_tunnels(tb).items()}
        with tb.etcd() as e:
            for i in range(trials):
                victim = _placement(e, tenant.name, site.name)
                others = [f"gpn{k}" for k in range(1, tb.topology.gpns + 1) if f"gpn{k}" != victim]
                _wait(lambda: all((e.get_json(f"{PREFIX}gpn/health/{g}") or {}).get("state", "alive") == "alive"
                                  and e.get(f"{PREFIX}gpn/nodes/{g}") is not None for g in others), 60,
                      "the other GPNs to be healthy")
                data = tbmod.cpus_prefix(tb, "data")
                with UdpProbe(tb.ns(f"s-{site.name}-h1"), tb.ns(f"t-{tenant.name}-h1"), str(tenant.hosts[0]),
                              interval_ms=probe_ms, prefix=data) as probe:
                    mon = RateMonitor(*_load_ends(tb, site, tenant, direction), rate, udp=True, port=5203,
                                      prefix=data)
                    try:
                        time.sleep(1.5)
                        before_bps = mon.median_bps(time.time() - 1.0)
                        rec, workers = _engine_pids(tb, victim)
                        t_kill = time.time()
                        for pid in [rec.pid, *workers]:
                            try:
                                os.kill(pid, signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                        _wait(lambda: (e.get_json(f"{PREFIX}gpn/health/{victim}") or {}).get("state") == "dead",
                              30, f"{victim} to be declared dead")
                        since = float((e.get_json(f"{PREFIX}gpn/health/{victim}") or {}).get("since", 0))
                        _wait(lambda: _placement(e, tenant.name, site.name) not in ("", victim), 60,
                              "the tunnel to move off the dead GPN")
                        time.sleep(2.0)  # traffic flows again (the probe measures when)
                        after_bps = mon.median_bps(time.time() - 1.0)
                        # a healthy GPN declared anything during the trial: a false alarm
                        disturbed = sorted(g for g in others if float(
                            (e.get_json(f"{PREFIX}gpn/health/{g}") or {}).get("since", 0)) > t_kill)
                    finally:
                        mon.close()
                    pr = probe.stop()
                detect = (since - t_kill) * 1000
                rows.append({"n": i + 1, "victim": victim, "to": _placement(e, tenant.name, site.name),
                             "detect_ms": round(detect, 1), "outage_ms": pr.max_gap_ms, "lost": pr.lost,
                             "probe_sent": pr.sent, "false_declarations": disturbed,
                             "load_before_mbps": None if before_bps is None else round(before_bps / 1e6, 1),
                             "load_after_mbps": None if after_bps is None else round(after_bps / 1e6, 1)})
                progress(f"trial {i + 1}/{trials}: {victim} killed, declared dead after {detect:.0f} ms, "
                         f"longest gap {pr.max_gap_ms} ms, {pr.lost} probe datagrams lost"
                         + (f", healthy {disturbed} declared too" if disturbed else ""))
                # the killed GPN comes back; it must be declared alive before the next trial
                procs.reap(rec.pid)
                new = procs.spawn(rec.node, rec.kind, tb.ns(rec.node), rec.cmd,
                                  tb.state.logs / f"{rec.node}.gpn-agent.log")
                tb.state.procs.append(new)
                tb.state.save()
                _wait(lambda: (e.get_json(f"{PREFIX}gpn/health/{victim}") or {}).get("state") == "alive", 60,
                      f"{victim} to be declared alive again")
        renegotiated = {s: t.get("ike_spi_i") for s, t in tbmod.site_tunnels(tb).items()} != ikes
    finally:
        if keep_logs:
            progress(f"testbed logs copied to {tbmod.copy_logs(tb, keep_logs)}")
        progress(f"taking testbed {tb.name} down")
        tbmod.down(tb.name)
    det = [r["detect_ms"] for r in rows]
    out = [r["outage_ms"] for r in rows if r["outage_ms"] is not None]
    res: dict[str, Any] = {
        "trials": len(rows), "rate_mbps": round(rate / 1e6, 1), "direction": direction,
        "probe_interval_ms": probe_ms,
        "detect_ms": round(statistics.median(det), 1) if det else None,
        "outage_ms": round(statistics.median(out), 1) if out else None,
        "outage_p95_ms": _pct(out, 95),
        "false_declarations": sum(len(r["false_declarations"]) for r in rows),
        "ike_renegotiated": renegotiated, "per_trial": rows,
        "wall_s": round(time.monotonic() - t0, 1), "cpus": os.cpu_count(), "cpu_split": split,
    }
    res["targets"] = {k: {"op": op, "bound": b, "met": _met(FAILOVER_TARGETS, k, res[k])}
                      for k, (op, b) in FAILOVER_TARGETS.items()}
    return res


# ---------------------------------------------------------------------------- output


def metric_table(rows: list[list[str]]) -> str:
    """metric / value / target / met? columns, aligned (the benchmarks' tables)."""
    head = ["metric", "value", "target", "met?"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _t(res: dict[str, Any], name: str) -> tuple[str, str]:
    t = res["targets"][name]
    return f"{t['op']} {t['bound']:g}", "n/a" if t["met"] is None else ("yes" if t["met"] else "NO")


def format_migration(res: dict[str, Any]) -> str:
    rows = [
        ["migrations done", f"{res['done']}/{res['migrations']}", "-", "-"],
        ["lost_packets (probe, both ways)", str(res["lost_packets"]), *_t(res, "lost_packets")],
        ["switch_ms (median)", str(res["switch_ms"]), *_t(res, "switch_ms")],
        ["switch_ms (p95)", str(res["switch_p95_ms"]), "-", "-"],
        ["  outbound: GIN/GEN + target acked (median)", str(res["out_ms_median"]), "-", "-"],
        ["  inbound: peer's first packet at target (median)", str(res["in_ms_median"]), "-", "-"],
        ["dip_pct (worst)", str(res["dip_pct"]), *_t(res, "dip_pct")],
        ["dip_pct (median)", str(res["dip_median_pct"]), "-", "-"],
        ["source cleaned (median ms)", str(res["done_ms_median"]), "-", "-"],
        ["TCP load (median Mbit/s, cap)", f"{res['load_mbps']} ({res['load_cap_mbps']}, {res.get('congestion')})",
         "-", "-"],
        ["IKE renegotiated", "yes" if res["ike_renegotiated"] else "no", "no", "NO" if res["ike_renegotiated"] else "yes"],
    ]
    return metric_table(rows) + f"\n({res['probe_sent']} probe datagrams every {res['probe_interval_ms']} ms; " \
                          f"{res['wall_s']} s wall on {res['cpus']} CPUs{_split(res)})"


def _split(res: dict[str, Any]) -> str:
    sp = res.get("cpu_split")
    if not sp:
        return ", all roles sharing them"
    return f", control plane on CPUs {','.join(map(str, sp['control']))}, data path on {','.join(map(str, sp['data']))}"


def format_failover(res: dict[str, Any]) -> str:
    rows = [
        ["trials", str(res["trials"]), ">= 10", "yes" if res["trials"] >= 10 else "NO"],
        ["detect_ms (median)", str(res["detect_ms"]), "-", "-"],
        ["outage_ms (median)", str(res["outage_ms"]), *_t(res, "outage_ms")],
        ["outage_p95_ms", str(res["outage_p95_ms"]), "-", "-"],
        ["healthy GPNs declared dead", str(res["false_declarations"]), "0",
         "yes" if res["false_declarations"] == 0 else "NO"],
        ["IKE renegotiated", "yes" if res["ike_renegotiated"] else "no", "no", "NO" if res["ike_renegotiated"] else "yes"],
    ]
    return metric_table(rows) + f"\n(UDP load {res['rate_mbps']} Mbit/s offered {res['direction']}; probe every {res['probe_interval_ms']} ms; " \
                          f"{res['wall_s']} s wall on {res['cpus']} CPUs{_split(res)}; " \
                          "paper: 280 ms with WAN round trips)"


def _run(name: str, fn: Callable[[Progress], dict[str, Any]], fmt: Callable[[dict[str, Any]], str],
         as_json: bool) -> None:
    from protego.errors import ProtegoError

    if os.geteuid() != 0:
        raise click.ClickException("needs root (network namespaces, charon, etcd)")

    def progress(msg: str) -> None:
        click.echo(f"[bench {name}] {msg}", err=True)

    try:
        res = fn(progress)
    except ProtegoError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(res) if as_json else fmt(res))


keep_logs_option = click.option(
    "--keep-logs", type=click.Path(file_okay=False), default=None,
    help="Copy the testbed's logs (agents, charons, etcd) into this directory before teardown.")


@click.command("migration")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--count", type=click.IntRange(1, 1000), default=20, show_default=True, help="Migrations.")
@click.option("--rate", type=click.FloatRange(1e6, 10e9), default=100e6, show_default=True,
              help="TCP load cap, bits/s.")
@click.option("--probe-ms", type=click.FloatRange(0.5, 100), default=2.0, show_default=True,
              help="Interval of the sequence-numbered UDP probe.")
@click.option("--cc", "congestion", type=click.Choice(["cubic", "bbr", "reno"]), default="cubic", show_default=True,
              help="The TCP load's congestion control (bbr probes the path's RTT every 10 s: a dip of its own).")
@keep_logs_option
def bench_migration(as_json: bool, count: int, rate: float, probe_ms: float, congestion: str,
                    keep_logs: str | None) -> None:
    """Live migration under load: lost packets, switch time, throughput dip."""
    _run("migration", lambda p: run_migration(count, rate, probe_ms, p, keep_logs, congestion), format_migration,
         as_json)


@click.command("failover")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--trials", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--rate", type=click.FloatRange(1e6, 10e9), default=300e6, show_default=True,
              help="UDP load offered through the tunnel, bits/s.")
@click.option("--probe-ms", type=click.FloatRange(0.5, 100), default=1.0, show_default=True,
              help="Interval of the sequence-numbered UDP probe (the outage resolution).")
@click.option("--direction", type=click.Choice(LOAD_DIRECTIONS), default="to-site", show_default=True,
              help="Load from the tenant's host to the site's (to-site) or back. from-site overloads the "
                   "test site's kernel-libipsec sender (about 95 Mbit/s here), whose unbounded queue then "
                   "delays its IKE answers by seconds: docs/bench.md.")
@keep_logs_option
def bench_failover(as_json: bool, trials: int, rate: float, probe_ms: float, direction: str,
                   keep_logs: str | None) -> None:
    """GPN failure under load: detection time and traffic outage."""
    _run("failover", lambda p: run_failover(trials, rate, probe_ms, p, direction, keep_logs), format_failover,
         as_json)
