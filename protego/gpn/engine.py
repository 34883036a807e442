"""The userspace ESP engine with I/O: per-core worker processes and their control.

:class:`Engine` creates every socket in the calling process (so the order of the
``SO_REUSEPORT`` groups is the worker order the SPI-sharding BPF program relies
on), forks one worker per core, and keeps a control pipe to each. It must be
started *before* the process creates threads (the etcd client's gRPC threads):
the agent starts it first.

Placement of SAs in workers:

* inbound SA -> worker ``SPI mod workers`` only (the kernel steers its packets
  there, :mod:`protego.gpn.bpf`);
* outbound SA -> every worker, its sequence numbers leased in blocks from one
  shared counter (:mod:`protego.gpn.seqshare`; with one worker, its own counter).

Sequence-number rule (never reused): a counter lives exactly as long as the
outbound SA is installed in this engine. Removing an SA frees its counter; the
agent never installs the same outbound SA again (see :mod:`protego.gpn.agent`),
and a new engine (restart) starts with no outbound SA at all.

Worker failure: if a worker dies, :meth:`Engine.check` reports it; the agent
stops the engine and exits (its supervisor restarts it; the old outbound SAs are
not reinstalled: the GMN rekeys them).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protego.errors import DataplaneError
from protego.lb.heartbeat import DEFAULT_PORT as HB_PORT

from . import bpf
from .records import GpnSa, sa_to_wire
from .seqshare import SharedSequences
from .tenant import VXLAN_PORT, EgressRoute
from .worker import IP_RECVTOS, SOL_UDP, UDP_GRO, LbTable, WorkerConfig, WorkerSockets, worker_main

__all__ = ["Engine", "EngineConfig", "EngineStats", "gpn_mac"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    fabric_addr: str
    workers: int = 0  # 0: one per core
    natt_port: int = 4500
    vxlan_port: int = VXLAN_PORT
    hb_port: int = HB_PORT
    dscp: int = 0x37
    raw_esp: bool = True
    receiver_window: int = 32  # the peers' replay window for our outbound SAs
    reorder_margin: int = 8
    seq_slots: int = 4096
    mtu: int = 1500
    rcvbuf: int = 4 << 20
    pin_cpu: bool = True
    #: source MAC of the frames we send into tenant networks (None: derived from the
    #: fabric address, see :func:`gpn_mac`)
    src_mac: bytes | None = None
    #: the CPUs the workers run on (empty: those the agent may use); a lab host that
    #: keeps its control plane off the data path's CPUs (the testbed's PROTEGO_TESTBED_CPUS)
    worker_cpus: tuple[int, ...] = ()


def gpn_mac(fabric_addr: str) -> bytes:
    """``02:00:00:01:<last two bytes of the fabric address>``.

    Not the tenant gateway's MAC (02:00:00:00:00:01): tenant hosts hold a static
    FDB entry for that MAC towards the GEN's VTEP, and a Linux VXLAN device with
    learning drops frames whose source MAC is statically bound to another VTEP
    (``vxlan_snoop``). The hosts' replies still go to the gateway MAC via the GEN.
    """
    return b"\x02\x00\x00\x01" + socket.inet_aton(fabric_addr)[2:]


@dataclass
class EngineStats:
    sas: dict[tuple[str, int], tuple[int, int, float]] = field(default_factory=dict)
    rekey: set[tuple[str, int]] = field(default_factory=set)  # outbound SAs past a soft limit
    drops: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    first: dict[tuple[str, int], float] = field(default_factory=dict)  # inbound SA -> its first packet (wall clock)


_CHANGES = frozenset({"add", "del", "egress", "hosts"})  # worker requests that change its data path


def parse_cpu_list(text: str, available: set[int] | None = None) -> tuple[int, ...]:
    """``"1,3-5"`` -> (1, 3, 4, 5); ``""`` -> () (no restriction). Every CPU must exist
    (``available``: this machine's CPUs by default; the agent itself may be kept on others,
    e.g. by ``taskset``, and its workers still move to these)."""
    from protego.errors import ConfigError

    text = text.strip()
    if not text:
        return ()
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ConfigError(f"bad CPU list {text!r}: {part.strip()!r} is not a CPU number or range") from None
        if first < 0 or last < first:
            raise ConfigError(f"bad CPU list {text!r}: {part.strip()!r}")
        cpus.update(range(first, last + 1))
    allowed = set(range(os.cpu_count() or 1)) if available is None else available
    if not cpus <= allowed:
        raise ConfigError(f"CPU list {text!r} names CPUs this machine does not have: "
                          f"{', '.join(map(str, sorted(cpus - allowed)))} (allowed: {sorted(allowed)})")
    return tuple(sorted(cpus))


def _udp(addr: str, port: int, rcvbuf: int, gro: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
    except OSError:
        pass
    s.setsockopt(socket.IPPROTO_IP, IP_RECVTOS, 1)
    if gro:
        try:
            s.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            log.info("UDP_GRO not available on this kernel")
    s.bind((addr, port))
    s.setblocking(False)
    return s


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.workers = cfg.workers or os.cpu_count() or 1
        self._ctx = multiprocessing.get_context("fork")
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        self._sync_token = 0
        self.requests = 0  # changes sent to workers (a reconcile pass that sent one waits for them: sync)
        self.pending = False  # (the xfrm backend's changes not applied yet; never here)
        self.seqs: SharedSequences | None = None
        self._slots: dict[int, tuple[int, int]] = {}  # outbound SPI -> (slot, tag)
        self.started = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        cfg, n = self.cfg, self.workers
        try:
            esp = [_udp("0.0.0.0", cfg.natt_port, cfg.rcvbuf, True) for _ in range(n)]
            if n > 1:
                bpf.attach(esp[0], bpf.SO_ATTACH_REUSEPORT_CBPF, bpf.reuseport_by_spi(n))
            vx = [_udp(cfg.fabric_addr, cfg.vxlan_port, cfg.rcvbuf, True) for _ in range(n)]
            hbs = [_udp(cfg.fabric_addr, cfg.hb_port, 1 << 20, False) for _ in range(n)]
            raws: list[socket.socket | None] = []
            for i in range(n):
                if not cfg.raw_esp:
                    raws.append(None)
                    continue
                r = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
                try:
                    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.rcvbuf)
                except OSError:
                    pass
                if n > 1:
                    bpf.attach(r, bpf.SO_ATTACH_FILTER, bpf.raw_esp_owner(n, i))
                r.setblocking(False)
                raws.append(r)
        except OSError as exc:
            raise DataplaneError(f"GPN engine: cannot open its sockets ({exc.strerror})", exc.errno) from None
        if n > 1:
            self.seqs = SharedSequences(cfg.seq_slots, n, cfg.receiver_window, cfg.reorder_margin, self._ctx)
        lbs = LbTable(self._ctx)
        all_socks = [s for s in esp + vx + hbs + raws if s is not None]
        for i in range(n):
            parent, child = self._ctx.Pipe(duplex=True)
            mine = {esp[i].fileno(), vx[i].fileno(), hbs[i].fileno()}
            if raws[i] is not None:
                mine.add(raws[i].fileno())  # type: ignore[union-attr]
            others = [s.fileno() for s in all_socks if s.fileno() not in mine]
            wcfg = WorkerConfig(i, n, cfg.fabric_addr, cfg.dscp, cfg.natt_port, cfg.mtu, cfg.pin_cpu,
                                cfg.src_mac or gpn_mac(cfg.fabric_addr), cfg.vxlan_port, tuple(cfg.worker_cpus))
            p = self._ctx.Process(
                target=worker_main, name=f"gpn-worker-{i}", daemon=True,
                args=(wcfg, WorkerSockets(esp[i], vx[i], hbs[i], raws[i]), child, self.seqs, lbs, others))
            p.start()
            child.close()
            self._procs.append(p)
            self._conns.append(parent)
        for s in all_socks:
            s.close()
        self.started = time.time()
        log.info("GPN engine: %d worker%s on %s (ESP-in-UDP :%d, raw ESP %s, VXLAN :%d, heartbeat :%d)",
                 n, "s" if n > 1 else "", cfg.fabric_addr, cfg.natt_port, "on" if cfg.raw_esp else "off",
                 cfg.vxlan_port, cfg.hb_port)
        return self

    def stop(self) -> None:
        with self._lock:
            for c in self._conns:
                try:
                    c.send(("stop",))
                except OSError:
                    pass
            for p in self._procs:
                p.join(3)
                if p.is_alive():
                    p.terminate()
                    p.join(2)
            for c in self._conns:
                c.close()
            self._procs.clear()
            self._conns.clear()
        log.info("GPN engine stopped")

    def check(self) -> list[int]:
        """Indexes of workers that died."""
        return [i for i, p in enumerate(self._procs) if not p.is_alive()]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    # ------------------------------------------------------------------ control
    def _send(self, i: int, msg: tuple[Any, ...]) -> None:
        if msg[0] in _CHANGES:
            self.requests += 1
        try:
            self._conns[i].send(msg)
        except (OSError, ValueError) as exc:
            raise DataplaneError(f"GPN worker {i} is unreachable ({type(exc).__name__})") from None

    def owner(self, spi: int) -> int:
        """The worker that holds an inbound SA."""
        return spi % self.workers

    def add_sa(self, g: GpnSa, update: bool = False) -> None:
        """Install an SA (``update``: same SA, new endpoints; the counter is kept)."""
        wire = sa_to_wire(g)
        with self._lock:
            if g.inbound:
                self._send(self.owner(g.spi), ("add", wire, None, 0))
                return
            slot, tag = None, 0
            if self.seqs is not None:
                if update and g.spi in self._slots:
                    slot, tag = self._slots[g.spi]
                else:
                    slot, tag = self.seqs.allocate(esn=g.sa.esn)
                    self._slots[g.spi] = (slot, tag)
            for i in range(self.workers):
                self._send(i, ("add", wire, slot, tag))

    def remove_sa(self, g: GpnSa) -> None:
        with self._lock:
            if g.inbound:
                self._send(self.owner(g.spi), ("del", g.spi, "in"))
                return
            for i in range(self.workers):
                self._send(i, ("del", g.spi, "out"))
            st = self._slots.pop(g.spi, None)
            if st is not None and self.seqs is not None:
                self.seqs.free(*st)

    def set_egress(self, routes: list[EgressRoute]) -> None:
        with self._lock:
            for i in range(self.workers):
                self._send(i, ("egress", [tuple(r) for r in routes]))

    def set_hosts(self, entries: dict[tuple[int, int], tuple[bytes, str]]) -> None:
        with self._lock:
            for i in range(self.workers):
                self._send(i, ("hosts", entries))

    def _answer(self, i: int, timeout: float, want: Callable[[Any], bool], what: str) -> Any:
        """Worker ``i``'s answer that ``want`` accepts; answers to earlier requests that
        timed out (a late statistics dict, a late barrier) are read and dropped."""
        c = self._conns[i]
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not c.poll(left):
                raise DataplaneError(f"GPN worker {i} did not answer {what} within {timeout:.1f} s")
            try:
                r = c.recv()
            except (EOFError, OSError) as exc:
                raise DataplaneError(f"GPN worker {i} is unreachable ({type(exc).__name__})") from None
            if want(r):
                return r

    def stats(self, timeout: float = 2.0) -> EngineStats:
        """Sum of every worker's per-SA statistics and counters."""
        out = EngineStats()
        with self._lock:
            for i in range(self.workers):
                self._send(i, ("stats",))
            for i in range(self.workers):
                r = self._answer(i, timeout, lambda r: isinstance(r, dict), "a statistics request")
                out.pids.append(r.get("pid", 0))
                for key, (pk, by, last, rekey, *first) in r.get("sas", {}).items():
                    p0, b0, l0 = out.sas.get(key, (0, 0, 0.0))
                    out.sas[key] = (p0 + pk, b0 + by, max(l0, last))
                    if rekey:
                        out.rekey.add(key)
                    if first and first[0]:
                        out.first[key] = min(first[0], out.first.get(key, first[0]))
                for d in ("drops", "counters"):
                    tgt = getattr(out, d)
                    for k, v in r.get(d, {}).items():
                        tgt[k] = tgt.get(k, 0) + v
        return out

    def sync(self, timeout: float = 1.0) -> None:
        """A barrier: returns once every worker has carried out every request sent to it
        before (SAs, egress routes, hosts). The agent acknowledges a pass only then: a
        request queued in a busy worker's pipe is not yet in its data path."""
        with self._lock:
            self._sync_token += 1
            token = self._sync_token
            for i in range(self.workers):
                self._send(i, ("sync", token))
            for i in range(self.workers):
                self._answer(i, timeout, lambda r: r == ("synced", token), "a barrier")
