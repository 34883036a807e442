"""protego.store.etcd against real etcd members on loopback (no root needed).

The fixtures start etcd with protego.store.server on free loopback ports and stop
it by PID on teardown; data dirs live under pytest's tmp dirs.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protego.errors import ConfigError, ConflictError, PeerError
from protego.store.etcd import (
    KV,
    DeleteOp,
    Etcd,
    Event,
    EventType,
    GetOp,
    PutOp,
    Resync,
    key_absent,
    value_is,
)
from protego.store.server import ETCD_BIN, EtcdCluster

pytestmark = pytest.mark.skipif(shutil.which(ETCD_BIN) is None, reason="etcd not installed")


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


@pytest.fixture(scope="module")
def cluster1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    base = tmp_path_factory.mktemp("etcd1")
    c = EtcdCluster("ptest1", base / "data", base / "log", members=1)
    c.start()
    try:
        yield c
    finally:
        c.destroy()
    assert c.pids == [None] and not (base / "data" / "ptest1-0").exists()


@pytest.fixture
def etcd(cluster1: EtcdCluster) -> Iterator[Etcd]:
    if not cluster1.members[0].running:  # a failed test may have left it stopped
        cluster1.start_member(0)
    e = Etcd(cluster1.endpoints, timeout=2.0)
    try:
        yield e
    finally:
        e.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"/protego-test/{request.node.name}/"


class Recorder:
    """Watch callback that records (type, key, revision, value)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, bytes]] = []
        self.resyncs: list[Resync] = []
        self.lock = threading.Lock()

    def __call__(self, events: list[Event]) -> None:
        with self.lock:
            self.events.extend((ev.type.value, ev.key, ev.revision, ev.kv.value) for ev in events)

    def on_resync(self, r: Resync) -> None:
        self.resyncs.append(r)


# --------------------------------------------------------------------------- #
# KV basics
# --------------------------------------------------------------------------- #


def test_put_get_prefix_delete_json_txn(etcd: Etcd, prefix: str) -> None:
    assert etcd.get(prefix + "missing") is None
    r1 = etcd.put(prefix + "a", b"\x00\x01binary")
    r2 = etcd.put_json(prefix + "b", {"tenant": "t1", "vni": 42})
    assert r2 > r1
    kv = etcd.get(prefix + "a")
    assert kv is not None and kv.value == b"\x00\x01binary" and kv.mod_revision == r1
    assert kv.version == 1 and kv.create_revision == r1
    assert etcd.get_json(prefix + "b") == {"tenant": "t1", "vni": 42}
    rev, kvs = etcd.get_prefix(prefix)
    assert rev >= r2 and [k.key for k in kvs] == [prefix + "a", prefix + "b"]
    # paging returns the same snapshot
    for i in range(7):
        etcd.put(f"{prefix}p/{i}", b"x")
    rev_p, paged = etcd.get_prefix(prefix + "p/", page_size=2)
    assert [k.key for k in paged] == [f"{prefix}p/{i}" for i in range(7)]
    assert rev_p == etcd.revision()
    # txn with our helpers: create-if-absent of two keys at once
    res = etcd.txn([key_absent(prefix + "c"), value_is(prefix + "a", b"\x00\x01binary")],
                   [PutOp(prefix + "c", b"3"), GetOp(prefix + "a")], [GetOp(prefix + "c")])
    assert res.succeeded and res.responses[1][0].key == prefix + "a"
    res2 = etcd.txn([key_absent(prefix + "c")], [PutOp(prefix + "c", b"4")],
                    [GetOp(prefix + "c"), DeleteOp(prefix + "p/", prefix=True)])
    assert not res2.succeeded and res2.responses[0][0].value == b"3" and res2.responses[1] == 7
    assert etcd.delete(prefix + "a") is True and etcd.delete(prefix + "a") is False
    assert etcd.delete_prefix(prefix) == 2
    assert etcd.get_prefix(prefix)[1] == []


def test_cas_create_update_and_delete(etcd: Etcd, prefix: str) -> None:
    k = prefix + "gpn"
    assert etcd.cas(k, b"v1", 0) is True
    assert etcd.cas(k, b"v1bis", 0) is False  # create-only
    kv = etcd.get(k)
    assert kv is not None
    assert etcd.cas(k, b"v2", kv.mod_revision) is True
    assert etcd.cas(k, b"v3", kv.mod_revision) is False  # stale
    with pytest.raises(ConflictError):
        etcd.update(k, b"v3", kv.mod_revision)
    with pytest.raises(ConflictError):
        etcd.create(k, b"again")
    kv2 = etcd.get(k)
    assert kv2 is not None and kv2.value == b"v2"
    rev = etcd.update(k, b"v4", kv2.mod_revision)
    assert etcd.cas_delete(k, kv2.mod_revision) is False
    assert etcd.cas_delete(k, rev) is True and etcd.get(k) is None


