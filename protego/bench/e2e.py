"""``protego bench e2e [--json]``: Protego end to end against the testbed's baseline.

Two testbeds of the default topology, one after the other (never side by side:
the machine has two cores), each taken down before the next starts:

1. ``baseline`` mode (one dedicated strongSwan gateway per tenant), then
2. ``protego`` mode (GIN/GEN, GMN, GPNs),

and in each, through the first site's tunnel, from the site's first host to its
tenant's first host: the median round trip time of ``--pings`` echo requests
10 ms apart (the median of the per-reply times, not ping's average), then TCP
throughput (iperf3, one stream, ``--seconds``). The site peer is the same
(a strongSwan charon with kernel-libipsec) in both runs.

Then, in the protego testbed only, ``setup_100_s``: the first site's gateway
gets ``--tunnels`` more connections ``bulk<i>`` (identity
``bulk<i>.<site>.example``, local traffic selector ``10.210.<i>.0/24`` with
``10.210.<i>.1`` on its ``lo``, remote selector the tenant's network, its own
random PSK held in memory and handed over VICI). The clock starts, the tunnels
are created on Protego's side through the real CLI: by default (``--cli add``)
one ``protego tunnel add <tenant>/bulk<i> ... --psk-file -`` each, ``--parallel``
processes at a time; with ``--cli load`` one ``protego tunnel load -`` with every
tunnel as a JSON line on standard input (PSKs included), all 100 at once. (The
burst is slower today: the GMN and the GIN/GEN do per-change work for each of
the 200 SAs at once and the site's IKE requests time out and are retransmitted
after 10 s; see docs/bench.md.) The site initiates each as soon as the CLI call that created it has
returned (re-initiating after a short back-off while the GMN has not loaded
the connection yet) and pings the tenant's host from ``10.210.<i>.1``; the
clock stops when every tunnel has answered. Where the time went comes from the
benchmark's own timestamps and the GMN agent's log (connection loaded, SAs
placed). ``gmn_rss_mb`` is then the resident memory of the leader GMN's charon
plus its agent.

Needs root, charon with the kernel-protego plugin, etcd and iperf3. Progress
goes to standard error; the exit status is 0 whether or not a target is met.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import re
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import click

__all__ = [
    "TARGETS",
    "bench_e2e",
    "bulk_prefix",
    "format_table",
    "parse_agent_log",
    "parse_ping_rtts",
    "summarize",
]

Progress = Callable[[str], None]

# metric -> (comparison, target); ``setup_100_s`` is judged only for 100 tunnels
TARGETS: dict[str, tuple[str, float]] = {
    "ratio": (">=", 1.0),
    "added_latency_ms": ("<=", 0.3),
    "setup_100_s": ("<=", 30.0),
}
BULK_BASE = ipaddress.IPv4Network("10.210.0.0/24")
PROBE_PREFIX = "10.209.255.0/24"  # the scratch tunnel that times one CLI call
INITIATE_TIMEOUT_MS = 10_000
RETRY_BACKOFF_S = 0.5

# ---------------------------------------------------------------------------
# pure helpers

_PING_REPLY = re.compile(r"icmp_seq=(\d+)\b.*?\btime=([\d.]+) ms")


def parse_ping_rtts(text: str) -> list[float]:
    """Per-reply round trip times (ms) from ``ping -n`` output, in order; duplicates
    (``DUP!``) are left out."""
    out = []
    for line in text.splitlines():
        if "DUP!" in line:
            continue
        m = _PING_REPLY.search(line)
        if m:
            out.append(float(m.group(2)))
    return out


def bulk_prefix(i: int) -> ipaddress.IPv4Network:
    """The site-side traffic selector of bulk tunnel ``i``: 10.210.i.0/24, then 10.211.0.0/24..."""
    if not 0 <= i < 46 * 256:
        raise ValueError(f"bulk tunnel index {i} out of range")
    return ipaddress.IPv4Network((int(BULK_BASE.network_address) + (i << 8), 24))


_AGENT_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ protego\.gmn\.agent: tunnel ([a-z0-9-]+)/([a-z0-9-]+)"
    r"(?:: (?:(in|out) SA [0-9a-f]+ placed on (\S+)|(child-up|ike-up))| (loaded into charon))$"
)


def parse_agent_log(text: str, tenant: str) -> dict[str, dict[str, float]]:
    """Per tunnel of ``tenant``, the first time (epoch seconds) the GMN agent logged each
    step: ``loaded`` into charon, ``ike-up``, ``in``/``out`` SA placed, ``child-up``."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _AGENT_LINE.match(line)
        if not m or m.group(2) != tenant:
            continue
        stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        step = m.group(4) or m.group(6) or "loaded"
        out.setdefault(m.group(3), {}).setdefault(step, stamp)
    return out


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _spread(xs: list[float]) -> dict[str, float] | None:
    """median / 90th percentile / max of a list of durations (seconds), rounded."""
    if not xs:
        return None
    s = sorted(xs)
    return {"median": round(statistics.median(s), 3), "p90": round(s[min(len(s) - 1, int(len(s) * 0.9))], 3),
            "max": round(s[-1], 3)}


