"""What the GIN/GEN needs from etcd, parsed and validated (pure).

Input is a plain mapping ``key (without the /protego/v1/ prefix) -> decoded JSON``
of the three prefixes the agent reads: ``steer/``, ``gmn/leader`` and
``gpn/nodes/``.  Output is a :class:`SteeringState`.  An entry that is invalid
(malformed SPI, unknown GPN, bad rate, bad traffic selector, overlapping another
tunnel's selectors) is *left out* of the state and reported in
``SteeringState.errors``; the rest of the state stays complete and consistent, so
the agent never loads a ruleset built from a half-understood entry.

The ``validate_*`` functions are the same checks for writers (GMN agent, CLI): they
raise :class:`~protego.errors.ConfigError` with one clear message.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protego.errors import ConfigError

PREFIX = "/protego/v1/"
STEER_IN = "steer/in/"
STEER_OUT = "steer/out/"
GMN_LEADER = "gmn/leader"
GPN_NODES = "gpn/nodes/"
GPN_HEALTH = "gpn/health/"
TENANTS = "tenants/"

_SPI_RE = re.compile(r"^[0-9a-fA-F]{8}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_VNI = (1 << 24) - 1


@dataclass(frozen=True)
class Gpn:
    name: str
    fabric_addr: str


@dataclass(frozen=True)
class SteerIn:
    """ESP / ESP-in-UDP to ``vip`` with inbound SPI ``spi`` goes to ``gpn``."""

    vip: str
    spi: int
    gpn: str
    tenant: str
    tunnel: str


@dataclass(frozen=True)
class Range:
    """An inclusive IPv4 address range (a traffic selector's addresses)."""

    lo: int
    hi: int

    def overlaps(self, other: Range) -> bool:
        return self.lo <= other.hi and other.lo <= self.hi

    def __str__(self) -> str:
        return f"{ipaddress.IPv4Address(self.lo)}-{ipaddress.IPv4Address(self.hi)}"


@dataclass(frozen=True)
class SteerOut:
    """Tenant traffic (VNI ``vni``, source in ``local_ts``, destination in
    ``remote_ts``) goes to ``gpn``; ``rate_mbps`` limits the tunnel both ways."""

    tenant: str
    tunnel: str
    gpn: str
    vni: int
    local_ts: tuple[Range, ...]
    remote_ts: tuple[Range, ...]
    rate_mbps: float  # 0 = unlimited


@dataclass(frozen=True)
class SteeringState:
    gpns: dict[str, Gpn] = field(default_factory=dict)
    gmn_addr: str | None = None
    steer_in: tuple[SteerIn, ...] = ()
    steer_out: tuple[SteerOut, ...] = ()
    errors: tuple[str, ...] = ()
    tenant_vips: tuple[str, ...] = ()  # every tenant's VIP (tenants/<t>): IKE to them goes to the GMN

    def rate_of(self, tenant: str, tunnel: str) -> float:
        for s in self.steer_out:
            if s.tenant == tenant and s.tunnel == tunnel:
                return s.rate_mbps
        return 0.0


def tunnel_id(tenant: str, tunnel: str) -> str:
    """A short stable id for nft object names (names may be long; nft's are not)."""
    return hashlib.sha1(f"{tenant}/{tunnel}".encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- #
# validation (shared with writers)


def _obj(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: value must be a JSON object")
    return value


def _name(value: Any, key: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigError(f"{key}: {what} {value!r} is not a valid name")
    return value


def _ipv4(value: Any, key: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except (ValueError, TypeError):
        raise ConfigError(f"{key}: {what} {value!r} is not an IPv4 address") from None


def parse_spi(text: str, key: str) -> int:
    if not _SPI_RE.match(text):
        raise ConfigError(f"{key}: SPI {text!r} must be 8 hex digits")
    spi = int(text, 16)
    if spi < 256:
        raise ConfigError(f"{key}: SPI 0x{spi:08x} is reserved (must be >= 0x00000100)")
    return spi


def parse_rate(value: Any, key: str) -> float:
    """``rate_mbps``: a number >= 0 (0 or absent = unlimited, per docs/etcd-schema.md)."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: rate_mbps {value!r} is not a number")
    if not 0 <= value <= 1_000_000:  # also refuses NaN
        raise ConfigError(f"{key}: rate_mbps {value!r} out of range (0..1000000, 0 = unlimited)")
    return float(value)


def parse_ts(value: Any, key: str, what: str) -> tuple[Range, ...]:
    """Traffic selectors: a list of ``a.b.c.d/len``, ``a.b.c.d`` or ``a.b.c.d-e.f.g.h``.

    Port/protocol selectors (swanctl ``net[proto/port]``) are refused: the GEN steers
    by addresses only."""
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: {what} must be a non-empty list of prefixes")
    out = []
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{key}: {what} entry {item!r} is not a string")
        try:
            if "-" in item:
                a, b = item.split("-", 1)
                lo, hi = int(ipaddress.IPv4Address(a.strip())), int(ipaddress.IPv4Address(b.strip()))
                if lo > hi:
                    raise ValueError
            else:
                net = ipaddress.IPv4Network(item, strict=True)
                lo, hi = int(net.network_address), int(net.broadcast_address)
        except ValueError:
            raise ConfigError(
                f"{key}: {what} entry {item!r} is not an IPv4 prefix, address or range"
                " (port/protocol selectors are not supported)") from None
        out.append(Range(lo, hi))
    return tuple(out)


def validate_gpn(key: str, value: Any) -> Gpn:
    name = key.rsplit("/", 1)[-1]
    v = _obj(value, key)
    return Gpn(_name(name, key, "GPN"), _ipv4(v.get("fabric_addr"), key, "fabric_addr"))


def validate_steer_in(key: str, value: Any, gpns: Mapping[str, Any] | None = None) -> SteerIn:
    """``steer/in/<vip>/<spi>`` → :class:`SteerIn`; ``gpns`` (names) checks the GPN exists."""
    parts = key.split("/")
    if len(parts) != 4 or parts[:2] != ["steer", "in"]:
        raise ConfigError(f"{key}: expected steer/in/<vip>/<spi>")
    vip = _ipv4(parts[2], key, "VIP")
    spi = parse_spi(parts[3], key)
    v = _obj(value, key)
    gpn = _name(v.get("gpn"), key, "GPN")
    if gpns is not None and gpn not in gpns:
        raise ConfigError(f"{key}: unknown GPN {gpn!r} (not registered under gpn/nodes/)")
    return SteerIn(vip, spi, gpn, _name(v.get("tenant"), key, "tenant"),
                   _name(v.get("tunnel"), key, "tunnel"))


def validate_steer_out(key: str, value: Any, gpns: Mapping[str, Any] | None = None) -> SteerOut:
    parts = key.split("/")
    if len(parts) != 4 or parts[:2] != ["steer", "out"]:
        raise ConfigError(f"{key}: expected steer/out/<tenant>/<tunnel>")
    tenant = _name(parts[2], key, "tenant")
    tunnel = _name(parts[3], key, "tunnel")
    v = _obj(value, key)
    gpn = _name(v.get("gpn"), key, "GPN")
    if gpns is not None and gpn not in gpns:
        raise ConfigError(f"{key}: unknown GPN {gpn!r} (not registered under gpn/nodes/)")
    vni = v.get("vni")
    if isinstance(vni, bool) or not isinstance(vni, int) or not 1 <= vni <= MAX_VNI:
        raise ConfigError(f"{key}: vni {vni!r} must be an integer 1..{MAX_VNI}")
    return SteerOut(tenant, tunnel, gpn, vni, parse_ts(v.get("local_ts"), key, "local_ts"),
                    parse_ts(v.get("remote_ts"), key, "remote_ts"), parse_rate(v.get("rate_mbps"), key))


def _strip(key: str) -> str:
    return key.removeprefix(PREFIX)


def build_state(entries: Mapping[str, Any]) -> SteeringState:
    """All of the agent's etcd view → a consistent :class:`SteeringState` (pure)."""
    errors: list[str] = []
    gpns: dict[str, Gpn] = {}
    gmn_addr: str | None = None
    ins: list[tuple[str, Any]] = []
    outs: list[tuple[str, Any]] = []
    vips: list[str] = []
    for raw_key in sorted(entries):
        key, value = _strip(raw_key), entries[raw_key]
        try:
            if key.startswith(GPN_NODES):
                g = validate_gpn(key, value)
                gpns[g.name] = g
            elif key == GMN_LEADER:
                gmn_addr = _ipv4(_obj(value, key).get("fabric_addr"), key, "fabric_addr")
            elif key.startswith(STEER_IN):
                ins.append((key, value))
            elif key.startswith(STEER_OUT):
                outs.append((key, value))
            elif key.startswith(TENANTS):
                vips.append(_ipv4(_obj(value, key).get("vip"), key, "vip"))
        except ConfigError as exc:
            errors.append(str(exc))
    steer_in: list[SteerIn] = []
    for key, value in ins:
        try:
            steer_in.append(validate_steer_in(key, value, gpns))
        except ConfigError as exc:
            errors.append(str(exc))
    steer_out: list[SteerOut] = []
    for key, value in outs:
        try:
            s = validate_steer_out(key, value, gpns)
            clash = _overlap(s, steer_out)
            if clash is not None:
                raise ConfigError(
                    f"{key}: traffic selectors overlap those of tunnel {clash.tenant}/{clash.tunnel}"
                    f" on VNI {s.vni}")
            steer_out.append(s)
        except ConfigError as exc:
            errors.append(str(exc))
    return SteeringState(gpns, gmn_addr, tuple(steer_in), tuple(steer_out), tuple(errors), tuple(sorted(set(vips))))


def _overlap(s: SteerOut, others: list[SteerOut]) -> SteerOut | None:
    for o in others:
        if o.vni != s.vni:
            continue
        for d in s.remote_ts:
            for od in o.remote_ts:
                if not d.overlaps(od):
                    continue
                if any(src.overlaps(osrc) for src in s.local_ts for osrc in o.local_ts):
                    return o
    return None
