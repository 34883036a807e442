"""Codec of the kernel-protego plugin protocol (charon plugin <-> GMN agent).

The wire format is specified in ``charon-plugins/kernel-protego/PROTOCOL.md``;
``kernel_protego_msg.c`` is the plugin's side of the same codec.  This module
does no I/O: :func:`encode` turns a message into a frame, :class:`FrameReader`
splits a byte stream into frame bodies and :func:`decode` turns a body back
into a message.

Key material is carried as :class:`Secret`, whose ``repr``/``str`` never show
the bytes, so a logged message or an exception never leaks a key.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from protego.errors import PeerError

VERSION = (1, 0)
"""Protocol version (major, minor) this codec speaks."""

FRAME_VERSION = 1
"""Version byte in every frame header."""

HEADER = struct.Struct(">BBHI")
"""Frame header after the length prefix: version, reserved, type, request id."""

LENGTH = struct.Struct(">I")
MAX_FRAME = 1024 * 1024
"""Largest frame body (after the 4-byte length prefix) either side accepts."""

REPLY = 0x8000
"""Bit set in the type of every reply (reply type = REPLY | request type)."""


class ProtocolError(PeerError):
    """The peer sent bytes that are not a valid protocol message."""


class VersionMismatch(ProtocolError):
    """The peer speaks an incompatible protocol version."""


class UnknownMessage(ProtocolError):
    """A well-formed frame of a type this codec does not know."""

    def __init__(self, msg_type: int, request_id: int) -> None:
        super().__init__(f"unknown message type 0x{msg_type:04x}")
        self.msg_type = msg_type
        self.request_id = request_id


class MsgType(enum.IntEnum):
    HELLO = 0x0001
    GET_SPI = 0x0002
    GET_CPI = 0x0003
    ADD_SA = 0x0004
    UPDATE_SA = 0x0005
    QUERY_SA = 0x0006
    DEL_SA = 0x0007
    FLUSH_SAS = 0x0008
    ADD_POLICY = 0x0009
    QUERY_POLICY = 0x000A
    DEL_POLICY = 0x000B
    FLUSH_POLICIES = 0x000C
    DUMP_BEGIN = 0x000D
    DUMP_END = 0x000E
    EXPIRE = 0x0040


class Attr(enum.IntEnum):
    VERSION = 1
    SOFTWARE = 2
    STATUS = 3
    ERROR = 4
    PID = 5
    SRC = 10
    DST = 11
    SPI = 12
    PROTO = 13
    CPI = 14
    MARK = 15
    IF_ID = 16
    REQID = 17
    MODE = 18
    SRC_TS = 19
    DST_TS = 20
    INTERFACE = 21
    LIFETIME = 22
    ENC_ALG = 23
    ENC_KEY = 24
    INT_ALG = 25
    INT_KEY = 26
    REPLAY_WINDOW = 27
    TFC = 28
    IPCOMP = 29
    HW_OFFLOAD = 30
    COPY_DSCP = 31
    LABEL = 32
    SA_FLAGS = 33
    NEW_SRC = 34
    NEW_DST = 35
    NEW_REQID = 36
    BYTES = 37
    PACKETS = 38
    IDLE = 39
    POLICY_DIR = 40
    POLICY_TYPE = 41
    POLICY_PRIO = 42
    MANUAL_PRIO = 43
    ESP_SPI = 44
    AH_SPI = 45
    HARD = 47
    DUMP = 48
    SA_COUNT = 49
    POLICY_COUNT = 50
    AGE = 51
    SET_MARK = 52


class Status(enum.IntEnum):
    OK = 0
    FAILED = 1
    NOT_FOUND = 2
    NOT_SUPPORTED = 3
    INVALID = 4
    VERSION = 5


class SaFlag(enum.IntFlag):
    NONE = 0
    ENCAP = 1 << 0
    ESN = 1 << 1
    COPY_DF = 1 << 2
    COPY_ECN = 1 << 3
    INITIATOR = 1 << 4
    INBOUND = 1 << 5
    UPDATE = 1 << 6
    NEW_ENCAP = 1 << 7


class Mode(enum.IntEnum):
    """IPsec mode (strongSwan's ipsec_mode_t values)."""

    TRANSPORT = 1
    TUNNEL = 2
    BEET = 3
    PASS = 4
    DROP = 5


class PolicyDir(enum.IntEnum):
    IN = 0
    OUT = 1
    FWD = 2


ESP = 50
AH = 51

# ---------------------------------------------------------------- value types


class Secret:
    """Key material: compares and hashes by value, never shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        """The key bytes, for the data path only (never log them)."""
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash((Secret, len(self._value)))

    def __repr__(self) -> str:
        return f"<secret {len(self._value)} bytes>"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # no pickling into files by accident
        raise TypeError("Secret values are not picklable")


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Host:
    """An address with a port (the port is 0 unless NAT-T is in use)."""

    address: IPAddress
    port: int = 0

    @classmethod
    def parse(cls, text: str, port: int = 0) -> Host:
        return cls(ipaddress.ip_address(text), port)

    def __str__(self) -> str:
        return f"{self.address}[{self.port}]" if self.port else str(self.address)


@dataclass(frozen=True)
class TrafficSelector:
    """An address range, IP protocol and port range (strongSwan ts_type_t 7/8)."""

    from_addr: IPAddress
    to_addr: IPAddress
    protocol: int = 0
    from_port: int = 0
    to_port: int = 0xFFFF

    @classmethod
    def from_network(cls, cidr: str, protocol: int = 0, from_port: int = 0,
                     to_port: int = 0xFFFF) -> TrafficSelector:
        net = ipaddress.ip_network(cidr, strict=False)
        return cls(net.network_address, net.broadcast_address, protocol, from_port, to_port)

    @property
    def ts_type(self) -> int:
        return 7 if self.from_addr.version == 4 else 8

    def cidr(self) -> str | None:
        """The range as one CIDR prefix, None if it is not one."""
        nets = list(ipaddress.summarize_address_range(self.from_addr, self.to_addr))
        return str(nets[0]) if len(nets) == 1 else None

    def __str__(self) -> str:
        rng = self.cidr() or f"{self.from_addr}..{self.to_addr}"
        if self.protocol or (self.from_port, self.to_port) != (0, 0xFFFF):
            return f"{rng}[{self.protocol}/{self.from_port}-{self.to_port}]"
        return rng


@dataclass(frozen=True)
class Mark:
    value: int
    mask: int = 0xFFFFFFFF


@dataclass(frozen=True)
class Lifetime:
    """charon's lifetime_cfg_t: relative seconds, bytes and packets (0 = none)."""

    time_life: int = 0
    time_rekey: int = 0
    time_jitter: int = 0
    bytes_life: int = 0
    bytes_rekey: int = 0
    bytes_jitter: int = 0
    packets_life: int = 0
    packets_rekey: int = 0
    packets_jitter: int = 0


# ------------------------------------------------------------ value encodings

_FIXED = {"u8": struct.Struct(">B"), "u16": struct.Struct(">H"),
          "u32": struct.Struct(">I"), "u64": struct.Struct(">Q")}
_LIFETIME = struct.Struct(">9Q")


def _enc_addr(addr: IPAddress) -> bytes:
    return addr.packed


def _dec_addr(raw: bytes) -> IPAddress:
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    raise ProtocolError(f"address of {len(raw)} bytes")


def _encode_value(kind: str, value: Any) -> bytes:
    if kind in _FIXED:
        return _FIXED[kind].pack(int(value))
    if kind == "bool":
        return b"\x01" if value else b"\x00"
    if kind == "str":
        return str(value).encode()
    if kind == "bytes":
        return bytes(value)
    if kind == "secret":
        return bytes(value.reveal())
    if kind == "version":
        return struct.pack(">HH", *value)
    if kind == "host":
        fam = 4 if value.address.version == 4 else 6
        return struct.pack(">BH", fam, value.port) + _enc_addr(value.address)
    if kind == "ts":
        if value.from_addr.version != value.to_addr.version:
            raise ProtocolError("traffic selector mixes address families")
        return (struct.pack(">BBHH", value.ts_type, value.protocol, value.from_port, value.to_port)
                + _enc_addr(value.from_addr) + _enc_addr(value.to_addr))
    if kind == "mark":
        return struct.pack(">II", value.value, value.mask)
    if kind == "lifetime":
        return _LIFETIME.pack(*dataclasses.astuple(value))
    if kind == "flags":
        return _FIXED["u32"].pack(int(value))
    raise AssertionError(kind)


def _decode_value(kind: str, raw: bytes) -> Any:
    try:
        if kind in _FIXED:
            (v,) = _FIXED[kind].unpack(raw)
            return v
        if kind == "bool":
            if len(raw) != 1:
                raise ProtocolError("flag of wrong length")
            return raw != b"\x00"
        if kind == "str":
            return raw.decode()
        if kind == "bytes":
            return raw
        if kind == "secret":
            return Secret(raw)
        if kind == "version":
            major, minor = struct.unpack(">HH", raw)
            return (major, minor)
        if kind == "host":
            fam, port = struct.unpack_from(">BH", raw)
            addr = _dec_addr(raw[3:])
            if (fam, addr.version) not in ((4, 4), (6, 6)):
                raise ProtocolError("host family does not match its address")
            return Host(addr, port)
        if kind == "ts":
            ts_type, proto, fport, tport = struct.unpack_from(">BBHH", raw)
            rest = raw[6:]
            if ts_type not in (7, 8) or len(rest) != (8 if ts_type == 7 else 32):
                raise ProtocolError("malformed traffic selector")
            half = len(rest) // 2
            return TrafficSelector(_dec_addr(rest[:half]), _dec_addr(rest[half:]), proto,
                                   fport, tport)
        if kind == "mark":
            return Mark(*struct.unpack(">II", raw))
        if kind == "lifetime":
            return Lifetime(*_LIFETIME.unpack(raw))
        if kind == "flags":
            (v,) = _FIXED["u32"].unpack(raw)
            return SaFlag(v)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"malformed {kind} attribute") from exc
    raise AssertionError(kind)


