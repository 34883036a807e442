"""The GMN agent's pure parts: placement, charon connections, SA records."""

from __future__ import annotations

from typing import Any

import base64
import ipaddress

import pytest

from protego.control.model import Tenant, Tunnel
from protego.errors import ConfigError
from protego.gmn import plugin_protocol as pp
from protego.gmn.connections import (
    conn_name,
    connection,
    desired_connections,
    fingerprint,
    secret_id,
    split_conn_name,
)
from protego.gmn.placement import GpnView, NoGpnError, choose_gpn
from protego.gmn.records import (
    ENCR_AES_CBC,
    ENCR_AES_GCM_ICV16,
    AUTH_HMAC_SHA1_96,
    AUTH_HMAC_SHA2_256_128,
    find_owner,
    sa_record,
    suite_name,
)

ACME = Tenant("acme", 1001, "10.1.0.0/24", "203.0.113.11")
GLOBEX = Tenant("globex", 1002, "10.1.0.0/24", "203.0.113.12")
HQ = Tunnel(tenant="acme", name="hq", remote_addrs="198.18.1.1", remote_ts=("10.201.0.0/24",))
BRANCH = Tunnel(tenant="acme", name="branch", remote_addrs="198.18.1.1", remote_ts=("10.202.0.0/24",))
GHQ = Tunnel(tenant="globex", name="hq", remote_addrs="198.18.2.1", remote_ts=("10.201.0.0/24",))


def full_record(spi: str, **fields: Any) -> dict[str, Any]:
    """An SA record with every field the GMN reads (``fields`` override them)."""
    return {"spi": spi, "vip": "203.0.113.11", "direction": "in", "tenant": "acme", "tunnel": "hq", "gpn": "gpn1",
            "src": "198.18.1.1", "dst": "203.0.113.11", "created": 1.0, "local_ts": ["10.1.0.0/24"], **fields}


def _record_parsing(a: Any) -> None:
    """What GmnAgent's record readers (_parsed: tenants, tunnels, SA records) need."""
    import threading as _threading

    from protego.store.refused import RefusedPublisher, RefusedRecords

    a._parse_lock = _threading.Lock()
    a._parse_cache = {}
    a.refused = RefusedRecords("gmn", "gmn1")
    a._refused_pub = RefusedPublisher(a.refused, lambda _key, _report: None)



# ------------------------------------------------------------------ placement

def views(**kw: tuple[bool, bool, int]) -> dict[str, GpnView]:
    return {n: GpnView(n, r, h, t) for n, (r, h, t) in kw.items()}


def test_placement_prefers_pin_then_current_then_least_loaded() -> None:
    g = views(gpn1=(True, True, 5), gpn2=(True, True, 1), gpn3=(True, True, 1))
    assert choose_gpn(g, current="gpn1", pinned="gpn3") == "gpn3"
    assert choose_gpn(g, current="gpn1") == "gpn1"  # rekeys stay put
    assert choose_gpn(g) == "gpn2"  # fewest tunnels, then name


def test_placement_skips_dead_and_unregistered() -> None:
    g = views(gpn1=(True, False, 0), gpn2=(False, True, 0), gpn3=(True, True, 9))
    assert choose_gpn(g, current="gpn1", pinned="gpn2") == "gpn3"
    with pytest.raises(NoGpnError):
        choose_gpn(views(gpn1=(True, False, 0)))


# ------------------------------------------------------------------ connections

def test_connection_names_round_trip() -> None:
    assert conn_name("acme", "hq-1") == "acme_hq-1"
    assert split_conn_name("acme_hq-1") == ("acme", "hq-1")
    assert split_conn_name("acme-hq") is None and split_conn_name("a_b_c") is None
    assert secret_id("acme", "hq") == "protego-psk-acme_hq"


