"""The kernel-protego plugin protocol codec: pure, no sockets."""

from __future__ import annotations

import pickle
import struct

import pytest

from protego.errors import PeerError
from protego.gmn import plugin_protocol as pp

KEY = bytes(range(0x40, 0x54))  # 20 bytes: AES-128-GCM key + salt
INT_KEY = bytes(range(0x80, 0xA0))


def add_sa(**kw: object) -> pp.AddSa:
    base: dict[str, object] = {
        "src": pp.Host.parse("198.18.0.1", 4500), "dst": pp.Host.parse("203.0.113.10", 4500),
        "spi": 0xC0FFEE01, "reqid": 7, "mode": pp.Mode.TUNNEL,
        "src_ts": (pp.TrafficSelector.from_network("10.1.0.0/16"),),
        "dst_ts": (pp.TrafficSelector.from_network("10.2.0.0/24", protocol=6, from_port=443,
                                                   to_port=443),
                   pp.TrafficSelector.from_network("2001:db8::/64")),
        "lifetime": pp.Lifetime(time_life=3600, time_rekey=3000, time_jitter=60),
        "enc_alg": 20, "enc_key": pp.Secret(KEY), "int_alg": 1024, "replay_window": 32,
        "flags": pp.SaFlag.INBOUND | pp.SaFlag.ENCAP | pp.SaFlag.ESN | pp.SaFlag.UPDATE,
        "mark": pp.Mark(0x10, 0xFF), "if_id": 9, "set_mark": pp.Mark(1), "interface": "eth0",
    }
    base.update(kw)
    return pp.AddSa(**base)  # type: ignore[arg-type]


def roundtrip(msg: pp.Message, request_id: int = 5) -> pp.Message:
    frame = pp.encode(msg, request_id)
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    rid, out = pp.decode(frame[4:])
    assert rid == request_id
    return out


ALL_MESSAGES: list[pp.Message] = [
    pp.Hello(version=(1, 0), software="strongSwan 5.9.8 kernel-protego", pid=1234),
    pp.GetSpi(src=pp.Host.parse("198.18.0.1", 4500), dst=pp.Host.parse("203.0.113.10", 4500)),
    pp.GetCpi(src=pp.Host.parse("2001:db8::1"), dst=pp.Host.parse("2001:db8::2")),
    add_sa(),
    add_sa(flags=pp.SaFlag.NONE, int_key=pp.Secret(INT_KEY), int_alg=12, enc_alg=12,
           enc_key=pp.Secret(KEY[:16]), dump=True, age=17, label=b"system_u:r:x",
           ipcomp=2, cpi=0x4321),
    pp.UpdateSa(src=pp.Host.parse("198.18.0.1", 4500), dst=pp.Host.parse("203.0.113.10", 4500),
                spi=0xC0FFEE01, new_src=pp.Host.parse("198.18.0.9", 4501),
                new_dst=pp.Host.parse("203.0.113.10", 4500), new_reqid=8,
                flags=pp.SaFlag.ENCAP | pp.SaFlag.NEW_ENCAP),
    pp.QuerySa(src=pp.Host.parse("198.18.0.1"), dst=pp.Host.parse("203.0.113.10"), spi=0x100,
               proto=pp.AH),
    pp.DelSa(src=pp.Host.parse("198.18.0.1"), dst=pp.Host.parse("203.0.113.10"), spi=0xFFFFFFFF,
             cpi=7),
    pp.FlushSas(),
    pp.AddPolicy(dir=pp.PolicyDir.FWD, src_ts=pp.TrafficSelector.from_network("10.1.0.0/16"),
                 dst_ts=pp.TrafficSelector.from_network("10.2.0.0/24"), reqid=7,
                 esp_spi=0xC0FFEE01, src=pp.Host.parse("198.18.0.1"),
                 dst=pp.Host.parse("203.0.113.10"), mode=pp.Mode.TUNNEL, manual_prio=100,
                 dump=True),
    pp.DelPolicy(dir=pp.PolicyDir.IN, src_ts=pp.TrafficSelector.from_network("10.1.0.0/16"),
                 dst_ts=pp.TrafficSelector.from_network("10.2.0.0/24")),
    pp.QueryPolicy(dir=pp.PolicyDir.OUT, src_ts=pp.TrafficSelector.from_network("::/0"),
                   dst_ts=pp.TrafficSelector.from_network("::/0"), if_id=3),
    pp.FlushPolicies(),
    pp.DumpBegin(sa_count=2, policy_count=3),
    pp.DumpEnd(sa_count=2, policy_count=3),
    pp.Expire(spi=0xC0FFEE01, dst=pp.Host.parse("203.0.113.10"), hard=True),
    pp.Reply(request_type=pp.MsgType.GET_SPI, spi=0xC0000001),
    pp.Reply(request_type=pp.MsgType.QUERY_SA, bytes=2**40, packets=3, idle=0),
    pp.Reply(request_type=pp.MsgType.HELLO, status=pp.Status.VERSION, version=(1, 0),
             error="nope"),
]


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: pp.Message) -> None:
    assert roundtrip(msg) == msg


def test_add_sa_fields_survive() -> None:
    out = roundtrip(add_sa())
    assert isinstance(out, pp.AddSa)
    assert out.inbound and out.encap and out.esn and not out.initiator
    assert out.enc_key.reveal() == KEY
    assert [str(t) for t in out.dst_ts] == ["10.2.0.0/24[6/443-443]", "2001:db8::/64"]
    assert out.key == (0xC0FFEE01, pp.ESP, "203.0.113.10")
    assert out.lifetime == pp.Lifetime(3600, 3000, 60)