def test_cas_race_exactly_one_wins(etcd: Etcd, prefix: str) -> None:
    k = prefix + "owner"
    for round_ in range(20):
        etcd.put(k, b"initial")
        kv = etcd.get(k)
        assert kv is not None
        barrier = threading.Barrier(2)
        results: dict[str, bool] = {}

        def contend(name: str, seen: KV, barrier: threading.Barrier,
                    results: dict[str, bool]) -> None:
            barrier.wait()
            results[name] = etcd.cas(k, name.encode(), seen.mod_revision)

        threads = [threading.Thread(target=contend, args=(n, kv, barrier, results))
                   for n in ("gmn-a", "gmn-b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results.values()) == [False, True], (round_, results)
        winner = next(n for n, ok in results.items() if ok)
        final = etcd.get(k)
        assert final is not None and final.value == winner.encode()


def test_cas_counter_under_contention(etcd: Etcd, prefix: str) -> None:
    k = prefix + "counter"
    etcd.put_json(k, 0)

    def worker() -> None:
        for _ in range(15):
            while True:
                kv = etcd.get(k)
                assert kv is not None
                if etcd.cas_json(k, kv.json() + 1, kv.mod_revision):
                    break

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert etcd.get_json(k) == 60


# --------------------------------------------------------------------------- #
# leases
# --------------------------------------------------------------------------- #


def test_lease_keepalive_keeps_and_expiry_deletes(etcd: Etcd, prefix: str) -> None:
    kept = etcd.lease(2)
    dropped = etcd.lease(2)
    etcd.put(prefix + "kept", b"1", lease=kept)
    etcd.put(prefix + "dropped", b"1", lease=dropped)
    kv = etcd.get(prefix + "kept")
    assert kv is not None and kv.lease == kept.id
    dropped.close()  # stop keep-alive without revoking: the key must expire
    assert wait_for(lambda: etcd.get(prefix + "dropped") is None, timeout=6)
    assert etcd.get(prefix + "kept") is not None and not kept.lost
    assert kept.remaining_ttl() > 0
    time.sleep(1.0)  # well past the 2 s TTL since the grant
    assert etcd.get(prefix + "kept") is not None
    kept.revoke()
    assert etcd.get(prefix + "kept") is None
    assert kept.remaining_ttl() == -1


def test_lease_loss_is_reported_when_etcd_is_gone(etcd: Etcd, cluster1: EtcdCluster,
                                                  prefix: str) -> None:
    lost = threading.Event()
    lease = etcd.lease(2, on_lost=lambda _lease: lost.set())
    etcd.put(prefix + "hb", b"1", lease=lease)
    cluster1.stop_member(0)
    try:
        assert lost.wait(6) and lease.lost
    finally:
        cluster1.start_member(0)
    # nobody keeps the lost lease alive any more: its key goes away
    assert wait_for(lambda: etcd.get(prefix + "hb") is None, 8)


# --------------------------------------------------------------------------- #
# watches
# --------------------------------------------------------------------------- #


def test_watch_sees_every_event_in_order(etcd: Etcd, prefix: str) -> None:
    start = etcd.revision() + 1
    rec = Recorder()
    w = etcd.watch_prefix(prefix, start, rec, rec.on_resync)
    expected: list[tuple[str, str, int, bytes]] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        for i in range(40):
            key = f"{prefix}w{n}/{i % 5}"
            if i % 7 == 6:
                rev = etcd.put(key, b"")  # ensure it exists, then delete
                with lock:
                    expected.append(("put", key, rev, b""))
                etcd.delete(key)
            else:
                val = f"{n}-{i}".encode()
                rev = etcd.put(key, val)
                with lock:
                    expected.append(("put", key, rev, val))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n_deletes = 3 * sum(1 for i in range(40) if i % 7 == 6)
    assert wait_for(lambda: len(rec.events) == len(expected) + n_deletes)
    revs = [e[2] for e in rec.events]
    assert revs == sorted(revs) and len(set(revs)) == len(revs)
    puts = [e for e in rec.events if e[0] == "put"]
    assert puts == sorted(expected, key=lambda e: e[2])
    assert all(e[3] == b"" for e in rec.events if e[0] == "delete")
    assert not rec.resyncs
    w.cancel()
    assert not w.alive


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "sigkill"])
def test_watch_resumes_after_etcd_restart(etcd: Etcd, cluster1: EtcdCluster, prefix: str,
                                          crash: bool) -> None:
    start = etcd.revision() + 1
    rec = Recorder()
    w = etcd.watch_prefix(prefix, start, rec, rec.on_resync)
    assert w.wait_created(5)
    revs = [etcd.put(f"{prefix}k{i}", str(i).encode()) for i in range(10)]
    assert wait_for(lambda: len(rec.events) == 10)
    cluster1.restart_member(0, kill=crash)  # same data dir
    revs += [etcd.put(f"{prefix}k{i}", str(i).encode()) for i in range(10, 20)]
    assert wait_for(lambda: len(rec.events) >= 20, timeout=10)
    time.sleep(0.2)  # would catch duplicates arriving late
    assert [e[2] for e in rec.events] == revs  # nothing lost, nothing repeated
    assert [e[1] for e in rec.events] == [f"{prefix}k{i}" for i in range(20)]
    assert not rec.resyncs and w.alive
    w.cancel()