# ------------------------------------------------------------------ messages


@dataclass(frozen=True)
class F:
    """One message field: its attribute, encoding, and whether it repeats."""

    name: str
    attr: Attr
    kind: str
    repeated: bool = False


class Message:
    """Base of all messages; subclasses are dataclasses with a FIELDS schema."""

    TYPE: ClassVar[int]
    FIELDS: ClassVar[tuple[F, ...]]
    REQUIRED: ClassVar[tuple[str, ...]] = ()


_SA_ID = (F("src", Attr.SRC, "host"), F("dst", Attr.DST, "host"), F("spi", Attr.SPI, "u32"),
          F("proto", Attr.PROTO, "u8"), F("mark", Attr.MARK, "mark"),
          F("if_id", Attr.IF_ID, "u32"))
_SA_ID_REQUIRED = ("src", "dst", "spi", "proto")


@dataclass(frozen=True)
class Hello(Message):
    TYPE: ClassVar[int] = MsgType.HELLO
    FIELDS: ClassVar[tuple[F, ...]] = (F("version", Attr.VERSION, "version"),
                                       F("software", Attr.SOFTWARE, "str"),
                                       F("pid", Attr.PID, "u32"))
    REQUIRED: ClassVar[tuple[str, ...]] = ("version",)
    version: tuple[int, int] = VERSION
    software: str | None = None
    pid: int | None = None


