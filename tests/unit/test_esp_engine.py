"""ESP encapsulation/decapsulation: round trips, framing, strict checks, counters."""

from __future__ import annotations

import logging
import os
import struct

import pytest

from protego.esp import (
    Decapsulator,
    Direction,
    DropReason,
    InvalidSaError,
    Lifetime,
    OutboundSa,
    OutboundSequence,
    SaExpiredError,
    SaKeys,
    SecurityAssociation,
    SequenceExhaustedError,
    Suite,
    UdpEncap,
    Verdict,
)
from protego.esp.engine import PAD_BYTES
from protego.esp.framing import (
    build_ipv4_header,
    frame_esp_in_udp_ipv4,
    frame_raw_esp_ipv4,
    ipv4_checksum,
    parse_ipv4,
)

SPI = 0x0A0B0C0D


def make_pair(suite: Suite, esn: bool = False, encap: UdpEncap | None = None,
              window: int = 64, lifetime: Lifetime | None = None,
              spi: int = SPI) -> tuple[OutboundSa, Decapsulator]:
    keys = SaKeys.from_keymat(suite, os.urandom(suite.spec.keymat_len))
    common = {"suite": suite, "keys": keys, "src": "198.18.0.1", "dst": "198.18.0.2", "esn": esn,
                  "encap": encap, "replay_window": window, "lifetime": lifetime or Lifetime(),
                  "tunnel_id": "t1"}
    out = OutboundSa(SecurityAssociation(spi, Direction.OUTBOUND, **common))  # type: ignore[arg-type]
    dec = Decapsulator()
    dec.add(SecurityAssociation(spi, Direction.INBOUND, **common))  # type: ignore[arg-type]
    return out, dec


def ipv4_packet(payload_len: int, ident: int = 1) -> bytes:
    payload = bytes((i * 7) & 0xFF for i in range(payload_len))
    return build_ipv4_header("10.1.0.1", "10.2.0.1", 17, payload_len, ident) + payload


def ipv6_packet(payload_len: int) -> bytes:
    hdr = struct.pack("!IHBB16s16s", 6 << 28, payload_len, 17, 64,
                      bytes.fromhex("20010db8000100000000000000000001"),
                      bytes.fromhex("20010db8000200000000000000000001"))
    return hdr + bytes(i & 0xFF for i in range(payload_len))


@pytest.mark.parametrize("suite", list(Suite))
@pytest.mark.parametrize("esn", [False, True])
def test_round_trip_every_suite(suite: Suite, esn: bool) -> None:
    out, dec = make_pair(suite, esn)
    align = suite.spec.align
    # every padding length, IPv4 and IPv6 inner packets, up to 1400 bytes
    sizes = list(range(2 * align + 1)) + [100, 472, 1372]
    n = 0
    for size in sizes:
        for inner in (ipv4_packet(size), ipv6_packet(size)):
            esp = out.encapsulate(inner)
            assert (len(esp) - 8 - suite.spec.iv_len - suite.spec.icv_len) % align == 0
            res = dec.decap_esp(esp)
            assert res.verdict is Verdict.ACCEPT, res.reason
            assert res.payload == inner
            n += 1
    state = dec.get(SPI)
    assert state is not None and state.stats.packets == n
    assert out.stats.packets == n
    assert dec.drops.total() == 0


@pytest.mark.parametrize("esn", [False, True])
def test_round_trip_across_low_32_bit_wrap(esn: bool) -> None:
    out, dec = make_pair(Suite.AES128GCM16, esn)
    if not esn:
        out.sequence._next = 0xFFFFFFFF - 2
        dec.get(SPI).window.top = 0xFFFFFFFF - 3  # type: ignore[union-attr]
        for _ in range(3):
            assert dec.decap_esp(out.encapsulate(ipv4_packet(10))).verdict is Verdict.ACCEPT
        with pytest.raises(SequenceExhaustedError):
            out.encapsulate(ipv4_packet(10))
        return
    out.sequence._next = (1 << 32) - 5
    dec.get(SPI).window.top = (1 << 32) - 6  # type: ignore[union-attr]
    packets = [out.encapsulate(ipv4_packet(10)) for _ in range(10)]
    # deliver the post-wrap ones first, then the pre-wrap ones (reordered, in window)
    for esp in packets[5:] + packets[:5]:
        res = dec.decap_esp(esp)
        assert res.verdict is Verdict.ACCEPT, res.reason
    assert dec.get(SPI).window.top == (1 << 32) + 4  # type: ignore[union-attr]
    for esp in packets:
        assert dec.decap_esp(esp).reason is DropReason.REPLAYED


