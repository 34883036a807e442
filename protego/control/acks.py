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

    b"PGA2" | HMAC-SHA256(sender's key, body)[:16] | body (JSON: kind, node, revision, sas_revision)

Each sender (a GPN or GIN/GEN agent) draws a fresh 32-byte key when it starts and
publishes it under ``acks/keys/<kind>/<node>`` (a GPN under its lease), the key only
that node writes and only the GMNs read; each GMN agent publishes where it listens
under ``gmn/acks/<node>`` (leased). A GMN checks a datagram with the key of the node it
names: a node can acknowledge for itself only, and a datagram made with any other key
is dropped (and counted). Keys live in etcd and the agents' memory, never in logs. The
GMN takes no revision beyond the newest it knows (its view of etcd, its own
transactions): acknowledgements are etcd revisions, a revision only ever says
"everything up to here is applied", the GMN keeps the highest per node, so a replayed
or stale datagram is harmless and one from the future cannot satisfy a wait for a
transaction that does not exist yet. A lost datagram costs nothing but time: the etcd
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

__all__ = ["ACKS_PREFIX", "DEFAULT_PORT", "KEYS_PREFIX", "MAGIC", "AckReceiver", "AckSender", "decode", "encode",
           "sender_key", "sender_key_path"]

log = logging.getLogger(__name__)

ACKS_PREFIX = f"{PREFIX}gmn/acks/"
KEYS_PREFIX = f"{PREFIX}acks/keys/"  # acks/keys/<kind>/<node>: {"key": hex}, the sender's
DEFAULT_PORT = 7472
MAGIC = b"PGA2"
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


def sender_key_path(kind: str, node: str) -> str:
    return f"{KEYS_PREFIX}{kind}/{node}"


def sender_key(record: Any) -> bytes | None:
    """The key in an ``acks/keys/`` record (None: not a usable one)."""
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        return None
    try:
        key = bytes.fromhex(record["key"])
    except ValueError:
        return None
    return key if len(key) >= 16 else None


KeySource = Callable[[str, str], "bytes | None"]


def decode(keys: bytes | KeySource, data: bytes) -> dict[str, Any] | None:
    """The acknowledgement in ``data``; None if it is not one, or not made with the key of
    the node it names (``keys(kind, node)``; or one ``key`` for every node)."""
    if len(data) > MAX_DATAGRAM or len(data) <= len(MAGIC) + TAG_LEN or not data.startswith(MAGIC):
        return None
    tag, raw = data[len(MAGIC):len(MAGIC) + TAG_LEN], data[len(MAGIC) + TAG_LEN:]
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("kind") not in KINDS or not isinstance(body.get("node"), str) \
            or not body["node"] or "/" in body["node"]:
        return None
    key = keys if isinstance(keys, bytes) else keys(body["kind"], body["node"])
    if key is None or not hmac.compare_digest(tag, _tag(key, raw)):
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
    authentic acknowledgement to ``on_ack(kind, node, fields)``; ``keys(kind, node)``
    gives the key of each sender (from ``acks/keys/``)."""

    def __init__(self, host: str, port: int, on_ack: Callable[[str, str, dict[str, int]], None],
                 keys: KeySource) -> None:
        self._keys = keys
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
        """What senders need (``gmn/acks/<node>``): the address."""
        return {"addr": self.addr}

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
            ack = decode(self._keys, data)
            if ack is None:
                self.rejected += 1
                if not warned:  # once: a sender with an old key, or something else on the port
                    log.warning("acknowledgement channel %s: dropped a datagram from %s:%d that is not an "
                                "acknowledgement made with the key of the node it names", self.addr, *src[:2])
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
        self.key = os.urandom(32)  # published at acks/keys/<kind>/<node> (key_record)
        self.view = PrefixView()
        self._watch: Any = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._cache: tuple[int, list[tuple[str, int]]] = (-1, [])
        self.sent = 0
        self.failed = 0

    def watch(self, etcd: Any, resync_interval: float | None = None) -> AckSender:
        self._watch = etcd.snapshot_and_watch(ACKS_PREFIX, self.view, resync_interval=resync_interval,
                                              name=f"{self.kind}-acks")
        return self

    @property
    def key_path(self) -> str:
        return sender_key_path(self.kind, self.node)

    def key_record(self) -> dict[str, str]:
        """What the GMNs need to check this sender's datagrams (``acks/keys/<kind>/<node>``)."""
        return {"key": self.key.hex()}

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._sock.close()

    def _targets(self) -> list[tuple[str, int]]:
        rev = self.view.revision
        if self._cache[0] == rev:
            return self._cache[1]
        out = []
        for kv in self.view.items(ACKS_PREFIX):
            try:
                addr = _parse_addr(json.loads(kv.value).get("addr"))
            except (ValueError, TypeError, AttributeError):
                addr = None
            if addr is None:
                log.warning("acknowledgement channel: %s is not a usable GMN record; skipped",
                            kv.key[len(ACKS_PREFIX):])
                continue
            out.append(addr)
        self._cache = (rev, out)
        return out

    def send(self, revision: int, sas_revision: int | None = None) -> int:
        """Tell every GMN; the number of datagrams sent."""
        n = 0
        data = encode(self.key, self.kind, self.node, revision, sas_revision)
        for addr in self._targets():
            try:
                self._sock.sendto(data, addr)
                n += 1
            except OSError as exc:  # no route yet, a full buffer: the etcd acknowledgement follows
                self.failed += 1
                log.debug("acknowledgement to %s:%d not sent: %s", *addr, exc)
        self.sent += n
        return n