@dataclass(frozen=True)
class GetSpi(Message):
    TYPE: ClassVar[int] = MsgType.GET_SPI
    FIELDS: ClassVar[tuple[F, ...]] = (F("src", Attr.SRC, "host"), F("dst", Attr.DST, "host"),
                                       F("proto", Attr.PROTO, "u8"))
    REQUIRED: ClassVar[tuple[str, ...]] = ("src", "dst", "proto")
    src: Host | None = None
    dst: Host | None = None
    proto: int = ESP


@dataclass(frozen=True)
class GetCpi(Message):
    TYPE: ClassVar[int] = MsgType.GET_CPI
    FIELDS: ClassVar[tuple[F, ...]] = (F("src", Attr.SRC, "host"), F("dst", Attr.DST, "host"))
    REQUIRED: ClassVar[tuple[str, ...]] = ("src", "dst")
    src: Host | None = None
    dst: Host | None = None


class _SaIdentity:
    """Mixin: the (spi, proto, dst address) key charon identifies SAs by."""

    spi: int
    proto: int
    dst: Host | None

    @property
    def key(self) -> tuple[int, int, str]:
        assert self.dst is not None
        return (self.spi, self.proto, str(self.dst.address))


@dataclass(frozen=True)
class AddSa(_SaIdentity, Message):
    TYPE: ClassVar[int] = MsgType.ADD_SA
    FIELDS: ClassVar[tuple[F, ...]] = _SA_ID + (
        F("reqid", Attr.REQID, "u32"), F("mode", Attr.MODE, "u8"),
        F("src_ts", Attr.SRC_TS, "ts", True), F("dst_ts", Attr.DST_TS, "ts", True),
        F("interface", Attr.INTERFACE, "str"), F("enc_alg", Attr.ENC_ALG, "u16"),
        F("int_alg", Attr.INT_ALG, "u16"), F("replay_window", Attr.REPLAY_WINDOW, "u32"),
        F("tfc", Attr.TFC, "u32"), F("ipcomp", Attr.IPCOMP, "u16"), F("cpi", Attr.CPI, "u16"),
        F("hw_offload", Attr.HW_OFFLOAD, "u8"), F("copy_dscp", Attr.COPY_DSCP, "u8"),
        F("set_mark", Attr.SET_MARK, "mark"), F("label", Attr.LABEL, "bytes"),
        F("flags", Attr.SA_FLAGS, "flags"), F("lifetime", Attr.LIFETIME, "lifetime"),
        F("dump", Attr.DUMP, "bool"), F("age", Attr.AGE, "u32"),
        # keys last (the plugin writes them last too)
        F("enc_key", Attr.ENC_KEY, "secret"), F("int_key", Attr.INT_KEY, "secret"),
    )
    REQUIRED: ClassVar[tuple[str, ...]] = _SA_ID_REQUIRED + ("reqid", "mode", "enc_alg", "flags")
    src: Host | None = None
    dst: Host | None = None
    spi: int = 0
    proto: int = ESP
    mark: Mark | None = None
    if_id: int | None = None
    reqid: int = 0
    mode: int = Mode.TUNNEL
    src_ts: tuple[TrafficSelector, ...] = ()
    dst_ts: tuple[TrafficSelector, ...] = ()
    interface: str | None = None
    enc_alg: int = 0
    int_alg: int = 0
    replay_window: int = 0
    tfc: int = 0
    ipcomp: int | None = None
    cpi: int | None = None
    hw_offload: int = 0
    copy_dscp: int = 0
    set_mark: Mark | None = None
    label: bytes | None = None
    flags: SaFlag = SaFlag.NONE
    lifetime: Lifetime | None = None
    dump: bool = False
    age: int | None = None
    enc_key: Secret = field(default_factory=lambda: Secret(b""))
    int_key: Secret = field(default_factory=lambda: Secret(b""))

    @property
    def inbound(self) -> bool:
        return bool(self.flags & SaFlag.INBOUND)

    @property
    def initiator(self) -> bool:
        return bool(self.flags & SaFlag.INITIATOR)

    @property
    def encap(self) -> bool:
        return bool(self.flags & SaFlag.ENCAP)

    @property
    def esn(self) -> bool:
        return bool(self.flags & SaFlag.ESN)


