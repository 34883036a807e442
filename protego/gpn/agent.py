"""The ``protego gpn`` agent: installs exactly the SAs etcd places on this GPN.

One reconcile loop (level-triggered, as the other agents):

* mirrors ``sas/``, ``steer/out/`` and ``vnet/`` (:class:`~protego.store.view.PrefixView`,
  snapshot-and-watch: an etcd restart resumes the watch or re-snapshots);
* desired state = every ``sas/<vip>/<spi>`` record whose ``gpn`` is this node;
  diff against what the engine holds; install / update / remove;
* holds on ``lo`` (label ``lo:pg``, as the GMN agent does) the VIP of every tunnel that
  has an SA on any GPN, so the GIN's policy-routed ESP is delivered here and answers
  leave from the VIP, and taking a tunnel over (a migration, a recovery from a dead
  GPN) never waits for an address to be added;
* gives the workers the egress table (per tunnel: the outbound SA named by
  ``steer/out/<tenant>/<tunnel>`` if it is here, else the newest one here) and the
  VNET host directory;
* registers ``gpn/nodes/<gpn>`` with a lease; every ``report_interval`` seconds
  writes ``sastats/<vip>/<spi>`` and ``gpn/load/<gpn>``.

Outbound sequence numbers are never reused. The rule:

1. an outbound SA is installed only if its record was created *after* this agent
   registered (``create_revision`` > the revision of our registration): an older
   record may have been used by a previous incarnation of this GPN, whose counter
   is gone;
2. an outbound SA that was removed (record gone, moved to another GPN) is never
   installed again during this agent's life (it is "burnt");
3. an update of a record (new endpoints after a NAT change) keeps the counter.

So a restarted GPN carries none of its old outbound SAs: the GMN rekeys the tunnel
(the new SAs are created after the registration). Inbound SAs are reinstalled.

Keys stay in memory and the workers' control pipes; log lines carry tenants,
tunnels and SPIs only.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from protego import sealing
from protego.control.acks import AckSender
from protego.control.model import PREFIX, steer_out_tunnel
from protego.errors import ConfigError, DataplaneError, ProtegoError
from protego.store.etcd import Etcd, Lease, PutOp, encode_json, key_present
from protego.store.refused import RefusedPublisher, RefusedRecords
from protego.store.view import PrefixView
from protego.store.writer import LatestWriter

from .engine import Engine, EngineConfig
from .kernel import KernelDataPath
from .records import GpnSa, parse_sa_record
from .tenant import EgressRoute, HostDirectory

__all__ = ["VIP_LABEL", "GpnAgent", "GpnConfig", "choose_backend", "desired_sas", "egress_routes", "record_vips"]

log = logging.getLogger(__name__)

VIP_LABEL = "lo:pg"
# An outbound SA whose record went (charon deleted it after a rekey) stays installed,
# and keeps the tunnel's route while it is the only outbound SA here, this long: tenant
# frames the GEN sent here before it switched the tunnel elsewhere are still on their
# way (socket buffers, worker queues) and go out encrypted instead of dropped. The peer
# keeps the old inbound SA longer (strongSwan: delete_rekeyed_delay, 5 s). While the
# tunnel's outbound steering (steer/out/) still names the SA, the GIN/GEN still sends
# its traffic here (a migration's switch is written only once the new GPN has the new
# SA, which under load or emulation takes longer than this): the SA stays until the
# steering names another SA and OUTBOUND_LINGER_S more, OUTBOUND_LINGER_MAX_S at most.
OUTBOUND_LINGER_S = 2.0  # a GIN/GEN applies a steering change within ~0.5 s even in the emulated lane
OUTBOUND_LINGER_MAX_S = 10.0


@dataclass(frozen=True)
class GpnConfig:
    node: str
    fabric_addr: str
    backend: str = "auto"  # userspace | xfrm | auto
    workers: int = 0
    lease_ttl: int = 5
    report_interval: float = 2.0
    resync_interval: float = 30.0
    manage_vips: bool = True
    raw_esp: bool = True
    worker_cpus: tuple[int, ...] = ()  # the workers' CPUs (empty: the agent's)
    direct_acks: bool = True  # also tell the GMNs over the fabric (protego/control/acks.py)
    canary_interval: float = 0.1  # xfrm: seconds between ESP canaries (protego/gpn/kernel_health.py)
    canary_misses: int = 3  # xfrm: canaries lost in a row that stop the heartbeats
    # the X25519 key SA keys are sealed to (protego/sealing.py); made on first start
    seal_key_file: str = ""  # default: SEAL_KEY_DIR/gpn-<node>.key


def choose_backend(requested: str, probe: Callable[[], Any] | None = None) -> str:
    """``auto``: the kernel's XFRM when it can do ESP, else the userspace engine."""
    if requested == "userspace":
        log.info("data-path backend: userspace (requested)")
        return "userspace"
    if probe is None:
        from protego.xfrm import probe_kernel_esp

        probe = probe_kernel_esp
    result = probe()
    if requested == "xfrm":
        if not result.kernel_esp:
            raise ConfigError(f"--backend xfrm: the kernel cannot do ESP ({result.message}); "
                              "use --backend userspace (or auto)")
        log.info("data-path backend: xfrm (requested; %s)", result.message)
        return "xfrm"
    if result.kernel_esp:
        log.info("data-path backend: xfrm (%s)", result.message)
        return "xfrm"
    log.info("data-path backend: userspace (the kernel cannot do ESP: %s)", result.message)
    return "userspace"


