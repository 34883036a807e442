"""Protego's etcd v3 adapter over the maintained sync client ``etcd-sdk-python``.

``pyetcd`` (the import name of ``etcd-sdk-python``) gives us gRPC channels (TLS,
options), authentication and the generated ``etcdrpc`` stubs and messages; this
module adds what agents need and the client lacks:

* endpoint failover: several endpoints, the next one is tried on UNAVAILABLE /
  DEADLINE_EXCEEDED; a failed endpoint is skipped for ``endpoint_backoff`` seconds
  (2 s, instead of pyetcd's 300 s, which we disable);
* bounded retries with backoff (tenacity); a CAS that loses is a result
  (``False``), never an error to retry;
* typed results (:class:`KV`, :class:`Event`, :class:`TxnResult`), bytes in/out;
* leases whose keep-alive runs in a background thread and that report loss;
* watches that resume from the last seen revision + 1 after a broken stream
  and call ``on_resync`` when that revision was compacted;
* :meth:`Etcd.snapshot_and_watch`, the networking-calico ``EtcdWatcher`` pattern:
  snapshot a prefix at revision N, deliver it, watch from N+1, re-snapshot on error.

Errors are mapped to :mod:`protego.errors`: :class:`PeerError` when etcd stays
unavailable after the retries, :class:`ConflictError` for lost races in the
raising helpers (:meth:`Etcd.create`, :meth:`Etcd.update`), :class:`ConfigError`
for invalid requests. Values can hold key material: they are never logged nor put
in messages or reprs; keys (paths) are.

There is no module-level client: build one :class:`Etcd` in ``main()`` and pass it.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as pyetcd_exc
from pyetcd import transactions as pyetcd_txn
from pyetcd.etcdrpc import kv_pb2
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from protego.errors import ConfigError, ConflictError, PeerError, ProtegoError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PORT = 2379

#: gRPC channel options: reconnect quickly after an etcd restart (the default
#: reconnect backoff grows to 120 s) and detect dead peers on idle watch streams.
GRPC_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # gRPC uses this one as the minimum *connect timeout*: keep it generous
    ("grpc.min_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 10_000),  # etcd's --grpc-keepalive-min-time is 5 s
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)

_WATCH_MAX_BACKOFF = 2.0


# =========================================================================== #
# Pure helpers
# =========================================================================== #


def parse_endpoint(endpoint: str) -> tuple[str, int, bool | None]:
    """``"host:port"``, ``"[v6]:port"``, ``"http(s)://host:port"`` or ``"host"``
    → ``(host, port, tls)``; ``tls`` is ``None`` when no scheme was given."""
    ep = endpoint.strip()
    tls: bool | None = None
    if "://" in ep:
        scheme, ep = ep.split("://", 1)
        if scheme not in ("http", "https"):
            raise ConfigError(f"etcd endpoint {endpoint!r}: scheme must be http or https")
        tls = scheme == "https"
    ep = ep.rstrip("/")
    if not ep:
        raise ConfigError(f"etcd endpoint {endpoint!r}: empty host")
    if ep.startswith("["):
        host, sep, rest = ep[1:].partition("]")
        if not sep:
            raise ConfigError(f"etcd endpoint {endpoint!r}: unbalanced '['")
        port_s = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ConfigError(f"etcd endpoint {endpoint!r}: junk after ']'")
    elif ep.count(":") == 1:
        host, port_s = ep.split(":")
    elif ":" in ep:
        raise ConfigError(f"etcd endpoint {endpoint!r}: put IPv6 addresses in brackets")
    else:
        host, port_s = ep, ""
    try:
        port = int(port_s) if port_s else DEFAULT_PORT
    except ValueError:
        raise ConfigError(f"etcd endpoint {endpoint!r}: bad port") from None
    if not host or not 0 < port < 65536:
        raise ConfigError(f"etcd endpoint {endpoint!r}: bad host or port")
    return host, port, tls


def to_bytes(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode()


def prefix_range_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes ``[prefix, range_end)`` all keys under *prefix*.

    An empty prefix, or one of only 0xff bytes, means "to the end": ``b"\\0"``.
    """
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"


def prefix_range(prefix: str | bytes) -> tuple[bytes, bytes]:
    """``(key, range_end)`` covering every key under *prefix* (all keys for "")."""
    p = to_bytes(prefix)
    return (p or b"\0"), prefix_range_end(p)


def encode_json(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, no spaces) as UTF-8 bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class KV:
    """One key-value as stored in etcd. The value is kept out of ``repr``."""

    key: str
    value: bytes = field(repr=False)
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    @classmethod
    def from_pb(cls, kv: Any) -> KV:
        return cls(
            key=kv.key.decode(errors="surrogateescape"),
            value=bytes(kv.value),
            create_revision=int(kv.create_revision),
            mod_revision=int(kv.mod_revision),
            version=int(kv.version),
            lease=int(kv.lease),
        )

    def json(self) -> Any:
        try:
            return json.loads(self.value)
        except ValueError:
            raise ConfigError(f"etcd key {self.key}: value is not JSON") from None


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class Event:
    """One watch event. For DELETE, ``kv.value`` is empty and ``kv.mod_revision``
    is the revision of the delete."""

    type: EventType
    kv: KV

    @property
    def key(self) -> str:
        return self.kv.key

    @property
    def revision(self) -> int:
        return self.kv.mod_revision

    @classmethod
    def from_pb(cls, ev: Any) -> Event:
        kind = EventType.DELETE if ev.type == kv_pb2.Event.DELETE else EventType.PUT
        return cls(kind, KV.from_pb(ev.kv))


@dataclass(frozen=True)
class Resync:
    """Why a watch stopped and the caller must re-snapshot."""

    reason: str
    compact_revision: int = 0


# -- transactions ----------------------------------------------------------- #

_CMP_RESULT = {
    "==": etcdrpc.Compare.EQUAL,
    "!=": etcdrpc.Compare.NOT_EQUAL,
    "<": etcdrpc.Compare.LESS,
    ">": etcdrpc.Compare.GREATER,
}
_CMP_TARGET = {
    "value": (etcdrpc.Compare.VALUE, "value"),
    "version": (etcdrpc.Compare.VERSION, "version"),
    "create": (etcdrpc.Compare.CREATE, "create_revision"),
    "mod": (etcdrpc.Compare.MOD, "mod_revision"),
    "lease": (etcdrpc.Compare.LEASE, "lease"),
}


