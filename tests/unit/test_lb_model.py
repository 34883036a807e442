"""GIN/GEN etcd model: parsing and validation of steer/, gmn/leader, gpn/nodes/ (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from protego.errors import ConfigError
from protego.lb import model
from protego.lb.model import Range

P = model.PREFIX
GPNS = {P + "gpn/nodes/gpn1": {"fabric_addr": "192.0.2.21"}, P + "gpn/nodes/gpn2": {"fabric_addr": "192.0.2.22"}}


def out(vni: int = 1001, local: list[str] | None = None, remote: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    return {"gpn": "gpn1", "vni": vni, "local_ts": local or ["10.1.0.0/24"],
            "remote_ts": remote or ["10.201.0.0/24"], **kw}


def test_valid_state() -> None:
    st = model.build_state({
        **GPNS, P + "gmn/leader": {"fabric_addr": "192.0.2.11"},
        P + "steer/in/203.0.113.11/c0ffee01": {"gpn": "gpn2", "tenant": "acme", "tunnel": "hq"},
        P + "steer/out/acme/hq": out(rate_mbps=2.5),
    })
    assert st.errors == ()
    assert st.gmn_addr == "192.0.2.11"
    assert st.steer_in == (model.SteerIn("203.0.113.11", 0xC0FFEE01, "gpn2", "acme", "hq"),)
    assert st.steer_out[0].remote_ts == (Range(0x0AC90000, 0x0AC900FF),)
    assert st.rate_of("acme", "hq") == 2.5 and st.rate_of("acme", "nope") == 0


@pytest.mark.parametrize("key,value,msg", [
    ("steer/in/203.0.113.11/1234", {"gpn": "gpn1", "tenant": "a", "tunnel": "b"}, "must be 8 hex digits"),
    ("steer/in/203.0.113.11/zzzzzzzz", {"gpn": "gpn1", "tenant": "a", "tunnel": "b"}, "must be 8 hex digits"),
    ("steer/in/203.0.113.11/000000ff", {"gpn": "gpn1", "tenant": "a", "tunnel": "b"}, "reserved"),
    ("steer/in/203.0.113.999/00001234", {"gpn": "gpn1", "tenant": "a", "tunnel": "b"}, "not an IPv4 address"),
    ("steer/in/203.0.113.11/00001234", {"gpn": "gpn9", "tenant": "a", "tunnel": "b"}, "unknown GPN 'gpn9'"),
    ("steer/in/203.0.113.11/00001234", ["x"], "must be a JSON object"),
    ("steer/in/203.0.113.11/00001234", {"gpn": "gpn1", "tunnel": "b"}, "tenant None"),
    ("steer/out/acme/hq", out(rate_mbps=-1), "rate_mbps -1 out of range"),
    ("steer/out/acme/hq", out(rate_mbps="fast"), "is not a number"),
    ("steer/out/acme/hq", out(vni=0), "vni 0 must be"),
    ("steer/out/acme/hq", out(remote=["10.201.0.1/24"]), "not an IPv4 prefix"),
    ("steer/out/acme/hq", out(remote=["10.201.0.0/24[tcp/80]"]), "port/protocol selectors"),
    ("steer/out/acme/hq", dict(out(), local_ts=[]), "non-empty list"),
    ("steer/out/acme/hq", dict(out(), gpn="gpn7"), "unknown GPN 'gpn7'"),
    ("gpn/nodes/gpn3", {"fabric_addr": "nope"}, "fabric_addr 'nope'"),
])
def test_bad_entries_are_refused_alone(key: str, value: Any, msg: str) -> None:
    good = P + "steer/in/203.0.113.11/00001000"
    st = model.build_state({**GPNS, P + key: value, good: {"gpn": "gpn1", "tenant": "t", "tunnel": "u"}})
    assert len(st.errors) == 1 and msg in st.errors[0] and key in st.errors[0]
    assert [s.spi for s in st.steer_in] == [0x1000]  # the rest stays


def test_validate_for_writers_raises() -> None:
    with pytest.raises(ConfigError, match="unknown GPN"):
        model.validate_steer_in("steer/in/203.0.113.11/00001234", {"gpn": "x", "tenant": "a", "tunnel": "b"},
                                {"gpn1": {}})
    with pytest.raises(ConfigError, match="rate_mbps"):
        model.validate_steer_out("steer/out/a/b", out(rate_mbps=-3))
    with pytest.raises(ConfigError, match="expected steer/in"):
        model.validate_steer_in("steer/in/x", {})


def test_ranges_and_single_addresses() -> None:
    assert model.parse_ts(["10.0.0.1", "10.0.0.5-10.0.0.9"], "k", "ts") == (
        Range(0x0A000001, 0x0A000001), Range(0x0A000005, 0x0A000009))
    with pytest.raises(ConfigError):
        model.parse_ts(["10.0.0.9-10.0.0.5"], "k", "ts")


def test_overlapping_selectors_of_one_vni_refused_other_vni_fine() -> None:
    st = model.build_state({
        **GPNS,
        P + "steer/out/acme/a": out(remote=["10.201.0.0/16"]),
        P + "steer/out/acme/b": out(remote=["10.201.5.0/24"]),  # inside a's: refused
        P + "steer/out/acme/c": out(remote=["10.202.0.0/24"]),  # disjoint: fine
        P + "steer/out/globex/a": out(vni=1002, remote=["10.201.0.0/16"]),  # same prefixes, other VNI
    })
    assert [(s.tenant, s.tunnel) for s in st.steer_out] == [("acme", "a"), ("acme", "c"), ("globex", "a")]
    assert len(st.errors) == 1 and "overlap" in st.errors[0] and "acme/a" in st.errors[0]


def test_keys_without_prefix_and_non_json() -> None:
    st = model.build_state({"gpn/nodes/gpn1": {"fabric_addr": "192.0.2.21"}, "gmn/leader": None})
    assert "gpn1" in st.gpns and st.gmn_addr is None and "JSON object" in st.errors[0]


def test_tunnel_id_is_short_and_stable() -> None:
    assert model.tunnel_id("acme", "hq") == model.tunnel_id("acme", "hq")
    assert model.tunnel_id("acme", "hq") != model.tunnel_id("acme", "h")
    assert len(model.tunnel_id("a" * 60, "b" * 60)) == 10


def test_tenant_vips_are_steered_vips() -> None:
    from protego.lb import model as m
    from protego.lb.ruleset import Params, vip_ranges

    st = m.build_state({"/protego/v1/tenants/acme": {"name": "acme", "vip": "203.0.113.11"},
                        "/protego/v1/tenants/bad": {"name": "bad", "vip": "not-an-ip"}})
    assert st.tenant_vips == ("203.0.113.11",)
    assert any("tenants/bad" in e for e in st.errors)
    ip = int(__import__("ipaddress").IPv4Address("203.0.113.11"))
    assert (ip, ip) in vip_ranges(st, Params())
