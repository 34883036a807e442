"""The direct acknowledgement channel (``protego/control/acks.py``): the datagram format and
its authentication, and GPN/GIN agents' senders reaching GMN receivers on loopback through
the records a real etcd holds; and the GMN taking whichever of the etcd record and the
datagram came further."""

from __future__ import annotations

import json
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from protego.control import acks
from protego.control.model import PREFIX
from protego.store.etcd import KV, Etcd, encode_json
from tests.conftest import wait_until

KEY = bytes(range(32))


def _record_parsing(a: Any) -> None:
    """What GmnAgent's record readers (_parsed: tenants, tunnels, SA records) need."""
    import threading as _threading

    from protego.store.refused import RefusedPublisher, RefusedRecords

    a._parse_lock = _threading.Lock()
    a._parse_cache = {}
    a.refused = RefusedRecords("gmn", "gmn1")
    a._refused_pub = RefusedPublisher(a.refused, lambda _key, _report: None)



def test_a_datagram_decodes_to_what_was_encoded() -> None:
    data = acks.encode(KEY, "gpn", "gpn1", 207, 210)
    assert data.startswith(acks.MAGIC)
    assert acks.decode(KEY, data) == {"kind": "gpn", "node": "gpn1", "revision": 207, "sas_revision": 210}
    assert acks.decode(KEY, acks.encode(KEY, "lb", "lb", 5)) == {"kind": "lb", "node": "lb", "revision": 5}


def test_a_node_can_acknowledge_for_itself_only() -> None:
    """Was: every agent used one key per GMN, and the name in the datagram was not bound
    to it: a GIN/GEN could acknowledge as gpn1. Now each sender has its own key."""
    keys = {("gpn", "gpn1"): bytes(range(32)), ("gpn", "gpn2"): bytes(range(1, 33)), ("lb", "lb"): bytes(32)}

    def lookup(kind: str, node: str) -> bytes | None:
        return keys.get((kind, node))

    assert acks.decode(lookup, acks.encode(keys[("gpn", "gpn1")], "gpn", "gpn1", 7)) is not None
    assert acks.decode(lookup, acks.encode(keys[("gpn", "gpn2")], "gpn", "gpn1", 7)) is None  # gpn2 as gpn1
    assert acks.decode(lookup, acks.encode(keys[("lb", "lb")], "gpn", "gpn1", 7)) is None  # the GIN/GEN as gpn1
    assert acks.decode(lookup, acks.encode(keys[("gpn", "gpn1")], "gpn", "gpn9", 7)) is None  # no key: unknown
    assert acks.sender_key({"key": "00" * 32}) == bytes(32)
    for bad in ({"key": "zz"}, {"key": "00"}, {"key": 5}, [], None):
        assert acks.sender_key(bad) is None


def test_the_gmn_takes_no_revision_beyond_what_it_knows() -> None:
    """Was: a forged "gpn1 revision 2^62" was accepted and satisfied the GMN's waits for
    good. A datagram now counts up to the newest revision the GMN knows, no further."""
    a = _waiting_agent()
    a.view.on_snapshot(100, [_kv("gpn/nodes/gpn1", {"node": "gpn1"}, 2),
                             _kv("gpn/applied/gpn1", {"revision": 90, "sas_revision": 90}, 90)])
    a._on_direct_ack("gpn", "gpn1", {"revision": 2**62, "sas_revision": 2**62})
    assert a._ack_value(f"{PREFIX}gpn/applied/gpn1", "revision") == 100
    a._own_rev = 104  # our own transaction, not yet in the view
    a._on_direct_ack("gpn", "gpn1", {"revision": 2**62})
    assert a._ack_value(f"{PREFIX}gpn/applied/gpn1", "revision") == 104
    a.cfg = SimpleNamespace(apply_timeout=0.3)
    t0 = time.monotonic()
    a._wait_applied("gpn1", 105, "test SA")  # the next transaction: not satisfied by the forgery
    assert time.monotonic() - t0 >= 0.25