def test_compaction_triggers_on_resync(etcd: Etcd, prefix: str) -> None:
    first = etcd.put(prefix + "a", b"1")
    etcd.put(prefix + "a", b"2")
    last = etcd.put(prefix + "a", b"3")
    etcd.compact(last)
    rec = Recorder()
    w = etcd.watch_prefix(prefix, first, rec, rec.on_resync)
    assert wait_for(lambda: bool(rec.resyncs), 5)
    assert rec.resyncs[0].reason == "compacted" and rec.resyncs[0].compact_revision >= last
    assert rec.events == [] and wait_for(lambda: not w.alive)
    # from the compaction point on, watching works again
    rec2 = Recorder()
    w2 = etcd.watch_prefix(prefix, last, rec2, rec2.on_resync)
    assert wait_for(lambda: len(rec2.events) == 1)
    assert rec2.events[0][2] == last
    w2.cancel()


class Mirror:
    """A reconciler-style handler: keeps a dict equal to the prefix in etcd."""

    def __init__(self, fail_once_at: str | None = None) -> None:
        self.state: dict[str, bytes] = {}
        self.revision = 0
        self.snapshots = 0
        self.fail_once_at = fail_once_at
        self.lock = threading.Lock()

    def on_snapshot(self, revision: int, kvs: list[KV]) -> None:
        with self.lock:
            self.state = {kv.key: kv.value for kv in kvs}
            self.revision = revision
            self.snapshots += 1

    def on_events(self, events: list[Event]) -> None:
        with self.lock:
            for ev in events:
                if ev.key == self.fail_once_at:
                    self.fail_once_at = None
                    raise RuntimeError("reconcile failed")
                if ev.type is EventType.PUT:
                    self.state[ev.key] = ev.kv.value
                else:
                    self.state.pop(ev.key, None)
                self.revision = ev.revision


def test_snapshot_and_watch_converges_across_errors_and_restart(
        etcd: Etcd, cluster1: EtcdCluster, prefix: str) -> None:
    etcd.put(prefix + "pre", b"0")
    m = Mirror(fail_once_at=prefix + "boom")
    sw = etcd.snapshot_and_watch(prefix, m)
    assert sw.wait_synced(5) and m.state == {prefix + "pre": b"0"}

    def converged() -> bool:
        _, kvs = etcd.get_prefix(prefix)
        with m.lock:
            return m.state == {kv.key: kv.value for kv in kvs}

    etcd.put(prefix + "a", b"1")
    etcd.delete(prefix + "pre")
    assert wait_for(converged, 5)
    etcd.put(prefix + "boom", b"x")  # handler raises once: re-snapshot
    assert wait_for(lambda: m.snapshots >= 2 and converged(), 5)
    cluster1.restart_member(0)
    etcd.put(prefix + "after", b"2")
    assert wait_for(lambda: m.snapshots >= 3 and converged(), 10)
    sw.resync()
    assert wait_for(lambda: m.snapshots >= 4 and converged(), 5)
    sw.cancel()
    assert not sw.alive


# --------------------------------------------------------------------------- #
# 3-member cluster: failover
# --------------------------------------------------------------------------- #