@dataclass(frozen=True)
class UpdateSa(_SaIdentity, Message):
    TYPE: ClassVar[int] = MsgType.UPDATE_SA
    FIELDS: ClassVar[tuple[F, ...]] = _SA_ID + (
        F("new_src", Attr.NEW_SRC, "host"), F("new_dst", Attr.NEW_DST, "host"),
        F("new_reqid", Attr.NEW_REQID, "u32"), F("cpi", Attr.CPI, "u16"),
        F("flags", Attr.SA_FLAGS, "flags"))
    REQUIRED: ClassVar[tuple[str, ...]] = _SA_ID_REQUIRED + ("new_src", "new_dst")
    src: Host | None = None
    dst: Host | None = None
    spi: int = 0
    proto: int = ESP
    mark: Mark | None = None
    if_id: int | None = None
    new_src: Host | None = None
    new_dst: Host | None = None
    new_reqid: int | None = None
    cpi: int | None = None
    flags: SaFlag = SaFlag.NONE


@dataclass(frozen=True)
class QuerySa(_SaIdentity, Message):
    TYPE: ClassVar[int] = MsgType.QUERY_SA
    FIELDS: ClassVar[tuple[F, ...]] = _SA_ID
    REQUIRED: ClassVar[tuple[str, ...]] = _SA_ID_REQUIRED
    src: Host | None = None
    dst: Host | None = None
    spi: int = 0
    proto: int = ESP
    mark: Mark | None = None
    if_id: int | None = None


