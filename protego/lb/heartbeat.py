"""GPN failure detection: heartbeat wire codec and the detector (pure), and the
GIN/GEN-side monitor (I/O). The protocol is specified in docs/heartbeat.md.

Detector in short: time is cut into *rounds* of ``interval`` seconds per GPN. A
round is answered when the GPN was heard from during the round: an answer to one of
its recent synthetic probes (a GPN that was briefly descheduled answers a queued
probe late, that still proves it alive) or a tag answer for a sampled data packet. No synthetic probe is sent
in a round that follows a round with tag answers (busy GPNs cost no extra
packets). ``misses`` consecutive unanswered rounds declare the GPN dead;
``recover`` consecutive answered rounds declare it alive (again). A probe *refused* by
the GPN itself (ICMP port unreachable from its own address, quoting one of its recent
probes) declares it dead at once: no engine listens there any more, and its SAs died
with it.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAGIC = b"PGHB"
VERSION = 1
PROBE, ANSWER, TAG_ANSWER = 1, 2, 3
DEFAULT_PORT = 7471
RECENT_PROBES = 8  # a late answer to one of a GPN's last 8 probes still proves it alive
HEADER = struct.Struct("!4sBBHQQ")  # magic, version, type, flags, seq, timestamp (ns)
TAG = struct.Struct("!BBHII")  # proto, dscp, reserved, key (SPI or VNI), packet seq (ESP)
# <linux/errqueue.h> and <linux/in.h>: the socket's ICMP error queue (Python has no names for them)
IP_RECVERR = 11
SOCK_EE = struct.Struct("=IBBBBII")  # ee_errno, ee_origin, ee_type, ee_code, ee_pad, ee_info, ee_data
SO_EE_ORIGIN_ICMP = 2
# errors an earlier ICMP message leaves pending on the socket (reported by its next call)
_PENDING_ICMP = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN)
ICMP_DEST_UNREACH, ICMP_PORT_UNREACH = 3, 3


class HeartbeatError(ValueError):
    pass


@dataclass(frozen=True)
class TagInfo:
    proto: int  # 50 = ESP, 17 = UDP (ESP-in-UDP or VXLAN)
    dscp: int
    key: int  # SPI (ESP, ESP-in-UDP) or VNI (VXLAN)
    pkt_seq: int = 0  # ESP sequence number, 0 if unknown


@dataclass(frozen=True)
class Message:
    type: int
    seq: int
    ts_ns: int
    tag: TagInfo | None = None


def pack(m: Message) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, m.type, 0, m.seq, m.ts_ns)
    if m.type == TAG_ANSWER:
        t = m.tag or TagInfo(0, 0, 0)
        return head + TAG.pack(t.proto, t.dscp, 0, t.key, t.pkt_seq)
    return head


def unpack(data: bytes) -> Message:
    if len(data) < HEADER.size:
        raise HeartbeatError(f"heartbeat too short ({len(data)} bytes)")
    magic, version, typ, _flags, seq, ts = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise HeartbeatError("not a heartbeat (bad magic)")
    if version != VERSION:
        raise HeartbeatError(f"heartbeat version {version} not supported")
    if typ not in (PROBE, ANSWER, TAG_ANSWER):
        raise HeartbeatError(f"unknown heartbeat type {typ}")
    tag = None
    if typ == TAG_ANSWER:
        if len(data) < HEADER.size + TAG.size:
            raise HeartbeatError("tag answer too short")
        proto, dscp, _r, key, pseq = TAG.unpack_from(data, HEADER.size)
        tag = TagInfo(proto, dscp, key, pseq)
    return Message(typ, seq, ts, tag)


def answer_for(probe: Message) -> Message:
    """What a GPN answers to a synthetic probe: same seq and timestamp."""
    return Message(ANSWER, probe.seq, probe.ts_ns)


# --------------------------------------------------------------------------- #
# detector (pure: time is passed in)


@dataclass(frozen=True)
class DetectorConfig:
    interval: float = 0.010  # every GPN is probed (or tag-answered) at least this often
    misses: int = 3  # consecutive unanswered rounds -> dead
    recover: int = 10  # consecutive answered rounds -> alive
    refused_is_dead: bool = True  # a probe refused by the GPN's own host (port closed) -> dead at once
    # a probe every round also to a GPN whose sampled data packets answered the last one:
    # one small datagram per GPN and round, and a GPN whose engine died is refused (dead)
    # within a round, not after a round of silence first (False: the paper's saving)
    probe_busy: bool = True

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.misses < 1 or self.recover < 1:
            raise ValueError("interval > 0, misses >= 1 and recover >= 1 are required")


@dataclass
class _Track:
    addr: str
    state: str = "unknown"  # unknown | alive | dead
    round_start: float = -1.0
    probe_seq: int | None = None  # synthetic probe of the current round
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT_PROBES))
    answered: bool = False
    tagged_last_round: bool = False
    tagged_this_round: bool = False
    misses: int = 0
    hits: int = 0
    rounds: int = 0
    probes_sent: int = 0
    answers: int = 0
    tag_answers: int = 0
    refusals: int = 0
    last_answer: float = -1.0


@dataclass(frozen=True)
class Transition:
    gpn: str
    state: str  # alive | dead
    reason: str
    at: float  # detector time (monotonic)


@dataclass
class Detector:
    cfg: DetectorConfig = field(default_factory=DetectorConfig)
    tracks: dict[str, _Track] = field(default_factory=dict)
    _seq: int = 0

    def set_gpns(self, gpns: Mapping[str, str]) -> None:
        """GPN name -> fabric address; new GPNs start unknown, removed ones are forgotten."""
        for name in list(self.tracks):
            if name not in gpns or self.tracks[name].addr != gpns[name]:
                del self.tracks[name]
        for name, addr in gpns.items():
            self.tracks.setdefault(name, _Track(addr))

    def by_addr(self, addr: str) -> str | None:
        for name, t in self.tracks.items():
            if t.addr == addr:
                return name
        return None

    def on_message(self, addr: str, m: Message, now: float) -> None:
        name = self.by_addr(addr)
        if name is None:
            return
        t = self.tracks[name]
        if m.type == ANSWER and m.seq in t.recent:
            t.answered = True
            t.answers += 1
            t.last_answer = now
        elif m.type == TAG_ANSWER:
            t.tagged_this_round = True
            t.tag_answers += 1
            t.last_answer = now

    def on_refused(self, addr: str, seq: int, now: float) -> Transition | None:
        """The GPN at ``addr`` refused probe ``seq`` (ICMP port unreachable from that very
        address): nothing listens on its heartbeat port, so its engine and every SA it
        held are gone. Declares it dead at once (when ``refused_is_dead``); a refusal of
        a probe never sent to it, or not among its recent ones, is ignored."""
        name = self.by_addr(addr)
        if name is None or not self.cfg.refused_is_dead:
            return None
        t = self.tracks[name]
        if seq not in t.recent:
            return None
        t.refusals += 1
        t.hits = 0
        t.misses = max(t.misses, self.cfg.misses)
        if t.state == "dead":
            return None
        t.state = "dead"
        return Transition(name, "dead", "heartbeat refused: nothing listens on its heartbeat port", now)

    def next_deadline(self) -> float | None:
        starts = [t.round_start + self.cfg.interval for t in self.tracks.values() if t.round_start >= 0]
        if any(t.round_start < 0 for t in self.tracks.values()):
            return 0.0
        return min(starts) if starts else None

    def tick(self, now: float) -> tuple[list[tuple[str, str, int]], list[Transition]]:
        """Close every round that is due and open the next one.

        Returns (probes to send as (gpn, addr, seq), state transitions)."""
        probes: list[tuple[str, str, int]] = []
        trans: list[Transition] = []
        for name, t in self.tracks.items():
            if t.round_start >= 0 and now < t.round_start + self.cfg.interval:
                continue
            if t.round_start >= 0:  # close the round
                t.rounds += 1
                if t.answered or t.tagged_this_round:
                    t.hits += 1
                    t.misses = 0
                    if t.hits >= self.cfg.recover and t.state != "alive":
                        t.state = "alive"
                        trans.append(Transition(name, "alive", f"{t.hits} consecutive heartbeats answered", now))
                else:
                    t.misses += 1
                    t.hits = 0
                    if t.misses >= self.cfg.misses and t.state != "dead":
                        t.state = "dead"
                        trans.append(Transition(name, "dead", f"{t.misses} consecutive heartbeats missed", now))
            t.tagged_last_round, t.tagged_this_round = t.tagged_this_round, False
            t.answered = False
            t.round_start = now
            if t.tagged_last_round and not self.cfg.probe_busy:
                t.probe_seq = None  # sampled data packets keep this GPN probed
            else:
                self._seq += 1
                t.probe_seq = self._seq
                t.recent.append(self._seq)
                t.probes_sent += 1
                probes.append((name, t.addr, self._seq))
        return probes, trans

    def stats(self) -> dict[str, dict[str, object]]:
        return {n: {"state": t.state, "addr": t.addr, "rounds": t.rounds, "probes": t.probes_sent,
                    "answers": t.answers, "tag_answers": t.tag_answers, "refusals": t.refusals,
                    "misses": t.misses}
                for n, t in self.tracks.items()}


# --------------------------------------------------------------------------- #
# monitor (I/O): one UDP socket, one thread


def set_rt_priority(priority: int) -> bool:
    """Run the calling thread with SCHED_FIFO ``priority`` (heartbeats must not wait
    behind a busy CPU); False (logged) if the system refuses."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return True
    except (OSError, AttributeError) as exc:
        log.warning("cannot run heartbeats at SCHED_FIFO %d: %s", priority, exc)
        return False