def test_forged_altered_or_malformed_datagrams_are_refused() -> None:
    good = acks.encode(KEY, "gpn", "gpn1", 207, 210)
    other_key = bytes(32)
    assert acks.decode(other_key, good) is None  # another GMN's key (or a guess)
    # a higher revision spliced in: the tag no longer matches
    assert acks.decode(KEY, good.replace(b"207", b"999")) is None
    assert acks.decode(KEY, b"") is None
    assert acks.decode(KEY, good[:20]) is None
    assert acks.decode(KEY, b"XXXX" + good[4:]) is None
    assert acks.decode(KEY, good + b" " * 600) is None  # too long for an acknowledgement

    def signed(body: Any) -> bytes:
        raw = json.dumps(body).encode()
        return acks.MAGIC + acks._tag(KEY, raw) + raw

    assert acks.decode(KEY, acks.MAGIC + acks._tag(KEY, b"{not json") + b"{not json") is None
    for body in ({"kind": "gmn", "node": "x", "revision": 1},  # not a kind that acknowledges
                 {"kind": "gpn", "node": "", "revision": 1},
                 {"kind": "gpn", "node": "a/b", "revision": 1},  # would name another key
                 {"kind": "gpn", "node": "gpn1", "revision": -1},
                 {"kind": "gpn", "node": "gpn1", "revision": True},
                 {"kind": "gpn", "node": "gpn1", "revision": "7"},
                 {"kind": "gpn", "node": "gpn1"},
                 {"kind": "gpn", "node": "gpn1", "revision": 3, "sas_revision": 2.5},
                 [1, 2]):
        assert acks.decode(KEY, signed(body)) is None, body
    assert acks.decode(KEY, signed({"kind": "gpn", "node": "gpn1", "revision": 3})) is not None


def test_senders_reach_every_gmn_listed_in_etcd_and_nothing_else(etcd: Etcd) -> None:
    got: dict[str, list[tuple[str, str, dict[str, int]]]] = {"gmn1": [], "gmn2": []}
    done = threading.Event()

    def on(name: str) -> Any:
        def handler(kind: str, node: str, fields: dict[str, int]) -> None:
            got[name].append((kind, node, fields))
            if all(got.values()):
                done.set()
        return handler

    sender = acks.AckSender("gpn", "gpn1")

    def keys(kind: str, node: str) -> bytes | None:  # what the GMN reads from acks/keys/
        kv = etcd.get(acks.sender_key_path(kind, node))
        return acks.sender_key(kv.json()) if kv is not None else None

    r1 = acks.AckReceiver("127.0.0.1", 0, on("gmn1"), keys).start()
    r2 = acks.AckReceiver("127.0.0.1", 0, on("gmn2"), keys).start()
    try:
        assert r1.addr != r2.addr
        etcd.put(sender.key_path, encode_json(sender.key_record()))
        etcd.put(f"{acks.ACKS_PREFIX}gmn1", encode_json(r1.record()))
        etcd.put(f"{acks.ACKS_PREFIX}gmn2", encode_json(r2.record()))
        etcd.put(f"{acks.ACKS_PREFIX}broken", b'{"addr": "nowhere"}')  # skipped, not fatal
        sender.watch(etcd)
        wait_until(lambda: len(sender.view.items(acks.ACKS_PREFIX)) == 3, 5, "the sender's view of the GMNs")
        assert sender.send(207, 210) == 2
        assert done.wait(5)
        assert got["gmn1"] == got["gmn2"] == [("gpn", "gpn1", {"revision": 207, "sas_revision": 210})]
        # a GMN that goes (its leased record) is no longer sent to
        etcd.delete(f"{acks.ACKS_PREFIX}gmn2")
        wait_until(lambda: len(sender.view.items(acks.ACKS_PREFIX)) == 2, 5, "gmn2's record to go")
        assert sender.send(208) == 1
        wait_until(lambda: len(got["gmn1"]) == 2, 5, "the second acknowledgement")
        assert len(got["gmn2"]) == 1
        # anything else arriving on the port is counted and dropped, and the channel goes on
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            host, port = r1.addr.split(":")
            s.sendto(acks.encode(bytes(32), "gpn", "gpn1", 10**9), (host, int(port)))  # not gpn1's key
            s.sendto(b"hello", (host, int(port)))
        wait_until(lambda: r1.rejected == 2, 5, "two rejections")
        assert sender.send(209) == 1
        wait_until(lambda: len(got["gmn1"]) == 3, 5, "an acknowledgement after the rejections")
        assert got["gmn1"][-1] == ("gpn", "gpn1", {"revision": 209})
        assert r1.received == 3
    finally:
        sender.close()
        r1.stop()
        r2.stop()


def test_the_key_never_reaches_the_logs(etcd: Etcd, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    r = acks.AckReceiver("127.0.0.1", 0, lambda *_a: None, lambda kind, node: None).start()
    sender = acks.AckSender("lb", "lb1")
    try:
        etcd.put(f"{acks.ACKS_PREFIX}gmn1", encode_json({"addr": "zz"}))  # no address: skipped
        sender.watch(etcd)
        wait_until(lambda: sender.view.items(acks.ACKS_PREFIX), 5, "the record")
        assert sender.send(1) == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            host, port = r.addr.split(":")
            s.sendto(b"PGA1" + bytes(40), (host, int(port)))
        # the receiver thread counts the rejection, then logs it: wait for the line itself
        wait_until(lambda: r.rejected == 1 and "dropped a datagram" in caplog.text, 5, "the rejection")
        assert sender.key.hex() not in caplog.text
        assert "not a usable GMN record" in caplog.text
    finally:
        sender.close()
        r.stop()


def test_sender_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError):
        acks.AckSender("gmn", "x")


