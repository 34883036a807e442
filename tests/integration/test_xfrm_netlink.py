"""XFRM encoder against the real kernel and iproute2 (root, temporary netns).

* Byte for byte: for the same SA/policy, the netlink message our encoder builds
  equals the one ``ip xfrm ...`` sends, captured with
  ``strace -e trace=sendmsg,sendto -e write=all`` (nlmsg_seq/nlmsg_pid ignored).
  On this kernel ``ip xfrm state add`` fails (no ESP), but the message is sent.
* For real: policy add/update/dump/delete through our socket in a temp netns,
  compared with what the kernel returns to ``ip xfrm policy list`` (its replies
  captured with ``-e read=all`` and decoded by us).
* The start-up probe.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from protego.errors import DataplaneError
from protego.esp import Direction, Lifetime, SaKeys, SecurityAssociation, Suite, UdpEncap
from protego.xfrm import (
    Mark,
    Selector,
    XfrmPolicy,
    XfrmTemplate,
    decode_policy,
    encode_policy,
    encode_policy_delete,
    encode_policy_dump,
    encode_state,
    encode_state_delete,
    encode_state_dump,
    encode_state_get,
    open_xfrm_socket,
    probe_kernel_esp,
    state_from_sa,
)
from protego.xfrm.constants import (
    XFRM_MSG_NEWPOLICY,
    XFRM_POLICY_IN,
    XFRM_POLICY_OUT,
)
from protego.xfrm.messages import iter_messages

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("strace") is None or shutil.which("ip") is None,
                       reason="needs strace and iproute2"),
]

# Fixed, obviously-fake test keys (not secrets).
KEY16 = bytes(range(16))
KEY32 = bytes(range(32))
SALT = bytes.fromhex("a0a1a2a3")
AUTH20 = bytes(range(0x40, 0x54))
AUTH32 = bytes(range(0x40, 0x60))


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"pt-xfrm-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


_HEX = re.compile(r"^ \| ([0-9a-f]{5})  ((?:[0-9a-f]{2} {1,2}){1,16})")


def _strace_buffers(netns: str, args: list[str], trace: str, dump: str,
                    tmp: Path) -> list[bytes]:
    """Run ``ip -n NETNS ARGS`` under strace; return the data buffers it dumped
    (``dump`` is ``write=all`` for what ip sends, ``read=all`` for what it reads)."""
    out = tmp / f"strace-{uuid.uuid4().hex[:8]}.txt"
    subprocess.run(["strace", "-f", "-o", str(out), "-e", trace, "-e", dump,
                    "-s", "65536", "ip", "-n", netns, *args],
                   capture_output=True, check=False)
    buffers: list[bytearray] = []
    for line in out.read_text().splitlines():
        stripped = line.split(" ", 1)[1] if line[:1].isdigit() else line
        m = _HEX.match(stripped)
        if m:  # sendto has no "* N bytes in buffer" line: offset 0 starts a buffer
            if m.group(1) == "00000":
                buffers.append(bytearray())
            buffers[-1] += bytes.fromhex(m.group(2).replace(" ", ""))
    out.unlink()
    return [bytes(b) for b in buffers]


def ip_sends(netns: str, args: list[str], tmp: Path) -> list[bytes]:
    """XFRM netlink messages ``ip`` sends (nlmsg_seq/pid zeroed)."""
    msgs = []
    for buf in _strace_buffers(netns, args, "trace=sendmsg,sendto", "write=all", tmp):
        for m in iter_messages(buf):
            if 0x10 <= m.type <= 0x30:
                msgs.append(_zero_seq(buf[: 16 + len(m.payload)]))
                break
    return msgs


def ip_receives(netns: str, args: list[str], tmp: Path) -> list[bytes]:
    """Raw datagrams ``ip`` receives from the kernel."""
    return _strace_buffers(netns, args, "trace=recvmsg,recvfrom", "read=all", tmp)


def _zero_seq(msg: bytes) -> bytes:
    return msg[:8] + bytes(8) + msg[16:]


def _sa(suite: Suite, *, esn: bool = False, window: int = 64, encap: UdpEncap | None = None,
        lifetime: Lifetime | None = None, src: str = "198.18.0.1",
        dst: str = "198.18.0.2", spi: int = 0x1000) -> SecurityAssociation:
    spec = suite.spec
    enc = (KEY16 + KEY16)[: spec.enc_key_len]
    keys = SaKeys(enc, salt=SALT if spec.aead else b"",
                  auth_key=b"" if spec.aead else (AUTH20 if spec.auth_key_len == 20 else AUTH32))
    return SecurityAssociation(spi, Direction.OUTBOUND, suite, keys, src, dst, esn=esn,
                               replay_window=window, encap=encap, reqid=1,
                               lifetime=lifetime or Lifetime())


def _ip_state_args(sa: SecurityAssociation, verb: str = "add",
                   mark: Mark | None = None) -> list[str]:
    spec = sa.suite.spec
    k = sa.keys
    args = ["xfrm", "state", verb, "src", str(sa.src), "dst", str(sa.dst), "proto", "esp",
            "spi", hex(sa.spi), "reqid", str(sa.reqid), "mode", "tunnel",
            "replay-window", str(sa.replay_window)]
    if sa.esn:
        args += ["flag", "esn"]
    if spec.aead:
        args += ["aead", spec.xfrm_enc_name, "0x" + (k.enc_key + k.salt).hex(),
                 str(spec.xfrm_trunc_bits)]
    else:
        assert spec.xfrm_auth_name
        args += ["enc", spec.xfrm_enc_name, "0x" + k.enc_key.hex(),
                 "auth-trunc", spec.xfrm_auth_name, "0x" + k.auth_key.hex(),
                 str(spec.xfrm_trunc_bits)]
    if sa.encap is not None:
        args += ["encap", "espinudp", str(sa.encap.sport), str(sa.encap.dport), "0.0.0.0"]
    lt = sa.lifetime
    for value, word in ((lt.soft_bytes, "byte-soft"), (lt.hard_bytes, "byte-hard"),
                        (lt.soft_packets, "packet-soft"), (lt.hard_packets, "packet-hard"),
                        (lt.soft_seconds, "time-soft"), (lt.hard_seconds, "time-hard")):
        if value is not None:
            args += ["limit", word, str(value)]
    if mark is not None:
        args += ["mark", str(mark.value), "mask", hex(mark.mask)]
    return args


STATE_CASES = {
    "gcm128": {"suite": Suite.AES128GCM16},
    "gcm256-esn-natt": {"suite": Suite.AES256GCM16, "esn": True, "window": 128,
                            "encap": UdpEncap(4500, 4500)},
    "cbc128-sha1": {"suite": Suite.AES128_SHA1, "window": 64},
    "cbc256-sha1-esn": {"suite": Suite.AES256_SHA1, "esn": True, "window": 256},
    "cbc128-sha256-natt-ports": {"suite": Suite.AES128_SHA256, "encap": UdpEncap(4501, 4500)},
    "cbc256-sha256-esn-lifetimes": {
        "suite": Suite.AES256_SHA256, "esn": True, "window": 4096,
        "lifetime": Lifetime(soft_bytes=1000, hard_bytes=2000, soft_packets=10,
                          hard_packets=20, soft_seconds=30, hard_seconds=60)},
    "gcm128-ipv6": {"suite": Suite.AES128GCM16, "src": "2001:db8::1", "dst": "2001:db8::2"},
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_state_add_matches_ip(netns: str, tmp_path: Path, case: str) -> None:
    sa = _sa(**STATE_CASES[case])  # type: ignore[arg-type]
    sent = ip_sends(netns, _ip_state_args(sa), tmp_path)
    assert len(sent) == 1
    assert encode_state(state_from_sa(sa)) == sent[0]


def test_state_update_with_mark_matches_ip(netns: str, tmp_path: Path) -> None:
    sa = _sa(Suite.AES128_SHA256, esn=True, encap=UdpEncap())
    mark = Mark(7, 0xFF)
    sent = ip_sends(netns, _ip_state_args(sa, "update", mark), tmp_path)
    assert encode_state(state_from_sa(sa, mark=mark), update=True) == sent[0]


def test_state_delete_get_dump_match_ip(netns: str, tmp_path: Path) -> None:
    base = ["src", "198.18.0.1", "dst", "198.18.0.2", "proto", "esp", "spi", "0x1000"]
    (sent,) = ip_sends(netns, ["xfrm", "state", "delete", *base], tmp_path)
    assert encode_state_delete("198.18.0.2", 0x1000, "198.18.0.1") == sent
    (sent,) = ip_sends(netns, ["xfrm", "state", "get", *base], tmp_path)
    assert encode_state_get("198.18.0.2", 0x1000, "198.18.0.1") == sent
    (sent,) = ip_sends(netns, ["xfrm", "state", "delete", *base, "mark", "5"], tmp_path)
    assert encode_state_delete("198.18.0.2", 0x1000, "198.18.0.1", mark=Mark(5)) == sent
    (sent,) = ip_sends(netns, ["xfrm", "state", "list"], tmp_path)
    assert encode_state_dump(address_filter=True) == sent


POLICY_OUT = XfrmPolicy(
    selector=Selector.between("10.1.0.0/16", "10.2.0.0/16"), direction=XFRM_POLICY_OUT,
    templates=(XfrmTemplate(src="198.18.0.1", dst="198.18.0.2", reqid=1),))
POLICY_IN = XfrmPolicy(
    selector=Selector.between("10.2.0.0/16", "10.1.0.0/24", proto=6, dport=80),
    direction=XFRM_POLICY_IN, priority=100, mark=Mark(5, 0xFF),
    templates=(XfrmTemplate(src="198.18.0.2", dst="198.18.0.1", reqid=2),))
POLICY_V6 = XfrmPolicy(
    selector=Selector.between("2001:db8:1::/48", "2001:db8:2::/48"),
    direction=XFRM_POLICY_OUT,
    templates=(XfrmTemplate(src="2001:db8::1", dst="2001:db8::2", reqid=3),))

IP_POLICY_ARGS = {
    "out": ["src", "10.1.0.0/16", "dst", "10.2.0.0/16", "dir", "out", "tmpl", "src",
            "198.18.0.1", "dst", "198.18.0.2", "proto", "esp", "reqid", "1", "mode", "tunnel"],
    "in": ["src", "10.2.0.0/16", "dst", "10.1.0.0/24", "proto", "tcp", "dport", "80", "dir",
           "in", "priority", "100", "mark", "5", "mask", "0xff", "tmpl", "src", "198.18.0.2",
           "dst", "198.18.0.1", "proto", "esp", "reqid", "2", "mode", "tunnel"],
    "v6": ["src", "2001:db8:1::/48", "dst", "2001:db8:2::/48", "dir", "out", "tmpl", "src",
           "2001:db8::1", "dst", "2001:db8::2", "proto", "esp", "reqid", "3", "mode", "tunnel"],
}
POLICIES = {"out": POLICY_OUT, "in": POLICY_IN, "v6": POLICY_V6}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_messages_match_ip(netns: str, tmp_path: Path, name: str) -> None:
    policy = POLICIES[name]
    (sent,) = ip_sends(netns, ["xfrm", "policy", "add", *IP_POLICY_ARGS[name]], tmp_path)
    assert encode_policy(policy) == sent
    (sent,) = ip_sends(netns, ["xfrm", "policy", "update", *IP_POLICY_ARGS[name]], tmp_path)
    assert encode_policy(policy, update=True) == sent
    sel_args = IP_POLICY_ARGS[name][: IP_POLICY_ARGS[name].index("tmpl")]
    sel_args = [a for i, a in enumerate(sel_args)
                if a != "priority" and (i == 0 or sel_args[i - 1] != "priority")]
    (sent,) = ip_sends(netns, ["xfrm", "policy", "delete", *sel_args], tmp_path)
    assert encode_policy_delete(policy.selector, policy.direction, mark=policy.mark) == sent
    (sent,) = ip_sends(netns, ["xfrm", "policy", "list"], tmp_path)
    assert encode_policy_dump() == sent


def test_policy_add_dump_delete_for_real(netns: str, tmp_path: Path) -> None:
    with open_xfrm_socket(netns) as xs:
        assert xs.dump_policies() == []
        xs.add_policy(POLICY_OUT)
        xs.add_policy(POLICY_IN)
        with pytest.raises(DataplaneError) as exc:
            xs.add_policy(POLICY_OUT)  # exists
        assert exc.value.errno == errno.EEXIST
        ours = {p.direction: p for p in xs.dump_policies()}
        assert set(ours) == {XFRM_POLICY_OUT, XFRM_POLICY_IN}
        for want in (POLICY_OUT, POLICY_IN):
            got = ours[want.direction]
            assert got.selector == want.selector
            assert got.templates == tuple(
                XfrmTemplate(t.src, t.dst, t.proto, t.spi, t.reqid, t.mode, t.share,
                             t.optional, t.aalgos, t.ealgos, t.calgos, 2)
                for t in want.templates)
            assert (got.priority, got.mark, got.action) == (want.priority, want.mark, want.action)
        # What the kernel tells `ip xfrm policy list`, decoded by us, is the same.
        via_ip = [decode_policy(m.payload)
                  for buf in ip_receives(netns, ["xfrm", "policy", "list"], tmp_path)
                  for m in iter_messages(buf) if m.type == XFRM_MSG_NEWPOLICY]
        assert sorted(via_ip, key=lambda p: p.direction) == sorted(
            ours.values(), key=lambda p: p.direction)
        # update changes the template's reqid in place
        changed = XfrmPolicy(POLICY_OUT.selector, XFRM_POLICY_OUT, templates=(
            XfrmTemplate(src="198.18.0.1", dst="198.18.0.2", reqid=9),))
        xs.update_policy(changed)
        got = {p.direction: p for p in xs.dump_policies()}[XFRM_POLICY_OUT]
        assert got.templates[0].reqid == 9
        xs.delete_policy(POLICY_OUT.selector, XFRM_POLICY_OUT)
        xs.delete_policy(POLICY_IN.selector, XFRM_POLICY_IN, mark=POLICY_IN.mark)
        assert xs.dump_policies() == []
        with pytest.raises(DataplaneError) as exc:
            xs.delete_policy(POLICY_OUT.selector, XFRM_POLICY_OUT)
        assert exc.value.errno == errno.ENOENT
    # `ip` agrees: nothing left
    out = subprocess.run(["ip", "-n", netns, "xfrm", "policy", "list"], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == ""


def test_policy_added_by_ip_decodes_to_our_model(netns: str) -> None:
    subprocess.run(["ip", "-n", netns, "xfrm", "policy", "add", *IP_POLICY_ARGS["in"]],
                   check=True)
    with open_xfrm_socket(netns) as xs:
        (got,) = xs.dump_policies()
    assert got.selector == POLICY_IN.selector
    assert got.direction == POLICY_IN.direction and got.priority == 100
    assert got.mark == POLICY_IN.mark
    assert got.templates[0].dst == ipaddress.ip_address("198.18.0.1")


def test_state_operations_report_errno(netns: str) -> None:
    import dataclasses

    from protego.xfrm.constants import XFRMA_ALG_AEAD
    from protego.xfrm.messages import Algorithm

    # an AEAD no kernel knows: refused the same way with or without kernel ESP (ENOSYS;
    # EPROTONOSUPPORT where ESP itself is missing)
    state = dataclasses.replace(state_from_sa(_sa(Suite.AES128GCM16)),
                                algorithms=(Algorithm(XFRMA_ALG_AEAD, "rfc4106(nosuch(aes))", KEY16 + bytes(4), 128),))
    with open_xfrm_socket(netns) as xs:
        assert xs.dump_states() == []
        with pytest.raises(DataplaneError) as exc:
            xs.add_state(state)
        assert exc.value.errno in (errno.ENOSYS, errno.EPROTONOSUPPORT)
        assert "NEWSA" in str(exc.value)
        assert KEY16.hex() not in str(exc.value)
        with pytest.raises(DataplaneError) as exc:
            xs.get_state("198.18.0.2", 0x1000, "198.18.0.1")
        assert exc.value.errno == errno.ESRCH
        with pytest.raises(DataplaneError) as exc:
            xs.delete_state("198.18.0.2", 0x1000, "198.18.0.1")
        assert exc.value.errno == errno.ESRCH


def test_open_socket_in_missing_netns_fails_with_errno() -> None:
    with pytest.raises(DataplaneError) as exc:
        open_xfrm_socket(f"pt-xfrm-missing-{uuid.uuid4().hex[:8]}")
    assert exc.value.errno == errno.ENOENT


def test_probe_kernel_esp_on_this_kernel() -> None:
    before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    result = probe_kernel_esp()
    after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert before == after  # the probe's namespace is anonymous and gone
    if result.kernel_esp:
        assert result.backend == "xfrm"
        assert "using the xfrm backend" in result.message
    else:
        assert result.backend == "userspace"
        assert result.errno in (errno.ENOSYS, errno.EPROTONOSUPPORT)
        assert result.message.startswith("kernel has no ESP (")
        assert result.message.endswith("): using the userspace backend")
        assert "ENOSYS" in result.message or "EPROTONOSUPPORT" in result.message
        assert set(result.suites) == {"aes128gcm16", "aes128-sha256"}
