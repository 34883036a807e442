"""The ``protego gmn`` agent: charon under Protego's control.

One reconcile loop:

* mirrors ``/protego/v1/`` from etcd (:class:`~protego.store.view.PrefixView`);
* keeps charon loaded with every tenant's tunnels (VICI ``load-shared`` then
  ``load-conn``; removals ``terminate`` + ``unload-conn`` + ``unload-shared``), only
  while this GMN is the elected active one;
* holds every tenant's VIP on ``lo`` (labelled ``lo:pg`` so it removes only its own);
* serves the kernel-protego plugin (:class:`~protego.gmn.plugin_server.PluginServer`):
  allocates inbound SPIs unique per VIP through etcd, places every new CHILD_SA on
  a GPN and writes its SA record and steering entries in one etcd transaction
  before charon's ``add_sa`` returns, removes them on ``del_sa``, answers
  ``query_sa`` from the GPNs' counters, and converges etcd to the plugin's state
  dump after every (re)connect.

Keys are kept in memory and etcd only; logs carry SPIs, tenants and tunnels.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from protego import sealing
from protego.control import acks
from protego.control.model import GMN_SEAL_KEY, PREFIX, Tenant, Tunnel, check_psk, steer_out_tunnel
from protego.errors import ConfigError, PeerError, ProtegoError
from protego.gmn import plugin_protocol as pp
from protego.gmn.connections import conn_name, desired_connections, fingerprint, secret_id, split_conn_name
from protego.lb.model import validate_steer_in, validate_steer_out
from protego.gmn.placement import GpnView, NoGpnError, choose_gpn
from protego.gmn.ha_service import RELAY_RT_PRIORITY, HaProcess
from protego.gmn.plugin_server import Counters, Event, PluginServer
from protego.gmn.records import (
    Owner,
    find_owner,
    placement_key,
    sa_key,
    sa_record,
    sa_record_problem,
    spi_hex,
    spi_reservation_key,
    sastats_key,
    steer_in_key,
    steer_out_key,
    steer_out_record,
    steer_in_record,
)
from protego.store.etcd import KV, DeleteOp, Etcd, Lease, PutOp, encode_json, key_absent, lease_is, mod_revision_is
from protego.store.refused import RefusedPublisher, RefusedRecords
from protego.store.view import PrefixView
from vici import exception as vici_exception

from protego.vici_client import ViciClient

log = logging.getLogger(__name__)

LEADER_KEY = f"{PREFIX}gmn/leader"
MIGRATE_PREFIX = f"{PREFIX}requests/migrate/"
EVENTS_PREFIX = f"{PREFIX}events/"
MIGRATION_TIMEOUT = 30.0
MIGRATION_RETRY_S = 2.0  # a migration rekey that put nothing on the target is asked again after this
MIGRATION_ATTEMPTS = 5
MAX_EVENTS = 500
# A peer's rekey we answered: the peer installs its new inbound SA when our response
# arrives. The switch to the new outbound SA waits for the peer's DELETE of the old one, or
# for DEFER_SWITCH_S after charon's child-rekey event (our response is then on its way), or,
# were that event missed, for DEFER_UNANSWERED_S after the SA was placed.
DEFER_SWITCH_S = 2.0
DEFER_UNANSWERED_S = 10.0
RECORD_GRACE_S = 10.0  # an SA charon has held this long without a record gets one (_reconcile_records)
ADOPT_GRACE_S = 15.0  # after a takeover, the other GMN's records are reconciled once this has passed
SPI_REFILL_DELAY_S = 1.0  # a VIP's spare inbound SPI is reserved again this long after its use
RECOVERY_RETRY_S = 10.0  # a tunnel whose recovery rekey did not move it is asked again after this
# ... or after this, if not one SA of the tunnel landed since it was asked (charon dropped
# the rekey, or it failed): an outage of seconds, not ten of them
RECOVERY_REASK_S = 1.5
VIP_LABEL = "lo:pg"
MAX_SEALED_PSK = 2048  # bytes of a sealed PSK in etcd (a 1024-byte PSK seals to about 1.4 kB)


def newest_child(sas: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The tunnel's current CHILD_SA: the newest installed one. Just after a rekey the old
    one is still listed as installed until it is deleted; rekeying it does nothing."""
    installed = [sa for sa in sas if sa.get("child_state") == "INSTALLED" and sa.get("child_id")]
    return max(installed, key=lambda sa: int(sa["child_id"]), default=None)


@dataclass(frozen=True)
class GmnConfig:
    node: str
    etcd: list[str]
    vici_socket: str
    plugin_socket: str
    fabric_addr: str = ""
    lease_ttl: int = 5
    resync_interval: float = 30.0
    manage_vips: bool = True
    apply_timeout: float = 2.0  # longest add_sa waits for the data path's acknowledgement
    ha: bool = True  # mirror charon's IKE SAs through etcd (charon must load the ha plugin)
    ha_local: str = "127.0.0.2"  # charon's ha.remote: where this agent receives the stream
    ha_charon: str = "127.0.0.1"  # charon's ha.local
    ha_rt_priority: int = RELAY_RT_PRIORITY  # the relay process's SCHED_RR priority (0: nice -10)
    # UDP port of the direct acknowledgement channel on fabric_addr (protego/control/acks.py);
    # None (or no fabric_addr): acknowledgements come through etcd only; 0: any free port
    ack_port: int | None = acks.DEFAULT_PORT
    # the GMNs' X25519 key, which PSKs are sealed to (protego/sealing.py): the same file on
    # every GMN of a deployment; made on the first start if missing
    seal_key_file: str = "/var/lib/protego/keys/gmn.key"


@dataclass
class _State:
    leader: bool = False
    loaded: dict[str, str] = field(default_factory=dict)  # conn name -> fingerprint
    pending_gpn: dict[tuple[str, str], str] = field(default_factory=dict)  # newest inbound placement
    pinned: dict[tuple[str, str], str] = field(default_factory=dict)  # migration targets not yet mirrored
    rekeyed: dict[str, float] = field(default_factory=dict)  # outbound SA record key -> when we asked
    rekey_asked: dict[tuple[str, str], float] = field(default_factory=dict)  # failed-GPN recoveries
    no_gpn_logged: float = -1e9
    # tunnels whose outbound switch waits: (since, answered): since the SA was placed, or,
    # once charon's child-rekey event said our response is sent, since that event
    deferred: dict[tuple[str, str], tuple[float, bool]] = field(default_factory=dict)
    # inbound SAs of rekeys we initiated, placed but not yet acknowledged: (GPN, revision, SPI);
    # charon's next call, the same CHILD_SA's outbound SA, waits for them
    unacked_in: dict[tuple[str, str], tuple[str, int, int]] = field(default_factory=dict)
    switched_at: dict[tuple[str, str], float] = field(default_factory=dict)  # both directions acknowledged
    # outbound SAs of our rekeys whose acknowledgement is awaited aside (_await_switch)
    acking_out: set[tuple[str, str]] = field(default_factory=set)
    # tunnels whose outbound traffic moves to a new SA on another, live GPN once that GPN
    # has acknowledged it (make before break, _await_switch): tunnel -> the new SA's SPI
    steer_pending: dict[tuple[str, str], int] = field(default_factory=dict)
    repair_due: bool = False  # _repair_steering at the next pass (this GMN just became active)
    # SAs charon installed while no GPN could take them (a restart of every GPN, the GIN
    # declaring them dead meanwhile): (spi, dst) -> charon's add_sa, placed by the loop as
    # soon as a GPN is usable again (_place_unplaced), not at the next full pass
    unplaced: dict[tuple[int, str], pp.AddSa] = field(default_factory=dict)


class _GroupCommit:
    """The GMN's SA transactions, committed in the order they were submitted, several at a
    time: the transactions submitted while one is in flight go to etcd together as the
    next one (a recovery from a dead GPN places two SAs per tunnel of it, all at once, and
    one transaction after the other cost each a full etcd round trip, 2-7 ms here under
    load, behind the others). Submitted under the GMN's SA lock, a transaction commits
    after every transaction submitted before it. Its ops must not touch a key another of
    the group touches (etcd refuses that): such a transaction starts the next group. A
    group that fails is retried one transaction at a time, so that only the culprit's
    submitter sees the error."""

    MAX_OPS = 64  # etcd's default --max-txn-ops is 128

    def __init__(self, etcd: Etcd, on_commit: Any, name: str = "gmn-commit") -> None:
        self._etcd = etcd
        self._on_commit = on_commit  # called with each committed revision
        self._cond = threading.Condition()
        self._queue: deque[tuple[list[Any], Future[int]]] = deque()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, ops: list[Any]) -> Future[int]:
        fut: Future[int] = Future()
        with self._cond:
            if self._stopped:
                raise PeerError("the GMN agent is stopping")
            self._queue.append((list(ops), fut))
            self._cond.notify()
        return fut

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(10)

    @staticmethod
    def _keys(ops: list[Any]) -> set[str] | None:
        keys = set()
        for op in ops:
            if getattr(op, "prefix", False) or not hasattr(op, "key"):
                return None  # a range: alone
            keys.add(op.key)
        return keys

    def _take(self) -> list[tuple[list[Any], Future[int]]]:
        group: list[tuple[list[Any], Future[int]]] = []
        seen: set[str] = set()
        n = 0
        while self._queue:
            ops, fut = self._queue[0]
            keys = self._keys(ops)
            if group and (keys is None or keys & seen or n + len(ops) > self.MAX_OPS):
                break
            group.append(self._queue.popleft())
            n += len(ops)
            if keys is None:
                break
            seen |= keys
        return group

    def _commit(self, group: list[tuple[list[Any], Future[int]]]) -> None:
        try:
            revision = self._etcd.txn([], [op for ops, _f in group for op in ops]).revision
        except BaseException as exc:  # noqa: BLE001 - handed to the submitters
            if len(group) == 1:
                group[0][1].set_exception(exc)
                return
            for item in group:  # one by one: only the culprit fails
                self._commit([item])
            return
        self._on_commit(revision)
        for _ops, fut in group:
            fut.set_result(revision)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if not self._queue:
                    return
                group = self._take()
            self._commit(group)


