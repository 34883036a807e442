"""The GPN agent's reconcile logic with a fake engine and in-memory views (no etcd)."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest

from protego.control.model import PREFIX
from protego.errors import ConfigError
from protego.gpn import agent as agent_mod
from protego.gpn.agent import GpnAgent, GpnConfig, choose_backend, desired_sas, egress_routes
from protego.gpn.records import GpnSa, parse_sa_record
from protego.store.etcd import KV, Event, EventType
from protego.xfrm.probe import EspProbeResult

KEY = os.urandom(20)


def rec(spi: int, direction: str, gpn: str = "gpn1", tunnel: str = "hq", created: float = 1.0,
        dport: int = 4500) -> dict[str, Any]:
    inbound = direction == "in"
    return {
        "spi": f"{spi:08x}", "vip": "203.0.113.11", "direction": direction, "tenant": "acme", "tunnel": tunnel,
        "vni": 1001, "gpn": gpn, "mode": "tunnel", "encap": True,
        "src": "198.18.1.1" if inbound else "203.0.113.11", "dst": "203.0.113.11" if inbound else "198.18.1.1",
        "sport": 4500, "dport": dport, "suite": "aes128gcm16", "enc_key": base64.b64encode(KEY).decode(),
        "integ_key": "", "esn": False, "replay_window": 32, "local_ts": ["10.1.0.0/24"],
        "remote_ts": ["10.201.0.0/24"], "created": created,
    }


class FakeEngine:
    workers = 2
    pending = False  # (changes not applied yet: the xfrm backend's; never here)

    def __init__(self) -> None:
        self.sas: dict[tuple[str, int], GpnSa] = {}
        self.calls: list[tuple[str, int, bool]] = []
        self.egress: list[Any] = []
        self.hosts: dict[Any, Any] = {}
        self.requests = 0  # as the real engine: every request to the workers counts
        self.sync_error: Exception | None = None
        self.order: list[str] = []  # add / del / sync, as they happened

    def check(self) -> list[int]:
        return []

    def add_sa(self, g: GpnSa, update: bool = False) -> None:
        self.requests += 1
        self.sas[("in" if g.inbound else "out", g.spi)] = g
        self.calls.append(("add", g.spi, update))
        self.order.append("add")

    def remove_sa(self, g: GpnSa) -> None:
        self.requests += 1
        self.sas.pop(("in" if g.inbound else "out", g.spi), None)
        self.calls.append(("del", g.spi, False))
        self.order.append("del")

    def set_egress(self, routes: list[Any]) -> None:
        self.requests += 1
        self.egress = routes

    def set_hosts(self, entries: dict[Any, Any]) -> None:
        self.requests += 1
        self.hosts = entries

    def sync(self) -> None:
        self.order.append("sync")
        if self.sync_error is not None:
            raise self.sync_error


def agent_with(records: dict[int, tuple[int, dict[str, Any]]], registered: int = 10) -> GpnAgent:
    a = GpnAgent(GpnConfig(node="gpn1", fabric_addr="192.0.2.21", manage_vips=False), lambda: None)  # type: ignore[arg-type,return-value]
    a.engine = FakeEngine()  # type: ignore[assignment]
    a.registered_revision = registered
    set_records(a, records)
    a.aux_view.on_snapshot(1, [KV(f"{PREFIX}vnet/1001/10.1.0.10", json.dumps(
        {"mac": "02:00:03:e9:00:01", "vtep": "192.0.2.101"}).encode(), 1, 1, 1)])
    return a


def set_records(a: GpnAgent, records: dict[int, tuple[int, dict[str, Any]]], mod: int | None = None) -> None:
    kvs = [KV(f"{PREFIX}sas/203.0.113.11/{spi:08x}", json.dumps(r).encode(), crev, mod or crev, 1)
           for spi, (crev, r) in records.items()]
    a.sas_view.on_snapshot(100, kvs)


def test_installs_only_its_own_sas_and_new_outbound_ones() -> None:
    a = agent_with({
        0x1001: (5, rec(0x1001, "in")),  # older than our registration: inbound is fine
        0x2001: (6, rec(0x2001, "out")),  # older: may have been used before -> never installed
        0x1002: (11, rec(0x1002, "in")),
        0x2002: (12, rec(0x2002, "out")),
        0x1003: (13, rec(0x1003, "in", gpn="gpn2")),  # another GPN's
    })
    a.reconcile()
    eng: FakeEngine = a.engine  # type: ignore[assignment]
    assert set(eng.sas) == {("in", 0x1001), ("in", 0x1002), ("out", 0x2002)}
    assert f"{PREFIX}sas/203.0.113.11/00002001" in a.burnt
    assert [r.spi for r in eng.egress] == [0x2002]
    assert eng.hosts == {(1001, 0x0A01000A): (bytes.fromhex("020003e90001"), "192.0.2.101")}
    a.reconcile()  # level-triggered: nothing changes the second time
    assert len(eng.calls) == 3


class Clock:
    """Stands in for ``time.monotonic`` in the agent module."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_removed_outbound_sa_is_never_installed_again_and_updates_keep_it(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(agent_mod.time, "monotonic", clock)
    a = agent_with({0x2002: (12, rec(0x2002, "out"))})
    a.reconcile()
    eng: FakeEngine = a.engine  # type: ignore[assignment]
    # a NAT change: same SA, new port -> update (the counter is kept)
    set_records(a, {0x2002: (12, rec(0x2002, "out", dport=4501))}, mod=20)
    a.reconcile()
    assert eng.calls[-1] == ("add", 0x2002, True) and eng.sas[("out", 0x2002)].peer_port == 4501
    set_records(a, {})
    a.reconcile()
    # it lingers: frames already on their way here still go out through it
    assert ("out", 0x2002) in eng.sas and [r.spi for r in eng.egress] == [0x2002]
    clock.now += agent_mod.OUTBOUND_LINGER_S
    a.reconcile()
    assert eng.calls[-1] == ("del", 0x2002, False) and not eng.sas and eng.egress == []
    assert not a.lingering
    set_records(a, {0x2002: (30, rec(0x2002, "out"))})  # back (e.g. moved away and back)
    a.reconcile()
    assert not eng.sas


