"""SA records from etcd -> the GPN's SAs (pure)."""

from __future__ import annotations

import base64
import ipaddress
import os
from typing import Any

import pytest

from protego.errors import ConfigError
from protego.esp.sa import Direction
from protego.esp.suites import Suite
from protego.gpn.records import parse_sa_record, parse_ts, sa_from_wire, sa_to_wire

KEY_GCM = os.urandom(20)
KEY_CBC = os.urandom(16)
INTEG = os.urandom(32)


def record(**over: Any) -> dict[str, Any]:
    rec = {
        "spi": "c0001234", "vip": "203.0.113.11", "direction": "in", "tenant": "acme", "tunnel": "hq",
        "vni": 1001, "reqid": 3, "gpn": "gpn1", "gmn": "gmn1", "mode": "tunnel", "encap": True,
        "src": "198.18.1.1", "dst": "203.0.113.11", "sport": 4500, "dport": 4500, "suite": "aes128gcm16",
        "enc_key": base64.b64encode(KEY_GCM).decode(), "integ_key": "", "esn": False, "replay_window": 32,
        "local_ts": ["10.1.0.0/24"], "remote_ts": ["10.201.0.0/24"],
        "lifetimes": {"time_rekey": 3600, "time_life": 3960, "bytes_rekey": 0, "bytes_life": 0},
        "created": 1700000000.5,
    }
    rec.update(over)
    return rec


def test_inbound_gcm_record() -> None:
    g = parse_sa_record(record())
    assert g.inbound and g.spi == 0xC0001234 and g.sa.direction is Direction.INBOUND
    assert g.sa.suite is Suite.AES128GCM16
    assert g.sa.keys.enc_key == KEY_GCM[:16] and g.sa.keys.salt == KEY_GCM[16:]
    assert g.sa.replay_window == 64  # charon's 32 raised to the engine's minimum
    assert g.peer == "198.18.1.1" and g.peer_port == 4500 and g.vni == 1001
    assert g.sa.encap is not None and g.sa.encap.dport == 4500
    assert int(ipaddress.IPv4Address("10.1.0.7")) in g.local_ts
    assert int(ipaddress.IPv4Address("10.201.0.7")) in g.remote_ts
    assert int(ipaddress.IPv4Address("10.2.0.7")) not in g.local_ts
    assert g.label == "acme/hq spi=c0001234 in"


def test_outbound_cbc_record_peer_is_destination() -> None:
    g = parse_sa_record(record(direction="out", src="203.0.113.11", dst="198.18.1.1", dport=4501,
                               suite="aes128-sha256", enc_key=base64.b64encode(KEY_CBC).decode(),
                               integ_key=base64.b64encode(INTEG).decode()))
    assert not g.inbound and g.peer == "198.18.1.1" and g.peer_port == 4501
    assert g.sa.keys.auth_key == INTEG and g.sa.keys.enc_key == KEY_CBC


def test_raw_esp_record() -> None:
    assert parse_sa_record(record(encap=False)).sa.encap is None


@pytest.mark.parametrize("over, words", [
    ({"spi": "zz"}, "not hex"),
    ({"direction": "sideways"}, "direction"),
    ({"mode": "transport"}, "tunnel only"),
    ({"suite": "des"}, "unknown ESP suite"),
    ({"enc_key": "!!!"}, "base64"),
    ({"enc_key": base64.b64encode(b"short").decode()}, "20 bytes"),
    ({"vni": 0}, "vni"),
    ({"vni": "1001"}, "wrong type"),
    ({"local_ts": ["nonsense"]}, "traffic selector"),
    ({"spi": "00000010"}, "SPI"),
])
def test_bad_records_are_refused_without_keys(over: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_sa_record(record(**over), "sas/203.0.113.11/c0001234")
    text = str(exc.value)
    assert words in text
    assert base64.b64encode(KEY_GCM).decode() not in text and KEY_GCM.hex() not in text


def test_missing_field() -> None:
    rec = record()
    del rec["tenant"]
    with pytest.raises(ConfigError, match="'tenant' missing"):
        parse_sa_record(rec)
    with pytest.raises(ConfigError, match="not a JSON object"):
        parse_sa_record([1, 2])


def test_traffic_selector_forms() -> None:
    p = parse_ts(["10.0.0.0/8", "192.168.1.5..192.168.1.9", "10.1.0.0/24[6/0-65535]", "2001:db8::/32"], "ts")
    assert int(ipaddress.IPv4Address("10.200.1.1")) in p
    assert int(ipaddress.IPv4Address("192.168.1.7")) in p
    assert int(ipaddress.IPv4Address("192.168.1.10")) not in p
    assert len(p.ranges) == 3  # IPv6 skipped


def test_wire_round_trip_keeps_everything() -> None:
    for rec in (record(), record(direction="out", src="203.0.113.11", dst="198.18.1.1", esn=True)):
        g = parse_sa_record(rec)
        back = sa_from_wire(sa_to_wire(g))
        assert back.sa == g.sa and back.sa.keys == g.sa.keys
        assert (back.vip, back.tenant, back.tunnel, back.vni, back.peer, back.peer_port, back.created) == \
            (g.vip, g.tenant, g.tunnel, g.vni, g.peer, g.peer_port, g.created)
        assert back.local_ts == g.local_ts and back.remote_ts == g.remote_ts
        assert KEY_GCM.hex() not in repr(back) and KEY_GCM.hex() not in repr(g)
