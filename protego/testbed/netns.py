"""Apply a testbed :class:`~protego.testbed.plan.Plan` with pyroute2 (netlink only).

All netlink work for the testbed sits here; the plan itself is pure.  Sysctls
are written through ``/proc/sys`` of a short-lived ``ip netns exec`` child, one
per namespace, never by ``setns()`` in this (possibly threaded) process.
"""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute, NetlinkError, NetNS, netns

from protego.errors import TestbedError
from protego.testbed.plan import Plan

log = logging.getLogger(__name__)


def list_netns() -> set[str]:
    return set(netns.listnetns())


def create_netns(name: str) -> None:
    if name in list_netns():
        raise TestbedError(f"network namespace {name} already exists; is another testbed using this name?")
    netns.create(name)


def remove_netns(name: str) -> bool:
    if name not in list_netns():
        return False
    netns.remove(name)
    return True


@contextmanager
def _ns(name: str | None) -> Iterator[IPRoute | NetNS]:
    ip: IPRoute | NetNS = IPRoute() if name is None else NetNS(name)
    try:
        yield ip
    finally:
        ip.close()


def _index(ip: IPRoute | NetNS, ifname: str) -> int:
    found = ip.link_lookup(ifname=ifname)
    if not found:
        raise TestbedError(f"interface {ifname} not found")
    return int(found[0])


def _add_addrs(ip: IPRoute | NetNS, ifname: str, cidrs: tuple[str, ...]) -> None:
    idx = _index(ip, ifname)
    for cidr in cidrs:
        addr, plen = cidr.split("/")
        ip.addr("add", index=idx, address=addr, prefixlen=int(plen))


def host_link_exists(ifname: str) -> bool:
    with IPRoute() as ip:
        return bool(ip.link_lookup(ifname=ifname))


def remove_host_link(ifname: str) -> bool:
    with IPRoute() as ip:
        found = ip.link_lookup(ifname=ifname)
        if not found:
            return False
        try:
            ip.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
        return True


def sysctls(ns: str, values: dict[str, str]) -> None:
    script = "; ".join(f"echo {v} > /proc/sys/{k.replace('.', '/')}" for k, v in values.items())
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-ec", script], check=True, capture_output=True)


_ETHTOOL_TX_OFF = """
import ctypes, fcntl, socket, struct, sys
SIOCETHTOOL, ETHTOOL_STXCSUM = 0x8946, 0x17
val = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_STXCSUM, 0))
ifr = struct.pack("16sP", sys.argv[1].encode(), ctypes.addressof(val)) + bytes(16)
fcntl.ioctl(socket.socket(), SIOCETHTOOL, ifr)
"""


def tx_checksum_off(ns: str, ifname: str) -> None:
    """Turn off TX checksum offload of ``ifname`` in ``ns`` (the ethtool ioctl; no ethtool here).

    A tenant host's TCP over VXLAN on a veth leaves the inner checksum to "hardware"
    (CHECKSUM_PARTIAL travels through veth); a userspace GPN reads the VXLAN payload
    as bytes and would encrypt a segment whose checksum was never filled in. A real
    NIC completes it; in the lab the sender must."""
    res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _ETHTOOL_TX_OFF, ifname],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise TestbedError(f"TX checksum offload off on {ns}/{ifname}: {res.stderr.strip()}")


def apply_plan(plan: Plan, on_netns_created: Callable[[str], None], on_host_link: Callable[[str], None]) -> None:
    """Create every namespace, link, address and route of ``plan``.

    ``on_netns_created``/``on_host_link`` are called *before* each creation so the
    caller can journal it for rollback.
    """
    for n in plan.namespaces:
        on_netns_created(n.name)
        create_netns(n.name)
        with _ns(n.name) as ip:
            ip.link("set", index=_index(ip, "lo"), state="up")
        base = {
            "net.ipv4.ip_forward": "1" if n.forwarding else "0",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
            "net.ipv6.conf.all.disable_ipv6": "1",
            "net.ipv6.conf.default.disable_ipv6": "1",
        }
        if n.role == "router":
            base["net.ipv4.conf.all.send_redirects"] = "0"
            base["net.ipv4.conf.default.send_redirects"] = "0"
        sysctls(n.name, base)

    for b in plan.bridges:
        with _ns(b.ns) as ip:
            ip.link("add", ifname=b.name, kind="bridge")
            _add_addrs(ip, b.name, b.addrs)
            ip.link("set", index=_index(ip, b.name), state="up")

    for v in plan.veths:
        if v.ns_a is None:
            on_host_link(v.name_a)
        with _ns(v.ns_a) as ip:
            ip.link("add", ifname=v.name_a, kind="veth", peer={"ifname": v.name_b, "net_ns_fd": v.ns_b})
            idx = _index(ip, v.name_a)
            if v.master_a:
                ip.link("set", index=idx, master=_index(ip, v.master_a))
            _add_addrs(ip, v.name_a, v.addrs_a)
            ip.link("set", index=idx, state="up")
        with _ns(v.ns_b) as ip:
            idx = _index(ip, v.name_b)
            if v.master_b:
                ip.link("set", index=idx, master=_index(ip, v.master_b))
            _add_addrs(ip, v.name_b, v.addrs_b)
            ip.link("set", index=idx, state="up")

    for x in plan.vxlans:
        with _ns(x.ns) as ip:
            ip.link(
                "add", ifname=x.name, kind="vxlan", vxlan_id=x.vni, vxlan_local=x.local,
                vxlan_port=4789, vxlan_link=_index(ip, x.underlay), vxlan_learning=1,
            )
            idx = _index(ip, x.name)
            if x.mac:
                ip.link("set", index=idx, address=x.mac)
            for remote in x.remotes:
                ip.fdb("append", ifindex=idx, lladdr="00:00:00:00:00:00", dst=remote)
            for mac, vtep in x.fdb:
                ip.fdb("append", ifindex=idx, lladdr=mac, dst=vtep)
            for addr, mac in x.neigh:
                ip.neigh("add", dst=addr, lladdr=mac, ifindex=idx, state=0x80)  # NUD_PERMANENT
            _add_addrs(ip, x.name, x.addrs)
            ip.link("set", index=idx, state="up")
        if x.mac:  # a tenant host
            tx_checksum_off(x.ns, x.name)

    for lo in plan.loopback:
        with _ns(lo.ns) as ip:
            _add_addrs(ip, "lo", (lo.addr,))

    for r in plan.routes:
        with _ns(r.ns) as ip:
            dst = "0.0.0.0/0" if r.dst == "default" else r.dst
            ip.route("add", dst=dst, gateway=r.via)
