"""Fuzz the decapsulation path: >= 100,000 malformed or mutated packets, seeded.

Every mutated packet must be dropped (never ACCEPT) and no exception may escape
(the entry points never raise; ``DropReason.INTERNAL`` must stay 0). Fresh valid
packets are interleaved and must still be accepted, so the fuzzing is not
vacuous (the SAs stay healthy and the windows move).

Mutations of whole outer IPv4 packets are limited to the bytes a receiver is
meant to check: the UDP source port and UDP checksum are not authenticated in
ESP-in-UDP (RFC 3948) and link-layer bytes after the IPv4 total length are
ignored, so changing those legitimately leaves the packet valid.
"""

from __future__ import annotations

import random
import time

from protego.esp import (
    Decapsulator,
    Direction,
    DropReason,
    OutboundSa,
    SaKeys,
    SecurityAssociation,
    Suite,
    UdpEncap,
    Verdict,
)
from protego.esp.framing import build_ipv4_header, frame_esp_in_udp_ipv4, frame_raw_esp_ipv4

SRC, DST = "198.18.0.1", "198.18.0.2"
MUTATED_TARGET = 100_000


def build_sas(rng: random.Random) -> tuple[Decapsulator, list[OutboundSa]]:
    dec = Decapsulator()
    outs = []
    spi = 0x1000
    for suite in Suite:
        for esn in (False, True):
            for udp in (False, True):
                spi += 1
                keys = SaKeys.from_keymat(suite, rng.randbytes(suite.spec.keymat_len))
                common = {"suite": suite, "keys": keys, "src": SRC, "dst": DST, "esn": esn,
                              "encap": UdpEncap() if udp else None, "replay_window": 64}
                out = OutboundSa(SecurityAssociation(spi, Direction.OUTBOUND, **common),  # type: ignore[arg-type]
                                 random_source=rng.randbytes)
                state = dec.add(SecurityAssociation(spi, Direction.INBOUND, **common))  # type: ignore[arg-type]
                if esn:  # start just below a low-32-bit wrap to exercise inference
                    out.sequence._next = (2 << 32) - 300
                    state.window.top = (2 << 32) - 301
                outs.append(out)
    return dec, outs


def inner_packet(rng: random.Random) -> bytes:
    n = rng.choice((0, 1, 13, 64, 200, 1000))
    if rng.random() < 0.8:
        return build_ipv4_header("10.1.0.1", "10.2.0.1", 17, n) + rng.randbytes(n)
    hdr = bytes([0x60, 0, 0, 0]) + n.to_bytes(2, "big") + bytes([17, 64]) + rng.randbytes(32)
    return hdr + rng.randbytes(n)


def mutate(rng: random.Random, p: bytes, spis: list[int]) -> bytes:
    op = rng.randrange(11)
    b = bytearray(p)
    if op == 0:  # flip 1..8 bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncate
        del b[rng.randrange(len(b)):]
    elif op == 2:  # extend
        b += rng.randbytes(rng.choice((1, 2, 3, 4, 8, 16, 40)))
    elif op == 3:  # overwrite a slice
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randint(1, 32))
        b[i:j] = rng.randbytes(j - i)
    elif op == 4:  # random garbage
        b = bytearray(rng.randbytes(rng.choice((0, 1, 3, 4, 7, 8, 20, 60, 100, 1500))))
    elif op == 5:  # known SPI, random rest
        b = bytearray(rng.choice(spis).to_bytes(4, "big")
                      + rng.randbytes(rng.choice((4, 30, 60, 61, 64, 100, 300))))
    elif op == 6:  # another sequence number
        b[4:8] = rng.randbytes(4)
    elif op == 7:  # another SPI (known or unknown)
        b[0:4] = (rng.choice(spis) if rng.random() < 0.7 else rng.getrandbits(32)).to_bytes(4, "big")
    elif op == 8:  # delete or insert one byte in the middle
        i = rng.randrange(len(b))
        if rng.random() < 0.5:
            del b[i]
        else:
            b.insert(i, rng.randrange(256))
    elif op == 9:  # zero the tail (ICV)
        k = rng.randint(1, 16)
        b[-k:] = bytes(k)
    else:  # swap two blocks
        if len(b) >= 40:
            i, j = rng.randrange(8, len(b) - 16), rng.randrange(8, len(b) - 16)
            b[i:i + 16], b[j:j + 16] = b[j:j + 16], b[i:i + 16]
        else:
            b.reverse()
    return bytes(b)


