"""GMN high availability: charon's ``ha`` sync stream, mirrored per IKE SA in etcd.

strongSwan's ``ha`` plugin serialises every IKE SA change (IKE_ADD with the keys,
IKE_UPDATE with identities and config, the IKE message IDs on every request,
CHILD_ADD with the CHILD_SA keys, deletions) into UDP datagrams it sends from
``ha.local`` to ``ha.remote`` port 4510. Protego points ``ha.remote`` at the GMN
agent in the same network namespace (loopback) instead of at the other GMN:

* on the **active** GMN, :class:`HaRelay` receives the stream and folds it into a
  :class:`HaMirror` (one compact entry per IKE SA: its IKE_ADD, its updates, only the
  latest message ID of each direction, its live CHILD_ADDs), and writes every changed
  entry to etcd under ``/protego/ha/v1/ike/<ike-sa-id>``, in a transaction fenced on
  this GMN's leadership;
* on the **standby** GMN, :class:`HaFeeder` sends its own charon the messages that
  charon has not seen yet (and synthesised IKE_DELETE / CHILD_DELETE messages for
  what went), so its charon holds every IKE SA in state PASSIVE with current
  message IDs and every CHILD_SA installed (through kernel-protego, which the standby
  agent answers without touching the data path);
* on takeover the new active agent writes ``+1`` to charon's HA FIFO
  (``/run/charon.ha``, reached through ``/proc/<charon pid>/root`` because each
  charon may have a private ``/run``): segment 1, i.e. every IKE SA, goes from
  PASSIVE to ESTABLISHED, and charon sends each peer a DPD with the next message ID.

Leadership is not the ``ha`` plugin's heartbeat (``monitor = no``): it is the GMN
agents' etcd election. The mirror carries DH secrets and keys: it lives in charon,
the agents' memory and etcd only; logs name message types and IKE SPIs, never values.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

HA_PREFIX = "/protego/ha/v1/ike/"
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # asm-generic/socket.h (Python does not export it)
HA_PORT = 4510
CHARON_HA_ADDR = "127.0.0.1"  # charon's ha.local (inside the GMN's namespace)
AGENT_HA_ADDR = "127.0.0.2"  # charon's ha.remote: the agent's socket
VERSION = 3  # HA_MESSAGE_VERSION of strongSwan 5.x
ENTRY_MAGIC = b"PGHA1\n"
MAX_OPS = 100  # etcd refuses transactions of more than 128 operations

# message types (ha_message.h)
IKE_ADD, IKE_UPDATE, IKE_MID_INITIATOR, IKE_MID_RESPONDER, IKE_DELETE = 1, 2, 3, 4, 5
CHILD_ADD, CHILD_DELETE, SEGMENT_DROP, SEGMENT_TAKE, STATUS, RESYNC, IKE_IV = 6, 7, 8, 9, 10, 11, 12
TYPE_NAMES = {1: "IKE_ADD", 2: "IKE_UPDATE", 3: "IKE_MID_INITIATOR", 4: "IKE_MID_RESPONDER", 5: "IKE_DELETE",
              6: "CHILD_ADD", 7: "CHILD_DELETE", 8: "SEGMENT_DROP", 9: "SEGMENT_TAKE", 10: "STATUS",
              11: "RESYNC", 12: "IKE_IV"}
MIRRORED = {IKE_ADD, IKE_UPDATE, IKE_MID_INITIATOR, IKE_MID_RESPONDER, IKE_DELETE, CHILD_ADD, CHILD_DELETE, IKE_IV}
REPLACED = {IKE_MID_INITIATOR, IKE_MID_RESPONDER, IKE_IV}  # only the latest one per IKE SA matters

# attributes (ha_message.h) and the size of their encodings (ha_message.c)
A_IKE_ID, A_IKE_REKEY_ID, A_CONFIG_NAME, A_INBOUND_SPI, A_MID = 1, 2, 8, 27, 33
_IKE_ID_LEN = 18  # u8 version, u64 initiator SPI, u64 responder SPI, u8 initiator flag
_FIXED = {1: 18, 2: 18, 9: 4, 10: 4, 27: 4, 28: 4, 33: 4,
          14: 1, 25: 1, 26: 1, 36: 1,
          19: 2, 20: 2, 21: 2, 22: 2, 23: 2, 24: 2, 29: 2, 30: 2, 34: 2, 35: 2, 41: 2}
_IDENT = {3, 4, 5}  # u8 type, u8 length, data
_HOST = {6, 7, 11, 12, 13}  # u16 port, u8 family, 4 or 16 address bytes
_CHUNK = {15, 16, 17, 18, 37, 38, 39, 40}  # u16 length, data (nonces, DH secrets, keys)
_TS = {31, 32}  # u8 type, u8 proto, u16 from, u16 to, u8 dynamic, two addresses
_AF_LEN = {2: 4, 10: 16}
_TS_LEN = {7: 4, 8: 16}  # TS_IPV4_ADDR_RANGE, TS_IPV6_ADDR_RANGE


class HaFormatError(ValueError):
    """A datagram that is not a well-formed version-3 HA message."""


@dataclass(frozen=True)
class HaMessage:
    raw: bytes
    type: int
    ike_id: bytes | None = None  # the 18-byte encoding of the IKE SA's id
    rekey_id: bytes | None = None  # IKE_ADD of a rekeyed IKE SA: the old one's id
    inbound_spi: bytes | None = None  # CHILD_ADD/DELETE: 4 bytes as encoded
    mid: int | None = None

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type {self.type}")

    @property
    def spis(self) -> str:
        return ike_spis(self.ike_id) if self.ike_id else "-"


def ike_spis(ike_id: bytes) -> str:
    """``initiator_responder`` SPIs in hex, as ``swanctl --list-sas`` prints them."""
    return f"{ike_id[1:9].hex()}_{ike_id[9:17].hex()}"


def spi_of(encoded: bytes) -> int:
    """A CHILD_SA SPI as VICI prints it (charon keeps SPIs in network order and the HA
    encoding applies htonl once more: the bytes come reversed)."""
    return int.from_bytes(encoded, "little")


def parse(raw: bytes) -> HaMessage:
    """Walk a message's attributes (their sizes follow from their types) and pick out
    what the mirror needs; every attribute is checked to be complete."""
    if len(raw) < 2:
        raise HaFormatError("HA message too short")
    if raw[0] != VERSION:
        raise HaFormatError(f"HA message version {raw[0]}, expected {VERSION}")
    found: dict[int, bytes] = {}
    pos, end = 2, len(raw)
    while pos < end:
        attr = raw[pos]
        pos += 1
        if attr in _FIXED:
            size = _FIXED[attr]
        elif attr in _IDENT:
            if pos + 2 > end:
                raise HaFormatError("truncated identity")
            size = 2 + raw[pos + 1]
        elif attr in _HOST:
            if pos + 3 > end or raw[pos + 2] not in _AF_LEN:
                raise HaFormatError("bad host encoding")
            size = 3 + _AF_LEN[raw[pos + 2]]
        elif attr == A_CONFIG_NAME:
            nul = raw.find(b"\0", pos)
            if nul < 0:
                raise HaFormatError("unterminated config name")
            size = nul - pos + 1
        elif attr in _CHUNK:
            if pos + 2 > end:
                raise HaFormatError("truncated chunk")
            size = 2 + struct.unpack_from("!H", raw, pos)[0]
        elif attr in _TS:
            if pos + 7 > end or raw[pos] not in _TS_LEN:
                raise HaFormatError("bad traffic selector")
            size = 7 + 2 * _TS_LEN[raw[pos]]
        else:
            raise HaFormatError(f"unknown HA attribute {attr}")
        if pos + size > end:
            raise HaFormatError(f"HA attribute {attr} truncated")
        found.setdefault(attr, raw[pos:pos + size])
        pos += size
    mid = found.get(A_MID)
    return HaMessage(raw, raw[1], found.get(A_IKE_ID), found.get(A_IKE_REKEY_ID), found.get(A_INBOUND_SPI),
                     struct.unpack("!I", mid)[0] if mid else None)


def ike_delete(ike_id: bytes) -> bytes:
    return bytes([VERSION, IKE_DELETE, A_IKE_ID]) + ike_id


def child_delete(ike_id: bytes, inbound_spi: bytes) -> bytes:
    return bytes([VERSION, CHILD_DELETE, A_IKE_ID]) + ike_id + bytes([A_INBOUND_SPI]) + inbound_spi


# ---------------------------------------------------------------------------- entries
def encode_entry(messages: Iterable[bytes]) -> bytes:
    out = bytearray(ENTRY_MAGIC)
    for m in messages:
        out += struct.pack("!I", len(m)) + m
    return bytes(out)


def decode_entry(blob: bytes) -> list[bytes]:
    if not blob.startswith(ENTRY_MAGIC):
        raise HaFormatError("not a Protego HA entry")
    out, pos = [], len(ENTRY_MAGIC)
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise HaFormatError("truncated HA entry")
        (n,) = struct.unpack_from("!I", blob, pos)
        pos += 4
        if pos + n > len(blob):
            raise HaFormatError("truncated HA entry")
        out.append(blob[pos:pos + n])
        pos += n
    return out


def entry_key(ike_id: bytes) -> str:
    return HA_PREFIX + ike_id.hex()


def key_ike_id(key: str) -> bytes | None:
    try:
        ike_id = bytes.fromhex(key[len(HA_PREFIX):])
    except ValueError:
        return None
    return ike_id if key.startswith(HA_PREFIX) and len(ike_id) == _IKE_ID_LEN else None


class HaMirror:
    """The compact state of every IKE SA, per current IKE SA id.

    An entry lists, in the order charon sent them: the IKE_ADD, the IKE_UPDATEs, the
    latest IKE_MID_INITIATOR / IKE_MID_RESPONDER, the live CHILD_ADDs. After an IKE
    rekey the new entry keeps the old IKE SA's messages in front of its own IKE_ADD
    (which names the old id) for as long as a CHILD_SA created on the old one lives:
    replayed in order, charon rebuilds the old SA and the new one inherits its
    CHILD_SAs, as it did on the active GMN. Not thread-safe: one owner at a time.
    """

    def __init__(self) -> None:
        self.entries: dict[bytes, list[HaMessage]] = {}

    def load(self, items: Mapping[bytes, list[bytes]]) -> None:
        self.entries = {k: [parse(m) for m in msgs] for k, msgs in items.items()}

    def raw(self, ike_id: bytes) -> list[bytes] | None:
        e = self.entries.get(ike_id)
        return None if e is None else [m.raw for m in e]

    def apply(self, msg: HaMessage) -> set[bytes]:
        """Fold one message in; the ids of the entries that changed (or went)."""
        if msg.type not in MIRRORED or msg.ike_id is None:
            return set()
        ike = msg.ike_id
        entry = self.entries.get(ike)
        if msg.type == IKE_ADD:
            history: list[HaMessage] = []
            changed = {ike}
            if msg.rekey_id is not None and msg.rekey_id in self.entries:
                history = self.entries.pop(msg.rekey_id)
                changed.add(msg.rekey_id)
            self.entries[ike] = self._compact(ike, history + [msg])
            return changed
        if msg.type == IKE_DELETE:
            return {ike} if self.entries.pop(ike, None) is not None else set()
        if entry is None:
            return set()  # an update for an IKE SA we never saw added (or already deleted)
        if msg.type in REPLACED:
            entry[:] = [m for m in entry if not (m.type == msg.type and m.ike_id == ike)]
            entry.append(msg)
        elif msg.type == CHILD_DELETE:
            before = len(entry)
            entry[:] = [m for m in entry if not (m.type == CHILD_ADD and m.inbound_spi == msg.inbound_spi)]
            if len(entry) == before:
                return set()
            self.entries[ike] = self._compact(ike, entry)
        else:  # IKE_UPDATE, CHILD_ADD
            entry.append(msg)
        return {ike}

    def forget_child(self, spis: str, spi_in: int) -> set[bytes]:
        """A CHILD_SA charon rekeyed and the peer deleted: charon destroys it (and the ha
        plugin reports CHILD_DELETE) only ``delete_rekeyed_delay`` later, so a takeover
        within that delay would revive it on the standby. Drop it from the mirror now."""
        for ike, entry in self.entries.items():
            if ike_spis(ike) != spis:
                continue
            kept = [m for m in entry if not (m.type == CHILD_ADD and m.inbound_spi and spi_of(m.inbound_spi) == spi_in)]
            if len(kept) == len(entry):
                return set()
            self.entries[ike] = self._compact(ike, kept)
            return {ike}
        return set()

    @staticmethod
    def _compact(current: bytes, msgs: list[HaMessage]) -> list[HaMessage]:
        """Drop the history of older IKE SAs no live CHILD_SA was created on."""
        needed = {current} | {m.ike_id for m in msgs if m.type == CHILD_ADD}
        first = next((i for i, m in enumerate(msgs) if m.ike_id in needed), len(msgs))
        return msgs[first:]


# ---------------------------------------------------------------------------- standby
class HaFeeder:
    """What the standby's charon has been sent, and what it still needs."""

    def __init__(self) -> None:
        self.sent: set[bytes] = set()
        self.children: dict[bytes, tuple[bytes, bytes]] = {}  # CHILD_ADD raw -> (entry id, inbound SPI)
        self.ikes: set[bytes] = set()

    def reset(self, present_ikes: set[bytes] | None = None, entries: Mapping[bytes, list[bytes]] | None = None,
              present_children: set[bytes] | None = None) -> None:
        """Forget what was sent (charon restarted). ``present_*``: what a charon that
        survived an agent restart already holds (IKE ids; inbound SPIs as encoded), so
        it is not added twice."""
        self.sent, self.children, self.ikes = set(), {}, set()
        if not present_ikes or entries is None:
            return
        for ike, msgs in entries.items():
            if ike not in present_ikes:
                continue
            self.ikes.add(ike)
            for raw in msgs:
                m = parse(raw)
                if m.type == CHILD_ADD:
                    if present_children is None or m.inbound_spi not in present_children:
                        continue
                    self.children[raw] = (ike, m.inbound_spi or b"")
                if m.type not in REPLACED:
                    self.sent.add(raw)

    def plan(self, entries: Mapping[bytes, list[bytes]]) -> list[bytes]:
        """The datagrams that bring charon to ``entries``: new messages in entry order
        (additions before deletions: a rekeyed IKE SA's successor must inherit its
        CHILD_SAs before the old one could go), then CHILD_DELETEs, then IKE_DELETEs."""
        out: list[bytes] = []
        present_children: dict[bytes, tuple[bytes, bytes]] = {}
        mentioned: set[bytes] = set()
        for ike, msgs in entries.items():
            for raw in msgs:
                m = parse(raw)
                if m.ike_id:
                    mentioned.add(m.ike_id)
                if m.type == CHILD_ADD:
                    present_children[raw] = (ike, m.inbound_spi or b"")
                if raw not in self.sent:
                    out.append(raw)
        for raw, (ike, spi) in self.children.items():
            if raw not in present_children and ike in entries:
                out.append(child_delete(ike, spi))
        for ike in self.ikes - set(entries):
            if ike not in mentioned:  # not absorbed by a successor's IKE_ADD
                out.append(ike_delete(ike))
        return out

    def mark(self, entries: Mapping[bytes, list[bytes]]) -> None:
        """Everything in ``entries`` has been sent."""
        self.sent = {raw for msgs in entries.values() for raw in msgs}
        self.children = {}
        for ike, msgs in entries.items():
            for raw in msgs:
                if raw[1] == CHILD_ADD:
                    self.children[raw] = (ike, parse(raw).inbound_spi or b"")
        self.ikes = set(entries)


