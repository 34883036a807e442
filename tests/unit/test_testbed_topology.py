"""Topology parsing and validation: bad input is rejected naming the place."""

from __future__ import annotations

import dataclasses
import ipaddress
import re

import pytest

from protego.errors import ConfigError
from protego.testbed.topology import (
    DEFAULT_TIMINGS,
    Timings,
    builtin_topology_text,
    default_topology_text,
    load_topology,
    load_topology_source,
    parse_topology,
)

MINIMAL = """
[[tenants]]
name = "a"
vni = 10
network = "10.1.0.0/24"
vip = "203.0.113.1"
hosts = ["10.1.0.10"]

[[sites]]
name = "s"
tenant = "a"
public = "198.18.1.1"
network = "10.2.0.0/24"
hosts = ["10.2.0.10"]
"""


def test_default_topology_is_valid_and_has_overlapping_tenants() -> None:
    topo = load_topology(None)
    assert len(topo.tenants) >= 3
    nets = [t.network for t in topo.tenants]
    assert len(set(nets)) < len(nets), "the default must exercise overlapping tenant prefixes"
    assert topo.etcd_members == 1 and topo.gpns >= 2
    for s in topo.sites:
        assert s.public in topo.internet
        assert not s.network.overlaps(topo.tenant(s.tenant).network)


def test_minimal_defaults() -> None:
    topo = parse_topology(MINIMAL)
    assert topo.router == ipaddress.IPv4Address("198.18.0.1")
    assert topo.gin == ipaddress.IPv4Address("198.18.0.2")
    assert topo.tenants[0].gateway == ipaddress.IPv4Address("10.1.0.1")
    assert topo.sites[0].gateway == ipaddress.IPv4Address("10.2.0.1")
    assert topo.sites[0].esp_proposal == "aes128gcm16"


def _err(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_topology(text, source="topo.toml")
    msg = str(ei.value)
    assert msg.startswith("topo.toml: ")
    assert "\n" not in msg
    return msg


def test_syntax_error_names_line() -> None:
    msg = _err(MINIMAL.replace('vni = 10', 'vni = = 10'))
    assert "TOML syntax error" in msg
    assert re.search(r"line \d+", msg)


def test_unknown_field_names_entry_and_field() -> None:
    msg = _err(MINIMAL.replace('public = "198.18.1.1"', 'publik = "198.18.1.1"'))
    assert "sites[0] (s)" in msg and "unknown field 'publik'" in msg


def test_unknown_top_level_section() -> None:
    assert "unknown field 'gpn'" in _err("[gpn]\nx=1\n" + MINIMAL)


SECOND_SITE = """
[[sites]]
name = "s2"
tenant = "a"
public = "198.18.1.1"
network = "10.3.0.0/24"
hosts = ["10.3.0.10"]
"""


def test_duplicate_public_address() -> None:
    msg = _err(MINIMAL + SECOND_SITE)
    assert "sites[1] (s2).public" in msg and "duplicate address 198.18.1.1" in msg
    assert "sites[0] (s).public" in msg  # names the first user too


def test_sites_of_one_tenant_must_not_overlap() -> None:
    text = MINIMAL + SECOND_SITE.replace("198.18.1.1", "198.18.1.2").replace("10.3.0", "10.2.0")
    assert "overlaps site 's'" in _err(text)


def test_duplicate_host_address() -> None:
    msg = _err(MINIMAL.replace('hosts = ["10.1.0.10"]', 'hosts = ["10.1.0.10", "10.1.0.10"]'))
    assert "tenants[0] (a).hosts[1]" in msg and "duplicate address 10.1.0.10" in msg


def test_host_equal_to_gateway_is_duplicate() -> None:
    msg = _err(MINIMAL.replace('hosts = ["10.1.0.10"]', 'hosts = ["10.1.0.1"]'))
    assert "duplicate address 10.1.0.1" in msg


def test_duplicate_vip() -> None:
    text = MINIMAL.replace("[[sites]]", """[[tenants]]
name = "b"
vni = 11
network = "10.1.0.0/24"
vip = "203.0.113.1"
hosts = ["10.1.0.10"]

[[sites]]""")
    msg = _err(text)
    assert "tenants[1] (b).vip" in msg and "duplicate address 203.0.113.1" in msg


def test_missing_site_peer() -> None:
    msg = _err(MINIMAL.replace('tenant = "a"', 'tenant = "nobody"'))
    assert "sites[0] (s).tenant" in msg and "'nobody'" in msg and "not defined" in msg


def test_missing_field() -> None:
    msg = _err(MINIMAL.replace('vip = "203.0.113.1"\n', ""))
    assert "tenants[0]" in msg and "missing field 'vip'" in msg


def test_malformed_address_and_prefix() -> None:
    assert "malformed IPv4 address '198.18.1'" in _err(MINIMAL.replace('"198.18.1.1"', '"198.18.1"'))
    assert "malformed IPv4 prefix" in _err(MINIMAL.replace('"10.2.0.0/24"', '"10.2.0.1/24"'))


def test_site_overlapping_its_tenant() -> None:
    msg = _err(MINIMAL.replace('network = "10.2.0.0/24"', 'network = "10.1.0.0/16"').replace("10.2.0.10", "10.1.5.10"))
    assert "overlaps its tenant's network" in msg


def test_duplicate_vni_and_names() -> None:
    two = MINIMAL.replace("[[sites]]", """[[tenants]]
name = "a"
vni = 11
network = "10.9.0.0/24"
vip = "203.0.113.2"
hosts = ["10.9.0.10"]

[[sites]]""")
    assert "duplicate tenant name 'a'" in _err(two)
    assert "duplicate VNI 10" in _err(two.replace('name = "a"\nvni = 11', 'name = "b"\nvni = 10'))


def test_out_of_range_parameters() -> None:
    assert "[testbed].etcd_members" in _err("[testbed]\netcd_members = 2\n" + MINIMAL)
    assert "out of range" in _err("[testbed]\ngpns = 0\n" + MINIMAL)
    assert "bad name" in _err(MINIMAL.replace('name = "s"', 'name = "S!"'))


def test_default_text_round_trips() -> None:
    assert parse_topology(default_topology_text()) == load_topology(None)


def test_unreadable_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="cannot read topology"):
        load_topology(tmp_path / "missing.toml")


