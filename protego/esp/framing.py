"""Outer framing of ESP: ESP-in-UDP (RFC 3948) and raw ESP in IPv4 (protocol 50).

Pure functions over bytes. A worker that receives on a UDP socket gets the UDP
payload and uses :func:`classify_udp_payload`; a worker on a raw socket or TUN
device gets whole IPv4 packets and uses :func:`parse_ipv4`.
"""

from __future__ import annotations

import enum
import ipaddress
import struct

__all__ = [
    "IPPROTO_ESP",
    "IPPROTO_IPIP",
    "IPPROTO_IPV6",
    "IPPROTO_NONE",
    "IPPROTO_UDP",
    "NATT_KEEPALIVE",
    "NON_ESP_MARKER",
    "Ipv4Packet",
    "PacketKind",
    "build_ipv4_header",
    "build_udp_header",
    "classify_udp_payload",
    "frame_esp_in_udp_ipv4",
    "frame_raw_esp_ipv4",
    "ipv4_checksum",
    "parse_ipv4",
]

IPPROTO_IPIP = 4
IPPROTO_UDP = 17
IPPROTO_IPV6 = 41
IPPROTO_ESP = 50
IPPROTO_NONE = 59

NON_ESP_MARKER = b"\x00\x00\x00\x00"  # RFC 3948 2.2: IKE on port 4500
NATT_KEEPALIVE = b"\xff"  # RFC 3948 2.3

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")


class PacketKind(enum.IntEnum):
    ESP = 0
    IKE = 1  # non-ESP marker: hand to the IKE daemon
    KEEPALIVE = 2  # NAT keepalive: ignore


def classify_udp_payload(payload: bytes | memoryview) -> PacketKind:
    """What a datagram received on UDP 4500 carries (RFC 3948 section 2)."""
    n = len(payload)
    if n == 1 and payload[0] == 0xFF:
        return PacketKind.KEEPALIVE
    if n >= 4 and payload[0] == 0 and payload[1] == 0 and payload[2] == 0 and payload[3] == 0:
        return PacketKind.IKE
    return PacketKind.ESP


def ipv4_checksum(header: bytes | bytearray | memoryview) -> int:
    """RFC 1071 Internet checksum of an (even-length) header."""
    if len(header) % 2:
        header = bytes(header) + b"\x00"
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _addr4(addr: str | bytes | ipaddress.IPv4Address) -> bytes:
    if isinstance(addr, bytes):
        if len(addr) != 4:
            raise ValueError("IPv4 address must be 4 bytes")
        return addr
    return ipaddress.IPv4Address(addr).packed


def build_ipv4_header(
    src: str | bytes | ipaddress.IPv4Address,
    dst: str | bytes | ipaddress.IPv4Address,
    proto: int,
    payload_len: int,
    ident: int = 0,
    ttl: int = 64,
    tos: int = 0,
    dont_fragment: bool = False,
) -> bytes:
    """A 20-byte IPv4 header with a correct checksum."""
    total = 20 + payload_len
    if total > 0xFFFF:
        raise ValueError("IPv4 packet longer than 65535 bytes")
    flags = 0x4000 if dont_fragment else 0
    hdr = _IPV4.pack(0x45, tos, total, ident & 0xFFFF, flags, ttl, proto, 0,
                     _addr4(src), _addr4(dst))
    csum = ipv4_checksum(hdr)
    return hdr[:10] + csum.to_bytes(2, "big") + hdr[12:]


def build_udp_header(sport: int, dport: int, payload_len: int) -> bytes:
    """UDP header with a zero checksum (RFC 3948 3.1.1: SHOULD be zero for ESP-in-UDP
    over IPv4)."""
    return _UDP.pack(sport, dport, 8 + payload_len, 0)


def frame_raw_esp_ipv4(src: str | bytes | ipaddress.IPv4Address,
                       dst: str | bytes | ipaddress.IPv4Address,
                       esp: bytes, ident: int = 0, ttl: int = 64) -> bytes:
    """IPv4 (protocol 50) + ESP."""
    return build_ipv4_header(src, dst, IPPROTO_ESP, len(esp), ident, ttl) + esp


def frame_esp_in_udp_ipv4(src: str | bytes | ipaddress.IPv4Address,
                          dst: str | bytes | ipaddress.IPv4Address,
                          sport: int, dport: int, esp: bytes,
                          ident: int = 0, ttl: int = 64) -> bytes:
    """IPv4 + UDP + ESP (for raw sockets or TUN; UDP sockets just send ``esp``)."""
    return (build_ipv4_header(src, dst, IPPROTO_UDP, 8 + len(esp), ident, ttl)
            + build_udp_header(sport, dport, len(esp)) + esp)


class Ipv4Packet:
    """A parsed outer IPv4 packet (``payload`` excludes link-layer padding)."""

    __slots__ = ("dport", "dst", "payload", "proto", "sport", "src")

    def __init__(self, src: bytes, dst: bytes, proto: int, payload: bytes,
                 sport: int = 0, dport: int = 0) -> None:
        self.src = src
        self.dst = dst
        self.proto = proto
        self.payload = payload
        self.sport = sport
        self.dport = dport


def parse_ipv4(packet: bytes) -> Ipv4Packet | None:
    """Parse and validate an outer IPv4 header (and the UDP header if UDP).

    Returns ``None`` for anything malformed: wrong version, bad header length,
    total length beyond the buffer, bad header checksum, fragments (the kernel
    reassembles before raw sockets/TUN see them), or a truncated UDP header / bad
    UDP length. For UDP, ``payload`` is the UDP payload.
    """
    n = len(packet)
    if n < 20:
        return None
    vihl = packet[0]
    if vihl >> 4 != 4:
        return None
    ihl = (vihl & 0x0F) * 4
    if ihl < 20 or ihl > n:
        return None
    total = (packet[2] << 8) | packet[3]
    if total < ihl or total > n:
        return None
    if ipv4_checksum(packet[:ihl]) != 0:
        return None
    frag = ((packet[6] << 8) | packet[7]) & 0x3FFF  # MF flag + offset
    if frag:
        return None
    proto = packet[9]
    src = bytes(packet[12:16])
    dst = bytes(packet[16:20])
    if proto == IPPROTO_UDP:
        if total - ihl < 8:
            return None
        sport, dport, ulen, _csum = _UDP.unpack_from(packet, ihl)
        if ulen < 8 or ulen > total - ihl:
            return None
        return Ipv4Packet(src, dst, proto, packet[ihl + 8: ihl + ulen], sport, dport)
    return Ipv4Packet(src, dst, proto, packet[ihl:total])
