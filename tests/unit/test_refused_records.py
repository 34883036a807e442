"""A bad record costs that record only (issue #19, item 1): the agents skip it, count
it, log it once per version (never its value), publish it for `protego status`, and
forget it once it is deleted or rewritten. A thread that dies anyway fails the process.

Each repro of the review is here: before, it killed the agent's reconcile thread."""

from __future__ import annotations

import base64
import json
import logging
import threading
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protego import sealing
from protego.control.model import PREFIX, Tenant, Tunnel
from protego.store.etcd import KV, Event, EventType
from protego.store.refused import FatalThreads, RefusedPublisher, RefusedRecords
from protego.store.view import PrefixView
from tests.unit.test_gpn_agent import agent_with, rec

ACME = Tenant("acme", 1001, "10.1.0.0/24", "203.0.113.11")
HQ = Tunnel(tenant="acme", name="hq", remote_addrs="198.18.1.1", remote_ts=("10.201.0.0/24",))
PSK = b"0123456789abcdef0123456789abcdef"
GMN_KEY = X25519PrivateKey.generate()


def sealed_psk(tenant: str, tunnel: str, psk: bytes = PSK) -> bytes:
    """A PSK as the CLI stores it: sealed to the GMNs' key."""
    return sealing.seal(sealing.public_bytes(GMN_KEY), psk, f"secrets/{tenant}/{tunnel}").encode()


def kv(key: str, value: Any, rev: int = 5, raw: bool = False) -> KV:
    return KV(PREFIX + key, value if raw else json.dumps(value).encode(), rev, rev, 1)


def gmn_with(kvs: list[KV]) -> Any:
    """A GMN agent on a view of ``kvs`` (no etcd, no charon: its record readers only)."""
    from types import SimpleNamespace

    from protego.gmn.agent import GmnAgent, GmnConfig

    a = GmnAgent.__new__(GmnAgent)
    a.cfg = GmnConfig(node="gmn1", etcd=["127.0.0.1:1"], vici_socket="/nonexistent", plugin_socket="/nonexistent")
    a.refused = RefusedRecords("gmn", "gmn1")
    a.view = PrefixView(on_bad=lambda k, why: a.refused.refuse(k.key, k.mod_revision, why))
    a._parse_lock = threading.Lock()
    a._parse_cache = {}
    a.state = SimpleNamespace(pending_gpn={})
    a._seal_key = GMN_KEY
    a.view.on_snapshot(10, kvs)
    return a


# ------------------------------------------------------------------ the list itself


def test_a_refusal_is_logged_once_per_version_and_leaves_with_the_record(caplog: pytest.LogCaptureFixture) -> None:
    r = RefusedRecords("gmn", "gmn1", clock=lambda: 100.0)
    with caplog.at_level(logging.ERROR):
        assert r.refuse(PREFIX + "tenants/zz", 7, "vni missing")
        assert not r.refuse(PREFIX + "tenants/zz", 7, "vni missing")  # the same version: once
        assert r.refuse(PREFIX + "tenants/zz", 9, "vni missing")  # rewritten, still bad: again
    assert caplog.text.count("tenants/zz") == 2 and "revision 9" in caplog.text
    assert r.report() == {"role": "gmn", "node": "gmn1", "count": 1, "refusals": 2,
                          "records": [{"key": "tenants/zz", "revision": 9, "reason": "vni missing", "since": 100.0}]}
    r.prune({PREFIX + "tenants/zz": 9}.get)
    assert len(r) == 1
    r.prune({PREFIX + "tenants/zz": 11}.get)  # rewritten: read again before it is judged
    assert len(r) == 0
    r.refuse(PREFIX + "tenants/zz", 11, "vni missing")
    r.prune({}.get)  # deleted
    assert len(r) == 0 and r.total == 3


def test_the_published_report_follows_the_list_and_is_written_only_on_change() -> None:
    r = RefusedRecords("gpn", "gpn1")
    writes: list[tuple[str, Any]] = []
    pub = RefusedPublisher(r, lambda k, v: writes.append((k, v)), lambda k: writes.append((k, None)))
    assert pub.publish()  # the first: an empty report (a restarted agent clears its old one)
    assert writes[-1][0] == PREFIX + "refused/gpn/gpn1" and writes[-1][1]["count"] == 0
    assert not pub.publish()
    r.refuse(PREFIX + "sas/203.0.113.11/00001009", 3, "field 'sport' is not an integer in 1..65535")
    assert pub.publish() and writes[-1][1]["count"] == 1
    r.accept(PREFIX + "sas/203.0.113.11/00001009")
    assert pub.publish() and writes[-1] == (PREFIX + "refused/gpn/gpn1", None)  # deleted


