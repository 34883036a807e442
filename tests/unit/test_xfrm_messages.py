"""XFRM netlink encoding/decoding without root.

The RECORDED_* messages were captured from iproute2 6.1 (``ip xfrm ...`` under
``strace -e write=all``, nlmsg_seq zeroed); the root integration tests
(tests/integration/test_xfrm_netlink.py) re-capture them live for many more
cases. The keys in them are fixed test patterns, not secrets.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from protego.errors import DataplaneError
from protego.esp import Direction, Lifetime, SaKeys, SecurityAssociation, Suite, UdpEncap
from protego.xfrm import (
    Algorithm,
    Encap,
    LifetimeCfg,
    Mark,
    Selector,
    XfrmError,
    XfrmPolicy,
    XfrmSocket,
    XfrmState,
    XfrmTemplate,
    decode_policy,
    decode_state,
    encode_policy,
    encode_policy_delete,
    encode_policy_dump,
    encode_state,
    encode_state_delete,
    encode_state_dump,
    encode_state_get,
    probe_kernel_esp,
    state_from_sa,
)
from protego.xfrm import messages as m
from protego.xfrm.constants import (
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLM_F_MULTI,
    NLMSG_DONE,
    NLMSG_ERROR,
    XFRM_MSG_NEWPOLICY,
    XFRM_MSG_NEWSA,
    XFRM_POLICY_IN,
    XFRM_POLICY_OUT,
    XFRMA_ALG_AEAD,
    XFRMA_ALG_AUTH_TRUNC,
    XFRMA_ALG_CRYPT,
)

# ip xfrm state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 reqid 1 mode tunnel
#   replay-window 64 aead rfc4106(gcm(aes)) 0x000102030405060708090a0b0c0d0e0fa0a1a2a3 128
RECORDED_GCM128 = bytes.fromhex(
    "6c0100001000050000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000c61200020000000000000000000000000000100032000000"
    "c6120001000000000000000000000000ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000001000000020001000000000000000000"
    "60001200726663343130362867636d286165732929000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000a000000080000000000102030405060708090a0b0c0d0e0fa0a1a2a3"
    "1c001700020000000000000000000000000000000000000040000000")
# ip xfrm state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 reqid 1 mode tunnel
#   replay-window 128 flag esn enc cbc(aes) 0x0001..0f0001..0f auth-trunc hmac(sha256)
#   0x404142..5f 128 encap espinudp 4500 4500 0.0.0.0
RECORDED_CBC256_SHA256_ESN_NATT = bytes.fromhex(
    "fc0100001000050000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000c61200020000000000000000000000000000100032000000"
    "c6120001000000000000000000000000ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000001000000020001008000000000000000"
    "680002006362632861657329000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000010000000102030405060708090a0b0c0d0e0f0001020304050607"
    "08090a0b0c0d0e0f6c001400686d61632873686132353629000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000001000080000000404142434445464748494a4b"
    "4c4d4e4f505152535455565758595a5b5c5d5e5f1c000400020011941194000000000000000000000000000000000000"
    "1c001700040000000000000000000000000000000000000080000000")
# ip xfrm policy add src 10.2.0.0/16 dst 10.1.0.0/24 proto tcp dport 80 dir in priority 100
#   mark 5 mask 0xff tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
RECORDED_POLICY_IN = bytes.fromhex(
    "080100001300050000000000000000000a0100000000000000000000000000000a020000000000000000000000000000"
    "0050ffff0000000002001810060000000000000000000000ffffffffffffffffffffffffffffffffffffffffffffffff"
    "ffffffffffffffff00000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000006400000000000000000000000000000044000500c6120001"
    "000000000000000000000000000000003200000002000000c61200020000000000000000000000000200000001000000"
    "ffffffffffffffffffffffff0c00150005000000ff000000")

KEY16 = bytes(range(16))
SALT = bytes.fromhex("a0a1a2a3")


def test_struct_sizes_match_the_kernel_abi() -> None:
    assert len(Selector().pack()) == 56
    assert len(XfrmTemplate(None, None).pack()) == 64
    assert len(Encap().pack()) == 24
    assert len(LifetimeCfg().pack()) == 64
    assert len(encode_policy_delete(Selector(), 0)) == 16 + 64


def test_recorded_gcm_state_add() -> None:
    sa = SecurityAssociation(0x1000, Direction.OUTBOUND, Suite.AES128GCM16,
                             SaKeys(KEY16, salt=SALT), "198.18.0.1", "198.18.0.2", reqid=1)
    assert encode_state(state_from_sa(sa)) == RECORDED_GCM128


def test_recorded_cbc_esn_natt_state_add() -> None:
    sa = SecurityAssociation(
        0x1000, Direction.OUTBOUND, Suite.AES256_SHA256,
        SaKeys(KEY16 + KEY16, auth_key=bytes(range(0x40, 0x60))), "198.18.0.1", "198.18.0.2",
        reqid=1, esn=True, replay_window=128, encap=UdpEncap())
    assert encode_state(state_from_sa(sa)) == RECORDED_CBC256_SHA256_ESN_NATT


def test_recorded_policy_add() -> None:
    policy = XfrmPolicy(
        selector=Selector.between("10.2.0.0/16", "10.1.0.0/24", proto=6, dport=80),
        direction=XFRM_POLICY_IN, priority=100, mark=Mark(5, 0xFF),
        templates=(XfrmTemplate(src="198.18.0.2", dst="198.18.0.1", reqid=2),))
    assert encode_policy(policy) == RECORDED_POLICY_IN
    assert decode_policy(RECORDED_POLICY_IN[16:]).selector == policy.selector


def test_state_round_trip_through_decoder() -> None:
    state = XfrmState(
        src="2001:db8::1", dst="2001:db8::2", spi=0xDEADBEEF, reqid=7, replay_window=4096,
        flags=128, selector=Selector.between("2001:db8:1::/48", "2001:db8:2::/64", proto=17),
        lifetime=LifetimeCfg(soft_byte_limit=10, hard_packet_limit=99,
                             soft_add_expires_seconds=5),
        algorithms=(Algorithm(XFRMA_ALG_CRYPT, "cbc(aes)", KEY16),
                    Algorithm(XFRMA_ALG_AUTH_TRUNC, "hmac(sha1)", bytes(20), 96)),
        encap=Encap(4501, 4500), mark=Mark(3, 0xF), if_id=42)
    msg = encode_state(state)
    assert decode_state(msg[16:]) == state
    assert decode_state(RECORDED_GCM128[16:]).algorithms == (
        Algorithm(XFRMA_ALG_AEAD, "rfc4106(gcm(aes))", KEY16 + SALT, 128),)


def test_small_replay_window_uses_the_legacy_field() -> None:
    state = XfrmState(src="198.18.0.1", dst="198.18.0.2", spi=0x100, replay_window=32)
    msg = encode_state(state)
    assert len(msg) == 16 + 224  # no XFRMA_REPLAY_ESN_VAL
    assert msg[16 + 215] == 32
    assert decode_state(msg[16:]).replay_window == 32


def test_other_messages_layout() -> None:
    d = encode_state_delete("198.18.0.2", 0x1000, "198.18.0.1")
    assert struct.unpack_from("=IHH", d) == (16 + 24 + 20, 0x11, 5)
    g = encode_state_get("198.18.0.2", 0x1000, "198.18.0.1")
    assert struct.unpack_from("=IHH", g) == (16 + 24 + 20, 0x12, 1)
    assert encode_state_dump() == struct.pack("=IHHII", 16, 0x12, 0x301, 0, 0)
    assert len(encode_state_dump(address_filter=True)) == 56
    assert encode_policy_dump() == struct.pack("=IHHII", 16, 0x15, 0x301, 0, 0)
    upd = encode_policy(XfrmPolicy(Selector(), XFRM_POLICY_OUT), update=True)
    assert struct.unpack_from("=H", upd, 4)[0] == 0x19


def test_keys_hidden_in_reprs() -> None:
    alg = Algorithm(XFRMA_ALG_AEAD, "rfc4106(gcm(aes))", b"\x5e\xc2" * 10, 128)
    state = XfrmState(src="198.18.0.1", dst="198.18.0.2", spi=0x100, algorithms=(alg,))
    for text in (repr(alg), repr(state), str(state)):
        assert "5ec2" not in text and "\\x5e" not in text


def test_iter_messages_tolerates_garbage() -> None:
    assert list(m.iter_messages(b"")) == []
    assert list(m.iter_messages(b"\x05" * 15)) == []
    assert list(m.iter_messages(struct.pack("=IHHII", 8, 1, 0, 0, 0))) == []
    assert list(m.iter_messages(struct.pack("=IHHII", 99, 1, 0, 0, 0))) == []
    two = struct.pack("=IHHII", 17, 3, 0, 1, 0) + b"x" + b"\0\0\0" + struct.pack(
        "=IHHII", 16, 3, 0, 2, 0)
    assert [x.seq for x in m.iter_messages(two)] == [1, 2]


# ---------------------------------------------------------- fake kernel
def nl_error(seq: int, code: int, req_type: int = 0x10, text: str = "") -> bytes:
    """NLMSG_ERROR as a kernel with NETLINK_CAP_ACK + NETLINK_EXT_ACK sends it."""
    flags = NLM_F_CAPPED
    body = struct.pack("=i", -code) + struct.pack("=IHHII", 240, req_type, 5, seq, 0)
    if text:
        flags |= NLM_F_ACK_TLVS
        raw = text.encode() + b"\0"
        attr = struct.pack("=HH", 4 + len(raw), 1) + raw
        body += attr + b"\0" * (-len(attr) % 4)
    return struct.pack("=IHHII", 16 + len(body), NLMSG_ERROR, flags, seq, 0) + body


class FakeKernel:
    """The other end of a socketpair: replies are queued before the request."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    def queue(self, *datagrams: bytes) -> None:
        for d in datagrams:
            self.theirs.send(d)

    def sent(self) -> bytes:
        return self.theirs.recv(65536)

    def close(self) -> None:
        self.theirs.close()


