"""The GPN's tenant side: VXLAN framing, egress lookup, host directory (pure)."""

from __future__ import annotations

import ipaddress
import os
import random

from protego.esp.framing import build_ipv4_header
from protego.gpn.tenant import (
    GATEWAY_MAC,
    EgressRoute,
    EgressTable,
    HostDirectory,
    build_vxlan,
    mac_bytes,
    parse_vxlan,
)


def ip(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


def net(n: str) -> tuple[int, int]:
    x = ipaddress.IPv4Network(n)
    return int(x.network_address), int(x.broadcast_address)


HOST_MAC = mac_bytes("02:00:03:e9:00:01")


def test_vxlan_round_trip() -> None:
    inner = build_ipv4_header("10.1.0.10", "10.201.0.10", 17, 30) + os.urandom(30)
    frame = build_vxlan(1001, GATEWAY_MAC, inner, HOST_MAC)
    f = parse_vxlan(frame + b"\x00" * 6)  # Ethernet padding is trimmed
    assert f is not None
    assert (f.vni, f.src_mac, f.dst_mac, f.packet) == (1001, HOST_MAC, GATEWAY_MAC, inner)
    assert (f.src, f.dst) == (ip("10.1.0.10"), ip("10.201.0.10"))


def test_vxlan_refuses_what_is_not_ipv4_over_vxlan() -> None:
    inner = build_ipv4_header("10.1.0.10", "10.201.0.10", 17, 30) + bytes(30)
    good = build_vxlan(1001, GATEWAY_MAC, inner)
    assert parse_vxlan(b"\x00" + good[1:]) is None  # no I flag
    assert parse_vxlan(good[:20] + b"\x08\x06" + good[22:]) is None  # ARP
    assert parse_vxlan(good[:40]) is None  # truncated
    bad_len = bytearray(good)
    bad_len[24:26] = (2000).to_bytes(2, "big")
    assert parse_vxlan(bytes(bad_len)) is None
    rnd = random.Random(7)
    for _ in range(20000):
        n = rnd.randrange(0, 120)
        data = bytes(rnd.randrange(256) for _ in range(n))
        if rnd.random() < 0.5 and n > 8:
            data = b"\x08" + data[1:]
        parse_vxlan(data)  # never raises


def test_egress_table_keeps_tenants_apart_and_prefers_specific() -> None:
    t = EgressTable([
        EgressRoute(1001, (net("10.1.0.0/24"),), (net("10.201.0.0/24"),), 0xA),
        EgressRoute(1002, (net("10.1.0.0/24"),), (net("10.201.0.0/24"),), 0xB),  # same prefixes, other tenant
        EgressRoute(1001, (net("10.1.0.0/24"),), (net("10.0.0.0/8"),), 0xC),
    ])
    assert t.lookup(1001, ip("10.1.0.10"), ip("10.201.0.10")) == 0xA
    assert t.lookup(1002, ip("10.1.0.10"), ip("10.201.0.10")) == 0xB
    assert t.lookup(1001, ip("10.1.0.10"), ip("10.99.0.1")) == 0xC
    assert t.lookup(1001, ip("10.2.0.10"), ip("10.201.0.10")) is None  # source not in local_ts
    assert t.lookup(1003, ip("10.1.0.10"), ip("10.201.0.10")) is None
    assert t.lookup(1001, ip("10.1.0.10"), ip("10.201.0.10")) == 0xA  # cached
    assert len(t) == 3


def test_host_directory_from_etcd_and_learning() -> None:
    entries = HostDirectory.parse_etcd({
        "/protego/v1/vnet/1001/10.1.0.10": {"mac": "02:00:03:e9:00:01", "vtep": "192.0.2.101", "tenant": "acme"},
        "/protego/v1/vnet/1002/10.1.0.10": {"mac": "02:00:03:ea:00:01", "vtep": "192.0.2.102", "tenant": "globex"},
        "/protego/v1/vnet/x/10.1.0.10": {"mac": "02:00:03:ea:00:01", "vtep": "192.0.2.102"},
        "/protego/v1/vnet/1003/10.1.0.11": {"mac": "bad", "vtep": "192.0.2.102"},
    })
    d = HostDirectory()
    d.replace(entries)
    assert len(entries) == 2
    assert d.lookup(1001, ip("10.1.0.10")) == (HOST_MAC, "192.0.2.101")
    assert d.lookup(1002, ip("10.1.0.10"))[1] == "192.0.2.102"  # type: ignore[index]
    assert d.lookup(1001, ip("10.1.0.20")) is None
    d.learn(1001, ip("10.1.0.20"), HOST_MAC, "192.0.2.120")
    d.learn(1001, ip("10.1.0.10"), HOST_MAC, "192.0.2.199")  # the directory wins
    assert d.lookup(1001, ip("10.1.0.20")) == (HOST_MAC, "192.0.2.120")
    assert d.lookup(1001, ip("10.1.0.10")) == (HOST_MAC, "192.0.2.101")