def test_the_view_hands_over_values_that_are_not_objects() -> None:
    bad: list[tuple[str, str]] = []
    v = PrefixView(on_bad=lambda k, why: bad.append((k.key[len(PREFIX):], why)))
    v.on_snapshot(3, [kv("placement/acme/hq", ["gpn1"]), kv("placement/acme/br", b"\xff{", raw=True),
                      kv("placement/acme/ok", {"gpn": "gpn1"})])
    assert v.json_items(PREFIX + "placement/") == {PREFIX + "placement/acme/ok": {"gpn": "gpn1"}}
    assert v.get_json(PREFIX + "placement/acme/hq") is None
    assert ("placement/acme/hq", "a JSON list, not an object") in bad and ("placement/acme/br", "not JSON") in bad


# ------------------------------------------------------------------ the GMN's repros


def test_gmn_a_tenant_without_vni_is_skipped_not_fatal() -> None:
    """Was: ``put tenants/zz '{"name":"zz"}'`` raised KeyError('vni') in the reconcile
    thread, which died; deleting the key did not bring it back."""
    a = gmn_with([kv("tenants/zz", {"name": "zz"}), kv("tenants/acme", ACME.to_json()),
                  kv("tunnels/acme/hq", HQ.to_json())])
    assert [t.name for t in a.tenants()] == ["acme"]
    assert [t.name for t in a.tunnels()] == ["hq"]
    assert a.refused.keys() == {PREFIX + "tenants/zz"}
    assert "vni" in a.refused.report()["records"][0]["reason"]
    a.view.on_events([Event(EventType.DELETE, KV(PREFIX + "tenants/zz", b"", 0, 11, 0))])
    a.refused.prune(a.view.revision_of)
    assert len(a.refused) == 0 and [t.name for t in a.tenants()] == ["acme"]


@pytest.mark.parametrize("vip,why", [("2001:db8::1", "IPv6"), ("127.0.0.1", "loopback"), ("224.0.0.1", "multicast"),
                                     ("0.0.0.0", "unspecified")])
def test_gmn_a_tenant_whose_vip_no_host_can_own_is_refused_before_the_kernel(vip: str, why: str) -> None:
    """Was: an IPv6 VIP made _reconcile_vips raise NetlinkError(17) (the thread died)."""
    a = gmn_with([kv("tenants/v6", {"name": "v6", "vni": 7, "network": "10.7.0.0/24", "vip": vip}),
                  kv("tenants/acme", ACME.to_json())])
    assert [t.vip for t in a.tenants()] == ["203.0.113.11"]
    assert why in a.refused.report()["records"][0]["reason"]


def test_gmn_a_psk_vici_cannot_carry_is_refused_and_never_shown() -> None:
    """Was: a PSK over 65,535 bytes made VICI's serialization raise struct.error."""
    huge = b"k" * 70_000
    a = gmn_with([kv("secrets/acme/hq", huge, raw=True), kv("secrets/acme/br", sealed_psk("acme", "br"), raw=True),
                  kv("secrets/acme/big", sealed_psk("acme", "big", b"k" * 1100), raw=True),
                  kv("secrets/acme/huge", sealed_psk("acme", "huge", b"k" * 70_000), raw=True),
                  kv("secrets/acme/clear", PSK, raw=True),  # in clear: never taken
                  kv("secrets/acme/moved", sealed_psk("acme", "br"), raw=True)])  # another tunnel's
    assert a._secrets() == {("acme", "br"): PSK}
    report = json.dumps(a.refused.report())
    assert "kkkk" not in report and PSK.decode() not in report
    reasons = {r["key"]: r["reason"] for r in a.refused.report()["records"]}
    assert "70000 bytes" in reasons["secrets/acme/hq"] and "not a sealed PSK" in reasons["secrets/acme/clear"]
    assert "16 to 1024 bytes long (it is 1100)" in reasons["secrets/acme/big"]
    assert "a sealed PSK of 93" in reasons["secrets/acme/huge"]  # not even opened
    assert "does not open" in reasons["secrets/acme/moved"]


def test_gmn_a_tunnel_with_a_70kb_identity_is_refused() -> None:
    big = {**HQ.to_json(), "local_id": "x" * 70_000}
    a = gmn_with([kv("tenants/acme", ACME.to_json()), kv("tunnels/acme/hq", big)])
    assert a.tunnels() == []
    assert "local_id: 70000 bytes long" in a.refused.report()["records"][0]["reason"]


