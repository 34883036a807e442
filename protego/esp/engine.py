"""ESP tunnel-mode encapsulation and decapsulation (RFC 4303), pure, no sockets.

* :class:`OutboundSa` -- per-worker state of an outbound SA: transform, sequence
  counter, statistics. :meth:`OutboundSa.encapsulate` turns an inner IPv4/IPv6
  packet into an ESP packet (``SPI || seq || IV || ciphertext || ICV``).
* :class:`InboundSa` -- per-worker state of an inbound SA: transform, replay
  window, statistics.
* :class:`Decapsulator` -- the inbound SA table of one worker (SPI -> SA) and its
  drop counters. Its entry points :meth:`Decapsulator.decap_esp`,
  :meth:`Decapsulator.decap_udp` and :meth:`Decapsulator.decap_ipv4` never raise
  on any input: they return a :class:`DecapResult` whose ``reason`` says why a
  packet was dropped, and count the drop.

Order of inbound checks (RFC 4303 3.4): length, SPI lookup, encapsulation, length
and alignment for the suite, sequence number against the replay window (cheap,
before the ICV), ICV, window update (only now), padding, next header, inner
packet. Padding must be the monotonic sequence 1, 2, 3, ... (RFC 4303 2.4).
"""

from __future__ import annotations

import enum
import logging
import os
import struct
from collections.abc import Callable
from typing import NamedTuple

from .framing import (
    IPPROTO_ESP,
    IPPROTO_IPIP,
    IPPROTO_IPV6,
    IPPROTO_NONE,
    IPPROTO_UDP,
    PacketKind,
    classify_udp_payload,
    parse_ipv4,
)
from .replay import ReplayWindow
from .sa import (
    Direction,
    InvalidSaError,
    SaExpiredError,
    SecurityAssociation,
)
from .sequence import OutboundSequence
from .suites import Transform, make_transform

__all__ = [
    "PAD_BYTES",
    "DecapResult",
    "Decapsulator",
    "DropCounters",
    "DropReason",
    "InboundSa",
    "OutboundSa",
    "SaStats",
    "Verdict",
]

log = logging.getLogger(__name__)

PAD_BYTES = bytes(range(1, 256))  # RFC 4303 2.4 default padding 1, 2, 3, ...
_HDR = struct.Struct("!II")


class DropReason(enum.IntEnum):
    """Why an inbound packet was dropped (index into :class:`DropCounters`)."""

    TRUNCATED = 0  # shorter than the suite's minimum ESP packet
    BAD_LENGTH = 1  # ciphertext not a multiple of the block / 4-byte alignment
    UNKNOWN_SPI = 2
    WRONG_ENCAP = 3  # raw ESP for a UDP-encapsulated SA or the reverse
    REPLAYED = 4  # seen before, left of the window, or seq 0
    BAD_ICV = 5
    BAD_PADDING = 6
    BAD_NEXT_HEADER = 7
    DUMMY = 8  # next header 59: a dummy packet (RFC 4303 2.6), dropped silently
    BAD_INNER = 9  # inner packet malformed or length inconsistent
    SA_EXPIRED = 10  # hard byte/packet lifetime reached
    BAD_OUTER = 11  # outer IPv4/UDP header malformed, bad checksum, fragment
    NOT_ESP = 12  # outer packet is neither ESP nor UDP 4500
    INTERNAL = 13  # a bug: an exception escaped the checks (logged)


class Verdict(enum.IntEnum):
    ACCEPT = 0  # payload is the inner packet
    DROP = 1  # reason says why
    IKE = 2  # payload is an IKE message (non-ESP marker stripped)
    KEEPALIVE = 3  # NAT keepalive, nothing to do


class DecapResult(NamedTuple):
    verdict: Verdict
    payload: bytes | None = None
    sa: InboundSa | None = None
    reason: DropReason | None = None


_make_result = DecapResult._make  # tuple.__new__ without the keyword machinery
_ACCEPT = Verdict.ACCEPT


