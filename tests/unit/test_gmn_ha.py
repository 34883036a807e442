"""The HA stream codec, the per-IKE-SA mirror and the standby feeder (no charon)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from protego.gmn import ha


def ike_id(n: int, rsp: int = 0x1111) -> bytes:
    return bytes([2]) + n.to_bytes(8, "big") + rsp.to_bytes(8, "big") + bytes([0])


def attr_chunk(a: int, data: bytes) -> bytes:
    return bytes([a]) + struct.pack("!H", len(data)) + data


def ike_add(ike: bytes, rekey: bytes | None = None, secret: bytes = b"s" * 32) -> bytes:
    m = bytes([3, ha.IKE_ADD, ha.A_IKE_ID]) + ike
    if rekey:
        m += bytes([ha.A_IKE_REKEY_ID]) + rekey
    m += bytes([36, 2])  # IKE version (u8)
    m += attr_chunk(15, b"n" * 32) + attr_chunk(16, b"r" * 32) + attr_chunk(17, secret)
    m += bytes([21]) + struct.pack("!H", 20) + bytes([22]) + struct.pack("!H", 128)  # encr, key length
    return m


def ike_update(ike: bytes) -> bytes:
    ident = bytes([3, 1, 4]) + bytes([203, 0, 113, 11])  # LOCAL_ID: type 1 (IPv4), 4 bytes
    host = bytes([7]) + struct.pack("!HB", 4500, 2) + bytes([198, 18, 1, 1])  # REMOTE_ADDR
    return (bytes([3, ha.IKE_UPDATE, ha.A_IKE_ID]) + ike + ident + host + bytes([ha.A_CONFIG_NAME])
            + b"acme_acme-hq\0" + bytes([9]) + struct.pack("!I", 0x40))


def mid(ike: bytes, value: int, initiator: bool = False) -> bytes:
    t = ha.IKE_MID_INITIATOR if initiator else ha.IKE_MID_RESPONDER
    return bytes([3, t, ha.A_IKE_ID]) + ike + bytes([ha.A_MID]) + struct.pack("!I", value)


def child_add(ike: bytes, spi: int) -> bytes:
    ts = bytes([31, 7, 0]) + struct.pack("!HHB", 0, 65535, 0) + bytes([10, 1, 0, 0, 10, 1, 0, 255])
    return (bytes([3, ha.CHILD_ADD, ha.A_IKE_ID]) + ike + bytes([ha.A_CONFIG_NAME]) + b"acme_acme-hq\0"
            + bytes([ha.A_INBOUND_SPI]) + spi.to_bytes(4, "little") + bytes([28]) + b"\x01\x02\x03\x04"
            + attr_chunk(17, b"k" * 48) + ts)


def test_parse_walks_every_attribute_kind() -> None:
    a = ike_id(1)
    m = ha.parse(ike_add(a, rekey=ike_id(9)))
    assert (m.type, m.ike_id, m.rekey_id, m.type_name) == (ha.IKE_ADD, a, ike_id(9), "IKE_ADD")
    u = ha.parse(ike_update(a))
    assert u.ike_id == a and u.type == ha.IKE_UPDATE
    c = ha.parse(child_add(a, 0xC0FFEE01))
    assert ha.spi_of(c.inbound_spi or b"") == 0xC0FFEE01
    assert ha.parse(mid(a, 7)).mid == 7
    assert ha.ike_spis(a) == "0000000000000001_0000000000001111"


@pytest.mark.parametrize("raw,why", [
    (b"\x03", "too short"),
    (b"\x02\x01", "version 2"),
    (bytes([3, 1, ha.A_IKE_ID]) + b"\0" * 5, "truncated"),
    (bytes([3, 1, 99]), "unknown HA attribute 99"),
    (bytes([3, 2, ha.A_CONFIG_NAME]) + b"no-nul", "unterminated"),
    (bytes([3, 1, 17, 0, 40]) + b"x" * 3, "truncated"),
])
def test_parse_rejects_malformed(raw: bytes, why: str) -> None:
    with pytest.raises(ha.HaFormatError, match=why):
        ha.parse(raw)


def test_malformed_error_never_echoes_secret_bytes() -> None:
    raw = ike_add(ike_id(1), secret=b"TOPSECRET" * 4)[:-1]  # cut inside the last attribute
    with pytest.raises(ha.HaFormatError) as err:
        ha.parse(raw)
    assert "TOPSECRET" not in str(err.value)


def test_mirror_keeps_one_compact_entry_per_ike_sa() -> None:
    a = ike_id(1)
    mir = ha.HaMirror()
    for raw in (ike_add(a), ike_update(a), mid(a, 1), mid(a, 2), mid(a, 1, initiator=True),
                child_add(a, 0xC0000001), mid(a, 3)):
        assert mir.apply(ha.parse(raw)) == {a}
    entry = mir.raw(a)
    assert entry == [ike_add(a), ike_update(a), mid(a, 1, initiator=True), child_add(a, 0xC0000001), mid(a, 3)]
    # a CHILD_SA rekey: new CHILD_ADD, then CHILD_DELETE of the old inbound SPI
    mir.apply(ha.parse(child_add(a, 0xC0000002)))
    mir.apply(ha.parse(ha.child_delete(a, (0xC0000001).to_bytes(4, "little"))))
    assert [ha.spi_of(m.inbound_spi or b"") for m in mir.entries[a] if m.type == ha.CHILD_ADD] == [0xC0000002]
    # unknown SA, segment chatter: nothing changes
    assert mir.apply(ha.parse(mid(ike_id(5), 9))) == set()
    assert mir.apply(ha.parse(bytes([3, ha.SEGMENT_TAKE, 34, 0, 1]))) == set()
    assert mir.apply(ha.parse(ha.ike_delete(a))) == {a}
    assert mir.entries == {}


def test_ike_rekey_keeps_the_history_children_need_then_compacts() -> None:
    old, new = ike_id(1), ike_id(2)
    mir = ha.HaMirror()
    for raw in (ike_add(old), ike_update(old), child_add(old, 0xC0000001), mid(old, 4)):
        mir.apply(ha.parse(raw))
    assert mir.apply(ha.parse(ike_add(new, rekey=old))) == {old, new}
    assert old not in mir.entries
    # the CHILD_SA created on the old IKE SA still lives: its history stays in front
    assert mir.raw(new) == [ike_add(old), ike_update(old), child_add(old, 0xC0000001), mid(old, 4),
                            ike_add(new, rekey=old)]
    mir.apply(ha.parse(ike_update(new)))
    assert mir.apply(ha.parse(ha.ike_delete(old))) == set()  # absorbed already
    # once that CHILD_SA is rekeyed on the new IKE SA, the old history goes
    mir.apply(ha.parse(child_add(new, 0xC0000002)))
    mir.apply(ha.parse(ha.child_delete(new, (0xC0000001).to_bytes(4, "little"))))
    assert mir.raw(new) == [ike_add(new, rekey=old), ike_update(new), child_add(new, 0xC0000002)]


def test_entry_encoding_round_trip_and_key() -> None:
    msgs = [ike_add(ike_id(3)), ike_update(ike_id(3))]
    assert ha.decode_entry(ha.encode_entry(msgs)) == msgs
    with pytest.raises(ha.HaFormatError):
        ha.decode_entry(ha.encode_entry(msgs)[:-2])
    with pytest.raises(ha.HaFormatError):
        ha.decode_entry(b"garbage")
    key = ha.entry_key(ike_id(3))
    assert key.startswith(ha.HA_PREFIX) and ha.key_ike_id(key) == ike_id(3)
    assert ha.key_ike_id(ha.HA_PREFIX + "zz") is None


def test_feeder_sends_only_what_charon_lacks_and_deletes_what_went() -> None:
    a, b = ike_id(1), ike_id(2)
    f = ha.HaFeeder()
    entries = {a: [ike_add(a), ike_update(a), child_add(a, 0xC0000001)]}
    assert f.plan(entries) == entries[a]
    f.mark(entries)
    assert f.plan(entries) == []
    entries = {a: [ike_add(a), ike_update(a), child_add(a, 0xC0000002), mid(a, 2)],
               b: [ike_add(b)]}
    plan = f.plan(entries)
    # additions first (in entry order), then the CHILD_DELETE of the SA that went
    assert plan == [child_add(a, 0xC0000002), mid(a, 2), ike_add(b),
                    ha.child_delete(a, (0xC0000001).to_bytes(4, "little"))]
    f.mark(entries)
    assert f.plan({b: [ike_add(b)]}) == [ha.ike_delete(a)]


def test_feeder_does_not_delete_an_ike_sa_a_successor_absorbed() -> None:
    old, new = ike_id(1), ike_id(2)
    f = ha.HaFeeder()
    first = {old: [ike_add(old), child_add(old, 0xC0000001)]}
    f.mark(first)
    after = {new: [ike_add(old), child_add(old, 0xC0000001), ike_add(new, rekey=old)]}
    assert f.plan(after) == [ike_add(new, rekey=old)]


def test_feeder_reset_skips_what_a_surviving_charon_holds() -> None:
    a, b = ike_id(1), ike_id(2)
    entries = {a: [ike_add(a), child_add(a, 0xC0000001), mid(a, 3)], b: [ike_add(b)]}
    f = ha.HaFeeder()
    f.reset({a}, entries, {(0xC0000001).to_bytes(4, "little")})
    # a is held (its latest message ID is sent again: idempotent), b is not
    assert f.plan(entries) == [mid(a, 3), ike_add(b)]


def test_histogram_quantiles_between_snapshots() -> None:
    h = ha.LatencyHistogram()
    for ms in (1.0, 1.1, 2.0):
        h.add(ms)
    before = h.snapshot()
    for ms in [0.3] * 98 + [7.9, 30.0]:
        h.add(ms)
    after = h.snapshot()
    assert ha.histogram_quantile(before, after, 0.5) == pytest.approx(0.5)
    assert ha.histogram_quantile(before, after, 0.99) == pytest.approx(8.0)
    assert ha.histogram_quantile(before, after, 1.0) == pytest.approx(30.25)
    assert ha.histogram_quantile(after, after, 0.99) is None
    assert after["count"] == 103 and after["max_ms"] == 30.0


def test_forget_child_drops_a_rekeyed_child_before_charon_destroys_it() -> None:
    a = ike_id(1)
    mir = ha.HaMirror()
    for raw in (ike_add(a), child_add(a, 0xC0000001), child_add(a, 0xC0000002)):
        mir.apply(ha.parse(raw))
    assert mir.forget_child(ha.ike_spis(a), 0xC0000001) == {a}
    assert mir.raw(a) == [ike_add(a), child_add(a, 0xC0000002)]
    assert mir.forget_child(ha.ike_spis(a), 0xC0000001) == set()
    assert mir.forget_child("00_00", 0xC0000002) == set()
    # charon's own CHILD_DELETE, 5 s later, changes nothing any more
    assert mir.apply(ha.parse(ha.child_delete(a, (0xC0000001).to_bytes(4, "little")))) == set()


def test_prune_plan_deletes_what_the_mirror_does_not_hold() -> None:
    from protego.gmn.ha_service import prune_plan

    a, gone = ike_id(1), ike_id(7)
    entries = {a: [ike_add(a), child_add(a, 0xC0000002)]}
    ikes = {ha.ike_spis(a): "PASSIVE", ha.ike_spis(gone): "PASSIVE"}
    children = {0xC0000001: ha.ike_spis(a), 0xC0000002: ha.ike_spis(a), 0xC0000009: ha.ike_spis(gone)}
    plan = prune_plan(entries, ikes, children)
    # the stale CHILD_SA of a mirrored IKE SA, and the IKE SA the mirror lost (whatever
    # its initiator flag: both are asked, the one that is not there is ignored by charon)
    assert plan == [ha.child_delete(a, (0xC0000001).to_bytes(4, "little")),
                    ha.ike_delete(gone[:-1] + b"\0"), ha.ike_delete(gone[:-1] + b"\1")]
    assert prune_plan(entries, {ha.ike_spis(a): "PASSIVE"}, {0xC0000002: ha.ike_spis(a)}) == []


@pytest.mark.parametrize("prio", [7, 0])
def test_relay_priority_is_real_time_or_nice(prio: int) -> None:
    from protego.testbed.testbed import rt_permitted

    code = ("import os, threading; from protego.gmn.ha_service import raise_priority; "
            f"how = raise_priority({prio}); seen = []; "
            "t = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0))); t.start(); t.join(); "
            "print(how, os.sched_getscheduler(0), seen[0], os.getpriority(os.PRIO_PROCESS, 0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    how, policy, thread_policy, nice = out.stdout.split()
    if prio and rt_permitted():
        assert (how, int(policy), int(thread_policy)) == ("rr", os.SCHED_RR, os.SCHED_RR)  # threads inherit it
    else:
        assert (how, int(policy), int(nice)) == ("nice", os.SCHED_OTHER, -10)
