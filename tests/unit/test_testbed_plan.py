"""The testbed plan is pure: namespaces, links and addresses for a topology."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from protego.errors import ConfigError, TestbedError
from protego.testbed.plan import build_plan, describe_backends, gpn_backends, mgmt_subnet
from protego.testbed.strongswan import (
    KERNEL_PLUGINS,
    LIBIPSEC_PLUGINS,
    CharonFiles,
    baseline_swanctl_conf,
    choose_site_esp,
    site_swanctl_conf,
    strongswan_conf,
)
from protego.testbed.topology import default_topology_text, load_topology, parse_topology


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


def _load_list(conf: str) -> list[str]:
    load = next(line for line in conf.splitlines() if line.strip().startswith("load ="))
    return load.split("=", 1)[1].split()


def test_site_esp_chooses_the_plugin_list(tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = CharonFiles(tmp_path)
    libipsec = _load_list(strongswan_conf(files, tmp_path / "x.log"))  # the default: today's peers
    assert libipsec == LIBIPSEC_PLUGINS.split()
    kernel = _load_list(strongswan_conf(files, tmp_path / "x.log", "kernel"))
    assert kernel == KERNEL_PLUGINS.split()
    # the kernel's XFRM through kernel-netlink: no userspace ESP, no TUN, no unused updown
    assert "kernel-netlink" in kernel and "kernel-libipsec" not in kernel and "updown" not in kernel
    assert {"kdf", "openssl", "vici", "socket-default"} <= set(kernel)
    # the rest of the two configurations is the same
    conf_l = strongswan_conf(files, tmp_path / "x.log", "libipsec").replace(LIBIPSEC_PLUGINS, "X")
    conf_k = strongswan_conf(files, tmp_path / "x.log", "kernel").replace(KERNEL_PLUGINS, "X")
    assert conf_l == conf_k
    with pytest.raises(ValueError):
        strongswan_conf(files, tmp_path / "x.log", "tun")  # type: ignore[arg-type]


def test_site_esp_follows_the_kernel_unless_overridden() -> None:
    asked: list[int] = []

    def probe(answer: bool):  # type: ignore[no-untyped-def]
        def ask() -> bool:
            asked.append(1)
            return answer
        return ask

    assert choose_site_esp(None, probe(True)) == "kernel"
    assert choose_site_esp("auto", probe(False)) == "libipsec"
    assert choose_site_esp("", probe(True)) == "kernel"
    assert len(asked) == 3
    assert choose_site_esp("libipsec", probe(True)) == "libipsec"
    assert choose_site_esp("kernel", probe(False)) == "kernel"  # preflight then refuses a kernel without ESP
    assert len(asked) == 3  # an explicit choice asks nothing
    with pytest.raises(TestbedError, match="PROTEGO_TESTBED_SITE_ESP='xfrm': expected one of libipsec, kernel"):
        choose_site_esp("xfrm", probe(True))


def test_gpn_backends_cli_then_topology_then_userspace(topo) -> None:  # type: ignore[no-untyped-def]
    assert gpn_backends(topo) == {"gpn1": "userspace", "gpn2": "userspace"}
    assert gpn_backends(topo, "auto") == {"gpn1": "auto", "gpn2": "auto"}
    mixed = parse_topology(default_topology_text().replace(
        "gpns = 2 ", 'gpns = 2\ngpn_backends = ["xfrm", "userspace"] '))
    assert gpn_backends(mixed) == {"gpn1": "xfrm", "gpn2": "userspace"}
    assert gpn_backends(mixed, "userspace") == {"gpn1": "userspace", "gpn2": "userspace"}
    with pytest.raises(ConfigError, match="--backend 'kernel'"):
        gpn_backends(topo, "kernel")


def test_the_progress_line_names_the_real_backends() -> None:
    assert describe_backends({"gpn1": "userspace", "gpn2": "userspace"}) == "userspace ESP engine"
    assert describe_backends({"gpn1": "xfrm", "gpn2": "xfrm"}) == "kernel XFRM"
    assert describe_backends({"gpn1": "xfrm", "gpn2": "userspace"}) == \
        "gpn1: kernel XFRM, gpn2: userspace ESP engine"
