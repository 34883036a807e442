"""Direct acknowledgements: GPN and GIN/GEN agents tell the GMNs at once, over the
fabric, which etcd revision their data path now reflects.

The acknowledgement of record stays in etcd (``gpn/applied/<gpn>``, ``lb/applied/<node>``):
it is what survives restarts, and what the GMN falls back on. But the GMN holds charon
between a rekey's answer and its DELETE until the new inbound SA is acknowledged, and a
migration's outbound switch waits for one more round, so every acknowledgement that
travels agent → etcd (a write) → GMN (a watch that also carries every other change of
the system) lies on the critical path twice. The datagram sent next to that write takes
the etcd round trip and the watch out of it.

Wire format (UDP, one datagram per acknowledgement and GMN)::

    b"PGA1" | HMAC-SHA256(key, body)[:16] | body (JSON: kind, node, revision, sas_revision)

Each GMN agent draws a fresh 32-byte key when it starts and publishes it with its
address under ``gmn/acks/<node>`` (leased: it goes with the GMN). Senders read those
records from etcd; the key lives only in etcd and the agents' memory, never in logs. A
datagram whose tag does not verify is dropped (and counted). A replayed or stale one is
harmless: acknowledgements are etcd revisions, the GMN keeps the highest per node, and
a revision only ever says "everything up to here is applied"; an old one cannot satisfy
a wait for a newer transaction. A lost datagram costs nothing but time: the etcd
acknowledgement follows it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from protego.control.model import PREFIX
from protego.store.view import PrefixView

__all__ = ["ACKS_PREFIX", "DEFAULT_PORT", "MAGIC", "AckReceiver", "AckSender", "decode", "encode"]

log = logging.getLogger(__name__)

ACKS_PREFIX = f"{PREFIX}gmn/acks/"
DEFAULT_PORT = 7472
MAGIC = b"PGA1"
TAG_LEN = 16
KINDS = ("gpn", "lb")
MAX_DATAGRAM = 512


def _tag(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:TAG_LEN]


def encode(key: bytes, kind: str, node: str, revision: int, sas_revision: int | None = None) -> bytes:
    """One acknowledgement datagram, authenticated with ``key``."""
    body: dict[str, Any] = {"kind": kind, "node": node, "revision": int(revision)}
    if sas_revision is not None:
        body["sas_revision"] = int(sas_revision)
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return MAGIC + _tag(key, raw) + raw


def decode(key: bytes, data: bytes) -> dict[str, Any] | None:
    """The acknowledgement in ``data``; None if it is not one, or not made with ``key``."""
    if len(data) > MAX_DATAGRAM or len(data) <= len(MAGIC) + TAG_LEN or not data.startswith(MAGIC):
        return None
    tag, raw = data[len(MAGIC):len(MAGIC) + TAG_LEN], data[len(MAGIC) + TAG_LEN:]
    if not hmac.compare_digest(tag, _tag(key, raw)):
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("kind") not in KINDS or not isinstance(body.get("node"), str) \
            or not body["node"] or "/" in body["node"]:
        return None
    out: dict[str, Any] = {"kind": body["kind"], "node": body["node"]}
    for f in ("revision", "sas_revision"):
        v = body.get(f)
        if v is None and f == "sas_revision":
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return None
        out[f] = v
    return out


class AckReceiver:
    """A GMN's end: a UDP socket on its fabric address and a thread that hands every
    authentic acknowledgement to ``on_ack(kind, node, fields)``."""

    def __init__(self, host: str, port: int, on_ack: Callable[[str, str, dict[str, int]], None]) -> None:
        self.key = os.urandom(32)
        self._on_ack = on_ack
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.bind((host, port))
        except OSError:
            self._sock.close()
            raise
        self.addr = f"{host}:{self._sock.getsockname()[1]}"
        self.received = 0
        self.rejected = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gmn-acks", daemon=True)

    def record(self) -> dict[str, str]:
        """What senders need (``gmn/acks/<node>``): the address and the key."""
        return {"addr": self.addr, "key": self.key.hex()}

    def start(self) -> AckReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self._thread.ident is not None:
            self._thread.join(2)

    def _run(self) -> None:
        warned = False
        while not self._stop.is_set():
            try:
                data, src = self._sock.recvfrom(MAX_DATAGRAM + 1)
            except OSError:
                return  # closed
            if not data:
                continue
            ack = decode(self.key, data)
            if ack is None:
                self.rejected += 1
                if not warned:  # once: a sender with an old key, or something else on the port
                    log.warning("acknowledgement channel %s: dropped a datagram from %s:%d that is not an "
                                "acknowledgement made with this GMN's key", self.addr, *src[:2])
                    warned = True
                continue
            self.received += 1
            kind, node = ack.pop("kind"), ack.pop("node")
            try:
                self._on_ack(kind, node, ack)
            except Exception:  # a bug must not stop the channel: etcd still carries the acks
                log.exception("acknowledgement channel: handling an acknowledgement of %s/%s failed", kind, node)


def _parse_addr(addr: Any) -> tuple[str, int] | None:
    if not isinstance(addr, str) or ":" not in addr:
        return None
    host, _, port = addr.rpartition(":")
    try:
        socket.inet_aton(host)
        p = int(port)
    except (OSError, ValueError):
        return None
    return (host, p) if 0 < p < 65536 else None


class AckSender:
    """A GPN's or GIN/GEN's end: follows ``gmn/acks/`` in etcd (a watch of its own) and
    sends each acknowledgement to every GMN there. Never blocks and never raises: the
    etcd acknowledgement, written next to it, is the one of record."""

    def __init__(self, kind: str, node: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown acknowledgement kind {kind!r}")
        self.kind = kind
        self.node = node
        self.view = PrefixView()
        self._watch: Any = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._cache: tuple[int, list[tuple[tuple[str, int], bytes]]] = (-1, [])
        self.sent = 0
        self.failed = 0

    def watch(self, etcd: Any, resync_interval: float | None = None) -> AckSender:
        self._watch = etcd.snapshot_and_watch(ACKS_PREFIX, self.view, resync_interval=resync_interval,
                                              name=f"{self.kind}-acks")
        return self

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._sock.close()

    def _targets(self) -> list[tuple[tuple[str, int], bytes]]:
        rev = self.view.revision
        if self._cache[0] == rev:
            return self._cache[1]
        out = []
        for kv in self.view.items(ACKS_PREFIX):
            try:
                rec = json.loads(kv.value)
                addr, key = _parse_addr(rec.get("addr")), bytes.fromhex(rec.get("key", ""))
            except (ValueError, TypeError, AttributeError):
                addr, key = None, b""
            if addr is None or len(key) < 16:
                log.warning("acknowledgement channel: %s is not a usable GMN record; skipped",
                            kv.key[len(ACKS_PREFIX):])
                continue
            out.append((addr, key))
        self._cache = (rev, out)
        return out

    def send(self, revision: int, sas_revision: int | None = None) -> int:
        """Tell every GMN; the number of datagrams sent."""
        n = 0
        for addr, key in self._targets():
            try:
                self._sock.sendto(encode(key, self.kind, self.node, revision, sas_revision), addr)
                n += 1
            except OSError as exc:  # no route yet, a full buffer: the etcd acknowledgement follows
                self.failed += 1
                log.debug("acknowledgement to %s:%d not sent: %s", *addr, exc)
        self.sent += n
        return n
