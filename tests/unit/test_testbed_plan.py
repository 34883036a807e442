"""The testbed plan is pure: namespaces, links and addresses for a topology."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from protego.testbed.plan import build_plan, mgmt_subnet
from protego.testbed.strongswan import CharonFiles, baseline_swanctl_conf, site_swanctl_conf, strongswan_conf
from protego.testbed.topology import load_topology


@pytest.fixture(scope="module")
def topo():  # type: ignore[no-untyped-def]
    return load_topology(None)


@pytest.mark.parametrize("mode", ["protego", "baseline"])
def test_names_are_prefixed_and_unique(topo, mode) -> None:  # type: ignore[no-untyped-def]
    plan = build_plan(topo, "tb1", mode, 5)
    names = [n.name for n in plan.namespaces]
    assert len(names) == len(set(names))
    assert all(n.startswith("tb1-") for n in names)
    # the only thing in the host namespace is the management veth, named after the testbed
    host_side = [v for v in plan.veths if v.ns_a is None]
    assert [v.name_a for v in host_side] == ["pmtb1"]
    assert all(len(v.name_a) <= 15 and len(v.name_b) <= 15 for v in plan.veths)
    # interface names are unique within each namespace
    per_ns = Counter()
    for v in plan.veths:
        per_ns[(v.ns_a, v.name_a)] += 1
        per_ns[(v.ns_b, v.name_b)] += 1
    for b in plan.bridges:
        per_ns[(b.ns, b.name)] += 1
    for x in plan.vxlans:
        per_ns[(x.ns, x.name)] += 1
    assert max(per_ns.values()) == 1


@pytest.mark.parametrize("mode", ["protego", "baseline"])
def test_addresses_unique_per_segment(topo, mode) -> None:  # type: ignore[no-untyped-def]
    plan = build_plan(topo, "tb1", mode, 5)
    by_net: dict[ipaddress.IPv4Network, list[ipaddress.IPv4Address]] = {}
    for v in plan.veths:
        for cidr in v.addrs_a + v.addrs_b:
            iface = ipaddress.IPv4Interface(cidr)
            by_net.setdefault(iface.network, []).append(iface.ip)
    for b in plan.bridges:
        for cidr in b.addrs:
            iface = ipaddress.IPv4Interface(cidr)
            by_net.setdefault(iface.network, []).append(iface.ip)
    for net, addrs in by_net.items():
        if net.is_private and net.overlaps(ipaddress.IPv4Network("10.0.0.0/8")):
            continue  # site LANs are separate segments
        assert len(addrs) == len(set(addrs)), f"duplicate address on {net}"


def test_protego_mode_routes_vips_to_gin(topo) -> None:  # type: ignore[no-untyped-def]
    plan = build_plan(topo, "tb1", "protego", 5)
    vip_routes = {r.dst: r.via for r in plan.routes if r.ns == "tb1-inet"}
    assert vip_routes == {f"{t.vip}/32": str(topo.gin) for t in topo.tenants}
    roles = Counter(n.role for n in plan.namespaces)
    assert roles["gmn"] == 2 and roles["gpn"] == topo.gpns and roles["gin"] == 1
    assert not [c for c in plan.charons if c.kind == "baseline"]


def test_baseline_mode_one_gateway_per_tenant(topo) -> None:  # type: ignore[no-untyped-def]
    plan = build_plan(topo, "tb1", "baseline", 5)
    gws = [c for c in plan.charons if c.kind == "baseline"]
    assert sorted(c.tenant for c in gws) == sorted(t.name for t in topo.tenants)
    assert {lo.addr for lo in plan.loopback} == {f"{t.vip}/32" for t in topo.tenants}
    # each tenant's VXLAN segment connects only its own hosts and its own gateway
    for t in topo.tenants:
        segs = [x for x in plan.vxlans if x.vni == t.vni]
        members = {x.local for x in segs}
        for x in segs:
            assert set(x.remotes) <= members - {x.local}
            assert set(x.remotes) == members - {x.local}


def test_sites_identical_in_both_modes(topo) -> None:  # type: ignore[no-untyped-def]
    """Sites' peers are configured identically in protego and baseline mode."""
    a = build_plan(topo, "tb1", "protego", 5)
    b = build_plan(topo, "tb1", "baseline", 5)
    assert [c for c in a.charons if c.kind == "site"] == [c for c in b.charons if c.kind == "site"]
    site_ns = {n.name for n in a.namespaces if n.role in ("site", "site-host")}
    assert site_ns == {n.name for n in b.namespaces if n.role in ("site", "site-host")}
    assert [r for r in a.routes if r.ns in site_ns] == [r for r in b.routes if r.ns in site_ns]


def test_mgmt_subnet_bounds() -> None:
    assert str(mgmt_subnet(1)) == "198.19.1.0/24"
    with pytest.raises(ValueError):
        mgmt_subnet(0)
    with pytest.raises(ValueError):
        mgmt_subnet(255)


def test_strongswan_config_has_no_secret_and_libipsec_first(topo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = CharonFiles(tmp_path)
    conf = strongswan_conf(files, tmp_path / "x.log")
    load = next(line for line in conf.splitlines() if line.strip().startswith("load ="))
    plugins = load.split("=", 1)[1].split()
    assert plugins.index("kernel-libipsec") < plugins.index("kernel-netlink")
    assert "kdf" in plugins and "vici" in plugins
    assert f"socket = unix://{tmp_path}/charon.vici" in conf
    for t in topo.tenants:
        text = baseline_swanctl_conf(topo, t)
        assert "\nsecrets {" not in text and "psk =" not in text.replace("auth = psk", "")
        for s in topo.sites_of(t.name):
            assert f"remote_addrs = {s.public}" in text
            assert f"local_ts = {t.network}" in text
    s = topo.sites[0]
    text = site_swanctl_conf(s, topo.tenant(s.tenant))
    assert f"remote_addrs = {topo.tenant(s.tenant).vip}" in text and "start_action = start" in text
