"""Cross-check against an independent ESP implementation: scapy.layers.ipsec.

Our packets must decrypt with scapy's SecurityAssociation and scapy's packets
with ours, for every suite, with and without ESN, raw ESP and ESP-in-UDP.
scapy is a test-only dependency; the module is skipped without it.
"""

from __future__ import annotations

import logging
import os

import pytest

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
scapy_ipsec = pytest.importorskip("scapy.layers.ipsec")
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6

from protego.esp import (
    Decapsulator,
    Direction,
    OutboundSa,
    SaKeys,
    SecurityAssociation,
    Suite,
    UdpEncap,
    Verdict,
)
from protego.esp.framing import frame_esp_in_udp_ipv4, frame_raw_esp_ipv4

SCAPY_ALGS = {
    Suite.AES128GCM16: ("AES-GCM", None),
    Suite.AES256GCM16: ("AES-GCM", None),
    Suite.AES128_SHA1: ("AES-CBC", "HMAC-SHA1-96"),
    Suite.AES256_SHA1: ("AES-CBC", "HMAC-SHA1-96"),
    Suite.AES128_SHA256: ("AES-CBC", "SHA2-256-128"),
    Suite.AES256_SHA256: ("AES-CBC", "SHA2-256-128"),
}
SRC, DST = "198.18.0.1", "198.18.0.2"
SPI = 0x51AB0001


def scapy_sa(suite: Suite, keys: SaKeys, esn: bool, seq_hi: int, udp: bool,
             seq: int = 1) -> scapy_ipsec.SecurityAssociation:
    crypt, auth = SCAPY_ALGS[suite]
    kwargs = {"spi": SPI, "seq_num": seq, "crypt_algo": crypt,
                  "tunnel_header": IP(src=SRC, dst=DST), "esn_en": esn, "esn": seq_hi}
    if suite.spec.aead:
        kwargs.update(crypt_key=keys.enc_key + keys.salt, crypt_icv_size=16)
    else:
        kwargs.update(crypt_key=keys.enc_key, auth_algo=auth, auth_key=keys.auth_key)
    if udp:
        kwargs["nat_t_header"] = UDP(sport=4500, dport=4500)
    return scapy_ipsec.SecurityAssociation(scapy_ipsec.ESP, **kwargs)


def inner_packets() -> list[bytes]:
    return [
        bytes(IP(src="10.1.0.1", dst="10.2.0.1") / ICMP() / (b"x" * n)) for n in (0, 1, 57, 1300)
    ] + [bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:2::1") / ICMP() / b"hello v6")]


@pytest.mark.parametrize("suite", list(Suite))
@pytest.mark.parametrize("esn", [False, True])
@pytest.mark.parametrize("udp", [False, True])
def test_interop_with_scapy(suite: Suite, esn: bool, udp: bool) -> None:
    keys = SaKeys.from_keymat(suite, os.urandom(suite.spec.keymat_len))
    encap = UdpEncap() if udp else None
    seq0 = (3 << 32) + 0xFFFFFFFE if esn else 7  # ESN: cross the low-32-bit wrap
    common = {"suite": suite, "keys": keys, "src": SRC, "dst": DST, "esn": esn, "encap": encap}

    # ours -> scapy
    out = OutboundSa(SecurityAssociation(SPI, Direction.OUTBOUND, **common))  # type: ignore[arg-type]
    out.sequence._next = seq0
    for i, inner in enumerate(inner_packets()):
        seq = seq0 + i
        esp = out.encapsulate(inner)
        if udp:
            wire = frame_esp_in_udp_ipv4(SRC, DST, 4500, 4500, esp)
        else:
            wire = frame_raw_esp_ipv4(SRC, DST, esp)
        peer = scapy_sa(suite, keys, esn, seq >> 32, udp)
        plain = peer.decrypt(IP(wire))
        assert bytes(plain) == inner

    # scapy -> ours
    dec = Decapsulator()
    dec.add(SecurityAssociation(SPI, Direction.INBOUND, **common))  # type: ignore[arg-type]
    for i, inner in enumerate(inner_packets()):
        seq = seq0 + i
        peer = scapy_sa(suite, keys, esn, seq >> 32, udp, seq=seq & 0xFFFFFFFF)
        pkt = IP(inner) if inner[0] >> 4 == 4 else IPv6(inner)
        wire = bytes(peer.encrypt(pkt))
        if esn and i == 0:
            state = dec.get(SPI)
            assert state is not None
            state.window.top = seq - 1  # receiver already at the start of this run
        res = dec.decap_ipv4(wire)
        assert res.verdict is Verdict.ACCEPT, res.reason
        assert res.payload == inner


def test_outer_headers_match_scapy() -> None:
    esp = bytes(range(40))
    ours = frame_raw_esp_ipv4(SRC, DST, esp, ident=77, ttl=61)
    theirs = bytes(IP(src=SRC, dst=DST, proto=50, id=77, ttl=61, flags=0) / esp)
    assert ours == theirs
    ours = frame_esp_in_udp_ipv4(SRC, DST, 4500, 4500, esp, ident=78)
    theirs = IP(bytes(IP(src=SRC, dst=DST, id=78, ttl=64, flags=0)
                      / UDP(sport=4500, dport=4500, chksum=0) / esp))
    assert ours == bytes(theirs)