def test_socket_request_ack_error_and_seq() -> None:
    k = FakeKernel()
    xs = XfrmSocket(k.ours)
    k.queue(nl_error(1, 0))
    xs.add_policy(XfrmPolicy(Selector(), XFRM_POLICY_OUT))
    sent = k.sent()
    assert struct.unpack_from("=IHHII", sent)[1:4] == (0x13, 5, 1)
    k.queue(nl_error(2, errno.ENOSYS, 0x10, "Requested AEAD algorithm not found"))
    with pytest.raises(XfrmError) as exc:
        xs.add_state(XfrmState(src="198.18.0.1", dst="198.18.0.2", spi=0x100, algorithms=(
            Algorithm(XFRMA_ALG_AEAD, "rfc4106(gcm(aes))", b"\x5e\xc2" * 10, 128),)))
    assert isinstance(exc.value, DataplaneError)
    assert exc.value.errno == errno.ENOSYS
    assert exc.value.kernel_message == "Requested AEAD algorithm not found"
    assert "NEWSA failed: Requested AEAD algorithm not found (ENOSYS" in str(exc.value)
    assert "5ec2" not in str(exc.value)
    # replies to other sequence numbers are skipped
    k.queue(nl_error(99, 0), nl_error(3, errno.ENOENT, 0x14))
    with pytest.raises(DataplaneError) as exc2:
        xs.delete_policy(Selector(), XFRM_POLICY_OUT)
    assert exc2.value.errno == errno.ENOENT
    xs.close()
    k.close()