def test_esp_in_udp_and_raw_ipv4_framing() -> None:
    out, dec = make_pair(Suite.AES256GCM16, encap=UdpEncap(4500, 4500))
    inner = ipv4_packet(64)
    esp = out.encapsulate(inner)
    pkt = frame_esp_in_udp_ipv4("198.18.0.1", "198.18.0.2", 4500, 4500, esp, ident=9)
    assert ipv4_checksum(pkt[:20]) == 0
    assert pkt[9] == 17 and pkt[20:28] == struct.pack("!HHHH", 4500, 4500, 8 + len(esp), 0)
    res = dec.decap_ipv4(pkt)
    assert res.verdict is Verdict.ACCEPT and res.payload == inner
    # a UDP-encapsulated SA refuses raw ESP
    raw = frame_raw_esp_ipv4("198.18.0.1", "198.18.0.2", out.encapsulate(inner))
    assert dec.decap_ipv4(raw).reason is DropReason.WRONG_ENCAP
    # raw SA
    out2, dec2 = make_pair(Suite.AES128_SHA256)
    raw = frame_raw_esp_ipv4("198.18.0.1", "198.18.0.2", out2.encapsulate(inner))
    parsed = parse_ipv4(raw)
    assert parsed is not None and parsed.proto == 50
    assert dec2.decap_ipv4(raw).payload == inner
    udp = dec2.decap_udp(out2.encapsulate(inner))
    assert udp.reason is DropReason.WRONG_ENCAP


def test_nat_keepalive_and_ike_marker() -> None:
    _out, dec = make_pair(Suite.AES128GCM16, encap=UdpEncap())
    res = dec.decap_udp(b"\xff")
    assert res.verdict is Verdict.KEEPALIVE and dec.keepalives == 1
    ike = b"\x00\x00\x00\x00" + b"IKE-HEADER-AND-PAYLOAD"
    res = dec.decap_udp(ike)
    assert res.verdict is Verdict.IKE and res.payload == ike[4:] and dec.ike_packets == 1
    pkt = frame_esp_in_udp_ipv4("198.18.0.1", "198.18.0.2", 4500, 4500, b"\xff")
    # frame_esp_in_udp_ipv4 is generic over the UDP payload
    assert dec.decap_ipv4(pkt).verdict is Verdict.KEEPALIVE
    assert dec.drops.total() == 0
    # a two-byte 0xff payload is not a keepalive: it is a (truncated) ESP packet
    assert dec.decap_udp(b"\xff\xff").reason is DropReason.TRUNCATED


def test_outer_ipv4_checks() -> None:
    out, dec = make_pair(Suite.AES128GCM16)
    raw = bytearray(frame_raw_esp_ipv4("198.18.0.1", "198.18.0.2",
                                       out.encapsulate(ipv4_packet(20))))
    bad = bytearray(raw)
    bad[8] ^= 1  # TTL changed without fixing the checksum
    assert dec.decap_ipv4(bytes(bad)).reason is DropReason.BAD_OUTER
    frag = bytearray(raw)
    frag[6] |= 0x20  # MF
    frag[10:12] = b"\x00\x00"
    frag[10:12] = ipv4_checksum(bytes(frag[:20])).to_bytes(2, "big")
    assert dec.decap_ipv4(bytes(frag)).reason is DropReason.BAD_OUTER
    assert dec.decap_ipv4(bytes(raw[:19])).reason is DropReason.BAD_OUTER
    icmp = build_ipv4_header("198.18.0.1", "198.18.0.2", 1, 8) + bytes(8)
    assert dec.decap_ipv4(icmp).reason is DropReason.NOT_ESP
    udp500 = build_ipv4_header("198.18.0.1", "198.18.0.2", 17, 12) + struct.pack(
        "!HHHH", 500, 500, 12, 0) + bytes(4)
    assert dec.decap_ipv4(udp500).reason is DropReason.NOT_ESP
    # link-layer padding after the IPv4 total length is ignored
    assert dec.decap_ipv4(bytes(raw) + b"\x00" * 6).verdict is Verdict.ACCEPT


def forge(out: OutboundSa, plaintext: bytes) -> bytes:
    """A correctly authenticated ESP packet around an arbitrary plaintext."""
    seq = out.sequence.next()
    header = struct.pack("!II", out.sa.spi, seq & 0xFFFFFFFF)
    return header + out.transform.protect(header, seq, out.sa.esn, plaintext)