SEAL_KEY_DIR = "/var/lib/protego/keys"


def desired_sas(records: dict[str, tuple[int, int, Any]], node: str, opener: Any = None,
                ) -> tuple[dict[str, tuple[int, int, GpnSa]], dict[str, str]]:
    """``{key: (create_revision, mod_revision, record)}`` -> the SAs placed on ``node``
    (same shape, parsed) and the invalid ones (``key -> reason``, without keys)."""
    ok: dict[str, tuple[int, int, GpnSa]] = {}
    bad: dict[str, str] = {}
    for key, (crev, mrev, rec) in records.items():
        if not isinstance(rec, dict) or rec.get("gpn") != node:
            continue
        try:
            ok[key] = (crev, mrev, parse_sa_record(rec, key[len(PREFIX):], opener))
        except ConfigError as exc:
            bad[key] = str(exc)
    return ok, bad


def record_vips(keys: Iterable[str]) -> set[str]:
    """The VIPs named by ``sas/<vip>/<spi>`` record keys (well-formed IPv4 addresses only)."""
    out: set[str] = set()
    for key in keys:
        parts = key[len(PREFIX) + len("sas/"):].split("/")
        if len(parts) != 2:
            continue
        try:
            out.add(str(ipaddress.IPv4Address(parts[0])))
        except ValueError:
            continue
    return out


def egress_routes(installed: list[GpnSa], steer: dict[tuple[str, str], str]) -> list[EgressRoute]:
    """One route per tunnel with an outbound SA here: the steered SPI if it is
    here, else the newest outbound SA."""
    by_tunnel: dict[tuple[str, str], list[GpnSa]] = {}
    for g in installed:
        if not g.inbound:
            by_tunnel.setdefault((g.tenant, g.tunnel), []).append(g)
    routes = []
    for key, sas in sorted(by_tunnel.items()):
        want = steer.get(key)
        chosen = next((g for g in sas if f"{g.spi:08x}" == want), None)
        if chosen is None:
            chosen = max(sas, key=lambda g: (g.created, g.spi))
        routes.append(EgressRoute(chosen.vni, tuple(chosen.local_ts.ranges), tuple(chosen.remote_ts.ranges),
                                  chosen.spi))
    return routes