def test_fuzz_decap_never_raises_never_accepts() -> None:
    rng = random.Random(20261126)
    dec, outs = build_sas(rng)
    spis = [o.sa.spi for o in outs]
    mutated = valid = 0
    verdicts: dict[str, int] = {}
    start = time.monotonic()
    while mutated < MUTATED_TARGET:
        out = rng.choice(outs)
        udp = out.sa.encap is not None
        esp = out.encapsulate(inner_packet(rng))
        if rng.random() < 0.05:  # a fresh valid packet must still pass
            res = dec.decap_udp(esp) if udp else dec.decap_esp(esp)
            assert res.verdict is Verdict.ACCEPT, (out.sa.label, res.reason)
            valid += 1
            continue
        for _ in range(4):
            bad = mutate(rng, esp, spis)
            if bad == esp:
                continue
            path = rng.randrange(3)
            if path == 0:
                res = dec.decap_esp(bad, via_udp=udp)
            elif path == 1:
                res = dec.decap_udp(bad)
            else:
                res = decap_framed(rng, dec, bad, esp, udp)
            assert res.verdict is not Verdict.ACCEPT, (out.sa.label, bad.hex())
            verdicts[res.verdict.name if res.reason is None else res.reason.name] = \
                verdicts.get(res.verdict.name if res.reason is None else res.reason.name, 0) + 1
            mutated += 1
    elapsed = time.monotonic() - start
    assert dec.drops[DropReason.INTERNAL] == 0
    assert valid > 1000
    # the fuzzer reached the deep checks, not just the cheap ones
    for reason in ("BAD_ICV", "TRUNCATED", "UNKNOWN_SPI", "BAD_LENGTH", "REPLAYED",
                   "BAD_OUTER", "WRONG_ENCAP"):
        assert verdicts.get(reason, 0) > 100, (reason, verdicts)
    assert elapsed < 60, elapsed
    print(f"fuzz: {mutated} mutated, {valid} valid, {elapsed:.1f}s, {verdicts}")


def decap_framed(rng: random.Random, dec: Decapsulator, bad_esp: bytes, esp: bytes,
                 udp: bool) -> object:
    """Whole outer IPv4 packets: a mutated ESP re-framed correctly, or a single
    bit flip in the checked outer header fields of a valid packet."""
    if rng.random() < 0.6:
        if udp:
            return dec.decap_ipv4(frame_esp_in_udp_ipv4(SRC, DST, 4500, 4500, bad_esp))
        return dec.decap_ipv4(frame_raw_esp_ipv4(SRC, DST, bad_esp))
    if udp:
        wire = bytearray(frame_esp_in_udp_ipv4(SRC, DST, 4500, 4500, esp))
        # IPv4 header, UDP destination port and length (not sport 20-21, not csum 26-27)
        pos = rng.choice([*range(20), 22, 23, 24, 25])
    else:
        wire = bytearray(frame_raw_esp_ipv4(SRC, DST, esp))
        pos = rng.randrange(20)
    wire[pos] ^= 1 << rng.randrange(8)
    return dec.decap_ipv4(bytes(wire))


def reference_accepts(plaintext: bytes) -> bytes | None:
    """Independent, straightforward statement of RFC 4303 trailer rules and the
    inner-packet checks: the expected inner packet, or None."""
    if len(plaintext) < 2:
        return None
    pad_len, nh = plaintext[-2], plaintext[-1]
    if pad_len + 2 > len(plaintext):
        return None
    body, pad = plaintext[: len(plaintext) - 2 - pad_len], plaintext[len(plaintext) - 2 - pad_len:-2]
    if list(pad) != list(range(1, pad_len + 1)):
        return None
    if nh == 4:
        if len(body) < 20 or body[0] >> 4 != 4 or body[0] & 15 < 5:
            return None
        total = int.from_bytes(body[2:4], "big")
        return body[:total] if (body[0] & 15) * 4 <= total <= len(body) else None
    if nh == 41:
        if len(body) < 40 or body[0] >> 4 != 6:
            return None
        total = 40 + int.from_bytes(body[4:6], "big")
        return body[:total] if total <= len(body) else None
    return None


def test_fuzz_authenticated_plaintexts_against_reference() -> None:
    """Correctly authenticated packets around random, often malformed plaintexts:
    the engine accepts exactly what the reference accepts."""
    rng = random.Random(4303)
    dec, outs = build_sas(rng)
    accepted = dropped = 0
    for _ in range(20_000):
        out = rng.choice(outs)
        align = out.sa.suite.spec.align
        inner = inner_packet(rng)
        choice = rng.random()
        if choice < 0.3:
            inner = inner[: rng.randrange(len(inner) + 1)]
        elif choice < 0.4:
            inner = inner + rng.randbytes(rng.randrange(1, 9))  # TFC padding
        pad_count = -(len(inner) + 2) % align + align * rng.choice((0, 0, 0, 1, 3))
        pad = bytearray(range(1, pad_count + 1))
        if pad and rng.random() < 0.3:
            pad[rng.randrange(len(pad))] = rng.randrange(256)
        nh = rng.choice((4, 4, 4, 4, 41, 41, 59, 0, 17, 50, 255))
        pad_field = pad_count if rng.random() < 0.8 else rng.randrange(256)  # may lie
        plaintext = inner + bytes(pad) + bytes((pad_field, nh))
        assert len(plaintext) % align == 0
        seq = out.sequence.next()
        header = out.sa.spi.to_bytes(4, "big") + (seq & 0xFFFFFFFF).to_bytes(4, "big")
        esp = header + out.transform.protect(header, seq, out.sa.esn, plaintext)
        res = dec.decap_udp(esp) if out.sa.encap else dec.decap_esp(esp)
        want = reference_accepts(plaintext)
        if want is None:
            assert res.verdict is Verdict.DROP, plaintext.hex()
            assert res.reason in (DropReason.BAD_PADDING, DropReason.BAD_NEXT_HEADER,
                                  DropReason.DUMMY, DropReason.BAD_INNER)
            dropped += 1
        else:
            assert res.verdict is Verdict.ACCEPT and res.payload == want, res.reason
            accepted += 1
    assert dec.drops[DropReason.INTERNAL] == 0
    assert accepted > 2000 and dropped > 2000
