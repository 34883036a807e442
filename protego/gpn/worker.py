"""One GPN worker process: batched I/O, ESP, the tenant side and heartbeats.

A worker owns (no lock on the per-packet path):

* its member of the ``SO_REUSEPORT`` group on UDP 4500 (ESP-in-UDP), sharded by
  SPI with a classic BPF program (:mod:`protego.gpn.bpf`): the inbound SAs with
  ``SPI mod workers == index`` live here and nowhere else, with their replay windows;
* a raw protocol-50 socket filtered to the same SPIs (raw ESP);
* its member of the UDP 4789 group (VXLAN from the GEN; the kernel spreads the
  tenant's flows over the workers by the outer 4-tuple): every outbound SA is in
  every worker, and their sequence numbers come in blocks from
  :class:`~protego.gpn.seqshare.SharedSequences` (one lock per block);
* its member of the heartbeat group on ``fabric_addr:7471`` and the reference
  :class:`~protego.lb.heartbeat_responder.Responder`; tagged data packets (outer
  DSCP, read from ``IP_RECVTOS``) are answered from the receive path itself;
* its control pipe from the engine (SA install/remove, egress table, host
  directory, statistics). Keys only ever arrive through this pipe.

The loop: wait (epoll) -> drain every ready socket in batches (``recvmsg_into``
with ``UDP_GRO`` segments split) -> send what the batch produced, grouped per
destination with ``UDP_SEGMENT`` (GSO) where the packets have equal size and fit
the MTU -> give sequence blocks back -> wait again. Nothing raises out of the
packet path: every drop is counted by reason.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protego.esp.engine import Decapsulator, DropReason, OutboundSa, Verdict
from protego.esp.framing import IPPROTO_ESP, build_ipv4_header, parse_ipv4
from protego.esp.sa import SaExpiredError, SequenceExhaustedError
from protego.lb import heartbeat as hb
from protego.lb.heartbeat_responder import Responder, classify_raw

from .records import GpnSa, sa_from_wire
from .seqshare import SharedSequences, WorkerLeases
from .tenant import VXLAN_PORT, EgressRoute, EgressTable, HostDirectory, build_vxlan, parse_vxlan

__all__ = ["COUNTERS", "LbTable", "WorkerConfig", "WorkerSockets", "worker_main"]

log = logging.getLogger(__name__)

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
IP_TOS = 1
IP_PKTINFO = 8
IP_RECVTOS = 13

BATCH = 64  # datagrams drained per socket per round
# seconds a packet may wait for a sequence block before it is dropped: the worker holding
# the SA's window gives it back once its batch is sent, microseconds later unless it is
# descheduled (200 ms was not enough in an emulated guest: 2 replies dropped in a lane
# migration, counted seq_blocked); a late packet is better than a lost one
SEQ_HOLD = 1.0
SEQ_HOLD_PACKETS = 512  # packets one SA may have waiting for a sequence block
SEQ_RETRY = 0.0005  # seconds between retries while packets wait for a sequence block
ROUTE_HOLD = 0.1  # seconds a tenant frame may wait for its tunnel's route (being installed)
ROUTE_HOLD_PACKETS = 1024  # tenant frames waiting for a route, all tunnels together
NO_ROUTE = "no-route"  # _encap_frame: no route (yet) for the frame's tunnel
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
RECV_BUF = 65536
ANC_SIZE = socket.CMSG_SPACE(4) + socket.CMSG_SPACE(4)
_ADDRS = struct.Struct("!II")

#: worker counters beyond the decapsulator's drop reasons
COUNTERS = (
    "esp_in", "esp_out", "vxlan_in", "vxlan_out",
    "no_tunnel", "no_outbound_sa", "no_host", "ts_mismatch", "seq_blocked", "seq_waits", "sa_exhausted",
    "bad_vxlan", "send_errors", "ike_ignored", "keepalives",
    "hb_probes", "hb_tag_answers", "gro_batches", "gso_sends", "internal_errors", "spi_late_installs",
    "egress_late_updates", "seq_held", "route_held", "route_waits",
)


@dataclass(frozen=True)
class WorkerConfig:
    index: int
    workers: int
    fabric_addr: str
    dscp: int = 0x37
    natt_port: int = 4500
    mtu: int = 1500
    pin_cpu: bool = True
    src_mac: bytes = b"\x02\x00\x00\x00\x00\x01"
    vxlan_port: int = VXLAN_PORT  # the tenant hosts' VTEP port
    cpus: tuple[int, ...] = ()  # the CPUs the workers run on (empty: those the agent may use)


@dataclass
class WorkerSockets:
    esp_udp: socket.socket
    vxlan: socket.socket
    hb: socket.socket
    raw_esp: socket.socket | None


class LbTable:
    """Heartbeat sources (the lbs that probed us) shared by all workers: a probe
    lands on one worker, a tagged packet on any. Small, lock-free (single writer
    per slot: an lb's probes always hash to the same worker)."""

    SLOTS = 8

    def __init__(self, ctx: Any) -> None:
        self._a = ctx.RawArray("d", self.SLOTS * 3)

    def seen(self, src: tuple[str, int], now: float) -> None:
        ip = int.from_bytes(socket.inet_aton(src[0]), "big")
        i = hash(src) % self.SLOTS * 3
        a = self._a
        a[i + 2] = 0.0  # invalid while writing
        a[i] = float(ip)
        a[i + 1] = float(src[1])
        a[i + 2] = now

    def recent(self, now: float, memory: float) -> dict[tuple[str, int], float]:
        a = self._a
        out = {}
        for i in range(0, self.SLOTS * 3, 3):
            t = a[i + 2]
            if t and now - t <= memory:
                out[(socket.inet_ntoa(int(a[i]).to_bytes(4, "big")), int(a[i + 1]))] = t
        return out


class _Out:
    """Per-worker state of one outbound SA."""

    __slots__ = ("addr", "dst4", "esp", "last", "raw", "slot", "tag", "vip", "vip4")

    def __init__(self, g: GpnSa, esp: OutboundSa, slot: int | None, tag: int) -> None:
        self.esp = esp
        self.slot = slot
        self.tag = tag
        self.vip = g.vip
        self.vip4 = socket.inet_aton(g.vip)
        self.dst4 = socket.inet_aton(g.peer)
        self.raw = g.sa.encap is None
        self.addr = (g.peer, g.peer_port if not self.raw else 0)
        self.last = 0.0


class _In:
    __slots__ = ("first", "g", "last", "local", "remote", "vni")

    def __init__(self, g: GpnSa) -> None:
        self.g = g
        self.vni = g.vni
        self.local = g.local_ts
        self.remote = g.remote_ts
        self.last = 0.0
        self.first = 0.0  # wall-clock time of the first packet delivered (a migration's switch)


def _pktinfo(src4: bytes) -> tuple[int, int, bytes]:
    return (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=I4s4s", 0, src4, b"\0\0\0\0"))


def group_for_gso(sizes: list[int], max_size: int) -> list[tuple[int, int]]:
    """Split a run of datagram sizes into ``[i, j)`` groups that one ``UDP_SEGMENT``
    send can carry: equal sizes ``<= max_size``, an optional shorter last one, at
    most 64 segments and 65,000 bytes. Pure (unit-tested)."""
    out = []
    i, n = 0, len(sizes)
    while i < n:
        size = sizes[i]
        j = i + 1
        if size <= max_size:
            total = size
            while (j < n and j - i < GSO_MAX_SEGMENTS and sizes[j] == size
                   and total + size <= GSO_MAX_BYTES):
                total += size
                j += 1
            if j < n and j - i < GSO_MAX_SEGMENTS and sizes[j] < size and total + sizes[j] <= GSO_MAX_BYTES:
                j += 1
        out.append((i, j))
        i = j
    return out


class Worker:
    def __init__(self, cfg: WorkerConfig, socks: WorkerSockets, conn: Any,
                 seqs: SharedSequences | None, lbs: LbTable) -> None:
        self.cfg = cfg
        self.s = socks
        self.conn = conn
        self.seqs = seqs
        self.leases = WorkerLeases(seqs, cfg.index) if seqs is not None else None
        self.lbs = lbs
        self.dec = Decapsulator()
        self.inb: dict[int, _In] = {}
        self.out: dict[int, _Out] = {}
        self.egress = EgressTable()
        self.hosts = HostDirectory()
        self.responder = Responder(dscp=cfg.dscp)
        self.c = dict.fromkeys(COUNTERS, 0)
        self.raw_tx: socket.socket | None = None
        self.gso_ok = True
        self.gso_max = cfg.mtu - 28
        self._esp_q: dict[tuple[bytes, tuple[str, int]], list[bytes]] = {}
        self._raw_q: list[tuple[bytes, str]] = []
        self._vx_q: dict[str, list[bytes]] = {}
        self._vx_heads: dict[tuple[int, int], tuple[bytes, str]] = {}  # (vni, dst) -> (VXLAN+Ethernet, VTEP)
        # outbound SPI -> frames waiting for a sequence block: (arrival time, frame)
        self._seq_held: dict[int, collections.deque[tuple[float, Any]]] = {}
        # tenant frames whose tunnel has no route here yet: the GEN may switch a tunnel to
        # this GPN a moment before the control request with its outbound SA reaches us
        self._route_held: collections.deque[tuple[float, Any]] = collections.deque()
        self._running = True
        self._buf = bytearray(RECV_BUF)
        self._view = memoryview(self._buf)

    # ------------------------------------------------------------------ control
    def _control(self) -> None:
        while self.conn.poll():
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self._running = False
                return
            try:
                self._handle(msg)
            except Exception as exc:  # noqa: BLE001 - a bad request must not kill the worker
                log.error("worker %d: control request %s failed: %s", self.cfg.index, msg[0],
                          type(exc).__name__)
                if msg[0] == "stats":
                    self.conn.send({})

    def _handle(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "add":
            _kind, wire, slot, tag = msg
            g = sa_from_wire(wire)
            if g.inbound:
                old_in = self.dec.remove(g.spi)
                state = self.dec.add(g.sa)
                if old_in is not None and old_in.sa.keys == g.sa.keys and old_in.sa.esn == g.sa.esn:
                    # an update (new peer address/port): the replay window and counters stay
                    if old_in.window.size == state.window.size:
                        state.window = old_in.window
                    state.stats = old_in.stats
                meta, prev = _In(g), self.inb.get(g.spi)
                if prev is not None and old_in is not None and old_in.sa.keys == g.sa.keys:
                    meta.first, meta.last = prev.first, prev.last  # the same SA: its use so far
                self.inb[g.spi] = meta
            else:
                old = self.out.get(g.spi)
                # an update keeps the counter (sequence numbers are never reused)
                esp = OutboundSa(g.sa, sequence=old.esp.sequence if old is not None else None)
                if old is not None:
                    esp.stats = old.esp.stats
                self.out[g.spi] = _Out(g, esp, slot, tag)
        elif kind == "del":
            _kind, spi, direction = msg
            if direction == "in":
                self.dec.remove(spi)
                self.inb.pop(spi, None)
            else:
                self.out.pop(spi, None)
        elif kind == "egress":
            self.egress = EgressTable(EgressRoute(*r) for r in msg[1])
        elif kind == "hosts":
            self.hosts.replace(msg[1])
            self._vx_heads.clear()
        elif kind == "stats":
            self.conn.send(self.stats())
        elif kind == "sync":
            # every request sent before this one has been carried out (a barrier: the
            # agent acknowledges SAs to the GMN only once the workers have them)
            self.conn.send(("synced", msg[1]))
        elif kind == "stop":
            self._running = False

    def stats(self) -> dict[str, Any]:
        sas = {}
        for spi, i in self.inb.items():
            st = self.dec.get(spi)
            if st is not None:
                sas[("in", spi)] = (st.stats.packets, st.stats.bytes, i.last, 0, i.first)
        for spi, o in self.out.items():
            rekey = o.esp.rekey_requested or (o.slot is not None and self.seqs is not None
                                              and self.seqs.rekey_requested(o.slot))
            sas[("out", spi)] = (o.esp.stats.packets, o.esp.stats.bytes, o.last, int(rekey), 0.0)
        counters = dict(self.c)
        counters["lease_refused"] = self.leases.refused if self.leases else 0
        return {"sas": sas, "drops": self.dec.drops.as_dict(), "counters": counters,
                "pid": os.getpid(), "worker": self.cfg.index}

    # ------------------------------------------------------------------ heartbeat
    def _heartbeat(self) -> None:
        sock = self.s.hb
        now = time.monotonic()
        for _ in range(BATCH):
            try:
                data, src = sock.recvfrom(2048, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            reply = self.responder.on_datagram(data, src, now)
            if reply is not None:
                self.c["hb_probes"] += 1
                self.lbs.seen(src, now)
                try:
                    sock.sendto(reply, src)
                except OSError:
                    self.c["send_errors"] += 1

    def _tagged(self, tag: hb.TagInfo) -> None:
        now = time.monotonic()
        self.responder.lbs = self.lbs.recent(now, 1.0)
        for msg, dst in self.responder.on_tagged(tag, now):
            self.c["hb_tag_answers"] += 1
            try:
                self.s.hb.sendto(msg, dst)
            except OSError:
                self.c["send_errors"] += 1

    # ------------------------------------------------------------------ receive
    def _recv_batch(self, sock: socket.socket, handle: Callable[[bytes, Any, int], None]) -> None:
        """Drain up to BATCH datagrams; GRO super-datagrams are split by segment size."""
        buf, view = self._buf, self._view
        for _ in range(BATCH):
            try:
                n, anc, _flags, addr = sock.recvmsg_into([buf], ANC_SIZE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            tos = 0
            seg = 0
            for level, kind, data in anc:
                if level == socket.IPPROTO_IP and kind == IP_TOS and data:
                    tos = data[0]
                elif level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                    seg = struct.unpack_from("=i", data)[0]
            try:
                if seg and seg < n:
                    self.c["gro_batches"] += 1
                    for off in range(0, n, seg):
                        handle(bytes(view[off:min(off + seg, n)]), addr, tos)
                else:
                    handle(bytes(view[:n]), addr, tos)
            except Exception:  # noqa: BLE001 - a bug must cost a packet, not the worker
                self._internal_error()

    def _on_esp_udp(self, payload: bytes, addr: Any, tos: int) -> None:
        if tos >> 2 == self.cfg.dscp and len(payload) >= 8:
            spi, seq = struct.unpack_from("!II", payload)
            if spi:
                self._tagged(hb.TagInfo(17, self.cfg.dscp, spi, seq))
        res = self.dec.decap_udp(payload)
        if res.reason is DropReason.UNKNOWN_SPI and self._sa_pending():
            res = self.dec.decap_udp(payload)
        if res.verdict is Verdict.ACCEPT:
            self._deliver(res)
        elif res.verdict is Verdict.IKE:
            self.c["ike_ignored"] += 1  # IKE belongs to the GMN; never answered here
        elif res.verdict is Verdict.KEEPALIVE:
            self.c["keepalives"] += 1

    def _sa_pending(self) -> bool:
        """An unknown SPI may be an SA the agent installed a moment ago whose request still
        waits in the control pipe (the GMN let the peer use it once the agent had sent it):
        apply pending control requests and say whether a retry is worth it. The drop just
        counted is taken back; the retry counts its own."""
        if self.conn is None or not self.conn.poll():
            return False
        self._control()
        self.dec.drops.counts[DropReason.UNKNOWN_SPI] -= 1
        self.c["spi_late_installs"] += 1
        return True

    def _internal_error(self) -> None:
        n = self.c["internal_errors"] = self.c["internal_errors"] + 1
        if n & (n - 1) == 0:  # 1, 2, 4, 8, ...: never a log line per packet
            log.exception("worker %d: packet handling failed (%d so far); packet dropped", self.cfg.index, n)

    def _on_raw_esp(self) -> None:
        sock = self.s.raw_esp
        assert sock is not None
        for _ in range(BATCH):
            try:
                pkt = sock.recv(RECV_BUF, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(pkt) >= 20 and pkt[1] >> 2 == self.cfg.dscp:
                tag = classify_raw(pkt, self.cfg.dscp)
                if tag is not None:
                    self._tagged(tag)
            try:
                outer = parse_ipv4(pkt)
                if outer is None or outer.proto != IPPROTO_ESP:
                    continue
                res = self.dec.decap_esp(outer.payload, False)
                if res.reason is DropReason.UNKNOWN_SPI and self._sa_pending():
                    res = self.dec.decap_esp(outer.payload, False)
                if res.verdict is Verdict.ACCEPT:
                    self._deliver(res)
            except Exception:  # noqa: BLE001 - a bug must cost a packet, not the worker
                self._internal_error()

    def _deliver(self, res: Any) -> None:
        """A decrypted inner packet -> VXLAN to the tenant host that owns its destination."""
        pkt = res.payload
        meta = self.inb.get(res.sa.sa.spi)
        if meta is None or pkt[0] >> 4 != 4:  # the decapsulator checked the IPv4 header length
            self.c["no_host"] += 1
            return
        src, dst = _ADDRS.unpack_from(pkt, 12)
        if (meta.remote.ranges and src not in meta.remote) or (meta.local.ranges and dst not in meta.local):
            self.c["ts_mismatch"] += 1
            return
        if not meta.last:
            meta.first = self._now
        meta.last = self._now
        self.c["esp_in"] += 1
        key = (meta.vni, dst)
        head = self._vx_heads.get(key)
        if head is None:
            host = self.hosts.lookup(meta.vni, dst)
            if host is None:
                self.c["no_host"] += 1
                return
            head = (build_vxlan(meta.vni, host[0], b"", self.cfg.src_mac), host[1])
            if len(self._vx_heads) > 65536:
                self._vx_heads.clear()
            self._vx_heads[key] = head
        q = self._vx_q.get(head[1])
        if q is None:
            q = self._vx_q[head[1]] = []
        q.append(head[0] + pkt)

    def _on_vxlan(self, payload: bytes, addr: Any, tos: int) -> None:
        f = parse_vxlan(payload)
        if f is None:
            self.c["bad_vxlan"] += 1
            return
        if tos >> 2 == self.cfg.dscp:
            self._tagged(hb.TagInfo(17, self.cfg.dscp, f.vni, 0))
        self.c["vxlan_in"] += 1
        if self.hosts.learn(f.vni, f.src, f.src_mac, addr[0]):
            self._vx_heads.pop((f.vni, f.src), None)
        spi = self.egress.lookup(f.vni, f.src, f.dst)
        held = self._seq_held.get(spi) if spi is not None else None
        if held is not None:  # keep the SA's packets in order behind those already waiting
            self._hold(held, f, self._now)
            return
        r = self._encap_frame(f, hold_route=True)
        if r is NO_ROUTE:
            if len(self._route_held) >= ROUTE_HOLD_PACKETS:
                self.c["no_tunnel" if spi is None else "no_outbound_sa"] += 1
            else:
                self._route_held.append((self._now, f))
                self.c["route_held"] += 1
        elif not r and spi is not None:
            self._hold(self._seq_held.setdefault(spi, collections.deque()), f, self._now)

    def _encap_frame(self, f: Any, hold_route: bool = False) -> bool | str:
        """Encrypt one tenant frame for its tunnel's outbound SA and queue it for sending
        (or count why not). False when no sequence block can be had right now: another
        worker's round holds the window (it gives its blocks back once its batch is
        sent), and the caller holds the frame instead of dropping it. ``NO_ROUTE`` (with
        ``hold_route``) when the tunnel has no route or outbound SA here yet, instead of
        counting the frame dropped."""
        for attempt in (0, 1, 2):
            spi = self.egress.lookup(f.vni, f.src, f.dst)
            st = self.out.get(spi) if spi is not None else None
            if st is None:
                if attempt == 0 and self.conn is not None and self.conn.poll():
                    # the tunnel (or its SA) may have arrived a moment ago: its control
                    # request still waits in our pipe
                    self._control()
                    self.c["egress_late_updates"] += 1
                    continue
                if hold_route:
                    return NO_ROUTE
                self.c["no_tunnel" if spi is None else "no_outbound_sa"] += 1
                return True
            seq = None
            if st.slot is not None:
                assert self.leases is not None
                seq = self.leases.take(st.slot, st.tag)
                if seq is None:
                    if attempt == 0 and self.conn is not None and self.conn.poll():
                        # The SA may have been replaced a moment ago: the engine frees a removed
                        # SA's sequence slot at once, and the egress update naming its successor
                        # (always sent before the removal) still waits in our control pipe.
                        self._control()
                        self.c["egress_late_updates"] += 1
                        continue
                    if attempt < 2 and self._low_held():
                        # our own unsent packets hold the window: send them, give the blocks back
                        self._flush()
                        self.leases.release_all()
                        continue
                    return False
            try:
                esp = st.esp.encapsulate(f.packet, seq=seq)
            except (SequenceExhaustedError, SaExpiredError):
                self.c["sa_exhausted"] += 1
                return True
            except ValueError:
                self.c["bad_vxlan"] += 1
                return True
            st.last = self._now
            if st.raw:
                self._raw_q.append((build_ipv4_header(st.vip4, st.dst4, IPPROTO_ESP, len(esp)) + esp, st.addr[0]))
            else:
                key = (st.vip4, st.addr)
                q = self._esp_q.get(key)
                if q is None:
                    q = self._esp_q[key] = []
                q.append(esp)
            return True
        return True

    def _low_held(self) -> bool:
        return bool(self.leases is not None and self.leases.holding())

    def _hold(self, q: collections.deque[tuple[float, Any]], f: Any, since: float) -> None:
        if len(q) >= SEQ_HOLD_PACKETS:
            self.c["seq_blocked"] += 1
            return
        q.append((since, f))
        self.c["seq_held"] += 1

    def _retry_held(self) -> None:
        """Frames waiting for a sequence block, oldest first, per SA; a frame that waited
        longer than SEQ_HOLD is dropped (counted as seq_blocked)."""
        now = time.time()
        for spi in list(self._seq_held):
            q = self._seq_held.pop(spi)
            while q:
                since, f = q[0]
                if now - since > SEQ_HOLD:
                    q.popleft()
                    self.c["seq_blocked"] += 1
                    continue
                if not self._encap_frame(f):
                    self._seq_held[spi] = q  # still refused: the rest stays behind it
                    break
                q.popleft()
                self.c["seq_waits"] += 1

    def _retry_routes(self) -> None:
        """Frames waiting for their tunnel's route, in arrival order: sent once the route
        is here, dropped (as no_tunnel / no_outbound_sa) after ROUTE_HOLD."""
        now = time.time()
        if self.conn is not None and self.conn.poll():
            self._control()
        for _ in range(len(self._route_held)):
            since, f = self._route_held.popleft()
            may_wait = now - since < ROUTE_HOLD
            r = self._encap_frame(f, hold_route=may_wait)
            if r is NO_ROUTE:
                self._route_held.append((since, f))
                continue
            if may_wait:
                self.c["route_waits"] += 1  # its route arrived while it waited
            if not r:
                spi = self.egress.lookup(f.vni, f.src, f.dst)
                if spi is not None:
                    self._hold(self._seq_held.setdefault(spi, collections.deque()), f, since)

    # ------------------------------------------------------------------ send
    def _send_groups(self, sock: socket.socket, pkts: list[bytes], addr: tuple[str, int],
                     base_cmsgs: list[tuple[int, int, bytes]]) -> int:
        sent = 0
        groups = group_for_gso([len(p) for p in pkts], self.gso_max if self.gso_ok else 0)
        for i, j in groups:
            seg = pkts[i:j]
            cmsgs = list(base_cmsgs)
            if j - i > 1:
                cmsgs.append((SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(seg[0]))))
                self.c["gso_sends"] += 1
            try:
                sock.sendmsg(seg if j - i > 1 else seg[:1], cmsgs, 0, addr)
                sent += j - i
            except OSError as exc:
                if j - i > 1 and exc.errno in (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    self.gso_ok = False
                    log.warning("worker %d: UDP GSO refused (%s); sending datagrams one by one",
                                self.cfg.index, errno.errorcode.get(exc.errno or 0, exc.errno))
                    for p in seg:
                        try:
                            sock.sendmsg([p], base_cmsgs, 0, addr)
                            sent += 1
                        except OSError:
                            self.c["send_errors"] += 1
                else:
                    self.c["send_errors"] += j - i
        return sent

    def _flush(self) -> None:
        if self._esp_q:
            for (vip4, addr), pkts in self._esp_q.items():
                self.c["esp_out"] += self._send_groups(self.s.esp_udp, pkts, addr, [_pktinfo(vip4)])
            self._esp_q.clear()
        if self._raw_q:
            if self.raw_tx is None:
                self.raw_tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            for pkt, dst in self._raw_q:
                try:
                    self.raw_tx.sendto(pkt, (dst, 0))
                    self.c["esp_out"] += 1
                except OSError:
                    self.c["send_errors"] += 1
            self._raw_q.clear()
        if self._vx_q:
            for vtep, frames in self._vx_q.items():
                self.c["vxlan_out"] += self._send_groups(self.s.vxlan, frames, (vtep, self.cfg.vxlan_port), [])
            self._vx_q.clear()

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        ep = select.epoll()
        fds: dict[int, Callable[[], None]] = {
            self.s.esp_udp.fileno(): lambda: self._recv_batch(self.s.esp_udp, self._on_esp_udp),
            self.s.vxlan.fileno(): lambda: self._recv_batch(self.s.vxlan, self._on_vxlan),
            self.s.hb.fileno(): self._heartbeat,
            self.conn.fileno(): self._control,
        }
        if self.s.raw_esp is not None:
            fds[self.s.raw_esp.fileno()] = self._on_raw_esp
        for fd in fds:
            ep.register(fd, select.EPOLLIN)
        log.info("worker %d/%d running (pid %d)", self.cfg.index, self.cfg.workers, os.getpid())
        self._now = time.time()
        while self._running:
            try:
                events = ep.poll(SEQ_RETRY if self._seq_held or self._route_held else 1.0)
            except InterruptedError:
                continue
            self._now = time.time()
            # drain until every socket is empty (bounded rounds), then sleep
            for _round in range(16):
                for fd, _ev in events:
                    fds[fd]()
                    # send and give the sequence blocks back after each socket's batch: a
                    # registration never waits on another socket's work
                    self._flush()
                    if self.leases is not None:
                        self.leases.release_all()
                if self._route_held:
                    self._retry_routes()
                if self._seq_held:
                    self._retry_held()
                    self._flush()
                    if self.leases is not None:
                        self.leases.release_all()
                if not self._running:
                    break
                events = ep.poll(0)
                if not events:
                    break
                self._now = time.time()  # the packets' timestamps (last/first use) are this round's
        ep.close()
        log.info("worker %d stopped", self.cfg.index)


def _die_with_parent() -> None:
    """A worker never outlives the agent (even a SIGKILLed one): PR_SET_PDEATHSIG.
    (Without it, the closed control pipe also ends the loop.)"""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(cfg: WorkerConfig, socks: WorkerSockets, conn: Any, seqs: SharedSequences | None,
                lbs: LbTable, close_fds: list[int]) -> None:
    """Entry point of the forked worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    _die_with_parent()
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        cpus = sorted(cfg.cpus) if cfg.cpus else sorted(os.sched_getaffinity(0))
        if cfg.pin_cpu:
            os.sched_setaffinity(0, {cpus[cfg.index % len(cpus)]})
        elif cfg.cpus:
            os.sched_setaffinity(0, set(cpus))
    except OSError as exc:  # e.g. a CPU outside this cgroup's cpuset
        log.warning("worker %d: CPUs %s not set: %s", cfg.index, cfg.cpus or "(pinning)", exc)
    try:
        Worker(cfg, socks, conn, seqs, lbs).run()
    except Exception:
        log.exception("worker %d failed", cfg.index)
        os._exit(1)
