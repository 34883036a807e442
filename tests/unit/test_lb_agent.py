"""The lb agent's view and reconcile orchestration with fake adapters (no root)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from protego.errors import DataplaneError
from protego.lb import model
from protego.lb.agent import LbConfig, Reconciler, View
from protego.lb.policy import PolicyRoute

P = model.PREFIX


@dataclass
class KV:
    key: str
    value: bytes


@dataclass
class Ev:
    type: Any
    kv: KV

    @property
    def key(self) -> str:
        return self.kv.key

    rev: int = 0

    @property
    def revision(self) -> int:
        return self.rev


class _T:
    def __init__(self, v: str) -> None:
        self.value = v


class FakeNft:
    def __init__(self, fail: int = 0) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail = fail

    def read(self, table: str) -> None:
        self.calls.append(("read", table))

    def apply(self, cmds: list[str]) -> None:
        self.calls.append(("apply", cmds))
        if self.fail:
            self.fail -= 1
            raise DataplaneError("boom")


class FakeRoutes:
    def __init__(self, installed: set[PolicyRoute]) -> None:
        self.installed = installed
        self.calls: list[tuple[str, Any]] = []

    def read(self) -> set[PolicyRoute]:
        return set(self.installed)

    def add(self, pr: PolicyRoute) -> None:
        self.calls.append(("add", pr))

    def remove(self, pr: PolicyRoute) -> None:
        self.calls.append(("remove", pr))


ENTRIES = {
    "gpn/nodes/gpn1": {"fabric_addr": "192.0.2.21"},
    "gmn/leader": {"fabric_addr": "192.0.2.11"},
    "steer/in/203.0.113.11/00001234": {"gpn": "gpn1", "tenant": "acme", "tunnel": "hq"},
}


def test_view_snapshot_events_and_prefix_replacement() -> None:
    v = View()
    h = v.handler("steer/")
    h.on_snapshot(5, [KV(P + "steer/in/203.0.113.11/00001234", b'{"gpn": "gpn1"}'),
                      KV(P + "steer/out/a/b", b"not json")])
    assert v.snapshot() == {"steer/in/203.0.113.11/00001234": {"gpn": "gpn1"}, "steer/out/a/b": None}
    assert v.changed.is_set() and v.synced == {"steer/"}
    v.handler("gpn/nodes/").on_snapshot(5, [KV(P + "gpn/nodes/gpn1", b"{}")])
    h.on_events([Ev(_T("delete"), KV(P + "steer/out/a/b", b""), 6),
                 Ev(_T("put"), KV(P + "steer/in/203.0.113.11/00001235", b"{}"), 7)])
    assert set(v.snapshot()) == {"steer/in/203.0.113.11/00001234", "steer/in/203.0.113.11/00001235",
                                 "gpn/nodes/gpn1"}
    # the revision each prefix has reached (what the agent acknowledges after applying)
    assert v.snapshot_with_revision("steer/")[1] == 7 and v.revisions["gpn/nodes/"] == 5
    h.on_snapshot(9, [])  # a re-snapshot replaces only its own prefix
    assert set(v.snapshot()) == {"gpn/nodes/gpn1"}


def test_reconcile_routes_before_and_after_the_batch() -> None:
    stale = PolicyRoute(7, "192.0.2.99")
    routes = FakeRoutes({PolicyRoute(2, "192.0.2.21"), stale})
    nft = FakeNft()
    rec = Reconciler(LbConfig(roles=frozenset({"gin", "gen"})), nft, routes)  # type: ignore[arg-type]
    last = rec.reconcile(ENTRIES)
    # the GPN keeps slot 2; the GMN gets the lowest free slot (1); slot 7 goes after the batch
    assert last["slots"] == {"192.0.2.21": 2, "192.0.2.11": 1}
    assert routes.calls == [("add", PolicyRoute(1, "192.0.2.11")), ("remove", stale)]
    applied = [c for c in nft.calls if c[0] == "apply"]
    assert len(applied) == 1  # both tables in one transaction
    assert any("0x50470002" in cmd for cmd in applied[0][1])
    assert any("protego_gen" in cmd for cmd in applied[0][1])
    assert last["errors"] == [] and last["steer_in"] == 1


def test_reconcile_falls_back_to_rebuild_and_reports_refused() -> None:
    nft = FakeNft(fail=1)
    rec = Reconciler(LbConfig(roles=frozenset({"gin"})), nft, FakeRoutes(set()))  # type: ignore[arg-type]
    last = rec.reconcile({**ENTRIES, "steer/in/203.0.113.11/zz": {"gpn": "gpn1"}})
    applied = [c[1] for c in nft.calls if c[0] == "apply"]
    assert len(applied) == 2 and applied[1][:2] == ["add table ip protego_gin", "delete table ip protego_gin"]
    assert len(last["errors"]) == 1 and "8 hex digits" in last["errors"][0]


def test_reconcile_gives_up_when_rebuild_fails_too() -> None:
    rec = Reconciler(LbConfig(roles=frozenset({"gen", "gin"})), FakeNft(fail=2), FakeRoutes(set()))  # type: ignore[arg-type]
    with pytest.raises(DataplaneError):
        rec.reconcile(ENTRIES)


def test_incremental_reconcile_trusts_its_cache_until_a_full_one() -> None:
    nft = FakeNft()
    routes = FakeRoutes(set())
    rec = Reconciler(LbConfig(roles=frozenset({"gin"})), nft, routes)  # type: ignore[arg-type]
    rec.reconcile(ENTRIES)
    nft.calls.clear()
    moved = {**ENTRIES, "gpn/nodes/gpn2": {"fabric_addr": "192.0.2.22"},
             "steer/in/203.0.113.11/00001234": {"gpn": "gpn2", "tenant": "acme", "tunnel": "hq"}}
    last = rec.reconcile(moved, full=False)
    assert [c[0] for c in nft.calls] == ["apply"]  # no read-back
    cmds = nft.calls[0][1]
    assert any(c.startswith("delete element ip protego_gin spi_in") for c in cmds)
    assert not any(c.startswith("add table") for c in cmds)
    assert last["nft_commands"] == len(cmds)
    nft.calls.clear()
    rec.reconcile(moved, full=False)
    assert nft.calls == []  # nothing to do
    rec.reconcile(moved, full=True)
    assert nft.calls[0] == ("read", "protego_gin")


class AckStore:
    """Records the GIN/GEN's acknowledgements (``lb/applied/<node>``); fails on demand."""

    def __init__(self) -> None:
        import threading

        self.puts: list[tuple[str, bytes]] = []
        self.fail = 0
        self.gate = threading.Event()
        self.gate.set()

    def put(self, key: str, value: bytes) -> None:
        assert self.gate.wait(5)
        if self.fail:
            self.fail -= 1
            from protego.errors import ProtegoError

            raise ProtegoError("etcd unreachable")
        self.puts.append((key, value))