def test_socket_dump_and_get() -> None:
    k = FakeKernel()
    xs = XfrmSocket(k.ours)
    policy = XfrmPolicy(Selector.between("10.1.0.0/16", "10.2.0.0/16"), XFRM_POLICY_OUT,
                        templates=(XfrmTemplate("198.18.0.1", "198.18.0.2", reqid=1,
                                                family=2),))
    body = encode_policy(policy)[16:]
    part = struct.pack("=IHHII", 16 + len(body), XFRM_MSG_NEWPOLICY, NLM_F_MULTI, 1, 0) + body
    k.queue(part + part, struct.pack("=IHHII", 20, NLMSG_DONE, NLM_F_MULTI, 1, 0) + bytes(4))
    assert xs.dump_policies() == [policy, policy]
    state = XfrmState(src="198.18.0.1", dst="198.18.0.2", spi=0x100)
    sbody = encode_state(state)[16:]
    k.queue(struct.pack("=IHHII", 16 + len(sbody), XFRM_MSG_NEWSA, 0, 2, 0) + sbody)
    assert xs.get_state("198.18.0.2", 0x100, "198.18.0.1") == state
    k.queue(nl_error(3, errno.ESRCH, 0x12))
    with pytest.raises(DataplaneError) as exc:
        xs.get_state("198.18.0.2", 0x100)
    assert exc.value.errno == errno.ESRCH
    k.queue(struct.pack("=IHHII", 16, NLMSG_DONE, NLM_F_MULTI, 4, 0))
    assert xs.dump_states() == []
    assert k.sent()[4:8] == struct.pack("=HH", 0x15, 0x301)


