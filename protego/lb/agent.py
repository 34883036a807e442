"""The ``protego lb`` agent: a level-triggered reconciler (Calico felix style).

* Three etcd snapshot-and-watch loops (``steer/``, ``gmn/leader``, ``gpn/nodes/``)
  keep an in-memory view; any change wakes the reconcile loop.
* Reconcile = pure :func:`protego.lb.model.build_state` → next-hop slots → desired
  tables; policy routes added first, then ONE nft batch (diff against the read-back
  tables), then stale policy routes removed. Every ``resync_interval`` seconds the
  same runs without a change in etcd: whatever someone else changed in our tables
  or routes is repaired.
* The heartbeat monitor probes every registered GPN and writes ``gpn/health/<gpn>``.

The agent runs inside the lb's network namespace (``ip netns exec``); it never
calls ``setns()``.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protego.control.acks import AckSender
from protego.errors import ProtegoError
from protego.lb import heartbeat as hb
from protego.lb import model, policy, ruleset
from protego.lb.nft import NftAdapter
from protego.lb.routes import RouteAdapter
from protego.store.refused import RefusedPublisher, RefusedRecords
from protego.store.writer import LatestWriter

log = logging.getLogger(__name__)

WATCHED = (model.STEER_IN[:-3], model.GMN_LEADER, model.GPN_NODES, model.TENANTS)  # steer/, gmn/leader, gpn/nodes/, tenants/


@dataclass(frozen=True)
class LbConfig:
    roles: frozenset[str] = frozenset({"gin", "gen"})
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    node: str = field(default_factory=socket.gethostname)
    params: ruleset.Params = field(default_factory=ruleset.Params)
    resync_interval: float = 10.0
    heartbeat: bool = True
    detector: hb.DetectorConfig = field(default_factory=hb.DetectorConfig)
    hb_bind: str = "0.0.0.0"
    hb_port: int = hb.DEFAULT_PORT
    hb_rt_priority: int = 0  # SCHED_FIFO priority of the heartbeat thread (0: normal)
    cleanup_on_exit: bool = False
    status_file: str | None = None  # JSON written every second: reconcile + heartbeat stats
    direct_acks: bool = True  # also tell the GMNs over the fabric (protego/control/acks.py)


class View:
    """Thread-safe etcd view (key without prefix → decoded JSON) of the watched keys."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Any] = {}
        self.changed = threading.Event()
        self.synced: set[str] = set()
        self.revisions: dict[str, int] = {}  # per watched prefix: the newest revision seen

    def handler(self, sub: str) -> Any:
        view = self

        class _H:
            def on_snapshot(self, revision: int, kvs: list[Any]) -> None:
                with view._lock:
                    for k in [k for k in view._entries if k.startswith(sub)]:
                        del view._entries[k]
                    for kv in kvs:
                        view._put(kv.key, kv.value)
                    view.synced.add(sub)
                    view.revisions[sub] = max(view.revisions.get(sub, 0), revision)
                view.changed.set()

            def on_events(self, events: list[Any]) -> None:
                with view._lock:
                    for ev in events:
                        if ev.type.value == "delete":
                            view._entries.pop(model._strip(ev.key), None)
                        else:
                            view._put(ev.key, ev.kv.value)
                        view.revisions[sub] = max(view.revisions.get(sub, 0), ev.revision)
                view.changed.set()

        return _H()

    def _put(self, key: str, value: bytes) -> None:
        import json

        k = model._strip(key)
        try:
            self._entries[k] = json.loads(value)
        except ValueError:
            self._entries[k] = None  # reported by build_state as "not a JSON object"

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._entries)

    def snapshot_with_revision(self, sub: str) -> tuple[dict[str, Any], int]:
        with self._lock:
            return dict(self._entries), self.revisions.get(sub, 0)