@pytest.mark.parametrize("suite", [Suite.AES128GCM16, Suite.AES128_SHA1])
def test_strict_trailer_checks(suite: Suite) -> None:
    out, dec = make_pair(suite)
    inner = ipv4_packet(30)  # 50 bytes
    align = suite.spec.align

    def padded(pad: bytes, nh: int, body: bytes = inner) -> bytes:
        return body + pad + bytes((len(pad), nh))

    pad_ok = PAD_BYTES[: -(len(inner) + 2) % align]
    assert dec.decap_esp(forge(out, padded(pad_ok, 4))).verdict is Verdict.ACCEPT
    # non-monotonic padding bytes
    bad = bytearray(pad_ok + PAD_BYTES[len(pad_ok): len(pad_ok) + align])
    bad[-1] ^= 0xFF
    assert dec.decap_esp(forge(out, padded(bytes(bad), 4))).reason is DropReason.BAD_PADDING
    # zero padding bytes (not the RFC 4303 default sequence)
    assert dec.decap_esp(forge(out, padded(bytes(len(pad_ok) + align), 4))).reason \
        is DropReason.BAD_PADDING
    # pad length longer than the plaintext
    short = b"\x45\x00" + bytes((0xF0, 4))
    short += bytes(-len(short) % align)
    pt = bytes(len(short) - 2) + bytes((0xF0, 4))
    assert dec.decap_esp(forge(out, pt)).reason is DropReason.BAD_PADDING
    # longer-than-needed but correct padding is fine (RFC 4303 2.4 allows up to 255)
    long_pad = PAD_BYTES[: len(pad_ok) + 4 * align]
    assert dec.decap_esp(forge(out, padded(long_pad, 4))).verdict is Verdict.ACCEPT
    # next header
    assert dec.decap_esp(forge(out, padded(pad_ok, 17))).reason is DropReason.BAD_NEXT_HEADER
    assert dec.decap_esp(forge(out, padded(pad_ok, 59))).reason is DropReason.DUMMY
    # next header 41 but an IPv4 packet inside
    assert dec.decap_esp(forge(out, padded(pad_ok, 41))).reason is DropReason.BAD_INNER
    # inner IPv4 total length larger than what was carried
    lying = bytearray(inner)
    lying[2:4] = (len(inner) + 1).to_bytes(2, "big")
    assert dec.decap_esp(forge(out, padded(pad_ok, 4, bytes(lying)))).reason \
        is DropReason.BAD_INNER
    # TFC padding after the inner packet (RFC 4303 2.7) is stripped
    tfc = inner + bytes(7)
    res = dec.decap_esp(forge(out, padded(PAD_BYTES[: -(len(tfc) + 2) % align], 4, tfc)))
    assert res.verdict is Verdict.ACCEPT and res.payload == inner
    counts = dec.drops.as_dict()
    assert counts["bad_padding"] == 3 and counts["bad_next_header"] == 1
    assert counts["dummy"] == 1 and counts["bad_inner"] == 2


@pytest.mark.parametrize("suite", list(Suite))
def test_lengths_icv_spi_replay(suite: Suite) -> None:
    out, dec = make_pair(suite)
    esp = out.encapsulate(ipv4_packet(40))
    spec = suite.spec
    assert dec.decap_esp(esp[:7]).reason is DropReason.TRUNCATED
    assert dec.decap_esp(esp[:spec.min_esp_len - 1]).reason is DropReason.TRUNCATED
    assert dec.decap_esp(esp[:-1]).reason is DropReason.BAD_LENGTH
    assert dec.decap_esp(esp + b"\x00").reason is DropReason.BAD_LENGTH
    extended = esp + bytes(spec.align)
    assert dec.decap_esp(extended).reason is DropReason.BAD_ICV
    flipped = bytearray(esp)
    flipped[-1] ^= 0x01
    assert dec.decap_esp(bytes(flipped)).reason is DropReason.BAD_ICV
    other_spi = struct.pack("!I", SPI + 1) + esp[4:]
    assert dec.decap_esp(other_spi).reason is DropReason.UNKNOWN_SPI
    assert dec.decap_esp(esp).verdict is Verdict.ACCEPT
    assert dec.decap_esp(esp).reason is DropReason.REPLAYED
    counts = dec.drops.as_dict()
    assert counts["truncated"] == 2 and counts["bad_length"] == 2 and counts["bad_icv"] == 2
    assert counts["unknown_spi"] == 1 and counts["replayed"] == 1
    state = dec.get(SPI)
    assert state is not None and state.stats.drops == 6 and state.stats.packets == 1


def test_window_moves_only_after_icv_verifies() -> None:
    out, dec = make_pair(Suite.AES128GCM16, window=64)
    first = out.encapsulate(ipv4_packet(10))
    # an attacker sends seq 1000 with a bad ICV: it must not move the window
    forged = bytearray(out.encapsulate(ipv4_packet(10)))
    forged[4:8] = (1000).to_bytes(4, "big")
    assert dec.decap_esp(bytes(forged)).reason is DropReason.BAD_ICV
    assert dec.get(SPI).window.top == 0  # type: ignore[union-attr]
    assert dec.decap_esp(first).verdict is Verdict.ACCEPT
    # sequence number 0 is never valid
    zero = bytearray(first)
    zero[4:8] = bytes(4)
    assert dec.decap_esp(bytes(zero)).reason is DropReason.REPLAYED