# ----------------------------------------------------------------------------
# [timings] and [testbed].gpn_backends


def test_timings_default_to_the_hosts_values() -> None:
    t = parse_topology(MINIMAL).timings
    assert t == DEFAULT_TIMINGS
    assert (t.hb_interval_ms, t.hb_misses, t.gmn_lease_ttl) == (50, 3, 2)
    assert t.daemon_start_s == 30 and t.tunnel_wait_s == 60
    # the default file writes the defaults out
    assert load_topology(None).timings == DEFAULT_TIMINGS


def test_timings_are_read() -> None:
    topo = parse_topology("[timings]\nhb_interval_ms = 500\nhb_misses = 5\ngmn_lease_ttl = 5\n"
                          "daemon_start_s = 90.5\ntunnel_wait_s = 180\napply_timeout_s = 4\n" + MINIMAL)
    assert topo.timings == Timings(hb_interval_ms=500, hb_misses=5, gmn_lease_ttl=5, daemon_start_s=90.5,
                                   tunnel_wait_s=180, apply_timeout_s=4)


@pytest.mark.parametrize(("line", "expected"), [
    ("hb_interval_ms = 0", "[timings].hb_interval_ms: 0 is out of range 1..10000"),
    ("hb_interval_ms = \"50\"", "[timings].hb_interval_ms: expected a number, got '50'"),
    ("hb_misses = 0", "[timings].hb_misses: 0 is out of range 1..100"),
    ("hb_misses = 2.5", "[timings].hb_misses: expected an integer, got 2.5"),
    ("gmn_lease_ttl = 1", "[timings].gmn_lease_ttl: 1 is out of range 2..60"),
    ("daemon_start_s = true", "[timings].daemon_start_s: expected a number, got True"),
    ("tunnel_wait_s = -1", "[timings].tunnel_wait_s: -1 is out of range 1..3600"),
    ("apply_timeout_s = 5", "[timings].apply_timeout_s: 5 is out of range 0.1..4.5"),
    ("hb_interval = 50", "[timings]: unknown field 'hb_interval' (allowed: apply_timeout_s, daemon_start_s, "
                         "gmn_lease_ttl, hb_interval_ms, hb_misses, tunnel_wait_s)"),
])
def test_bad_timings_name_the_field(line: str, expected: str) -> None:
    assert _err(f"[timings]\n{line}\n" + MINIMAL) == f"topo.toml: {expected}"


def test_gpn_backends_one_per_gpn() -> None:
    topo = parse_topology('[testbed]\ngpns = 2\ngpn_backends = ["xfrm", "userspace"]\n' + MINIMAL)
    assert topo.gpn_backends == ("xfrm", "userspace")
    assert parse_topology(MINIMAL).gpn_backends == ()
    msg = _err('[testbed]\ngpns = 2\ngpn_backends = ["xfrm"]\n' + MINIMAL)
    assert msg == "topo.toml: [testbed].gpn_backends: 1 backends for 2 GPNs (one per GPN: [testbed].gpns)"
    msg = _err('[testbed]\ngpns = 2\ngpn_backends = ["xfrm", "kernel"]\n' + MINIMAL)
    assert msg == ("topo.toml: [testbed].gpn_backends[1]: unknown backend 'kernel' "
                   "(expected one of userspace, xfrm, auto)")
    assert "[testbed].gpn_backends: expected a list" in _err('[testbed]\ngpn_backends = "xfrm"\n' + MINIMAL)


def test_packaged_topologies_load_by_name() -> None:
    lane = load_topology("lane")
    default = load_topology("default")
    assert lane.source == "<lane topology>" and default.source == "<default topology>"
    assert load_topology_source(lane.source) == lane
    assert load_topology_source(default.source) == default == load_topology(None)
    # the lane is the default's deployment with relaxed timings
    assert dataclasses.replace(lane, timings=DEFAULT_TIMINGS) == default
    t = lane.timings
    assert t.hb_interval_ms >= 500 and t.gmn_lease_ttl >= 5 and t.daemon_start_s >= 90
    assert t.tunnel_wait_s >= t.daemon_start_s
    with pytest.raises(ConfigError, match="no packaged topology named 'nope'"):
        builtin_topology_text("nope")


def test_a_path_is_always_a_file(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lane").write_text(MINIMAL)
    assert load_topology("lane").source == "<lane topology>"  # the bare name: the packaged one
    assert load_topology("./lane").tenants[0].name == "a"
    assert load_topology(tmp_path / "lane").source == str(tmp_path / "lane")