@dataclass(frozen=True)
class Compare:
    """One txn comparison: ``target(key) op value``; build with the helpers below."""

    key: str
    target: str  # value | version | create | mod | lease
    op: str  # == != < >
    value: int | bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.target not in _CMP_TARGET:
            raise ConfigError(f"compare on {self.key}: unknown target {self.target!r}")
        if self.op not in _CMP_RESULT:
            raise ConfigError(f"compare on {self.key}: unknown operator {self.op!r}")
        if (self.target == "value") != isinstance(self.value, bytes):
            raise ConfigError(f"compare on {self.key}: {self.target} needs "
                              f"{'bytes' if self.target == 'value' else 'an int'}")

    def to_pb(self) -> Any:
        target, attr = _CMP_TARGET[self.target]
        msg = etcdrpc.Compare(result=_CMP_RESULT[self.op], target=target, key=to_bytes(self.key))
        setattr(msg, attr, self.value)
        return msg


def mod_revision_is(key: str, revision: int, op: str = "==") -> Compare:
    return Compare(key, "mod", op, int(revision))


def create_revision_is(key: str, revision: int, op: str = "==") -> Compare:
    return Compare(key, "create", op, int(revision))


def version_is(key: str, version: int, op: str = "==") -> Compare:
    return Compare(key, "version", op, int(version))


def value_is(key: str, value: bytes, op: str = "==") -> Compare:
    return Compare(key, "value", op, bytes(value))


def lease_is(key: str, lease_id: int, op: str = "==") -> Compare:
    return Compare(key, "lease", op, int(lease_id))


def key_absent(key: str) -> Compare:
    """True when *key* does not exist (etcd treats a missing key's revisions as 0)."""
    return Compare(key, "create", "==", 0)


def key_present(key: str) -> Compare:
    return Compare(key, "create", ">", 0)


@dataclass(frozen=True)
class PutOp:
    key: str
    value: bytes = field(repr=False)
    lease: int = 0

    def to_pb(self) -> Any:
        return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(
            key=to_bytes(self.key), value=bytes(self.value), lease=int(self.lease)))


@dataclass(frozen=True)
class DeleteOp:
    key: str
    prefix: bool = False

    def to_pb(self) -> Any:
        k = to_bytes(self.key)
        req = etcdrpc.DeleteRangeRequest(key=k)
        if self.prefix:
            req.range_end = prefix_range_end(k)
        return etcdrpc.RequestOp(request_delete_range=req)


@dataclass(frozen=True)
class GetOp:
    key: str
    prefix: bool = False

    def to_pb(self) -> Any:
        k = to_bytes(self.key)
        req = etcdrpc.RangeRequest(key=k)
        if self.prefix:
            req.range_end = prefix_range_end(k)
        return etcdrpc.RequestOp(request_range=req)


CompareLike = Any  # Compare | pyetcd.transactions.BaseCompare | etcdrpc.Compare
OpLike = Any  # PutOp | DeleteOp | GetOp | pyetcd.transactions.Put/Get/Delete | etcdrpc.RequestOp


def compare_to_pb(c: CompareLike) -> Any:
    """Our :class:`Compare`, a pyetcd compare (``etcd.transactions.mod(k) == 3``)
    or a raw ``etcdrpc.Compare``."""
    if isinstance(c, Compare):
        return c.to_pb()
    if isinstance(c, pyetcd_txn.BaseCompare):
        return c.build_message()
    if isinstance(c, etcdrpc.Compare):
        return c
    raise ConfigError(f"not a txn compare: {type(c).__name__}")


def op_to_pb(op: OpLike) -> Any:
    """Our ops, pyetcd's ``transactions.Put/Get/Delete`` or a raw ``etcdrpc.RequestOp``."""
    if isinstance(op, (PutOp, DeleteOp, GetOp)):
        return op.to_pb()
    if isinstance(op, etcdrpc.RequestOp):
        return op
    if isinstance(op, pyetcd_txn.Put):
        return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(
            key=to_bytes(op.key), value=to_bytes(op.value), lease=_lease_id(op.lease),
            prev_kv=bool(op.prev_kv)))
    if isinstance(op, pyetcd_txn.Get):
        req = etcdrpc.RangeRequest(key=to_bytes(op.key))
        if op.range_end is not None:
            req.range_end = to_bytes(op.range_end)
        return etcdrpc.RequestOp(request_range=req)
    if isinstance(op, pyetcd_txn.Delete):
        req = etcdrpc.DeleteRangeRequest(key=to_bytes(op.key), prev_kv=bool(op.prev_kv))
        if op.range_end is not None:
            req.range_end = to_bytes(op.range_end)
        return etcdrpc.RequestOp(request_delete_range=req)
    raise ConfigError(f"not a txn operation: {type(op).__name__}")


def _lease_id(lease: Lease | int | None) -> int:
    if lease is None:
        return 0
    return int(lease.id) if hasattr(lease, "id") else int(lease)


@dataclass(frozen=True)
class TxnResult:
    """Outcome of :meth:`Etcd.txn`. ``responses`` holds, per executed op: ``list[KV]``
    for a get, ``None`` for a put, the deleted count for a delete, a nested
    :class:`TxnResult` for a nested txn."""

    succeeded: bool
    revision: int
    responses: list[Any] = field(default_factory=list, repr=False)

    @classmethod
    def from_pb(cls, resp: Any, revision: int | None = None) -> TxnResult:
        out: list[Any] = []
        for r in resp.responses:
            kind = r.WhichOneof("response")
            if kind == "response_range":
                out.append([KV.from_pb(kv) for kv in r.response_range.kvs])
            elif kind == "response_put":
                out.append(None)
            elif kind == "response_delete_range":
                out.append(int(r.response_delete_range.deleted))
            elif kind == "response_txn":
                out.append(cls.from_pb(r.response_txn, revision or resp.header.revision))
        return cls(bool(resp.succeeded), int(revision or resp.header.revision), out)


# -- error classification --------------------------------------------------- #


class ErrorKind(enum.Enum):
    TRANSIENT = "transient"  # endpoint/leader trouble: fail over, retry
    REAUTH = "reauth"  # auth token expired: rebuild the connection, retry
    COMPACTED = "compacted"
    INVALID = "invalid"
    FATAL = "fatal"


_TRANSIENT_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # etcdserver: too many requests
}


def etcd_from_env(endpoints: Sequence[str], env: Mapping[str, str] | None = None, **kwargs: Any) -> Etcd:
    """A client for ``endpoints`` with the credentials of the environment, as the Ansible
    roles install them (``/etc/protego/etcd-client.env``): ``PROTEGO_ETCD_USER`` and
    ``PROTEGO_ETCD_PASSWORD``, ``PROTEGO_ETCD_CACERT``, ``PROTEGO_ETCD_KEY`` and
    ``PROTEGO_ETCD_CERT``. Every command and agent makes its client here."""
    env = os.environ if env is None else env
    return Etcd(list(endpoints), user=env.get("PROTEGO_ETCD_USER") or None,
                password=env.get("PROTEGO_ETCD_PASSWORD") or None, ca_cert=env.get("PROTEGO_ETCD_CACERT") or None,
                cert_key=env.get("PROTEGO_ETCD_KEY") or None, cert_cert=env.get("PROTEGO_ETCD_CERT") or None,
                **kwargs)


