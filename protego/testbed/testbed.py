"""Bring a testbed up, inspect it, and take it down again.

``up`` journals every namespace, host link and process before creating it
(:mod:`protego.testbed.state`), so ``down`` removes exactly that, also after a
crash, and a failure half-way through ``up`` rolls everything back.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protego.errors import PeerError, ProtegoError, TestbedError
from protego.store.server import EtcdCluster
from protego.testbed import netns, preflight, procs
from protego.testbed.plan import (
    MGMT_SUPERNET,
    Mode,
    Plan,
    build_plan,
    describe_backends,
    gpn_backends,
    mgmt_subnet,
)
from protego.testbed.state import FAILED_ROOT, STATE_ROOT, TestbedState, list_testbeds, used_mgmt_indices
from protego.testbed.strongswan import (
    SITE_ESP_ENV,
    SITE_ESP_LABELS,
    CharonFiles,
    SiteEsp,
    baseline_swanctl_conf,
    choose_site_esp,
    site_swanctl_conf,
    strongswan_conf,
)
from protego.testbed.topology import DEFAULT_TIMINGS, TESTBED_NAME_RE, Timings, Topology, load_topology_source
from protego.vici_client import ViciClient

if TYPE_CHECKING:
    from protego.xfrm import EspProbeResult

log = logging.getLogger(__name__)

CHARON = "/usr/lib/ipsec/charon"
KERNEL_PROTEGO_SO = "/usr/lib/ipsec/plugins/libstrongswan-kernel-protego.so"
SWANCTL = "/usr/sbin/swanctl"
TESTBED_ETCD_PREFIX = "/protego-testbed/"
# The defaults of a topology's [timings] (topology.Timings); a testbed uses its topology's.
GMN_LEASE_TTL = DEFAULT_TIMINGS.gmn_lease_ttl  # s: a GMN cut off from etcd is replaced after this
HB_INTERVAL_MS = DEFAULT_TIMINGS.hb_interval_ms  # every GPN probed (or tag-answered) this often
# etcd shares this host's CPUs with every role here; in the round-robin real-time class it
# answers the GMN's mirror writes without waiting behind the agents and the engines
# (docs/gmn-ha.md, "Replication latency"). Below the HA relays' 10.
ETCD_RT_PRIORITY = 5
# The GMNs' agents and charons in the same class, below etcd: a migration or a recovery
# from a dead GPN is a chain of their round trips (charon, the agent, etcd), and here the
# data path and the load saturate both CPUs. Measured (docs/bench.md): the GMN's own path
# of a migration 48.3 -> 24.9 ms median (a stamp later found early, still a gain). The
# price: at the request these processes take both CPUs from the data path (a migration's
# throughput dip; PROTEGO_TESTBED_CPUS=split avoids it). Raising the GIN/GEN agent and the
# GPN agents as well made the failover outage worse (166 against 132 ms): they preempted
# the data path they share the CPUs with.
CONTROL_RT_PRIORITY = 4


def copy_logs(tb: "Testbed", dest: str | os.PathLike[str]) -> Path:
    """Copy a testbed's logs (agents, charons, etcd) to ``dest`` (created), e.g. before a
    benchmark takes its testbed down."""
    out = Path(dest)
    shutil.copytree(tb.state.logs, out, dirs_exist_ok=True)
    return out


def rt_permitted() -> bool:
    """Whether this host lets us start processes in the real-time class (not in every
    container: CAP_SYS_NICE, and a cgroup with real-time budget). ``PROTEGO_TESTBED_RT=0``
    in the environment keeps everything in the normal class (for comparisons)."""
    if os.environ.get("PROTEGO_TESTBED_RT", "1") == "0":
        return False
    try:
        return subprocess.run(["chrt", "--rr", "1", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False

def cpu_split() -> dict[str, list[int]] | None:
    """``PROTEGO_TESTBED_CPUS=split``: the control plane (etcd, the agents, the GMNs'
    charons) on the first half of the CPUs this process may use, the data path (the GPN
    workers, the sites' gateways, and a benchmark's load and probe) on the other half,
    as separate machines would have them. None (everything shares every CPU, the
    default) otherwise, or with fewer than 2 CPUs. Anything else is refused."""
    mode = os.environ.get("PROTEGO_TESTBED_CPUS", "shared")
    if mode not in ("shared", "split"):
        raise TestbedError(f"PROTEGO_TESTBED_CPUS={mode!r}: expected 'shared' or 'split'")
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "shared" or len(cpus) < 2:
        return None
    half = len(cpus) // 2
    return {"control": cpus[:half], "data": cpus[half:]}


def cpu_list(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def cpus_prefix(tb: "Testbed", part: str) -> list[str]:
    """The command prefix that keeps a process (and its children) on the testbed's
    ``part`` ("control" or "data") CPUs; empty when the testbed does not split them."""
    split = tb.state.extra.get("cpus")
    return ["taskset", "-c", cpu_list(split[part])] if split else []


def pin_tasks(pid: int, cpus: list[int]) -> None:
    """Every thread of a running process to ``cpus`` (threads it starts later inherit)."""
    for _round in range(2):  # a thread started while the first round ran
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            return
        for tid in tids:
            try:
                os.sched_setaffinity(tid, set(cpus))
            except OSError:
                pass


Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def check_name(name: str) -> None:
    if not TESTBED_NAME_RE.match(name):
        raise TestbedError(
            f"bad testbed name {name!r}: 1-8 characters, a-z and 0-9, starting with a letter"
        )


def _host_mgmt_indices_in_use() -> set[int]:
    """Indices whose 198.19.K.0/24 already has an address on the host (not ours to take)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    used = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            addr = ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).ip
            if addr in MGMT_SUPERNET:
                used.add(int(str(addr).split(".")[2]))
    return used