class Reconciler:
    """Brings the kernel (nft tables + policy routes) to the state of one snapshot."""

    def __init__(self, cfg: LbConfig, nft: NftAdapter, routes: RouteAdapter | None) -> None:
        self.cfg = cfg
        self.nft = nft
        self.routes = routes
        self.reported: set[str] = set()
        self.last: dict[str, Any] = {}
        self._tables: dict[str, ruleset.Installed] = {}
        self._routes: set[policy.PolicyRoute] | None = None

    def reconcile(self, entries: dict[str, Any], full: bool = True) -> dict[str, Any]:
        """``full``: read back the kernel's state; otherwise trust what the last
        successful reconcile left (the periodic resync and any error read back)."""
        t0 = time.perf_counter()
        if full:
            self._tables.clear()
            self._routes = None
        state = model.build_state(entries)
        for err in state.errors:
            if err not in self.reported:
                log.error("refused etcd entry: %s", err)
        self.reported = set(state.errors)
        if self._routes is None:
            self._routes = self.routes.read() if self.routes else set()
        installed_routes = self._routes
        self._routes = None  # until this reconcile succeeds
        slots = policy.assign_slots({p.addr: p.slot for p in installed_routes if p.addr},
                                    ruleset.wanted_next_hops(state, self.cfg.roles))
        desired_routes = policy.desired_routes(slots)
        plan = policy.plan_routes(installed_routes, desired_routes)
        if self.routes:
            for pr in plan.add:
                self.routes.add(pr)
        tables = ruleset.desired_tables(state, slots, self.cfg.roles, self.cfg.params)
        batch: list[str] = []
        for table in tables:
            installed = self._tables.pop(table.name) if table.name in self._tables else \
                self.nft.read(table.name)
            cmds = ruleset.diff(table, installed)
            if cmds is None:
                log.warning("table %s changed shape: rebuilding it", table.name)
                cmds = ruleset.rebuild(table)
            batch += cmds
        if batch:  # both tables in ONE transaction
            try:
                self.nft.apply(batch)
            except ProtegoError as exc:
                log.warning("incremental update failed (%s): rebuilding our tables", exc)
                batch = [c for t in tables for c in ruleset.rebuild(t)]
                self.nft.apply(batch)
        changes = len(batch)
        if self.routes:
            for pr in plan.remove:
                self.routes.remove(pr)
        # everything applied: cache what the kernel now holds
        self._tables = {t.name: ruleset.as_installed(t) for t in tables}
        self._routes = desired_routes
        self.last = {
            "steer_in": len(state.steer_in), "steer_out": len(state.steer_out),
            "gpns": len(state.gpns), "errors": list(state.errors), "nft_commands": changes,
            "ms": round((time.perf_counter() - t0) * 1000, 3), "slots": slots,
        }
        if changes:
            log.info("reconciled: %d steer/in, %d steer/out, %d GPNs, %d nft commands in %.2f ms",
                     len(state.steer_in), len(state.steer_out), len(state.gpns), changes, self.last["ms"])
        return self.last


HEALTH_RETRY_MAX_S = 2.0  # a health write that failed is tried again at most this long after


