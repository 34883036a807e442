"""The GMN agent's HA duties (see :mod:`protego.gmn.ha` for the design), in a process
of their own (:class:`HaProcess` in the agent; ``python -m protego.gmn.ha_service``):
the datagram → etcd path must not wait for the agent's reconcile loop (measured: the
median replication latency was 5-8 ms inside the agent's process, against 1.3 ms for
an etcd client of its own under the same load).

* relay (active): charon's HA datagrams → :class:`HaMirror` → etcd, every write fenced
  on this GMN still holding ``gmn/leader`` under its lease;
* feeder (standby): etcd's mirror → the local charon, continuously;
* takeover: load the mirror from etcd, feed what is missing, check that charon holds
  every mirrored IKE SA and CHILD_SA, then activate them through the HA FIFO;
* statistics under ``gmn/ha/<node>`` (counts and the replication latency histogram:
  kernel receive time of the datagram → etcd's acknowledgement of the write).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from protego.control.model import PREFIX
from protego.errors import ProtegoError
from protego.gmn import ha
from protego.store.etcd import DeleteOp, Etcd, PutOp, encode_json, lease_is
from protego.store.view import PrefixView
from protego.vici_client import ViciClient

log = logging.getLogger(__name__)

STATS_PREFIX = f"{PREFIX}gmn/ha/"
RELAY_NICE = -10  # without the real-time class (--rt-priority 0, or not permitted)
RELAY_RT_PRIORITY = 10  # SCHED_RR, like corosync's and keepalived's real-time option
CHECK_INTERVAL = 5.0  # s between checks that the standby's charon holds the mirror
TAKEOVER_WINDOW_S = 1.0  # replication right after a takeover is also reported apart
VERIFY_TIMEOUT = 2.0  # longest wait for charon to hold every mirrored SA before activating


def charon_holds(vici_socket: str) -> tuple[dict[str, str], dict[int, str]]:
    """(IKE SPIs ``i_r`` → state, inbound CHILD_SA SPI → its IKE SA's SPIs) of a charon."""
    ikes: dict[str, str] = {}
    children: dict[int, str] = {}
    with ViciClient(vici_socket) as v:
        for entry in v.raw_sas():
            for sa in entry.values():
                spis = f"{sa.get('initiator-spi', '')}_{sa.get('responder-spi', '')}"
                ikes[spis] = str(sa.get("state"))
                for c in (sa.get("child-sas") or {}).values():
                    if c.get("spi-in") and c.get("state") == "INSTALLED":
                        children[int(c["spi-in"], 16)] = spis
    return ikes, children


def prune_plan(entries: dict[bytes, list[bytes]], ikes: dict[str, str], children: dict[int, str]) -> list[bytes]:
    """Deletions that make a charon hold no IKE SA or CHILD_SA the mirror does not have
    (e.g. CHILD_SAs rekeyed while this GMN was cut off from etcd)."""
    by_spis = {ha.ike_spis(i): i for i in entries}
    mirrored = {ha.spi_of(m[1]) for msgs in entries.values() for m in _child_spis(msgs)}
    out = [ha.child_delete(by_spis[spis], spi.to_bytes(4, "little"))
           for spi, spis in sorted(children.items()) if spi not in mirrored and spis in by_spis]
    for spis in sorted(set(ikes) - set(by_spis)):
        i, _, r = spis.partition("_")
        try:
            raw = bytes.fromhex(i) + bytes.fromhex(r)
        except ValueError:
            continue
        if len(raw) == 16:
            out += [ha.ike_delete(bytes([2]) + raw + bytes([flag])) for flag in (0, 1)]  # either role
    return out


def _child_spis(msgs: list[bytes]) -> list[tuple[bytes, bytes]]:
    out = []
    for raw in msgs:
        if len(raw) > 1 and raw[1] == ha.CHILD_ADD:
            m = ha.parse(raw)
            if m.inbound_spi:
                out.append((raw, m.inbound_spi))
    return out


SLOW_MS = 20.0  # a replication slower than this (the target) is logged
WRITERS = 4  # mirror transactions in flight at once (each for other IKE SAs)
RETRY_MIN_S, RETRY_MAX_S = 0.02, 1.0  # back-off between mirror writes after etcd errors


class HaService:
    """Relay, feeder and takeover. The agent tells it charon's pid, whether charon holds
    every connection, and the lease that fences the mirror writes; ``wake`` is called
    when the agent should re-run its election (fenced, or newly ready to stand)."""

    def __init__(self, node: str, etcd: Etcd, vici_socket: str, leader_key: str,
                 wake: Callable[[], None] = lambda: None,
                 local: str = ha.AGENT_HA_ADDR, charon: str = ha.CHARON_HA_ADDR, port: int = ha.HA_PORT) -> None:
        self.node = node
        self.etcd = etcd
        self.vici_socket = vici_socket
        self.leader_key = leader_key
        self.lease = 0
        self.pid: int | None = None
        self.conns_ready = False
        self._wake = wake
        self._addr = (local, charon, port)
        self.view = PrefixView(on_change=self._kick_feeder)
        self.mirror = ha.HaMirror()
        self.feeder = ha.HaFeeder()
        self.hist = ha.LatencyHistogram()
        self.hist_steady = ha.LatencyHistogram()  # not within TAKEOVER_WINDOW_S of an activation
        # where the replication time goes: receive -> the txn carrying it starts, and the txn
        self.hist_queue = ha.LatencyHistogram()
        self.hist_txn = ha.LatencyHistogram()
        self.active = False
        self.fed_ok = False  # the local charon holds everything etcd mirrors (standby)
        self.counts = {"received": 0, "mirrored": 0, "ignored": 0, "malformed": 0, "fed": 0, "write_errors": 0,
                       "fenced": 0}
        self._lock = threading.RLock()  # mirror + feeder + activation
        self._feed = threading.Event()
        self._stop = threading.Event()
        self._reset_feeder = True
        self._dirty: dict[bytes, None] = {}  # entries to write
        self._busy: set[bytes] = set()  # entries with a write in flight
        # per entry, the datagrams waiting for it: [kernel receive time, entries left to write]
        self._pending: dict[bytes, list[list[float]]] = {}
        self._retry_at = 0.0  # after an etcd error, no write before this (monotonic)
        self._backoff = 0.0
        self._epoch = 0  # activations: a write started before the last one is not counted
        self._idle = threading.Condition(self._lock)
        self._writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="gmn-ha-write")
        self._act_t = 0.0
        self._threads: list[threading.Thread] = []
        self._watch: Any = None
        self.sock: ha.HaSocket | None = None

    def _lease_id(self) -> int:
        return self.lease

    def _charon_pid(self) -> int | None:
        return self.pid

    def _feed_allowed(self) -> bool:
        return self.conns_ready

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "HaService":
        self.sock = ha.HaSocket(*self._addr)
        self._watch = self.etcd.snapshot_and_watch(ha.HA_PREFIX, self.view, name="gmn-ha-view")
        self.view.synced.wait(10)
        for name, fn in (("gmn-ha-relay", self._relay_loop), ("gmn-ha-feeder", self._feeder_loop),
                         ("gmn-ha-stats", self._stats_loop)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._feed.set()
        if self.sock is not None:
            self.sock.wake()
        for t in self._threads:
            t.join(5)
        self._writers.shutdown(wait=True, cancel_futures=True)
        if self._watch is not None:
            self._watch.cancel()
        if self.sock is not None:
            self.sock.close()

    def _kick_feeder(self) -> None:
        self._feed.set()

    def charon_restarted(self) -> None:
        """A (new) charon connected: once the agent says it holds the connections again,
        find out what it holds and feed it the rest."""
        with self._lock:
            self._reset_feeder = True
            self.fed_ok = False
            self.conns_ready = False
        self._feed.set()

    # ------------------------------------------------------------------ etcd entries
    @staticmethod
    def _entries(kvs: Iterable[Any]) -> dict[bytes, list[bytes]]:
        out: dict[bytes, list[bytes]] = {}
        for kv in kvs:
            ike = ha.key_ike_id(kv.key)
            if ike is None:
                continue
            try:
                out[ike] = ha.decode_entry(kv.value)
            except ha.HaFormatError as exc:
                log.warning("HA entry %s unreadable (%s): ignored", kv.key[len(ha.HA_PREFIX):], exc)
        return out

    def etcd_entries(self) -> dict[bytes, list[bytes]]:
        """The mirror as the watch has it."""
        return self._entries(self.view.items(ha.HA_PREFIX))

    def _fresh_entries(self) -> dict[bytes, list[bytes]]:
        """The mirror as etcd has it now (a linearizable read, not the watch's copy)."""
        return self._entries(self.etcd.get_prefix(ha.HA_PREFIX)[1])

    # ------------------------------------------------------------------ standby: feed charon
    def _feeder_loop(self) -> None:
        next_check = 0.0
        while not self._stop.is_set():
            self._feed.wait(max(0.05, min(1.0, next_check - time.monotonic())) if next_check else 1.0)
            self._feed.clear()
            if self._stop.is_set():
                return
            if self.active:
                next_check = 0.0
                continue
            try:
                if self.feed_once():
                    next_check = time.monotonic() + 0.3  # charon applies them asynchronously
                elif (next_check and time.monotonic() >= next_check) or \
                        (not next_check and self.fed_ok):
                    next_check = time.monotonic() + CHECK_INTERVAL if self._check_charon() else 0.0
            except (OSError, ProtegoError) as exc:
                log.debug("HA feed deferred: %s", exc)
                with self._lock:
                    self.fed_ok = False
                self._stop.wait(0.2)
                self._feed.set()

    def _check_charon(self) -> bool:
        """The standby's charon really holds every mirrored IKE SA (a message it could not
        apply, e.g. for a connection not loaded yet, is sent again)."""
        with self._lock:
            if self.active or not self.fed_ok or self._charon_pid() is None:
                return True
            entries = self.etcd_entries()
            ikes, children = charon_holds(self.vici_socket)
            missing = [ha.ike_spis(i) for i in entries if ha.ike_spis(i) not in ikes]
            stale = prune_plan(entries, ikes, children)
            if stale and self.sock is not None:
                log.info("HA: charon holds %d SAs the mirror does not: deleting them", len(stale))
                self.sock.send(stale)
                self.counts["fed"] += len(stale)
            if not missing:
                return True
            log.warning("HA: charon lacks %d mirrored IKE SAs (%s); feeding them again", len(missing),
                        ", ".join(missing[:3]))
            self._reset_feeder = True
            self.fed_ok = False
        self._feed.set()
        return False

    def feed_once(self, entries: dict[bytes, list[bytes]] | None = None) -> int:
        """Send the local charon what it lacks; the number of datagrams sent."""
        with self._lock:
            if not self._feed_allowed() or self._charon_pid() is None or self.sock is None:
                self.fed_ok = False
                return 0
            if entries is None:
                entries = self.etcd_entries()
            if self._reset_feeder:
                ikes, children = charon_holds(self.vici_socket)
                present = {ike for ike in entries if ha.ike_spis(ike) in ikes}
                spis = {c.to_bytes(4, "little") for c in children}
                self.feeder.reset(present, entries, spis)
                self._reset_feeder = False
                if present:
                    log.info("HA: charon already holds %d of %d mirrored IKE SAs", len(present), len(entries))
            out = self.feeder.plan(entries)
            if out:
                self.sock.send(out)
                self.counts["fed"] += len(out)
                log.info("HA: fed charon %d messages (%d IKE SAs mirrored)", len(out), len(entries))
            self.feeder.mark(entries)
            was, self.fed_ok = self.fed_ok, True
        if not was:
            self._wake()
        return len(out)

    # ------------------------------------------------------------------ takeover
    def activate(self) -> dict[str, Any]:
        """Called by the agent right after it won the election."""
        t0 = time.monotonic()
        with self._lock:
            if not self._drain(VERIFY_TIMEOUT):  # writes of an earlier activation: let them land first
                log.warning("HA takeover: %d mirror writes of an earlier activation still in flight",
                            len(self._busy))
            entries = self._fresh_entries()
            self.mirror.load(entries)
            sent = self.feed_once(entries)
            want_ike = {ha.ike_spis(i) for i in entries}
            want_child = {ha.spi_of(m.inbound_spi) for msgs in self.mirror.entries.values() for m in msgs
                          if m.type == ha.CHILD_ADD and m.inbound_spi}
            missing: set[str] = set()
            deadline = time.monotonic() + (VERIFY_TIMEOUT if sent else 0.5)
            while True:
                ikes, children = charon_holds(self.vici_socket)
                missing = {s for s in want_ike if s not in ikes} | {f"{c:08x}" for c in want_child - set(children)}
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            stale = prune_plan(entries, ikes, children)
            if stale and self.sock is not None:
                log.warning("HA takeover: charon holds %d SAs the mirror does not: deleting them", len(stale))
                self.sock.send(stale)
            if missing:
                log.warning("HA takeover: charon lacks %d mirrored SAs (%s); activating what it has",
                            len(missing), ", ".join(sorted(missing)[:5]))
            pid = self._charon_pid()
            if pid is None:
                raise ProtegoError("charon is not connected: cannot activate its IKE SAs")
            self.active = True
            self._act_t = time.monotonic()
            self._epoch += 1
            self._dirty.clear()
            self._pending.clear()
            ha.write_fifo(pid, "+1")
        # charon applies the FIFO in its own thread: wait until no mirrored SA is passive
        # (the lock is free again: what the now active charon sends is mirrored meanwhile)
        deadline = time.monotonic() + VERIFY_TIMEOUT
        toggled = False
        passive = 0
        while True:
            ikes, _ = charon_holds(self.vici_socket)
            passive = sum(1 for s in want_ike if ikes.get(s) == "PASSIVE")
            if not passive or time.monotonic() > deadline:
                break
            if not toggled and time.monotonic() > deadline - VERIFY_TIMEOUT / 2:
                # an IKE SA charon installed only after the segment went active stays
                # passive: cycling the segment activates it too
                log.warning("HA takeover: %d IKE SAs still passive; cycling the segment", passive)
                ha.write_fifo(pid, "-1")  # charon reads one command per open of the FIFO:
                wait_until = time.monotonic() + 0.5  # see it applied before the next one
                while time.monotonic() < wait_until and \
                        any(st != "PASSIVE" for sp, st in charon_holds(self.vici_socket)[0].items() if sp in want_ike):
                    time.sleep(0.005)
                ha.write_fifo(pid, "+1")
                toggled = True
            time.sleep(0.005)
        info = {"ike_sas": len(want_ike), "child_sas": len(want_child), "fed": sent, "missing": len(missing),
                "still_passive": passive, "ms": round((time.monotonic() - t0) * 1000, 1)}
        log.info("HA: %s active: %d IKE SAs and %d CHILD_SAs taken over in %.1f ms (%d fed, %d missing)",
                 self.node, info["ike_sas"], info["child_sas"], info["ms"], sent, len(missing))
        return info

    def deactivate(self, reason: str) -> None:
        with self._lock:
            was = self.active
            self.active = False
            self._reset_feeder = True
            self.fed_ok = False
        pid = self._charon_pid()
        if was and pid is not None:
            try:
                ha.write_fifo(pid, "-1", timeout=0.5)
            except OSError as exc:
                log.warning("HA: could not make charon's IKE SAs passive: %s", exc)
        if was:
            log.warning("HA: %s no longer active (%s): its IKE SAs are passive", self.node, reason)
        self._feed.set()

    def forget_child(self, spis: str, spi_in: int) -> bool:
        with self._lock:
            if not self.active:
                return False
            changed = self.mirror.forget_child(spis, spi_in)
            for ike in changed:
                self._dirty[ike] = None
        if changed and self.sock is not None:
            # written by the relay loop's writers, with whatever charon sends meanwhile
            self.sock.wake()
        return bool(changed)

    # ------------------------------------------------------------------ active: relay to etcd
    def _relay_loop(self) -> None:
        while not self._stop.is_set():
            assert self.sock is not None
            try:
                # wakes at once on a datagram, on forget_child and when a write completes;
                # sooner than 0.2 s only to retry after an etcd error
                backoff = self._retry_at - time.monotonic() if self._dirty else 0.0
                batch = self.sock.receive(min(0.2, backoff) if backoff > 0 else 0.2)
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.warning("HA socket: %s", exc)
                self._stop.wait(0.5)
                continue
            with self._lock:
                for raw, ts in batch:
                    self.counts["received"] += 1
                    if not self.active:
                        self.counts["ignored"] += 1  # a passive charon's chatter: never mirrored
                        continue
                    try:
                        msg = ha.parse(raw)
                    except ha.HaFormatError as exc:
                        self.counts["malformed"] += 1
                        log.warning("HA: malformed datagram from charon (%s)", exc)
                        continue
                    changed = self.mirror.apply(msg)
                    if msg.type in ha.MIRRORED:
                        log.debug("HA: %s %s", msg.type_name, msg.spis)
                    sample = [ts, len(changed)]  # replicated once every entry it changed is written
                    for ike in changed:
                        self._dirty[ike] = None
                        self._pending.setdefault(ike, []).append(sample)
                if self.active and self._dirty:
                    self._dispatch()

    def _dispatch(self) -> None:
        """Start the writes of the dirty entries that have none in flight (lock held).

        Writes are pipelined across entries, up to ``WRITERS`` transactions at once, but
        never two for one entry: an entry's next write starts once etcd acknowledged the
        previous one, so etcd sees each entry's versions in order. A write carries the
        entry as it is when the write starts, so what changed meanwhile goes in the next.
        """
        if time.monotonic() < self._retry_at:
            return  # backing off after an etcd error
        ready = [ike for ike in self._dirty if ike not in self._busy]
        if not ready:
            return
        fence = [lease_is(self.leader_key, self._lease_id())]
        for i in range(0, len(ready), ha.MAX_OPS):
            chunk = ready[i:i + ha.MAX_OPS]
            ops: list[Any] = []
            samples: dict[bytes, list[list[float]]] = {}
            for ike in chunk:
                del self._dirty[ike]
                self._busy.add(ike)
                samples[ike] = self._pending.pop(ike, [])
                msgs = self.mirror.raw(ike)
                key = ha.entry_key(ike)
                ops.append(PutOp(key, ha.encode_entry(msgs)) if msgs is not None else DeleteOp(key))
            self._writers.submit(self._write, self._epoch, fence, ops, samples)

    def _write(self, epoch: int, fence: list[Any], ops: list[Any], samples: dict[bytes, list[list[float]]]) -> None:
        """One mirror transaction (a writer thread), then its bookkeeping."""
        t_start = time.time()
        try:
            ok: bool | None = self.etcd.txn(fence, ops).succeeded
            err: ProtegoError | None = None
        except ProtegoError as exc:
            ok, err = None, exc
        except Exception as exc:  # noqa: BLE001 - a writer thread must always hand its entries back
            ok, err = None, ProtegoError(f"mirror write: {exc}")
        now = time.time()
        with self._lock:
            for ike in samples:
                self._busy.discard(ike)
            if epoch != self._epoch or not self.active:
                self._idle.notify_all()
                return  # written for an earlier activation: activate() re-reads etcd anyway
            if ok is None:
                self.counts["write_errors"] += 1
                self._backoff = min(RETRY_MAX_S, max(RETRY_MIN_S, self._backoff * 2))
                self._retry_at = time.monotonic() + self._backoff
                log.warning("HA: mirror write failed (%s); retrying in %.2f s", err, self._backoff)
                for ike, lst in samples.items():
                    self._dirty[ike] = None
                    self._pending[ike] = lst + self._pending.get(ike, [])
            elif not ok:
                self.counts["fenced"] += 1
                log.error("HA: %s is no longer the leader: mirror writes refused", self.node)
                self.active = False
                self._dirty.clear()
                self._pending.clear()
                threading.Thread(target=self._wake, daemon=True).start()
            else:
                self._backoff = 0.0
                self.hist_txn.add((now - t_start) * 1000)
                done = [smp for lst in samples.values() for smp in lst]
                oldest = min((smp[0] for smp in done), default=now)
                if (now - oldest) * 1000 > SLOW_MS:  # the histograms in gmn/ha/<node> count them all
                    log.debug("HA: slow mirror write: %d entr%s, oldest change queued %.1f ms, txn %.1f ms "
                             "(%d in flight)", len(ops), "y" if len(ops) == 1 else "ies",
                             (t_start - oldest) * 1000, (now - t_start) * 1000, len(self._busy))
                steady = time.monotonic() - self._act_t > TAKEOVER_WINDOW_S
                for smp in done:
                    smp[1] -= 1
                    if smp[1] > 0:
                        continue  # another entry it changed is still on its way
                    self.counts["mirrored"] += 1
                    self.hist_queue.add((t_start - smp[0]) * 1000)
                    self.hist.add((now - smp[0]) * 1000)
                    if steady:
                        self.hist_steady.add((now - smp[0]) * 1000)
            self._idle.notify_all()
            more = bool(self._dirty)
        if more and self.sock is not None:
            self.sock.wake()  # entries that changed while this write was in flight

    def _drain(self, timeout: float) -> bool:
        """Wait until no mirror write is in flight (lock held)."""
        deadline = time.monotonic() + timeout
        while self._busy:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._idle.wait(left)
        return True

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict[str, Any]:
        with self._lock:
            entries = len(self.mirror.entries) if self.active else len(self.view.items(ha.HA_PREFIX))
            return {"node": self.node, "active": self.active, "fed_ok": self.fed_ok, "entries": entries,
                    **self.counts, "latency": self.hist.snapshot(), "latency_steady": self.hist_steady.snapshot(),
                    "latency_queue": self.hist_queue.snapshot(), "latency_txn": self.hist_txn.snapshot(),
                    "time": time.time()}

    def _stats_loop(self) -> None:
        last: dict[str, Any] | None = None
        while not self._stop.wait(1.0):
            s = self.stats()
            cmp = {k: v for k, v in s.items() if k != "time"}
            if cmp == last:
                continue
            try:
                self.etcd.put(f"{STATS_PREFIX}{self.node}", encode_json(s))
                last = cmp
            except ProtegoError as exc:
                log.debug("HA stats not written: %s", exc)


# ============================================================================ the process
class HaProcess:
    """The agent's handle on :class:`HaService` running in a child process (same
    interface as far as the agent is concerned). Control is line-JSON over the child's
    stdin/stdout; the child logs to the agent's stderr. Nothing secret crosses the
    pipes: charon's pid, a lease id, commands and counts."""

    def __init__(self, node: str, endpoints: list[str], vici_socket: str, leader_key: str,
                 wake: Callable[[], None], local: str = ha.AGENT_HA_ADDR, charon: str = ha.CHARON_HA_ADDR,
                 verbose: bool = False, rt_priority: int = RELAY_RT_PRIORITY) -> None:
        self.argv = [sys.executable, "-m", "protego.gmn.ha_service", "--node", node, "--etcd", ",".join(endpoints),
                     "--vici", vici_socket, "--leader-key", leader_key, "--local", local, "--charon", charon,
                     "--rt-priority", str(rt_priority)]
        if verbose:
            self.argv.append("--verbose")
        self._wake = wake
        self.proc: subprocess.Popen[bytes] | None = None
        self.active = False
        self.fed_ok = False
        self._charon: tuple[int | None, bool] | None = None
        self._replies: dict[int, dict[str, Any]] = {}
        self._cv = threading.Condition()
        self._next = 0
        self._send_lock = threading.Lock()
        self._stopping = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "HaProcess":
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        self._charon = None
        threading.Thread(target=self._reader, args=(self.proc,), name="gmn-ha-reader", daemon=True).start()
        log.info("HA relay process started (pid %d)", self.proc.pid)
        return self

    def _reader(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._cv:
                if "id" in msg:
                    self._replies[int(msg["id"])] = msg
                if "active" in msg:
                    self.active, self.fed_ok = bool(msg["active"]), bool(msg["fed_ok"])
                self._cv.notify_all()
            if msg.get("event") == "wake":
                self._wake()
        proc.wait()
        with self._cv:
            self.active = self.fed_ok = False
            self._cv.notify_all()
        if not self._stopping:
            log.error("HA relay process exited (status %s)", proc.returncode)
            self._wake()

    def _request(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        if not self.alive:
            raise ProtegoError("the HA relay process is not running")
        assert self.proc is not None and self.proc.stdin is not None
        with self._send_lock:
            self._next += 1
            rid = self._next
            try:
                self.proc.stdin.write(json.dumps({**cmd, "id": rid}).encode() + b"\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError) as exc:
                raise ProtegoError(f"the HA relay process is gone ({exc})") from None
        deadline = time.monotonic() + timeout
        with self._cv:
            while rid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    raise ProtegoError(f"the HA relay process did not answer {cmd['cmd']} within {timeout:.0f} s")
                self._cv.wait(min(left, 0.1))
            reply = self._replies.pop(rid)
        if not reply.get("ok"):
            raise ProtegoError(f"HA {cmd['cmd']}: {reply.get('error')}")
        return dict(reply.get("result") or {})

    def set_charon(self, pid: int | None, conns_ready: bool) -> None:
        if self._charon == (pid, conns_ready) or not self.alive:
            return
        self._request({"cmd": "charon", "pid": pid, "conns_ready": conns_ready}, 5.0)
        self._charon = (pid, conns_ready)

    def charon_restarted(self) -> None:
        if self.alive:
            self._request({"cmd": "reset"}, 5.0)
            self._charon = None  # the agent tells it again once charon holds the connections

    def activate(self, lease: int, pid: int | None) -> dict[str, Any]:
        return self._request({"cmd": "activate", "lease": lease, "pid": pid}, 15.0)

    def forget_child(self, spis: str, spi_in: int) -> None:
        if self.alive:
            self._request({"cmd": "forget_child", "spis": spis, "spi_in": spi_in}, 5.0)

    def deactivate(self, reason: str) -> None:
        if self.alive:
            try:
                self._request({"cmd": "deactivate", "reason": reason}, 3.0)
            except ProtegoError as exc:
                log.warning("HA deactivate: %s", exc)

    def stop(self) -> None:
        self._stopping = True
        if self.proc is None:
            return
        if self.alive:
            try:
                self._request({"cmd": "stop"}, 5.0)
            except ProtegoError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its Popen handle (PID)
            self.proc.wait(5)


def _serve(svc: HaService, out: Any) -> None:
    """The child's command loop (stdin) until ``stop`` or EOF (the agent died)."""
    out_lock = threading.Lock()

    def emit(msg: dict[str, Any]) -> None:
        with out_lock:
            out.write(json.dumps({**msg, "active": svc.active, "fed_ok": svc.fed_ok}) + "\n")
            out.flush()

    svc._wake = lambda: emit({"event": "wake"})
    svc.start()
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
        except ValueError:
            continue
        rid, name = cmd.get("id"), cmd.get("cmd")
        try:
            result: dict[str, Any] = {}
            if name == "charon":
                with svc._lock:
                    svc.pid, svc.conns_ready = cmd.get("pid"), bool(cmd.get("conns_ready"))
                svc._kick_feeder()
            elif name == "reset":
                svc.charon_restarted()
            elif name == "activate":
                with svc._lock:
                    svc.lease, svc.pid = int(cmd["lease"]), cmd.get("pid")
                result = svc.activate()
            elif name == "forget_child":
                result = {"changed": svc.forget_child(str(cmd["spis"]), int(cmd["spi_in"]))}
            elif name == "deactivate":
                svc.deactivate(str(cmd.get("reason", "")))
            elif name == "stop":
                emit({"id": rid, "ok": True})
                break
            else:
                raise ValueError(f"unknown command {name!r}")
            emit({"id": rid, "ok": True, "result": result})
        except (OSError, ProtegoError, ValueError, KeyError) as exc:
            emit({"id": rid, "ok": False, "error": str(exc)})
    if svc.active:
        svc.deactivate("the agent is gone")
    svc.stop()


def raise_priority(rt_priority: int) -> str:
    """Put this process ahead of the agents for the CPU before it starts any thread (the
    threads, gRPC's included, inherit the policy). Replication latency is a target, and
    on a busy host it is scheduling delay, not work (docs/gmn-ha.md): with ``rt_priority``
    the round-robin real-time class, otherwise, or if that is not permitted, nice
    ``RELAY_NICE``. The kernel's real-time throttling (``sched_rt_runtime_us``) still
    leaves the other processes their share should the relay ever spin."""
    if rt_priority:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(rt_priority))
            log.info("HA relay runs SCHED_RR priority %d", rt_priority)
            return "rr"
        except OSError as exc:
            log.warning("HA relay cannot use the real-time class (%s): nice %d instead",
                        exc.strerror, RELAY_NICE)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, RELAY_NICE)
        return "nice"
    except OSError as exc:
        log.info("HA relay keeps its priority (%s)", exc.strerror)
        return "normal"


def main(argv: list[str] | None = None) -> int:
    import argparse

    from protego.context import CliContext

    ap = argparse.ArgumentParser(prog="python -m protego.gmn.ha_service",
                                 description="The GMN agent's HA relay (started by `protego gmn run`).")
    ap.add_argument("--node", required=True)
    ap.add_argument("--etcd", required=True, help="comma-separated endpoints")
    ap.add_argument("--vici", required=True)
    ap.add_argument("--leader-key", required=True)
    ap.add_argument("--local", default=ha.AGENT_HA_ADDR)
    ap.add_argument("--charon", default=ha.CHARON_HA_ADDR)
    ap.add_argument("--rt-priority", type=int, default=RELAY_RT_PRIORITY,
                    help="SCHED_RR priority (1-99) of the relay; 0: normal class at nice %d" % RELAY_NICE)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    if not 0 <= a.rt_priority <= 99:
        ap.error(f"--rt-priority must be 0 (off) to 99, got {a.rt_priority}")
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_priority(a.rt_priority)  # before gRPC starts its threads
    # the same client as the agent's: credentials from its environment, never a command line
    ctx = CliContext(etcd_option=a.etcd)
    etcd = ctx.etcd()
    svc = HaService(a.node, etcd, a.vici, a.leader_key, local=a.local, charon=a.charon)
    try:
        _serve(svc, sys.stdout)
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