def test_acknowledgements_are_written_aside_and_again_after_a_failure() -> None:
    """The reconcile loop does not wait for the etcd write of its acknowledgement; one
    that failed is written again at the next pass, which the failure wakes."""
    import json
    import time

    from protego.lb.agent import LbAgent

    store = AckStore()
    agent = LbAgent(LbConfig(node="lb1", heartbeat=False), store, FakeNft(), FakeRoutes(set()))  # type: ignore[arg-type]
    try:
        store.gate.clear()  # etcd slow: the first write hangs
        t0 = time.monotonic()
        agent._ack(10)
        agent._ack(11)
        agent._ack(11)  # nothing new
        assert time.monotonic() - t0 < 0.5
        store.gate.set()
        assert agent._ack_writer.flush(5)
        revs = [json.loads(v)["revision"] for k, v in store.puts]
        assert {k for k, _v in store.puts} == {f"{P}lb/applied/lb1"}
        assert revs[-1] == 11 and revs == sorted(revs) and len(revs) <= 2
        agent.view.changed.clear()
        store.fail = 1
        agent._ack(12)
        assert agent._ack_writer.flush(5)
        assert agent.view.changed.is_set() and agent._acked == 0  # woken, to write it again
        agent._ack(12)
        assert agent._ack_writer.flush(5)
        assert json.loads(store.puts[-1][1])["revision"] == 12
    finally:
        agent._ack_writer.stop()


class HealthStore:
    """``gpn/health/`` in memory, out of reach for the first ``fail`` calls."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.data: dict[str, bytes] = {}
        self.calls = 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.fail:
            self.fail -= 1
            from protego.errors import ProtegoError

            raise ProtegoError("etcd unreachable")

    def get(self, key: str) -> Any:
        self._maybe_fail()
        if key not in self.data:
            return None
        from protego.store.etcd import KV

        return KV(key, self.data[key], 1, 1, 0)

    def cas(self, key: str, value: bytes, rev: int) -> bool:
        self._maybe_fail()
        self.data[key] = value
        return True


def test_a_gpn_that_dies_during_an_etcd_outage_is_declared_dead_once_etcd_is_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: the health writer gave up after 5 attempts (~8 s of outage): that GPN was
    never declared dead. Now it writes until written, and a resync re-asserts every
    GPN's state (a write lost anyhow is made again)."""
    import json

    from protego.lb import agent as agent_mod
    from protego.lb import heartbeat as hb
    from protego.lb.agent import LbAgent

    monkeypatch.setattr(agent_mod, "HEALTH_RETRY_MAX_S", 0.01)
    store = HealthStore(fail=40)  # far more failures than the old writer's five attempts
    agent = LbAgent(LbConfig(node="lb1", heartbeat=False), store, FakeNft(), FakeRoutes(set()))  # type: ignore[arg-type]
    assert agent._write_health(hb.Transition("gpn2", "dead", "no answer", 1.0))
    assert store.calls > 40
    assert json.loads(store.data[f"{P}gpn/health/gpn2"])["state"] == "dead"
    # a resync re-asserts what the detector holds
    store.data.clear()

    class Monitor:
        def stats(self) -> dict[str, dict[str, object]]:
            return {"gpn2": {"state": "dead"}, "gpn3": {"state": "unknown"}}

    agent.monitor = Monitor()  # type: ignore[assignment]
    agent._reassert_health()
    tr = agent._health_q.get_nowait()
    assert (tr.gpn, tr.state) == ("gpn2", "dead") and agent._health_q.empty()
    assert agent._write_health(tr) and json.loads(store.data[f"{P}gpn/health/gpn2"])["state"] == "dead"
    agent._health_stop.set()  # a stopping agent gives up
    store.fail = 10**6
    assert not agent._write_health(hb.Transition("gpn3", "dead", "x", 2.0))