# ---------------------------------------------------------------------------- charon's side
def fifo_path(charon_pid: int) -> str:
    """charon's HA FIFO as charon sees it (its /run may be private)."""
    return f"/proc/{charon_pid}/root/run/charon.ha"


def write_fifo(charon_pid: int, command: str, timeout: float = 2.0) -> None:
    """``+1`` activates segment 1 (all IKE SAs), ``-1`` makes them passive."""
    path = fifo_path(charon_pid)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:  # ENXIO: charon's reader thread has not opened it yet
            if time.monotonic() > deadline:
                raise OSError(exc.errno, f"charon's HA FIFO {path}: {exc.strerror}") from None
            time.sleep(0.01)
    try:
        os.write(fd, command.encode())
    finally:
        os.close(fd)


class LatencyHistogram:
    """Replication latencies in 0.25 ms buckets up to 1 s (plus one overflow bucket)."""

    WIDTH_MS = 0.25
    BUCKETS = 4001

    def __init__(self) -> None:
        self.counts = [0] * self.BUCKETS
        self.lock = threading.Lock()
        self.total = 0
        self.max_ms = 0.0

    def add(self, ms: float) -> None:
        i = min(self.BUCKETS - 1, int(max(0.0, ms) / self.WIDTH_MS))
        with self.lock:
            self.counts[i] += 1
            self.total += 1
            self.max_ms = max(self.max_ms, ms)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            nz = {str(i): c for i, c in enumerate(self.counts) if c}
            return {"width_ms": self.WIDTH_MS, "buckets": nz, "count": self.total, "max_ms": round(self.max_ms, 3)}