class GmnAgent:
    def __init__(self, cfg: GmnConfig, etcd: Etcd) -> None:
        self.cfg = cfg
        self.etcd = etcd
        # records that cannot be used are skipped one by one, never fatal (store/refused.py)
        self.refused = RefusedRecords("gmn", cfg.node)
        self._refused_pub = RefusedPublisher(self.refused, self._put_refused, self.etcd.delete)
        self.view = PrefixView(on_change=self._on_view_change,
                               on_bad=lambda kv, why: self.refused.refuse(kv.key, kv.mod_revision, why))
        self._parse_lock = threading.Lock()
        self._parse_cache: dict[str, dict[str, tuple[Any, Any]]] = {}  # prefix -> key -> (version, parsed)
        self._applied = threading.Condition()
        self.state = _State()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lease: Lease | None = None
        self._watch: Any = None
        self._thread: threading.Thread | None = None
        self._sa_lock = threading.Lock()
        self._own_rev = 0  # the revision of our latest SA transaction (_catch_up)
        self._req_rev: dict[str, int] = {}  # migration request key -> the mod_revision we last saw
        # SPIs reserved ahead, per VIP: [(SPI, lease id)] (_allocate_spi)
        self._spi_lock = threading.Lock()
        self._spi_stash: dict[str, list[tuple[int, int]]] = {}
        self._spi_refilling: set[str] = set()
        self._commits = _GroupCommit(etcd, self._committed)
        # acknowledgements that came over the fabric (AckReceiver), by the key of the etcd
        # acknowledgement they precede: {field: revision}; _ack_value takes the higher
        self._direct_acks: dict[str, dict[str, int]] = {}
        # outbound SA records whose deletion was submitted without waiting (_del_sa):
        # gone for every decision, though our view may hold them until it commits
        self._deleting: set[str] = set()
        self._acks: acks.AckReceiver | None = None
        self.server = PluginServer(
            cfg.plugin_socket, spi_allocator=self._allocate_spi, counters=self._counters,
            on_change=self._on_plugin_event, on_disconnect=self._on_charon_gone,
        )
        self.ha: HaProcess | None = None
        if cfg.ha:
            self.ha = HaProcess(cfg.node, list(cfg.etcd), cfg.vici_socket, LEADER_KEY, wake=self._kick,
                                local=cfg.ha_local, charon=cfg.ha_charon, rt_priority=cfg.ha_rt_priority,
                                verbose=logging.getLogger().isEnabledFor(logging.DEBUG))
        self._conns_ok = False
        self._done_rev: tuple[int, int] | None = None
        self._active_since: float | None = None
        self._lease_watchdog: threading.Thread | None = None
        self._seal_key: Any = None  # X25519PrivateKey (start): opens the PSKs in etcd

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "GmnAgent":
        self._seal_key = sealing.load_or_create(self.cfg.seal_key_file)
        self._publish_seal_key()
        if self.cfg.fabric_addr and self.cfg.ack_port is not None:
            try:
                self._acks = acks.AckReceiver(self.cfg.fabric_addr, self.cfg.ack_port, self._on_direct_ack,
                                              self._ack_key).start()
            except OSError as exc:
                raise ConfigError(f"cannot open the acknowledgement channel on {self.cfg.fabric_addr}:"
                                  f"{self.cfg.ack_port}: {exc.strerror or exc}") from None
        self._lease = self.etcd.lease(self.cfg.lease_ttl, on_lost=lambda _l: self._kick())
        self._register_member()
        self._watch = self.etcd.snapshot_and_watch(PREFIX, self.view, resync_interval=self.cfg.resync_interval,
                                                   name="gmn-view")
        self.view.synced.wait(10)
        if self.ha is not None:
            self.ha.start()
        self.server.start()
        self._thread = threading.Thread(target=self._loop, name="gmn-reconcile", daemon=True)
        self._thread.start()
        self._events_thread = threading.Thread(target=self._follow_vici_events, name="gmn-vici-events",
                                               daemon=True)
        self._events_thread.start()
        self._lease_watchdog = threading.Thread(target=self._watch_lease, name="gmn-lease-watchdog", daemon=True)
        self._lease_watchdog.start()
        log.info("gmn agent %s started (plugin socket %s)", self.cfg.node, self.cfg.plugin_socket)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(10)
        if getattr(self, "_events_thread", None):
            self._events_thread.join(5)
        if self.ha is not None:
            if self.state.leader:
                self.ha.deactivate("agent stopping")
            self.ha.stop()
        self.server.stop()
        if self._acks is not None:
            self._acks.stop()
        self._commits.stop()  # commits what was submitted (also what charon was not kept waiting for)
        if self._watch is not None:
            self._watch.cancel()
        if self._lease is not None:
            try:
                self._lease.revoke()
            except ProtegoError:
                pass
        log.info("gmn agent %s stopped", self.cfg.node)

    def _kick(self) -> None:
        self._wake.set()

    def _desired_revision(self) -> tuple[int, int]:
        """(newest mod_revision, number of keys) under tenants/, tunnels/ and secrets/."""
        newest = count = 0
        for prefix in ("tenants/", "tunnels/", "secrets/"):
            for kv in self.view.items(PREFIX + prefix):
                newest = max(newest, kv.mod_revision)
                count += 1
        return newest, count

    def _on_view_change(self) -> None:
        self._kick()
        with self._applied:
            self._applied.notify_all()

    def _on_direct_ack(self, kind: str, node: str, fields: dict[str, int]) -> None:
        """An acknowledgement over the fabric (AckReceiver's thread): kept beside the etcd
        one it precedes, the higher revision of the two counts (``_ack_value``)."""
        key = f"{PREFIX}{kind}/applied/{node}"
        # no revision beyond the newest we know: a datagram cannot claim what etcd has not
        # reached (a forged 2^62 satisfied every wait for good before this bound)
        known = max(self.view.revision, self._own_rev)
        with self._applied:
            cur = self._direct_acks.setdefault(key, {})
            for f, v in fields.items():
                v = min(v, known)
                if v > cur.get(f, 0):
                    cur[f] = v
            self._applied.notify_all()

    def _ack_key(self, kind: str, node: str) -> bytes | None:
        """The key ``node`` acknowledges with (``acks/keys/<kind>/<node>``, which it wrote)."""
        return acks.sender_key(self.view.get_json(acks.sender_key_path(kind, node)))

    def _ack_value(self, key: str, field_: str) -> int:
        """The revision ``key``'s acknowledgement has reached in ``field_``: etcd's record
        or the datagram that came before it, whichever is further."""
        rec = self.view.get_json(key) or {}
        direct = self._direct_acks.get(key, {})
        # a GPN's direct acknowledgement may carry revision alone (a GIN/GEN's always does)
        return max(int(rec.get(field_, 0) or 0), direct.get(field_, 0))

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        last_full = 0.0
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._elect()
                full = time.monotonic() - last_full > self.cfg.resync_interval
                # VIPs and charon's connections follow tenants/, tunnels/ and secrets/ only:
                # the far more frequent changes of SA records, steering and acknowledgements
                # do not redo them (each costs a netlink socket and a pass over every tunnel)
                desired_rev = self._desired_revision()
                if full or desired_rev != self._done_rev or not self._conns_ok:
                    if self.cfg.manage_vips:
                        self._reconcile_vips()
                    self._reconcile_conns(force_check=full)
                    self._release_spare_spis()
                    self._done_rev = desired_rev
                if self.ha is not None and self.ha.alive:
                    self.ha.set_charon(self._charon_pid(), self._conns_ready())
                if self.state.leader:
                    self._switch_deferred()
                    if full or self.state.repair_due:
                        self.state.repair_due = False
                        self._repair_steering()
                    self._handle_migrations()
                    self._place_unplaced()
                    self._recover_failed_gpns()
                    self._rekey_burnt_outbound()
                if full:
                    last_full = time.monotonic()
                    self._reconcile_records()
            except ProtegoError as exc:
                log.warning("gmn reconcile failed (%s); retrying", exc)
                time.sleep(0.5)
                self._wake.set()
            except OSError as exc:
                log.warning("gmn reconcile failed (%s); retrying", exc)
                time.sleep(0.5)
                self._wake.set()
            # also after a failed pass (charon unreachable): what was refused is shown
            self.refused.prune(self._refused_revision)
            try:
                self._refused_pub.publish()
            except ProtegoError as exc:
                log.warning("could not publish the refused records (%s); retrying", exc)

    # ------------------------------------------------------------------ VICI events
    def _follow_vici_events(self) -> None:
        """charon's IKE/CHILD up, down and rekey events become Protego events (and a
        reconcile: a CHILD_SA that went down may have left records behind)."""
        while not self._stop.is_set():
            try:
                with ViciClient(self.cfg.vici_socket) as v:
                    for label, msg in v.session.listen(["ike-updown", "child-updown", "child-rekey"], 1.0):
                        if self._stop.is_set():
                            return
                        if label is None:
                            continue
                        self._on_vici_event(label.decode() if isinstance(label, bytes) else label, msg)
            except (OSError, ProtegoError, vici_exception.SessionException) as exc:
                log.debug("VICI event session: %s; reconnecting", exc)
                self._stop.wait(1.0)

    def _on_vici_event(self, label: str, msg: dict[str, Any]) -> None:
        up = msg.get("up") == b"yes"
        for name, sa in msg.items():
            if not isinstance(sa, dict):
                continue
            ids = split_conn_name(name if isinstance(name, str) else name.decode())
            if ids is None:
                continue
            if label == "ike-updown":
                kind, detail = ("ike-up" if up else "ike-down"), f"peer {sa.get('remote-host', b'').decode()}"
            elif label == "child-updown":
                kind, detail = ("child-up" if up else "child-down"), ""
            else:
                kind, detail = "child-rekey", ""
                if self.state.leader and self.ha is not None:
                    self._forget_rekeyed(sa)
                self._rekey_answered((ids[0], ids[1]))
            if self.state.leader:
                self._event(kind, ids[0], ids[1], detail)
            log.info("tunnel %s/%s: %s", ids[0], ids[1], kind)
        self._kick()

    def _rekey_answered(self, tunnel: tuple[str, str]) -> None:
        """charon's child-rekey event of a peer's rekey we answered comes as charon sends
        the response (after the outbound SA's add_sa, which can be seconds earlier on a
        loaded GMN): a deferred outbound switch counts its DEFER_SWITCH_S from now, so it
        never precedes the peer's new inbound SA."""
        with self._sa_lock:
            if tunnel in self.state.deferred:
                self.state.deferred[tunnel] = (time.monotonic(), True)

    def _forget_rekeyed(self, sa: dict[str, Any]) -> None:
        """The old CHILD_SA of a rekey leaves the HA mirror now, not when charon destroys
        it after ``delete_rekeyed_delay`` (see :meth:`HaMirror.forget_child`)."""
        def s(v: Any) -> str:
            return v.decode() if isinstance(v, bytes) else str(v or "")

        spis = f"{s(sa.get('initiator-spi'))}_{s(sa.get('responder-spi'))}"
        for child in (sa.get("child-sas") or {}).values():
            old = child.get("old") if isinstance(child, dict) else None
            if isinstance(old, dict) and old.get("spi-in"):
                try:
                    assert self.ha is not None
                    self.ha.forget_child(spis, int(s(old["spi-in"]), 16))
                except (ProtegoError, ValueError) as exc:
                    log.warning("HA: could not drop rekeyed CHILD_SA %s from the mirror: %s", s(old["spi-in"]), exc)

    # ------------------------------------------------------------------ leadership
    def _charon_pid(self) -> int | None:
        hello = self.server.hello
        return int(hello.pid) if self.server.connected and hello is not None and hello.pid else None

    def _conns_ready(self) -> bool:
        """charon holds every tenant's connection (the HA stream names them)."""
        return self._conns_ok and self.server.connected

    def _candidate(self) -> bool:
        """Only a GMN whose charon runs, holds the connections and every mirrored IKE SA
        may become active."""
        if self.ha is not None:
            if not self.ha.alive and not self._stop.is_set():
                log.error("gmn %s: restarting the HA relay process", self.cfg.node)
                self.ha.start()
            self.ha.set_charon(self._charon_pid(), self._conns_ready())
        if not self._conns_ready():
            return False
        return self.ha is None or self.ha.fed_ok or self.ha.active

    def _on_charon_gone(self) -> None:
        """The plugin connection closed: charon died or restarts. An active GMN hands
        leadership over at once instead of letting its lease run out."""
        self._conns_ok = False
        if self.ha is not None:
            try:
                self.ha.set_charon(None, False)  # nothing is fed to a charon that is not there
            except ProtegoError as exc:
                log.warning("HA: %s", exc)
        if self.state.leader:
            log.error("gmn %s: charon is gone: resigning the leadership", self.cfg.node)
            self._resign("charon is gone")
        self._kick()

    def _resign(self, reason: str) -> None:
        if self._lease is not None:
            try:
                self.etcd.txn([lease_is(LEADER_KEY, self._lease.id)], [DeleteOp(LEADER_KEY)])
            except ProtegoError as exc:
                log.warning("gmn %s: could not resign (%s); the lease will expire", self.cfg.node, exc)
        self._demote(reason)

    def _demote(self, reason: str) -> None:
        was = self.state.leader
        self.state.leader = False
        self._active_since = None
        if self.ha is not None:
            self.ha.deactivate(reason)
        if was:
            log.warning("gmn %s is now standby (%s)", self.cfg.node, reason)

    def _watch_lease(self) -> None:
        """Fencing: an active GMN that has not renewed its lease for half its TTL (cut off
        from etcd) makes its IKE SAs passive before etcd can expire the lease and elect
        the other GMN; so two charons never answer for the same IKE SA."""
        while not self._stop.wait(0.05):
            lease = self._lease
            if lease is None or not self.state.leader:
                continue
            if lease.lost or lease.since_renewal > lease.ttl / 2:
                log.error("gmn %s: lease not renewed for %.1f s: stepping down", self.cfg.node,
                          lease.since_renewal)
                self._demote("lease not renewed")
                self._kick()

    def _renew_lease(self) -> None:
        """A lost lease (etcd unreachable for a TTL) is replaced, and membership re-written."""
        assert self._lease is not None
        if not self._lease.lost:
            return
        if self.state.leader:
            self._demote("lease lost")
        self._lease = self.etcd.lease(self.cfg.lease_ttl, on_lost=lambda _l: self._kick())
        self._register_member()
        log.info("gmn %s: new etcd lease %x", self.cfg.node, self._lease.id)

    def _publish_seal_key(self) -> None:
        """``gmn/seal-key``: the public key the CLI seals PSKs to (not leased: tunnels can be
        added while no GMN runs). A GMN whose key differs from the published one would
        open no PSK: it refuses to start."""
        mine = sealing.public_bytes(self._seal_key).hex()
        for _ in range(5):
            kv = self.etcd.get(GMN_SEAL_KEY)
            if kv is None:
                if self.etcd.txn([key_absent(GMN_SEAL_KEY)], [PutOp(GMN_SEAL_KEY, encode_json({"key": mine}))]
                                 ).succeeded:
                    log.info("gmn %s: sealing key published (PSKs are sealed to it)", self.cfg.node)
                    return
                continue
            try:
                theirs = json.loads(kv.value).get("key")
            except (ValueError, AttributeError):
                theirs = None
            if theirs == mine:
                return
            raise ConfigError(
                f"the GMN sealing key in {self.cfg.seal_key_file} is not the one in etcd (gmn/seal-key): every "
                f"GMN must use the same key file (the PSKs in etcd are sealed to that key); see "
                f"docs/etcd-schema.md, 'Sealed keys'")
        raise PeerError("could not publish the GMN sealing key: too many concurrent changes")

    def _register_member(self) -> None:
        """``gmn/members/<node>`` and, with the direct acknowledgement channel, its address
        and key (``gmn/acks/<node>``, a record of its own: ``protego status`` shows members),
        in one transaction under our lease."""
        assert self._lease is not None
        ops = [PutOp(f"{PREFIX}gmn/members/{self.cfg.node}",
                     encode_json({"node": self.cfg.node, "fabric_addr": self.cfg.fabric_addr}), lease=self._lease.id)]
        if self._acks is not None:
            ops.append(PutOp(f"{acks.ACKS_PREFIX}{self.cfg.node}", encode_json(self._acks.record()),
                             lease=self._lease.id))
        self.etcd.txn([], ops, [])
        self._refused_pub.invalidate()  # a new lease: the report under the old one went with it

    def _elect(self) -> None:
        assert self._lease is not None
        self._renew_lease()
        kv = self.view.get(LEADER_KEY)
        cur = kv.json() if kv is not None else None
        if kv is not None and cur.get("node") == self.cfg.node and kv.lease != self._lease.id:
            # we restarted while our old lease still holds the key: adopt it under our
            # new lease at once, so its expiry does not hand leadership away
            adopted = self._candidate() and self.etcd.txn(
                [mod_revision_is(LEADER_KEY, kv.mod_revision)],
                [PutOp(LEADER_KEY, encode_json({**cur, "since": cur.get("since", time.time())}),
                       lease=self._lease.id)],
            ).succeeded
            log.info("gmn %s %s its leadership under a new lease", self.cfg.node,
                     "kept" if adopted else "could not keep")
            if not adopted:
                return
            kv = self.etcd.get(LEADER_KEY)
            cur = kv.json() if kv is not None else None
        if cur is not None:
            ours = cur.get("node") == self.cfg.node
            if ours and not self._candidate():
                self._resign("charon not ready")
                return
            if ours and self._lease.since_renewal > self._lease.ttl / 2:
                return  # fenced by the watchdog until the lease is renewed
            if ours and not self.state.leader:
                self.state.leader = True
                self.state.repair_due = True
                log.info("gmn %s is now active", self.cfg.node)
                self._activate()
            elif not ours and self.state.leader:
                self._demote(f"{cur.get('node')} is the leader")
            return
        if not self._candidate():
            return
        won = self.etcd.txn(
            [key_absent(LEADER_KEY)],
            [PutOp(LEADER_KEY, encode_json({"node": self.cfg.node, "fabric_addr": self.cfg.fabric_addr,
                                            "since": time.time()}), lease=self._lease.id)],
        ).succeeded
        if won:
            log.info("gmn %s won the election: active", self.cfg.node)
            self.state.leader = True
            self._activate()

    def _activate(self) -> None:
        if self.ha is None or self.ha.active:
            return
        try:
            self.ha.set_charon(self._charon_pid(), self._conns_ready())
            info = self.ha.activate(self._lease.id if self._lease else 0, self._charon_pid())
        except (OSError, ProtegoError) as exc:
            log.error("gmn %s: taking over the IKE SAs failed (%s): resigning", self.cfg.node, exc)
            self._resign("activation failed")
            return
        self._active_since = time.monotonic()
        self._event("gmn-takeover", detail=f"{info['ike_sas']} IKE SAs, {info['child_sas']} CHILD_SAs "
                                           f"active after {info['ms']} ms")

    # ------------------------------------------------------------------ refused records
    def _refused_revision(self, key: str) -> int | None:
        """The revision a refused record has now (None: deleted); what a refusal that is
        not the record's own (charon refused its connection) is dated by too."""
        return self.view.revision_of(key)

    def _put_refused(self, key: str, report: dict[str, Any]) -> None:
        self.etcd.put_json(key, report, lease=self._lease)

    def _parsed(self, prefix: str, parse: Any, version: Any = None) -> dict[str, Any]:
        """key -> parse(kv) for the records under ``prefix``; a record ``parse`` refuses
        (ConfigError, or the KeyError/TypeError/ValueError of a malformed one) is skipped
        and refused, and None (not for this agent) is skipped silently. Parsed once per
        version (``version(kv)``, default its mod_revision)."""
        out: dict[str, Any] = {}
        with self._parse_lock:
            old = self._parse_cache.get(prefix, {})
            cache: dict[str, tuple[Any, Any]] = {}
            for kv in self.view.items(prefix):
                ver = version(kv) if version is not None else kv.mod_revision
                hit = old.get(kv.key)
                if hit is None or hit[0] != ver:
                    try:
                        hit = (ver, parse(kv))
                    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as exc:
                        why = str(exc) if isinstance(exc, ConfigError) else \
                            f"malformed ({type(exc).__name__}: {exc})"
                        self.refused.refuse(kv.key, kv.mod_revision, why)
                        hit = (ver, None)
                    else:
                        if hit[1] is not None:
                            self.refused.accept(kv.key)
                cache[kv.key] = hit
                if hit[1] is not None:
                    out[kv.key] = hit[1]
            self._parse_cache[prefix] = cache
        return out

    def _object(self, kv: KV) -> dict[str, Any]:
        obj = json.loads(kv.value)
        if not isinstance(obj, dict):
            raise ConfigError(f"a JSON {type(obj).__name__}, not an object")
        return obj

    # ------------------------------------------------------------------ desired state
    def _tenant_records(self) -> dict[str, Tenant]:
        """name -> tenant, of the records that validate (a record's key names its tenant)."""
        def parse(kv: KV) -> Tenant:
            t = Tenant.from_json(self._object(kv)).validate()
            if kv.key != f"{PREFIX}tenants/{t.name}":
                raise ConfigError(f"tenant record names tenant {t.name!r}, its key another")
            return t
        return {t.name: t for t in self._parsed(f"{PREFIX}tenants/", parse).values()}

    def tenants(self) -> list[Tenant]:
        return list(self._tenant_records().values())

    def tunnels(self) -> list[Tunnel]:
        """The tunnels that validate against their tenant (a tunnel whose tenant is not
        known, or not valid, is left out: nothing can be loaded for it)."""
        tenants = self._tenant_records()

        def version(kv: KV) -> tuple[int, int]:
            tenant_kv = self.view.get(f"{PREFIX}tenants/{kv.key[len(PREFIX) + len('tunnels/'):].split('/')[0]}")
            return kv.mod_revision, tenant_kv.mod_revision if tenant_kv is not None else 0

        def parse(kv: KV) -> Tunnel | None:
            t = Tunnel.from_json(self._object(kv))
            if kv.key != f"{PREFIX}tunnels/{t.tenant}/{t.name}":
                raise ConfigError("tunnel record names another tunnel than its key")
            tenant = tenants.get(t.tenant)
            return t.validate(tenant) if tenant is not None else None
        return list(self._parsed(f"{PREFIX}tunnels/", parse, version).values())

    def _secrets(self) -> dict[tuple[str, str], bytes]:
        def parse(kv: KV) -> tuple[tuple[str, str], bytes] | None:
            parts = kv.key[len(PREFIX) + len("secrets/"):].split("/")
            if len(parts) != 2:
                return None
            # sealed to the GMNs' key by the CLI (protego/sealing.py); reasons never carry the value
            if not kv.value.startswith(sealing.PREFIX.encode()):
                raise ConfigError(f"not a sealed PSK ({len(kv.value)} bytes): add the tunnel with the "
                                  f"protego CLI, which seals it")
            if len(kv.value) > MAX_SEALED_PSK:
                raise ConfigError(f"a sealed PSK of {len(kv.value)} bytes (at most {MAX_SEALED_PSK}: a PSK has "
                                  f"at most 1024)")
            if self._seal_key is None:
                raise ConfigError("this GMN has no sealing key to open PSKs with")
            psk = sealing.unseal(self._seal_key, kv.value.decode("ascii", "replace"), kv.key[len(PREFIX):])
            check_psk("secret", psk)
            return (parts[0], parts[1]), psk
        return dict(self._parsed(f"{PREFIX}secrets/", parse).values())

    def _sa_records(self) -> dict[str, dict[str, Any]]:
        """key -> SA record, of the ``sas/`` records whose fields the GMN's flows can read."""
        def parse(kv: KV) -> dict[str, Any]:
            rec = self._object(kv)
            why = sa_record_problem(kv.key, rec)
            if why is not None:
                raise ConfigError(why)
            return rec
        return self._parsed(f"{PREFIX}sas/", parse)

    def _placements(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(tenant, tunnel) -> placement record (``gpn`` and ``next_gpn`` strings)."""
        prefix = f"{PREFIX}placement/"

        def parse(kv: KV) -> tuple[tuple[str, str], dict[str, Any]] | None:
            parts = kv.key[len(prefix):].split("/")
            if len(parts) != 2:
                return None
            rec = self._object(kv)
            for f in ("gpn", "next_gpn"):
                if f in rec and rec[f] is not None and not isinstance(rec[f], str):
                    raise ConfigError(f"{f} is not a string")
            return (parts[0], parts[1]), rec
        return dict(self._parsed(prefix, parse).values())

    def _placement(self, tenant: str, tunnel: str) -> dict[str, Any]:
        return self._placements().get((tenant, tunnel), {})

    def _gpn_nodes(self) -> dict[str, dict[str, Any]]:
        """GPN name -> its registration (``started``: a number)."""
        prefix = f"{PREFIX}gpn/nodes/"

        def parse(kv: KV) -> tuple[str, dict[str, Any]]:
            rec = self._object(kv)
            started = rec.get("started", 0)
            if isinstance(started, bool) or not isinstance(started, (int, float)):
                raise ConfigError("started is not a number")
            return kv.key[len(prefix):], rec
        return dict(self._parsed(prefix, parse).values())

    # ------------------------------------------------------------------ VIPs on lo
    def _reconcile_vips(self) -> None:
        from pyroute2 import IPRoute

        # both GMNs hold the VIPs: the GIN steers IKE to the active one only
        from pyroute2.netlink.exceptions import NetlinkError

        # tenants() holds valid tenants only: IPv4 unicast VIPs in canonical form
        want = {t.vip: t.name for t in self.tenants()}
        with IPRoute() as ip:
            lo = ip.link_lookup(ifname="lo")[0]
            have = {}
            for a in ip.get_addr(index=lo, family=2):
                if a.get_attr("IFA_LABEL") == VIP_LABEL:
                    have[a.get_attr("IFA_ADDRESS")] = a
            for vip in sorted(set(want) - set(have)):
                try:
                    ip.addr("add", index=lo, address=vip, prefixlen=32, label=VIP_LABEL)
                except NetlinkError as exc:  # one VIP the kernel refuses costs that VIP only
                    key = f"{PREFIX}tenants/{want[vip]}"
                    self.refused.refuse(key, self.view.revision_of(key) or 0,
                                        f"the kernel refused VIP {vip} on lo: {exc}")
                    continue
                log.info("VIP %s added on lo", vip)
            for vip in sorted(set(have) - set(want)):
                ip.addr("del", index=lo, address=vip, prefixlen=32)
                log.info("VIP %s removed from lo", vip)

    # ------------------------------------------------------------------ charon connections
    def _reconcile_conns(self, force_check: bool = False) -> None:
        secrets_ = self._secrets()
        # both GMNs hold every connection: the standby's charon needs them to install the
        # IKE SAs mirrored from the active one (the HA stream names their configs)
        desired = desired_connections(self.tenants(), self.tunnels(), set(secrets_))
        if not force_check and {n: fingerprint(*d) for n, d in desired.items()} == self.state.loaded:
            self._conns_ok = self.server.connected
            return
        with ViciClient(self.cfg.vici_socket) as v:
            loaded = {n for n in v.get_conns() if split_conn_name(n)}
            for name, (body, owners) in sorted(desired.items()):
                fp = fingerprint(body, owners)
                if name in loaded and self.state.loaded.get(name) == fp:
                    continue
                tenant, tunnel = split_conn_name(name)  # type: ignore[misc]
                try:
                    # the secret first: a connection is never loaded without its PSK
                    v.load_psk(secret_id(tenant, tunnel), secrets_[(tenant, tunnel)], owners)
                    v.load_conn(name, body)
                except PeerError as exc:  # charon refused this one: the others go on
                    key = f"{PREFIX}tunnels/{tenant}/{tunnel}"
                    self.refused.refuse(key, self.view.revision_of(key) or 0, str(exc))
                    self.state.loaded.pop(name, None)
                    continue
                self.state.loaded[name] = fp
                self.refused.accept(f"{PREFIX}tunnels/{tenant}/{tunnel}")
                log.info("tunnel %s/%s loaded into charon", tenant, tunnel)
            for name in sorted(loaded - set(desired)):
                tenant, tunnel = split_conn_name(name)  # type: ignore[misc]
                v.terminate_ike(name)
                v.unload_conn(name)
                try:
                    v.unload_shared(secret_id(tenant, tunnel))
                except PeerError:
                    pass
                self.state.loaded.pop(name, None)
                log.info("tunnel %s/%s removed from charon", tenant, tunnel)
            for name in list(self.state.loaded):
                if name not in desired:
                    self.state.loaded.pop(name)
        self._conns_ok = self.server.connected  # the loop tells the HA relay right after
        if self.state.leader:
            self._forget_removed_tunnels()

    def _forget_removed_tunnels(self) -> None:
        """Placements and migration requests of tunnels that no longer exist go too (their
        SA records and steering leave with charon's del_sa calls)."""
        tunnels = {(t.tenant, t.name) for t in self.tunnels()}
        for prefix in (f"{PREFIX}placement/", MIGRATE_PREFIX):
            for kv in self.view.items(prefix):
                parts = kv.key[len(prefix):].split("/")
                if len(parts) == 2 and (parts[0], parts[1]) not in tunnels:
                    self.etcd.cas_delete(kv.key, kv.mod_revision)
                    log.info("tunnel %s/%s is gone: %s removed", parts[0], parts[1], kv.key[len(PREFIX):])

    # ------------------------------------------------------------------ GPNs
    def gpn_views(self) -> dict[str, GpnView]:
        nodes = self._gpn_nodes()
        health = self.view.json_items(f"{PREFIX}gpn/health/")
        counts: dict[str, int] = {}
        for p in self._placements().values():
            counts[p.get("gpn") or ""] = counts.get(p.get("gpn") or "", 0) + 1
        for g in self.state.pending_gpn.values():  # placed a moment ago, not yet in etcd
            counts[g] = counts.get(g, 0) + 1
        out = {}
        for name in nodes:
            h = health.get(f"{PREFIX}gpn/health/{name}", {})
            admin = self.view.get_json(f"{PREFIX}gpn/admin/{name}") or {}
            out[name] = GpnView(name, True, h.get("state", "alive") != "dead", counts.get(name, 0),
                                draining=admin.get("state") == "draining")
        return out

    # ------------------------------------------------------------------ plugin callbacks
    def _allocate_spi(self, req: pp.GetSpi, in_use: set[int]) -> int:
        """An inbound SPI for charon, unique per VIP (``spi/<vip>/<spi>``, under this GMN's
        lease until its SA record replaces it). One spare per VIP is reserved ahead
        (``_refill_spi_stash``): charon's get_spi precedes its CREATE_CHILD_SA request, so a
        migration, a recovery or a rekey then sends its request without an etcd round trip
        first (a reservation took 3-5 ms on this machine under load, 30 ms seen)."""
        assert req.dst is not None
        vip = str(req.dst.address)
        lease = self._lease.id if self._lease else 0
        with self._spi_lock:
            # usable: reserved under the current lease (an older one's went with it), not
            # charon's already, no SA record (neither ever happens; never a duplicate)
            usable = [x for x, lid in self._spi_stash.pop(vip, [])
                      if lid == lease and x not in in_use and self.view.get(sa_key(vip, x)) is None]
            spi = usable.pop(0) if usable else None
            if usable:
                self._spi_stash[vip] = [(x, lease) for x in usable]
        if spi is None:
            spi = self._reserve_spi(vip, in_use, lease)
        self._refill_spi_stash(vip, in_use | {spi})
        return spi

    def _tenant_vips(self) -> set[str]:
        return {str(t.vip) for t in self.tenants()}

    def _release_spare_spis(self) -> None:
        """The spare SPIs of VIPs no tenant has any more (a tenant removed): their
        reservations go, with the rest of the tenant's keys."""
        vips = self._tenant_vips()
        with self._spi_lock:
            gone = {vip: self._spi_stash.pop(vip) for vip in list(self._spi_stash) if vip not in vips}
        for vip, spares in gone.items():
            for spi, _lease in spares:
                try:
                    self.etcd.delete(spi_reservation_key(vip, spi))
                except ProtegoError as exc:  # under our lease: it goes with it at the latest
                    log.warning("could not release the spare SPI %08x of VIP %s: %s", spi, vip, exc)

    def _reserve_spi(self, vip: str, in_use: set[int], lease: int) -> int:
        for _ in range(64):
            spi = 0xC0000000 | secrets.randbits(30)
            if spi in in_use:
                continue
            ok = self.etcd.txn(
                [key_absent(spi_reservation_key(vip, spi)), key_absent(sa_key(vip, spi))],
                [PutOp(spi_reservation_key(vip, spi), self.cfg.node.encode(), lease=lease)],
            ).succeeded
            if ok:
                return spi
        raise PeerError(f"could not reserve an inbound SPI for VIP {vip}")

    def _refill_spi_stash(self, vip: str, in_use: set[int]) -> None:
        """Reserve the VIP's spare SPI in the background (one at a time per VIP);
        ``in_use``: SPIs charon has (a copy: the plugin server's sets change meanwhile)."""
        with self._spi_lock:
            if self._spi_stash.get(vip) or vip in self._spi_refilling or self._stop.is_set():
                return
            self._spi_refilling.add(vip)

        def refill() -> None:
            try:
                # not at once: the get_spi that used the spare is the start of a rekey (a
                # migration, a recovery from a dead GPN) whose etcd writes come next
                if self._stop.wait(SPI_REFILL_DELAY_S):
                    return
                if vip not in self._tenant_vips():
                    return  # its tenant went meanwhile
                lease = self._lease.id if self._lease else 0
                spi = self._reserve_spi(vip, in_use, lease)
                with self._spi_lock:
                    self._spi_stash.setdefault(vip, []).append((spi, lease))
                self._release_spare_spis()  # its tenant may have gone during the reservation
            except ProtegoError as exc:  # the next get_spi reserves its own
                log.warning("could not reserve a spare SPI for VIP %s: %s", vip, exc)
            finally:
                with self._spi_lock:
                    self._spi_refilling.discard(vip)

        threading.Thread(target=refill, name="gmn-spi-stash", daemon=True).start()

    def _counters(self, q: pp.QuerySa) -> Counters | None:
        rec = self._find_record(q.spi, str(q.dst.address) if q.dst else None)
        if rec is None:
            return None
        key, r = rec
        stats = self.view.get_json(sastats_key(r["vip"], q.spi))
        if not stats:
            return None
        last = stats.get("last_use")
        idle = int(max(0, time.time() - last)) if last else None
        return Counters(bytes=int(stats.get("bytes", 0)), packets=int(stats.get("packets", 0)), idle=idle)

    def _on_plugin_event(self, ev: Event) -> None:
        if ev.kind in ("add_sa", "del_sa", "update_sa") and not self.state.leader:
            # the standby's charon installs (and removes) the CHILD_SAs mirrored from the
            # active GMN: their records and steering are the active GMN's to write
            return
        try:
            if ev.kind == "add_sa":
                assert isinstance(ev.message, pp.AddSa)
                self._add_sa(ev.message)
            elif ev.kind == "del_sa":
                assert isinstance(ev.message, pp.DelSa)
                self._del_sa(ev.message.spi, str(ev.message.dst.address) if ev.message.dst else None)
            elif ev.kind == "update_sa":
                assert isinstance(ev.message, pp.UpdateSa)
                self._update_sa(ev.message)
            elif ev.kind in ("dump", "flush_sas"):
                if ev.kind == "dump":
                    # the plugin (re)connected: charon may have restarted, so whatever
                    # we loaded before may be gone; reload (existing SAs are unaffected)
                    self.state.loaded.clear()
                    self._conns_ok = False
                    if self.ha is not None:
                        self.ha.charon_restarted()
                    self._kick()
                self._reconcile_records()
        except ProtegoError as exc:
            log.error("handling %s failed: %s", ev.kind, exc)
            if ev.kind == "add_sa":
                raise  # the plugin server answers FAILED: charon must not use an SA without a record

    def _find_record(self, spi: int, dst: str | None) -> tuple[str, dict[str, Any]] | None:
        hexspi = spi_hex(spi)
        for key, rec in self._sa_records().items():
            if rec.get("spi") == hexspi and (dst is None or rec.get("dst") == dst):
                return key, rec
        return None

    def _add_sa(self, sa: pp.AddSa) -> None:
        owner = find_owner(sa, self.tenants(), self.tunnels())
        if owner is None:
            log.error("SA %08x (%s -> %s) belongs to no known tunnel; not placed", sa.spi, sa.src, sa.dst)
            return
        t, tun = owner.tenant.name, owner.tunnel.name
        if self._find_record(sa.spi, str(sa.dst.address) if sa.dst else None) is not None:
            # an SA this GMN's charon took over from the other GMN (HA): its record and
            # steering are in place already; placing it again could move it
            log.debug("tunnel %s/%s: SA %08x already recorded: adopted", t, tun, sa.spi)
            return
        self._catch_up()
        with self._sa_lock:
            placement = self._placement(t, tun)
            pinned = self.state.pinned.get((t, tun)) or placement.get("next_gpn")
            if sa.inbound:
                try:
                    gpn = choose_gpn(self.gpn_views(), placement.get("gpn"), pinned)
                except NoGpnError as exc:
                    self._unplaced(sa, t, tun, exc)
                    return
                self.state.pending_gpn[(t, tun)] = gpn
            else:
                gpn = self.state.pending_gpn.pop((t, tun), None) or placement.get("gpn") or ""
                self.state.pinned.pop((t, tun), None)  # the pin is consumed by this CHILD_SA
                if not gpn:
                    try:
                        gpn = choose_gpn(self.gpn_views(), None, pinned)
                    except NoGpnError as exc:
                        self._unplaced(sa, t, tun, exc)
                        return
            seal_to = sealing.parse_public((self._gpn_nodes().get(gpn) or {}).get("seal_key"))
            if seal_to is None:  # never a key in clear in etcd
                raise PeerError(f"tunnel {t}/{tun}: GPN {gpn} has published no sealing key; SA {sa.spi:08x} "
                                f"not placed")
            rec = sa_record(sa, owner, gpn, self.cfg.node, seal_to=seal_to)
            ops = [PutOp(sa_key(owner.vip, sa.spi), encode_json(rec))]
            deferred = (not sa.inbound and not sa.initiator
                        and bool(self._outbound_records(t, tun, exclude_spi=sa.spi)))
            gpns = self.gpn_views()
            # steering entries are checked the way the GIN/GEN will read them: a bad one is
            # refused here, where it is written, not dropped silently there
            if sa.inbound:
                steer_key, steer = steer_in_key(owner.vip, sa.spi), steer_in_record(owner, gpn)
                validate_steer_in(steer_key[len(PREFIX):], steer, gpns)
                ops += [PutOp(steer_key, encode_json(steer)), DeleteOp(spi_reservation_key(owner.vip, sa.spi))]
            elif deferred:
                # we answered the peer's rekey: the peer installs its new inbound SA only
                # when our response arrives, so the data path keeps the old outbound SA
                # until the peer deletes it (or for DEFER_SWITCH_S at the most)
                ops += [PutOp(placement_key(t, tun), encode_json({"gpn": gpn}))]
                self.state.deferred[(t, tun)] = (time.monotonic(), False)
                log.info("tunnel %s/%s: outbound switch to %08x deferred until the peer deletes the old SA",
                         t, tun, sa.spi)
            else:
                steer_key, steer = steer_out_key(t, tun), steer_out_record(owner, gpn, sa.spi, rec["local_ts"])
                validate_steer_out(steer_key[len(PREFIX):], steer, gpns)
                ops += [PutOp(placement_key(t, tun), encode_json({"gpn": gpn}))]
                source = str((self.view.get_json(steer_key) or {}).get("gpn", ""))
                if sa.initiator and source not in ("", gpn) and source in gpns and not gpns[source].failed:
                    # our rekey moves the tunnel off a live GPN (a migration, a drain): its
                    # old outbound SA there goes on working (it lingers there after charon
                    # deletes it, the peer keeps its inbound twin for seconds), so the
                    # GIN/GEN switch only once the new GPN has the SA (_await_switch):
                    # switched together, the GEN was faster than the GPN, and the new GPN
                    # held the tunnel's frames for tens of ms (a TCP stream's ACKs: a dip)
                    self.state.steer_pending[(t, tun)] = sa.spi
                    pending_steer: tuple[str, dict[str, Any]] | None = (steer_key, steer)
                else:
                    # the SA and the steering of the tunnel's outbound traffic to it in one
                    # transaction: a rekey on the same GPN, or a recovery from a dead one
                    # (the sooner the GEN sends to the new GPN, the better; frames that
                    # arrive before the SA are held there until its route arrives,
                    # ROUTE_HOLD in protego/gpn/worker.py, instead of dropped)
                    ops += [PutOp(steer_key, encode_json(steer))]
                    pending_steer = None
                self.state.deferred.pop((t, tun), None)
            if not sa.inbound and sa.initiator and not deferred:
                # before the transaction: a migration's progress check must not see the
                # tunnel's new records and take it as switched before they are acknowledged
                self.state.acking_out.add((t, tun))
            # submitted under the lock (transactions commit in the order of the decisions),
            # waited for without it: other tunnels' SAs (a recovery's, all at once) are
            # placed meanwhile, and commit with this one
            commit = self._commits.submit(ops)
        try:
            revision = commit.result()
        except BaseException:
            self.state.acking_out.discard((t, tun))
            self.state.steer_pending.pop((t, tun), None)
            raise
        log.info("tunnel %s/%s: %s SA %08x placed on %s", t, tun, rec["direction"], sa.spi, gpn)
        if sa.inbound and sa.initiator:
            # our rekey (a migration, a recovery, a lifetime): the peer uses the new
            # SAs only once charon deletes the old ones, after the outbound SA's add_sa,
            # which is charon's next call: that call waits for this SA too
            self.state.unacked_in[(t, tun)] = (gpn, revision, sa.spi)
            return
        unacked = self.state.unacked_in.pop((t, tun), None) if not sa.inbound else None
        if unacked is not None:
            in_gpn, in_rev, in_spi = unacked
            self._wait_applied(in_gpn, in_rev, f"{t}/{tun} SA {in_spi:08x}")
        if not sa.inbound and sa.initiator and not deferred:
            # our CHILD_SA (a rekey: a migration, a recovery, a lifetime): charon's next step
            # is the DELETE of the old CHILD_SA, upon which the peer sends on our new inbound
            # SA, acknowledged just above; the peer has had its own new inbound SA since its
            # response. So charon goes on at once, and this SA's acknowledgement (the GPN has
            # it, the GEN steers to it: frames arriving first are held by the GPN) is awaited
            # aside: the peer's traffic then moves one round of acknowledgements sooner,
            # which is what a recovery from a dead GPN waits for
            threading.Thread(target=self._await_switch, args=(gpn, revision, t, tun, sa.spi, pending_steer),
                             daemon=True, name="gmn-switch-ack").start()
            return
        # charon answers the peer (or deletes the old SA) only after add_sa returns: hold
        # it until the GPN has installed the SA and the GIN/GEN steer it, so that neither
        # side ever uses an SA the data path does not have yet (no loss on rekey)
        self._wait_applied(gpn, revision, f"{t}/{tun} SA {sa.spi:08x}", sas_only=deferred)
        if not sa.inbound and not deferred:
            self.state.switched_at[(t, tun)] = time.time()

    def _unplaced(self, sa: pp.AddSa, tenant: str, tunnel: str, exc: NoGpnError) -> None:
        """charon installs ``sa`` although no GPN can take it now (its add_sa is not failed:
        a CHILD_SA refused here is not negotiated again, while a recorded one carries
        traffic as soon as a GPN is back): placed by ``_place_unplaced``."""
        dst = str(sa.dst.address) if sa.dst else ""
        self.state.unplaced[(sa.spi, dst)] = sa
        log.error("tunnel %s/%s: %s; SA %08x placed once a GPN is usable", tenant, tunnel, exc, sa.spi)
        self._kick()

    def _place_unplaced(self) -> None:
        """The SAs ``_add_sa`` could not place, placed now that a GPN is usable (inbound SAs
        first: a CHILD_SA's outbound SA follows its inbound one); those charon no longer
        holds are forgotten. Before, they waited for the next full pass (RECORD_GRACE_S and
        resync_interval: up to 40 s) while charon used them, a restarted GPN's tunnels
        unreachable meanwhile (seen in CI)."""
        if not self.state.unplaced or not any(g.usable for g in self.gpn_views().values()):
            return
        with self.server._lock:
            held = {(k[0], k[2]) for k in self.server.sas}
        todo = sorted(self.state.unplaced.items(), key=lambda kv: not kv[1].inbound)
        self.state.unplaced.clear()
        for key, sa in todo:
            if key not in held:
                continue  # charon deleted it meanwhile
            if self._find_record(sa.spi, key[1] or None) is not None:
                continue  # placed meanwhile (a full pass)
            try:
                self._add_sa(sa)  # puts it back into unplaced if no GPN can take it after all
            except ProtegoError as exc:
                log.warning("SA %08x: placing it failed (%s); retried at the next pass", sa.spi, exc)
                self.state.unplaced[key] = sa

    def _await_switch(self, gpn: str, revision: int, tenant: str, tunnel: str, spi: int,
                      steer: tuple[str, dict[str, Any]] | None = None) -> None:
        """The acknowledgement of a new outbound SA whose add_sa did not wait for it: both
        directions now run through ``gpn`` (``switched_at``, a migration's switch time).
        ``steer`` (the tunnel moves off a live GPN): the steering of its outbound traffic,
        written once ``gpn`` has acknowledged the SA (make before break)."""
        what = f"{tenant}/{tunnel} SA {spi:08x}"
        try:
            if steer is not None:
                self._wait_applied(gpn, revision, what, sas_only=True)
                self._catch_up()
                commit: Future[int] | None = None
                with self._sa_lock:
                    if self.state.steer_pending.get((tenant, tunnel)) == spi:
                        commit = self._switch_steering(tenant, tunnel, spi, *steer)
                # waited for without the lock: charon's DELETE of the old outbound SA, on
                # its way to the peer's switch, takes the lock meanwhile. The switch stays
                # pending until the end (finally): that DELETE's del_sa then leaves the
                # steering to this switch and removes the old record aside, instead of
                # moving the steering itself and waiting for the GIN/GEN
                revision = commit.result() if commit is not None else 0  # 0: not written
                if revision:
                    # a change of steering alone: the GIN/GEN's acknowledgement (the GPN
                    # routes to its newest outbound SA of the tunnel already, and it
                    # acknowledges the lower of its SA and steering views' revisions,
                    # which a steering-only transaction never raises in the former)
                    self._wait_applied(gpn, revision, what, lb_only=True)
            else:
                self._wait_applied(gpn, revision, what)
        except ProtegoError as exc:
            log.warning("tunnel %s/%s: outbound SA %08x: %s", tenant, tunnel, spi, exc)
            if steer is not None:
                self.state.repair_due = True  # the steering may still name the old SA
        finally:
            if self.state.steer_pending.get((tenant, tunnel)) == spi:
                self.state.steer_pending.pop((tenant, tunnel), None)
            self.state.switched_at[(tenant, tunnel)] = time.time()
            self.state.acking_out.discard((tenant, tunnel))
            self._kick()

    def _switch_steering(self, tenant: str, tunnel: str, spi: int, key: str,
                         steer: dict[str, Any]) -> Future[int] | None:
        """Steer the tunnel's outbound traffic to its new SA (``_await_switch``, under the SA
        lock, our view caught up), if that SA's record is still there: the transaction,
        submitted (None if there is nothing to write)."""
        if self._find_record(spi, None) is None:
            log.info("tunnel %s/%s: outbound SA %08x went before its switch; steering left", tenant, tunnel, spi)
            return None
        return self._commits.submit([PutOp(key, encode_json(steer))])

    def _wait_applied(self, gpn: str, revision: int, what: str, sas_only: bool = False,
                      lb_only: bool = False) -> None:
        """``sas_only``: only the GPN's installation counts (nothing is steered to the SA yet);
        ``lb_only``: only the GIN/GEN (a change of steering alone: a GPN acknowledges the
        lower of its SA and steering views' revisions, and its SA view never sees it)."""
        field_ = "sas_revision" if sas_only else "revision"
        deadline = time.monotonic() + self.cfg.apply_timeout
        t0 = time.monotonic()
        with self._applied:
            while True:
                keys = self._ack_keys(gpn)
                if sas_only:
                    keys = [k for k in keys if k.startswith(f"{PREFIX}gpn/applied/")]
                elif lb_only:
                    keys = [k for k in keys if k.startswith(f"{PREFIX}lb/applied/")]
                pending = [k for k in keys if self._ack_value(k, field_) < revision]
                if not pending:
                    log.debug("%s: data path ready after %.1f ms", what, (time.monotonic() - t0) * 1000)
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("%s: not acknowledged by %s within %.1f s; going on", what,
                                ", ".join(k.rsplit("/", 2)[-2] + "/" + k.rsplit("/", 1)[1] for k in pending),
                                self.cfg.apply_timeout)
                    return
                self._applied.wait(min(left, 0.05))

    def _ack_keys(self, gpn: str) -> list[str]:
        """The acknowledgements to wait for: the SA's GPN (if registered) and every GIN/GEN."""
        keys = [kv.key for kv in self.view.items(f"{PREFIX}lb/applied/")]
        if self.view.get(f"{PREFIX}gpn/nodes/{gpn}") is not None and \
                self.view.get(f"{PREFIX}gpn/applied/{gpn}") is not None:
            keys.append(f"{PREFIX}gpn/applied/{gpn}")
        return keys

    def _sa_txn(self, ops: list[Any]) -> int:
        """One transaction of SA records and steering (committed in submission order, maybe
        with others: ``_GroupCommit``); its revision is what ``_catch_up`` waits for."""
        return self._commits.submit(ops).result()

    def _committed(self, revision: int) -> None:
        self._own_rev = max(self._own_rev, revision)

    def _catch_up(self) -> None:
        """Wait until our view of etcd holds our own latest SA transaction. charon's calls
        follow each other faster than the watch may deliver that transaction back to us
        (an outbound add_sa no longer waits for its acknowledgement), and the next call
        reads the view: the DELETE of a rekeyed outbound SA looks there for the tunnel's
        other outbound SA, and without it would remove the tunnel's steering."""
        want = self._own_rev
        if self.view.revision >= want:
            return
        deadline = time.monotonic() + self.cfg.apply_timeout
        with self._applied:
            while self.view.revision < want:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("our view of etcd is at revision %d, not yet at our own write %d; going on",
                                self.view.revision, want)
                    return
                self._applied.wait(min(left, 0.05))

    def _prune_deleting(self) -> None:
        """Forget the deletions submitted aside that our view now reflects (or that a full
        pass made since, should the submitted one have failed)."""
        self._deleting = {k for k in self._deleting if self.view.get(k) is not None}

    def _del_sa(self, spi: int, dst: str | None) -> None:
        self._catch_up()
        with self._sa_lock:
            self._prune_deleting()
            found = self._find_record(spi, dst)
            if found is None:
                # perhaps not yet mirrored: look it up in etcd itself
                for vip in self._tenant_vips():
                    kv = self.etcd.get(sa_key(vip, spi))
                    if kv is not None and (dst is None or kv.json().get("dst") == dst):
                        found = (kv.key, kv.json())
                        break
            if found is None:
                return
            key, rec = found
            ops: list[Any] = [DeleteOp(key), DeleteOp(sastats_key(rec["vip"], spi))]
            steer_first: list[Any] = []
            moves_to: str | None = None
            aside = False
            if rec["direction"] == "in":
                ops += [DeleteOp(steer_in_key(rec["vip"], spi)), DeleteOp(spi_reservation_key(rec["vip"], spi))]
            elif self.state.steer_pending.get((rec["tenant"], rec["tunnel"])) not in (None, spi):
                # the old SA of a tunnel whose traffic moves to its new SA on another GPN
                # once that GPN has it (_await_switch): that switch moves the steering; the
                # old SA lingers on its GPN meanwhile (OUTBOUND_LINGER_S in the GPN agent).
                # Its record goes aside: charon's DELETE of the old CHILD_SA, upon which the
                # peer moves to the new one, follows this call and need not wait for etcd
                # (should the transaction fail, the next full pass removes the record)
                aside = True
            else:
                repoint = self._repoint_outbound(rec, exclude=key)
                moves_to = next((json.loads(op.value).get("gpn") for op in repoint if isinstance(op, PutOp)), None)
                if moves_to and moves_to != rec.get("gpn"):
                    steer_first = repoint  # the tunnel's outbound traffic moves to another GPN
                else:
                    ops += repoint
                    # an outbound SA, the steering (if any) staying on its GPN: charon's next
                    # step is the DELETE of the old CHILD_SA, which nothing here needs to
                    # precede. Waiting for this commit put an etcd round trip under the SA
                    # lock on every rekey's path to the peer: in a recovery, del_sa took
                    # 21.5 ms (median of 30 trials) with three tunnels' deletions in a row
                    aside = True
            if aside:
                what = f"{rec['tenant']}/{rec['tunnel']} SA {spi:08x}"

                def failed(f: Future[int]) -> None:
                    if f.exception() is not None:
                        log.warning("%s: record not removed (%s); the next full pass removes it", what, f.exception())

                if rec["direction"] == "out":
                    self._deleting.add(key)  # until our view no longer holds it (_prune_deleting)
                self._commits.submit(ops).add_done_callback(failed)
            elif not steer_first:
                self._sa_txn(ops)
        if steer_first:
            # The GIN/GEN must send the tunnel's traffic to the other GPN before this one drops
            # the SA and with it its route for the tunnel (written together, this GPN could
            # remove the route while the GEN still sends here). charon waits meanwhile.
            revision = self._sa_txn(steer_first)
            self._wait_applied(str(moves_to), revision, f"{rec['tenant']}/{rec['tunnel']} steering to {moves_to}",
                               lb_only=True)
            with self._sa_lock:
                self._sa_txn(ops)
        log.info("tunnel %s/%s: %s SA %08x removed", rec["tenant"], rec["tunnel"], rec["direction"], spi)

    def _outbound_records(self, tenant: str, tunnel: str, exclude_spi: int | None = None
                          ) -> list[tuple[str, dict[str, Any]]]:
        hexspi = spi_hex(exclude_spi) if exclude_spi is not None else None
        return [(k, r) for k, r in self._sa_records().items()
                if r.get("tenant") == tenant and r.get("tunnel") == tunnel and r.get("direction") == "out"
                and r.get("spi") != hexspi and k not in self._deleting]

    def _switch_deferred(self) -> None:
        """Outbound switches deferred for a peer's rekey that the peer never completed
        with a DELETE: DEFER_SWITCH_S after our response (charon's child-rekey event) the
        peer has long installed its inbound SA; without that event, DEFER_UNANSWERED_S
        after the SA was placed."""
        now = time.monotonic()
        for (t, tun), (since, answered) in list(self.state.deferred.items()):
            waited = now - since
            if waited < (DEFER_SWITCH_S if answered else DEFER_UNANSWERED_S):
                continue
            with self._sa_lock:
                if self.state.deferred.get((t, tun)) != (since, answered):
                    continue  # switched, or answered, meanwhile
                self.state.deferred.pop((t, tun), None)
                cur = self.view.get_json(steer_out_key(t, tun)) or {}
                ops = self._repoint_outbound({"tenant": t, "tunnel": tun, "spi": cur.get("spi")}, exclude="",
                                             force=True)
                if ops:
                    self._sa_txn(ops)
                    log.info("tunnel %s/%s: deferred outbound switch done %.1f s after %s", t, tun, waited,
                             "our response" if answered else "the SA was placed (charon's child-rekey event missed)")

    def _repair_steering(self) -> None:
        """Outbound steering that names an SA without a record, while the tunnel has
        outbound SAs: steer it to the newest. Not a step of any flow here; what a GMN that
        stopped between a make-before-break SA and its steering (_await_switch) leaves
        behind for the one that takes over (its old SA has gone, and the GPN that held it
        keeps it only OUTBOUND_LINGER_S)."""
        self._catch_up()
        with self._sa_lock:
            spis: dict[tuple[str, str], set[str]] = {}  # tunnel -> its outbound SAs' SPIs
            for r in self._sa_records().values():
                if r.get("direction") == "out":
                    spis.setdefault((r.get("tenant"), r.get("tunnel")), set()).add(r.get("spi"))
            for key, cur in self.view.json_items(f"{PREFIX}steer/out/").items():
                tunnel_id = steer_out_tunnel(key)
                if tunnel_id is None or not isinstance(cur, dict):
                    continue
                t, tun = tunnel_id
                if (tunnel_id in self.state.steer_pending or tunnel_id in self.state.deferred
                        or not spis.get(tunnel_id) or cur.get("spi") in spis[tunnel_id]):
                    continue
                ops = self._repoint_outbound({"tenant": t, "tunnel": tun, "spi": cur.get("spi")}, exclude="")
                if ops:
                    self._sa_txn(ops)
                    log.warning("tunnel %s/%s: outbound steering named SA %s, which has no record; repaired",
                                t, tun, cur.get("spi"))

    def _repoint_outbound(self, rec: dict[str, Any], exclude: str, force: bool = False) -> list[Any]:
        """After an outbound SA goes, steer the tunnel to its newest remaining outbound SA."""
        t, tun = rec["tenant"], rec["tunnel"]
        cur = self.view.get_json(steer_out_key(t, tun)) or {}
        if not force and cur.get("spi") not in (None, rec["spi"]):
            # not the SA the tunnel is steered to (an older one the peer still held: libreswan
            # keeps two generations and deletes the older at its next rekey): a deferred
            # switch still waits for the DELETE of the SA being replaced
            return []
        self.state.deferred.pop((t, tun), None)
        others = [(k, r) for k, r in self._sa_records().items()
                  if k != exclude and k not in self._deleting
                  and r.get("tenant") == t and r.get("tunnel") == tun and r.get("direction") == "out"]
        if not others:
            return [DeleteOp(steer_out_key(t, tun))]
        _k, newest = max(others, key=lambda kr: kr[1].get("created", 0))
        tenant = next((x for x in self.tenants() if x.name == t), None)
        tunnel = next((x for x in self.tunnels() if x.tenant == t and x.name == tun), None)
        if tenant is None or tunnel is None:
            return [DeleteOp(steer_out_key(t, tun))]
        owner = Owner(tenant, tunnel)
        return [PutOp(steer_out_key(t, tun), encode_json(
            steer_out_record(owner, newest["gpn"], int(newest["spi"], 16), newest["local_ts"])))]

    def _update_sa(self, msg: pp.UpdateSa) -> None:
        self._catch_up()
        with self._sa_lock:
            found = self._find_record(msg.spi, str(msg.dst.address) if msg.dst else None)
            if found is None or msg.new_src is None or msg.new_dst is None:
                return
            key, rec = found
            rec.update(src=str(msg.new_src.address), dst=str(msg.new_dst.address),
                       sport=msg.new_src.port, dport=msg.new_dst.port,
                       encap=bool(msg.flags & pp.SaFlag.NEW_ENCAP) or rec.get("encap", False))
            self._sa_txn([PutOp(key, encode_json(rec))])

    # ------------------------------------------------------------------ migration (paper §4.5)
    def _handle_migrations(self) -> None:
        """Requests under ``requests/migrate/<tenant>/<tunnel>``: pin the tunnel's next
        placement to the target GPN and ask charon to rekey its CHILD_SA; the new SAs
        land on the target (``_add_sa``), steering follows the records, charon deletes
        the old SAs and their records go with them."""
        for kv in self.view.items(MIGRATE_PREFIX):
            key, req = kv.key, self.view.get_json(kv.key)
            if req is None:
                continue  # not an object: refused (the view names it)
            self._req_rev[key] = kv.mod_revision
            parts = key[len(MIGRATE_PREFIX):].split("/")
            if len(parts) != 2:
                continue
            tenant, tunnel = parts
            state = req.get("state", "requested")
            try:
                if state == "requested":
                    self._start_migration(key, tenant, tunnel, req)
                elif state == "rekeying":
                    self._check_migration(key, tenant, tunnel, req)
            except ProtegoError as exc:
                self._finish_migration(key, tenant, tunnel, req, "failed", str(exc))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a malformed request
                self.refused.refuse(key, kv.mod_revision, f"malformed migration request ({type(exc).__name__}: {exc})")

    def _start_migration(self, key: str, tenant: str, tunnel: str, req: dict[str, Any]) -> None:
        target = str(req.get("to", ""))
        gpns = self.gpn_views()
        if target not in gpns or not gpns[target].usable:
            self._finish_migration(key, tenant, tunnel, req, "failed", f"GPN {target!r} is not a healthy GPN")
            return
        if self.view.get(f"{PREFIX}tunnels/{tenant}/{tunnel}") is None:
            self._finish_migration(key, tenant, tunnel, req, "failed", "no such tunnel")
            return
        if (self._placement(tenant, tunnel)).get("gpn") == target:
            # nothing to move (a rekey would only burn an SA pair): said so, not pretended
            self._finish_migration(key, tenant, tunnel, {**req, "from": target}, "done", f"already on {target}")
            return
        name = conn_name(tenant, tunnel)
        with ViciClient(self.cfg.vici_socket) as v:
            child = newest_child(v.list_sas(name))
            if child is None:
                self._finish_migration(key, tenant, tunnel, req, "failed", "the tunnel has no established CHILD_SA")
                return
            place = self._placement(tenant, tunnel)
            source = place.get("gpn")
            with self._sa_lock:
                # the request's state and the pin in one transaction (the pin in memory
                # is what places the new SAs; the one in etcd outlives this GMN)
                if not self._update_request(key, {**req, "state": "rekeying", "from": source, "started": time.time(),
                                                  "old_spi_in": child.get("spi_in"), "by": self.cfg.node,
                                                  "attempts": 1, "attempted": time.time()},
                                            [PutOp(placement_key(tenant, tunnel),
                                                   encode_json({**place, "next_gpn": target}))]):
                    return  # withdrawn meanwhile
                self.state.pinned[(tenant, tunnel)] = target
                self.state.switched_at.pop((tenant, tunnel), None)
            v.rekey_child(child["child_id"])
        self._event("migration-started", tenant, tunnel, f"{source} -> {target}")
        log.info("tunnel %s/%s: migrating %s -> %s (rekey of CHILD_SA %s, %.1f ms after the request)", tenant,
                 tunnel, source, target, child["child_id"], (time.time() - float(req.get("requested", 0))) * 1000)

    def _check_migration(self, key: str, tenant: str, tunnel: str, req: dict[str, Any]) -> None:
        target = req["to"]
        recs = [r for r in self._sa_records().values()
                if r.get("tenant") == tenant and r.get("tunnel") == tunnel]
        out = self.view.get_json(steer_out_key(tenant, tunnel)) or {}
        switched = out.get("gpn") == target and any(r["direction"] == "in" and r["gpn"] == target for r in recs) \
            and (tenant, tunnel) not in self.state.acking_out
        if switched and "switched" not in req:
            # when the data path acknowledged both directions (_add_sa), if it was this
            # migration's rekey; otherwise (the peer's rekey won a collision) now
            at = self.state.switched_at.pop((tenant, tunnel), None)
            req = {**req, "switched": at if at is not None and at >= float(req.get("started", 0)) else time.time()}
            if not self._update_request(key, req):
                return
            self._event("migration-switched", tenant, tunnel, f"now on {target}")
            log.info("tunnel %s/%s: switched to %s %.1f ms after the request", tenant, tunnel, target,
                     (req["switched"] - float(req.get("requested", 0))) * 1000)
        if switched and all(r["gpn"] == target for r in recs):
            self._finish_migration(key, tenant, tunnel, req, "done", f"moved to {target}")
        elif (not any(r["gpn"] == target for r in recs)
              and time.time() - float(req.get("attempted", req.get("started", 0))) > MIGRATION_RETRY_S
              and int(req.get("attempts", 1)) < MIGRATION_ATTEMPTS):
            # nothing landed on the target: charon dropped our rekey (it collided with the
            # peer's own rekey of the same CHILD_SA, which then replaced it): ask again,
            # for the CHILD_SA that is current now
            with ViciClient(self.cfg.vici_socket) as v:
                child = newest_child(v.list_sas(conn_name(tenant, tunnel)))
                req = {**req, "attempts": int(req.get("attempts", 1)) + 1, "attempted": time.time()}
                if child is None or not self._update_request(key, req):
                    return
                with self._sa_lock:
                    self.state.pinned[(tenant, tunnel)] = target
                v.rekey_child(child["child_id"])
            log.info("tunnel %s/%s: migration to %s: nothing there yet; rekey asked again (attempt %d)",
                     tenant, tunnel, target, req["attempts"])
        elif time.time() - float(req.get("started", 0)) > MIGRATION_TIMEOUT:
            self._finish_migration(key, tenant, tunnel, req, "failed",
                                   f"not on {target} after {MIGRATION_TIMEOUT:.0f} s")

    def _update_request(self, key: str, value: dict[str, Any], extra: Sequence[Any] = ()) -> bool:
        """Compare-and-swap a request we read: one its requester removed is never
        resurrected. ``extra`` ops are written in the same transaction."""
        rev = self._req_rev.get(key, 0)
        if not rev:
            return False
        data = encode_json(value)
        if not extra:
            new = self.etcd.cas_rev(key, data, rev)
        else:
            res = self.etcd.txn([mod_revision_is(key, rev)], [PutOp(key, data), *extra])
            new = res.revision if res.succeeded else None
            if new is None:  # lost, or an attempt that timed out was applied before a retry
                kv = self.etcd.get(key)
                new = kv.mod_revision if kv is not None and kv.value == data and kv.mod_revision > rev else None
        if new is None:
            return False
        self._req_rev[key] = new
        return True

    def _finish_migration(self, key: str, tenant: str, tunnel: str, req: dict[str, Any], state: str,
                          detail: str) -> None:
        self._update_request(key, {**req, "state": state, "detail": detail, "finished": time.time()})
        if state == "failed":
            with self._sa_lock:
                self.state.pinned.pop((tenant, tunnel), None)
                place = self.view.get_json(placement_key(tenant, tunnel))
                if place and place.get("next_gpn"):
                    place.pop("next_gpn")
                    self.etcd.put_json(placement_key(tenant, tunnel), place)
        self._event(f"migration-{state}", tenant, tunnel, detail)
        (log.info if state == "done" else log.warning)("tunnel %s/%s: migration %s: %s", tenant, tunnel,
                                                       state, detail)

    # ------------------------------------------------------------------ failed GPNs (paper §7.2)
    def _recover_failed_gpns(self) -> None:
        """Tunnels placed on a GPN that is no longer usable (the GIN declared it dead, or
        its agent's registration lease expired) are rekeyed onto healthy GPNs: the IKE SAs
        live here, so it takes one CREATE_CHILD_SA round trip each, all started at once.
        ``_add_sa`` never places on an unusable GPN, so the new SAs land elsewhere and
        the dead GPN's SAs are never used again (charon deletes them after the rekey)."""
        gpns = self.gpn_views()
        now = time.monotonic()
        todo: dict[tuple[str, str], str] = {}
        newest: dict[tuple[str, str], float] | None = None  # tunnel -> its newest SA's creation
        for tun, place in self._placements().items():
            gpn = place.get("gpn")
            if not gpn or (gpn in gpns and not gpns[gpn].failed):
                # on a healthy GPN (again): a later failure must be acted on at once
                self.state.rekey_asked.pop(tun, None)
                continue
            since = now - self.state.rekey_asked.get(tun, -1e9)
            if since < RECOVERY_REASK_S:
                continue
            if since < RECOVERY_RETRY_S:
                if newest is None:
                    newest = self._newest_sa_by_tunnel()
                if newest.get(tun, 0.0) >= time.time() - since:  # created since it was asked
                    continue  # an SA of it landed since: the rekey is under way
                log.warning("tunnel %s/%s: no SA of its recovery rekey landed within %.1f s; asking again",
                            tun[0], tun[1], since)
            todo[tun] = gpn
        if not todo:
            return
        if not any(g.usable for g in gpns.values()):
            if now - self.state.no_gpn_logged > 10:
                self.state.no_gpn_logged = now
                log.error("%d tunnel(s) sit on failed GPNs and no healthy GPN is left to take them", len(todo))
            return
        asked: list[tuple[str, str, str]] = []
        with ViciClient(self.cfg.vici_socket) as v:
            # one listing for all (charon's listing waits for IKE SAs busy in a rekey)
            children: dict[str, list[dict[str, Any]]] = {}
            for sa in v.list_sas():
                children.setdefault(sa.get("ike", ""), []).append(sa)
            for (tenant, tunnel), gpn in sorted(todo.items()):
                self.state.rekey_asked[(tenant, tunnel)] = now
                child = newest_child(children.get(conn_name(tenant, tunnel), []))
                if child is None:
                    continue
                try:
                    v.rekey_child(child["child_id"])
                except PeerError as exc:
                    log.warning("tunnel %s/%s: %s; asked again in %.0f s", tenant, tunnel, exc, RECOVERY_RETRY_S)
                    continue
                state = "dead" if gpn in gpns else "gone"
                log.warning("tunnel %s/%s: GPN %s is %s; rekeying CHILD_SA %s onto a healthy GPN",
                            tenant, tunnel, gpn, state, child["child_id"])
                asked.append((tenant, tunnel, f"{gpn} {state}: rekeying onto a healthy GPN"))
        # the events once every rekey is on its way (each is an etcd write)
        for tenant, tunnel, detail in asked:
            self._event("gpn-failure-rekey", tenant, tunnel, detail)
        for tun in [t for t, when in self.state.rekey_asked.items() if now - when > 120]:
            del self.state.rekey_asked[tun]

    def _newest_sa_by_tunnel(self) -> dict[tuple[str, str], float]:
        """tunnel -> when its newest SA record was created (a recovery rekey that placed
        an SA is under way: its outbound SA, and with it the placement, follow)."""
        out: dict[tuple[str, str], float] = {}
        for r in self._sa_records().values():
            tun = (str(r.get("tenant")), str(r.get("tunnel")))
            out[tun] = max(out.get(tun, 0.0), float(r.get("created", 0) or 0))
        return out

    # ------------------------------------------------------------------ restarted GPNs
    def _rekey_burnt_outbound(self) -> None:
        """A GPN that restarted lost its outbound sequence counters and never reinstalls
        an outbound SA created before it started (a sequence number must never be
        reused): rekey those tunnels' CHILD_SAs. The IKE SA stays; one round trip."""
        started = {name: float(v.get("started") or 0) for name, v in self._gpn_nodes().items()}
        gpns = self.gpn_views()
        now = time.time()
        todo: dict[tuple[str, str], str] = {}
        for key, rec in self._sa_records().items():
            if rec.get("direction") != "out" or rec.get("gpn") not in started:
                continue
            if gpns[rec["gpn"]].failed:
                # back in etcd, not yet on the GIN's heartbeats: the rekey could not place
                # its SAs anywhere (every GPN restarted); asked once the GIN sees it alive
                continue
            if float(rec.get("created", 0)) >= started[rec["gpn"]]:
                continue
            if now - self.state.rekeyed.get(key, 0) < 10:  # asked already; give it time
                continue
            tun = (rec["tenant"], rec["tunnel"])
            if time.monotonic() - self.state.rekey_asked.get(tun, -1e9) < 10:
                continue  # already being rekeyed off a failed GPN
            self.state.rekeyed[key] = now
            self.state.rekey_asked[tun] = time.monotonic()
            todo[tun] = rec["gpn"]
        for key in [k for k, t in self.state.rekeyed.items() if now - t > 60]:
            del self.state.rekeyed[key]
        if not todo:
            return
        with ViciClient(self.cfg.vici_socket) as v:
            for (tenant, tunnel), gpn in sorted(todo.items()):
                child = newest_child(v.list_sas(conn_name(tenant, tunnel)))
                if child is None:
                    continue
                v.rekey_child(child["child_id"])
                self._event("gpn-restart-rekey", tenant, tunnel, f"{gpn} restarted: outbound SA replaced")
                log.info("tunnel %s/%s: %s restarted, rekeying CHILD_SA %s", tenant, tunnel, gpn,
                         child["child_id"])

    # ------------------------------------------------------------------ events
    def _event(self, kind: str, tenant: str | None = None, tunnel: str | None = None, detail: str = "") -> None:
        now = time.time()
        key = f"{EVENTS_PREFIX}{now:017.6f}-{self.cfg.node}-{secrets.token_hex(2)}"
        try:
            self.etcd.put_json(key, {"ts": now, "kind": kind, "tenant": tenant, "tunnel": tunnel,
                                     "node": self.cfg.node, "detail": detail})
            events = sorted(kv.key for kv in self.view.items(EVENTS_PREFIX))
            for old in events[: max(0, len(events) - MAX_EVENTS)]:
                self.etcd.delete(old)
        except ProtegoError as exc:
            log.warning("could not record event %s: %s", kind, exc)

    # ------------------------------------------------------------------ convergence
    def _reconcile_records(self) -> None:
        """Make etcd's SA records of this GMN match what charon has installed."""
        if not self.server.connected or not self.state.leader:
            return
        with self.server._lock:  # a consistent copy of the plugin's view
            # SAs charon installed a moment ago are still being placed by charon's own
            # call (its transaction may be in flight): writing their records here too
            # raced it, and placed a recovered tunnel's outbound SA on the dead GPN again
            # (the placement read before the call's commit; a 10 s outage, seen twice)
            settled = time.monotonic() - RECORD_GRACE_S
            held = {(k[0], k[2]) for k in self.server.sas}
            installed = {(k[0], k[2]): rec.sa for k, rec in self.server.sas.items() if rec.installed <= settled}
        # records the other GMN wrote are this one's after a takeover: once charon has had
        # time to settle (rekeyed SAs linger for delete_rekeyed_delay), a record whose SA
        # this charon does not hold is stale (e.g. the old SA of a rekey the other GMN
        # finished just before it failed)
        adopt = self._active_since is not None and time.monotonic() - self._active_since > ADOPT_GRACE_S
        records = {(int(r["spi"], 16), r["dst"]): (k, r)
                   for k, r in self._sa_records().items()
                   if r.get("gmn") == self.cfg.node or adopt}
        for (spi, dst) in sorted(set(records) - held):
            log.info("SA %08x is gone from charon: removing its record", spi)
            self._del_sa(spi, dst)
        for (spi, dst) in sorted(set(installed) - set(records)):
            log.info("SA %08x has no record: writing it", spi)
            self._add_sa(installed[(spi, dst)])