def _met(metric: str, value: float | None) -> bool | None:
    if value is None:
        return False
    op, target = TARGETS[metric]
    return value >= target if op == ">=" else value <= target


def summarize(baseline: dict[str, Any], protego: dict[str, Any], setup: dict[str, Any] | None,
              rss: dict[str, Any] | None) -> dict[str, Any]:
    """The result object from the measurements of both runs (pure)."""
    pg, bg = protego.get("gbps"), baseline.get("gbps")
    prtt, brtt = protego.get("rtt_ms"), baseline.get("rtt_ms")
    ratio = pg / bg if pg is not None and bg else None
    added = prtt - brtt if prtt is not None and brtt is not None else None
    setup = setup or {}
    count = setup.get("tunnels")
    res: dict[str, Any] = {
        "protego_gbps": _round(pg, 4),
        "baseline_gbps": _round(bg, 4),
        "ratio": _round(ratio, 3),
        "protego_rtt_ms": _round(prtt, 4),
        "baseline_rtt_ms": _round(brtt, 4),
        "added_latency_ms": _round(added, 4),
        "setup_100_s": _round(setup.get("setup_s"), 2),
        "setup_tunnels": count,
        "setup_passed": setup.get("passed"),
        "gmn_rss_mb": _round((rss or {}).get("total_mb"), 1),
        "gmn_rss_detail": rss,
    }
    targets = {}
    for metric, (op, target) in TARGETS.items():
        value = res[metric]
        met: bool | None = _met(metric, value)
        if metric == "setup_100_s" and count != 100:
            met = None  # the target is for 100 tunnels
        targets[metric] = {"op": op, "target": target, "value": value, "met": met}
    res["targets"] = targets
    res["baseline"] = baseline
    res["protego"] = protego
    res["setup"] = setup
    return res


def _later(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(a, b)


def _round(v: float | None, nd: int) -> float | None:
    return None if v is None else round(v, nd)


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}{unit}" if abs(v) < 10 else f"{v:.1f}{unit}"
    return f"{v}{unit}"


