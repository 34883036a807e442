"""Protego's userspace ESP engine core (RFC 4303 tunnel mode), pure: no sockets.

* :mod:`.sa` -- the SA model (validated; keys never shown)
* :mod:`.suites` -- AES-GCM-16 (RFC 4106) and AES-CBC + HMAC-SHA1-96/SHA-256-128
* :mod:`.engine` -- encapsulation, decapsulation, drop counters
* :mod:`.replay` -- anti-replay window with ESN inference
* :mod:`.sequence` -- outbound sequence numbers and per-worker block leases
* :mod:`.framing` -- ESP-in-UDP (RFC 3948) and raw ESP in IPv4
"""

from .engine import (
    DecapResult,
    Decapsulator,
    DropCounters,
    DropReason,
    InboundSa,
    OutboundSa,
    SaStats,
    Verdict,
)
from .framing import PacketKind, classify_udp_payload, parse_ipv4
from .replay import ReplayWindow
from .sa import (
    Direction,
    InvalidSaError,
    Lifetime,
    Mode,
    SaExpiredError,
    SaKeys,
    SecurityAssociation,
    SequenceExhaustedError,
    UdpEncap,
)
from .sequence import OutboundSequence, SequenceLease, SequenceLeaser
from .suites import Suite

__all__ = [
    "DecapResult",
    "Decapsulator",
    "Direction",
    "DropCounters",
    "DropReason",
    "InboundSa",
    "InvalidSaError",
    "Lifetime",
    "Mode",
    "OutboundSa",
    "OutboundSequence",
    "PacketKind",
    "ReplayWindow",
    "SaExpiredError",
    "SaKeys",
    "SaStats",
    "SecurityAssociation",
    "SequenceExhaustedError",
    "SequenceLease",
    "SequenceLeaser",
    "Suite",
    "UdpEncap",
    "Verdict",
    "classify_udp_payload",
    "parse_ipv4",
]