def test_connection_is_a_responder_with_the_tunnels_terms() -> None:
    c = connection(ACME, HQ)
    assert c["local_addrs"] == ["203.0.113.11"] and c["remote_addrs"] == ["198.18.1.1"]
    assert c["local-1"] == {"auth": "psk", "id": "203.0.113.11"}
    assert c["remote-1"] == {"auth": "psk", "id": "198.18.1.1"}
    child = c["children"]["acme_hq"]
    assert child["local_ts"] == ["10.1.0.0/24"] and child["remote_ts"] == ["10.201.0.0/24"]
    assert child["start_action"] == "none" and child["esp_proposals"] == ["aes128gcm16"]
    assert child["life_time"] == str(HQ.effective_life_time())
    assert "psk" not in str(c).replace("'auth': 'psk'", "")  # no secret in the connection


def test_desired_connections_leave_out_what_is_incomplete() -> None:
    secrets = {("acme", "hq"), ("globex", "hq")}
    d = desired_connections([ACME], [HQ, BRANCH, GHQ], secrets)
    assert set(d) == {"acme_hq"}  # branch has no PSK yet; globex's tenant is unknown
    body, owners = d["acme_hq"]
    assert owners == ["203.0.113.11", "198.18.1.1"]
    assert fingerprint(body, owners) != fingerprint(connection(ACME, BRANCH), owners)


# ------------------------------------------------------------------ records

def test_suite_names() -> None:
    assert suite_name(ENCR_AES_GCM_ICV16, 0, 20) == "aes128gcm16"
    assert suite_name(ENCR_AES_GCM_ICV16, 0, 36) == "aes256gcm16"
    assert suite_name(ENCR_AES_CBC, AUTH_HMAC_SHA2_256_128, 32) == "aes256-sha256"
    assert suite_name(ENCR_AES_CBC, AUTH_HMAC_SHA1_96, 16) == "aes128-sha1"
    with pytest.raises(ConfigError):
        suite_name(ENCR_AES_GCM_ICV16, 0, 28)  # AES-192
    with pytest.raises(ConfigError):
        suite_name(3, 0, 24)  # 3DES


def add_sa(inbound: bool, src: str, dst: str, spi: int = 0xC0000001, src_ts: str = "10.201.0.0/24",
           dst_ts: str = "10.1.0.0/24") -> pp.AddSa:
    flags = pp.SaFlag.ENCAP | (pp.SaFlag.INBOUND if inbound else pp.SaFlag.NONE)
    return pp.AddSa(
        src=pp.Host.parse(src, 4500), dst=pp.Host.parse(dst, 4500), spi=spi, reqid=7, mode=pp.Mode.TUNNEL,
        src_ts=(pp.TrafficSelector.from_network(src_ts),), dst_ts=(pp.TrafficSelector.from_network(dst_ts),),
        enc_alg=ENCR_AES_GCM_ICV16, flags=flags, replay_window=32,
        lifetime=pp.Lifetime(time_rekey=3600, time_life=3960), enc_key=pp.Secret(bytes(range(20))),
    )


def test_find_owner_by_vip_peer_and_selectors() -> None:
    tenants, tunnels = [ACME, GLOBEX], [HQ, BRANCH, GHQ]
    inbound = add_sa(True, "198.18.1.1", "203.0.113.11")
    assert find_owner(inbound, tenants, tunnels).tunnel == HQ  # type: ignore[union-attr]
    # same peer, other selectors: the branch tunnel
    other = add_sa(True, "198.18.1.1", "203.0.113.11", src_ts="10.202.0.0/24")
    assert find_owner(other, tenants, tunnels).tunnel == BRANCH  # type: ignore[union-attr]
    # outbound: the VIP is the source
    out = add_sa(False, "203.0.113.12", "198.18.2.1", src_ts="10.1.0.0/24", dst_ts="10.201.0.0/24")
    owner = find_owner(out, tenants, tunnels)
    assert owner is not None and owner.tenant == GLOBEX and owner.tunnel == GHQ
    assert find_owner(add_sa(True, "198.18.9.9", "203.0.113.11"), tenants, tunnels) is None
    assert find_owner(add_sa(True, "198.18.1.1", "203.0.113.99"), tenants, tunnels) is None