def format_table(res: dict[str, Any]) -> str:
    t = res["targets"]

    def met(metric: str) -> str:
        m = t[metric]["met"]
        return "n/a" if m is None else ("yes" if m else "NO")

    setup = res.get("setup") or {}
    rss = res.get("gmn_rss_detail") or {}
    base_rss = (res.get("baseline") or {}).get("gateway_rss_mb")
    rows = [
        ["TCP throughput (Gbit/s)", _fmt(res["protego_gbps"]), _fmt(res["baseline_gbps"]), "-", "-"],
        ["ratio protego/baseline", _fmt(res["ratio"]), "1", ">= 1.0", met("ratio")],
        ["median RTT (ms)", _fmt(res["protego_rtt_ms"]), _fmt(res["baseline_rtt_ms"]), "-", "-"],
        ["added latency (ms)", _fmt(res["added_latency_ms"]), "0", "<= 0.3", met("added_latency_ms")],
        [f"setup of {res['setup_tunnels']} tunnels (s)", _fmt(res["setup_100_s"]),
         f"{setup.get('passed', 0)}/{setup.get('tunnels', 0)} passed", "<= 30 (100)", met("setup_100_s")],
        ["GMN RSS (MB)", _fmt(res["gmn_rss_mb"]),
         f"{_fmt(base_rss)} per tenant gw" if base_rss is not None else "-", "-", "-"],
    ]
    head = ["metric", "protego", "baseline/reference", "target", "met?"]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if rss:
        lines.append(f"\nGMN {rss.get('node')}: charon {_fmt(rss.get('charon_mb'))} MB + agent "
                     f"{_fmt(rss.get('agent_mb'))} MB + HA relay {_fmt(rss.get('relay_mb'))} MB "
                     f"with {rss.get('tunnels')} tunnels loaded")
    phases = setup.get("phases") or {}
    if phases:
        lines.append("setup, per tunnel (median / p90 / max, s): " + "; ".join(
            f"{k} {v['median']}/{v['p90']}/{v['max']}" for k, v in phases.items() if v))
    miles = setup.get("milestones_s") or {}
    if miles:
        lines.append("setup milestones (s after the clock started): " + ", ".join(
            f"{k} {v}" for k, v in miles.items() if v is not None))
    if setup.get("cli_single_s") is not None:
        lines.append(f"one `protego tunnel add` alone: {setup['cli_single_s']:.3f} s "
                     f"({setup.get('cli_single_cpu_s', 0):.3f} CPU s)")
    cpu = setup.get("cpu_s") or {}
    if cpu:
        top = ", ".join(f"{k} {v}" for k, v in list((cpu.get("testbed_processes") or {}).items())[:6])
        lines.append(f"CPU s during the setup: machine {cpu.get('machine_busy')} busy of {cpu.get('machine_total')}; "
                     f"CLI processes {cpu.get('cli')}; all of the benchmark's children {cpu.get('bench_children')}; "
                     f"{top}")
    run = res.get("run") or {}
    if run:
        lines.append(f"run: {run.get('wall_s')} s wall, load average {run.get('loadavg_1min_at_start')} at the start, "
                     f"other testbeds up: {', '.join(run.get('other_testbeds_at_start') or []) or 'none'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# measurements (root, testbeds)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rtt_samples(netns: str, dst: str, count: int, interval: float = 0.01, src: str | None = None
                ) -> tuple[list[float], int]:
    """(per-reply RTTs in ms, requests sent) of ``count`` echo requests ``interval`` apart."""
    cmd = ["ip", "netns", "exec", netns, "ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1"]
    if src:
        cmd += ["-I", src]
    res = subprocess.run([*cmd, dst], capture_output=True, text=True, timeout=count * interval + 30)
    return parse_ping_rtts(res.stdout), count


def _ping_once(netns: str, dst: str, src: str | None = None, wait_s: int = 1) -> bool:
    cmd = ["ip", "netns", "exec", netns, "ping", "-n", "-q", "-c", "1", "-W", str(wait_s)]
    if src:
        cmd += ["-I", src]
    return subprocess.run([*cmd, dst], capture_output=True, timeout=wait_s + 10).returncode == 0


def _wait_path_up(netns: str, dst: str, timeout: float) -> float:
    """Ping until the first answer; returns how long it took."""
    t0 = time.monotonic()
    while not _ping_once(netns, dst):
        if time.monotonic() - t0 > timeout:
            raise click.ClickException(f"{dst} does not answer from {netns} within {timeout:.0f} s")
    return time.monotonic() - t0


def measure_path(tb: Any, seconds: float, pings: int, progress: Progress) -> dict[str, Any]:
    """RTT (median) then TCP throughput, first site's first host -> its tenant's first host."""
    from protego.testbed.traffic import iperf3

    site = tb.topology.sites[0]
    tenant = tb.topology.tenant(site.tenant)
    site_ns, ten_ns = tb.ns(f"s-{site.name}-h1"), tb.ns(f"t-{tenant.name}-h1")
    dst = str(tenant.hosts[0])
    first = _wait_path_up(site_ns, dst, 30)
    rtt_samples(site_ns, dst, 10, 0.05)  # warm-up: neighbours resolved, caches hot
    progress(f"{tb.state.mode}: {pings} pings {site.name} -> {tenant.name} (10 ms apart)")
    rtts, sent = rtt_samples(site_ns, dst, pings)
    progress(f"{tb.state.mode}: iperf3 TCP {site.name} -> {tenant.name}, {seconds:g} s")
    ip = iperf3(ten_ns, dst, site_ns, seconds=seconds)
    return {
        "mode": tb.state.mode, "site": site.name, "tenant": tenant.name,
        "gbps": ip.receiver_bps / 1e9, "sender_gbps": round(ip.sender_bps / 1e9, 4),
        "retransmits": ip.retransmits,
        "rtt_ms": _median(rtts), "rtt_min_ms": min(rtts) if rtts else None,
        "rtt_p90_ms": sorted(rtts)[int(len(rtts) * 0.9)] if rtts else None,
        "pings_sent": sent, "pings_answered": len(rtts), "first_ping_s": round(first, 3),
    }