# ------------------------------------------------------------------ the GMN's side


def _waiting_agent() -> Any:
    """Only what GmnAgent._wait_applied and _on_direct_ack touch."""
    from protego.gmn.agent import GmnAgent
    from protego.store.view import PrefixView

    a = GmnAgent.__new__(GmnAgent)
    _record_parsing(a)
    a._applied = threading.Condition()
    a.view = PrefixView(on_change=lambda: a._on_view_change())
    a._wake = threading.Event()
    a._direct_acks = {}
    a._own_rev = 0
    a.cfg = SimpleNamespace(apply_timeout=3.0)
    return a


def _kv(key: str, value: dict[str, Any], rev: int) -> KV:
    return KV(f"{PREFIX}{key}", json.dumps(value).encode(), 1, rev, 0)


def test_the_gmn_takes_the_datagram_when_it_comes_before_the_etcd_record() -> None:
    a = _waiting_agent()
    a.view.on_snapshot(100, [
        _kv("gpn/nodes/gpn1", {"node": "gpn1"}, 2),
        _kv("gpn/applied/gpn1", {"revision": 90, "sas_revision": 95}, 95),
        _kv("lb/applied/lb", {"revision": 96}, 96),
    ])
    # the inbound SA's transaction is revision 100: nobody has it in etcd yet
    threading.Timer(0.1, lambda: a._on_direct_ack("gpn", "gpn1", {"revision": 100, "sas_revision": 100})).start()
    threading.Timer(0.2, lambda: a._on_direct_ack("lb", "lb", {"revision": 101})).start()
    t0 = time.monotonic()
    a._wait_applied("gpn1", 100, "test SA")
    waited = time.monotonic() - t0
    assert 0.15 <= waited < 2.0, waited  # released by the two datagrams, not the 3 s timeout
    # a stale or replayed datagram never lowers what counts, nor satisfies a newer wait
    a._on_direct_ack("gpn", "gpn1", {"revision": 50, "sas_revision": 50})
    assert a._ack_value(f"{PREFIX}gpn/applied/gpn1", "revision") == 100
    assert a._ack_value(f"{PREFIX}gpn/applied/gpn1", "sas_revision") == 100
    # etcd further than the datagrams: etcd counts
    a.view.on_snapshot(120, [
        _kv("gpn/nodes/gpn1", {"node": "gpn1"}, 2),
        _kv("gpn/applied/gpn1", {"revision": 110, "sas_revision": 115}, 115),
        _kv("lb/applied/lb", {"revision": 110}, 110),
    ])
    assert a._ack_value(f"{PREFIX}gpn/applied/gpn1", "sas_revision") == 115
    a.cfg = SimpleNamespace(apply_timeout=0.3)
    t0 = time.monotonic()
    a._wait_applied("gpn1", 112, "test SA")  # the GIN/GEN is at 110: times out, and goes on
    assert time.monotonic() - t0 >= 0.25


def test_a_gpn_that_acknowledges_over_the_fabric_only_is_not_waited_for() -> None:
    """Whom to wait for still comes from etcd (the registration and its leased record): a
    datagram from a GPN whose lease went does not bring it back into the waits."""
    a = _waiting_agent()
    a.view.on_snapshot(100, [_kv("lb/applied/lb", {"revision": 100}, 100)])
    a._on_direct_ack("gpn", "gpn9", {"revision": 1, "sas_revision": 1})
    t0 = time.monotonic()
    a._wait_applied("gpn9", 100, "test SA")
    assert time.monotonic() - t0 < 0.5


def test_the_gmn_publishes_its_address_with_its_membership(etcd: Etcd) -> None:
    from protego.gmn.agent import GmnAgent

    a = GmnAgent.__new__(GmnAgent)
    _record_parsing(a)
    a.etcd = etcd
    a.cfg = SimpleNamespace(node="gmn1", fabric_addr="127.0.0.1")
    a._acks = acks.AckReceiver("127.0.0.1", 0, lambda *_a: None, lambda kind, node: None)
    lease = etcd.lease(5)
    a._lease = lease
    try:
        a._register_member()
        member = etcd.get(f"{PREFIX}gmn/members/gmn1")
        rec = etcd.get(f"{acks.ACKS_PREFIX}gmn1")
        assert member is not None and rec is not None
        assert "key" not in member.json()  # protego status shows members
        assert rec.json() == a._acks.record() and rec.lease == lease.id == member.lease
        lease.revoke()
        assert etcd.get(f"{acks.ACKS_PREFIX}gmn1") is None  # goes with the GMN
    finally:
        a._acks.stop()
        etcd.delete_prefix(f"{PREFIX}gmn/")