def test_sa_record() -> None:
    sa = add_sa(True, "198.18.1.1", "203.0.113.11")
    owner = find_owner(sa, [ACME], [HQ])
    assert owner is not None
    rec = sa_record(sa, owner, "gpn2", "gmn1")
    assert rec["spi"] == "c0000001" and rec["direction"] == "in" and rec["gpn"] == "gpn2"
    assert rec["suite"] == "aes128gcm16" and rec["encap"] is True and rec["dport"] == 4500
    assert base64.b64decode(rec["enc_key"]) == bytes(range(20))
    assert rec["local_ts"] == ["10.1.0.0/24"] and rec["remote_ts"] == ["10.201.0.0/24"]
    assert rec["vni"] == 1001 and ipaddress.ip_address(rec["vip"]) == ipaddress.ip_address("203.0.113.11")
    assert rec["lifetimes"]["time_rekey"] == 3600
    assert "Secret" not in repr(sa.enc_key) and "00010203" not in repr(sa)


# ------------------------------------------------------------------ catching up with our own writes


def _catch_up_agent(apply_timeout: float):  # type: ignore[no-untyped-def]
    """Only what GmnAgent._catch_up touches: the view, its condition, our last write."""
    import threading
    from types import SimpleNamespace

    from protego.gmn.agent import GmnAgent
    from protego.store.view import PrefixView

    a = GmnAgent.__new__(GmnAgent)
    _record_parsing(a)
    a._applied = threading.Condition()
    a.view = PrefixView(on_change=lambda: a._on_view_change())
    a._wake = threading.Event()
    a.cfg = SimpleNamespace(apply_timeout=apply_timeout)
    a._own_rev = 0
    a._deleting = set()
    return a


def test_catch_up_waits_for_the_view_to_hold_our_own_write() -> None:
    import threading
    import time

    agent = _catch_up_agent(5.0)
    agent.view.on_snapshot(10, [])
    agent._own_rev = 12  # our transaction, not yet delivered by the watch
    t0 = time.monotonic()
    threading.Timer(0.15, lambda: agent.view.on_snapshot(12, [])).start()
    agent._catch_up()
    waited = time.monotonic() - t0
    assert agent.view.revision == 12 and 0.1 <= waited < 2.0
    t0 = time.monotonic()
    agent._catch_up()  # up to date: returns at once
    assert time.monotonic() - t0 < 0.05


def test_catch_up_gives_up_after_the_apply_timeout(caplog: pytest.LogCaptureFixture) -> None:
    import time

    agent = _catch_up_agent(0.2)
    agent.view.on_snapshot(10, [])
    agent._own_rev = 11
    t0 = time.monotonic()
    agent._catch_up()
    assert 0.15 <= time.monotonic() - t0 < 2.0
    assert "not yet at our own write 11" in caplog.text


def test_repair_steering_points_a_dangling_outbound_steering_at_the_newest_sa() -> None:
    """A GMN that stopped between a make-before-break SA and its steering leaves
    ``steer/out`` naming an SA that charon deleted: the GMN that takes over steers the
    tunnel to its newest outbound SA. A tunnel whose switch is pending (or deferred), or
    whose steering names an existing SA, is left alone."""
    import json
    import threading

    from protego.control.model import PREFIX, tenant_key, tunnel_key
    from protego.gmn.agent import _State
    from protego.store.etcd import KV, PutOp

    a = _catch_up_agent(1.0)
    a._sa_lock = threading.Lock()
    a.state = _State()
    txns: list[list[object]] = []
    a._sa_txn = lambda ops: (txns.append(ops), 1)[1]  # type: ignore[method-assign]

    def sa(spi: str, gpn: str, created: float, tunnel: str = "hq") -> tuple[str, dict[str, object]]:
        return (f"{PREFIX}sas/203.0.113.11/{spi}", {"tenant": "acme", "tunnel": tunnel, "spi": spi, "gpn": gpn,
                                                   "direction": "out", "created": created,
                                                   "local_ts": ["10.1.0.0/24"], "vip": "203.0.113.11",
                                                   "src": "203.0.113.11", "dst": "198.18.1.1"})

    def load(steer: dict[str, str], records: list[tuple[str, dict[str, object]]]) -> None:
        kvs = [KV(tenant_key("acme"), json.dumps(ACME.to_json()).encode(), 1, 1, 1),
               KV(tunnel_key("acme", "hq"), json.dumps(HQ.to_json()).encode(), 1, 1, 1),
               KV(tunnel_key("acme", "branch"), json.dumps(BRANCH.to_json()).encode(), 1, 1, 1)]
        kvs += [KV(k, json.dumps(r).encode(), 2, 2, 1) for k, r in records]
        kvs += [KV(f"{PREFIX}steer/out/acme/{tun}", json.dumps({"gpn": "gpn1", "spi": spi}).encode(), 3, 3, 1)
                for tun, spi in steer.items()]
        a.view.on_snapshot(10, kvs)

    # hq names c0000001, which has no record; its SAs: c0000002 (gpn2), c0000003 (gpn2, newest)
    load({"hq": "c0000001", "branch": "c0000009"},
         [sa("c0000002", "gpn2", 100.0), sa("c0000003", "gpn2", 200.0), sa("c0000009", "gpn1", 50.0, "branch")])
    a.state.steer_pending[("acme", "hq")] = 0xC0000003  # this GMN's own switch is under way
    a._repair_steering()
    assert txns == []
    a.state.steer_pending.clear()
    a._repair_steering()
    assert len(txns) == 1 and isinstance(txns[0][0], PutOp)
    put = txns[0][0]
    assert put.key == f"{PREFIX}steer/out/acme/hq"
    assert {k: json.loads(put.value)[k] for k in ("gpn", "spi")} == {"gpn": "gpn2", "spi": "c0000003"}