def test_wire_format_is_pinned() -> None:
    """Recorded bytes (see PROTOCOL.md): a GET_SPI request and its reply."""
    req = pp.GetSpi(src=pp.Host.parse("198.18.0.1", 4500), dst=pp.Host.parse("203.0.113.10", 4500))
    assert pp.encode(req, 2).hex() == (
        "00000023"            # length 35
        "01" "00" "0002" "00000002"  # version 1, reserved, GET_SPI, id 2
        "000a0007" "04" "1194" "c6120001"  # SRC: IPv4, port 4500, 198.18.0.1
        "000b0007" "04" "1194" "cb00710a"  # DST: IPv4, port 4500, 203.0.113.10
        "000d0001" "32")      # PROTO: 50 (ESP)
    reply = bytes.fromhex("00000015" "0100" "8002" "00000002"
                          "00030001" "00" "000c0004" "c0000001")
    assert len(reply) - 4 == 0x15
    assert pp.decode(reply[4:]) == (2, pp.Reply(request_type=pp.MsgType.GET_SPI, spi=0xC0000001))


def test_keys_never_in_repr_str_or_errors() -> None:
    msg = add_sa(int_key=pp.Secret(INT_KEY))
    for text in (repr(msg), str(msg), repr(msg.enc_key), str(msg.enc_key), f"{msg}"):
        assert KEY.hex() not in text and INT_KEY.hex() not in text
        assert repr(KEY) not in text and repr(INT_KEY) not in text
    assert repr(msg.enc_key) == "<secret 20 bytes>"
    with pytest.raises(TypeError):
        pickle.dumps(msg.enc_key)
    # a malformed frame carrying a key: the error does not echo it
    frame = pp.encode(msg, 1)
    with pytest.raises(pp.ProtocolError) as err:
        pp.decode(frame[4:-3])
    assert KEY.hex() not in str(err.value) and INT_KEY.hex() not in str(err.value)


def test_secret_compares_by_value() -> None:
    assert pp.Secret(KEY) == pp.Secret(bytes(KEY))
    assert pp.Secret(KEY) != pp.Secret(INT_KEY)
    assert len(pp.Secret(KEY)) == 20


def test_version_check() -> None:
    pp.check_version(pp.Hello(version=(1, 7)))  # minor versions are compatible
    with pytest.raises(pp.VersionMismatch):
        pp.check_version(pp.Hello(version=(2, 0)))
    frame = bytearray(pp.encode(pp.FlushSas(), 1))
    frame[4] = 2  # frame version byte
    with pytest.raises(pp.VersionMismatch):
        pp.decode(bytes(frame[4:]))
    assert issubclass(pp.ProtocolError, PeerError)


@pytest.mark.parametrize("body", [
    b"",                                                   # no header
    b"\x01\x00\x00",                                       # short header
    bytes.fromhex("0100000200000001" "000a"),              # truncated attribute header
    bytes.fromhex("0100000200000001" "000a0007" "04"),     # truncated attribute value
    bytes.fromhex("0100000200000001" "000a0004" "04119401" "000b0007041194cb00710a"
                  "000d000132"),                           # address of 1 byte
    bytes.fromhex("0100000200000001" "000a0007" "06119401020304"
                  "000b0007041194cb00710a000d000132"),     # family 6 with IPv4 bytes
    bytes.fromhex("0100000200000001" "000d000132"),        # GET_SPI without SRC/DST
    bytes.fromhex("0100000400000001" "000c00020001"),      # ADD_SA: SPI of 2 bytes
    bytes.fromhex("0100004000000000" "000d000132" "000c0004c0000001"
                  "000b0007041194cb00710a" "002f000201ff"),  # HARD flag of 2 bytes
])
def test_malformed_input_rejected(body: bytes) -> None:
    with pytest.raises(pp.ProtocolError):
        pp.decode(body)


def test_unknown_message_and_attributes() -> None:
    with pytest.raises(pp.UnknownMessage) as err:
        pp.decode(bytes.fromhex("0100007700000009"))
    assert err.value.msg_type == 0x77 and err.value.request_id == 9
    # unknown attributes (a newer minor version) are skipped
    frame = pp.encode(pp.FlushSas(), 3)[4:] + bytes.fromhex("7fff0003aabbcc")
    assert pp.decode(frame) == (3, pp.FlushSas())


def test_frame_reader_splits_stream() -> None:
    frames = [pp.encode(m, i) for i, m in enumerate(ALL_MESSAGES)]
    stream = b"".join(frames)
    reader = pp.FrameReader()
    bodies: list[bytes] = []
    for i in range(0, len(stream), 7):  # arbitrary chunking
        bodies += reader.feed(stream[i:i + 7])
    assert [pp.decode(b)[1] for b in bodies] == ALL_MESSAGES
    with pytest.raises(pp.ProtocolError):
        pp.FrameReader().feed(b"\x00\x00\x00\x02xx")  # shorter than a header
    with pytest.raises(pp.ProtocolError):
        pp.FrameReader().feed(struct.pack(">I", pp.MAX_FRAME + 1))


def test_encode_rejects_mixed_family_selector() -> None:
    ts = pp.TrafficSelector(pp.Host.parse("10.0.0.1").address, pp.Host.parse("::1").address)
    with pytest.raises(pp.ProtocolError):
        pp.encode(pp.DelPolicy(dir=0, src_ts=ts, dst_ts=ts))