@dataclass(frozen=True)
class DelSa(_SaIdentity, Message):
    TYPE: ClassVar[int] = MsgType.DEL_SA
    FIELDS: ClassVar[tuple[F, ...]] = _SA_ID + (F("cpi", Attr.CPI, "u16"),)
    REQUIRED: ClassVar[tuple[str, ...]] = _SA_ID_REQUIRED
    src: Host | None = None
    dst: Host | None = None
    spi: int = 0
    proto: int = ESP
    mark: Mark | None = None
    if_id: int | None = None
    cpi: int | None = None


@dataclass(frozen=True)
class FlushSas(Message):
    TYPE: ClassVar[int] = MsgType.FLUSH_SAS
    FIELDS: ClassVar[tuple[F, ...]] = ()


_POLICY_ID = (F("dir", Attr.POLICY_DIR, "u8"), F("src_ts", Attr.SRC_TS, "ts"),
              F("dst_ts", Attr.DST_TS, "ts"), F("mark", Attr.MARK, "mark"),
              F("if_id", Attr.IF_ID, "u32"), F("interface", Attr.INTERFACE, "str"),
              F("label", Attr.LABEL, "bytes"))
_POLICY_DATA = (F("type", Attr.POLICY_TYPE, "u8"), F("prio", Attr.POLICY_PRIO, "u8"),
                F("manual_prio", Attr.MANUAL_PRIO, "u32"), F("src", Attr.SRC, "host"),
                F("dst", Attr.DST, "host"), F("mode", Attr.MODE, "u8"),
                F("reqid", Attr.REQID, "u32"), F("esp_spi", Attr.ESP_SPI, "u32"),
                F("ah_spi", Attr.AH_SPI, "u32"), F("ipcomp", Attr.IPCOMP, "u16"),
                F("cpi", Attr.CPI, "u16"))


class _PolicyIdentity:
    dir: int
    src_ts: TrafficSelector | None
    dst_ts: TrafficSelector | None
    mark: Mark | None
    if_id: int | None
    interface: str | None
    label: bytes | None

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.dir, self.src_ts, self.dst_ts, self.mark, self.if_id, self.interface,
                self.label)


@dataclass(frozen=True)
class _PolicyBody(_PolicyIdentity):
    """The fields add_policy and del_policy share (charon passes the same policy data)."""

    dir: int = PolicyDir.OUT
    src_ts: TrafficSelector | None = None
    dst_ts: TrafficSelector | None = None
    mark: Mark | None = None
    if_id: int | None = None
    interface: str | None = None
    label: bytes | None = None
    type: int = 1
    prio: int = 1
    manual_prio: int | None = None
    src: Host | None = None
    dst: Host | None = None
    mode: int | None = None
    reqid: int | None = None
    esp_spi: int | None = None
    ah_spi: int | None = None
    ipcomp: int | None = None
    cpi: int | None = None


