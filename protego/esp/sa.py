"""The ESP security association model (pure, validated, key material hidden).

An :class:`SecurityAssociation` is the immutable description of one SA as the
GMN places it on a GPN: SPI, direction, tunnel endpoints, encapsulation, suite,
keys, replay window, ESN and lifetimes. The engine (``protego.esp.engine``) turns
it into per-worker state (cipher objects, replay window, sequence counter).

Key bytes never appear in ``repr``/``str``, in exceptions or in logs: validation
errors name the field and the expected *length* only.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from protego.errors import ConfigError, DataplaneError

from .suites import Suite

__all__ = [
    "MAX_REPLAY_WINDOW",
    "MIN_REPLAY_WINDOW",
    "NATT_PORT",
    "Direction",
    "InvalidSaError",
    "Lifetime",
    "Mode",
    "SaExpiredError",
    "SaKeys",
    "SecurityAssociation",
    "SequenceExhaustedError",
    "UdpEncap",
]

MIN_REPLAY_WINDOW = 64
MAX_REPLAY_WINDOW = 4096
NATT_PORT = 4500


class InvalidSaError(ConfigError):
    """An SA description is invalid (never carries key bytes)."""


class SequenceExhaustedError(DataplaneError):
    """The outbound sequence space of an SA is used up: it must be rekeyed."""


class SaExpiredError(DataplaneError):
    """A hard lifetime (bytes or packets) of an SA is reached."""


class Direction(enum.Enum):
    INBOUND = "in"
    OUTBOUND = "out"


class Mode(enum.Enum):
    TUNNEL = "tunnel"


@dataclass(frozen=True)
class UdpEncap:
    """ESP-in-UDP (RFC 3948) ports of the outer UDP header, as seen on the wire
    for this SA (``sport`` is the sender's port)."""

    sport: int = NATT_PORT
    dport: int = NATT_PORT

    def __post_init__(self) -> None:
        for name in ("sport", "dport"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise InvalidSaError(f"UDP encapsulation {name} {port!r} not in 1..65535")


@dataclass(frozen=True)
class Lifetime:
    """Soft and hard limits; ``None`` means unlimited. Time limits are enforced by
    the agent (it owns the clock); byte and packet limits by the engine."""

    soft_bytes: int | None = None
    hard_bytes: int | None = None
    soft_packets: int | None = None
    hard_packets: int | None = None
    soft_seconds: int | None = None
    hard_seconds: int | None = None

    def __post_init__(self) -> None:
        for kind in ("bytes", "packets", "seconds"):
            soft = getattr(self, f"soft_{kind}")
            hard = getattr(self, f"hard_{kind}")
            for name, value in ((f"soft_{kind}", soft), (f"hard_{kind}", hard)):
                if value is not None and (not isinstance(value, int) or value <= 0):
                    raise InvalidSaError(f"lifetime {name} must be a positive integer")
            if soft is not None and hard is not None and soft > hard:
                raise InvalidSaError(f"lifetime soft_{kind} exceeds hard_{kind}")


class SaKeys:
    """Key material of one SA. Its repr never shows a key byte.

    ``enc_key`` is the cipher key without salt, ``salt`` the 4-byte RFC 4106 salt
    (AEAD only), ``auth_key`` the HMAC key (CBC suites only).
    """

    __slots__ = ("auth_key", "enc_key", "salt")

    def __init__(self, enc_key: bytes, salt: bytes = b"", auth_key: bytes = b"") -> None:
        self.enc_key = bytes(enc_key)
        self.salt = bytes(salt)
        self.auth_key = bytes(auth_key)

    @classmethod
    def from_keymat(cls, suite: Suite, keymat: bytes) -> SaKeys:
        """Split key material in the order IKEv2/XFRM deliver it.

        AEAD: ``key || salt`` (RFC 4106 section 8.1). CBC+HMAC: ``enc_key || auth_key``.
        """
        spec = suite.spec
        if len(keymat) != spec.keymat_len:
            raise InvalidSaError(
                f"{spec.name}: key material must be {spec.keymat_len} bytes, "
                f"got {len(keymat)}"
            )
        k = spec.enc_key_len
        if spec.aead:
            return cls(keymat[:k], salt=keymat[k:])
        return cls(keymat[:k], auth_key=keymat[k:])

    def __repr__(self) -> str:
        return "SaKeys(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SaKeys):
            return NotImplemented
        return (self.enc_key, self.salt, self.auth_key) == (
            other.enc_key, other.salt, other.auth_key)

    def __hash__(self) -> int:
        return hash((self.enc_key, self.salt, self.auth_key))

    def __reduce__(self) -> str | tuple[object, ...]:
        # Pickling would write keys into files or pipes by accident; be explicit.
        raise TypeError("SaKeys cannot be pickled")


@dataclass(frozen=True)
class SecurityAssociation:
    """One ESP SA in tunnel mode.

    ``src``/``dst`` are the outer (tunnel endpoint) addresses in the direction of
    the traffic this SA protects: for an outbound SA ``src`` is us; for an inbound
    SA ``dst`` is us. ``replay_window`` is the anti-replay window of an inbound SA
    (64..4096); outbound SAs ignore it and may leave it at the default.
    """

    spi: int
    direction: Direction
    suite: Suite
    keys: SaKeys = field(repr=False)
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    mode: Mode = Mode.TUNNEL
    encap: UdpEncap | None = None
    replay_window: int = 64
    esn: bool = False
    lifetime: Lifetime = field(default_factory=Lifetime)
    reqid: int = 0
    tunnel_id: str = ""  # for log lines only

    def __post_init__(self) -> None:
        if not isinstance(self.spi, int) or not 256 <= self.spi <= 0xFFFFFFFF:
            # SPIs 1..255 are reserved by IANA, 0 is never sent (RFC 4303 2.1).
            raise InvalidSaError(f"SPI {self.spi!r} not in 256..2^32-1")
        if not isinstance(self.direction, Direction):
            raise InvalidSaError("direction must be a Direction")
        if not isinstance(self.suite, Suite):
            raise InvalidSaError("suite must be a Suite")
        if not isinstance(self.mode, Mode):
            raise InvalidSaError("only tunnel mode is supported")
        if not isinstance(self.keys, SaKeys):
            raise InvalidSaError("keys must be SaKeys")
        for name in ("src", "dst"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = ipaddress.ip_address(value)
                except ValueError:
                    raise InvalidSaError(f"{name} {value!r} is not an IP address") from None
                object.__setattr__(self, name, value)
            elif not isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                raise InvalidSaError(f"{name} must be an IP address")
        if self.src.version != self.dst.version:
            raise InvalidSaError("src and dst address families differ")
        if self.encap is not None and not isinstance(self.encap, UdpEncap):
            raise InvalidSaError("encap must be UdpEncap or None")
        if not isinstance(self.replay_window, int) or not (
            MIN_REPLAY_WINDOW <= self.replay_window <= MAX_REPLAY_WINDOW
        ):
            raise InvalidSaError(
                f"replay window {self.replay_window!r} not in "
                f"{MIN_REPLAY_WINDOW}..{MAX_REPLAY_WINDOW}"
            )
        if not isinstance(self.reqid, int) or not 0 <= self.reqid <= 0xFFFFFFFF:
            raise InvalidSaError("reqid not in 0..2^32-1")
        self._check_keys()

    def _check_keys(self) -> None:
        spec = self.suite.spec
        keys = self.keys
        checks = (
            ("encryption key", keys.enc_key, spec.enc_key_len),
            ("salt", keys.salt, spec.salt_len),
            ("authentication key", keys.auth_key, spec.auth_key_len),
        )
        for what, value, want in checks:
            if len(value) != want:
                raise InvalidSaError(
                    f"SA {self.spi:#010x} ({spec.name}): {what} must be {want} bytes, "
                    f"got {len(value)}"
                )

    @property
    def label(self) -> str:
        """Short identification for log lines (never keys)."""
        tid = f"{self.tunnel_id} " if self.tunnel_id else ""
        return f"{tid}spi={self.spi:#010x} {self.direction.value}"