class EtcdPermissionError(ConfigError):
    """etcd refused the request to this user (authentication on, the role lacks the key)."""


class RevisionCompactedError(PeerError):
    """The requested revision was compacted; re-snapshot."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


def grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        try:
            code: grpc.StatusCode = exc.code()
            return code
        except Exception:  # pragma: no cover - defensive
            return None
    return None


def grpc_details(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
        try:
            return str(exc.details() or "")
        except Exception:  # pragma: no cover
            return ""
    return ""


def error_name(exc: BaseException | None) -> str:
    """Short name of an error for logs: the gRPC code or the exception type."""
    if exc is None:
        return "-"
    code = grpc_code(exc)
    return code.name if code is not None else type(exc).__name__


def classify(exc: BaseException) -> ErrorKind:
    """How the adapter treats an exception raised by a gRPC/pyetcd call."""
    if isinstance(exc, (pyetcd_exc.ConnectionFailedError, pyetcd_exc.ConnectionTimeoutError,
                        pyetcd_exc.NoServerAvailableError, pyetcd_exc.WatchTimedOut)):
        return ErrorKind.TRANSIENT
    if isinstance(exc, pyetcd_exc.RevisionCompactedError):
        return ErrorKind.COMPACTED
    code = grpc_code(exc)
    if code is None:
        return ErrorKind.FATAL
    if code in _TRANSIENT_CODES:
        return ErrorKind.TRANSIENT
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ErrorKind.REAUTH
    if code == grpc.StatusCode.OUT_OF_RANGE or "compacted" in grpc_details(exc):
        return ErrorKind.COMPACTED
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ErrorKind.INVALID
    return ErrorKind.FATAL


def map_error(exc: BaseException, what: str, key: str, endpoints: Sequence[str]) -> ProtegoError:
    """Turn a gRPC/pyetcd exception into a Protego error (message without values)."""
    if isinstance(exc, ProtegoError):
        return exc
    kind = classify(exc)
    code = grpc_code(exc)
    detail = grpc_details(exc) or type(exc).__name__
    where = f"etcd {what} {key}".rstrip()
    if kind in (ErrorKind.TRANSIENT, ErrorKind.REAUTH):
        return PeerError(f"{where}: etcd unavailable at {','.join(endpoints)} "
                         f"after retries ({code.name if code else type(exc).__name__}: {detail})")
    if kind is ErrorKind.COMPACTED:
        rev = int(getattr(exc, "compacted_revision", 0) or 0)
        return RevisionCompactedError(f"{where}: revision compacted ({detail})", rev)
    if kind is ErrorKind.INVALID and "user name is empty" in detail:
        return EtcdPermissionError(f"{where}: {detail}: etcd has authentication on and this client has no "
                                   f"user (PROTEGO_ETCD_USER and PROTEGO_ETCD_PASSWORD)")
    if kind is ErrorKind.INVALID:
        return ConfigError(f"{where}: rejected by etcd ({detail})")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return EtcdPermissionError(f"{where}: permission denied: this node's etcd user may not do that "
                                   f"(protego/store/roles.py says what each role may touch)")
    return PeerError(f"{where}: {code.name if code else type(exc).__name__}: {detail}")


# =========================================================================== #
# Connections
# =========================================================================== #


class _Conn:
    """One endpoint: a lazily built pyetcd client (channel + auth) and our stubs."""

    def __init__(self, host: str, port: int, *, credentials: Any,
                 options: Sequence[tuple[str, Any]],
                 timeout: float, user: str | None, password: str | None) -> None:
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._host, self._port = host, port
        self._credentials = credentials
        self._options = list(options)
        self._timeout = timeout
        self._user, self._password = user, password
        self._lock = threading.Lock()
        self._client: Any = None
        self._channel: Any = None
        self._stubs: dict[str, Any] = {}

    def _ensure(self) -> Any:
        with self._lock:
            if self._client is None:
                # time_retry=0: never let pyetcd bench the endpoint (its default is
                # 300 s); failover and backoff are ours.
                ep = pyetcd.Endpoint(self._host, self._port, secure=self._credentials is not None,
                                     creds=self._credentials, time_retry=0.0, opts=self._options)
                try:
                    client = pyetcd.MultiEndpointEtcd3Client(
                        endpoints=[ep], timeout=self._timeout, user=self._user,
                        password=self._password, failover=False)
                except BaseException:
                    ep.close()
                    raise
                channel = ep.channel
                self._stubs = {
                    "kv": etcdrpc.KVStub(channel),
                    "lease": etcdrpc.LeaseStub(channel),
                    "watch": etcdrpc.WatchStub(channel),
                    "maintenance": etcdrpc.MaintenanceStub(channel),
                    "auth": etcdrpc.AuthStub(channel),
                }
                self._client, self._channel = client, channel
            return self._client

    def stub(self, name: str) -> Any:
        self._ensure()
        return self._stubs[name]

    def metadata(self, *, watch: bool = False) -> tuple[tuple[str, str], ...] | None:
        client = self._ensure()
        md = tuple(client.metadata or ())
        if watch:
            # etcd cancels the stream when this member loses its leader (clientv3's
            # WithRequireLeader), so a partitioned member cannot stall a watch.
            md += (("hasleader", "true"),)
        return md or None

    def reauth(self) -> None:
        """Fetch a fresh auth token over the same channel: streams opened with the
        old token (watches) keep running."""
        if self._user is None:
            return
        with self._lock:
            client, channel = self._client, self._channel
        if client is None:
            return
        try:
            resp = etcdrpc.AuthStub(channel).Authenticate(
                etcdrpc.AuthenticateRequest(name=self._user, password=self._password),
                self._timeout)
        except grpc.RpcError as exc:
            log.info("etcd %s: re-authentication failed (%s)", self.label, error_name(exc))
            return
        with self._lock:
            if self._client is client:
                client.metadata = (("token", resp.token),)
        log.info("etcd %s: re-authenticated", self.label)

    def reset(self) -> None:
        with self._lock:
            client, self._client, self._channel, self._stubs = self._client, None, None, {}
        if client is not None:
            try:
                client.close()
            except Exception:  # pragma: no cover - closing a dead channel
                log.debug("closing etcd connection %s failed", self.label, exc_info=True)

    close = reset


# =========================================================================== #
# The adapter
# =========================================================================== #


class Etcd:
    """Thread-safe etcd v3 client with failover, retries, leases and resumable watches.

    ``endpoints``: ``["127.0.0.1:2379", "https://10.0.0.2:2379", ...]``.
    ``timeout`` bounds each RPC; ``attempts``/``retry_deadline`` bound the retries of
    one operation; a failing endpoint is skipped for ``endpoint_backoff`` seconds.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        user: str | None = None,
        password: str | None = None,
        ca_cert: str | None = None,
        cert_key: str | None = None,
        cert_cert: str | None = None,
        attempts: int = 5,
        retry_deadline: float | None = None,
        endpoint_backoff: float = 2.0,
        grpc_options: Sequence[tuple[str, Any]] = GRPC_OPTIONS,
        _conn_factory: Callable[[str, int, bool], Any] | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ConfigError("etcd: at least one endpoint is needed")
        if (user is None) != (password is None):
            raise ConfigError("etcd: user and password go together")
        if (cert_key is None) != (cert_cert is None):
            raise ConfigError("etcd: cert_key and cert_cert go together")
        if attempts < 1 or timeout <= 0:
            raise ConfigError("etcd: attempts must be >= 1 and timeout > 0")
        parsed = [parse_endpoint(e) for e in endpoints]
        tls = ca_cert is not None or any(t for _, _, t in parsed)
        creds = None
        if tls and _conn_factory is None:
            try:
                if ca_cert:
                    creds = pyetcd.MultiEndpointEtcd3Client.get_secure_creds(
                        ca_cert, cert_key, cert_cert)
                else:
                    creds = grpc.ssl_channel_credentials()
            except OSError as exc:
                raise ConfigError(f"etcd: cannot read TLS files: {exc.strerror}") from None
        self.timeout = float(timeout)
        self.attempts = int(attempts)
        self.retry_deadline = float(retry_deadline if retry_deadline is not None else 3 * timeout)
        self.endpoint_backoff = float(endpoint_backoff)
        if _conn_factory is not None:
            self._conns: list[Any] = [_conn_factory(h, p, tls) for h, p, _ in parsed]
        else:
            self._conns = [_Conn(h, p, credentials=creds, options=grpc_options, timeout=timeout,
                                 user=user, password=password) for h, p, _ in parsed]
        self._lock = threading.Lock()
        self._current = 0
        self._benched_until = [0.0] * len(self._conns)
        self._closed = False
        self._watches: list[Watch | SnapshotWatch] = []
        self._leases: list[Lease] = []

    # -- endpoints ---------------------------------------------------------- #
    @property
    def endpoints(self) -> list[str]:
        return [c.label for c in self._conns]

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def current_endpoint(self) -> str:
        with self._lock:
            return str(self._conns[self._current].label)

    def _pick(self) -> tuple[int, Any]:
        with self._lock:
            if self._closed:
                raise PeerError("etcd client is closed")
            now = time.monotonic()
            n = len(self._conns)
            for step in range(n):
                i = (self._current + step) % n
                if self._benched_until[i] <= now:
                    self._current = i
                    return i, self._conns[i]
            # all benched: try the one that becomes usable first
            i = min(range(n), key=lambda j: self._benched_until[j])
            self._current = i
            return i, self._conns[i]

    def _mark_failed(self, i: int, exc: BaseException | None, *, reauth: bool = False) -> None:
        if reauth:  # not the endpoint's fault: new token, same endpoint
            self._conns[i].reauth()
            return
        with self._lock:
            self._benched_until[i] = time.monotonic() + self.endpoint_backoff
            if self._current == i and len(self._conns) > 1:
                self._current = (i + 1) % len(self._conns)
        label = self._conns[i].label
        log.info("etcd endpoint %s failed (%s); next: %s", label, error_name(exc),
                 self._conns[self._current].label)

    def _call(self, what: str, key: str, fn: Callable[[Any, float], T], *,
              attempts: int | None = None, deadline: float | None = None,
              timeout: float | None = None) -> T:
        """Run ``fn(conn, timeout)`` with failover and bounded retries."""
        rpc_timeout = timeout or self.timeout

        def once() -> T:
            i, conn = self._pick()
            try:
                return fn(conn, rpc_timeout)
            except Exception as exc:
                kind = classify(exc)
                if kind in (ErrorKind.TRANSIENT, ErrorKind.REAUTH):
                    self._mark_failed(i, exc, reauth=kind is ErrorKind.REAUTH)
                raise

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.debug("etcd %s %s: attempt %d failed (%s), retrying", what, key,
                      state.attempt_number, type(exc).__name__)

        retrying = Retrying(
            stop=stop_after_attempt(attempts or self.attempts)
            | stop_after_delay(deadline if deadline is not None else self.retry_deadline),
            wait=wait_exponential(multiplier=0.05, max=1.0) + wait_random(0, 0.05),
            retry=retry_if_exception(
                lambda e: classify(e) in (ErrorKind.TRANSIENT, ErrorKind.REAUTH)),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(once)
        except ProtegoError:
            raise
        except Exception as exc:
            err = map_error(exc, what, key, self.endpoints)
            log.warning("%s", err)
            raise err from exc

    # -- authentication (protego/store/roles.py) -------------------------- #
    def auth(self, method: str, request: Any) -> Any:
        """One call of etcd's Auth API (``RoleAdd``, ``UserAdd``, ``AuthEnable``...):
        its response. Requests carry passwords: never logged."""
        def fn(conn: Any, timeout: float) -> Any:
            return getattr(conn.stub("auth"), method)(request, timeout, metadata=conn.metadata())

        return self._call(f"auth {method}", "", fn)

    # -- reads -------------------------------------------------------------- #
    def get(self, key: str) -> KV | None:
        k = to_bytes(key)

        def fn(conn: Any, timeout: float) -> KV | None:
            resp = conn.stub("kv").Range(etcdrpc.RangeRequest(key=k), timeout,
                                         metadata=conn.metadata())
            return KV.from_pb(resp.kvs[0]) if resp.kvs else None

        return self._call("get", key, fn)

    def get_prefix(self, prefix: str, *, page_size: int = 1000) -> tuple[int, list[KV]]:
        """All keys under *prefix* as one consistent snapshot: ``(revision, kvs)``,
        sorted by key. Large prefixes are paged, every page read at that revision."""
        start0, end = prefix_range(prefix)

        def fn(conn: Any, timeout: float) -> tuple[int, list[KV]]:
            for _ in range(3):  # a compaction between pages restarts the snapshot
                rev, start = 0, start0
                out: list[KV] = []
                try:
                    while True:
                        req = etcdrpc.RangeRequest(key=start, range_end=end, limit=page_size,
                                                   revision=rev)
                        resp = conn.stub("kv").Range(req, timeout, metadata=conn.metadata())
                        if rev == 0:
                            rev = int(resp.header.revision)
                        out.extend(KV.from_pb(kv) for kv in resp.kvs)
                        if not resp.more or not resp.kvs:
                            return rev, out
                        start = bytes(resp.kvs[-1].key) + b"\0"
                except grpc.RpcError as exc:
                    if classify(exc) is not ErrorKind.COMPACTED or rev == 0:
                        raise
                    log.info("etcd get_prefix %s: compacted while paging, restarting", prefix)
            raise PeerError(f"etcd get_prefix {prefix}: compacted repeatedly while paging")

        return self._call("get_prefix", prefix, fn)

    def get_json(self, key: str) -> Any | None:
        kv = self.get(key)
        return kv.json() if kv is not None else None

    def revision(self) -> int:
        """The store's current revision."""

        def fn(conn: Any, timeout: float) -> int:
            resp = conn.stub("kv").Range(
                etcdrpc.RangeRequest(key=b"\0", count_only=True, limit=1), timeout,
                metadata=conn.metadata())
            return int(resp.header.revision)

        return self._call("revision", "", fn)

    # -- writes ------------------------------------------------------------- #
    def put(self, key: str, value: bytes, lease: Lease | int | None = None) -> int:
        """Store *value* (bytes) at *key*; returns the revision of the write."""
        req = etcdrpc.PutRequest(key=to_bytes(key), value=_value_bytes(key, value),
                                 lease=_lease_id(lease))

        def fn(conn: Any, timeout: float) -> int:
            return int(conn.stub("kv").Put(req, timeout, metadata=conn.metadata()).header.revision)

        return self._call("put", key, fn)

    def put_json(self, key: str, obj: Any, lease: Lease | int | None = None) -> int:
        return self.put(key, encode_json(obj), lease)

    def delete(self, key: str) -> bool:
        """Delete *key*; True when it existed."""
        req = etcdrpc.DeleteRangeRequest(key=to_bytes(key))

        def fn(conn: Any, timeout: float) -> bool:
            resp = conn.stub("kv").DeleteRange(req, timeout, metadata=conn.metadata())
            return int(resp.deleted) > 0

        return self._call("delete", key, fn)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under *prefix*; returns how many."""
        p = to_bytes(prefix)
        if not p:
            raise ConfigError("etcd delete_prefix: refusing the empty prefix")
        req = etcdrpc.DeleteRangeRequest(key=p, range_end=prefix_range_end(p))

        def fn(conn: Any, timeout: float) -> int:
            return int(conn.stub("kv").DeleteRange(req, timeout, metadata=conn.metadata()).deleted)

        return self._call("delete_prefix", prefix, fn)

    def txn(self, compares: Iterable[CompareLike], success: Iterable[OpLike] = (),
            failure: Iterable[OpLike] = ()) -> TxnResult:
        """One etcd transaction. Accepts our :class:`Compare`/ops helpers, pyetcd's
        ``transactions`` objects or raw ``etcdrpc`` messages.

        Retried on transient errors like any write; if an attempt timed out after
        etcd applied it, the retry sees its own effect and may report ``succeeded``
        False (use :meth:`cas`, which resolves that case, for single-key writes).
        """
        req = etcdrpc.TxnRequest(compare=[compare_to_pb(c) for c in compares],
                                 success=[op_to_pb(o) for o in success],
                                 failure=[op_to_pb(o) for o in failure])
        keys = ",".join(sorted({c.key.decode(errors="replace") for c in req.compare}))

        def fn(conn: Any, timeout: float) -> TxnResult:
            return TxnResult.from_pb(conn.stub("kv").Txn(req, timeout, metadata=conn.metadata()))

        return self._call("txn", keys, fn)

    def _cas_txn(self, what: str, key: str, cmp: Compare, op: OpLike,
                 resolve: Callable[[KV | None], bool]) -> tuple[bool, int]:
        req = etcdrpc.TxnRequest(compare=[cmp.to_pb()], success=[op_to_pb(op)], failure=[])
        tries = 0

        def fn(conn: Any, timeout: float) -> tuple[bool, int]:
            nonlocal tries
            tries += 1
            resp = conn.stub("kv").Txn(req, timeout, metadata=conn.metadata())
            return bool(resp.succeeded), int(resp.header.revision)

        ok, rev = self._call(what, key, fn)
        if not ok and tries > 1:
            # An earlier attempt failed in flight; it may have been applied. Decide
            # from what is stored now (a concurrent identical write is
            # indistinguishable and counted as ours).
            kv = self.get(key)
            if resolve(kv):
                log.info("etcd %s %s: earlier attempt was applied", what, key)
                return True, kv.mod_revision if kv else rev
        return ok, rev

    def cas(self, key: str, value: bytes, mod_revision: int,
            lease: Lease | int | None = None) -> bool:
        """Put *value* only if *key*'s mod_revision is *mod_revision* (0: only if the key
        does not exist). Returns False when another writer won; never retries that."""
        return self.cas_rev(key, value, mod_revision, lease) is not None

    def cas_rev(self, key: str, value: bytes, mod_revision: int,
                lease: Lease | int | None = None) -> int | None:
        """Like :meth:`cas`, returning the new mod_revision, or None when it lost."""
        value = _value_bytes(key, value)
        cmp = key_absent(key) if mod_revision == 0 else mod_revision_is(key, mod_revision)
        ok, rev = self._cas_txn(
            "cas", key, cmp, PutOp(key, value, _lease_id(lease)),
            lambda kv: kv is not None and kv.value == value and kv.mod_revision > mod_revision)
        return rev if ok else None

    def cas_delete(self, key: str, mod_revision: int) -> bool:
        """Delete *key* only if its mod_revision is *mod_revision*."""
        ok, _ = self._cas_txn("cas_delete", key, mod_revision_is(key, mod_revision),
                              DeleteOp(key), lambda kv: kv is None)
        return ok

    def create(self, key: str, value: bytes, lease: Lease | int | None = None) -> int:
        """Create *key*; raise :class:`ConflictError` if it exists. Returns the revision."""
        rev = self.cas_rev(key, value, 0, lease)
        if rev is None:
            raise ConflictError(f"etcd key {key} already exists")
        return rev

    def update(self, key: str, value: bytes, mod_revision: int,
               lease: Lease | int | None = None) -> int:
        """CAS that raises :class:`ConflictError` when it loses. Returns the revision."""
        rev = self.cas_rev(key, value, mod_revision, lease)
        if rev is None:
            raise ConflictError(f"etcd key {key} changed since revision {mod_revision}")
        return rev

    def cas_json(self, key: str, obj: Any, mod_revision: int,
                 lease: Lease | int | None = None) -> bool:
        return self.cas(key, encode_json(obj), mod_revision, lease)

    def compact(self, revision: int, physical: bool = True) -> None:
        """Compact history up to *revision* (ops and tests)."""

        def fn(conn: Any, timeout: float) -> None:
            conn.stub("kv").Compact(etcdrpc.CompactionRequest(revision=revision, physical=physical),
                                    timeout, metadata=conn.metadata())

        self._call("compact", str(revision), fn)

    # -- leases ------------------------------------------------------------- #
    def lease(self, ttl: int, *, on_lost: Callable[[Lease], None] | None = None,
              keepalive: bool = True) -> Lease:
        """Grant a lease of *ttl* seconds and (by default) keep it alive in a thread."""
        if ttl < 1:
            raise ConfigError(f"etcd lease: ttl must be >= 1 s, got {ttl}")

        def fn(conn: Any, timeout: float) -> tuple[int, int]:
            resp = conn.stub("lease").LeaseGrant(etcdrpc.LeaseGrantRequest(TTL=int(ttl), ID=0),
                                                 timeout, metadata=conn.metadata())
            if resp.error:
                raise PeerError(f"etcd lease grant refused: {resp.error}")
            return int(resp.ID), int(resp.TTL)

        lease_id, granted = self._call("lease_grant", f"ttl={ttl}", fn)
        lease = Lease(self, lease_id, granted, on_lost=on_lost)
        with self._lock:
            self._leases = [x for x in self._leases if x.active] + [lease]
        if keepalive:
            lease.start()
        return lease

    def _lease_keepalive_once(self, lease_id: int, timeout: float, deadline: float) -> int:
        def fn(conn: Any, t: float) -> int:
            stream = conn.stub("lease").LeaseKeepAlive(
                iter([etcdrpc.LeaseKeepAliveRequest(ID=lease_id)]), t, metadata=conn.metadata())
            try:
                for resp in stream:
                    return int(resp.TTL)
            finally:
                stream.cancel()
            raise PeerError(f"etcd lease {lease_id:x}: keep-alive stream closed without answer")

        return self._call("lease_keepalive", f"{lease_id:x}", fn, attempts=max(2, len(self._conns)),
                          deadline=deadline, timeout=timeout)

    def _lease_revoke(self, lease_id: int, *, attempts: int | None = None,
                      deadline: float | None = None) -> None:
        def fn(conn: Any, timeout: float) -> None:
            try:
                conn.stub("lease").LeaseRevoke(etcdrpc.LeaseRevokeRequest(ID=lease_id), timeout,
                                               metadata=conn.metadata())
            except grpc.RpcError as exc:
                if grpc_code(exc) != grpc.StatusCode.NOT_FOUND:
                    raise

        self._call("lease_revoke", f"{lease_id:x}", fn, attempts=attempts, deadline=deadline)

    def _lease_ttl(self, lease_id: int) -> int:
        def fn(conn: Any, timeout: float) -> int:
            resp = conn.stub("lease").LeaseTimeToLive(etcdrpc.LeaseTimeToLiveRequest(ID=lease_id),
                                                      timeout, metadata=conn.metadata())
            return int(resp.TTL)

        return self._call("lease_ttl", f"{lease_id:x}", fn)

    # -- watches ------------------------------------------------------------ #
    def watch_prefix(
        self,
        prefix: str,
        start_revision: int | None,
        callback: Callable[[list[Event]], None],
        on_resync: Callable[[Resync], None] | None = None,
        *,
        max_outage: float | None = None,
        name: str | None = None,
    ) -> Watch:
        """Watch every key under *prefix* from *start_revision* (None: from now on).

        ``callback(events)`` runs in the watch's thread once per etcd response, in
        revision order, a revision never split. A broken stream (etcd restart,
        network error, member loss) is resumed from the last delivered revision + 1,
        on the next endpoint, with backoff; nothing is lost or repeated. When that
        revision has been compacted, when etcd cancels the watch, when ``callback``
        raises, or after ``max_outage`` seconds without a stream, the watch stops and
        ``on_resync(Resync)`` is called: the caller must re-snapshot.
        """
        if start_revision is None:
            start_revision = self.revision() + 1
        w = Watch(self, prefix, int(start_revision), callback, on_resync,
                  max_outage=max_outage, name=name)
        self._register(w)
        w.start()
        return w

    def snapshot_and_watch(
        self,
        prefix: str,
        handler: WatchHandler,
        *,
        resync_interval: float | None = None,
        resnapshot_on_error: bool = True,
        name: str | None = None,
    ) -> SnapshotWatch:
        """The calico ``EtcdWatcher`` loop in a thread: ``get_prefix`` at revision N →
        ``handler.on_snapshot(N, kvs)`` → watch from N+1 → ``handler.on_events(events)``;
        on any error (stream break unless ``resnapshot_on_error`` is False, compaction,
        handler exception, cancel) re-snapshot; also every ``resync_interval`` seconds."""
        sw = SnapshotWatch(self, prefix, handler, resync_interval=resync_interval,
                           resnapshot_on_error=resnapshot_on_error, name=name)
        self._register(sw)
        sw.start()
        return sw

    def _register(self, w: Watch | SnapshotWatch) -> None:
        with self._lock:
            if self._closed:
                raise PeerError("etcd client is closed")
            self._watches = [x for x in self._watches if x.alive] + [w]

    def _watch_loop(self, state: _WatchState, deliver: Callable[[list[Event]], None],
                    *, max_outage: float | None, stop_on_error: bool) -> Resync | None:
        """Run one logical watch in the calling thread until stop or resync-needed."""
        prefix, range_end = prefix_range(state.prefix)
        failures = 0
        outage_since: float | None = None
        while not state.stop.is_set():
            if state.resync_requested.is_set():
                state.resync_requested.clear()
                return Resync("requested")
            try:
                i, conn = self._pick()
            except PeerError:
                return None  # client closed
            requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
            requests.put(etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
                key=prefix, range_end=range_end, start_revision=state.next_revision,
                progress_notify=True)))
            err: BaseException | None = None
            call: Any = None
            try:
                call = conn.stub("watch").Watch(_drain(requests),
                                                metadata=conn.metadata(watch=True))
                with state.lock:
                    state.call = call
                if state.stop.is_set() or state.resync_requested.is_set():
                    call.cancel()
                for resp in call:
                    if resp.compact_revision:
                        log.info("etcd watch %s: revision %d compacted (at %d): resync",
                                 state.prefix, state.next_revision, resp.compact_revision)
                        return Resync("compacted", int(resp.compact_revision))
                    if resp.canceled:
                        log.warning("etcd watch %s canceled by etcd: %s", state.prefix,
                                    resp.cancel_reason)
                        return Resync(f"canceled: {resp.cancel_reason}")
                    if resp.created:
                        failures, outage_since = 0, None
                        state.created.set()
                        log.debug("etcd watch %s created on %s from revision %d",
                                  state.prefix, conn.label, state.next_revision)
                    if resp.events:
                        events = [Event.from_pb(e) for e in resp.events
                                  if e.kv.mod_revision >= state.next_revision]
                        if not events:
                            continue
                        try:
                            deliver(events)
                        except Exception as exc:
                            log.exception("etcd watch %s: handler failed: resync", state.prefix)
                            return Resync(f"handler failed: {type(exc).__name__}")
                        state.next_revision = events[-1].revision + 1
                    elif not resp.created and resp.header.revision >= state.next_revision:
                        # progress notification: everything up to header.revision is seen
                        state.next_revision = int(resp.header.revision) + 1
                err = PeerError("watch stream ended")
            except Exception as exc:  # gRPC, auth or pyetcd trouble: resume
                err = exc
            finally:
                requests.put(None)
                with state.lock:
                    state.call = None
                if call is not None:
                    call.cancel()  # no-op when already over; frees the stream on early return
            if state.stop.is_set():
                return None
            if state.resync_requested.is_set():
                state.resync_requested.clear()
                return Resync("requested")
            kind = classify(err) if err is not None else ErrorKind.TRANSIENT
            if isinstance(err, grpc.RpcError) and kind is ErrorKind.COMPACTED:
                return Resync("compacted")
            self._mark_failed(i, err, reauth=kind is ErrorKind.REAUTH)
            reason = error_name(err)
            if stop_on_error:
                log.info("etcd watch %s broken on %s (%s): resync", state.prefix, conn.label,
                         reason)
                return Resync(f"stream error: {reason}")
            now = time.monotonic()
            outage_since = outage_since or now
            if max_outage is not None and now - outage_since > max_outage:
                return Resync(f"etcd unavailable for {now - outage_since:.1f}s: {reason}")
            failures += 1
            delay = min(_WATCH_MAX_BACKOFF, 0.05 * 2 ** min(failures, 6)) * (0.5 + random.random())
            log.info("etcd watch %s broken on %s (%s); resuming from revision %d in %.2fs",
                     state.prefix, conn.label, reason, state.next_revision, delay)
            state.stop.wait(delay)
        return None

    # -- lifecycle ---------------------------------------------------------- #
    def close(self, *, revoke_leases: bool = True) -> None:
        """Cancel watches, stop (and by default revoke) leases, close channels."""
        with self._lock:
            if self._closed:
                return
            watches, leases = list(self._watches), list(self._leases)
        for w in watches:
            w.cancel()
        for lease in leases:
            revoke = revoke_leases and lease.active
            lease.close()
            if not revoke:
                continue
            try:  # best effort and quick: the lease expires by itself anyway
                self._lease_revoke(lease.id, attempts=len(self._conns), deadline=self.timeout)
            except ProtegoError as exc:
                log.warning("etcd lease %x not revoked on close: %s", lease.id, exc)
        with self._lock:
            self._closed = True
        for c in self._conns:
            c.close()

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Etcd({self.endpoints}, current={self.current_endpoint})"


def _value_bytes(key: str, value: Any) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        # A str here is almost always a bug (encoding unspecified); say which key.
        raise ConfigError(f"etcd key {key}: value must be bytes, not {type(value).__name__}")
    return bytes(value)


def _drain(q: queue.SimpleQueue[Any]) -> Iterator[Any]:
    while True:
        item = q.get()
        if item is None:
            return
        yield item


# =========================================================================== #
# Leases
# =========================================================================== #


class Lease:
    """A granted lease. ``start()`` keeps it alive every ttl/3 in a daemon thread
    until :meth:`revoke` or :meth:`close`. When keep-alive has failed for a full TTL,
    or etcd says the lease is gone, :attr:`lost` becomes True, ``lost_event`` is set
    and ``on_lost(lease)`` is called once (from the keep-alive thread)."""

    def __init__(self, etcd: Etcd, lease_id: int, ttl: int,
                 on_lost: Callable[[Lease], None] | None = None) -> None:
        self.id = lease_id
        self.ttl = ttl
        self._etcd = etcd
        self._on_lost = on_lost
        self._stop = threading.Event()
        self.lost_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_ok = time.monotonic()
        self._ended = False

    @property
    def lost(self) -> bool:
        return self.lost_event.is_set()

    @property
    def active(self) -> bool:
        return not self._ended and not self.lost

    @property
    def since_renewal(self) -> float:
        """Seconds since the last keep-alive etcd answered was sent (an upper bound on
        how long ago etcd last renewed the lease)."""
        return time.monotonic() - self._last_ok

    def start(self) -> None:
        if self._thread is not None:
            return
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"etcd-lease-{self.id:x}",
                                        daemon=True)
        self._thread.start()

    def refresh(self) -> int:
        """One keep-alive now; returns the TTL etcd granted (0: the lease is gone)."""
        sent = time.monotonic()
        ttl = self._etcd._lease_keepalive_once(self.id, self._etcd.timeout,
                                               self._etcd.retry_deadline)
        if ttl > 0:
            self._last_ok = sent
        return ttl

    def remaining_ttl(self) -> int:
        """Seconds left according to etcd (-1 when the lease does not exist)."""
        return self._etcd._lease_ttl(self.id)

    def _run(self) -> None:
        interval = max(0.1, self.ttl / 3.0)
        wait = interval
        while not self._stop.wait(wait):
            # Time is counted from when a successful keep-alive was *sent*: etcd
            # renewed no earlier, so "lost" is not reported after the server-side
            # expiry (give or take one RPC timeout while etcd does not answer).
            sent = time.monotonic()
            remaining = self.ttl - (sent - self._last_ok)
            if remaining <= 0:
                self._declare_lost(f"no keep-alive answered for {self.ttl}s")
                return
            wait = interval
            try:
                ttl = self._etcd._lease_keepalive_once(
                    self.id, timeout=max(0.2, min(self._etcd.timeout, interval)),
                    deadline=max(0.2, remaining))
            except ProtegoError as exc:
                if self._stop.is_set():
                    return
                if time.monotonic() - self._last_ok >= self.ttl:
                    self._declare_lost(f"keep-alive failing for {self.ttl}s ({exc})")
                    return
                left = self.ttl - (time.monotonic() - self._last_ok)
                log.info("etcd lease %x: keep-alive failed (%s), %.1fs left", self.id,
                         type(exc).__name__, left)
                wait = max(0.05, min(interval, left))
                continue
            if ttl <= 0:
                self._declare_lost("etcd reports the lease expired or revoked")
                return
            self._last_ok = sent

    def _declare_lost(self, why: str) -> None:
        log.warning("etcd lease %x lost: %s", self.id, why)
        self.lost_event.set()
        if self._on_lost is not None:
            try:
                self._on_lost(self)
            except Exception:
                log.exception("etcd lease %x: on_lost callback failed", self.id)

    def close(self) -> None:
        """Stop keeping the lease alive (its keys expire after the TTL)."""
        self._ended = True
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=self._etcd.timeout + 1)

    def revoke(self) -> None:
        """Stop keep-alive and revoke the lease now (its keys are deleted)."""
        self.close()
        self._etcd._lease_revoke(self.id)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revoke()

    def __repr__(self) -> str:
        return f"Lease(id={self.id:x}, ttl={self.ttl}, lost={self.lost})"


# =========================================================================== #
# Watches
# =========================================================================== #


class _WatchState:
    def __init__(self, prefix: str, next_revision: int) -> None:
        self.prefix = prefix
        self.next_revision = next_revision
        self.lock = threading.Lock()
        self.call: Any = None
        self.stop = threading.Event()
        self.resync_requested = threading.Event()
        self.created = threading.Event()

    def interrupt(self) -> None:
        with self.lock:
            call = self.call
        if call is not None:
            call.cancel()


class Watch:
    """A running :meth:`Etcd.watch_prefix`."""

    def __init__(self, etcd: Etcd, prefix: str, start_revision: int,
                 callback: Callable[[list[Event]], None],
                 on_resync: Callable[[Resync], None] | None, *,
                 max_outage: float | None = None, name: str | None = None) -> None:
        self._etcd = etcd
        self._state = _WatchState(prefix, start_revision)
        self._callback = callback
        self._on_resync = on_resync
        self._max_outage = max_outage
        self.resync: Resync | None = None
        self._thread = threading.Thread(target=self._run, name=name or f"etcd-watch:{prefix}",
                                        daemon=True)

    @property
    def prefix(self) -> str:
        return self._state.prefix

    @property
    def next_revision(self) -> int:
        """The revision the watch resumes from (last delivered + 1)."""
        return self._state.next_revision

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def wait_created(self, timeout: float | None = None) -> bool:
        """Wait until etcd acknowledged the (first) watch stream."""
        return self._state.created.wait(timeout)

    def _run(self) -> None:
        resync = self._etcd._watch_loop(self._state, self._callback, max_outage=self._max_outage,
                                        stop_on_error=False)
        if resync is None:
            return
        self.resync = resync
        if self._on_resync is None:
            log.error("etcd watch %s stopped (%s) and nobody resyncs", self.prefix, resync.reason)
            return
        try:
            self._on_resync(resync)
        except Exception:
            log.exception("etcd watch %s: on_resync failed", self.prefix)

    def cancel(self, timeout: float = 5.0) -> None:
        self._state.stop.set()
        self._state.interrupt()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __repr__(self) -> str:
        return f"Watch({self.prefix!r}, next_revision={self.next_revision}, alive={self.alive})"


class WatchHandler(Protocol):
    """What :meth:`Etcd.snapshot_and_watch` drives (e.g. an agent's reconciler)."""

    def on_snapshot(self, revision: int, kvs: list[KV]) -> None:
        """Replace everything known under the prefix by *kvs* (state at *revision*)."""

    def on_events(self, events: list[Event]) -> None:
        """Apply changes after the snapshot, in revision order."""


class SnapshotWatch:
    """A running :meth:`Etcd.snapshot_and_watch` (snapshot at N, watch from N+1,
    re-snapshot on error or every ``resync_interval`` seconds)."""

    def __init__(self, etcd: Etcd, prefix: str, handler: WatchHandler, *,
                 resync_interval: float | None, resnapshot_on_error: bool,
                 name: str | None = None) -> None:
        self._etcd = etcd
        self.prefix = prefix
        self._handler = handler
        self._interval = resync_interval
        self._resnapshot_on_error = resnapshot_on_error
        self._state = _WatchState(prefix, 0)
        self.synced = threading.Event()
        self.snapshots = 0
        self.revision = 0  # revision of the last snapshot
        self.last_resync: Resync | None = None
        self._thread = threading.Thread(target=self._run, name=name or f"etcd-sync:{prefix}",
                                        daemon=True)
        self._timer: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def next_revision(self) -> int:
        return self._state.next_revision

    def start(self) -> None:
        self._thread.start()
        if self._interval:
            self._timer = threading.Thread(target=self._tick, name=f"etcd-resync:{self.prefix}",
                                           daemon=True)
            self._timer.start()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait for the first snapshot to be delivered."""
        return self.synced.wait(timeout)

    def resync(self) -> None:
        """Ask for a fresh snapshot now."""
        self._state.resync_requested.set()
        self._state.interrupt()

    def _tick(self) -> None:
        assert self._interval
        while not self._state.stop.wait(self._interval):
            self.resync()

    def _run(self) -> None:
        st = self._state
        failures = 0
        while not st.stop.is_set():
            st.resync_requested.clear()
            try:
                rev, kvs = self._etcd.get_prefix(self.prefix)
                self._handler.on_snapshot(rev, kvs)
            except ProtegoError as exc:
                if self._etcd.closed:
                    return
                failures += 1
                log.warning("etcd sync %s: snapshot failed (%s); retrying", self.prefix, exc)
                st.stop.wait(min(_WATCH_MAX_BACKOFF, 0.1 * 2 ** min(failures, 5)))
                continue
            except Exception:
                failures += 1
                log.exception("etcd sync %s: on_snapshot failed; retrying", self.prefix)
                st.stop.wait(min(_WATCH_MAX_BACKOFF, 0.1 * 2 ** min(failures, 5)))
                continue
            failures = 0
            self.snapshots += 1
            self.revision = rev
            st.next_revision = rev + 1
            self.synced.set()
            log.debug("etcd sync %s: snapshot at revision %d (%d keys)", self.prefix, rev, len(kvs))
            resync = self._etcd._watch_loop(st, self._handler.on_events, max_outage=None,
                                            stop_on_error=self._resnapshot_on_error)
            if resync is None:
                return
            self.last_resync = resync
            log.info("etcd sync %s: re-snapshot (%s)", self.prefix, resync.reason)

    def cancel(self, timeout: float = 5.0) -> None:
        self._state.stop.set()
        self._state.interrupt()
        for t in (self._thread, self._timer):
            if t is not None and t.is_alive() and t is not threading.current_thread():
                t.join(timeout)

    def __repr__(self) -> str:
        return f"SnapshotWatch({self.prefix!r}, revision={self.revision}, alive={self.alive})"