@dataclass(frozen=True)
class AddPolicy(_PolicyBody, Message):
    TYPE: ClassVar[int] = MsgType.ADD_POLICY
    FIELDS: ClassVar[tuple[F, ...]] = _POLICY_ID + _POLICY_DATA + (F("dump", Attr.DUMP, "bool"),)
    REQUIRED: ClassVar[tuple[str, ...]] = ("dir", "src_ts", "dst_ts")
    dump: bool = False


@dataclass(frozen=True)
class DelPolicy(_PolicyBody, Message):
    TYPE: ClassVar[int] = MsgType.DEL_POLICY
    FIELDS: ClassVar[tuple[F, ...]] = _POLICY_ID + _POLICY_DATA
    REQUIRED: ClassVar[tuple[str, ...]] = ("dir", "src_ts", "dst_ts")


@dataclass(frozen=True)
class QueryPolicy(_PolicyIdentity, Message):
    TYPE: ClassVar[int] = MsgType.QUERY_POLICY
    FIELDS: ClassVar[tuple[F, ...]] = _POLICY_ID
    REQUIRED: ClassVar[tuple[str, ...]] = ("dir", "src_ts", "dst_ts")
    dir: int = PolicyDir.OUT
    src_ts: TrafficSelector | None = None
    dst_ts: TrafficSelector | None = None
    mark: Mark | None = None
    if_id: int | None = None
    interface: str | None = None
    label: bytes | None = None


@dataclass(frozen=True)
class FlushPolicies(Message):
    TYPE: ClassVar[int] = MsgType.FLUSH_POLICIES
    FIELDS: ClassVar[tuple[F, ...]] = ()


@dataclass(frozen=True)
class DumpBegin(Message):
    TYPE: ClassVar[int] = MsgType.DUMP_BEGIN
    FIELDS: ClassVar[tuple[F, ...]] = (F("sa_count", Attr.SA_COUNT, "u32"),
                                       F("policy_count", Attr.POLICY_COUNT, "u32"))
    sa_count: int = 0
    policy_count: int = 0


@dataclass(frozen=True)
class DumpEnd(Message):
    TYPE: ClassVar[int] = MsgType.DUMP_END
    FIELDS: ClassVar[tuple[F, ...]] = (F("sa_count", Attr.SA_COUNT, "u32"),
                                       F("policy_count", Attr.POLICY_COUNT, "u32"))
    sa_count: int = 0
    policy_count: int = 0


@dataclass(frozen=True)
class Expire(Message):
    """Agent -> plugin: raise a soft or hard lifetime expire for an SA."""

    TYPE: ClassVar[int] = MsgType.EXPIRE
    FIELDS: ClassVar[tuple[F, ...]] = (F("proto", Attr.PROTO, "u8"), F("spi", Attr.SPI, "u32"),
                                       F("dst", Attr.DST, "host"), F("hard", Attr.HARD, "bool"))
    REQUIRED: ClassVar[tuple[str, ...]] = ("proto", "spi", "dst")
    proto: int = ESP
    spi: int = 0
    dst: Host | None = None
    hard: bool = False


@dataclass(frozen=True)
class Reply(Message):
    """Reply to any request; ``request_type`` is the request's type."""

    TYPE: ClassVar[int] = REPLY
    FIELDS: ClassVar[tuple[F, ...]] = (
        F("status", Attr.STATUS, "u8"), F("error", Attr.ERROR, "str"),
        F("version", Attr.VERSION, "version"), F("software", Attr.SOFTWARE, "str"),
        F("spi", Attr.SPI, "u32"), F("cpi", Attr.CPI, "u16"), F("bytes", Attr.BYTES, "u64"),
        F("packets", Attr.PACKETS, "u64"), F("idle", Attr.IDLE, "u32"))
    REQUIRED: ClassVar[tuple[str, ...]] = ("status",)
    request_type: int = MsgType.HELLO
    status: int = Status.OK
    error: str | None = None
    version: tuple[int, int] | None = None
    software: str | None = None
    spi: int | None = None
    cpi: int | None = None
    bytes: int | None = None
    packets: int | None = None
    idle: int | None = None