def test_a_deferred_outbound_switch_counts_from_our_response_not_from_the_sa(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer's rekey we answered: the switch to the new outbound SA waits for the peer's
    DELETE, or DEFER_SWITCH_S after charon's child-rekey event (our response sent), never
    DEFER_SWITCH_S after the SA was placed: a loaded charon answered 2.8 s after that in
    the lane, and a switch then lost the tenant's packets until the peer had the SA."""
    import json
    import threading

    from protego.control.model import PREFIX, tenant_key, tunnel_key
    from protego.gmn import agent as agent_mod
    from protego.gmn.agent import _State
    from protego.store.etcd import KV, PutOp

    now = [1000.0]
    monkeypatch.setattr(agent_mod.time, "monotonic", lambda: now[0])
    a = _catch_up_agent(1.0)
    a._sa_lock = threading.Lock()
    a.state = _State()
    txns: list[list[object]] = []
    a._sa_txn = lambda ops: (txns.append(ops), 1)[1]  # type: ignore[method-assign]

    def sa(spi: str, created: float) -> KV:
        return KV(f"{PREFIX}sas/203.0.113.11/{spi}",
                  json.dumps({"tenant": "acme", "tunnel": "hq", "spi": spi, "gpn": "gpn1", "direction": "out",
                              "created": created, "local_ts": ["10.1.0.0/24"], "vip": "203.0.113.11",
                                                   "src": "203.0.113.11", "dst": "198.18.1.1"}).encode(),
                  2, 2, 1)

    a.view.on_snapshot(10, [KV(tenant_key("acme"), json.dumps(ACME.to_json()).encode(), 1, 1, 1),
                            KV(tunnel_key("acme", "hq"), json.dumps(HQ.to_json()).encode(), 1, 1, 1),
                            sa("c0000001", 100.0), sa("c0000002", 200.0),
                            KV(f"{PREFIX}steer/out/acme/hq",
                               json.dumps({"gpn": "gpn1", "spi": "c0000001"}).encode(), 3, 3, 1)])
    a.state.deferred[("acme", "hq")] = (now[0], False)  # the new SA c0000002 placed
    now[0] += agent_mod.DEFER_SWITCH_S + 0.8  # charon has not answered yet
    a._switch_deferred()
    assert txns == [] and ("acme", "hq") in a.state.deferred
    a._rekey_answered(("acme", "hq"))  # child-rekey: the response is on its way
    a._rekey_answered(("acme", "branch"))  # not deferred: nothing to do
    assert set(a.state.deferred) == {("acme", "hq")}
    now[0] += agent_mod.DEFER_SWITCH_S - 0.1
    a._switch_deferred()
    assert txns == []
    now[0] += 0.2
    a._switch_deferred()
    assert len(txns) == 1 and isinstance(txns[0][0], PutOp) and txns[0][0].key == f"{PREFIX}steer/out/acme/hq"
    assert json.loads(txns[0][0].value)["spi"] == "c0000002"
    assert a.state.deferred == {}
    # were the event missed, the switch would come DEFER_UNANSWERED_S after the SA
    txns.clear()
    a.state.deferred[("acme", "hq")] = (now[0], False)
    now[0] += agent_mod.DEFER_UNANSWERED_S - 0.1
    a._switch_deferred()
    assert txns == []
    now[0] += 0.2
    a._switch_deferred()
    assert len(txns) == 1 and a.state.deferred == {}


def test_a_deferred_switch_survives_the_delete_of_an_older_sa_and_follows_the_replaced_one() -> None:
    """libreswan keeps two generations of CHILD_SAs: its rekey of #50 deletes #49, not
    #50. That DELETE (of an outbound SA the tunnel is not steered to) once cancelled the
    deferred switch without switching; the switch must wait for the SA being replaced."""
    import json
    import threading

    from protego.control.model import PREFIX, tenant_key, tunnel_key
    from protego.gmn.agent import _State
    from protego.store.etcd import KV

    a = _catch_up_agent(1.0)
    a._sa_lock = threading.Lock()
    a.state = _State()

    def sa(spi: str, created: float) -> tuple[str, dict[str, object]]:
        return (f"{PREFIX}sas/203.0.113.11/{spi}", full_record(spi, direction="out", created=created,
                                                              src="203.0.113.11", dst="198.18.1.1"))

    older, steered, new = sa("c0000049", 49.0), sa("c0000050", 50.0), sa("c0000051", 51.0)
    a.view.on_snapshot(10, [KV(tenant_key("acme"), json.dumps(ACME.to_json()).encode(), 1, 1, 1),
                            KV(tunnel_key("acme", "hq"), json.dumps(HQ.to_json()).encode(), 1, 1, 1),
                            *(KV(k, json.dumps(r).encode(), 2, 2, 1) for k, r in (older, steered, new)),
                            KV(f"{PREFIX}steer/out/acme/hq",
                               json.dumps({"gpn": "gpn1", "spi": "c0000050"}).encode(), 3, 3, 1)])
    a.state.deferred[("acme", "hq")] = (1000.0, True)
    assert a._repoint_outbound(older[1], exclude=older[0]) == []
    assert ("acme", "hq") in a.state.deferred  # still waiting for #50's DELETE
    ops = a._repoint_outbound(steered[1], exclude=steered[0])
    assert json.loads(ops[0].value)["spi"] == "c0000051" and a.state.deferred == {}


def test_a_recovery_rekey_that_lands_nothing_is_asked_again_soon(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A tunnel on a dead GPN is rekeyed once; asked again after RECOVERY_REASK_S if not
    one SA of it landed meanwhile (charon dropped the rekey), after RECOVERY_RETRY_S
    otherwise (the rekey is under way)."""
    import json
    import time
    from types import SimpleNamespace

    from protego.control.model import PREFIX
    from protego.gmn import agent as agent_mod
    from protego.gmn.agent import _State
    from protego.store.etcd import KV

    rekeys: list[str] = []

    class FakeVici:
        def __init__(self, _sock: str) -> None:
            pass

        def __enter__(self) -> "FakeVici":
            return self

        def __exit__(self, *_exc: object) -> None:
            pass

        def list_sas(self) -> list[dict[str, object]]:
            return [{"ike": "acme_hq", "child_state": "INSTALLED", "child_id": 7}]

        def rekey_child(self, child_id: object) -> None:
            rekeys.append(str(child_id))

    monkeypatch.setattr(agent_mod, "ViciClient", FakeVici)
    a = _catch_up_agent(1.0)
    a.state = _State()
    a.cfg = SimpleNamespace(vici_socket="unused", node="gmn1")  # type: ignore[assignment]
    a._event = lambda *args, **kw: None  # type: ignore[method-assign]
    a.gpn_views = lambda: {"gpn1": GpnView("gpn1", True, False), "gpn2": GpnView("gpn2", True, True)}  # type: ignore[method-assign]

    def load(sas: list[dict[str, object]]) -> None:
        kvs = [KV(f"{PREFIX}placement/acme/hq", json.dumps({"gpn": "gpn1"}).encode(), 1, 1, 1)]
        kvs += [KV(f"{PREFIX}sas/203.0.113.11/{i:08x}", json.dumps(full_record(f"{i:08x}", **r)).encode(), 2, 2, 1)
                for i, r in enumerate(sas)]
        a.view.on_snapshot(10, kvs)

    old = {"tenant": "acme", "tunnel": "hq", "direction": "in", "gpn": "gpn1", "created": time.time() - 60}
    load([old])
    a._recover_failed_gpns()
    assert rekeys == ["7"]
    a._recover_failed_gpns()  # at once: not again
    assert rekeys == ["7"]
    # RECOVERY_REASK_S later, nothing landed: asked again, and said so
    a.state.rekey_asked[("acme", "hq")] -= agent_mod.RECOVERY_REASK_S + 0.1
    with caplog.at_level("WARNING"):
        a._recover_failed_gpns()
    assert rekeys == ["7", "7"] and "no SA of its recovery rekey landed" in caplog.text
    # the rekey's inbound SA landed (its outbound SA, and the placement, still to come)
    load([old, {"tenant": "acme", "tunnel": "hq", "direction": "in", "gpn": "gpn2", "created": time.time()}])
    a.state.rekey_asked[("acme", "hq")] -= agent_mod.RECOVERY_REASK_S + 0.1
    a._recover_failed_gpns()
    assert rekeys == ["7", "7"]
    a.state.rekey_asked[("acme", "hq")] -= agent_mod.RECOVERY_RETRY_S
    a._recover_failed_gpns()
    assert rekeys == ["7", "7", "7"]


def test_record_reconciliation_leaves_sas_that_charon_s_own_call_is_placing() -> None:
    """An SA charon installed a moment ago is still being placed by charon's own call
    (its transaction may be in flight): the periodic reconciliation neither writes a
    record for it (that raced the call, and placed a recovered tunnel's outbound SA on
    the dead GPN again) nor takes its existing record for one of an SA charon no longer
    holds. Once settled, an SA without a record gets one and a record without an SA goes."""
    import json
    import threading
    import time
    from types import SimpleNamespace

    from protego.control.model import PREFIX
    from protego.gmn import agent as agent_mod
    from protego.gmn.agent import _State
    from protego.gmn.plugin_server import SaRecord
    from protego.store.etcd import KV

    def sa(spi: int) -> pp.AddSa:
        return pp.AddSa(src=pp.Host.parse("198.18.1.1"), dst=pp.Host.parse("203.0.113.11"), spi=spi, reqid=1,
                        mode=1, enc_alg=20, flags=0)

    now = time.monotonic()
    old = now - agent_mod.RECORD_GRACE_S - 1
    held = {sa(0xC0000001).key: SaRecord(sa(0xC0000001), now),   # young, no record yet: charon's call places it
            sa(0xC0000002).key: SaRecord(sa(0xC0000002), now),   # young, its record just landed
            sa(0xC0000003).key: SaRecord(sa(0xC0000003), old)}   # settled, no record: repaired
    a = _catch_up_agent(1.0)
    a.state = _State()
    a.state.leader = True
    a._active_since = None
    a.cfg = SimpleNamespace(node="gmn1")  # type: ignore[assignment]
    a.server = SimpleNamespace(connected=True, _lock=threading.Lock(), sas=held)  # type: ignore[assignment]
    rec = full_record("c0000002", dst="203.0.113.11", gmn="gmn1")
    gone = full_record("c0000009", dst="203.0.113.11", gmn="gmn1")  # charon does not hold it
    a.view.on_snapshot(10, [KV(f"{PREFIX}sas/203.0.113.11/c0000002", json.dumps(rec).encode(), 2, 2, 1),
                            KV(f"{PREFIX}sas/203.0.113.11/c0000009", json.dumps(gone).encode(), 2, 2, 1)])
    added: list[int] = []
    deleted: list[int] = []
    a._add_sa = lambda s: added.append(s.spi)  # type: ignore[method-assign]
    a._del_sa = lambda spi, dst: deleted.append(spi)  # type: ignore[method-assign]
    a._reconcile_records()
    assert added == [0xC0000003] and deleted == [0xC0000009]


def test_sas_installed_while_no_gpn_is_usable_are_placed_once_one_is() -> None:
    """Every GPN restarting (the GIN declares them dead meanwhile): charon's add_sa of a
    rekey's inbound SA finds no usable GPN. charon uses the SA anyway, so it is placed as
    soon as a GPN is usable again, inbound first, not at the next full pass (up to 40 s
    of a tunnel unreachable, seen in CI); an SA charon deleted meanwhile is forgotten."""
    import threading
    from types import SimpleNamespace

    from protego.gmn.agent import _State
    from protego.gmn.placement import NoGpnError
    from protego.gmn.plugin_server import SaRecord

    def sa(spi: int, inbound: bool) -> pp.AddSa:
        src, dst = ("198.18.1.1", "203.0.113.11") if inbound else ("203.0.113.11", "198.18.1.1")
        return pp.AddSa(src=pp.Host.parse(src), dst=pp.Host.parse(dst), spi=spi, reqid=1, mode=1, enc_alg=20,
                        flags=pp.SaFlag.INBOUND if inbound else 0)

    a = _catch_up_agent(1.0)
    a.state = _State()
    a._wake = threading.Event()
    inbound, outbound, deleted = sa(0xC0000001, True), sa(0xD0000001, False), sa(0xC0000002, True)
    a.server = SimpleNamespace(_lock=threading.Lock(),  # type: ignore[assignment]
                               sas={s.key: SaRecord(s) for s in (outbound, inbound)})
    usable = [False]
    a.gpn_views = lambda: {"gpn1": GpnView("gpn1", True, usable[0])}  # type: ignore[method-assign]
    a.view.on_snapshot(10, [])
    for s in (outbound, inbound, deleted):
        a._unplaced(s, "acme", "hq", NoGpnError("no healthy GPN is registered"))
    assert a._wake.is_set()  # the loop places them as soon as it can
    placed: list[int] = []

    def add_sa(s: pp.AddSa) -> None:
        placed.append(s.spi)

    a._add_sa = add_sa  # type: ignore[method-assign]
    a._place_unplaced()
    assert placed == [] and len(a.state.unplaced) == 3  # still no usable GPN: kept
    usable[0] = True
    a._place_unplaced()
    assert placed == [0xC0000001, 0xD0000001]  # inbound first; the deleted one forgotten
    assert a.state.unplaced == {}


def test_a_restarted_gpn_s_outbound_sas_are_rekeyed_once_the_gin_sees_it_alive(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPN back in etcd but not yet answering the GIN's heartbeats is not usable: a
    rekey then could place its SAs nowhere (every GPN restarted), so the old outbound SAs
    it refuses are rekeyed once the GIN declares it alive."""
    import json
    import time
    from types import SimpleNamespace

    from protego.control.model import PREFIX
    from protego.gmn import agent as agent_mod
    from protego.gmn.agent import _State
    from protego.store.etcd import KV

    rekeys: list[str] = []

    class FakeVici:
        def __init__(self, _sock: str) -> None:
            pass

        def __enter__(self) -> "FakeVici":
            return self

        def __exit__(self, *_exc: object) -> None:
            pass

        def list_sas(self, _conn: str) -> list[dict[str, object]]:
            return [{"ike": "acme_hq", "child_state": "INSTALLED", "child_id": 8}]

        def rekey_child(self, child_id: object) -> None:
            rekeys.append(str(child_id))

    monkeypatch.setattr(agent_mod, "ViciClient", FakeVici)
    a = _catch_up_agent(1.0)
    a.state = _State()
    a.cfg = SimpleNamespace(vici_socket="unused", node="gmn1")  # type: ignore[assignment]
    a._event = lambda *args, **kw: None  # type: ignore[method-assign]
    alive = [False]
    a.gpn_views = lambda: {"gpn2": GpnView("gpn2", True, alive[0])}  # type: ignore[method-assign]
    started = time.time()
    old = full_record("c0000001", tenant="acme", tunnel="hq", direction="out", gpn="gpn2", created=started - 60)
    a.view.on_snapshot(10, [KV(f"{PREFIX}gpn/nodes/gpn2", json.dumps({"node": "gpn2", "started": started}).encode(),
                               1, 1, 1),
                            KV(f"{PREFIX}sas/203.0.113.11/c0000001", json.dumps(old).encode(), 2, 2, 1)])
    a._rekey_burnt_outbound()
    assert rekeys == []  # the GIN has it dead still
    alive[0] = True
    a._rekey_burnt_outbound()
    assert rekeys == ["8"]


def test_outbound_deletions_do_not_wait_for_etcd_and_count_as_done_at_once() -> None:
    """charon's del_sa of an outbound SA (its next step: the DELETE to the peer) returns
    without waiting for the transaction; until our view reflects that deletion, the SA
    counts as gone for the next decisions: the tunnel's last outbound SA going removes
    the steering instead of pointing it at the one whose deletion is still in flight."""
    import json
    import threading
    from concurrent.futures import Future

    from protego.control.model import PREFIX, tenant_key, tunnel_key
    from protego.gmn.agent import _State
    from protego.store.etcd import KV, DeleteOp, PutOp

    a = _catch_up_agent(1.0)
    a._sa_lock = threading.Lock()
    a.state = _State()
    submitted: list[tuple[list[object], Future[int]]] = []

    class HeldCommits:  # etcd that has not answered yet
        def submit(self, ops: list[object]) -> Future[int]:
            fut: Future[int] = Future()
            submitted.append((ops, fut))
            return fut

    a._commits = HeldCommits()  # type: ignore[assignment]
    a._sa_txn = lambda ops: (_ for _ in ()).throw(AssertionError("waited for etcd"))  # type: ignore[method-assign]

    def sa(spi: str, created: float) -> tuple[str, dict[str, object]]:
        return (f"{PREFIX}sas/203.0.113.11/{spi}", {"tenant": "acme", "tunnel": "hq", "spi": spi, "gpn": "gpn1",
                                                   "direction": "out", "created": created, "reqid": 1,
                                                   "local_ts": ["10.1.0.0/24"], "vip": "203.0.113.11",
                                                   "src": "203.0.113.11", "dst": "198.18.1.1"})

    records = [sa("c0000002", 100.0), sa("c0000003", 200.0)]
    kvs = [KV(tenant_key("acme"), json.dumps(ACME.to_json()).encode(), 1, 1, 1),
           KV(tunnel_key("acme", "hq"), json.dumps(HQ.to_json()).encode(), 1, 1, 1),
           KV(f"{PREFIX}steer/out/acme/hq", json.dumps({"gpn": "gpn1", "spi": "c0000003"}).encode(), 3, 3, 1)]
    kvs += [KV(k, json.dumps(r).encode(), 2, 2, 1) for k, r in records]
    a.view.on_snapshot(10, kvs)
    # the older SA goes (the steering names the newer one): its record only, aside
    a._del_sa(0xC0000002, None)
    assert len(submitted) == 1
    assert [type(op) for op in submitted[0][0]] == [DeleteOp, DeleteOp]
    assert records[0][0] in a._deleting
    # before etcd answered (our view still holds c0000002), the tunnel's last SA goes:
    # the steering is removed, not pointed at c0000002
    a._del_sa(0xC0000003, None)
    assert len(submitted) == 2
    ops = submitted[1][0]
    assert not any(isinstance(op, PutOp) for op in ops)
    assert f"{PREFIX}steer/out/acme/hq" in [op.key for op in ops if isinstance(op, DeleteOp)]  # type: ignore[attr-defined]
    # etcd answers, our view reflects both deletions: nothing is left marked
    for _ops, fut in submitted:
        fut.set_result(11)
    a.view.on_snapshot(11, kvs[:2])
    a._prune_deleting()
    assert a._deleting == set()