class LbAgent:
    def __init__(self, cfg: LbConfig, store: Any, nft: NftAdapter, routes: RouteAdapter | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.store = store
        self.view = View()
        self.reconciler = Reconciler(cfg, nft, routes)
        self.nft = nft
        self.routes = routes
        self._clock = clock
        self._watches: list[Any] = []
        self._acked = 0
        self.acks: AckSender | None = None
        self._ack_writer: LatestWriter[tuple[int, float]] = LatestWriter("lb-ack-writer", self._write_ack,
                                                                         self._ack_failed)
        self._health_q: queue.SimpleQueue[hb.Transition | None] = queue.SimpleQueue()
        self._health_stop = threading.Event()
        self._ack_key_written = False
        # entries the steering refused, published for `protego status` (store/refused.py)
        self.refused = RefusedRecords("lb", cfg.node, clock=clock)
        self._refused_pub = RefusedPublisher(
            self.refused, lambda key, report: self.store.put(key, encode(report)), lambda key: self.store.delete(key))
        self.monitor: hb.HeartbeatMonitor | None = None

    # -- health ------------------------------------------------------------ #
    def _on_transition(self, tr: hb.Transition) -> None:
        level = logging.WARNING if tr.state == "dead" else logging.INFO
        log.log(level, "GPN %s declared %s: %s", tr.gpn, tr.state, tr.reason)
        self._health_q.put(tr)

    def _health_writer(self) -> None:
        while True:
            tr = self._health_q.get()
            if tr is None:
                return
            self._write_health(tr)

    def _write_health(self, tr: hb.Transition) -> bool:
        """Write one GPN's health until it is written (or the agent stops): a GPN that dies
        while etcd is out of reach is declared dead once etcd is back, not never."""
        key = f"{model.PREFIX}{model.GPN_HEALTH}{tr.gpn}"
        attempt = 0
        while not self._health_stop.is_set():
            try:
                cur = self.store.get(key)
                if cur is not None and _state_of(cur) == tr.state:
                    return True  # already so (e.g. after our restart): keep its `since`
                value = {"state": tr.state, "since": self._clock(), "reason": tr.reason, "by": self.cfg.node}
                if self.store.cas(key, encode(value), cur.mod_revision if cur else 0):
                    if attempt:
                        log.info("health of GPN %s (%s) written after %d failed attempt(s)", tr.gpn, tr.state,
                                 attempt)
                    return True
                continue  # somebody wrote meanwhile: look again
            except ProtegoError as exc:
                if attempt % 10 == 0:
                    log.warning("writing health of GPN %s (%s) failed (%s); retrying until written", tr.gpn,
                                tr.state, exc)
                self._health_stop.wait(min(HEALTH_RETRY_MAX_S, 0.1 * 2 ** attempt))
                attempt += 1
        return False

    def _reassert_health(self) -> None:
        """After a resync: every GPN's state as our detector sees it, written where etcd
        says otherwise (a write lost to an outage, a record deleted by hand)."""
        if self.monitor is None:
            return
        now = time.monotonic()
        for gpn, st in self.monitor.stats().items():
            if st.get("state") in ("alive", "dead"):
                self._health_q.put(hb.Transition(gpn, str(st["state"]), "re-asserted after a resync", now))

    # -- main loop --------------------------------------------------------- #
    def wake(self) -> None:
        """Make the loop look at ``stop`` (and etcd) now, e.g. from a signal handler."""
        self.view.changed.set()

    def run(self, stop: threading.Event) -> None:
        for sub in WATCHED:
            self._watches.append(self.store.snapshot_and_watch(
                model.PREFIX + sub, self.view.handler(sub), name=f"lb:{sub}"))
        if self.cfg.direct_acks:
            self.acks = AckSender("lb", self.cfg.node).watch(self.store)
            self._publish_ack_key()
        writer = threading.Thread(target=self._health_writer, name="health-writer", daemon=True)
        writer.start()
        if self.cfg.heartbeat:
            self.monitor = hb.HeartbeatMonitor(hb.Detector(self.cfg.detector), self._on_transition,
                                               bind_addr=self.cfg.hb_bind, port=self.cfg.hb_port,
                                               dscp=self.cfg.params.tag_dscp,
                                               rt_priority=self.cfg.hb_rt_priority)
            self.monitor.start()
        next_resync = time.monotonic() + self.cfg.resync_interval
        next_status = time.monotonic()
        failures = 0
        try:
            while not stop.is_set():
                if self.cfg.status_file and time.monotonic() >= next_status:
                    self.write_status()
                    next_status = time.monotonic() + 1.0
                timeout = max(0.0, min(next_resync, next_status if self.cfg.status_file else next_resync)
                              - time.monotonic())
                if failures:
                    timeout = min(timeout, min(5.0, 0.1 * 2 ** failures))
                woke = self.view.changed.wait(timeout)
                if stop.is_set():
                    break
                self.view.changed.clear()
                if len(self.view.synced) < len(WATCHED):
                    continue  # wait for the first snapshot of every prefix (it sets `changed`)
                if not woke and not failures and time.monotonic() < next_resync:
                    continue
                entries, steer_rev = self.view.snapshot_with_revision(WATCHED[0])
                full = failures > 0 or time.monotonic() >= next_resync
                try:
                    last = self.reconciler.reconcile(entries, full=full)
                    failures = 0
                    self._ack(steer_rev)
                    self.refused.replace({model.PREFIX + e.split(": ", 1)[0]: e for e in last.get("errors", [])})
                except ProtegoError as exc:
                    failures += 1
                    log.error("reconcile failed (%s); retrying", exc)
                except Exception:  # a bug must not take the data path's repairs down
                    failures += 1
                    log.exception("reconcile crashed; retrying")
                self._publish_ack_key()
                try:
                    self._refused_pub.publish()
                except ProtegoError as exc:  # published at a later pass
                    log.warning("could not publish the refused entries: %s", exc)
                if self.monitor is not None:
                    state = model.build_state(entries)
                    self.monitor.set_gpns({g.name: g.fabric_addr for g in state.gpns.values()})
                if time.monotonic() >= next_resync:
                    next_resync = time.monotonic() + self.cfg.resync_interval
                    self._reassert_health()
        finally:
            self._health_stop.set()
            self.close()
            self._health_q.put(None)
            writer.join(2)

    def _publish_ack_key(self) -> None:
        """The key the GMNs check our acknowledgement datagrams with (``acks/keys/lb/<node>``);
        retried at the next pass while etcd is out of reach (the etcd acknowledgements
        carry on meanwhile)."""
        if self.acks is None or self._ack_key_written:
            return
        try:
            self.store.put(self.acks.key_path, encode(self.acks.key_record()))
            self._ack_key_written = True
        except ProtegoError as exc:
            log.warning("could not publish the acknowledgement key (%s); retrying", exc)

    def _ack(self, revision: int) -> None:
        """Publish the etcd revision of ``steer/`` the kernel now reflects
        (``lb/applied/<node>``); the GMN waits for it before charon uses a new SA."""
        if revision <= self._acked:
            return
        if self.acks is not None:  # the GMNs hear it at once; etcd's record follows (acks.py)
            self.acks.send(revision)
        # written aside (LatestWriter): the next reconcile does not wait for this round trip
        self._ack_writer.submit((revision, self._clock()))
        self._acked = revision

    def _write_ack(self, item: tuple[int, float]) -> None:
        self.store.put(f"{model.PREFIX}lb/applied/{self.cfg.node}", encode({"revision": item[0], "ts": item[1]}))

    def _ack_failed(self, item: tuple[int, float], exc: Exception) -> None:
        """Acknowledged again at the next reconcile (woken now)."""
        log.warning("could not acknowledge revision %d: %s", item[0], exc)
        self._acked = 0
        self.view.changed.set()

    def status(self) -> dict[str, Any]:
        return {"time": self._clock(), "node": self.cfg.node, "roles": sorted(self.cfg.roles),
                "reconcile": self.reconciler.last,
                "heartbeat": self.monitor.stats() if self.monitor is not None else {}}

    def write_status(self) -> None:
        import json

        assert self.cfg.status_file
        tmp = self.cfg.status_file + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.status(), f, sort_keys=True)
            os.replace(tmp, self.cfg.status_file)
        except OSError as exc:
            log.warning("cannot write status file %s: %s", self.cfg.status_file, exc)

    def close(self) -> None:
        self._ack_writer.stop()  # writes the last acknowledgement first
        for w in self._watches:
            w.cancel()
        self._watches = []
        if self.acks is not None:
            self.acks.close()
            self.acks = None
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self.cfg.cleanup_on_exit:
            cleanup(self.nft, self.routes)


def encode(value: Any) -> bytes:
    import json

    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _state_of(kv: Any) -> str | None:
    try:
        v = kv.json()
    except ProtegoError:
        return None
    return v.get("state") if isinstance(v, dict) else None


def cleanup(nft: NftAdapter, routes: RouteAdapter | None) -> dict[str, Any]:
    tables = nft.delete_owned()
    n = routes.remove_all() if routes else 0
    return {"tables": tables, "policy_routes": n}


def pid_info() -> str:
    return f"pid {os.getpid()}"