MESSAGES: dict[int, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, GetSpi, GetCpi, AddSa, UpdateSa, QuerySa, DelSa, FlushSas,
                              AddPolicy, DelPolicy, QueryPolicy, FlushPolicies, DumpBegin,
                              DumpEnd, Expire)
}

# ------------------------------------------------------------------- framing


def encode_attrs(msg: Message) -> bytes:
    out = bytearray()
    for f in msg.FIELDS:
        value = getattr(msg, f.name)
        if value is None:
            continue
        values = value if f.repeated else (value,)
        for v in values:
            raw = _encode_value(f.kind, v)
            if len(raw) > 0xFFFF:
                raise ProtocolError(f"attribute {f.name} too long")
            out += struct.pack(">HH", f.attr, len(raw)) + raw
    return bytes(out)


def encode(msg: Message, request_id: int = 0) -> bytes:
    """A whole frame: length prefix, header and attributes."""
    msg_type = REPLY | msg.request_type if isinstance(msg, Reply) else msg.TYPE
    body = HEADER.pack(FRAME_VERSION, 0, msg_type, request_id) + encode_attrs(msg)
    if len(body) > MAX_FRAME:
        raise ProtocolError("frame too large")
    return LENGTH.pack(len(body)) + body


def iter_attrs(raw: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, value) pairs of an attribute list; ProtocolError if truncated."""
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ProtocolError("truncated attribute header")
        attr, length = struct.unpack_from(">HH", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise ProtocolError("truncated attribute value")
        yield attr, raw[pos:pos + length]
        pos += length


def decode(body: bytes) -> tuple[int, Message]:
    """(request id, message) from a frame body (without the length prefix).

    Unknown attributes are skipped (minor versions may add some); an unknown
    message type raises :class:`UnknownMessage`, anything malformed
    :class:`ProtocolError`.
    """
    if len(body) < HEADER.size:
        raise ProtocolError("frame shorter than its header")
    version, _reserved, msg_type, request_id = HEADER.unpack_from(body)
    if version != FRAME_VERSION:
        raise VersionMismatch(f"frame version {version}, expected {FRAME_VERSION}")
    is_reply = bool(msg_type & REPLY)
    cls = Reply if is_reply else MESSAGES.get(msg_type)
    if cls is None:
        list(iter_attrs(body[HEADER.size:]))  # still reject malformed frames
        raise UnknownMessage(msg_type, request_id)
    by_attr = {f.attr: f for f in cls.FIELDS}
    values: dict[str, Any] = {}
    for attr, raw in iter_attrs(body[HEADER.size:]):
        f = by_attr.get(attr)  # type: ignore[call-overload]
        if f is None:
            continue
        v = _decode_value(f.kind, raw)
        if f.repeated:
            values[f.name] = values.get(f.name, ()) + (v,)
        elif f.name not in values:
            values[f.name] = v
    missing = [name for name in cls.REQUIRED if name not in values]
    if missing:
        raise ProtocolError(f"{cls.__name__} lacks {', '.join(missing)}")
    if is_reply:
        values["request_type"] = msg_type & ~REPLY
    return request_id, cls(**values)


def check_version(hello: Hello) -> None:
    """Raise :class:`VersionMismatch` unless ``hello`` speaks our major version."""
    if hello.version[0] != VERSION[0]:
        raise VersionMismatch(
            f"peer speaks protocol {hello.version[0]}.{hello.version[1]}, "
            f"this side {VERSION[0]}.{VERSION[1]}")


class FrameReader:
    """Split a byte stream into frame bodies (pure; feed it what recv returns)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        bodies = []
        while len(self._buf) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self._buf)
            if length < HEADER.size or length > MAX_FRAME:
                raise ProtocolError(f"invalid frame length {length}")
            if len(self._buf) < LENGTH.size + length:
                break
            bodies.append(bytes(self._buf[LENGTH.size:LENGTH.size + length]))
            del self._buf[:LENGTH.size + length]
        return bodies

    def clear(self) -> None:
        """Forget buffered bytes (they may hold key material)."""
        self._buf[:] = b"\x00" * len(self._buf)
        self._buf.clear()
