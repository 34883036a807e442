"""`protego status` summarises one etcd snapshot."""

from __future__ import annotations

import json

from protego.control.model import PREFIX
from protego.control.status import summarize
from protego.store.etcd import KV


def kv(key: str, value: object, raw: bool = False) -> KV:
    data = value if raw else json.dumps(value).encode()
    return KV(PREFIX + key, data, 1, 1, 1)  # type: ignore[arg-type]


def test_summary() -> None:
    kvs = [
        kv("gmn/leader", {"node": "gmn1"}),
        kv("gmn/members/gmn1", {"node": "gmn1"}), kv("gmn/members/gmn2", {"node": "gmn2"}),
        kv("gpn/nodes/gpn1", {"node": "gpn1"}), kv("gpn/nodes/gpn2", {"node": "gpn2"}),
        kv("gpn/health/gpn2", {"state": "dead", "since": 5.0}),
        kv("gpn/load/gpn1", {"cpu": 0.25}),
        kv("tenants/acme", {"name": "acme"}), kv("tenants/globex", {"name": "globex"}),
        kv("tunnels/acme/hq", {"remote_addrs": "198.18.1.1", "rate_mbps": 50}),
        kv("tunnels/globex/hq", {"remote_addrs": "198.18.2.1"}),
        kv("secrets/acme/hq", b"not json \xff", raw=True),
        kv("placement/acme/hq", {"gpn": "gpn1"}),
        kv("sas/203.0.113.11/c0000001", {"spi": "c0000001", "vip": "203.0.113.11", "direction": "in",
                                         "tenant": "acme", "tunnel": "hq", "created": 1}),
        kv("sas/203.0.113.11/c0000002", {"spi": "c0000002", "vip": "203.0.113.11", "direction": "in",
                                         "tenant": "acme", "tunnel": "hq", "created": 2}),
        kv("sas/203.0.113.11/d0000001", {"spi": "d0000001", "vip": "203.0.113.11", "direction": "out",
                                         "tenant": "acme", "tunnel": "hq", "created": 2}),
        kv("sastats/203.0.113.11/c0000002", {"bytes": 1000}),
        kv("events/2-x", {"ts": 2, "kind": "b"}), kv("events/1-x", {"ts": 1, "kind": "a"}),
    ]
    st = summarize(kvs, now=10.0)
    assert st["gmn_leader"] == "gmn1"
    assert [g["active"] for g in st["gmns"]] == [True, False]
    assert [(g["node"], g["health"], g["tunnels"]) for g in st["gpns"]] == [("gpn1", "unknown", 1),
                                                                         ("gpn2", "dead", 0)]
    acme, globex = st["tunnels"]
    assert (acme["state"], acme["gpn"], acme["spi_in"], acme["spi_out"]) == ("up", "gpn1", "c0000002", "d0000001")
    assert acme["bytes_in"] == 1000 and acme["rate_limit_mbps"] == 50 and acme["sas"] == 3
    assert (globex["state"], globex["gpn"], globex["rate_limit_mbps"]) == ("down", None, None)
    assert [e["kind"] for e in st["events"]] == ["a", "b"]
    assert st["tenants"] == 2


def test_status_shows_the_gmns_ha_state() -> None:
    from protego.control.status import _gmn_line, summarize

    st = summarize([kv("gmn/leader", {"node": "gmn1"}), kv("gmn/members/gmn1", {"node": "gmn1"}),
                    kv("gmn/members/gmn2", {"node": "gmn2"}), kv("gmn/members/gmn3", {"node": "gmn3"}),
                    kv("gmn/ha/gmn1", {"active": True, "fed_ok": False, "entries": 3, "mirrored": 40, "fenced": 0}),
                    kv("gmn/ha/gmn2", {"active": False, "fed_ok": True, "entries": 3}),
                    kv("gmn/ha/gmn3", {"active": False, "fed_ok": False, "entries": 3})], now=0)
    lines = [_gmn_line(g) for g in st["gmns"]]
    assert lines == ["gmn1* (mirroring 3 IKE SAs)", "gmn2 (standby, caught up)", "gmn3 (standby, NOT caught up)"]
    assert st["gmns"][0]["ha"]["mirrored"] == 40