class _Cpu:
    """CPU use of the worker processes (fraction of one core each, and overall)."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, float]] = {}
        self._tick = os.sysconf("SC_CLK_TCK")

    def sample(self, pids: list[int]) -> tuple[float, list[float]]:
        now = time.monotonic()
        per = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                used = (int(fields[11]) + int(fields[12])) / self._tick
            except (OSError, IndexError, ValueError):
                per.append(0.0)
                continue
            t0, u0 = self._last.get(pid, (now, used))
            self._last[pid] = (now, used)
            per.append(round(min(1.0, (used - u0) / (now - t0)), 3) if now > t0 else 0.0)
        cores = os.cpu_count() or 1
        return round(min(1.0, sum(per) / cores), 3), per


class _HostCpu:
    """The node's CPU use (the xfrm backend's work is the kernel's: softirqs on every core)."""

    def __init__(self) -> None:
        self._last: list[tuple[int, int]] = []

    @staticmethod
    def _read() -> list[tuple[int, int]]:
        out = []
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3:4].isdigit():
                    v = [int(x) for x in line.split()[1:]]
                    idle = v[3] + (v[4] if len(v) > 4 else 0)
                    out.append((sum(v), idle))
        return out

    def sample(self, _pids: list[int]) -> tuple[float, list[float]]:
        try:
            now = self._read()
        except OSError:
            return 0.0, []
        last, self._last = self._last or now, now
        per = [round(1 - (i1 - i0) / (t1 - t0), 3) if t1 > t0 else 0.0
               for (t0, i0), (t1, i1) in zip(last, now, strict=False)]
        return (round(sum(per) / len(per), 3) if per else 0.0), per