def refusal(data: bytes, ancdata: list[tuple[int, int, bytes]], dst: object, port: int) -> tuple[str, int] | None:
    """One message of a socket's error queue (``recvmsg(..., MSG_ERRQUEUE)``) →
    (GPN address, probe seq) when it says that GPN's own host refused our probe: ICMP
    port unreachable, sent by the address the probe went to, on our heartbeat port,
    quoting a heartbeat probe. Anything else (a router's host unreachable, a foreign
    datagram): None."""
    if not isinstance(dst, tuple) or len(dst) < 2 or dst[1] != port:
        return None
    for level, typ, blob in ancdata:
        if level != socket.IPPROTO_IP or typ != IP_RECVERR or len(blob) < SOCK_EE.size + 8:
            continue
        ee_errno, origin, icmp_type, icmp_code, _pad, _info, _data = SOCK_EE.unpack_from(blob)
        if ee_errno != errno.ECONNREFUSED or origin != SO_EE_ORIGIN_ICMP \
                or (icmp_type, icmp_code) != (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH):
            return None
        family = struct.unpack_from("=H", blob, SOCK_EE.size)[0]
        if family != socket.AF_INET:
            return None
        offender = socket.inet_ntoa(blob[SOCK_EE.size + 4:SOCK_EE.size + 8])
        if offender != dst[0]:
            return None
        try:
            m = unpack(data)
        except HeartbeatError:
            return None
        return (dst[0], m.seq) if m.type == PROBE else None
    return None


