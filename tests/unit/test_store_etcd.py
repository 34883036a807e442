"""Pure parts of protego.store.etcd, and its failover/retry/watch/lease logic
against fake gRPC stubs (no etcd, no root)."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import grpc
import pytest
from pyetcd import etcdrpc
from pyetcd import transactions as pyetcd_txn
from pyetcd.etcdrpc import kv_pb2

from protego.errors import ConfigError, ConflictError, PeerError
from protego.store import etcd as E

# --------------------------------------------------------------------------- #
# fakes
# --------------------------------------------------------------------------- #


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


UNAVAILABLE = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")


def header(rev: int) -> Any:
    return etcdrpc.ResponseHeader(revision=rev)


def pb_kv(key: str, value: bytes, mod: int, create: int | None = None, version: int = 1,
          lease: int = 0) -> Any:
    return kv_pb2.KeyValue(key=key.encode(), value=value, mod_revision=mod,
                           create_revision=create or mod, version=version, lease=lease)


class FakeCall:
    """A server-streaming call: yields queued responses, raises queued errors,
    blocks until cancel() when the queue is empty."""

    def __init__(self, items: list[Any], block: bool = True) -> None:
        self.q: queue.Queue[Any] = queue.Queue()
        for it in items:
            self.q.put(it)
        if not block:
            self.q.put(StopIteration())
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.q.put(FakeRpcError(grpc.StatusCode.CANCELLED, "cancelled"))

    def __iter__(self) -> FakeCall:
        return self

    def __next__(self) -> Any:
        item = self.q.get(timeout=10)
        if isinstance(item, StopIteration):
            raise item
        if isinstance(item, BaseException):
            raise item
        return item


class FakeKV:
    def __init__(self) -> None:
        self.put_plan: list[Any] = []
        self.txn_plan: list[Any] = []
        self.range_plan: list[Any] = []
        self.calls: list[str] = []

    def _next(self, plan: list[Any], default: Any) -> Any:
        item = plan.pop(0) if plan else default
        if isinstance(item, BaseException):
            raise item
        return item

    def Put(self, req: Any, timeout: float, metadata: Any = None) -> Any:  # noqa: N802
        self.calls.append("put")
        return self._next(self.put_plan, etcdrpc.PutResponse(header=header(10)))

    def Txn(self, req: Any, timeout: float, metadata: Any = None) -> Any:  # noqa: N802
        self.calls.append("txn")
        return self._next(self.txn_plan, etcdrpc.TxnResponse(header=header(11), succeeded=True))

    def Range(self, req: Any, timeout: float, metadata: Any = None) -> Any:  # noqa: N802
        self.calls.append("range")
        return self._next(self.range_plan, etcdrpc.RangeResponse(header=header(12)))


class FakeWatchStub:
    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls
        self.requests: list[Any] = []

    def Watch(self, request_iter: Any, metadata: Any = None) -> Any:  # noqa: N802
        self.requests.append(next(request_iter))
        self.metadata = metadata
        if not self.calls:
            raise UNAVAILABLE
        item = self.calls.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


class FakeLeaseStub:
    def __init__(self, plan: list[Any] | None = None) -> None:
        self.plan = plan if plan is not None else []
        self.count = 0

    def LeaseKeepAlive(self, it: Any, timeout: float, metadata: Any = None) -> Any:  # noqa: N802
        self.count += 1
        item = self.plan.pop(0) if self.plan else UNAVAILABLE
        if isinstance(item, BaseException):
            raise item
        return FakeCall([etcdrpc.LeaseKeepAliveResponse(TTL=item)], block=False)


class FakeConn:
    def __init__(self, host: str, port: int, tls: bool) -> None:
        self.label = f"{host}:{port}"
        self.stubs: dict[str, Any] = {"kv": FakeKV(), "watch": FakeWatchStub([]),
                                      "lease": FakeLeaseStub()}

    def stub(self, name: str) -> Any:
        return self.stubs[name]

    def metadata(self, *, watch: bool = False) -> Any:
        return (("hasleader", "true"),) if watch else None

    def reset(self) -> None:
        pass

    def reauth(self) -> None:
        self.reauths = getattr(self, "reauths", 0) + 1

    close = reset


def fake_etcd(n: int = 1, **kw: Any) -> tuple[E.Etcd, list[FakeConn]]:
    conns: list[FakeConn] = []

    def factory(h: str, p: int, tls: bool) -> FakeConn:
        c = FakeConn(h, p, tls)
        conns.append(c)
        return c

    kw.setdefault("timeout", 0.5)
    e = E.Etcd([f"10.0.0.{i + 1}:2379" for i in range(n)], _conn_factory=factory, **kw)
    return e, conns


# --------------------------------------------------------------------------- #
# pure helpers
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("ep,expected", [
    ("127.0.0.1:2379", ("127.0.0.1", 2379, None)),
    ("localhost", ("localhost", 2379, None)),
    ("http://10.1.2.3:12379", ("10.1.2.3", 12379, False)),
    ("https://etcd.example:2379/", ("etcd.example", 2379, True)),
    ("[::1]:2379", ("::1", 2379, None)),
    ("https://[fd00::1]", ("fd00::1", 2379, True)),
])
def test_parse_endpoint(ep: str, expected: tuple[str, int, bool | None]) -> None:
    assert E.parse_endpoint(ep) == expected


@pytest.mark.parametrize("ep", ["", "ftp://x:1", "::1:2379", "h:notaport", "h:0", "h:70000",
                                "[::1", "[::1]x"])
def test_parse_endpoint_rejects(ep: str) -> None:
    with pytest.raises(ConfigError):
        E.parse_endpoint(ep)


def test_prefix_range() -> None:
    assert E.prefix_range_end(b"/a/") == b"/a0"
    assert E.prefix_range_end(b"a\xff") == b"b"
    assert E.prefix_range_end(b"\xff\xff") == b"\0"
    assert E.prefix_range_end(b"") == b"\0"
    assert E.prefix_range("") == (b"\0", b"\0")
    assert E.prefix_range("/t/") == (b"/t/", b"/t0")


def test_kv_hides_value_and_parses_json() -> None:
    kv = E.KV.from_pb(pb_kv("/tenants/t1/psk", b'{"psk":"s3cret"}', 7, 3, 2, 0x1f))
    assert (kv.key, kv.mod_revision, kv.create_revision, kv.version, kv.lease) == (
        "/tenants/t1/psk", 7, 3, 2, 0x1F)
    assert "s3cret" not in repr(kv)
    assert kv.json() == {"psk": "s3cret"}
    with pytest.raises(ConfigError) as ei:
        E.KV("/k", b"not json", 1, 1, 1).json()
    assert "not json" not in str(ei.value)


def test_event_from_pb() -> None:
    put = E.Event.from_pb(kv_pb2.Event(type=kv_pb2.Event.PUT, kv=pb_kv("/a", b"v", 5)))
    dele = E.Event.from_pb(kv_pb2.Event(type=kv_pb2.Event.DELETE, kv=pb_kv("/a", b"", 6)))
    assert (put.type, put.key, put.revision, put.kv.value) == (E.EventType.PUT, "/a", 5, b"v")
    assert (dele.type, dele.revision) == (E.EventType.DELETE, 6)


def test_encode_json_is_canonical() -> None:
    assert E.encode_json({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'


def test_compare_helpers() -> None:
    m = E.mod_revision_is("/k", 5).to_pb()
    assert (m.key, m.target, m.result, m.mod_revision) == (
        b"/k", etcdrpc.Compare.MOD, etcdrpc.Compare.EQUAL, 5)
    a = E.key_absent("/k").to_pb()
    assert (a.target, a.create_revision, a.result) == (etcdrpc.Compare.CREATE, 0,
                                                       etcdrpc.Compare.EQUAL)
    p = E.key_present("/k").to_pb()
    assert p.result == etcdrpc.Compare.GREATER
    v = E.value_is("/k", b"x", "!=").to_pb()
    assert (v.target, v.value, v.result) == (etcdrpc.Compare.VALUE, b"x", etcdrpc.Compare.NOT_EQUAL)
    assert E.version_is("/k", 2, "<").to_pb().version == 2
    assert E.lease_is("/k", 9).to_pb().lease == 9
    assert "secret" not in repr(E.value_is("/k", b"secret"))
    for bad in (lambda: E.Compare("/k", "mod", "<=", 1), lambda: E.Compare("/k", "size", "==", 1),
                lambda: E.Compare("/k", "value", "==", 1),
                lambda: E.Compare("/k", "mod", "==", b"1")):
        with pytest.raises(ConfigError):
            bad()


def test_compare_passthrough() -> None:
    c = E.compare_to_pb(pyetcd_txn.Mod("/k") == 4)
    assert (c.target, c.mod_revision) == (etcdrpc.Compare.MOD, 4)
    raw = etcdrpc.Compare(key=b"/r")
    assert E.compare_to_pb(raw) is raw
    with pytest.raises(ConfigError):
        E.compare_to_pb("mod(/k) == 4")


def test_ops_to_pb() -> None:
    put = E.op_to_pb(E.PutOp("/k", b"v", 7))
    assert (put.request_put.key, put.request_put.value, put.request_put.lease) == (b"/k", b"v", 7)
    d = E.op_to_pb(E.DeleteOp("/p/", prefix=True)).request_delete_range
    assert (d.key, d.range_end) == (b"/p/", b"/p0")
    g = E.op_to_pb(E.GetOp("/k")).request_range
    assert (g.key, g.range_end) == (b"/k", b"")
    pp = E.op_to_pb(pyetcd_txn.Put("/k", "v", lease=3)).request_put
    assert (pp.value, pp.lease) == (b"v", 3)
    pd = E.op_to_pb(pyetcd_txn.Delete("/a", range_end="/b")).request_delete_range
    assert pd.range_end == b"/b"
    assert E.op_to_pb(pyetcd_txn.Get("/a")).request_range.key == b"/a"
    with pytest.raises(ConfigError):
        E.op_to_pb(("put", "/k"))


def test_txn_result_from_pb() -> None:
    resp = etcdrpc.TxnResponse(header=header(42), succeeded=True, responses=[
        etcdrpc.ResponseOp(response_range=etcdrpc.RangeResponse(kvs=[pb_kv("/a", b"1", 3)])),
        etcdrpc.ResponseOp(response_put=etcdrpc.PutResponse()),
        etcdrpc.ResponseOp(response_delete_range=etcdrpc.DeleteRangeResponse(deleted=2)),
        etcdrpc.ResponseOp(response_txn=etcdrpc.TxnResponse(succeeded=False)),
    ])
    r = E.TxnResult.from_pb(resp)
    assert r.succeeded and r.revision == 42
    assert r.responses[0][0].key == "/a" and r.responses[1] is None and r.responses[2] == 2
    assert r.responses[3] == E.TxnResult(False, 42, [])


@pytest.mark.parametrize("code,kind", [
    (grpc.StatusCode.UNAVAILABLE, E.ErrorKind.TRANSIENT),
    (grpc.StatusCode.DEADLINE_EXCEEDED, E.ErrorKind.TRANSIENT),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, E.ErrorKind.TRANSIENT),
    (grpc.StatusCode.UNAUTHENTICATED, E.ErrorKind.REAUTH),
    (grpc.StatusCode.OUT_OF_RANGE, E.ErrorKind.COMPACTED),
    (grpc.StatusCode.INVALID_ARGUMENT, E.ErrorKind.INVALID),
    (grpc.StatusCode.NOT_FOUND, E.ErrorKind.FATAL),
    (grpc.StatusCode.PERMISSION_DENIED, E.ErrorKind.FATAL),
])
def test_classify(code: grpc.StatusCode, kind: E.ErrorKind) -> None:
    assert E.classify(FakeRpcError(code)) is kind


def test_classify_pyetcd_and_others() -> None:
    from pyetcd import exceptions as px
    assert E.classify(px.ConnectionFailedError()) is E.ErrorKind.TRANSIENT
    assert E.classify(px.ConnectionTimeoutError()) is E.ErrorKind.TRANSIENT
    assert E.classify(px.RevisionCompactedError(5)) is E.ErrorKind.COMPACTED
    assert E.classify(ValueError("x")) is E.ErrorKind.FATAL


def test_map_error() -> None:
    eps = ["a:1", "b:2"]
    e = E.map_error(UNAVAILABLE, "put", "/k", eps)
    assert isinstance(e, PeerError) and "a:1,b:2" in str(e) and "/k" in str(e)
    invalid = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "key is not provided")
    assert isinstance(E.map_error(invalid, "put", "", eps), ConfigError)
    compacted = FakeRpcError(grpc.StatusCode.OUT_OF_RANGE,
                             "mvcc: required revision has been compacted")
    c = E.map_error(compacted, "get", "/k", eps)
    assert isinstance(c, E.RevisionCompactedError) and isinstance(c, PeerError)
    same = ConflictError("x")
    assert E.map_error(same, "cas", "/k", eps) is same


def test_constructor_validation() -> None:
    with pytest.raises(ConfigError):
        E.Etcd([])
    with pytest.raises(ConfigError):
        E.Etcd(["127.0.0.1:2379"], user="root")
    with pytest.raises(ConfigError):
        E.Etcd(["127.0.0.1:2379"], cert_key="k.pem")
    with pytest.raises(ConfigError):
        E.Etcd(["127.0.0.1:2379"], attempts=0)
    with pytest.raises(ConfigError):
        E.Etcd(["127.0.0.1:2379"], ca_cert="/nonexistent/ca.pem")
    e = E.Etcd("127.0.0.1:2379")  # a lone string is one endpoint; nothing connects yet
    assert e.endpoints == ["127.0.0.1:2379"]
    e.close()


# --------------------------------------------------------------------------- #
# failover and retries (fake stubs)
# --------------------------------------------------------------------------- #


def test_failover_to_next_endpoint() -> None:
    e, conns = fake_etcd(3)
    conns[0].stubs["kv"].put_plan = [UNAVAILABLE]
    assert e.put("/k", b"v") == 10
    assert conns[0].stubs["kv"].calls == ["put"] and conns[1].stubs["kv"].calls == ["put"]
    assert e.current_endpoint == "10.0.0.2:2379"
    # the failed endpoint is benched: the next call goes to endpoint 2 directly
    e.put("/k", b"v")
    assert conns[0].stubs["kv"].calls == ["put"]


def test_retries_are_bounded_and_map_to_peer_error() -> None:
    e, conns = fake_etcd(2, attempts=4, endpoint_backoff=0.0)
    for c in conns:
        c.stubs["kv"].put_plan = [UNAVAILABLE] * 10
    t0 = time.monotonic()
    with pytest.raises(PeerError) as ei:
        e.put("/tenants/t1/psk", b"s3cret")
    assert time.monotonic() - t0 < 3
    assert sum(len(c.stubs["kv"].calls) for c in conns) == 4
    assert "s3cret" not in str(ei.value) and "/tenants/t1/psk" in str(ei.value)


def test_non_transient_error_is_not_retried() -> None:
    e, conns = fake_etcd(2)
    conns[0].stubs["kv"].put_plan = [FakeRpcError(grpc.StatusCode.NOT_FOUND,
                                                  "etcdserver: requested lease not found")]
    with pytest.raises(PeerError, match="lease not found"):
        e.put("/k", b"v", lease=123)
    assert len(conns[0].stubs["kv"].calls) + len(conns[1].stubs["kv"].calls) == 1


def test_unauthenticated_reauths_on_same_endpoint() -> None:
    e, conns = fake_etcd(2)
    conns[0].stubs["kv"].put_plan = [FakeRpcError(grpc.StatusCode.UNAUTHENTICATED,
                                                  "etcdserver: invalid auth token")]
    assert e.put("/k", b"v") == 10
    assert conns[0].reauths == 1 and conns[0].stubs["kv"].calls == ["put", "put"]
    assert conns[1].stubs["kv"].calls == [] and e.current_endpoint == "10.0.0.1:2379"


def test_values_must_be_bytes() -> None:
    e, _ = fake_etcd()
    with pytest.raises(ConfigError):
        e.put("/k", "text")  # type: ignore[arg-type]


def test_failed_cas_is_a_result_not_retried() -> None:
    e, conns = fake_etcd()
    kv = conns[0].stubs["kv"]
    kv.txn_plan = [etcdrpc.TxnResponse(header=header(5), succeeded=False)]
    assert e.cas("/k", b"v", 3) is False
    assert kv.calls == ["txn"]
    kv.txn_plan = [etcdrpc.TxnResponse(header=header(6), succeeded=False)]
    with pytest.raises(ConflictError):
        e.update("/k", b"v", 3)
    kv.txn_plan = [etcdrpc.TxnResponse(header=header(7), succeeded=False)]
    with pytest.raises(ConflictError):
        e.create("/k", b"v")
    kv.txn_plan = [etcdrpc.TxnResponse(header=header(8), succeeded=True)]
    assert e.create("/k", b"v") == 8


def test_cas_resolves_an_ambiguous_retry() -> None:
    e, conns = fake_etcd()
    kv = conns[0].stubs["kv"]
    e.endpoint_backoff = 0.0
    # first attempt timed out but was applied; the retry's compare then fails
    kv.txn_plan = [FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED),
                   etcdrpc.TxnResponse(header=header(9), succeeded=False)]
    kv.range_plan = [etcdrpc.RangeResponse(header=header(9), kvs=[pb_kv("/k", b"mine", 8)])]
    assert e.cas("/k", b"mine", 3) is True
    # same, but someone else's value is stored: we lost
    kv.txn_plan = [FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED),
                   etcdrpc.TxnResponse(header=header(9), succeeded=False)]
    kv.range_plan = [etcdrpc.RangeResponse(header=header(9), kvs=[pb_kv("/k", b"theirs", 8)])]
    assert e.cas("/k", b"mine", 3) is False


def test_get_prefix_pages_at_one_revision() -> None:
    e, conns = fake_etcd()
    kv = conns[0].stubs["kv"]
    seen: list[Any] = []
    pages = [
        etcdrpc.RangeResponse(header=header(20), more=True, kvs=[pb_kv("/p/a", b"1", 3)]),
        etcdrpc.RangeResponse(header=header(21), more=False, kvs=[pb_kv("/p/b", b"2", 4)]),
    ]

    def rng(req: Any, timeout: float, metadata: Any = None) -> Any:
        seen.append((req.key, req.revision, req.limit))
        return pages.pop(0)

    kv.Range = rng
    rev, kvs = e.get_prefix("/p/", page_size=1)
    assert rev == 20 and [k.key for k in kvs] == ["/p/a", "/p/b"]
    assert seen == [(b"/p/", 0, 1), (b"/p/a\0", 20, 1)]


# --------------------------------------------------------------------------- #
# watches (fake streams)
# --------------------------------------------------------------------------- #


def wresp(*events: tuple[str, str, int], created: bool = False, compact: int = 0,
          canceled: bool = False, rev: int = 0) -> Any:
    evs = [kv_pb2.Event(type=kv_pb2.Event.DELETE if t == "del" else kv_pb2.Event.PUT,
                        kv=pb_kv(k, b"" if t == "del" else b"v", r)) for t, k, r in events]
    return etcdrpc.WatchResponse(header=header(rev or (events[-1][2] if events else 1)),
                                 created=created, compact_revision=compact, canceled=canceled,
                                 events=evs)


def collect() -> tuple[list[tuple[str, str, int]], Any]:
    got: list[tuple[str, str, int]] = []

    def cb(events: list[E.Event]) -> None:
        got.extend((ev.type.value, ev.key, ev.revision) for ev in events)

    return got, cb


def wait_for(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_watch_resumes_from_last_revision_plus_one_on_next_endpoint() -> None:
    e, conns = fake_etcd(2)
    conns[0].stubs["watch"] = FakeWatchStub([FakeCall([
        wresp(created=True, rev=4),
        wresp(("put", "/w/a", 5), ("put", "/w/b", 5)),
        wresp(("del", "/w/a", 6)),
        UNAVAILABLE,
    ])])
    second = FakeCall([wresp(created=True, rev=6),
                       wresp(("put", "/w/a", 6), ("put", "/w/c", 7))])  # a stale 6 is dropped
    conns[1].stubs["watch"] = FakeWatchStub([second])
    got, cb = collect()
    w = e.watch_prefix("/w/", 5, cb)
    assert wait_for(lambda: len(got) == 4)
    assert got == [("put", "/w/a", 5), ("put", "/w/b", 5), ("delete", "/w/a", 6),
                   ("put", "/w/c", 7)]
    assert conns[0].stubs["watch"].requests[0].create_request.start_revision == 5
    assert conns[1].stubs["watch"].requests[0].create_request.start_revision == 7
    assert conns[1].stubs["watch"].requests[0].create_request.range_end == b"/w0"
    assert ("hasleader", "true") in conns[1].stubs["watch"].metadata
    assert w.next_revision == 8 and w.alive
    w.cancel()
    assert not w.alive and second.cancelled


def test_watch_compaction_calls_on_resync() -> None:
    e, conns = fake_etcd()
    conns[0].stubs["watch"] = FakeWatchStub([FakeCall([
        wresp(created=True, rev=30), wresp(compact=20, canceled=True, rev=30)])])
    resyncs: list[E.Resync] = []
    got, cb = collect()
    w = e.watch_prefix("/w/", 3, cb, resyncs.append)
    assert wait_for(lambda: bool(resyncs))
    assert resyncs == [E.Resync("compacted", 20)]
    assert wait_for(lambda: not w.alive)


def test_watch_handler_failure_calls_on_resync() -> None:
    e, conns = fake_etcd()
    conns[0].stubs["watch"] = FakeWatchStub([FakeCall([wresp(created=True),
                                                       wresp(("put", "/w/a", 2))])])
    resyncs: list[E.Resync] = []

    def bad(events: list[E.Event]) -> None:
        raise RuntimeError("boom")

    e.watch_prefix("/w/", 2, bad, resyncs.append)
    assert wait_for(lambda: bool(resyncs))
    assert resyncs[0].reason.startswith("handler failed")


def test_watch_progress_notification_advances_revision() -> None:
    e, conns = fake_etcd()
    conns[0].stubs["watch"] = FakeWatchStub([FakeCall([wresp(created=True, rev=5), wresp(rev=40)])])
    w = e.watch_prefix("/w/", 6, lambda evs: None)
    assert wait_for(lambda: w.next_revision == 41)
    w.cancel()


def test_watch_max_outage_gives_up_with_resync() -> None:
    e, _ = fake_etcd(endpoint_backoff=0.0)  # the fake stub raises UNAVAILABLE forever
    resyncs: list[E.Resync] = []
    w = e.watch_prefix("/w/", 1, lambda evs: None, resyncs.append, max_outage=0.3)
    assert wait_for(lambda: bool(resyncs), 5)
    assert resyncs[0].reason.startswith("etcd unavailable")
    assert wait_for(lambda: not w.alive)


def test_snapshot_and_watch_resnapshots_on_stream_error() -> None:
    e, conns = fake_etcd()
    kv = conns[0].stubs["kv"]
    kv.range_plan = [
        etcdrpc.RangeResponse(header=header(5), kvs=[pb_kv("/s/a", b"1", 5)]),
        etcdrpc.RangeResponse(header=header(7), kvs=[pb_kv("/s/a", b"1", 5),
                                                     pb_kv("/s/b", b"2", 7)]),
    ]
    conns[0].stubs["watch"] = FakeWatchStub([
        FakeCall([wresp(created=True, rev=5), wresp(("put", "/s/b", 6)), UNAVAILABLE]),
        FakeCall([wresp(created=True, rev=7)]),
    ])
    e.endpoint_backoff = 0.0
    log: list[Any] = []

    class H:
        def on_snapshot(self, revision: int, kvs: list[E.KV]) -> None:
            log.append(("snap", revision, [k.key for k in kvs]))

        def on_events(self, events: list[E.Event]) -> None:
            log.append(("events", [ev.revision for ev in events]))

    sw = e.snapshot_and_watch("/s/", H())
    assert sw.wait_synced(2)
    assert wait_for(lambda: sw.snapshots == 2)
    assert log == [("snap", 5, ["/s/a"]), ("events", [6]), ("snap", 7, ["/s/a", "/s/b"])]
    starts = [r.create_request.start_revision for r in conns[0].stubs["watch"].requests]
    assert starts == [6, 8]
    assert sw.last_resync is not None and sw.last_resync.reason.startswith("stream error")
    sw.cancel()
    assert not sw.alive


# --------------------------------------------------------------------------- #
# leases (fake keep-alive)
# --------------------------------------------------------------------------- #


def test_lease_lost_after_ttl_without_keepalive() -> None:
    e, conns = fake_etcd(endpoint_backoff=0.0)
    lost: list[E.Lease] = []
    lease = E.Lease(e, 0xABC, 1, on_lost=lost.append)
    lease.start()
    assert lease.lost_event.wait(3)
    assert lost == [lease] and lease.lost and not lease.active
    assert conns[0].stubs["lease"].count >= 2
    lease.close()


def test_lease_lost_when_etcd_says_expired() -> None:
    e, conns = fake_etcd()
    conns[0].stubs["lease"] = FakeLeaseStub([3, 3, 0])
    lease = E.Lease(e, 0xABC, 3)
    ttl0 = lease.refresh()
    assert ttl0 == 3
    lease.start()
    assert lease.lost_event.wait(5)


def test_lease_keepalive_keeps_going() -> None:
    e, conns = fake_etcd()
    conns[0].stubs["lease"] = FakeLeaseStub([1] * 100)
    lease = E.Lease(e, 0xABC, 1)
    lease.start()
    time.sleep(1.5)
    assert not lease.lost and conns[0].stubs["lease"].count >= 3
    lease.close()
    n = conns[0].stubs["lease"].count
    time.sleep(0.5)
    assert conns[0].stubs["lease"].count == n  # stopped


def test_close_stops_watches_and_refuses_new_calls() -> None:
    e, conns = fake_etcd()
    conns[0].stubs["watch"] = FakeWatchStub([FakeCall([wresp(created=True)])])
    w = e.watch_prefix("/w/", 1, lambda evs: None)
    assert w.wait_created(2)
    e.close(revoke_leases=False)
    assert not w.alive
    with pytest.raises(PeerError):
        e.put("/k", b"v")


def test_thread_safety_of_endpoint_picking() -> None:
    e, conns = fake_etcd(3, endpoint_backoff=0.0)
    for c in conns:
        ok = etcdrpc.PutResponse(header=header(1))
        c.stubs["kv"].put_plan = [UNAVAILABLE if i % 3 == 0 else ok for i in range(300)]
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(50):
                e.put("/k", b"v")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
