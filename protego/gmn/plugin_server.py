"""Agent side of the kernel-protego plugin protocol: a unix-socket server.

charon's kernel-protego plugin connects to this server and sends every
kernel-ipsec call (see ``charon-plugins/kernel-protego/PROTOCOL.md``).  The
server answers ``get_spi`` through an injected SPI allocator and ``query_sa``
through an injected counters source, keeps the SAs and policies charon has
installed, rebuilds them from the plugin's state dump after every
(re)connect, and can send expire events back to the plugin.

One plugin connection at a time (one charon per GMN): a second connection
waits in the backlog until the first one closes (a restarted charon's old
connection is closed by the kernel, so its successor is served at once).  Key material stays in memory, inside
:class:`~protego.gmn.plugin_protocol.Secret`; logs carry SPIs and reqids only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from protego.errors import PeerError
from protego.gmn import plugin_protocol as pp

log = logging.getLogger(__name__)

#: plugin calls served at once (charon's default thread pool has 16 threads)
POOL_WORKERS = 32
# the history of calls kept for inspection (tests, debugging): bounded, and without keys
EVENT_HISTORY = 4096
_NO_KEY = pp.Secret(b"")
_CONCURRENT = (pp.AddSa, pp.DelSa, pp.UpdateSa, pp.GetSpi, pp.QuerySa)

SaKey = tuple[int, int, str]
"""(spi, protocol, destination address): how charon identifies an SA."""


@dataclass(frozen=True)
class Counters:
    """What a data path reports for one SA (``idle`` None = never used)."""

    bytes: int = 0
    packets: int = 0
    idle: int | None = None


SpiAllocator = Callable[[pp.GetSpi, set[int]], int]
"""(request, SPIs in use) -> a new inbound SPI (>= 0x100, not in use)."""

CountersSource = Callable[[pp.QuerySa], Counters | None]
"""query -> counters of that SA, None if the data path does not know it."""


def random_spi_allocator(request: pp.GetSpi, in_use: set[int]) -> int:
    """Default allocator: a random SPI in 0xc0000000.. not in use on this agent."""
    while True:
        spi = 0xC0000000 | secrets.randbits(30)
        if spi not in in_use:
            return spi


@dataclass
class SaRecord:
    """An SA charon installed, as the agent knows it."""

    sa: pp.AddSa
    installed: float = field(default_factory=time.monotonic)
    updates: list[pp.UpdateSa] = field(default_factory=list)

    @property
    def key(self) -> SaKey:
        return self.sa.key


@dataclass(frozen=True)
class Event:
    """One request the server handled, in order (for the agent and tests)."""

    kind: str
    message: pp.Message
    status: pp.Status


class PluginServer:
    """Serve the kernel-protego plugin on a unix stream socket.

    ``spi_allocator`` answers GET_SPI (an exception makes charon's get_spi
    fail); ``counters`` answers QUERY_SA (SAs it does not know are reported
    with zero counters as long as charon installed them); ``on_change`` is
    called from the server thread, with no lock held, after every state change
    (add_sa, update_sa, del_sa, policies, flushes, the end of a state dump) and
    *before* the reply goes back, so charon's call returns only once the agent
    has acted on it (keep it well under the plugin's timeout, 5 s by default).
    Its exceptions are logged and do not change the reply.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        spi_allocator: SpiAllocator = random_spi_allocator,
        counters: CountersSource | None = None,
        on_change: Callable[[Event], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        software: str = "protego-gmn",
        allowed_uids: set[int] | None = None,
    ) -> None:
        self.path = Path(path)
        # who may connect (SO_PEERCRED): root and this process's own user (charon runs as
        # root; the socket is also mode 0600)
        self.allowed_uids = allowed_uids if allowed_uids is not None else {0, os.geteuid()}
        self.refused_peers = 0
        self._allocate = spi_allocator
        self._counters = counters
        self._on_change = on_change
        self._on_disconnect = on_disconnect
        self._software = software
        self._lock = threading.Condition()
        self.sas: dict[SaKey, SaRecord] = {}
        self.policies: dict[tuple[object, ...], pp.AddPolicy] = {}
        self.allocated: set[int] = set()
        self.events: deque[Event] = deque(maxlen=EVENT_HISTORY)
        self.dumps: list[pp.DumpEnd] = []
        self.hello: pp.Hello | None = None
        self.connections = 0
        self._dump: tuple[dict[SaKey, SaRecord], dict[tuple[object, ...], pp.AddPolicy]] | None = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._tls = threading.local()  # the event _process produced, per dispatching thread
        # charon's threads each wait for their own call: calls on different IKE SAs are
        # served concurrently (charon never has two calls outstanding for one IKE SA)
        self._pool = ThreadPoolExecutor(max_workers=POOL_WORKERS, thread_name_prefix="gmn-plugin-call")

    # ----------------------------------------------------------- lifecycle

    def start(self) -> PluginServer:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)  # the socket carries keys: owner only
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old)
        listener.listen(4)
        self._listener = listener
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="gmn-plugin-server", daemon=True)
        self._thread.start()
        log.info("plugin server listening on %s", self.path)
        return self

    def stop(self) -> None:
        self._stopping = True
        for sock in (self._listener, self._conn):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._listener = self._conn = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> PluginServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------- queries

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def wait_for(self, predicate: Callable[[PluginServer], bool], timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds (checked after every change)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return True

    def events_of(self, kind: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.kind == kind]

    # -------------------------------------------------------------- events

    def send_expire(self, spi: int, dst: pp.Host, *, hard: bool = False,
                    proto: int = pp.ESP) -> None:
        """Ask the plugin to raise a lifetime expire (e.g. a byte limit reached)."""
        self._send(pp.Expire(proto=proto, spi=spi, dst=dst, hard=hard), 0)
        log.info("sent %s expire for SA %08x", "hard" if hard else "soft", spi)

    # ------------------------------------------------------------- serving

    def _send(self, msg: pp.Message, request_id: int) -> None:
        conn = self._conn
        if conn is None:
            raise PeerError("the kernel-protego plugin is not connected")
        frame = pp.encode(msg, request_id)
        with self._send_lock:
            conn.sendall(frame)

    def _serve(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            try:
                pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                    struct.calcsize("3i")))
            except OSError as exc:
                log.warning("plugin connection without peer credentials refused: %s", exc)
                conn.close()
                continue
            if uid not in self.allowed_uids:
                self.refused_peers += 1
                log.warning("plugin connection from pid %d uid %d refused (allowed uids: %s)", pid, uid,
                            ", ".join(map(str, sorted(self.allowed_uids))))
                conn.close()
                continue
            old, self._conn = self._conn, conn
            if old is not None:
                old.close()
            self.connections += 1
            try:
                self._handle(conn)
            except (OSError, pp.ProtocolError) as exc:
                if not self._stopping:
                    log.warning("plugin connection closed: %s", exc)
            finally:
                if self._conn is conn:
                    self._conn = None
                conn.close()
                with self._lock:
                    self._dump = None
                    self._lock.notify_all()
                if self._on_disconnect is not None and not self._stopping and self._conn is None:
                    try:  # charon went away (or restarts): the agent may have to step down
                        self._on_disconnect()
                    except Exception as exc:  # noqa: BLE001 - an agent bug must not kill the server
                        log.error("on_disconnect callback failed: %s", exc)

    def _handle(self, conn: socket.socket) -> None:
        reader = pp.FrameReader()
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                for body in reader.feed(data):
                    self._dispatch(body)
        finally:
            reader.clear()

    def _dispatch(self, body: bytes) -> None:
        try:
            request_id, msg = pp.decode(body)
        except pp.UnknownMessage as exc:
            log.warning("plugin sent unknown message type 0x%04x", exc.msg_type)
            if exc.request_id:
                self._send(pp.Reply(request_type=exc.msg_type, status=pp.Status.NOT_SUPPORTED),
                           exc.request_id)
            return
        if isinstance(msg, _CONCURRENT) and not getattr(msg, "dump", False):
            self._pool.submit(self._call, request_id, msg)
        else:  # hello, the state dump, policies: in order, on the connection's thread
            self._run(request_id, msg)

    def _call(self, request_id: int, msg: pp.Message) -> None:
        try:
            self._run(request_id, msg)
        except (OSError, PeerError) as exc:
            log.warning("could not answer %s: %s", type(msg).__name__, exc)

    def _run(self, request_id: int, msg: pp.Message) -> None:
        self._tls.changed = None
        try:
            reply = self._process(msg)
        except Exception as exc:  # noqa: BLE001 - an injected callback failed: answer, keep serving
            log.error("handling %s failed: %s", type(msg).__name__, exc)
            reply = pp.Reply(request_type=msg.TYPE, status=pp.Status.FAILED,
                             error=f"agent error: {type(exc).__name__}")
        event, self._tls.changed = getattr(self._tls, "changed", None), None
        if event is not None and self._on_change is not None:
            try:  # before the reply: charon's call returns only after the agent acted
                self._on_change(event)
            except Exception as exc:  # noqa: BLE001 - an agent bug must not kill the server
                log.error("on_change callback failed for %s: %s", event.kind, exc)
                if event.kind == "add_sa" and isinstance(msg, pp.AddSa):
                    # the agent could not place it (its record was not written): charon
                    # must not go on with an SA no data path has; it fails the CHILD_SA
                    with self._lock:
                        self.sas.pop(msg.key, None)
                    reply = pp.Reply(request_type=msg.TYPE, status=pp.Status.FAILED,
                                     error="the SA could not be recorded")
        if request_id and reply is not None:
            self._send(reply, request_id)
        if isinstance(msg, pp.Hello) and reply is not None and reply.status != pp.Status.OK:
            raise pp.VersionMismatch("plugin protocol version mismatch")

    def _record(self, kind: str, msg: pp.Message, status: pp.Status) -> Event:
        """The event handed to the agent (the whole message); the history keeps a copy
        without the keys."""
        event = Event(kind, msg, status)
        kept = event
        if isinstance(msg, pp.AddSa) and (msg.enc_key != _NO_KEY or msg.int_key != _NO_KEY):
            kept = Event(kind, dataclasses.replace(msg, enc_key=_NO_KEY, int_key=_NO_KEY), status)
        self.events.append(kept)
        self._lock.notify_all()
        return event

    def _process(self, msg: pp.Message) -> pp.Reply | None:
        event: Event | None = None
        reply: pp.Reply
        with self._lock:
            if isinstance(msg, pp.Hello):
                try:
                    pp.check_version(msg)
                except pp.VersionMismatch as exc:
                    log.error("%s", exc)
                    return pp.Reply(request_type=msg.TYPE, status=pp.Status.VERSION,
                                    version=pp.VERSION, error=str(exc))
                self.hello = msg
                log.info("plugin connected: %s (pid %s, protocol %d.%d)", msg.software, msg.pid,
                         *msg.version)
                self._record("hello", msg, pp.Status.OK)
                return pp.Reply(request_type=msg.TYPE, version=pp.VERSION,
                                software=self._software)
            if isinstance(msg, pp.GetSpi):
                in_use = self.allocated | {k[0] for k in self.sas}
                spi = self._allocate(msg, in_use)
                if spi < 0x100 or spi > 0xFFFFFFFF or spi in in_use:
                    raise PeerError(f"SPI allocator returned an unusable SPI {spi:#x}")
                self.allocated.add(spi)
                self._record("get_spi", msg, pp.Status.OK)
                return pp.Reply(request_type=msg.TYPE, spi=spi)
            if isinstance(msg, pp.GetCpi):
                return pp.Reply(request_type=msg.TYPE, status=pp.Status.NOT_SUPPORTED)
            if isinstance(msg, pp.AddSa):
                if msg.dump:
                    if self._dump is not None:
                        self._dump[0][msg.key] = SaRecord(msg, time.monotonic() - (msg.age or 0))
                    return None
                self.sas[msg.key] = SaRecord(msg)
                self.allocated.discard(msg.spi)  # now in use through self.sas
                log.info("add_sa %s SA %08x reqid %d", "inbound" if msg.inbound else "outbound",
                         msg.spi, msg.reqid)
                event = self._record("add_sa", msg, pp.Status.OK)
                reply = pp.Reply(request_type=msg.TYPE)
            elif isinstance(msg, pp.UpdateSa):
                rec = self.sas.pop(msg.key, None)
                if rec is None:
                    self._record("update_sa", msg, pp.Status.NOT_FOUND)
                    return pp.Reply(request_type=msg.TYPE, status=pp.Status.NOT_FOUND)
                assert msg.new_src is not None and msg.new_dst is not None
                flags = rec.sa.flags & ~pp.SaFlag.ENCAP
                if msg.flags & pp.SaFlag.NEW_ENCAP:
                    flags |= pp.SaFlag.ENCAP
                sa = dataclasses.replace(rec.sa, src=msg.new_src, dst=msg.new_dst, flags=flags,
                                         reqid=msg.new_reqid or rec.sa.reqid)
                rec.sa = sa
                rec.updates.append(msg)
                self.sas[sa.key] = rec
                log.info("update_sa SA %08x -> %s", msg.spi, msg.new_dst)
                event = self._record("update_sa", msg, pp.Status.OK)
                reply = pp.Reply(request_type=msg.TYPE)
            elif isinstance(msg, pp.QuerySa):
                if msg.key not in self.sas:
                    return pp.Reply(request_type=msg.TYPE, status=pp.Status.NOT_FOUND)
                counters = (self._counters(msg) if self._counters else None) or Counters()
                return pp.Reply(request_type=msg.TYPE, bytes=counters.bytes,
                                packets=counters.packets, idle=counters.idle)
            elif isinstance(msg, pp.DelSa):
                rec = self.sas.pop(msg.key, None)
                self.allocated.discard(msg.spi)
                status = pp.Status.OK if rec else pp.Status.NOT_FOUND
                log.info("del_sa SA %08x reqid %s", msg.spi, rec.sa.reqid if rec else "?")
                event = self._record("del_sa", msg, status)
                reply = pp.Reply(request_type=msg.TYPE, status=status)
            elif isinstance(msg, pp.FlushSas):
                self.sas.clear()
                event = self._record("flush_sas", msg, pp.Status.OK)
                reply = pp.Reply(request_type=msg.TYPE)
            elif isinstance(msg, pp.AddPolicy):
                if msg.dump:
                    if self._dump is not None:
                        self._dump[1][msg.key] = msg
                    return None
                self.policies[msg.key] = msg
                event = self._record("add_policy", msg, pp.Status.OK)
                reply = pp.Reply(request_type=msg.TYPE)
            elif isinstance(msg, pp.DelPolicy):
                pol = self.policies.pop(msg.key, None)
                status = pp.Status.OK if pol else pp.Status.NOT_FOUND
                event = self._record("del_policy", msg, status)
                reply = pp.Reply(request_type=msg.TYPE, status=status)
            elif isinstance(msg, pp.QueryPolicy):
                return pp.Reply(request_type=msg.TYPE, status=pp.Status.NOT_SUPPORTED)
            elif isinstance(msg, pp.FlushPolicies):
                self.policies.clear()
                event = self._record("flush_policies", msg, pp.Status.OK)
                reply = pp.Reply(request_type=msg.TYPE)
            elif isinstance(msg, pp.DumpBegin):
                self._dump = ({}, {})
                return pp.Reply(request_type=msg.TYPE)
            elif isinstance(msg, pp.DumpEnd):
                if self._dump is not None:
                    # the plugin is authoritative for what charon installed
                    self.sas, self.policies = self._dump
                    self._dump = None
                self.dumps.append(msg)
                log.info("state dump from plugin: %d SAs, %d policies", msg.sa_count,
                         msg.policy_count)
                event = self._record("dump", msg, pp.Status.OK)
                reply = pp.Reply(request_type=msg.TYPE)
            else:
                return pp.Reply(request_type=msg.TYPE, status=pp.Status.NOT_SUPPORTED)
        self._tls.changed = event
        return reply