def histogram_quantile(before: Mapping[str, Any] | None, after: Mapping[str, Any], q: float) -> float | None:
    """The ``q`` quantile (upper bucket edge, ms) of the samples added between two
    :meth:`LatencyHistogram.snapshot` s."""
    width = float(after.get("width_ms", 0.25))
    b = {int(k): v for k, v in ((before or {}).get("buckets") or {}).items()}
    diff = {int(k): v - b.get(int(k), 0) for k, v in (after.get("buckets") or {}).items()}
    total = sum(c for c in diff.values() if c > 0)
    if total == 0:
        return None
    need, seen = q * total, 0
    for i in sorted(diff):
        seen += max(0, diff[i])
        if seen >= need:
            return (i + 1) * width
    return (max(diff) + 1) * width


class HaSocket:
    """The agent's end of charon's HA stream (``ha.remote``:4510, loopback)."""

    def __init__(self, local: str = AGENT_HA_ADDR, charon: str = CHARON_HA_ADDR, port: int = HA_PORT) -> None:
        self.charon = (charon, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((local, port))
        self.sock.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def close(self) -> None:
        self.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def wake(self) -> None:
        """End a :meth:`receive` waiting in another thread now (it returns what it has)."""
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already woken

    def send(self, datagrams: Iterable[bytes]) -> int:
        n = 0
        for d in datagrams:
            for _ in range(200):
                try:
                    self.sock.sendto(d, self.charon)
                    break
                except BlockingIOError:
                    time.sleep(0.001)
                except ConnectionRefusedError:
                    # an ICMP error from an earlier datagram (charon not listening then)
                    continue
            n += 1
        return n

    def receive(self, timeout: float) -> list[tuple[bytes, float]]:
        """Every datagram waiting (after up to ``timeout`` s for the first), each with its
        kernel receive time (``time.time()`` clock)."""
        r, _, _ = select.select([self.sock, self._wake_r], [], [], timeout)
        out: list[tuple[bytes, float]] = []
        if self._wake_r in r:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        if self.sock not in r:
            return out
        while len(out) < 1024:
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65535, 64)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                continue
            if addr[0] != self.charon[0]:
                continue  # not charon's stream
            ts = time.time()
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= 16:
                    sec, nsec = struct.unpack("qq", payload[:16])
                    ts = sec + nsec / 1e9
            out.append((data, ts))
        return out


Writer = Callable[[dict[bytes, list[bytes] | None]], bool]