def _proc_rss(tb: Any, node: str, kinds: tuple[str, ...]) -> dict[str, float | None]:
    from protego.testbed import procs

    out: dict[str, float | None] = {}
    for rec in tb.state.procs:
        if rec.node == node and rec.kind in kinds and procs.is_alive(rec):
            out[rec.kind] = rss_mb(rec.pid)
    return out


def gmn_leader(tb: Any) -> str:
    from protego.gmn.agent import LEADER_KEY

    with tb.etcd() as store:
        kv = store.get(LEADER_KEY)
    if kv is None:
        raise click.ClickException("no GMN leader in etcd")
    return str(kv.json()["node"])


def gmn_rss(tb: Any) -> dict[str, Any]:
    node = gmn_leader(tb)
    got = _proc_rss(tb, node, ("charon", "gmn-agent"))
    charon, agent = got.get("charon"), got.get("gmn-agent")
    agent_rec = next((r for r in tb.state.procs if r.node == node and r.kind == "gmn-agent"), None)
    relay = relay_rss_mb(agent_rec.pid) if agent_rec is not None else None
    from protego.testbed import testbed as tbmod
    from protego.vici_client import ViciClient

    with ViciClient(tbmod.gmn_paths(tb, node)[1]) as v:
        loaded = len(v.get_conns())
        ike_sas = len(v.raw_sas())
    total = (charon or 0.0) + (agent or 0.0) + (relay or 0.0) if charon is not None and agent is not None else None
    return {"node": node, "charon_mb": _round(charon, 1), "agent_mb": _round(agent, 1),
            "relay_mb": _round(relay, 1), "total_mb": _round(total, 1), "tunnels": loaded, "ike_sas": ike_sas}


