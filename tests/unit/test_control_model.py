"""Tenant and tunnel definitions: validation names the field, nothing else happens."""

from __future__ import annotations

import pytest

from protego.control.model import (
    Tenant,
    Tunnel,
    overlapping_selectors,
    parse_duration,
    validate_esp_proposal,
    validate_ike_proposal,
)
from protego.errors import ConfigError

ACME = Tenant("acme", 1001, "10.1.0.0/24", "203.0.113.11")


def tun(**kw):  # type: ignore[no-untyped-def]
    base = dict(tenant="acme", name="hq", remote_addrs="198.18.1.1", remote_ts=("10.201.0.0/24",))
    base.update(kw)
    return Tunnel(**base)


@pytest.mark.parametrize("p", ["aes128gcm16-prfsha256-ecp256", "aes256-sha256-modp2048",
                               "aes128-sha1-modp2048", "aes256gcm16-prfsha384-x25519"])
def test_good_ike_proposals(p: str) -> None:
    assert validate_ike_proposal(p) == p


@pytest.mark.parametrize("p,msg", [
    ("aes128gcm16-ecp256", "needs a PRF"),
    ("aes128-sha256", "no key exchange"),
    ("aes128-modp2048", "no integrity"),
    ("des-sha1-modp1024", "unknown or unsupported algorithm 'des'"),
    ("aes128--sha1", "malformed proposal"),
    ("AES128-SHA1-MODP2048", "malformed proposal"),
])
def test_bad_ike_proposals(p: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        validate_ike_proposal(p)


@pytest.mark.parametrize("p", ["aes128gcm16", "aes256gcm16-esn", "aes128-sha1", "aes256-sha256-modp2048"])
def test_good_esp_proposals(p: str) -> None:
    assert validate_esp_proposal(p) == p


@pytest.mark.parametrize("p,msg", [
    ("aes128gcm16-sha256", "AEAD algorithm takes no integrity"),
    ("aes128", "needs an integrity algorithm"),
    ("chacha20poly1305", "not supported by Protego's data plane"),
    ("sha256", "no encryption algorithm"),
])
def test_bad_esp_proposals(p: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        validate_esp_proposal(p)


def test_tenant_validation() -> None:
    assert ACME.validate() is ACME
    with pytest.raises(ConfigError, match="VNI 0 out of range"):
        Tenant("a", 0, "10.1.0.0/24", "203.0.113.1").validate()
    with pytest.raises(ConfigError, match="malformed prefix"):
        Tenant("a", 1, "10.1.0.1/24", "203.0.113.1").validate()
    with pytest.raises(ConfigError, match="malformed address '203.0.113'"):
        Tenant("a", 1, "10.1.0.0/24", "203.0.113").validate()
    with pytest.raises(ConfigError, match="inside the tenant's own network"):
        Tenant("a", 1, "10.1.0.0/24", "10.1.0.9").validate()
    with pytest.raises(ConfigError, match="tenant name 'A_b'"):
        Tenant("A_b", 1, "10.1.0.0/24", "203.0.113.1").validate()


def test_tunnel_validation_and_defaults() -> None:
    t = tun().validate(ACME)
    assert t.effective_local_ts(ACME) == ("10.1.0.0/24",)
    assert t.effective_local_id(ACME) == "203.0.113.11"
    assert t.effective_remote_id() == "198.18.1.1"
    assert t.effective_life_time() == 3960


@pytest.mark.parametrize("kw,msg", [
    (dict(remote_addrs="198.18.1"), "malformed address"),
    (dict(remote_ts=()), "at least one remote traffic selector"),
    (dict(remote_ts=("10.1.0.0/16",)), "overlaps the tenant's network"),
    (dict(local_ts=("10.9.0.0/24",)), "not inside the tenant's network"),
    (dict(esp_proposals="3des-md5"), "esp proposal"),
    (dict(rekey_time=0), "rekey_time must be a positive"),
    (dict(rekey_time=100, life_time=50), "life_time .50s. must exceed"),
    (dict(rate_mbps=-1), "not a number in range"),
    (dict(name="Bad Name"), "tunnel name"),
    (dict(auth="pubkey"), "not supported"),
])
def test_tunnel_validation_errors(kw, msg) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=msg):
        tun(**kw).validate(ACME)


def test_overlapping_selectors_within_tenant() -> None:
    a = tun(name="a", remote_ts=("10.201.0.0/24",))
    b = tun(name="b", remote_ts=("10.202.0.0/24", "10.201.0.128/25"))
    c = tun(name="c", remote_ts=("10.203.0.0/24",))
    assert overlapping_selectors(b, [a, c]) == ("a", "10.201.0.0/24", "10.201.0.128/25")
    assert overlapping_selectors(c, [a, b]) is None


def test_json_round_trip_keeps_unknown_fields() -> None:
    t = tun(rate_mbps=50.0)
    d = t.to_json()
    assert Tunnel.from_json(d) == t
    d["future_field"] = 1
    assert Tunnel.from_json(d).extra == {"future_field": 1}


def test_durations() -> None:
    assert parse_duration("x", "90") == 90
    assert parse_duration("x", "30m") == 1800
    assert parse_duration("x", "4h") == 14400
    assert parse_duration("x", "1d") == 86400
    with pytest.raises(ConfigError, match="x: malformed duration"):
        parse_duration("x", "4 hours")


def test_steer_out_tunnel_reads_back_the_key() -> None:
    from protego.control.model import PREFIX, steer_out_tunnel
    from protego.gmn.records import steer_out_key

    assert steer_out_tunnel(steer_out_key("acme", "hq")) == ("acme", "hq")
    for other in (f"{PREFIX}steer/out/acme", f"{PREFIX}steer/out/acme/hq/x", f"{PREFIX}steer/out//hq",
                  f"{PREFIX}steer/in/203.0.113.11/c0000001", "steer/out/acme/hq"):
        assert steer_out_tunnel(other) is None