def test_three_member_cluster_failover(tmp_path: Path) -> None:
    c = EtcdCluster("ptest3", tmp_path / "data", tmp_path / "log", members=3)
    c.start()
    e = Etcd(c.endpoints, timeout=2.0)
    try:
        prefix = "/protego-test/failover/"
        rec = Recorder()
        w = e.watch_prefix(prefix, e.revision() + 1, rec, rec.on_resync)
        lost = threading.Event()
        lease = e.lease(8, on_lost=lambda _l: lost.set())
        e.put(prefix + "hb", b"gmn-a", lease=lease)
        revs = [e.put(f"{prefix}k{i}", b"v") for i in range(5)]
        victim = e.endpoints.index(e.current_endpoint)
        pids_before = c.pids
        c.kill_member(victim)
        assert c.pids[victim] is None
        assert [p for i, p in enumerate(c.pids) if i != victim] == \
            [p for i, p in enumerate(pids_before) if i != victim]
        t0 = time.monotonic()
        revs += [e.put(f"{prefix}k{i}", b"v") for i in range(5, 10)]
        assert time.monotonic() - t0 < 10
        assert e.current_endpoint != c.endpoints[victim]
        kv = e.get(prefix + "k9")
        assert kv is not None and kv.mod_revision == revs[-1]
        assert wait_for(lambda: len(rec.events) >= 11, 10)
        assert [ev[2] for ev in rec.events] == sorted({ev[2] for ev in rec.events})
        assert [ev[2] for ev in rec.events][1:] == revs
        time.sleep(1.0)
        assert not lost.is_set() and e.get(prefix + "hb") is not None
        # the killed member comes back on its data dir and catches up
        c.restart_member(victim)
        solo = Etcd([c.endpoints[victim]], timeout=2.0)
        try:
            assert wait_for(lambda: (solo.get(prefix + "k9") or kv).mod_revision == revs[-1], 5)
        finally:
            solo.close()
        w.cancel()
        lease.revoke()
    finally:
        e.close()
        c.destroy()
    assert c.pids == [None, None, None]


def test_unavailable_etcd_raises_peer_error_quickly(tmp_path: Path) -> None:
    from protego.store.server import free_ports

    port = free_ports(1)[0]  # nothing listens there
    e = Etcd([f"127.0.0.1:{port}"], timeout=0.5, attempts=3, retry_deadline=2.0)
    t0 = time.monotonic()
    with pytest.raises(PeerError, match="unavailable"):
        e.put("/protego-test/x", b"secret-psk")
    assert time.monotonic() - t0 < 4
    e.close()


def test_auth_and_reauth_after_token_expiry(tmp_path: Path) -> None:
    import subprocess

    c = EtcdCluster("ptestauth", tmp_path / "data", tmp_path / "log",
                    extra_args=["--auth-token-ttl=1"])
    c.start()
    try:
        ctl = ["etcdctl", f"--endpoints={c.client_urls[0]}"]
        for args in (["user", "add", "root", "--new-user-password=pw-root"],
                     ["user", "grant-role", "root", "root"], ["auth", "enable"]):
            subprocess.run(ctl + args, check=True, capture_output=True, timeout=10)
        with pytest.raises(ConfigError, match="user name is empty"):
            Etcd(c.endpoints, timeout=1.0, attempts=1).put("/a", b"1")  # no credentials
        e = Etcd(c.endpoints, timeout=2.0, user="root", password="pw-root")
        try:
            rec = Recorder()
            w = e.watch_prefix("/auth/", None, rec, rec.on_resync)
            assert w.wait_created(5)
            e.put("/auth/a", b"1")
            time.sleep(2.5)  # the simple token expires after 1 s idle
            e.put("/auth/b", b"2")  # re-authenticates transparently
            assert e.get("/auth/b") is not None
            assert wait_for(lambda: [ev[1] for ev in rec.events] == ["/auth/a", "/auth/b"], 5)
        finally:
            e.close()
    finally:
        c.destroy()


def test_launcher_state_lets_a_new_process_stop_etcd_after_a_crash(tmp_path: Path) -> None:
    """`testbed down` after a crash: the launcher dies, its recorded state stops etcd."""
    import json
    import subprocess
    import sys

    from protego.store.server import proc_alive

    state_file = tmp_path / "state.json"
    script = (
        "import json, os, sys\n"
        "from protego.store.server import EtcdCluster\n"
        f"c = EtcdCluster('ptestcrash', {str(tmp_path / 'data')!r}, {str(tmp_path / 'log')!r})\n"
        "c.start()\n"
        f"open({str(state_file)!r}, 'w').write(json.dumps(c.state()))\n"
        "os._exit(0)  # crash: no stop()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    state = json.loads(state_file.read_text())
    c = EtcdCluster.from_state(state)
    pid = state["members"][0]["process"]["pid"]
    assert proc_alive(pid) and c.pids == [pid]
    e = Etcd(c.endpoints, timeout=2.0)
    try:
        e.put("/protego-test/crash", b"1")
    finally:
        e.close()
    c.destroy()
    assert wait_for(lambda: not proc_alive(pid), 5) and c.pids == [None]
    assert not (tmp_path / "data" / "ptestcrash-0").exists()