def test_probe_with_fake_kernel_without_esp() -> None:
    k = FakeKernel()
    k.queue(nl_error(1, errno.ENOSYS, 0x10, "Requested AEAD algorithm not found"),
            nl_error(2, errno.EPROTONOSUPPORT, 0x10, "Requested type not found"))
    result = probe_kernel_esp(lambda: XfrmSocket(k.ours))
    assert not result.kernel_esp and result.backend == "userspace"
    assert result.errno == errno.ENOSYS
    assert str(result) == (
        "kernel has no ESP (aes128gcm16: ENOSYS Requested AEAD algorithm not found; "
        "aes128-sha256: EPROTONOSUPPORT Requested type not found): "
        "using the userspace backend")
    assert result.suites == {"aes128gcm16": errno.ENOSYS, "aes128-sha256": errno.EPROTONOSUPPORT}


def test_probe_with_fake_kernel_with_esp() -> None:
    k = FakeKernel()
    k.queue(*(nl_error(i, 0) for i in range(1, 5)))  # add, delete, add, delete
    result = probe_kernel_esp(lambda: XfrmSocket(k.ours))
    assert result.kernel_esp and result.backend == "xfrm"
    assert result.message == "kernel ESP available (aes128gcm16, aes128-sha256): " \
                             "using the xfrm backend"
    kinds = [struct.unpack_from("=H", k.sent(), 4)[0] for _ in range(4)]
    assert kinds == [0x10, 0x11, 0x10, 0x11]


def test_probe_when_no_socket() -> None:
    def fail() -> XfrmSocket:
        raise DataplaneError("cannot open an XFRM netlink socket: Operation not permitted",
                             errno.EPERM)

    result = probe_kernel_esp(fail)
    assert not result.kernel_esp and result.errno == errno.EPERM
    assert result.message.startswith("cannot probe kernel ESP (")
    assert result.message.endswith("using the userspace backend")


def test_state_from_sa_lifetimes_and_encap() -> None:
    sa = SecurityAssociation(
        0x2000, Direction.INBOUND, Suite.AES128_SHA1, SaKeys(KEY16, auth_key=bytes(20)),
        "198.18.0.2", "198.18.0.1", encap=UdpEncap(4501, 4500), replay_window=256,
        lifetime=Lifetime(soft_bytes=1, hard_packets=5, hard_seconds=60))
    st = state_from_sa(sa, mark=Mark(1))
    assert st.encap == Encap(4501, 4500)
    assert st.lifetime.soft_byte_limit == 1 and st.lifetime.hard_byte_limit == 2**64 - 1
    assert st.lifetime.hard_packet_limit == 5 and st.lifetime.hard_add_expires_seconds == 60
    assert [a.name for a in st.algorithms] == ["cbc(aes)", "hmac(sha1)"]
    assert st.algorithms[1].extra_bits == 96
    assert decode_state(encode_state(st)[16:]) == st


def test_silent_kernel_times_out_with_errno() -> None:
    k = FakeKernel()
    k.ours.settimeout(0.05)
    xs = XfrmSocket(k.ours)
    with pytest.raises(DataplaneError) as exc:
        xs.add_policy(XfrmPolicy(Selector(), XFRM_POLICY_OUT))
    assert exc.value.errno == errno.ETIMEDOUT
    xs.close()
    k.close()