def _pick_mgmt_index() -> int:
    taken = used_mgmt_indices() | _host_mgmt_indices_in_use()
    for k in range(1, 255):
        if k not in taken:
            return k
    raise TestbedError("no free management subnet in 198.19.0.0/16 (too many testbeds?)")


@dataclass
class Testbed:
    """A running (or partly created) testbed: its plan, topology and state record."""

    __test__ = False

    state: TestbedState
    topology: Topology
    plan: Plan

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def timings(self) -> Timings:
        return self.topology.timings

    @property
    def site_esp(self) -> SiteEsp:
        """The ESP of the sites' and baseline gateways' charons (chosen at ``up``)."""
        return self.state.extra.get("site_esp", "libipsec")  # type: ignore[no-any-return]

    @property
    def gpn_backends(self) -> dict[str, str]:
        """Each GPN's data-path backend as ``up`` started it (protego mode)."""
        return dict(self.state.extra.get("gpn_backends", {}))

    def ns(self, node: str) -> str:
        return self.plan.ns(node)

    def charon_files(self, node: str) -> CharonFiles:
        return CharonFiles(self.state.node_dir(node))

    def vici(self, node: str) -> ViciClient:
        return ViciClient(self.charon_files(node).vici_socket)

    def etcd_cluster(self) -> EtcdCluster | None:
        raw = self.state.extra.get("etcd")
        return EtcdCluster.from_state(raw) if raw else None

    def etcd(self) -> Any:
        from protego.store.etcd import Etcd

        return Etcd(self.state.etcd_endpoints)

    @classmethod
    def open(cls, name: str) -> "Testbed":
        state = TestbedState.load(name)
        topo = load_topology_source(state.topology_source)
        plan = build_plan(topo, name, state.mode, state.mgmt_index)  # type: ignore[arg-type]
        return cls(state, topo, plan)


# ----------------------------------------------------------------------------
# up