class HeartbeatMonitor:
    """Sends synthetic probes and receives answers on ``(bind_addr, port)``;
    calls ``on_transition`` (from its own thread) for every state change."""

    def __init__(self, detector: Detector, on_transition: Callable[[Transition], None], *,
                 bind_addr: str = "0.0.0.0", port: int = DEFAULT_PORT, dscp: int = 0x37,
                 rt_priority: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.detector = detector
        self.rt_priority = rt_priority
        self._on_transition = on_transition
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, dscp << 2)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        # ICMP errors on this unconnected socket go to its error queue (see _errors)
        self.sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        self.sock.bind((bind_addr, port))
        self.sock.setblocking(False)
        self._port = port
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def set_gpns(self, gpns: Mapping[str, str]) -> None:
        with self._lock:
            self.detector.set_gpns(gpns)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def stats(self) -> dict[str, dict[str, object]]:
        with self._lock:
            return self.detector.stats()

    def _errors(self) -> list[Transition]:
        """Read the socket's ICMP error queue: a port unreachable sent by a GPN's own
        address about one of our probes to it is a refusal (``Detector.on_refused``)."""
        trans: list[Transition] = []
        while True:
            try:
                data, anc, _flags, dst = self.sock.recvmsg(256, 512, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return trans
            except OSError as exc:
                log.warning("heartbeat socket error queue: %s", exc)
                return trans
            parsed = refusal(data, anc, dst, self._port)
            if parsed is None:
                continue
            addr, seq = parsed
            with self._lock:
                tr = self.detector.on_refused(addr, seq, self._clock())
            if tr is not None:
                trans.append(tr)

    def _send(self, data: bytes, addr: str) -> list[Transition]:
        """Send one probe. An ICMP error that arrived meanwhile (about *another* GPN's
        probe) is reported by the kernel on the socket's next call, this send: read it
        (it may be a refusal) and send again, so that one dead GPN never costs a healthy
        one its probe. Any other failure (no route) just misses the round."""
        trans: list[Transition] = []
        for _attempt in range(3):
            try:
                self.sock.sendto(data, (addr, self._port))
                return trans
            except OSError as exc:
                if exc.errno not in _PENDING_ICMP:
                    return trans
                trans += self._errors()
        return trans

    def _drain(self) -> list[Transition]:
        """Receive every queued answer; returns the transitions refusals caused."""
        trans = self._errors()
        while True:
            try:
                data, (addr, _port) = self.sock.recvfrom(2048)
            except BlockingIOError:
                return trans
            except OSError as exc:
                if exc.errno in _PENDING_ICMP:
                    trans += self._errors()  # the pending error was reported; its details are queued
                    continue
                log.warning("heartbeat socket: %s", exc)
                return trans
            try:
                m = unpack(data)
            except HeartbeatError:
                continue
            with self._lock:
                self.detector.on_message(addr, m, self._clock())

    def _run(self) -> None:
        if self.rt_priority:
            set_rt_priority(self.rt_priority)
        while not self._stop.is_set():
            with self._lock:
                deadline = self.detector.next_deadline()
            now = self._clock()
            wait = 0.05 if deadline is None else max(0.0, deadline - now)
            if wait > 0:
                select.select([self.sock], [], [], min(wait, 0.05))
            refused = self._drain()
            now = self._clock()
            with self._lock:
                probes, trans = self.detector.tick(now)
            trans = refused + trans
            ts = time.monotonic_ns()
            for _name, addr, seq in probes:
                trans += self._send(pack(Message(PROBE, seq, ts)), addr)
            for tr in trans:
                try:
                    self._on_transition(tr)
                except Exception:  # never let a callback kill detection
                    log.exception("heartbeat transition callback failed for %s", tr.gpn)