def relay_rss_mb(agent_pid: int) -> float | None:
    """RSS of the GMN agent's HA relay process (its child), if it runs."""
    from protego.testbed import procs

    for pid in procs.children(agent_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"protego.gmn.ha_service" in f.read():
                    return rss_mb(pid)
        except OSError:
            continue
    return None


def _site_bulk_conn(site: Any, tenant: Any, name: str, rid: str, prefix: str) -> dict[str, Any]:
    """The site side of a bulk tunnel, as strongswan.site_swanctl_conf writes the site's own
    connection (same proposals, encapsulation, DPD), but ``start_action = none``."""
    return {
        "version": "2", "local_addrs": [str(site.public)], "remote_addrs": [str(tenant.vip)],
        "proposals": [site.ike_proposal], "encap": "yes", "dpd_delay": "5s", "rekey_time": "4h",
        "local-1": {"auth": "psk", "id": rid},
        "remote-1": {"auth": "psk", "id": str(tenant.vip)},
        "children": {name: {"local_ts": [prefix], "remote_ts": [str(tenant.network)],
                            "esp_proposals": [site.esp_proposal], "start_action": "none",
                            "dpd_action": "restart", "rekey_time": "1h"}},
    }


def _cli(tb: Any, args: list[str], stdin: bytes | None = None) -> tuple[float, float, str]:
    """One protego CLI process against the testbed's etcd: (seconds, its CPU seconds, error or '')."""
    t = time.monotonic()
    p = subprocess.Popen(
        [sys.executable, "-m", "protego", "--etcd", ",".join(tb.state.etcd_endpoints), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert p.stdin is not None and p.stdout is not None and p.stderr is not None
    killer = threading.Timer(120, p.kill)  # a hung CLI must not hang the benchmark
    killer.start()
    try:
        if stdin:
            p.stdin.write(stdin)
        p.stdin.close()
        p.stdout.read()
        err_text = p.stderr.read()  # a few lines at most: no pipe can fill up
    finally:
        p.stdout.close()
        p.stderr.close()
        # wait4, not wait: the child's own CPU time, for the accounting of where the time goes
        _pid, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        killer.cancel()
    rc = p.returncode
    err = "" if rc == 0 else (err_text.decode(errors="replace").strip() or f"exit {rc}")
    return time.monotonic() - t, usage.ru_utime + usage.ru_stime, err


def _cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    if pid is None:
        return None
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tck = os.sysconf("SC_CLK_TCK")
    return (sum(vals) - vals[3] - vals[4]) / tck, sum(vals) / tck


class CpuMeter:
    """CPU seconds used between ``start`` and ``stop`` by each of a testbed's processes
    (and its etcd), by this process's children, and by the whole machine."""

    def __init__(self, tb: Any) -> None:
        self.pids: dict[str, int | None] = {f"{r.node}.{r.kind}": r.pid for r in tb.state.procs}
        cluster = tb.etcd_cluster()
        for i, pid in enumerate(cluster.pids if cluster else []):
            self.pids[f"etcd{i}"] = pid
        self.t0: dict[str, float | None] = {}
        self.m0 = (0.0, 0.0)
        self.c0 = 0.0

    def start(self) -> None:
        self.t0 = {k: _cpu_s(p) for k, p in self.pids.items()}
        self.m0 = _machine_cpu()
        t = os.times()
        self.c0 = t.children_user + t.children_system

    def stop(self) -> dict[str, Any]:
        m1 = _machine_cpu()
        t = os.times()
        procs_: dict[str, float] = {}
        for k, pid in self.pids.items():
            a, b = self.t0.get(k), _cpu_s(pid)
            if a is not None and b is not None and b - a >= 0.005:
                procs_[k] = round(b - a, 2)
        busy, total = m1[0] - self.m0[0], m1[1] - self.m0[1]
        return {
            "machine_busy": round(busy, 1), "machine_total": round(total, 1),
            "bench_children": round(t.children_user + t.children_system - self.c0, 2),
            "testbed_processes": dict(sorted(procs_.items(), key=lambda kv: -kv[1])),
        }


def _child_installed(v: Any, name: str) -> str | None:
    """The state of conn ``name``'s IKE_SA at the site: 'up' (CHILD_SA installed),
    'connecting', or None."""
    for sa in v.list_sas(name):
        if sa.get("child_state") == "INSTALLED":
            return "up"
        if sa.get("ike_state") in ("CONNECTING", "ESTABLISHED"):
            return "connecting"
    return None


def bulk_setup(tb: Any, count: int, parallel: int, timeout: float, progress: Progress,
               cli_mode: str = "load") -> dict[str, Any]:
    """Create ``count`` tunnels through the CLI, initiate them from the first site, and time
    until every one has carried a ping (see the module's docstring). ``cli_mode``:
    ``load`` (one ``protego tunnel load -`` with every tunnel) or ``add`` (one
    ``protego tunnel add`` per tunnel, ``parallel`` at a time)."""
    import vici

    site = tb.topology.sites[0]
    tenant = tb.topology.tenant(site.tenant)
    node = f"s-{site.name}"
    sns = tb.ns(node)
    dst = str(tenant.hosts[0])
    names = [f"bulk{i}" for i in range(count)]
    prefixes = {n: bulk_prefix(i) for i, n in enumerate(names)}
    rids = {n: f"{n}.{site.name}.example" for n in names}
    psks = {n: secrets.token_hex(32).encode() for n in names}  # in memory only: VICI and stdin

    progress(f"setup: loading {count} connections into the site gateway {node} (not timed)")
    with tb.vici(node) as v:
        for n in names:
            v.load_psk(f"psk-{n}", psks[n], [rids[n], str(tenant.vip)])
            v.load_conn(n, _site_bulk_conn(site, tenant, n, rids[n], str(prefixes[n])))
    batch = "".join(f"address replace {prefixes[n][1]}/32 dev lo\n" for n in names)
    subprocess.run(["ip", "-n", sns, "-batch", "-"], input=batch, text=True, check=True, capture_output=True)

    # one CLI call alone (a scratch tunnel, removed again), for reference
    probe_psk = secrets.token_hex(32).encode()
    cli_single, cli_single_cpu, err = _cli(
        tb, ["tunnel", "add", f"{tenant.name}/bulkprobe", "--remote-addrs", str(site.public),
             "--remote-id", f"bulkprobe.{site.name}.example", "--remote-ts", PROBE_PREFIX, "--psk-file", "-"],
        probe_psk)
    if err:
        raise click.ClickException(f"protego tunnel add failed: {err}")
    _, _, err = _cli(tb, ["tunnel", "remove", f"{tenant.name}/bulkprobe"])
    if err:
        raise click.ClickException(f"protego tunnel remove failed: {err}")
    time.sleep(1.0)  # let the GMN unload it before the clock starts

    rec: dict[str, dict[str, Any]] = {n: {"attempts": 0} for n in names}
    errors: dict[str, str] = {}
    ready: queue.Queue[str | None] = queue.Queue()
    lock = threading.Lock()
    passed: set[str] = set()
    all_passed = threading.Event()
    stop = threading.Event()

    def add(n: str) -> None:
        rec[n]["cli_start"] = time.time()
        dur, cpu, e = _cli(tb, ["tunnel", "add", f"{tenant.name}/{n}", "--remote-addrs", str(site.public),
                           "--remote-id", rids[n], "--remote-ts", str(prefixes[n]), "--psk-file", "-"], psks[n])
        rec[n]["cli_end"] = time.time()
        rec[n]["cli_s"] = dur
        rec[n]["cli_cpu_s"] = cpu
        if e:
            errors[n] = f"tunnel add: {e}"
            return
        ready.put(n)

    def bring_up(v: Any, n: str, deadline: float) -> None:
        src = str(prefixes[n][1])
        while time.monotonic() < deadline and not stop.is_set():
            state = _child_installed(v, n)
            if state is None:
                rec[n]["attempts"] += 1
                rec[n].setdefault("init_start", time.time())
                rec[n]["last_init_start"] = time.time()
                try:
                    for _ in v.session.initiate({"child": n, "timeout": str(INITIATE_TIMEOUT_MS),
                                                 "loglevel": "-1"}):
                        pass
                    state = "up"
                except vici.exception.CommandException as exc:
                    rec[n]["last_error"] = str(exc)[:200]
                    time.sleep(RETRY_BACKOFF_S)
                    continue
            if state == "connecting":
                time.sleep(0.1)
                continue
            rec[n].setdefault("child_up", time.time())
            break
        while time.monotonic() < deadline and not stop.is_set():
            if _ping_once(sns, dst, src):
                rec[n]["passed"] = time.time()
                with lock:
                    passed.add(n)
                    if len(passed) == count:
                        all_passed.set()
                return

    def initiator(deadline: float) -> None:
        from protego.vici_client import ViciClient

        with ViciClient(tb.charon_files(node).vici_socket, timeout=INITIATE_TIMEOUT_MS / 1000 + 5) as v:
            while True:
                n = ready.get()
                if n is None:
                    return
                try:
                    bring_up(v, n, deadline)
                except (OSError, vici.exception.SessionException) as exc:  # pragma: no cover - reported
                    errors[n] = f"initiate: {exc}"
                    v.close()

    progress(f"setup: clock starts; {count} tunnels through " + (
        "one `protego tunnel load -`" if cli_mode == "load" else f"`protego tunnel add` ({parallel} at a time)")
        + ", each initiated from the site when added")
    meter = CpuMeter(tb)
    meter.start()
    t0, w0 = time.monotonic(), time.time()
    deadline = t0 + timeout
    workers = [threading.Thread(target=initiator, args=(deadline,), name=f"init{k}", daemon=True)
               for k in range(parallel)]
    for w in workers:
        w.start()
    if cli_mode == "load":
        lines = b"".join(json.dumps({
            "tenant": tenant.name, "name": n, "remote_addrs": str(site.public), "remote_id": rids[n],
            "remote_ts": [str(prefixes[n])], "psk": psks[n].decode()}).encode() + b"\n" for n in names)
        start = time.time()
        dur, cpu, e = _cli(tb, ["tunnel", "load", "-"], lines)
        end = time.time()
        for n in names:
            rec[n].update({"cli_start": start, "cli_end": end, "cli_s": dur, "cli_cpu_s": cpu / count})
            if e:
                errors[n] = f"tunnel load: {e}"
            else:
                ready.put(n)
    else:
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(add, names))
    t_cli = time.monotonic() - t0
    progress(f"setup: all CLI calls returned after {t_cli:.1f} s ({len(errors)} failed)")
    last_report = time.monotonic()
    while not all_passed.wait(0.2):
        if time.monotonic() > deadline or len(passed) + len(errors) >= count:
            break
        if time.monotonic() - last_report > 5:
            progress(f"setup: {len(passed)}/{count} passing traffic after {time.monotonic() - t0:.0f} s")
            last_report = time.monotonic()
    elapsed = time.monotonic() - t0
    cpu_acct = meter.stop()
    cpu_acct["cli"] = round(sum(r.get("cli_cpu_s", 0.0) for r in rec.values()), 2)
    stop.set()
    for _ in workers:
        ready.put(None)
    for w in workers:
        w.join(INITIATE_TIMEOUT_MS / 1000 + 15)
    done = len(passed) == count
    progress(f"setup: {len(passed)}/{count} tunnels passed traffic"
             + (f" after {elapsed:.1f} s" if done else f" (gave up after {elapsed:.0f} s)"))

    # did each ping go through its own CHILD_SA? (the site's counters per bulk connection)
    with tb.vici(node) as v:
        via_sa = sum(1 for sa in v.list_sas() if sa["ike"] in rec and (sa.get("bytes_out") or 0) > 0
                     and (sa.get("bytes_in") or 0) > 0)

    # where the time went: our timestamps and the GMN agent's log
    leader = gmn_leader(tb)
    try:
        agent_log = (tb.state.logs / f"{leader}.gmn-agent.log").read_text(errors="replace")
    except OSError:
        agent_log = ""
    steps = parse_agent_log(agent_log, tenant.name)
    warnings = sum(1 for line in agent_log.splitlines()
                   if "not acknowledged" in line and "/bulk" in line)

    def span(a: float | None, b: float | None) -> float | None:
        return b - a if a is not None and b is not None else None

    phases: dict[str, list[float]] = {k: [] for k in (
        "cli", "gmn_load", "initiate_wait", "ike_and_sa_install", "data_path", "total")}
    for n, r in rec.items():
        g = steps.get(n, {})
        for key, val in (("cli", r.get("cli_s")),
                         ("gmn_load", span(r.get("cli_end"), g.get("loaded"))),
                         ("initiate_wait", span(_later(r.get("cli_end"), g.get("loaded")),
                                                r.get("last_init_start"))),
                         ("ike_and_sa_install", span(r.get("last_init_start"), r.get("child_up"))),
                         ("data_path", span(r.get("child_up"), r.get("passed"))),
                         ("total", span(r.get("cli_start"), r.get("passed")))):
            if val is not None:
                phases[key].append(max(0.0, val))
    place = [span(g.get("ike-up"), g.get("out")) for n, g in steps.items() if n in rec]
    phases["gmn_sa_placement"] = [p for p in place if p is not None]

    def last(vals: list[float | None]) -> float | None:
        got = [v for v in vals if v is not None]
        return round(max(got) - w0, 2) if got and len(got) == count else None

    milestones = {
        "cli_all_returned": round(t_cli, 2),
        "gmn_all_loaded": last([steps.get(n, {}).get("loaded") for n in names]),
        "site_all_child_up": last([r.get("child_up") for r in rec.values()]),
        "gmn_all_child_up": last([steps.get(n, {}).get("child-up") for n in names]),
        "all_passed": round(elapsed, 2) if done else None,
    }
    return {
        "tunnels": count, "passed": len(passed), "setup_s": elapsed if done else None,
        "elapsed_s": round(elapsed, 2), "parallel": parallel, "cli_mode": cli_mode, "cli_single_s": round(cli_single, 3),
        "cli_single_cpu_s": round(cli_single_cpu, 3), "cpu_s": cpu_acct,
        "passed_via_own_sa": via_sa,
        "initiate_attempts": sum(r["attempts"] for r in rec.values()),
        "not_acknowledged_warnings": warnings,
        "milestones_s": milestones,
        "phases": {k: _spread(v) for k, v in phases.items()},
        "errors": dict(sorted(errors.items())[:10]), "error_count": len(errors),
        "not_passed": sorted(set(names) - passed)[:20],
    }


def run_mode(mode: str, seconds: float, pings: int, progress: Progress,
             then: Callable[[Any], dict[str, Any]] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bring the default topology up in ``mode``, measure, run ``then(tb)``, always take it down."""
    from protego.testbed import testbed as tbmod
    from protego.testbed.topology import load_topology

    name = "b" + secrets.token_hex(3)

    def sub(msg: str) -> None:
        progress(f"{mode} testbed {name}: {msg}")

    tb = tbmod.up(load_topology(None), name=name, mode=mode, progress=sub)  # type: ignore[arg-type]
    try:
        tbmod.wait_for_tunnels(tb, 60)
        path = measure_path(tb, seconds, pings, progress)
        if mode == "baseline":
            gw = f"bg-{path['tenant']}"
            path["gateway_rss_mb"] = _round(_proc_rss(tb, gw, ("charon",)).get("charon"), 1)
        extra = then(tb) if then else {}
        return path, extra
    finally:
        progress(f"taking testbed {name} down")
        tbmod.down(name)


def run_e2e(seconds: float, pings: int, tunnels: int, parallel: int, setup_timeout: float,
            progress: Progress, cli_mode: str = "load") -> dict[str, Any]:
    from protego.testbed.state import list_testbeds

    t0 = time.monotonic()
    others = sorted(list_testbeds())
    load0 = os.getloadavg()[0]
    baseline, _ = run_mode("baseline", seconds, pings, progress)

    def after(tb: Any) -> dict[str, Any]:
        setup = bulk_setup(tb, tunnels, parallel, setup_timeout, progress, cli_mode=cli_mode)
        time.sleep(1.0)
        return {"setup": setup, "rss": gmn_rss(tb)}

    protego, extra = run_mode("protego", seconds, pings, progress, then=after)
    res = summarize(baseline, protego, extra.get("setup"), extra.get("rss"))
    res["run"] = {"seconds": seconds, "pings": pings, "wall_s": round(time.monotonic() - t0, 1),
                  "other_testbeds_at_start": others, "loadavg_1min_at_start": round(load0, 2),
                  "cpus": os.cpu_count()}
    return res


@click.command("e2e")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--seconds", type=click.FloatRange(1, 120), default=5.0, show_default=True,
              help="iperf3 duration in each mode.")
@click.option("--pings", type=click.IntRange(20, 5000), default=200, show_default=True,
              help="Echo requests (10 ms apart) for the median RTT in each mode.")
@click.option("--tunnels", type=click.IntRange(1, 1000), default=100, show_default=True,
              help="Tunnels created for the setup time (the target is for 100).")
@click.option("--parallel", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Site initiators at once (and concurrent `protego tunnel add` processes with --cli add).")
@click.option("--setup-timeout", type=click.FloatRange(10, 3600), default=180.0, show_default=True,
              help="Give up waiting for the tunnels after this many seconds.")
@click.option("--cli", "cli_mode", type=click.Choice(["load", "add"]), default="add", show_default=True,
              help="Create the tunnels with one `protego tunnel load` or one `protego tunnel add` each.")
def bench_e2e(as_json: bool, seconds: float, pings: int, tunnels: int, parallel: int,
              setup_timeout: float, cli_mode: str) -> None:
    """End to end: throughput and RTT vs the baseline, setup of 100 tunnels, GMN memory."""
    from protego.errors import ProtegoError

    if os.geteuid() != 0:
        raise click.ClickException("needs root (network namespaces, charon, etcd)")

    def progress(msg: str) -> None:
        click.echo(f"[bench e2e] {msg}", err=True)

    try:
        res = run_e2e(seconds, pings, tunnels, parallel, setup_timeout, progress, cli_mode=cli_mode)
    except ProtegoError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(format_table(res))