def up(
    topology: Topology,
    name: str = "pt",
    mode: Mode = "protego",
    progress: Progress = _quiet,
    wait_tunnels: float | None = None,
    keep_on_failure: bool = False,
    backend: str | None = None,
) -> Testbed:
    """Create testbed ``name``. A failure half-way rolls everything back, keeps the logs
    in ``FAILED_ROOT/<name>-<time>/`` (named in the error) and shows the last lines of
    every process that died; ``keep_on_failure`` leaves the failed testbed up instead
    (phase ``failed``, for inspection; ``down`` removes it).

    ``backend``: every GPN's data path (``userspace``, ``xfrm``, ``auto``); default:
    the topology's ``[testbed].gpn_backends``, else ``userspace``. The sites' and
    baseline gateways' charons use the kernel's ESP (kernel-netlink) when it has ESP,
    else kernel-libipsec (``PROTEGO_TESTBED_SITE_ESP`` decides instead when set).
    ``wait_tunnels``: seconds for every site's tunnel in baseline mode (default: the
    topology's ``tunnel_wait_s``; 0: do not wait)."""
    check_name(name)
    if name in list_testbeds():
        raise TestbedError(f"testbed '{name}' already exists; take it down first (protego testbed down --name {name})")
    clash = sorted(n for n in netns.list_netns() if n.startswith(f"{name}-"))
    if clash:
        raise TestbedError(f"network namespaces {', '.join(clash[:3])} already exist; pick another name")
    backends = gpn_backends(topology, backend) if mode == "protego" else {}
    probed: list["EspProbeResult"] = []

    def esp_probe() -> "EspProbeResult":  # the kernel is asked once per up
        if not probed:
            probed.append(preflight.probe_esp())
        return probed[0]

    override = os.environ.get(SITE_ESP_ENV)
    site_esp = choose_site_esp(override, lambda: esp_probe().kernel_esp)
    if (override or "auto").strip() != "auto":
        esp_reason = f"{SITE_ESP_ENV}={override}"
    else:
        esp_reason = "the kernel has ESP" if site_esp == "kernel" else "the kernel has no ESP"
    preflight.check(need_tun=site_esp == "libipsec",
                    extra=preflight.kernel_features(site_esp, backends.values()), esp_probe=esp_probe)
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(STATE_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # testbeds coming up side by side pick distinct subnets
        if name in list_testbeds():
            raise TestbedError(f"testbed '{name}' already exists; take it down first")
        index = _pick_mgmt_index()
        plan = build_plan(topology, name, mode, index)
        state = TestbedState(
            name=name, mode=mode, topology_source=topology.source, mgmt_index=index, created=time.time()
        )
        state.extra["site_esp"] = site_esp
        state.extra["site_esp_reason"] = esp_reason
        state.extra["gpn_backends"] = backends
        if netns.host_link_exists(plan.host_ifname):
            raise TestbedError(f"host interface {plan.host_ifname} already exists; pick another name")
        state.root.mkdir(parents=True, exist_ok=True)
        state.logs.mkdir(parents=True, exist_ok=True)
        state.save()
    tb = Testbed(state, topology, plan)
    try:
        _up(tb, progress, topology.timings.tunnel_wait_s if wait_tunnels is None else wait_tunnels)
    except BaseException as exc:
        detail = _failure_detail(tb)
        if keep_on_failure:
            state.phase = "failed"
            state.save()
            progress(f"failed: {exc}; the testbed stays up for inspection (logs in {state.logs}); "
                     f"remove it with: protego testbed down --name {name}")
            if isinstance(exc, ProtegoError):
                raise TestbedError(f"testbed up failed (kept for inspection, logs in {state.logs}): "
                                   f"{exc}{detail}") from exc
            raise
        progress(f"failed: {exc}; rolling back")
        kept = FAILED_ROOT / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            down(name, progress=_quiet, keep_logs=kept)
        except ProtegoError as cleanup_exc:  # pragma: no cover - reported, not hidden
            log.error("rollback of testbed %s failed: %s", name, cleanup_exc)
        if isinstance(exc, ProtegoError):
            # the paths the error names moved with the logs
            msg = str(exc).replace(str(state.logs), str(kept))
            raise TestbedError(f"testbed up failed and was rolled back: {msg}{detail}\n"
                               f"  logs kept in {kept}/") from exc
        raise
    return tb


def _failure_detail(tb: Testbed, lines: int = 8) -> str:
    """The last lines of the logs of processes that died, for the error message."""
    out = []
    for rec in tb.state.procs:
        if not procs.is_alive(rec):
            try:
                tail = [t for t in Path(rec.log).read_text(errors="replace").splitlines() if t.strip()][-lines:]
            except OSError:
                tail = []
            out.append(f"\n  {rec.kind} on {rec.node} exited; last lines of {Path(rec.log).name}:")
            out += [f"\n    {t}" for t in tail] or ["\n    (empty)"]
    return "".join(out)


def _up(tb: Testbed, progress: Progress, wait_tunnels: float) -> None:
    st, plan, topo = tb.state, tb.plan, tb.topology

    def journal_ns(ns: str) -> None:
        st.namespaces.append(ns)
        st.save()

    def journal_link(ifname: str) -> None:
        st.host_links.append(ifname)
        st.save()

    t0 = time.monotonic()
    progress(f"creating {len(plan.namespaces)} network namespaces ({plan.mode} mode; strongSwan peers on "
             f"{SITE_ESP_LABELS[tb.site_esp]}: {st.extra.get('site_esp_reason', '')})")
    netns.apply_plan(plan, journal_ns, journal_link)

    progress(f"starting etcd ({topo.etcd_members} member{'s' if topo.etcd_members > 1 else ''})")
    def journal_etcd(state: dict[str, Any]) -> None:
        st.extra["etcd"] = state
        st.save()

    rt = ETCD_RT_PRIORITY if rt_permitted() else 0
    st.extra["control_rt"] = bool(rt)
    split = cpu_split()
    st.extra["cpus"] = split
    if split:
        progress(f"control plane on CPUs {cpu_list(split['control'])}, data path on CPUs {cpu_list(split['data'])}")
    if not rt:
        progress("etcd and the control plane run in the normal scheduling class (the real-time class is "
                 "not permitted here)")
    cluster = EtcdCluster(
        f"{st.name}-etcd", str(st.root / "etcd"), str(st.logs), members=topo.etcd_members,
        client_hosts=plan.etcd_addrs, netns=plan.ns("mgmt"), on_state=journal_etcd, rt_priority=rt,
    )
    journal_etcd(cluster.state())
    cluster.start(wait=True)
    if split:
        for pid in cluster.pids:
            if pid:
                pin_tasks(pid, split["control"])
    st.extra["etcd"] = cluster.state()
    st.etcd_endpoints = list(cluster.endpoints)
    st.save()

    # site PSKs: generated here, kept only in etcd and handed to charons over VICI
    store = tb.etcd()
    try:
        for s in topo.sites:
            store.put(f"{TESTBED_ETCD_PREFIX}{st.name}/sites/{s.name}/psk", secrets.token_urlsafe(32).encode())
        if plan.mode == "baseline":
            progress(f"starting {len(topo.tenants)} baseline gateways (strongSwan, {SITE_ESP_LABELS[tb.site_esp]})")
            _start_charons(tb, [(ch.node, baseline_swanctl_conf(topo, topo.tenant(ch.tenant)),
                                 [s.name for s in topo.sites_of(ch.tenant)]) for ch in plan.charons
                                if ch.kind == "baseline" and ch.tenant is not None], store)
        if plan.mode == "protego":
            # the GPN and GIN/GEN agents start first: they need only etcd, and their start-up
            # overlaps the GMNs' (each start is seconds of imports on a slow machine)
            backends = tb.gpn_backends
            progress(f"starting {topo.gpns} GPN agents ({describe_backends(backends)}) and the GIN/GEN agent")
            for n in tb.plan.namespaces:
                if n.role == "gpn":
                    _start_agent(tb, n.node, "gpn-agent", ["gpn", "run", "--node", n.node,
                                                           "--fabric-addr", fabric_addr(tb, n.node),
                                                           "--seal-key-file", str(gpn_seal_key_file(tb, n.node)),
                                                           "--backend", backends[n.node],
                                                           *canary_args(tb),
                                                           *(["--worker-cpus", cpu_list(split["data"])]
                                                             if split else [])])
            _start_lb(tb)
            progress("starting the GMNs (charon with kernel-protego + protego gmn agent)")
            _start_gmn(tb, "gmn1")
            # gmn1 is the testbed's first active GMN (tests and benchmarks that reach a GMN
            # directly start from it): gmn2 starts once gmn1 leads, and stands by
            _wait_leader(tb, store, "gmn1", tb.timings.daemon_start_s)
            _start_gmn(tb, "gmn2")
            running = _wait_registered(tb, store, [n.node for n in tb.plan.namespaces if n.role == "gpn"],
                                       tb.timings.daemon_start_s)
            if running != backends:  # auto: what each agent chose
                progress(f"GPN agents registered ({describe_backends(running)})")
            progress(f"creating {len(topo.tenants)} tenants and {len(topo.sites)} tunnels with the protego CLI")
            _create_tenants_and_tunnels(tb, store)
        progress(f"starting {len(topo.sites)} site gateways (strongSwan, {SITE_ESP_LABELS[tb.site_esp]})")
        sites = {s.name: s for s in topo.sites}
        _start_charons(tb, [(ch.node, site_swanctl_conf(sites[ch.site], topo.tenant(sites[ch.site].tenant)),
                             [ch.site]) for ch in plan.charons if ch.kind == "site" and ch.site is not None],
                       store)
    finally:
        store.close()

    if plan.mode == "baseline" and wait_tunnels > 0:
        progress("waiting for every site's tunnel")
        wait_for_tunnels(tb, wait_tunnels)
    st.phase = "up"
    st.save()
    progress(f"testbed '{st.name}' is up in {time.monotonic() - t0:.1f} s")


def _start_charons(tb: Testbed, charons: list[tuple[str, str, list[str]]], store: Any) -> None:
    """Start the strongSwan charons ``(node, swanctl.conf text, sites whose PSK it holds)``
    side by side (each takes tens of seconds to start on a slow machine), then configure
    each one as soon as it listens."""
    recs = [_spawn_charon(tb, node, text) for node, text, _sites in charons]
    for (node, _text, sites), rec in zip(charons, recs, strict=True):
        _configure_charon(tb, node, rec, sites, store)


def _spawn_charon(tb: Testbed, node: str, swanctl_text: str) -> procs.ProcRecord:
    st = tb.state
    files = tb.charon_files(node)
    files.conf_dir.mkdir(parents=True, exist_ok=True)
    log_path = st.logs / f"{node}.charon.log"
    files.strongswan_conf.write_text(strongswan_conf(files, log_path, tb.site_esp))
    files.swanctl_conf.write_text(swanctl_text)
    rec = procs.spawn(
        # stdout/stderr (a crash's last words) into the same file as charon's own log
        node, "charon", tb.ns(node), [*cpus_prefix(tb, "data"), CHARON], log_path,
        private_run=True, env={"STRONGSWAN_CONF": str(files.strongswan_conf)},
    )
    st.procs.append(rec)
    st.save()
    return rec


def _configure_charon(tb: Testbed, node: str, rec: procs.ProcRecord, psk_sites: list[str], store: Any) -> None:
    """Wait for a started charon's VICI socket; load its PSKs and connections."""
    st = tb.state
    files = tb.charon_files(node)
    log_path = st.logs / f"{node}.charon.log"
    wait_s = tb.timings.daemon_start_s
    deadline = time.monotonic() + wait_s
    while not files.vici_socket.exists():
        if not procs.is_alive(rec):
            raise TestbedError(f"charon on {node} exited during start-up (see {log_path})")
        if time.monotonic() > deadline:
            raise TestbedError(f"charon on {node} did not open its VICI socket within {wait_s:.0f} s "
                               "([timings].daemon_start_s)")
        time.sleep(0.05)
    # the socket file appears at bind(), a moment before charon listens on it
    v = tb.vici(node)
    while True:
        try:
            v.connect()
            break
        except PeerError:
            if not procs.is_alive(rec):
                raise TestbedError(f"charon on {node} exited during start-up (see {log_path})") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        v.wait_ready(max(10.0, deadline - time.monotonic()))
        # secrets first, so an initiator that starts on load-conns finds its PSK
        for site in psk_sites:
            kv = store.get(f"{TESTBED_ETCD_PREFIX}{st.name}/sites/{site}/psk")
            if kv is None:
                raise TestbedError(f"PSK of site {site} missing from etcd")
            owners = _psk_owners(tb, site)
            v.load_psk(f"psk-{site}", kv.value, owners)
    finally:
        v.close()
    res = subprocess.run(
        [SWANCTL, "--load-conns", "--file", str(files.swanctl_conf), "--uri", files.vici_uri],
        capture_output=True, text=True, timeout=max(30.0, wait_s),
        env={"STRONGSWAN_CONF": str(files.strongswan_conf), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    if res.returncode != 0:
        raise TestbedError(f"swanctl --load-conns on {node} failed: {res.stdout.strip()} {res.stderr.strip()}")


def protego_cli(tb: Testbed, *args: str, stdin: bytes | None = None, timeout: float = 60) -> str:
    """Run the protego CLI against the testbed's etcd, as an operator would."""
    res = subprocess.run(
        [sys.executable, "-m", "protego", "--etcd", ",".join(tb.state.etcd_endpoints), *args],
        input=stdin, capture_output=True, timeout=timeout,
    )
    if res.returncode != 0:
        raise TestbedError(f"protego {' '.join(args[:3])} failed: {res.stderr.decode(errors='replace').strip()}")
    return res.stdout.decode()


def _publish_vnet_directory(tb: Testbed, store: Any) -> None:
    """What the cloud's virtual-network control plane knows: where each tenant host is."""
    for x in tb.plan.vxlans:
        node = next(n for n in tb.plan.namespaces if n.name == x.ns)
        if node.role != "tenant-host":
            continue
        ip = x.addrs[0].split("/")[0]
        store.put_json(f"/protego/v1/vnet/{x.vni}/{ip}", {"mac": x.mac, "vtep": x.local, "tenant": node.tenant})


def protego_cli_many(tb: Testbed, calls: list[tuple[list[str], bytes | None]], timeout: float = 60) -> None:
    """Several protego CLI commands ``(args, stdin)`` against the testbed's etcd, side by
    side (each is a fresh Python process: seconds on a slow machine). Any failure is
    raised once all have finished."""
    running = []
    for args, stdin in calls:
        p = subprocess.Popen([sys.executable, "-m", "protego", "--etcd", ",".join(tb.state.etcd_endpoints), *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        running.append((args, p, stdin))
    errors = []
    for args, p, stdin in running:
        try:
            _out, err = p.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            errors.append(f"protego {' '.join(args[:3])}: no answer within {timeout:.0f} s")
            continue
        if p.returncode != 0:
            errors.append(f"protego {' '.join(args[:3])} failed: {err.decode(errors='replace').strip()}")
    if errors:
        raise TestbedError("; ".join(errors))


def _create_tenants_and_tunnels(tb: Testbed, store: Any) -> None:
    """As an operator would, with the CLI: every tenant at once, then each tenant's tunnels
    (one tenant's tunnels one after another: their selectors are checked against each
    other)."""
    topo = tb.topology
    timeout = max(60.0, tb.timings.daemon_start_s)  # each a fresh Python process
    _publish_vnet_directory(tb, store)
    protego_cli_many(tb, [(["tenant", "add", t.name, "--vni", str(t.vni), "--network", str(t.network),
                            "--vip", str(t.vip)], None) for t in topo.tenants], timeout)
    rounds: list[list[tuple[list[str], bytes | None]]] = []
    for t in topo.tenants:
        for i, s in enumerate(topo.sites_of(t.name)):
            kv = store.get(f"{TESTBED_ETCD_PREFIX}{tb.name}/sites/{s.name}/psk")
            if kv is None:
                raise TestbedError(f"PSK of site {s.name} missing from etcd")
            extra = ["--rekey-time", f"{s.rekey_time}s"] if s.rekey_time else []
            if len(rounds) <= i:
                rounds.append([])
            rounds[i].append((["tunnel", "add", f"{s.tenant}/{s.name}", "--remote-addrs", str(s.public),
                               "--remote-ts", str(s.network), "--ike-proposals", s.ike_proposal,
                               "--esp-proposals", s.esp_proposal, *extra, "--psk-file", "-"], kv.value))
    for calls in rounds:
        protego_cli_many(tb, calls, timeout)


def gmn_paths(tb: Testbed, node: str) -> tuple[Path, Path, Path]:
    """(strongswan.conf, VICI socket, plugin socket) of a GMN's charon."""
    d = tb.state.node_dir(node)
    return d / "strongswan.conf", d / "charon.vici", d / "gmn-plugin.sock"


def fabric_addr(tb: Testbed, node: str) -> str:
    return next(v.addrs_b[0].split("/")[0] for v in tb.plan.veths if v.ns_b == tb.ns(node) and v.name_b == "fab0")


def _control_rt(tb: Testbed) -> list[str]:
    """The command prefix that starts a control-plane process in the real-time class
    (empty where this host does not permit it)."""
    return ["chrt", "--rr", str(CONTROL_RT_PRIORITY)] if tb.state.extra.get("control_rt") else []


def _start_agent(tb: Testbed, node: str, kind: str, args: list[str], root_args: tuple[str, ...] = (),
                 rt: bool = False) -> procs.ProcRecord:
    """A protego agent inside ``node``'s namespace, logging to logs/<node>.<kind>.log;
    ``rt``: the whole process in the control plane's real-time class."""
    st = tb.state
    rec = procs.spawn(
        node, kind, tb.ns(node),
        [*cpus_prefix(tb, "control"), *(_control_rt(tb) if rt else []), sys.executable, "-m", "protego", "-v",
         "--etcd",
         ",".join(st.etcd_endpoints), *root_args, *args],
        st.logs / f"{node}.{kind}.log",
    )
    st.procs.append(rec)
    st.save()
    return rec


def gpn_seal_key_file(tb: Testbed, node: str) -> Path:
    """Where a testbed GPN keeps the key its SA keys are sealed to (in the testbed's
    directory: removed with it)."""
    return tb.state.root / "keys" / f"{node}.key"


def gmn_seal_key_file(tb: Testbed) -> Path:
    """The testbed's GMN key (both GMNs share it, as a deployment's do)."""
    return tb.state.root / "keys" / "gmn.key"


def canary_args(tb: Testbed) -> list[str]:
    """An xfrm GPN's canary at the heartbeat's pace when the topology relaxes it (the
    lane: a stalled guest must not stop the heartbeats); the agent's default otherwise."""
    if tb.timings.hb_interval_ms <= DEFAULT_TIMINGS.hb_interval_ms:
        return []
    return ["--canary-interval-ms", f"{tb.timings.hb_interval_ms:g}", "--canary-misses", str(tb.timings.hb_misses)]


def _start_lb(tb: Testbed) -> None:
    args = ["lb", "run", "--role", "both", "--node", "lb", "--hb-bind", fabric_addr(tb, "lb"),
            "--hb-interval-ms", f"{tb.timings.hb_interval_ms:g}", "--hb-misses", str(tb.timings.hb_misses),
            "--cleanup-on-exit"]
    for e in tb.state.etcd_endpoints:
        args += ["--etcd", e]
    # no --vip: the GIN learns every tenant's VIP from etcd (tenants/<t>)
    _start_agent(tb, "lb", "lb-agent", args)


def poll_interval(timeout: float, floor: float) -> float:
    """How often a wait of ``timeout`` seconds asks an etcd or a charon: ``floor`` for
    this host's waits (up to 300 ``floor``), rarer for the longer waits of a slower
    machine (at most once a second), where every question costs the daemons that are
    still starting CPU."""
    return min(1.0, max(floor, timeout / 300))


def _wait_leader(tb: Testbed, store: Any, node: str, timeout: float) -> None:
    """Wait until ``node`` is the active GMN (``gmn/leader``)."""
    deadline = time.monotonic() + timeout
    interval = poll_interval(timeout, 0.1)
    while True:
        if (store.get_json("/protego/v1/gmn/leader") or {}).get("node") == node:
            return
        for rec in tb.state.procs:
            if rec.node == node and not procs.is_alive(rec):
                raise TestbedError(f"{rec.kind} on {node} exited during start-up (see {rec.log})")
        if time.monotonic() > deadline:
            raise TestbedError(f"{node} did not become the active GMN within {timeout:.0f} s "
                               "([timings].daemon_start_s)")
        time.sleep(interval)


def _wait_registered(tb: Testbed, store: Any, gpns: list[str], timeout: float) -> dict[str, str]:
    """Wait until every GPN agent registered; the backend each registered with."""
    deadline = time.monotonic() + timeout
    interval = poll_interval(timeout, 0.1)
    while True:
        records = {g: store.get_json(f"/protego/v1/gpn/nodes/{g}") for g in gpns}
        missing = [g for g, rec in records.items() if rec is None]
        if not missing:
            return {g: str(rec.get("backend", "?")) for g, rec in records.items()}
        for rec in tb.state.procs:
            if rec.kind in ("gpn-agent", "lb-agent") and not procs.is_alive(rec):
                raise TestbedError(f"{rec.kind} on {rec.node} exited during start-up (see {rec.log})")
        if time.monotonic() > deadline:
            raise TestbedError(f"GPNs {', '.join(missing)} did not register within {timeout:.0f} s "
                               "([timings].daemon_start_s)")
        time.sleep(interval)


def _start_gmn(tb: Testbed, node: str) -> None:
    from protego.gmn.charon_conf import gmn_strongswan_conf

    st = tb.state
    if not Path(KERNEL_PROTEGO_SO).exists():
        raise TestbedError(f"{KERNEL_PROTEGO_SO} is missing: run charon-plugins/build.sh (bootstrap.sh does)")
    conf, vici_sock, plugin_sock = gmn_paths(tb, node)
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(gmn_strongswan_conf(vici_sock, plugin_sock, st.logs / f"{node}.charon.log"))
    agent = _start_agent(tb, node, "gmn-agent", ["gmn", "run", "--node", node, "--vici", str(vici_sock),
                                                  "--plugin-socket", str(plugin_sock),
                                                  "--fabric-addr", fabric_addr(tb, node),
                                                  "--lease-ttl", str(tb.timings.gmn_lease_ttl),
                                                  "--apply-timeout", f"{tb.timings.apply_timeout_s:g}",
                                                  "--seal-key-file", str(gmn_seal_key_file(tb))], rt=True)
    _wait_path(plugin_sock, agent, f"the gmn agent on {node}", tb.timings.daemon_start_s)
    start_gmn_charon(tb, node)


def start_gmn_charon(tb: Testbed, node: str) -> procs.ProcRecord:
    """(Re)start a GMN's charon (e.g. after a failover test killed it); its agent feeds
    it the mirrored IKE SAs and it joins as the standby."""
    st = tb.state
    conf, vici_sock, _plugin_sock = gmn_paths(tb, node)
    old = [r for r in st.procs if r.node == node and r.kind == "charon"]
    for r in old:
        if procs.is_alive(r):
            raise TestbedError(f"charon on {node} is still running (pid {r.pid})")
        st.procs.remove(r)
    if vici_sock.exists():
        vici_sock.unlink()
    charon = procs.spawn(
        node, "charon", tb.ns(node), [*cpus_prefix(tb, "control"), *_control_rt(tb), CHARON],
        st.logs / f"{node}.charon.log",  # charon's own log too (gmn_strongswan_conf)
        private_run=True, env={"STRONGSWAN_CONF": str(conf)},
    )
    st.procs.append(charon)
    st.save()
    _wait_path(vici_sock, charon, f"charon on {node}", tb.timings.daemon_start_s)
    return charon


def _wait_path(path: Path, rec: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not procs.is_alive(rec):
            raise TestbedError(f"{what} exited during start-up (see {rec.log})")
        if time.monotonic() > deadline:
            raise TestbedError(f"{what} did not create {path} within {timeout:.0f} s ([timings].daemon_start_s)")
        time.sleep(0.05)


def _psk_owners(tb: Testbed, site_name: str) -> list[str]:
    site = next(s for s in tb.topology.sites if s.name == site_name)
    return [str(site.public), str(tb.topology.tenant(site.tenant).vip)]


def site_tunnels(tb: Testbed) -> dict[str, dict[str, Any]]:
    """Per site: its IKE and CHILD_SA state as its own charon reports it over VICI."""
    out: dict[str, dict[str, Any]] = {}
    for s in tb.topology.sites:
        node = f"s-{s.name}"
        info: dict[str, Any] = {"ike_state": None, "child_state": None}
        try:
            with tb.vici(node) as v:
                for sa in v.list_sas(s.name):
                    info.update(sa)
        except (OSError, ProtegoError) as exc:
            info["error"] = str(exc)
        out[s.name] = info
    return out


def wait_for_tunnels(tb: Testbed, timeout: float | None = None) -> None:
    """Wait until every site's CHILD_SA is installed (``timeout``: default the
    topology's ``[timings].tunnel_wait_s``)."""
    timeout = tb.timings.tunnel_wait_s if timeout is None else timeout
    deadline = time.monotonic() + timeout
    interval = poll_interval(timeout, 0.2)
    while True:
        tunnels = site_tunnels(tb)
        down_ = [n for n, t in tunnels.items() if t.get("child_state") != "INSTALLED"]
        if not down_:
            return
        for rec in tb.state.procs:
            if rec.kind == "charon" and not procs.is_alive(rec):
                raise TestbedError(f"charon on {rec.node} exited (see {rec.log})")
        if time.monotonic() > deadline:
            raise TestbedError(f"tunnels of sites {', '.join(down_)} not up within {timeout:.0f} s")
        time.sleep(interval)


# ----------------------------------------------------------------------------
# down


def down(name: str, progress: Progress = _quiet, keep_logs: Path | None = None) -> None:
    """Remove exactly what ``up`` created for testbed ``name`` (per its state record);
    ``keep_logs``: move the logs (and the state record) there first, after the
    processes have stopped."""
    check_name(name)
    st = TestbedState.load(name)
    st.phase = "removing"
    st.save()
    errors: list[str] = []
    for rec in reversed(st.procs):
        try:
            if procs.stop(rec):
                progress(f"stopped {rec.kind} on {rec.node} (pid {rec.pid})")
        except OSError as exc:
            errors.append(f"stopping {rec.kind} pid {rec.pid}: {exc}")
    raw = st.extra.get("etcd")
    if raw:
        try:
            EtcdCluster.from_state(raw).destroy()
            progress("stopped etcd")
        except ProtegoError as exc:
            errors.append(f"etcd: {exc}")
    for ns in reversed(st.namespaces):
        try:
            netns.remove_netns(ns)
        except OSError as exc:
            errors.append(f"namespace {ns}: {exc}")
    progress(f"removed {len(st.namespaces)} network namespaces")
    for ifname in st.host_links:
        try:
            netns.remove_host_link(ifname)
        except OSError as exc:
            errors.append(f"host link {ifname}: {exc}")
    if keep_logs is not None and st.logs.exists():
        keep_logs.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(st.logs), str(keep_logs))
        shutil.copy2(st.root / "state.json", keep_logs / "state.json")
        progress(f"logs kept in {keep_logs}")
    if errors:
        st.save()
        raise TestbedError(f"testbed {name} only partly removed: " + "; ".join(errors))
    shutil.rmtree(st.root, ignore_errors=False)
    progress(f"testbed '{name}' removed")


# ----------------------------------------------------------------------------
# status


def _tcp_ok(endpoint: str, timeout: float = 0.5) -> bool:
    host, port = endpoint.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def status(name: str) -> dict[str, Any]:
    tb = Testbed.open(name)
    st = tb.state
    existing = netns.list_netns()
    nodes = []
    for n in tb.plan.namespaces:
        node_procs = [
            {"kind": r.kind, "pid": r.pid, "alive": procs.is_alive(r)} for r in st.procs if r.node == n.node
        ]
        nodes.append({
            "node": n.node, "netns": n.name, "role": n.role, "present": n.name in existing,
            "tenant": n.tenant, "site": n.site, "processes": node_procs,
        })
    cluster = tb.etcd_cluster()
    etcd = {
        "endpoints": st.etcd_endpoints,
        "healthy": [_tcp_ok(e) for e in st.etcd_endpoints],
        "pids": cluster.pids if cluster else [],
    }
    return {
        "name": st.name, "mode": st.mode, "phase": st.phase, "topology": st.topology_source,
        "site_esp": SITE_ESP_LABELS[tb.site_esp], "gpn_backends": tb.gpn_backends,
        "state_dir": str(st.root), "logs": str(st.logs), "mgmt_subnet": str(mgmt_subnet(st.mgmt_index)),
        "etcd": etcd, "nodes": nodes, "tunnels": site_tunnels(tb) if st.phase == "up" else {},
    }
