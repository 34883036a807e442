"""XFRM netlink message encoding and decoding: pure, no sockets, no root.

Byte layout follows ``include/uapi/linux/xfrm.h`` on Linux (host byte order for
netlink fields, network byte order for SPIs and ports). The encoders produce
exactly what iproute2's ``ip xfrm`` sends for the same SA or policy (the tests
compare byte for byte), apart from ``nlmsg_seq``/``nlmsg_pid``:

* state add/update: ``xfrm_usersa_info``, then algorithms (``XFRMA_ALG_AEAD`` or
  ``XFRMA_ALG_CRYPT`` + ``XFRMA_ALG_AUTH_TRUNC``), ``XFRMA_ENCAP``,
  ``XFRMA_REPLAY_ESN_VAL`` (for ESN or a window above 32; header only, no bitmap,
  as iproute2 does), ``XFRMA_MARK``, ``XFRMA_IF_ID``;
  flags ``NLM_F_REQUEST | NLM_F_ACK``.
* state delete/get: ``xfrm_usersa_id`` + ``XFRMA_SRCADDR`` (+ ``XFRMA_MARK``).
* policy add/update: ``xfrm_userpolicy_info`` + ``XFRMA_TMPL`` (+ ``XFRMA_MARK``).
* policy delete: ``xfrm_userpolicy_id`` (+ ``XFRMA_MARK``).
* dumps: a bare header with ``NLM_F_DUMP`` (state dumps may carry an
  ``XFRMA_ADDRESS_FILTER``).

Key bytes live only in :class:`Algorithm` objects whose repr hides them.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from .constants import (
    AF_INET,
    AF_INET6,
    IPPROTO_ESP,
    NLM_F_ACK,
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSGERR_ATTR_MSG,
    UDP_ENCAP_ESPINUDP,
    XFRM_INF,
    XFRM_MODE_TUNNEL,
    XFRM_MSG_DELPOLICY,
    XFRM_MSG_DELSA,
    XFRM_MSG_GETPOLICY,
    XFRM_MSG_GETSA,
    XFRM_MSG_NEWPOLICY,
    XFRM_MSG_NEWSA,
    XFRM_MSG_UPDPOLICY,
    XFRM_MSG_UPDSA,
    XFRM_POLICY_ALLOW,
    XFRM_STATE_ESN,
    XFRMA_ADDRESS_FILTER,
    XFRMA_ALG_AEAD,
    XFRMA_ALG_AUTH_TRUNC,
    XFRMA_ALG_CRYPT,
    XFRMA_ENCAP,
    XFRMA_IF_ID,
    XFRMA_MARK,
    XFRMA_REPLAY_ESN_VAL,
    XFRMA_REPLAY_VAL,
    XFRMA_SRCADDR,
    XFRMA_TMPL,
)

__all__ = [
    "NLMSG_HDR",
    "Address",
    "Algorithm",
    "Encap",
    "LifetimeCfg",
    "Mark",
    "NetlinkError",
    "NetlinkMessage",
    "Selector",
    "XfrmPolicy",
    "XfrmState",
    "XfrmTemplate",
    "decode_error",
    "decode_policy",
    "decode_state",
    "encode_policy",
    "encode_policy_delete",
    "encode_policy_dump",
    "encode_state",
    "encode_state_delete",
    "encode_state_dump",
    "encode_state_get",
    "iter_messages",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

NLMSG_HDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_PORTS = struct.Struct("!HHHH")
_SEL_TAIL = struct.Struct("=HBBB3xiI")
_SPI = struct.Struct("!I")
_LFT_CFG = struct.Struct("=8Q")
_LFT_CUR = struct.Struct("=4Q")
_STATS = struct.Struct("=3I")
_SA_TAIL = struct.Struct("=IIHBBB7x")
_SA_ID_TAIL = struct.Struct("=HB1x")
_POL_TAIL = struct.Struct("=IIBBBB4x")
_POL_ID_TAIL = struct.Struct("=IB3x")
_TMPL_FAMILY = struct.Struct("=H2x")
_TMPL_TAIL = struct.Struct("=IBBB1xIII")
_ENCAP = struct.Struct("=H")
_ENCAP_PORTS = struct.Struct("!HH2x")
_ESN = struct.Struct("=6I")
_REPLAY = struct.Struct("=3I")
_MARK = struct.Struct("=II")
_U32 = struct.Struct("=I")

SIZEOF_SELECTOR = 56
SIZEOF_USERSA_INFO = 224
SIZEOF_USERSA_ID = 24
SIZEOF_USERPOLICY_INFO = 168
SIZEOF_USERPOLICY_ID = 64
SIZEOF_USER_TMPL = 64
SIZEOF_ENCAP_TMPL = 24


def _nla_align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLA.pack(length, kind) + payload + b"\x00" * (_nla_align(length) - length)


def _addr(value: Address | None) -> bytes:
    if value is None:
        return bytes(16)
    return value.packed.ljust(16, b"\x00")


def _family(value: Address | None) -> int:
    if value is None:
        return 0
    return AF_INET if value.version == 4 else AF_INET6


def _parse_addr(raw: bytes, family: int) -> Address | None:
    if family == AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    if family == AF_INET6:
        return ipaddress.IPv6Address(raw[:16])
    return None


def _ip(value: str | Address | None) -> Address | None:
    if value is None or isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    return ipaddress.ip_address(value)


@dataclass(frozen=True)
class Selector:
    """``struct xfrm_selector``. The all-zero default is what ``ip xfrm state add``
    sends when no ``sel`` is given."""

    daddr: Address | None = None
    saddr: Address | None = None
    dport: int = 0
    dport_mask: int = 0
    sport: int = 0
    sport_mask: int = 0
    family: int = 0
    prefixlen_d: int = 0
    prefixlen_s: int = 0
    proto: int = 0
    ifindex: int = 0
    user: int = 0

    @classmethod
    def between(cls, src: str, dst: str, proto: int = 0, sport: int = 0,
                dport: int = 0) -> Selector:
        """Selector for traffic from prefix ``src`` to prefix ``dst``."""
        s = ipaddress.ip_network(src, strict=False)
        d = ipaddress.ip_network(dst, strict=False)
        if s.version != d.version:
            raise ValueError("selector prefixes of different families")
        return cls(
            daddr=d.network_address, saddr=s.network_address,
            dport=dport, dport_mask=0xFFFF if dport else 0,
            sport=sport, sport_mask=0xFFFF if sport else 0,
            family=AF_INET if s.version == 4 else AF_INET6,
            prefixlen_d=d.prefixlen, prefixlen_s=s.prefixlen, proto=proto,
        )

    def pack(self) -> bytes:
        return (_addr(self.daddr) + _addr(self.saddr)
                + _PORTS.pack(self.dport, self.dport_mask, self.sport, self.sport_mask)
                + _SEL_TAIL.pack(self.family, self.prefixlen_d, self.prefixlen_s,
                                 self.proto, self.ifindex, self.user))

    @classmethod
    def unpack(cls, raw: bytes) -> Selector:
        dport, dmask, sport, smask = _PORTS.unpack_from(raw, 32)
        family, pd, ps, proto, ifindex, user = _SEL_TAIL.unpack_from(raw, 40)
        return cls(_parse_addr(raw[0:16], family), _parse_addr(raw[16:32], family),
                   dport, dmask, sport, smask, family, pd, ps, proto, ifindex, user)


@dataclass(frozen=True)
class LifetimeCfg:
    """``struct xfrm_lifetime_cfg``: byte/packet limits default to XFRM_INF, time
    limits to 0 (none), as in iproute2."""

    soft_byte_limit: int = XFRM_INF
    hard_byte_limit: int = XFRM_INF
    soft_packet_limit: int = XFRM_INF
    hard_packet_limit: int = XFRM_INF
    soft_add_expires_seconds: int = 0
    hard_add_expires_seconds: int = 0
    soft_use_expires_seconds: int = 0
    hard_use_expires_seconds: int = 0

    def pack(self) -> bytes:
        return _LFT_CFG.pack(
            self.soft_byte_limit, self.hard_byte_limit, self.soft_packet_limit,
            self.hard_packet_limit, self.soft_add_expires_seconds,
            self.hard_add_expires_seconds, self.soft_use_expires_seconds,
            self.hard_use_expires_seconds)

    @classmethod
    def unpack(cls, raw: bytes, offset: int = 0) -> LifetimeCfg:
        return cls(*_LFT_CFG.unpack_from(raw, offset))


@dataclass(frozen=True)
class Algorithm:
    """An XFRM algorithm attribute. ``kind`` is ``XFRMA_ALG_AEAD``,
    ``XFRMA_ALG_CRYPT`` or ``XFRMA_ALG_AUTH_TRUNC``; ``extra_bits`` is the ICV
    length (AEAD) or the truncation length (AUTH_TRUNC) in bits. The key is never
    shown in repr."""

    kind: int
    name: str
    key: bytes = field(repr=False)
    extra_bits: int = 0

    def pack(self) -> bytes:
        name = self.name.encode("ascii")
        if len(name) >= 64:
            raise ValueError("algorithm name longer than 63 bytes")
        head = name.ljust(64, b"\x00")
        bits = len(self.key) * 8
        if self.kind == XFRMA_ALG_CRYPT:
            return head + _U32.pack(bits) + self.key
        return head + _U32.pack(bits) + _U32.pack(self.extra_bits) + self.key

    @classmethod
    def unpack(cls, kind: int, raw: bytes) -> Algorithm:
        name = raw[:64].split(b"\x00", 1)[0].decode("ascii", "replace")
        (bits,) = _U32.unpack_from(raw, 64)
        if kind == XFRMA_ALG_CRYPT:
            return cls(kind, name, bytes(raw[68: 68 + (bits + 7) // 8]))
        (extra,) = _U32.unpack_from(raw, 68)
        return cls(kind, name, bytes(raw[72: 72 + (bits + 7) // 8]), extra)


@dataclass(frozen=True)
class Encap:
    """``struct xfrm_encap_tmpl`` (ESP-in-UDP by default)."""

    sport: int = 4500
    dport: int = 4500
    oa: Address | None = None
    encap_type: int = UDP_ENCAP_ESPINUDP

    def pack(self) -> bytes:
        return _ENCAP.pack(self.encap_type) + _ENCAP_PORTS.pack(self.sport, self.dport) \
            + _addr(self.oa)

    @classmethod
    def unpack(cls, raw: bytes) -> Encap:
        (etype,) = _ENCAP.unpack_from(raw, 0)
        sport, dport = _ENCAP_PORTS.unpack_from(raw, 2)
        oa_raw = bytes(raw[8:24])
        oa = None if oa_raw == bytes(16) else ipaddress.ip_address(
            oa_raw[:4] if oa_raw[4:] == bytes(12) else oa_raw)
        return cls(sport, dport, oa, etype)


@dataclass(frozen=True)
class Mark:
    value: int
    mask: int = 0xFFFFFFFF

    def pack(self) -> bytes:
        return _MARK.pack(self.value, self.mask)


@dataclass(frozen=True)
class XfrmState:
    """An XFRM state (SA). ``src``/``dst`` are the outer addresses."""

    src: Address
    dst: Address
    spi: int
    proto: int = IPPROTO_ESP
    mode: int = XFRM_MODE_TUNNEL
    reqid: int = 0
    replay_window: int = 0
    flags: int = 0
    selector: Selector = field(default_factory=Selector)
    lifetime: LifetimeCfg = field(default_factory=LifetimeCfg)
    algorithms: tuple[Algorithm, ...] = ()
    encap: Encap | None = None
    mark: Mark | None = None
    if_id: int | None = None
    # Fields below come from the kernel in dumps; encoders leave them zero.
    seq: int = 0
    oseq: int = 0
    rseq: int = 0
    cur_bytes: int = 0
    cur_packets: int = 0
    cur_add_time: int = 0  # unix seconds the state was added
    cur_use_time: int = 0  # unix seconds of its first use (0: never used)

    def __post_init__(self) -> None:
        object.__setattr__(self, "src", _ip(self.src))
        object.__setattr__(self, "dst", _ip(self.dst))

    @property
    def esn(self) -> bool:
        return bool(self.flags & XFRM_STATE_ESN)

    @property
    def family(self) -> int:
        return _family(self.dst)


@dataclass(frozen=True)
class XfrmTemplate:
    """``struct xfrm_user_tmpl`` (``tmpl src .. dst .. proto esp reqid .. mode tunnel``)."""

    src: Address | None
    dst: Address | None
    proto: int = IPPROTO_ESP
    spi: int = 0
    reqid: int = 0
    mode: int = XFRM_MODE_TUNNEL
    share: int = 0
    optional: int = 0
    aalgos: int = 0xFFFFFFFF
    ealgos: int = 0xFFFFFFFF
    calgos: int = 0xFFFFFFFF
    family: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "src", _ip(self.src))
        object.__setattr__(self, "dst", _ip(self.dst))

    def pack(self) -> bytes:
        family = self.family if self.family is not None else _family(self.dst or self.src)
        return (_addr(self.dst) + _SPI.pack(self.spi) + struct.pack("=B3x", self.proto)
                + _TMPL_FAMILY.pack(family) + _addr(self.src)
                + _TMPL_TAIL.pack(self.reqid, self.mode, self.share, self.optional,
                                  self.aalgos, self.ealgos, self.calgos))

    @classmethod
    def unpack(cls, raw: bytes) -> XfrmTemplate:
        (spi,) = _SPI.unpack_from(raw, 16)
        proto = raw[20]
        (family,) = _TMPL_FAMILY.unpack_from(raw, 24)
        reqid, mode, share, optional, aalgos, ealgos, calgos = _TMPL_TAIL.unpack_from(raw, 44)
        return cls(_parse_addr(raw[28:44], family), _parse_addr(raw[0:16], family), proto,
                   spi, reqid, mode, share, optional, aalgos, ealgos, calgos, family)


@dataclass(frozen=True)
class XfrmPolicy:
    selector: Selector
    direction: int
    templates: tuple[XfrmTemplate, ...] = ()
    priority: int = 0
    index: int = 0
    action: int = XFRM_POLICY_ALLOW
    flags: int = 0
    share: int = 0
    lifetime: LifetimeCfg = field(default_factory=LifetimeCfg)
    mark: Mark | None = None
    if_id: int | None = None


@dataclass(frozen=True)
class NetlinkMessage:
    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes = field(repr=False)


@dataclass(frozen=True)
class NetlinkError:
    """Payload of ``NLMSG_ERROR``: ``error`` is 0 for an ACK, else ``-errno``."""

    error: int
    request_type: int
    request_seq: int
    message: str = ""


def _nlmsg(kind: int, flags: int, body: bytes, seq: int = 0, pid: int = 0) -> bytes:
    return NLMSG_HDR.pack(16 + len(body), kind, flags, seq, pid) + body


def encode_state(state: XfrmState, update: bool = False, seq: int = 0) -> bytes:
    """``XFRM_MSG_NEWSA`` (or ``UPDSA``) for ``state``."""
    family = state.family
    window = state.replay_window
    use_esn_attr = state.esn or window > 32
    body = bytearray()
    body += state.selector.pack()
    body += _addr(state.dst) + _SPI.pack(state.spi) + struct.pack("=B3x", state.proto)
    body += _addr(state.src)
    body += state.lifetime.pack()
    body += _LFT_CUR.pack(0, 0, 0, 0)
    body += _STATS.pack(0, 0, 0)
    body += _SA_TAIL.pack(0, state.reqid, family, state.mode,
                          0 if use_esn_attr else window, state.flags)
    assert len(body) == SIZEOF_USERSA_INFO
    for alg in state.algorithms:
        body += _attr(alg.kind, alg.pack())
    if state.encap is not None:
        body += _attr(XFRMA_ENCAP, state.encap.pack())
    if use_esn_attr:
        bmp_len = (window + 31) // 32
        body += _attr(XFRMA_REPLAY_ESN_VAL, _ESN.pack(bmp_len, 0, 0, 0, 0, window))
    if state.mark is not None:
        body += _attr(XFRMA_MARK, state.mark.pack())
    if state.if_id is not None:
        body += _attr(XFRMA_IF_ID, _U32.pack(state.if_id))
    kind = XFRM_MSG_UPDSA if update else XFRM_MSG_NEWSA
    return _nlmsg(kind, NLM_F_REQUEST | NLM_F_ACK, bytes(body), seq)


def _state_id(kind: int, flags: int, dst: str | Address, spi: int, src: str | Address | None,
              proto: int, mark: Mark | None, seq: int) -> bytes:
    daddr = _ip(dst)
    saddr = _ip(src)
    body = _addr(daddr) + _SPI.pack(spi) + _SA_ID_TAIL.pack(_family(daddr), proto)
    if saddr is not None:
        body += _attr(XFRMA_SRCADDR, _addr(saddr))
    if mark is not None:
        body += _attr(XFRMA_MARK, mark.pack())
    return _nlmsg(kind, flags, body, seq)


def encode_state_delete(dst: str | Address, spi: int, src: str | Address | None = None,
                        proto: int = IPPROTO_ESP, mark: Mark | None = None,
                        seq: int = 0) -> bytes:
    """``XFRM_MSG_DELSA`` (``xfrm_usersa_id`` + ``XFRMA_SRCADDR``)."""
    return _state_id(XFRM_MSG_DELSA, NLM_F_REQUEST | NLM_F_ACK, dst, spi, src, proto, mark, seq)


def encode_state_get(dst: str | Address, spi: int, src: str | Address | None = None,
                     proto: int = IPPROTO_ESP, mark: Mark | None = None,
                     seq: int = 0) -> bytes:
    """``XFRM_MSG_GETSA`` for one state (the kernel answers with a NEWSA)."""
    return _state_id(XFRM_MSG_GETSA, NLM_F_REQUEST, dst, spi, src, proto, mark, seq)


def encode_state_dump(seq: int = 0, address_filter: bool = False) -> bytes:
    """``XFRM_MSG_GETSA`` dump. ``ip xfrm state list`` adds an all-zero
    ``XFRMA_ADDRESS_FILTER`` (which matches everything); pass ``True`` to do the same."""
    body = _attr(XFRMA_ADDRESS_FILTER, bytes(36)) if address_filter else b""
    return _nlmsg(XFRM_MSG_GETSA, NLM_F_REQUEST | NLM_F_DUMP, body, seq)


def encode_policy(policy: XfrmPolicy, update: bool = False, seq: int = 0) -> bytes:
    """``XFRM_MSG_NEWPOLICY`` (or ``UPDPOLICY``)."""
    body = bytearray()
    body += policy.selector.pack()
    body += policy.lifetime.pack()
    body += _LFT_CUR.pack(0, 0, 0, 0)
    body += _POL_TAIL.pack(policy.priority, policy.index, policy.direction, policy.action,
                           policy.flags, policy.share)
    assert len(body) == SIZEOF_USERPOLICY_INFO
    if policy.templates:
        body += _attr(XFRMA_TMPL, b"".join(t.pack() for t in policy.templates))
    if policy.mark is not None:
        body += _attr(XFRMA_MARK, policy.mark.pack())
    if policy.if_id is not None:
        body += _attr(XFRMA_IF_ID, _U32.pack(policy.if_id))
    kind = XFRM_MSG_UPDPOLICY if update else XFRM_MSG_NEWPOLICY
    return _nlmsg(kind, NLM_F_REQUEST | NLM_F_ACK, bytes(body), seq)


def encode_policy_delete(selector: Selector, direction: int, index: int = 0,
                         mark: Mark | None = None, seq: int = 0, if_id: int | None = None) -> bytes:
    """``XFRM_MSG_DELPOLICY`` (``xfrm_userpolicy_id``); a policy installed with an
    ``if_id`` is found only with the same ``XFRMA_IF_ID``."""
    body = selector.pack() + _POL_ID_TAIL.pack(index, direction)
    if mark is not None:
        body += _attr(XFRMA_MARK, mark.pack())
    if if_id is not None:
        body += _attr(XFRMA_IF_ID, _U32.pack(if_id))
    return _nlmsg(XFRM_MSG_DELPOLICY, NLM_F_REQUEST | NLM_F_ACK, body, seq)


def encode_policy_dump(seq: int = 0) -> bytes:
    """``XFRM_MSG_GETPOLICY`` dump (as ``ip xfrm policy list`` sends it)."""
    return _nlmsg(XFRM_MSG_GETPOLICY, NLM_F_REQUEST | NLM_F_DUMP, b"", seq)


# ---------------------------------------------------------------- decoding


def iter_messages(buf: bytes) -> Iterator[NetlinkMessage]:
    """Split a netlink datagram into messages; stops at a malformed length."""
    offset = 0
    n = len(buf)
    while offset + 16 <= n:
        length, kind, flags, seq, pid = NLMSG_HDR.unpack_from(buf, offset)
        if length < 16 or offset + length > n:
            return
        yield NetlinkMessage(kind, flags, seq, pid, bytes(buf[offset + 16: offset + length]))
        offset += (length + 3) & ~3


def iter_attrs(buf: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    n = len(buf)
    while offset + 4 <= n:
        length, kind = _NLA.unpack_from(buf, offset)
        if length < 4 or offset + length > n:
            return
        yield kind & 0x3FFF, buf[offset + 4: offset + length]
        offset += _nla_align(length)


def decode_error(msg: NetlinkMessage) -> NetlinkError:
    """Decode an ``NLMSG_ERROR`` payload, including the extended ACK message."""
    if msg.type != NLMSG_ERROR or len(msg.payload) < 20:
        raise ValueError("not an NLMSG_ERROR message")
    (error,) = struct.unpack_from("=i", msg.payload, 0)
    length, kind, _flags, seq, _pid = NLMSG_HDR.unpack_from(msg.payload, 4)
    text = ""
    if msg.flags & NLM_F_ACK_TLVS:
        start = 4 + (16 if msg.flags & NLM_F_CAPPED else _nla_align(length))
        for atype, value in iter_attrs(msg.payload, start):
            if atype == NLMSGERR_ATTR_MSG:
                text = value.split(b"\x00", 1)[0].decode("utf-8", "replace")
    return NetlinkError(error, kind, seq, text)


def _attrs_common(attrs: Iterator[tuple[int, bytes]]) -> dict[str, object]:
    out: dict[str, object] = {"algorithms": []}
    for kind, value in attrs:
        if kind in (XFRMA_ALG_AEAD, XFRMA_ALG_CRYPT, XFRMA_ALG_AUTH_TRUNC):
            out["algorithms"].append(Algorithm.unpack(kind, value))  # type: ignore[attr-defined]
        elif kind == XFRMA_ENCAP and len(value) >= SIZEOF_ENCAP_TMPL:
            out["encap"] = Encap.unpack(value)
        elif kind == XFRMA_MARK and len(value) >= 8:
            out["mark"] = Mark(*_MARK.unpack_from(value))
        elif kind == XFRMA_IF_ID and len(value) >= 4:
            out["if_id"] = _U32.unpack_from(value)[0]
        elif kind == XFRMA_REPLAY_ESN_VAL and len(value) >= 24:
            out["esn"] = _ESN.unpack_from(value)
        elif kind == XFRMA_REPLAY_VAL and len(value) >= 12:
            out["replay"] = _REPLAY.unpack_from(value)  # oseq, seq, bitmap
        elif kind == XFRMA_TMPL:
            out["templates"] = tuple(
                XfrmTemplate.unpack(value[i: i + SIZEOF_USER_TMPL])
                for i in range(0, len(value) - SIZEOF_USER_TMPL + 1, SIZEOF_USER_TMPL))
    return out


def decode_state(payload: bytes) -> XfrmState:
    """Decode the payload of a ``XFRM_MSG_NEWSA`` (dump or get reply)."""
    if len(payload) < SIZEOF_USERSA_INFO:
        raise ValueError("xfrm_usersa_info truncated")
    sel = Selector.unpack(payload[:SIZEOF_SELECTOR])
    (spi,) = _SPI.unpack_from(payload, 72)
    proto = payload[76]
    lifetime = LifetimeCfg.unpack(payload, 96)
    cur_bytes, cur_packets, add_time, use_time = _LFT_CUR.unpack_from(payload, 160)
    seq, reqid, family, mode, window, flags = _SA_TAIL.unpack_from(payload, 204)
    dst = _parse_addr(payload[56:72], family)
    src = _parse_addr(payload[80:96], family)
    extra = _attrs_common(iter_attrs(payload, SIZEOF_USERSA_INFO))
    oseq = rseq = 0
    esn = extra.get("esn")
    if isinstance(esn, tuple):
        _bmp_len, oseq_lo, seq_lo, oseq_hi, seq_hi, window = esn
        oseq = (oseq_hi << 32) | oseq_lo
        rseq = (seq_hi << 32) | seq_lo
    elif isinstance(extra.get("replay"), tuple):
        oseq, rseq, _bitmap = extra["replay"]  # type: ignore[misc]
    assert src is not None and dst is not None
    return XfrmState(
        src=src, dst=dst, spi=spi, proto=proto, mode=mode, reqid=reqid,
        replay_window=window, flags=flags, selector=sel, lifetime=lifetime,
        algorithms=tuple(extra["algorithms"]),  # type: ignore[arg-type]
        encap=extra.get("encap"),  # type: ignore[arg-type]
        mark=extra.get("mark"),  # type: ignore[arg-type]
        if_id=extra.get("if_id"),  # type: ignore[arg-type]
        seq=seq, oseq=oseq, rseq=rseq, cur_bytes=cur_bytes, cur_packets=cur_packets,
        cur_add_time=add_time, cur_use_time=use_time,
    )


def decode_policy(payload: bytes) -> XfrmPolicy:
    """Decode the payload of a ``XFRM_MSG_NEWPOLICY`` (dump reply)."""
    if len(payload) < SIZEOF_USERPOLICY_INFO:
        raise ValueError("xfrm_userpolicy_info truncated")
    sel = Selector.unpack(payload[:SIZEOF_SELECTOR])
    lifetime = LifetimeCfg.unpack(payload, SIZEOF_SELECTOR)
    priority, index, direction, action, flags, share = _POL_TAIL.unpack_from(payload, 152)
    extra = _attrs_common(iter_attrs(payload, SIZEOF_USERPOLICY_INFO))
    return XfrmPolicy(
        selector=sel, direction=direction,
        templates=extra.get("templates", ()),  # type: ignore[arg-type]
        priority=priority, index=index, action=action, flags=flags, share=share,
        lifetime=lifetime, mark=extra.get("mark"),  # type: ignore[arg-type]
        if_id=extra.get("if_id"),  # type: ignore[arg-type]
    )
