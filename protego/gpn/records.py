"""SA records from etcd (``/protego/v1/sas/<vip>/<spi>``) as the GPN installs them (pure).

:func:`parse_sa_record` validates a record written by the GMN agent
(``protego.gmn.records.sa_record``) and returns a :class:`GpnSa`: the ESP
:class:`~protego.esp.sa.SecurityAssociation` plus what the data path needs around
it (tenant, tunnel, VNI, traffic selectors, peer address). Errors name the record
and the field, never a key byte.

Worker processes get SAs over their control pipe. ``SaKeys`` refuses to be pickled
on purpose, so :func:`sa_to_wire` / :func:`sa_from_wire` spell the hand-over out:
a plain tuple that only ever travels through the in-memory pipe (never a file,
never a log line).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protego.errors import ConfigError
from protego.esp.sa import (
    MAX_REPLAY_WINDOW,
    MIN_REPLAY_WINDOW,
    Direction,
    Lifetime,
    SaKeys,
    SecurityAssociation,
    UdpEncap,
)
from protego.esp.suites import Suite
from protego.sealing import SealError, is_sealed

__all__ = ["GpnSa", "Prefixes", "parse_sa_record", "parse_ts", "sa_from_wire", "sa_to_wire"]

IPv4Net = ipaddress.IPv4Network


class Prefixes:
    """A set of IPv4 ranges as sorted ``(first, last)`` integer pairs (fast membership)."""

    __slots__ = ("ranges", "text")

    def __init__(self, ranges: list[tuple[int, int]], text: tuple[str, ...] = ()) -> None:
        self.ranges = sorted(ranges)
        self.text = text

    def __contains__(self, addr: int) -> bool:
        for first, last in self.ranges:
            if first <= addr <= last:
                return True
        return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Prefixes) and self.ranges == other.ranges

    def __hash__(self) -> int:
        return hash(tuple(self.ranges))

    def __repr__(self) -> str:
        return f"Prefixes({', '.join(self.text)})"


def parse_ts(items: list[str] | tuple[str, ...], what: str) -> Prefixes:
    """Traffic selectors as the GMN writes them (``10.1.0.0/24``, ``a..b``, with an
    optional ``[proto/ports]`` suffix that the data path does not narrow by).
    IPv6 selectors are skipped (the tenant side is IPv4)."""
    ranges: list[tuple[int, int]] = []
    for raw in items:
        if not isinstance(raw, str):
            raise ConfigError(f"{what}: traffic selector {raw!r} is not a string")
        text = raw.split("[", 1)[0].strip()
        try:
            if ".." in text:
                a, b = (ipaddress.ip_address(x) for x in text.split("..", 1))
                if a.version != 4 or b.version != 4:
                    continue
                ranges.append((int(a), int(b)))
            else:
                net = ipaddress.ip_network(text, strict=False)
                if net.version != 4:
                    continue
                ranges.append((int(net.network_address), int(net.broadcast_address)))
        except ValueError:
            raise ConfigError(f"{what}: traffic selector {raw!r} is not an address range") from None
    return Prefixes(ranges, tuple(items))


@dataclass(frozen=True)
class GpnSa:
    """One SA placed on this GPN, with its tunnel context."""

    sa: SecurityAssociation
    vip: str
    tenant: str
    tunnel: str
    vni: int
    local_ts: Prefixes
    remote_ts: Prefixes
    created: float
    peer: str  # the remote gateway's address
    peer_port: int  # outbound: destination UDP port; inbound: the peer's source port

    @property
    def spi(self) -> int:
        return self.sa.spi

    @property
    def inbound(self) -> bool:
        return self.sa.direction is Direction.INBOUND

    @property
    def label(self) -> str:
        return f"{self.tenant}/{self.tunnel} spi={self.sa.spi:08x} {self.sa.direction.value}"

    def same_keys_and_suite(self, other: GpnSa) -> bool:
        return self.sa.keys == other.sa.keys and self.sa.suite is other.sa.suite


Opener = Callable[[str, str], bytes]  # (sealed value, context) -> plaintext; SealError


def _field(rec: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in rec:
        raise ConfigError(f"{where}: field {name!r} missing")
    value = rec[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: field {name!r} has the wrong type")
    return value


def _b64(rec: dict[str, Any], name: str, where: str, opener: Opener | None = None) -> bytes:
    value = rec.get(name, "")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field {name!r} is not base64 text")
    if is_sealed(value):  # sealed to this GPN's key by the GMN (protego/sealing.py)
        if opener is None:
            raise ConfigError(f"{where}: field {name!r} is sealed and this node holds no key to open it")
        try:
            return opener(value, f"{where}/{name}")
        except SealError as exc:
            raise ConfigError(f"{where}: field {name!r}: {exc}") from None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: field {name!r} is not valid base64") from None


def _num(rec: dict[str, Any], name: str, default: int, lo: int, hi: int, where: str) -> int:
    """An optional integer field (absent, null or 0: ``default``)."""
    value = rec.get(name) or default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where}: field {name!r} is not an integer in {lo}..{hi}")
    return value


def parse_sa_record(rec: Any, where: str = "SA record", opener: Opener | None = None) -> GpnSa:
    """Validate one ``sas/<vip>/<spi>`` record (``where``: its key under the prefix, the
    context its sealed keys were sealed for; ``opener(sealed, context)`` opens them).
    Raises ``ConfigError`` (no key bytes), and nothing else, whatever the record holds."""
    try:
        return _parse_sa_record(rec, where, opener)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        # the type only: a message could quote a value, and values include keys
        raise ConfigError(f"{where}: malformed ({type(exc).__name__} reading it)") from None


def _parse_sa_record(rec: Any, where: str, opener: Opener | None) -> GpnSa:
    if not isinstance(rec, dict):
        raise ConfigError(f"{where}: not a JSON object")
    spi_text = _field(rec, "spi", str, where)
    try:
        spi = int(spi_text, 16)
    except ValueError:
        raise ConfigError(f"{where}: spi {spi_text!r} is not hex") from None
    direction = _field(rec, "direction", str, where)
    if direction not in ("in", "out"):
        raise ConfigError(f"{where}: direction {direction!r} is not in/out")
    mode = rec.get("mode", "tunnel")
    if mode != "tunnel":
        raise ConfigError(f"{where}: mode {mode!r} is not supported (tunnel only)")
    try:
        suite = Suite.parse(_field(rec, "suite", str, where))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    enc = _b64(rec, "enc_key", where, opener)
    integ = _b64(rec, "integ_key", where, opener)
    spec = suite.spec
    if spec.aead:
        if len(enc) != spec.enc_key_len + spec.salt_len:
            raise ConfigError(f"{where} ({suite.value}): enc_key must be "
                              f"{spec.enc_key_len + spec.salt_len} bytes (key and salt)")
        keys = SaKeys(enc[: spec.enc_key_len], salt=enc[spec.enc_key_len:])
    else:
        if len(enc) != spec.enc_key_len or len(integ) != spec.auth_key_len:
            raise ConfigError(f"{where} ({suite.value}): enc_key/integ_key must be "
                              f"{spec.enc_key_len}/{spec.auth_key_len} bytes")
        keys = SaKeys(enc, auth_key=integ)
    src = _field(rec, "src", str, where)
    dst = _field(rec, "dst", str, where)
    sport = _num(rec, "sport", 4500, 1, 65535, where)
    dport = _num(rec, "dport", 4500, 1, 65535, where)
    encap = UdpEncap(sport, dport) if rec.get("encap") else None
    # charon's default receive window is 32; the engine's window is at least 64
    # (a larger window only accepts more reordering, never a replay)
    window = _num(rec, "replay_window", MIN_REPLAY_WINDOW, 0, 1 << 32, where)
    window = min(max(window, MIN_REPLAY_WINDOW), MAX_REPLAY_WINDOW)
    lts = rec.get("lifetimes") or {}
    try:
        lifetime = Lifetime(soft_bytes=lts.get("bytes_rekey") or None,
                            hard_bytes=lts.get("bytes_life") or None)
    except ConfigError:
        lifetime = Lifetime()
    tenant = _field(rec, "tenant", str, where)
    tunnel = _field(rec, "tunnel", str, where)
    vni = _field(rec, "vni", int, where)
    if not 0 < vni < 1 << 24:
        raise ConfigError(f"{where}: vni {vni} out of range")
    inbound = direction == "in"
    try:
        sa = SecurityAssociation(
            spi=spi, direction=Direction.INBOUND if inbound else Direction.OUTBOUND,
            suite=suite, keys=keys, src=src, dst=dst, encap=encap, replay_window=window,
            esn=bool(rec.get("esn", False)), lifetime=lifetime, reqid=_num(rec, "reqid", 0, 0, (1 << 32) - 1, where),
            tunnel_id=f"{tenant}/{tunnel}",
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if sa.src.version != 4:
        raise ConfigError(f"{where}: only IPv4 outer addresses are supported")
    return GpnSa(
        sa=sa, vip=_field(rec, "vip", str, where), tenant=tenant, tunnel=tunnel, vni=vni,
        local_ts=parse_ts(rec.get("local_ts") or [], f"{where} local_ts"),
        remote_ts=parse_ts(rec.get("remote_ts") or [], f"{where} remote_ts"),
        created=float(_field(rec, "created", (int, float), where)) if "created" in rec else 0.0,
        peer=src if inbound else dst, peer_port=sport if inbound else dport,
    )


# --------------------------------------------------------------------------- #
# hand-over to a worker process (through its control pipe only)

def sa_to_wire(g: GpnSa) -> tuple[Any, ...]:
    """Everything a worker needs, as plain values (explicitly including the keys)."""
    sa = g.sa
    k = sa.keys
    encap = (sa.encap.sport, sa.encap.dport) if sa.encap else None
    lt = sa.lifetime
    return (sa.spi, sa.direction.value, sa.suite.value, k.enc_key, k.salt, k.auth_key,
            str(sa.src), str(sa.dst), encap, sa.replay_window, sa.esn,
            (lt.soft_bytes, lt.hard_bytes), sa.reqid, g.vip, g.tenant, g.tunnel, g.vni,
            g.local_ts.ranges, g.remote_ts.ranges, g.created, g.peer, g.peer_port)


def sa_from_wire(t: tuple[Any, ...]) -> GpnSa:
    (spi, direction, suite, enc, salt, auth, src, dst, encap, window, esn, (sb, hb), reqid,
     vip, tenant, tunnel, vni, lts, rts, created, peer, peer_port) = t
    sa = SecurityAssociation(
        spi=spi, direction=Direction(direction), suite=Suite(suite),
        keys=SaKeys(enc, salt=salt, auth_key=auth), src=src, dst=dst,
        encap=UdpEncap(*encap) if encap else None, replay_window=window, esn=esn,
        lifetime=Lifetime(soft_bytes=sb, hard_bytes=hb), reqid=reqid, tunnel_id=f"{tenant}/{tunnel}")
    return GpnSa(sa, vip, tenant, tunnel, vni, Prefixes([tuple(r) for r in lts]),
                 Prefixes([tuple(r) for r in rts]), created, peer, peer_port)