class GpnAgent:
    def __init__(self, cfg: GpnConfig, etcd_factory: Callable[[], Etcd]) -> None:
        self.cfg = cfg
        self._etcd_factory = etcd_factory
        self.etcd: Etcd | None = None
        self.engine: Engine | KernelDataPath | None = None
        self.backend = "userspace"
        # records that cannot be used are skipped one by one, never fatal (store/refused.py)
        self.refused = RefusedRecords("gpn", cfg.node)
        self._refused_pub = RefusedPublisher(self.refused, self._put_refused, self._delete_refused)
        self.sas_view = PrefixView(on_change=self._kick, on_bad=self._on_bad)
        self.aux_view = PrefixView(on_change=self._kick, on_bad=self._on_bad)
        self.installed: dict[str, tuple[int, GpnSa]] = {}  # key -> (mod_revision, SA)
        self.lingering: dict[str, tuple[float, GpnSa]] = {}  # outbound SAs whose record went: until when
        self._linger_since: dict[str, float] = {}  # when each lingering SA's record went
        self.burnt: set[str] = set()  # outbound SA keys never to install again
        self._parsed: dict[str, tuple[int, tuple[int, int, GpnSa] | None, str | None]] = {}
        self.registered_revision = 0
        self._acked = (0, 0)
        # what this GPN's data path held at its last acknowledgement (see _ack)
        self._acked_state: tuple[Any, ...] | None = None
        self._egress: list[EgressRoute] | None = None
        self._hosts: dict[tuple[int, int], tuple[bytes, str]] | None = None
        self._vips: set[str] | None = None
        self._stats_sent: dict[str, tuple[int, int]] = {}
        self._stats_sent_ts: dict[str, float] = {}
        self.last_stats: Any = None
        self.steer_view = PrefixView(on_change=self._kick, on_bad=self._on_bad)
        self.acks: AckSender | None = None
        self._ack_writer: LatestWriter[tuple[int, int, float, Lease]] = LatestWriter(
            "gpn-ack-writer", self._write_ack, self._ack_failed)
        self._cpu: _Cpu | _HostCpu = _Cpu()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lease: Lease | None = None
        self._watches: list[Any] = []
        self._thread: threading.Thread | None = None
        self.failed: str | None = None
        self.started = 0.0
        self.seal_key: Any = None  # X25519PrivateKey: opens the SA keys the GMN sealed to us

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> GpnAgent:
        self.seal_key = sealing.load_or_create(self.cfg.seal_key_file
                                               or f"{SEAL_KEY_DIR}/gpn-{self.cfg.node}.key")
        self.backend = choose_backend(self.cfg.backend)
        if self.backend == "xfrm":
            from .kernel import KernelConfig, KernelDataPath

            self.engine = KernelDataPath(KernelConfig(self.cfg.fabric_addr, canary_interval=self.cfg.canary_interval,
                                                      canary_misses=self.cfg.canary_misses)).start()
            self._cpu = _HostCpu()
        else:
            # the engine forks its workers: before any etcd/gRPC thread exists
            self.engine = Engine(EngineConfig(self.cfg.fabric_addr, workers=self.cfg.workers,
                                              raw_esp=self.cfg.raw_esp,
                                              worker_cpus=self.cfg.worker_cpus)).start()
        self.started = time.time()
        try:
            self._connect()
        except BaseException:
            for w in self._watches:
                w.cancel()
            self.engine.stop()
            raise
        self._thread = threading.Thread(target=self._loop, name="gpn-reconcile", daemon=True)
        self._thread.start()
        log.info("gpn agent %s started (fabric %s, backend %s, %d workers)", self.cfg.node, self.cfg.fabric_addr,
                 self.backend, self.engine.workers)
        return self

    def _connect(self) -> None:
        self.etcd = self._etcd_factory()
        self._lease = self.etcd.lease(self.cfg.lease_ttl, on_lost=lambda _l: self._on_lease_lost())
        if self.cfg.direct_acks:  # before the registration, which publishes its key
            self.acks = AckSender("gpn", self.cfg.node)
        self._register()
        self._watches = [
            self.etcd.snapshot_and_watch(f"{PREFIX}sas/", self.sas_view, resync_interval=self.cfg.resync_interval,
                                         name="gpn-sas"),
            self.etcd.snapshot_and_watch(f"{PREFIX}vnet/", self.aux_view, resync_interval=self.cfg.resync_interval,
                                         name="gpn-vnet"),
        ]
        self._watches.append(self.etcd.snapshot_and_watch(
            f"{PREFIX}steer/", self.steer_view, resync_interval=self.cfg.resync_interval, name="gpn-steer"))
        if self.acks is not None:
            self.acks.watch(self.etcd, resync_interval=self.cfg.resync_interval)
        self.sas_view.synced.wait(10)

    def _register(self) -> None:
        assert self.etcd is not None and self._lease is not None and self.engine is not None
        rec = {"node": self.cfg.node, "fabric_addr": self.cfg.fabric_addr, "cores": self.engine.workers,
               "backend": self.backend, "started": self.started,
               "seal_key": sealing.public_bytes(self.seal_key).hex() if self.seal_key is not None else None}
        if self.acks is not None:  # the key the GMNs check our acknowledgement datagrams with
            self.etcd.put_json(self.acks.key_path, self.acks.key_record(), lease=self._lease)
        rev = self.etcd.put_json(f"{PREFIX}gpn/nodes/{self.cfg.node}", rec, lease=self._lease)
        # a new lease: the acknowledgement went with the old one; the next pass writes it
        self._acked, self._acked_state = (0, 0), None
        self._refused_pub.invalidate()
        if not self.registered_revision:  # the first registration of this agent's life
            self.registered_revision = rev

    def _open(self, sealed: str, context: str) -> bytes:
        if self.seal_key is None:
            raise sealing.SealError("this GPN has no sealing key")
        return sealing.unseal(self.seal_key, sealed, context)

    def _on_bad(self, kv: Any, why: str) -> None:
        self.refused.refuse(kv.key, kv.mod_revision, why)

    def _refused_revision(self, key: str) -> int | None:
        for view in (self.sas_view, self.steer_view, self.aux_view):
            rev = view.revision_of(key)
            if rev is not None:
                return rev
        return None

    def _put_refused(self, key: str, report: dict[str, Any]) -> None:
        assert self.etcd is not None
        self.etcd.put_json(key, report, lease=self._lease)

    def _delete_refused(self, key: str) -> None:
        assert self.etcd is not None
        self.etcd.delete(key)

    def _on_lease_lost(self) -> None:
        log.warning("gpn %s: registration lease lost; registering again", self.cfg.node)
        self._lease = None
        self._kick()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(10)
        self._ack_writer.stop()
        for w in self._watches:
            w.cancel()
        if self.acks is not None:
            self.acks.close()
        if self._lease is not None:
            try:
                self._lease.revoke()
            except ProtegoError:
                pass
        if self.cfg.manage_vips:
            try:
                self._apply_vips(set())
            except OSError:
                pass
        if self.engine is not None:
            self.engine.stop()
        log.info("gpn agent %s stopped", self.cfg.node)

    def _kick(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        next_report = 0.0
        while not self._stop.is_set():
            wait = 0.5
            if self.lingering:
                wait = max(0.01, min(wait, min(u for u, _g in self.lingering.values()) - time.monotonic()))
            self._wake.wait(timeout=wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                assert self.engine is not None
                dead = self.engine.check()
                if dead:
                    self.failed = f"worker(s) {dead} died"
                    log.error("gpn %s: %s; stopping (a restarted engine gets no old outbound SA back)",
                              self.cfg.node, self.failed)
                    self._stop.set()
                    return
                if self._lease is None:
                    assert self.etcd is not None
                    self._lease = self.etcd.lease(self.cfg.lease_ttl, on_lost=lambda _l: self._on_lease_lost())
                    self._register()
                self.reconcile()
                if time.monotonic() >= next_report:
                    next_report = time.monotonic() + self.cfg.report_interval
                    self.report()
            except (ProtegoError, OSError) as exc:
                log.warning("gpn reconcile failed (%s); retrying", exc)
                time.sleep(0.5)
                self._wake.set()
            # also after a failed pass: what was refused is shown
            self.refused.prune(self._refused_revision)
            if self._lease is not None:
                try:
                    self._refused_pub.publish()
                except ProtegoError as exc:
                    log.warning("could not publish the refused records (%s); retrying", exc)

    # ------------------------------------------------------------------ reconcile
    def reconcile(self) -> None:
        assert self.engine is not None
        # the revisions this pass applies, read *before* the views' contents: the watches
        # go on delivering meanwhile, and acknowledging the views' revisions at the end of
        # the pass claimed transactions that landed during it, not applied (seen: the
        # GMN released charon on an inbound SA this GPN installed 60 ms later, and the
        # peer's first packets on it were dropped as unknown_spi)
        sas_rev, steer_rev = self.sas_view.revision, self.steer_view.revision
        requests = self.engine.requests
        # parse each record once per mod_revision (reconcile runs on every change)
        want: dict[str, tuple[int, int, GpnSa]] = {}
        bad: dict[str, str] = {}
        kv_rev: dict[str, int] = {}
        cache: dict[str, tuple[int, tuple[int, int, GpnSa] | None, str | None]] = {}
        for kv in self.sas_view.items(f"{PREFIX}sas/"):
            hit = self._parsed.get(kv.key)
            if hit is None or hit[0] != kv.mod_revision:
                rec = self.sas_view.get_json(kv.key)  # None: not an object (refused by the view)
                if rec is None:
                    hit = (kv.mod_revision, None, None)
                else:
                    ok, err = desired_sas({kv.key: (kv.create_revision, kv.mod_revision, rec)}, self.cfg.node,
                                          self._open)
                    hit = (kv.mod_revision, ok.get(kv.key), err.get(kv.key))
            cache[kv.key] = hit
            if hit[1] is not None:
                want[kv.key] = hit[1]
            elif hit[2] is not None:
                bad[kv.key] = hit[2]
            kv_rev[kv.key] = kv.mod_revision
        self._parsed = cache
        for key, why in bad.items():  # logged once per version of the record
            self.refused.refuse(key, kv_rev[key], why)
        # SAs to remove go last, after the egress table stops naming them: a worker must
        # never hold a route to an outbound SA it no longer has
        steer = {}
        for key, val in self.steer_view.json_items(f"{PREFIX}steer/out/").items():
            tun = steer_out_tunnel(key)
            if tun is not None and isinstance(val, dict):
                steer[tun] = str(val.get("spi", ""))
        now = time.monotonic()
        removed: dict[str, GpnSa] = {}
        for key in sorted(set(self.installed) - set(want)):
            g = self.installed.pop(key)[1]
            if g.inbound or OUTBOUND_LINGER_S <= 0:
                removed[key] = g
            else:
                self.lingering[key] = (now + OUTBOUND_LINGER_S, g)
                self._linger_since[key] = now
        for key in sorted(self.lingering):
            until, g = self.lingering[key]
            if key in want:  # its record is back (the same SA, still installed): keep it
                self.installed[key] = (want[key][1], self.lingering.pop(key)[1])
                self._linger_since.pop(key, None)
            elif (steer.get((g.tenant, g.tunnel)) == f"{g.spi:08x}"
                  and now - self._linger_since.get(key, now) < OUTBOUND_LINGER_MAX_S):
                # still steered here; OUTBOUND_LINGER_S more from the pass that sees it move
                self.lingering[key] = (math.inf, g)
            elif until == math.inf:
                self.lingering[key] = (now + OUTBOUND_LINGER_S, g)
            elif until <= now:
                removed[key] = self.lingering.pop(key)[1]
                self._linger_since.pop(key, None)
        for key, (crev, mrev, g) in sorted(want.items()):
            cur = self.installed.get(key)
            if cur is not None and cur[0] == mrev:
                continue
            if not g.inbound and cur is None and (key in self.burnt or crev <= self.registered_revision):
                if key not in self.burnt:
                    log.warning("%s: created before this GPN registered (it may have been used by a previous "
                                "incarnation): not installed, waiting for a rekey", g.label)
                    self.burnt.add(key)
                continue
            if cur is not None and not (cur[1].same_keys_and_suite(g) and cur[1].inbound == g.inbound):
                # same key, different SA material: never happens with the GMN; be safe
                self.engine.remove_sa(cur[1])
                if not cur[1].inbound:
                    self.burnt.add(key)
                    self.installed.pop(key)
                    log.error("%s: record changed its keys; outbound SA dropped", g.label)
                    continue
                cur = None
            self.engine.add_sa(g, update=cur is not None)
            self.installed[key] = (mrev, g)
            log.info("%s: %s (%s, peer %s:%d, vni %d)", g.label, "updated" if cur else "installed",
                     g.sa.suite.value, g.peer, g.peer_port, g.vni)
        # VIPs, egress table, host directory
        sas = [g for _r, g in self.installed.values()] + [g for _u, g in self.lingering.values()]
        if self.cfg.manage_vips:
            # every tunnel's VIP, not only those of our SAs: held in advance, a tunnel that
            # moves here does not wait for pyroute2 (tens of ms on a busy machine, measured
            # on the critical path of a recovery) between its SA and our acknowledgement
            vips = {g.vip for g in sas} | record_vips(cache)
            if vips != self._vips:
                self._apply_vips(vips)
                self._vips = vips
        routes = egress_routes(sas, steer)
        if routes != self._egress:
            self.engine.set_egress(routes)
            self._egress = routes
        for key, g in removed.items():
            self.engine.remove_sa(g)
            if not g.inbound:
                self.burnt.add(key)
            self._stats_sent.pop(key, None)
            log.info("%s: removed", g.label)
        hosts = HostDirectory.parse_etcd(
            self.aux_view.json_items(f"{PREFIX}vnet/"),
            lambda key, why: self.refused.refuse(key, self.aux_view.revision_of(key) or 0, why))
        if hosts != self._hosts:
            self.engine.set_hosts(hosts)
            self._hosts = hosts
        # every SA the GMN places writes sas/ and steer/ in one transaction, so both
        # views reach its revision: the minimum says both were applied (SA and egress).
        # The engine's requests go to its workers through pipes: "applied" means the
        # workers carried them out (a worker busy with a batch reads its pipe later, and
        # the peer's first packets on an SA it does not have yet would be dropped)
        if self.engine.requests != requests or self.engine.pending:
            try:
                self.engine.sync()
            except DataplaneError as exc:
                log.error("not acknowledging revision %d: %s", sas_rev, exc)
                return
        state = (tuple(sorted((k, m) for k, (_c, m, _g) in want.items())), tuple(sorted(self.lingering)),
                 routes, hosts, tuple(sorted(self._vips or ())))
        self._ack(min(sas_rev, steer_rev), sas_rev, state)

    def _ack(self, revision: int, sas_rev: int, state: tuple[Any, ...] | None = None) -> None:
        """Publish the etcd revision the data path now reflects (``gpn/applied/<gpn>``):
        the GMN holds charon's ``add_sa`` until the SA's GPN has acknowledged it, so a
        peer never uses a new SA the data path does not have yet. ``sas_rev``: the
        revision of ``sas/`` this pass installed.

        ``state``: what the data path holds (this GPN's SA records and their revisions,
        egress routes, hosts, VIPs). A pass that changed none of it is acknowledged only
        to complete the previous acknowledgement (its ``revision``, the lower of the two
        views', behind its ``sas_revision``: the GMN waits for both views to reach an SA's
        transaction): the GMN waits for a GPN only on transactions that change that GPN's
        SA records, and every GPN acknowledging every transaction of every other GPN's
        tunnels cost etcd and each of its watchers one write per GPN per transaction."""
        if (revision <= self._acked[0] and sas_rev <= self._acked[1]) or self.etcd is None or self._lease is None:
            return
        if state is not None and state == self._acked_state \
                and not (self._acked[0] < self._acked[1] and revision > self._acked[0]):
            return
        # sas_revision alone: the SAs are installed (what an SA the GMN does not steer to
        # yet needs); revision: SAs and egress steering both applied
        if self.acks is not None:  # the GMNs hear it at once; etcd's record follows (acks.py)
            self.acks.send(revision, sas_rev)
        # written aside (LatestWriter): the next pass, often a migration's outbound SA right
        # behind its inbound one, does not wait for this etcd round trip
        self._ack_writer.submit((revision, sas_rev, time.time(), self._lease))
        self._acked, self._acked_state = (revision, sas_rev), state

    def _write_ack(self, item: tuple[int, int, float, Lease]) -> None:
        revision, sas_rev, ts, lease = item
        assert self.etcd is not None
        self.etcd.put_json(f"{PREFIX}gpn/applied/{self.cfg.node}",
                           {"revision": revision, "sas_revision": sas_rev, "ts": ts}, lease=lease)

    def _ack_failed(self, item: tuple[int, int, float, Lease], exc: Exception) -> None:
        """The next pass acknowledges again (a lost lease: after registering again)."""
        log.warning("could not write the acknowledgement of revision %d: %s; writing it again", item[0], exc)
        self._acked, self._acked_state = (0, 0), None
        self._kick()

    def _apply_vips(self, want: set[str]) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ip:
            lo = ip.link_lookup(ifname="lo")[0]
            have = {a.get_attr("IFA_ADDRESS") for a in ip.get_addr(index=lo, family=2)
                    if a.get_attr("IFA_LABEL") == VIP_LABEL}
            for vip in sorted(want - have):
                ip.addr("add", index=lo, address=vip, prefixlen=32, label=VIP_LABEL)
                log.info("VIP %s added on lo", vip)
            for vip in sorted(have - want):
                ip.addr("del", index=lo, address=vip, prefixlen=32)
                log.info("VIP %s removed from lo", vip)

    # ------------------------------------------------------------------ reports
    def report(self) -> None:
        assert self.engine is not None and self.etcd is not None
        st = self.engine.stats()
        now = time.time()
        stats: list[tuple[str, PutOp]] = []  # (SA record key, sastats put)
        for key, (_rev, g) in self.installed.items():
            skey = ("in" if g.inbound else "out", g.spi)
            pk, by, last = st.sas.get(skey, (0, 0, 0.0))
            if self._stats_sent.get(key) == (pk, by) and now - self._stats_sent_ts.get(key, 0) < 30:
                continue
            self._stats_sent[key] = (pk, by)
            self._stats_sent_ts[key] = now
            rec: dict[str, Any] = {"bytes": by, "packets": pk, "last_use": last or None, "ts": now}
            if st.first.get(skey):
                rec["first_use"] = st.first[skey]  # an inbound SA's first packet here
            if skey in st.rekey:
                # the sequence space (or a byte/packet soft lifetime) is nearly used up
                rec["rekey_requested"] = True
            stats.append((key, PutOp(f"{PREFIX}sastats/{g.vip}/{g.spi:08x}", encode_json(rec))))
        # a counter is written only while its SA record exists: the GMN deletes both
        # together, and a late report must not leave an orphan behind
        for i in range(0, len(stats), 50):
            chunk = stats[i:i + 50]
            if not self.etcd.txn([key_present(k) for k, _op in chunk], [op for _k, op in chunk]).succeeded:
                for k, op in chunk:
                    self.etcd.txn([key_present(k)], [op])
        cpu, per = self._cpu.sample(st.pids)
        self.etcd.put_json(f"{PREFIX}gpn/load/{self.cfg.node}", {
            "cpu": cpu, "per_core": per, "ts": now, "sas": len(self.installed),
            "drops": {k: v for k, v in st.drops.items() if v},
            "counters": {k: v for k, v in st.counters.items() if v}})
        self.last_stats = st