def test_sequence_soft_and_hard_limits() -> None:
    suite = Suite.AES128GCM16
    keys = SaKeys.from_keymat(suite, os.urandom(suite.spec.keymat_len))
    sa = SecurityAssociation(SPI, Direction.OUTBOUND, suite, keys, "198.18.0.1", "198.18.0.2")
    out = OutboundSa(sa, sequence=OutboundSequence(soft_limit=3, hard_limit=5))
    seqs = []
    for _ in range(5):
        esp = out.encapsulate(ipv4_packet(1))
        seqs.append(int.from_bytes(esp[4:8], "big"))
        assert out.rekey_requested == (seqs[-1] >= 3)
    assert seqs == [1, 2, 3, 4, 5]
    for _ in range(3):
        with pytest.raises(SequenceExhaustedError) as exc:
            out.encapsulate(ipv4_packet(1))
        assert exc.value.errno is None
    assert out.stats.packets == 5
    # the default soft limit is well before the end
    assert OutboundSequence().soft_limit == 0xFFFFFFFF - (0xFFFFFFFF >> 3)
    assert OutboundSequence(esn=True).hard_limit == (1 << 64) - 1


def test_lifetimes() -> None:
    out, dec = make_pair(Suite.AES128GCM16,
                         lifetime=Lifetime(soft_packets=2, hard_packets=3, hard_bytes=10_000))
    pkts = [out.encapsulate(ipv4_packet(10)) for _ in range(2)]
    assert out.rekey_requested
    pkts.append(out.encapsulate(ipv4_packet(10)))
    with pytest.raises(SaExpiredError):
        out.encapsulate(ipv4_packet(10))
    for p in pkts:
        assert dec.decap_esp(p).verdict is Verdict.ACCEPT
    # the inbound SA is now at its hard packet limit
    out.stats.packets = 0
    assert dec.decap_esp(out.encapsulate(ipv4_packet(10))).reason is DropReason.SA_EXPIRED


def test_encapsulate_rejects_non_ip() -> None:
    out, _ = make_pair(Suite.AES128GCM16)
    with pytest.raises(ValueError):
        out.encapsulate(b"\x50" + bytes(30))
    with pytest.raises(ValueError):
        out.encapsulate(b"")
    assert out.sequence.next_value == 1  # no sequence number was consumed


def test_decap_never_raises_on_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    out, dec = make_pair(Suite.AES128GCM16)
    state = dec.get(SPI)
    assert state is not None

    class Boom:
        def unprotect(self, *a: object) -> bytes:
            raise RuntimeError("boom")

    state.transform = Boom()  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR):
        res = dec.decap_esp(out.encapsulate(ipv4_packet(5)))
    assert res.reason is DropReason.INTERNAL
    assert dec.drops[DropReason.INTERNAL] == 1


def test_sa_table_management() -> None:
    out, dec = make_pair(Suite.AES128GCM16)
    assert len(dec) == 1
    with pytest.raises(InvalidSaError):
        dec.add(dec.get(SPI).sa)  # type: ignore[union-attr]
    removed = dec.remove(SPI)
    assert removed is not None and dec.remove(SPI) is None
    assert dec.decap_esp(out.encapsulate(ipv4_packet(5))).reason is DropReason.UNKNOWN_SPI
    with pytest.raises(InvalidSaError):
        OutboundSa(removed.sa)  # an inbound SA cannot encapsulate


def test_ipv4_checksum_known_answer() -> None:
    # The classic worked example (RFC 1071 style): checksum field 0xb861.
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert ipv4_checksum(hdr) == 0xB861
    fixed = hdr[:10] + b"\xb8\x61" + hdr[12:]
    assert ipv4_checksum(fixed) == 0
    built = build_ipv4_header("192.168.0.1", "192.168.0.199", 17, 0x73 - 20, ident=0,
                              dont_fragment=True)
    assert built == fixed


def test_leased_sequence_numbers() -> None:
    out, dec = make_pair(Suite.AES128GCM16)
    for seq in (5, 3, 9):
        esp = out.encapsulate(ipv4_packet(8), seq=seq)
        assert int.from_bytes(esp[4:8], "big") == seq
        assert dec.decap_esp(esp).verdict is Verdict.ACCEPT
    for bad in (0, -1, 1 << 32):
        with pytest.raises(ValueError):
            out.encapsulate(ipv4_packet(8), seq=bad)