class DropCounters:
    """Drop counters by reason, a flat list indexed by :class:`DropReason`."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts = [0] * len(DropReason)

    def __getitem__(self, reason: DropReason) -> int:
        return self.counts[reason]

    def total(self) -> int:
        return sum(self.counts)

    def as_dict(self) -> dict[str, int]:
        return {r.name.lower(): self.counts[r] for r in DropReason}

    def __repr__(self) -> str:
        nonzero = {k: v for k, v in self.as_dict().items() if v}
        return f"<DropCounters {nonzero}>"


class SaStats:
    """Per-SA traffic statistics (for utilization reports)."""

    __slots__ = ("bytes", "drops", "packets")

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0  # inner bytes
        self.drops = 0

    def __repr__(self) -> str:
        return f"<SaStats packets={self.packets} bytes={self.bytes} drops={self.drops}>"


def _check_direction(sa: SecurityAssociation, want: Direction) -> None:
    if sa.direction is not want:
        raise InvalidSaError(f"{sa.label}: expected an {want.value}bound SA")


class OutboundSa:
    """Encapsulation state of one outbound SA in one worker.

    Never build two ``OutboundSa`` objects for the same SA that each use their own
    counter: sequence numbers (and with them the AES-GCM IVs) would repeat. Workers
    that share an SA pass ``seq`` from a :class:`~protego.esp.sequence.SequenceLease`
    of one shared :class:`~protego.esp.sequence.SequenceLeaser`.
    """

    __slots__ = (
        "_align",
        "_esn",
        "_hard_bytes",
        "_hard_packets",
        "_soft_bytes",
        "_soft_packets",
        "_spi",
        "sa",
        "sequence",
        "soft_expired",
        "stats",
        "transform",
    )

    def __init__(
        self,
        sa: SecurityAssociation,
        sequence: OutboundSequence | None = None,
        random_source: Callable[[int], bytes] = os.urandom,
    ) -> None:
        _check_direction(sa, Direction.OUTBOUND)
        self.sa = sa
        keys = sa.keys
        self.transform: Transform = make_transform(
            sa.suite, keys.enc_key, keys.salt, keys.auth_key, random_source)
        self.sequence = sequence or OutboundSequence(esn=sa.esn, label=sa.label)
        if self.sequence.esn != sa.esn:
            raise InvalidSaError(f"{sa.label}: sequence counter ESN mode differs from SA")
        self.stats = SaStats()
        self._spi = sa.spi
        self._align = sa.suite.spec.align
        self._esn = sa.esn
        lt = sa.lifetime
        self._hard_bytes = lt.hard_bytes
        self._hard_packets = lt.hard_packets
        self._soft_bytes = lt.soft_bytes
        self._soft_packets = lt.soft_packets
        self.soft_expired = False

    def __repr__(self) -> str:
        return f"<OutboundSa {self.sa.label} {self.sa.suite.value}>"

    @property
    def rekey_requested(self) -> bool:
        """True once a soft limit (sequence space or lifetime) is reached."""
        return self.sequence.rekey_requested or self.soft_expired

    def encapsulate(self, inner: bytes, next_header: int | None = None,
                    seq: int | None = None) -> bytes:
        """Return the ESP packet carrying ``inner`` (tunnel mode).

        ``next_header`` defaults to 4 or 41 from the inner packet's version.
        ``seq`` is for workers that lease sequence blocks (the lease guarantees it
        is unused); otherwise the SA's own counter supplies it.

        Raises :class:`SequenceExhaustedError` at the end of the sequence space,
        :class:`SaExpiredError` at a hard lifetime, ``ValueError`` for an inner
        packet that is neither IPv4 nor IPv6.
        """
        if next_header is None:
            version = inner[0] >> 4 if inner else 0
            if version == 4:
                next_header = IPPROTO_IPIP
            elif version == 6:
                next_header = IPPROTO_IPV6
            else:
                raise ValueError("inner packet is neither IPv4 nor IPv6")
        stats = self.stats
        if self._hard_packets is not None and stats.packets >= self._hard_packets:
            raise SaExpiredError(f"{self.sa.label}: hard packet lifetime reached")
        if self._hard_bytes is not None and stats.bytes + len(inner) > self._hard_bytes:
            raise SaExpiredError(f"{self.sa.label}: hard byte lifetime reached")
        if seq is None:
            seq = self.sequence.next()
        elif not 0 < seq <= self.sequence.hard_limit:
            raise ValueError(f"{self.sa.label}: sequence number outside 1..hard limit")
        padlen = -(len(inner) + 2) % self._align
        plaintext = b"".join((inner, PAD_BYTES[:padlen], bytes((padlen, next_header))))
        header = _HDR.pack(self._spi, seq & 0xFFFFFFFF)
        out = header + self.transform.protect(header, seq, self._esn, plaintext)
        stats.packets += 1
        stats.bytes += len(inner)
        if not self.soft_expired and (
            (self._soft_packets is not None and stats.packets >= self._soft_packets)
            or (self._soft_bytes is not None and stats.bytes >= self._soft_bytes)
        ):
            self.soft_expired = True
            log.info("%s: soft lifetime reached, requesting rekey", self.sa.label)
        return out


class InboundSa:
    """Decapsulation state of one inbound SA in one worker."""

    __slots__ = (
        "_align",
        "_esn",
        "_hard_bytes",
        "_hard_packets",
        "_limited",
        "_overhead",
        "min_len",
        "sa",
        "stats",
        "transform",
        "udp",
        "window",
    )

    def __init__(self, sa: SecurityAssociation) -> None:
        _check_direction(sa, Direction.INBOUND)
        self.sa = sa
        keys = sa.keys
        self.transform: Transform = make_transform(
            sa.suite, keys.enc_key, keys.salt, keys.auth_key)
        self.window = ReplayWindow(sa.replay_window, esn=sa.esn)
        self.stats = SaStats()
        self.udp = sa.encap is not None
        spec = sa.suite.spec
        self.min_len = spec.min_esp_len
        self._overhead = 8 + spec.iv_len + spec.icv_len  # bytes around the ciphertext
        self._align = spec.align
        self._esn = sa.esn
        self._hard_bytes = sa.lifetime.hard_bytes
        self._hard_packets = sa.lifetime.hard_packets
        self._limited = self._hard_bytes is not None or self._hard_packets is not None

    def hard_limit_reached(self) -> bool:
        """True once the hard byte or packet lifetime is used up."""
        stats = self.stats
        return (self._hard_packets is not None and stats.packets >= self._hard_packets) or (
            self._hard_bytes is not None and stats.bytes >= self._hard_bytes)

    def __repr__(self) -> str:
        return f"<InboundSa {self.sa.label} {self.sa.suite.value}>"


class Decapsulator:
    """Inbound SA table of one worker, with drop counters.

    The table is owned by one worker: no locking. ``add``/``remove`` happen
    between packets (the agent installs SAs through the worker's control queue).
    """

    def __init__(self) -> None:
        self._sas: dict[int, InboundSa] = {}
        self.drops = DropCounters()
        self.ike_packets = 0
        self.keepalives = 0

    def add(self, sa: SecurityAssociation) -> InboundSa:
        state = InboundSa(sa)
        if sa.spi in self._sas:
            raise InvalidSaError(f"{sa.label}: SPI already installed")
        self._sas[sa.spi] = state
        log.info("%s: inbound SA installed (%s)", sa.label, sa.suite.value)
        return state

    def remove(self, spi: int) -> InboundSa | None:
        state = self._sas.pop(spi, None)
        if state is not None:
            log.info("%s: inbound SA removed", state.sa.label)
        return state

    def get(self, spi: int) -> InboundSa | None:
        return self._sas.get(spi)

    def __len__(self) -> int:
        return len(self._sas)

    def _internal(self, where: str) -> DecapResult:
        """An exception escaped the checks: count it, log with backoff (1, 2, 4, ...)."""
        count = self.drops.counts[DropReason.INTERNAL] + 1
        if count & (count - 1) == 0:
            log.exception("%s failed unexpectedly (%d so far); packet dropped", where, count)
        return self._drop(DropReason.INTERNAL)

    def _drop(self, reason: DropReason, state: InboundSa | None = None) -> DecapResult:
        self.drops.counts[reason] += 1
        if state is not None:
            state.stats.drops += 1
        return _make_result((Verdict.DROP, None, state, reason))

    def decap_esp(self, packet: bytes, via_udp: bool = False) -> DecapResult:
        """Decapsulate one ESP packet (``SPI`` first). Never raises."""
        try:
            return self._decap(bytes(packet), via_udp)
        except Exception:  # noqa: BLE001 - the worker must survive any input
            return self._internal("ESP decapsulation")

    def decap_udp(self, payload: bytes) -> DecapResult:
        """Handle a UDP payload received on port 4500 (RFC 3948). Never raises."""
        try:
            kind = classify_udp_payload(payload)
            if kind is PacketKind.KEEPALIVE:
                self.keepalives += 1
                return DecapResult(Verdict.KEEPALIVE)
            if kind is PacketKind.IKE:
                self.ike_packets += 1
                return DecapResult(Verdict.IKE, bytes(payload[4:]))
            return self._decap(bytes(payload), True)
        except Exception:  # noqa: BLE001 - the worker must survive any input
            return self._internal("ESP-in-UDP decapsulation")

    def decap_ipv4(self, packet: bytes, natt_port: int = 4500) -> DecapResult:
        """Handle a whole outer IPv4 packet (raw ESP or ESP-in-UDP). Never raises."""
        try:
            outer = parse_ipv4(bytes(packet))
            if outer is None:
                return self._drop(DropReason.BAD_OUTER)
            if outer.proto == IPPROTO_ESP:
                return self._decap(outer.payload, False)
            if outer.proto == IPPROTO_UDP and outer.dport == natt_port:
                return self.decap_udp(outer.payload)
            return self._drop(DropReason.NOT_ESP)
        except Exception:  # noqa: BLE001 - the worker must survive any input
            return self._internal("IPv4 ESP decapsulation")

    def _decap(self, p: bytes, via_udp: bool) -> DecapResult:
        n = len(p)
        if n < 8:
            return self._drop(DropReason.TRUNCATED)
        spi, seq_lo = _HDR.unpack_from(p)
        state = self._sas.get(spi)
        if state is None:
            return self._drop(DropReason.UNKNOWN_SPI)
        if state.udp != via_udp:
            return self._drop(DropReason.WRONG_ENCAP, state)
        if n < state.min_len:
            return self._drop(DropReason.TRUNCATED, state)
        if (n - state._overhead) % state._align:
            return self._drop(DropReason.BAD_LENGTH, state)
        stats = state.stats
        if state._limited and state.hard_limit_reached():
            return self._drop(DropReason.SA_EXPIRED, state)
        window = state.window
        seq = window.infer(seq_lo)
        if seq < 0 or not window.check(seq):
            return self._drop(DropReason.REPLAYED, state)
        plaintext = state.transform.unprotect(p, seq >> 32, state._esn)
        if plaintext is None:
            return self._drop(DropReason.BAD_ICV, state)
        window.update(seq)
        m = len(plaintext) - 2
        padlen = plaintext[m]
        next_header = plaintext[m + 1]
        end = m - padlen
        if end < 0 or (padlen and plaintext[end:m] != PAD_BYTES[:padlen]):
            return self._drop(DropReason.BAD_PADDING, state)
        # Inner packet checks (RFC 4303 2.7: bytes after it are TFC padding).
        if next_header == 4:
            if (end < 20 or plaintext[0] & 0xF0 != 0x40 or plaintext[0] & 0x0F < 5):
                return self._drop(DropReason.BAD_INNER, state)
            length = (plaintext[2] << 8) | plaintext[3]
            if length < (plaintext[0] & 0x0F) * 4 or length > end:
                return self._drop(DropReason.BAD_INNER, state)
        elif next_header == 41:
            if end < 40 or plaintext[0] & 0xF0 != 0x60:
                return self._drop(DropReason.BAD_INNER, state)
            length = 40 + ((plaintext[4] << 8) | plaintext[5])
            if length > end:
                return self._drop(DropReason.BAD_INNER, state)
        elif next_header == IPPROTO_NONE:
            return self._drop(DropReason.DUMMY, state)
        else:
            return self._drop(DropReason.BAD_NEXT_HEADER, state)
        stats.packets += 1
        stats.bytes += length
        return _make_result((_ACCEPT, plaintext[:length], state, None))