def test_gmn_malformed_sa_records_and_placements_are_skipped() -> None:
    good = {"spi": "c0000001", "vip": "203.0.113.11", "direction": "in", "tenant": "acme", "tunnel": "hq",
            "gpn": "gpn1", "src": "198.18.1.1", "dst": "203.0.113.11", "created": 1.0, "local_ts": []}
    a = gmn_with([
        kv("sas/203.0.113.11/c0000001", good),
        kv("sas/203.0.113.11/c0000002", {**good, "spi": "c0000002", "sport": "abc"}),
        kv("sas/203.0.113.11/c0000003", {**good, "spi": "c0000003", "created": "yesterday"}),
        kv("sas/203.0.113.11/c0000004", {"spi": "c0000004"}),
        kv("placement/acme/hq", {"gpn": ["gpn1"]}), kv("placement/acme/br", {"gpn": "gpn1"}),
        kv("gpn/nodes/gpn1", {"node": "gpn1", "started": "abc"}), kv("gpn/nodes/gpn2", {"node": "gpn2", "started": 1}),
    ])
    assert list(a._sa_records()) == [PREFIX + "sas/203.0.113.11/c0000001"]
    assert a._placements() == {("acme", "br"): {"gpn": "gpn1"}}
    assert set(a.gpn_views()) == {"gpn2"}
    assert a.refused.keys() == {PREFIX + k for k in (
        "sas/203.0.113.11/c0000002", "sas/203.0.113.11/c0000003", "sas/203.0.113.11/c0000004",
        "placement/acme/hq", "gpn/nodes/gpn1")}


# ------------------------------------------------------------------ the GPN's repro


def test_gpn_an_sa_record_with_a_bad_port_is_skipped_and_the_rest_installed() -> None:
    """Was: one ``sas/`` record with ``"sport": "abc"`` raised ValueError in the GPN's
    reconcile thread (``gpn run`` kept running, ``agent.failed`` unset)."""
    bad = rec(0x1009, "in")
    bad["sport"] = "abc"
    a = agent_with({0x1001: (11, rec(0x1001, "in")), 0x1009: (12, bad), 0x2002: (13, rec(0x2002, "out"))})
    a.reconcile()
    assert set(a.engine.sas) == {("in", 0x1001), ("out", 0x2002)}  # type: ignore[union-attr]
    report = a.refused.report()
    assert [r["key"] for r in report["records"]] == ["sas/203.0.113.11/00001009"]
    assert "sport" in report["records"][0]["reason"]
    key = base64.b64decode(rec(0x1009, "in")["enc_key"])
    assert key.hex() not in json.dumps(report) and rec(0x1009, "in")["enc_key"] not in json.dumps(report)
    a.reconcile()  # and again: the loop goes on
    assert len(a.refused) == 1


@pytest.mark.parametrize("field,value", [("replay_window", "x"), ("reqid", [1]), ("created", "now"),
                                         ("dport", 70000), ("vni", "1001"), ("lifetimes", "big")])
def test_gpn_no_field_value_escapes_as_anything_but_a_refusal(field: str, value: Any) -> None:
    bad = rec(0x1009, "in")
    bad[field] = value
    a = agent_with({0x1009: (12, bad), 0x1001: (11, rec(0x1001, "in"))})
    a.reconcile()
    assert set(a.engine.sas) == {("in", 0x1001)}  # type: ignore[union-attr]
    assert a.refused.keys() == {f"{PREFIX}sas/203.0.113.11/00001009"}


# ------------------------------------------------------------------ a thread that dies anyway


def test_a_thread_that_dies_fails_the_process_unless_it_is_stopping(caplog: pytest.LogCaptureFixture) -> None:
    called: list[bool] = []
    fatal = FatalThreads(on_fatal=lambda: called.append(True)).install()
    try:
        t = threading.Thread(target=lambda: (_ for _ in ()).throw(KeyError("vni")), name="gmn-reconcile")
        with caplog.at_level(logging.CRITICAL):
            t.start()
            t.join()
        assert fatal.event.is_set() and called == [True]
        assert fatal.reason == "thread gmn-reconcile died: KeyError: 'vni'"
        assert "gmn-reconcile died" in caplog.text
        fatal2 = FatalThreads()
        fatal2.stopping()
        fatal2._hook(threading.ExceptHookArgs((ValueError, ValueError("late"), None, t)))  # type: ignore[call-arg]
        assert not fatal2.event.is_set()
        fatal2._hook(threading.ExceptHookArgs((SystemExit, SystemExit(0), None, t)))  # type: ignore[call-arg]
        assert not fatal2.event.is_set()
    finally:
        fatal.uninstall()
