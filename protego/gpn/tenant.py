"""The tenant side of the GPN (pure): VXLAN frames, egress lookup, host directory.

Egress: the GEN forwards a tenant host's whole VXLAN packet (UDP 4789) to the GPN
that owns the tunnel. :func:`parse_vxlan` takes the UDP payload apart (VNI, inner
Ethernet, inner IPv4 packet); :class:`EgressTable` finds the tunnel by
(VNI, inner source in ``local_ts``, inner destination in ``remote_ts``) -- the VNI
keeps tenants with overlapping prefixes apart.

Ingress: a decrypted packet goes to the tenant host through VXLAN with the
tenant's VNI; :class:`HostDirectory` knows where each host is (MAC and VTEP), from
the VNET directory in etcd (``/protego/v1/vnet/<vni>/<ip>``) and from what egress
frames teach (VNI, source IP -> source MAC, outer source address).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable
from typing import NamedTuple

__all__ = [
    "GATEWAY_MAC",
    "VXLAN_PORT",
    "EgressRoute",
    "EgressTable",
    "HostDirectory",
    "VxlanFrame",
    "build_vxlan",
    "mac_bytes",
    "parse_vxlan",
]

VXLAN_PORT = 4789
GATEWAY_MAC = bytes.fromhex("020000000001")  # the tenant gateway's MAC (docs/lb.md)
_ETH_IPV4 = b"\x08\x00"
_VXLAN_FLAGS = 0x08000000  # I flag
_U32 = struct.Struct("!I")
_HDR = struct.Struct("!II")


def mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return raw


class VxlanFrame(NamedTuple):
    vni: int
    src_mac: bytes
    dst_mac: bytes
    packet: bytes  # the inner IPv4 packet (trimmed to its total length)
    src: int  # inner source address as an integer
    dst: int  # inner destination address


def parse_vxlan(payload: bytes) -> VxlanFrame | None:
    """A VXLAN UDP payload carrying Ethernet + IPv4 -> its parts; ``None`` otherwise
    (no I flag, not IPv4, malformed or truncated inner header)."""
    if len(payload) < 8 + 14 + 20:
        return None
    flags, word = _HDR.unpack_from(payload)
    if not flags & _VXLAN_FLAGS:
        return None
    if payload[20:22] != _ETH_IPV4:
        return None
    ip = payload[22:]
    vihl = ip[0]
    if vihl >> 4 != 4 or vihl & 0x0F < 5:
        return None
    total = (ip[2] << 8) | ip[3]
    if total < (vihl & 0x0F) * 4 or total > len(ip):
        return None
    if total < len(ip):
        ip = ip[:total]
    return VxlanFrame(word >> 8, payload[14:20], payload[8:14], ip,
                      _U32.unpack_from(ip, 12)[0], _U32.unpack_from(ip, 16)[0])


def build_vxlan(vni: int, dst_mac: bytes, packet: bytes, src_mac: bytes = GATEWAY_MAC) -> bytes:
    """VXLAN header + Ethernet (IPv4) + ``packet`` (the UDP payload to send to a VTEP)."""
    return b"".join((_HDR.pack(_VXLAN_FLAGS, vni << 8), dst_mac, src_mac, _ETH_IPV4, packet))


class EgressRoute(NamedTuple):
    vni: int
    local: tuple[tuple[int, int], ...]  # inner source ranges (the tenant's side)
    remote: tuple[tuple[int, int], ...]  # inner destination ranges (the site's side)
    spi: int  # the outbound SA to use


class EgressTable:
    """(VNI, inner src, inner dst) -> outbound SPI. Per VNI a short list of routes,
    most specific remote range first; a small per-(vni, src, dst) cache in front."""

    __slots__ = ("_by_vni", "_cache")

    def __init__(self, routes: Iterable[EgressRoute] = ()) -> None:
        by_vni: dict[int, list[EgressRoute]] = {}
        for r in routes:
            by_vni.setdefault(r.vni, []).append(r)
        for lst in by_vni.values():
            lst.sort(key=lambda r: min((b - a for a, b in r.remote), default=1 << 32))
        self._by_vni = by_vni
        self._cache: dict[tuple[int, int, int], int | None] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_vni.values())

    def lookup(self, vni: int, src: int, dst: int) -> int | None:
        key = (vni, src, dst)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found = None
        for r in self._by_vni.get(vni, ()):
            if any(a <= dst <= b for a, b in r.remote) and (
                    not r.local or any(a <= src <= b for a, b in r.local)):
                found = r.spi
                break
        if len(self._cache) > 65536:
            self._cache.clear()
        self._cache[key] = found
        return found


class HostDirectory:
    """(VNI, host IP) -> (MAC, VTEP address). Directory entries from etcd are
    authoritative; learned entries (from egress frames) fill the gaps."""

    __slots__ = ("_known", "_learned")

    def __init__(self) -> None:
        self._known: dict[tuple[int, int], tuple[bytes, str]] = {}
        self._learned: dict[tuple[int, int], tuple[bytes, str]] = {}

    def replace(self, entries: dict[tuple[int, int], tuple[bytes, str]]) -> None:
        self._known = dict(entries)

    def learn(self, vni: int, ip: int, mac: bytes, vtep: str) -> bool:
        """Remember where a host is; True if that is news."""
        key = (vni, ip)
        if self._learned.get(key) == (mac, vtep):
            return False
        if len(self._learned) > 65536:
            self._learned.clear()
        self._learned[key] = (mac, vtep)
        return True

    def lookup(self, vni: int, ip: int) -> tuple[bytes, str] | None:
        key = (vni, ip)
        return self._known.get(key) or self._learned.get(key)

    def __len__(self) -> int:
        return len(self._known) + len(self._learned)

    @staticmethod
    def parse_etcd(items: dict[str, dict],  # type: ignore[type-arg]
                   on_bad: Callable[[str, str], None] | None = None) -> dict[tuple[int, int], tuple[bytes, str]]:
        """``{"/protego/v1/vnet/<vni>/<ip>": {mac, vtep, ...}}`` -> directory entries
        (malformed ones are skipped, and handed to ``on_bad(key, reason)``)."""
        out: dict[tuple[int, int], tuple[bytes, str]] = {}
        for key, val in items.items():
            parts = key.rstrip("/").split("/")
            try:
                vni = int(parts[-2])
                ip = int(ipaddress.IPv4Address(parts[-1]))
                mac = mac_bytes(str(val["mac"]))
                vtep = str(ipaddress.IPv4Address(val["vtep"]))
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                if on_bad is not None:
                    on_bad(key, f"not a vnet/<vni>/<ip> host entry with mac and vtep ({type(exc).__name__})")
                continue
            out[(vni, ip)] = (mac, vtep)
        return out