def test_a_lingering_outbound_sa_gives_way_to_a_new_one(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(agent_mod.time, "monotonic", clock)
    a = agent_with({0x2002: (12, rec(0x2002, "out", created=1.0))})
    a.reconcile()
    eng: FakeEngine = a.engine  # type: ignore[assignment]
    # rekeyed on this GPN: the new outbound SA arrives, then the old record goes
    set_records(a, {0x2002: (12, rec(0x2002, "out", created=1.0)), 0x2003: (14, rec(0x2003, "out", created=2.0))})
    a.reconcile()
    set_records(a, {0x2003: (14, rec(0x2003, "out", created=2.0))})
    a.reconcile()
    assert [r.spi for r in eng.egress] == [0x2003]  # the newest takes the route at once
    assert ("out", 0x2002) in eng.sas  # the old one is still there (unused) until it expires
    clock.now += agent_mod.OUTBOUND_LINGER_S / 2
    a.reconcile()
    assert ("out", 0x2002) in eng.sas
    clock.now += agent_mod.OUTBOUND_LINGER_S / 2
    a.reconcile()
    assert set(eng.sas) == {("out", 0x2003)} and f"{PREFIX}sas/203.0.113.11/00002002" in a.burnt
    # inbound SAs do not linger (charon keeps them for delete_rekeyed_delay itself)
    set_records(a, {0x2003: (14, rec(0x2003, "out", created=2.0)), 0x1003: (15, rec(0x1003, "in"))})
    a.reconcile()
    set_records(a, {0x2003: (14, rec(0x2003, "out", created=2.0))})
    a.reconcile()
    assert eng.calls[-1] == ("del", 0x1003, False)


def test_a_migrated_outbound_sa_stays_while_the_gen_is_still_steered_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A migration away from this GPN: the old outbound SA's record goes (charon deleted
    it) before the GIN/GEN's steering moves to the new GPN (written once that GPN has the
    new SA): the SA and its route stay until the steering names another SA, then
    OUTBOUND_LINGER_S more; OUTBOUND_LINGER_MAX_S at the most."""
    clock = Clock()
    monkeypatch.setattr(agent_mod.time, "monotonic", clock)
    steer_key = f"{PREFIX}steer/out/acme/hq"

    def steer(spi: int, rev: int) -> None:
        a.steer_view.on_snapshot(rev, [KV(steer_key, json.dumps({"gpn": "gpn1", "spi": f"{spi:08x}"}).encode(),
                                          rev, rev, 1)])

    a = agent_with({0x2002: (12, rec(0x2002, "out"))})
    steer(0x2002, 12)
    a.reconcile()
    eng: FakeEngine = a.engine  # type: ignore[assignment]
    set_records(a, {})  # the record went; the new SA (0x2003) is on another GPN
    a.reconcile()
    for _ in range(8):  # 4 x OUTBOUND_LINGER_S: still steered here
        clock.now += agent_mod.OUTBOUND_LINGER_S / 2
        a.reconcile()
        assert ("out", 0x2002) in eng.sas and [r.spi for r in eng.egress] == [0x2002]
    steer(0x2003, 30)  # the switch
    a.reconcile()
    assert ("out", 0x2002) in eng.sas  # frames sent here before the switch still go out
    clock.now += agent_mod.OUTBOUND_LINGER_S * 0.9
    a.reconcile()
    assert ("out", 0x2002) in eng.sas
    clock.now += agent_mod.OUTBOUND_LINGER_S * 0.2
    a.reconcile()
    assert not eng.sas and eng.egress == [] and not a.lingering
    # a steering that never moves: removed after OUTBOUND_LINGER_MAX_S all the same
    set_records(a, {0x2004: (40, rec(0x2004, "out"))}, mod=40)
    steer(0x2004, 40)
    a.reconcile()
    set_records(a, {})
    a.reconcile()
    start = clock.now
    while ("out", 0x2004) in eng.sas:
        clock.now += 0.25
        a.reconcile()
        assert clock.now - start <= agent_mod.OUTBOUND_LINGER_MAX_S + agent_mod.OUTBOUND_LINGER_S + 0.5
    assert clock.now - start >= agent_mod.OUTBOUND_LINGER_MAX_S


def test_invalid_records_are_refused_one_by_one() -> None:
    bad = rec(0x1009, "in")
    bad["suite"] = "des"
    a = agent_with({0x1001: (11, rec(0x1001, "in")), 0x1009: (12, bad)})
    a.reconcile()
    assert set(a.engine.sas) == {("in", 0x1001)}  # type: ignore[union-attr]
    assert a.refused.keys() == {f"{PREFIX}sas/203.0.113.11/00001009"}
    assert KEY.hex() not in json.dumps(a.refused.report())


def test_egress_uses_steered_spi_else_newest() -> None:
    old = parse_sa_record(rec(0x2001, "out", created=1.0))
    new = parse_sa_record(rec(0x2002, "out", created=2.0))
    other = parse_sa_record(rec(0x2003, "out", tunnel="branch", created=1.0))
    inbound = parse_sa_record(rec(0x1001, "in"))
    routes = egress_routes([old, new, other, inbound], {})
    assert sorted(r.spi for r in routes) == [0x2002, 0x2003]
    routes = egress_routes([old, new, other], {("acme", "hq"): "00002001"})
    assert sorted(r.spi for r in routes) == [0x2001, 0x2003]


def test_desired_sas_filters_by_node() -> None:
    ok, bad = desired_sas({"k1": (1, 1, rec(0x1001, "in")), "k2": (1, 1, rec(0x1002, "in", gpn="gpn2")),
                           "k3": (1, 1, "junk")}, "gpn1")
    assert list(ok) == ["k1"] and not bad


def test_backend_choice() -> None:
    no_esp = EspProbeResult(False, "userspace", "no ESP here")
    has_esp = EspProbeResult(True, "xfrm", "ESP works")
    assert choose_backend("userspace", lambda: pytest.fail("no probe needed")) == "userspace"
    assert choose_backend("auto", lambda: no_esp) == "userspace"
    assert choose_backend("auto", lambda: has_esp) == "xfrm"
    with pytest.raises(ConfigError, match="cannot do ESP .no ESP here.; use --backend userspace"):
        choose_backend("xfrm", lambda: no_esp)
    assert choose_backend("xfrm", lambda: has_esp) == "xfrm"


def test_cli_group_and_options() -> None:
    from click.testing import CliRunner

    from protego.gpn.cli import gpn

    res = CliRunner().invoke(gpn, ["run", "--help"])
    assert res.exit_code == 0
    for opt in ("--node", "--fabric-addr", "--backend", "--workers", "--seal-key-file"):
        assert opt in res.output


class FakeEtcd:
    def __init__(self, present: set[str]) -> None:
        self.present = present
        self.data: dict[str, Any] = {}

    def txn(self, compares: list[Any], ops: list[Any]) -> Any:
        ok = all(c.key in self.present for c in compares)
        if ok:
            for op in ops:
                self.data[op.key] = json.loads(op.value)

        class R:
            succeeded = ok
        return R()

    def put_json(self, key: str, obj: Any, lease: Any = None) -> int:
        self.data[key] = obj
        return 1


def test_report_writes_counters_only_for_existing_records() -> None:
    from protego.gpn.engine import EngineStats

    a = agent_with({0x1001: (11, rec(0x1001, "in")), 0x2002: (12, rec(0x2002, "out"))})
    a.reconcile()
    k_in, k_out = (f"{PREFIX}sas/203.0.113.11/{s:08x}" for s in (0x1001, 0x2002))
    etcd = FakeEtcd({k_in})  # the outbound record was just deleted by the GMN
    a.etcd = etcd  # type: ignore[assignment]
    a.engine.stats = lambda: EngineStats(  # type: ignore[union-attr,method-assign]
        sas={("in", 0x1001): (5, 500, 1700000000.0), ("out", 0x2002): (7, 700, 1700000001.0)},
        rekey={("out", 0x2002)}, drops={"replayed": 2}, counters={"esp_in": 5}, pids=[])
    a.report()
    assert etcd.data[f"{PREFIX}sastats/203.0.113.11/00001001"] == {
        "bytes": 500, "packets": 5, "last_use": 1700000000.0, "ts": etcd.data[f"{PREFIX}sastats/203.0.113.11/00001001"]["ts"]}
    assert f"{PREFIX}sastats/203.0.113.11/00002002" not in etcd.data  # no orphan
    etcd.present.add(k_out)
    a._stats_sent.clear()
    a.report()
    assert etcd.data[f"{PREFIX}sastats/203.0.113.11/00002002"]["rekey_requested"] is True
    load = etcd.data[f"{PREFIX}gpn/load/gpn1"]
    assert load["drops"] == {"replayed": 2} and load["counters"] == {"esp_in": 5} and load["sas"] == 2


def test_record_vips_every_tunnel_well_formed_only() -> None:
    from protego.gpn.agent import record_vips

    keys = [f"{PREFIX}sas/203.0.113.11/0000abcd", f"{PREFIX}sas/203.0.113.12/00001234",
            f"{PREFIX}sas/203.0.113.11/00005678", f"{PREFIX}sas/not-an-ip/00000001",
            f"{PREFIX}sas/203.0.113.13", f"{PREFIX}sas/203.0.113.14/1/2"]
    assert record_vips(keys) == {"203.0.113.11", "203.0.113.12"}
    assert record_vips([]) == set()


def test_ack_claims_only_the_revisions_the_pass_applied() -> None:
    """A watch delivers a new SA while a reconcile pass runs: the pass must acknowledge
    the revisions it read, not the views' revisions when it ends (the GMN releases
    charon on that acknowledgement, and the peer then sends on the SA)."""
    a = agent_with({0x1001: (11, rec(0x1001, "in"))})
    a.steer_view.on_snapshot(100, [])
    acks: list[tuple[int, int]] = []
    a._ack = lambda revision, sas_rev, state=None: acks.append((revision, sas_rev))  # type: ignore[method-assignment]
    eng: FakeEngine = a.engine  # type: ignore[assignment]
    real_add = eng.add_sa

    def add_and_deliver(g: GpnSa, update: bool = False) -> None:
        real_add(g, update)
        if g.spi == 0x1001:  # meanwhile, the next transaction (revision 101) arrives
            new = KV(f"{PREFIX}sas/203.0.113.11/00001002", json.dumps(rec(0x1002, "in")).encode(), 101, 101, 1)
            a.sas_view.on_events([Event(EventType.PUT, new)])
            a.steer_view.on_events([Event(EventType.PUT, KV(f"{PREFIX}steer/in/203.0.113.11/00001002", b"{}",
                                                             101, 101, 1))])

    eng.add_sa = add_and_deliver  # type: ignore[method-assignment]
    a.reconcile()
    assert ("in", 0x1002) not in eng.sas  # not in this pass
    assert acks[-1] == (100, 100)  # not 101: that SA is not installed yet
    a.reconcile()
    assert ("in", 0x1002) in eng.sas and acks[-1] == (101, 101)


def test_a_pass_that_changed_the_workers_acknowledges_only_after_their_barrier() -> None:
    """The engine's requests reach its workers through pipes: the acknowledgement (upon
    which the GMN lets the peer use the SA) waits until every worker carried them out;
    a failed barrier acknowledges nothing; a pass that changed nothing needs none."""
    from protego.errors import DataplaneError

    a = agent_with({0x1001: (11, rec(0x1001, "in"))})
    a.steer_view.on_snapshot(100, [])
    eng: FakeEngine = a.engine  # type: ignore[assignment]
    acks: list[tuple[int, int]] = []
    a._ack = lambda revision, sas_rev, state=None: (acks.append((revision, sas_rev)),  # type: ignore[method-assignment]
                                        eng.order.append("ack"))
    a.reconcile()
    assert eng.order.index("add") < eng.order.index("sync") < eng.order.index("ack")
    eng.order.clear()
    a.reconcile()  # nothing new: no request, no barrier (the ack itself is idempotent)
    assert eng.order == ["ack"]
    eng.sync_error = DataplaneError("GPN worker 1 did not answer a barrier within 1.0 s")
    new = KV(f"{PREFIX}sas/203.0.113.11/00001002", json.dumps(rec(0x1002, "in")).encode(), 101, 101, 1)
    a.sas_view.on_events([Event(EventType.PUT, new)])
    a.steer_view.on_events([Event(EventType.PUT, KV(f"{PREFIX}steer/in/203.0.113.11/00001002", b"{}", 101, 101, 1))])
    acks.clear()
    a.reconcile()
    assert ("in", 0x1002) in eng.sas and acks == []  # installed, but not claimed
    # the xfrm backend keeps a failed pass's changes pending: the next pass, with nothing
    # new to request, applies them again before it acknowledges anything
    eng.pending = True
    eng.order.clear()
    a.reconcile()
    assert eng.order == ["sync"] and acks == []
    eng.sync_error, eng.pending = None, False
    a.reconcile()  # the state the failed pass left is what gets acknowledged now (it changed)
    assert eng.order[-1] == "ack" and acks


class AckEtcd:
    """Records the acknowledgements a GPN agent writes (``gpn/applied/<gpn>``)."""

    def __init__(self) -> None:
        self.acks: list[tuple[int, int]] = []

    def put_json(self, key: str, value: dict[str, Any], lease: Any = None) -> int:
        if key == f"{PREFIX}gpn/nodes/gpn1":  # a registration
            return 200
        assert key == f"{PREFIX}gpn/applied/gpn1"
        self.acks.append((value["revision"], value["sas_revision"]))
        return 0


def settled(a: GpnAgent) -> None:
    """One pass, and its acknowledgement written (the agent writes it aside)."""
    a.reconcile()
    assert a._ack_writer.flush(2.0)


def test_passes_that_change_nothing_of_this_gpn_write_no_acknowledgement() -> None:
    """The GMN waits for a GPN only on transactions that change that GPN's SA records:
    another GPN's SA or steering costs no write here, a pass that changes one of ours
    is acknowledged, and so is the pass that completes an acknowledgement whose steering
    view lagged (the GMN waits for both views to reach an inbound SA's transaction)."""
    a = agent_with({0x1001: (11, rec(0x1001, "in"))})
    a.steer_view.on_snapshot(100, [])
    etcd = AckEtcd()
    a.etcd, a._lease = etcd, object()  # type: ignore[assignment]
    settled(a)
    assert etcd.acks == [(100, 100)]
    # another GPN's inbound SA and its steering (one transaction, 101): nothing here
    other = KV(f"{PREFIX}sas/203.0.113.11/00003001", json.dumps(rec(0x3001, "in", gpn="gpn2")).encode(),
               101, 101, 1)
    a.sas_view.on_events([Event(EventType.PUT, other)])
    settled(a)
    a.steer_view.on_events([Event(EventType.PUT, KV(f"{PREFIX}steer/in/203.0.113.11/00003001", b"{}",
                                                     101, 101, 1))])
    settled(a)
    assert etcd.acks == [(100, 100)]
    # our own inbound SA (102), its SA view first: acknowledged at once (sas_revision),
    # then again when the steering view reaches 102 too
    ours = KV(f"{PREFIX}sas/203.0.113.11/00001002", json.dumps(rec(0x1002, "in")).encode(), 102, 102, 1)
    a.sas_view.on_events([Event(EventType.PUT, ours)])
    settled(a)
    assert etcd.acks[-1] == (101, 102)
    a.steer_view.on_events([Event(EventType.PUT, KV(f"{PREFIX}steer/in/203.0.113.11/00001002", b"{}",
                                                     102, 102, 1))])
    settled(a)
    assert etcd.acks[-1] == (102, 102) and len(etcd.acks) == 3
    a.reconcile()  # level-triggered: nothing new
    assert len(etcd.acks) == 3
    # the other GPN's SA goes (103): nothing here; ours goes (104): acknowledged
    a.sas_view.on_events([Event(EventType.DELETE, KV(other.key, b"", 0, 103, 0))])
    settled(a)
    assert len(etcd.acks) == 3
    a.sas_view.on_events([Event(EventType.DELETE, KV(ours.key, b"", 0, 104, 0))])
    settled(a)
    assert etcd.acks[-1] == (102, 104) and len(etcd.acks) == 4
    # a new registration (the lease, and the acknowledgement with it, went): written again
    a._register()
    settled(a)
    assert etcd.acks[-1] == (102, 104) and len(etcd.acks) == 5
