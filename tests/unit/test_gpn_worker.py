"""The GPN worker: GSO grouping, the packet handlers under fuzzing, and the whole
engine over loopback sockets (no root: high ports, no raw sockets)."""

from __future__ import annotations

import base64
import ipaddress
import os
import random
import socket
import struct
import time
from typing import Any

import pytest

from protego.esp import (
    Decapsulator,
    Direction,
    OutboundSa,
    SaKeys,
    SecurityAssociation,
    Suite,
    UdpEncap,
)
from protego.esp.framing import build_ipv4_header
from protego.gpn.engine import Engine, EngineConfig, gpn_mac
from protego.gpn.records import parse_sa_record
from protego.gpn.tenant import EgressRoute, build_vxlan, mac_bytes, parse_vxlan
from protego.gpn.worker import LbTable, Worker, WorkerConfig, WorkerSockets, group_for_gso

HOST_MAC = mac_bytes("02:00:03:e9:00:01")


def test_gso_groups() -> None:
    assert group_for_gso([100, 100, 100], 1472) == [(0, 3)]
    assert group_for_gso([100, 100, 60, 100], 1472) == [(0, 3), (3, 4)]  # a shorter last one
    assert group_for_gso([100, 120, 120], 1472) == [(0, 1), (1, 3)]
    assert group_for_gso([1500, 1500], 1472) == [(0, 1), (1, 2)]  # too big for one MTU
    assert group_for_gso([1400] * 100, 1472) == [(0, 46), (46, 92), (92, 100)]  # 65,000 bytes
    assert group_for_gso([10] * 70, 1472) == [(0, 64), (64, 70)]
    assert group_for_gso([100, 100], 0) == [(0, 1), (1, 2)]  # GSO off


def record(spi: int, direction: str, key: bytes, peer: tuple[str, int], vip: str = "127.0.0.1",
           suite: str = "aes128gcm16", integ: bytes = b"") -> dict[str, Any]:
    inbound = direction == "in"
    return {
        "spi": f"{spi:08x}", "vip": vip, "direction": direction, "tenant": "acme", "tunnel": "hq", "vni": 1001,
        "gpn": "gpn1", "mode": "tunnel", "encap": True,
        "src": peer[0] if inbound else vip, "dst": vip if inbound else peer[0],
        "sport": peer[1] if inbound else 4500, "dport": 4500 if inbound else peer[1],
        "suite": suite, "enc_key": base64.b64encode(key).decode(), "integ_key": base64.b64encode(integ).decode(),
        "esn": False, "replay_window": 32, "local_ts": ["10.1.0.0/24"], "remote_ts": ["10.201.0.0/24"],
        "created": time.time(),
    }


class _NoSock:
    def fileno(self) -> int:
        return -1


def offline_worker() -> Worker:
    import multiprocessing

    s: Any = _NoSock()
    w = Worker(WorkerConfig(0, 1, "127.0.0.1"), WorkerSockets(s, s, s, None), None, None,
               LbTable(multiprocessing.get_context("fork")))
    w._now = time.time()
    return w


def test_handlers_never_raise_nor_accept_garbage() -> None:
    """100,000 malformed ESP-in-UDP payloads and VXLAN frames into the worker's
    receive handlers: no exception, nothing delivered or encrypted."""
    w = offline_worker()
    key = os.urandom(20)
    w._handle(("add", _wire(record(0x1001, "in", key, ("127.0.0.5", 4500))), None, 0))
    w._handle(("add", _wire(record(0x2002, "out", key, ("127.0.0.5", 4500))), None, 0))
    w._handle(("egress", [(1001, ((0x0A010000, 0x0A0100FF),), ((0x0AC90000, 0x0AC900FF),), 0x2002)]))
    w._handle(("hosts", {(1001, 0x0A01000A): (HOST_MAC, "127.0.0.2")}))
    rnd = random.Random(1234)
    valid_hdr = struct.pack("!II", 0x1001, 1)
    for i in range(100_000):
        n = rnd.randrange(0, 200)
        body = rnd.randbytes(n)
        if i % 3 == 0:
            body = valid_hdr[:4] + struct.pack("!I", rnd.randrange(1, 1 << 32)) + body  # our SPI, bad ICV
        w._on_esp_udp(body, ("127.0.0.5", 4500), rnd.choice((0, 0xDC)))
        frame = rnd.randbytes(rnd.randrange(0, 120))
        if i % 2 == 0 and len(frame) > 8:
            frame = b"\x08\x00\x00\x00" + frame[4:]
        w._on_vxlan(frame, ("127.0.0.3", 4789), 0)
    assert not w._vx_q and not w._esp_q  # nothing decrypted, nothing encrypted
    assert w.dec.get(0x1001).stats.packets == 0  # type: ignore[union-attr]
    assert w.dec.drops.total() > 30_000 and w.c["bad_vxlan"] > 0
    assert w.dec.drops.as_dict()["internal"] == 0


def _wire(rec: dict[str, Any]) -> tuple[Any, ...]:
    from protego.gpn.records import sa_to_wire

    return sa_to_wire(parse_sa_record(rec))


def _free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("workers, suite", [(1, Suite.AES128GCM16), (2, Suite.AES128_SHA256)])
def test_engine_over_loopback(workers: int, suite: Suite) -> None:
    natt, vx, hbp = _free_udp_port(), _free_udp_port(), _free_udp_port()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(3)
    vtep = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    vtep.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    vtep.bind(("127.0.0.2", vx))
    vtep.settimeout(3)
    keymat = os.urandom(suite.spec.keymat_len)
    k = suite.spec.enc_key_len
    enc, integ = (keymat, b"") if suite.spec.aead else (keymat[:k], keymat[k:])
    pp = peer.getsockname()
    eng = Engine(EngineConfig("127.0.0.1", workers=workers, natt_port=natt, vxlan_port=vx, hb_port=hbp,
                              raw_esp=False, pin_cpu=False)).start()
    try:
        gin = parse_sa_record(record(0x1001, "in", enc, pp, suite=suite.value, integ=integ))
        gout = parse_sa_record(record(0x2002, "out", enc, pp, suite=suite.value, integ=integ))
        eng.add_sa(gin)
        eng.add_sa(gout)
        eng.set_hosts({(1001, int(ipaddress.IPv4Address("10.1.0.10"))): (HOST_MAC, "127.0.0.2")})
        eng.set_egress([EgressRoute(1001, tuple(gout.local_ts.ranges), tuple(gout.remote_ts.ranges), 0x2002)])
        keys = SaKeys.from_keymat(suite, keymat)
        po = OutboundSa(SecurityAssociation(0x1001, Direction.OUTBOUND, suite, keys, pp[0], "127.0.0.1",
                                            encap=UdpEncap()))
        pd = Decapsulator()
        pd.add(SecurityAssociation(0x2002, Direction.INBOUND, suite, keys, "127.0.0.1", pp[0], encap=UdpEncap()))
        # no sleep: the barrier returns once every worker has the SAs, routes and hosts
        # (the first datagram would otherwise be dropped as an unknown SPI)
        eng.sync()
        # ingress: peer -> engine -> tenant VTEP
        inner = build_ipv4_header("10.201.0.10", "10.1.0.10", 17, 100) + os.urandom(100)
        t_first = time.time()
        first = po.encapsulate(inner)
        peer.sendto(first, ("127.0.0.1", natt))
        for _ in range(49):
            peer.sendto(po.encapsulate(inner), ("127.0.0.1", natt))
        peer.sendto(first, ("127.0.0.1", natt))  # a replay
        peer.sendto(b"\xff", ("127.0.0.1", natt))  # NAT keepalive: ignored
        for _ in range(50):
            f = parse_vxlan(vtep.recv(2048))
            assert f is not None and f.vni == 1001 and f.packet == inner
            assert f.dst_mac == HOST_MAC and f.src_mac == gpn_mac("127.0.0.1")
        # egress: tenant host -> engine -> peer, from the VIP's port 4500
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind(("127.0.0.3", 0))
        out_inner = build_ipv4_header("10.1.0.10", "10.201.0.10", 17, 1000) + os.urandom(1000)
        for i in range(200):
            tx.sendto(build_vxlan(1001, b"\x02\0\0\0\0\x01", out_inner, HOST_MAC), ("127.0.0.1", vx))
            if i % 50 == 49:
                time.sleep(0.01)
        seqs = []
        for _ in range(200):
            data, src = peer.recvfrom(4096)
            assert src == ("127.0.0.1", natt)
            res = pd.decap_udp(data)
            assert res.payload == out_inner, res
            seqs.append(struct.unpack_from("!I", data, 4)[0])
        assert len(set(seqs)) == 200
        time.sleep(0.1)
        st = eng.stats()
        assert st.sas[("in", 0x1001)][:2] == (50, 50 * len(inner))
        assert st.drops.get("unknown_spi", 0) == 0
        # the inbound SA's first packet (a migration's switch is measured with it)
        assert t_first <= st.first[("in", 0x1001)] <= st.sas[("in", 0x1001)][2] <= time.time()
        assert ("out", 0x2002) not in st.first
        assert st.sas[("out", 0x2002)][0] == 200
        assert st.drops["replayed"] == 1 and st.counters["keepalives"] == 1
        assert len(st.pids) == workers
        eng.remove_sa(gout)
        tx.sendto(build_vxlan(1001, b"\x02\0\0\0\0\x01", out_inner, HOST_MAC), ("127.0.0.1", vx))
        time.sleep(0.4)  # it waits ROUTE_HOLD for a route first
        c = eng.stats().counters
        assert c["no_outbound_sa"] == 1 and c["route_held"] == 1 and c.get("route_waits", 0) == 0
        tx.close()
    finally:
        eng.stop()
        peer.close()
        vtep.close()


def test_stats_flag_outbound_sas_that_need_a_rekey() -> None:
    w = offline_worker()
    key = os.urandom(20)
    w._handle(("add", _wire(record(0x2002, "out", key, ("127.0.0.5", 4500))), None, 0))
    assert w.stats()["sas"][("out", 0x2002)][3] == 0
    w.out[0x2002].esp.sequence.rekey_requested = True  # as past the soft limit
    assert w.stats()["sas"][("out", 0x2002)][3] == 1
    # an update (new peer port) keeps the counter: numbers are never reused
    w.out[0x2002].esp.encapsulate(build_ipv4_header("10.1.0.10", "10.201.0.10", 17, 8) + bytes(8))
    w._handle(("add", _wire(record(0x2002, "out", key, ("127.0.0.5", 4501))), None, 0))
    assert w.out[0x2002].addr == ("127.0.0.5", 4501)
    assert w.out[0x2002].esp.sequence.next_value == 2 and w.out[0x2002].esp.stats.packets == 1


def test_inbound_update_keeps_the_replay_window() -> None:
    w = offline_worker()
    key = os.urandom(20)
    w._handle(("add", _wire(record(0x1001, "in", key, ("127.0.0.5", 4500))), None, 0))
    peer = OutboundSa(SecurityAssociation(0x1001, Direction.OUTBOUND, Suite.AES128GCM16,
                                          SaKeys.from_keymat(Suite.AES128GCM16, key), "127.0.0.5", "127.0.0.1",
                                          encap=UdpEncap()))
    first = peer.encapsulate(build_ipv4_header("10.201.0.10", "10.1.0.10", 17, 8) + bytes(8))
    w._now = 1700000000.0
    w._on_esp_udp(first, ("127.0.0.5", 4500), 0)
    assert w.inb[0x1001].first == 1700000000.0  # its first packet
    w._handle(("add", _wire(record(0x1001, "in", key, ("127.0.0.5", 4600))), None, 0))  # NAT moved the peer
    w._now = 1700000001.0
    w._on_esp_udp(first, ("127.0.0.5", 4600), 0)  # still a replay
    assert w.dec.drops.as_dict()["replayed"] == 1
    assert w.dec.get(0x1001).stats.packets == 1  # type: ignore[union-attr]
    assert w.inb[0x1001].first == 1700000000.0  # the same SA: its first use stays


def test_a_frame_waits_briefly_for_its_tunnels_route() -> None:
    """The GEN may switch a tunnel to this GPN a moment before the control request with
    its outbound SA arrives: the frame waits (ROUTE_HOLD) instead of being dropped; a
    frame whose route never comes is dropped after that, counted as before."""
    from protego.gpn import worker as wmod

    w = offline_worker()
    key = os.urandom(20)
    inner = build_ipv4_header("10.1.0.10", "10.201.0.10", 17, 100) + os.urandom(100)
    frame = build_vxlan(1001, b"\x02\0\0\0\0\x01", inner, HOST_MAC)
    w._on_vxlan(frame, ("127.0.0.3", 4789), 0)
    assert w.c["route_held"] == 1 and w.c["no_tunnel"] == 0 and not w._esp_q
    # the route arrives: the held frame goes out on the next retry
    w._handle(("add", _wire(record(0x2002, "out", key, ("127.0.0.5", 4500))), None, 0))
    w._handle(("egress", [(1001, ((0x0A010000, 0x0A0100FF),), ((0x0AC90000, 0x0AC900FF),), 0x2002)]))
    w._retry_routes()
    assert w.c["route_waits"] == 1 and not w._route_held and sum(len(q) for q in w._esp_q.values()) == 1
    # no route ever: held, then dropped as no_tunnel once ROUTE_HOLD has passed
    other = build_vxlan(1002, b"\x02\0\0\0\0\x01", inner, HOST_MAC)
    w._on_vxlan(other, ("127.0.0.3", 4789), 0)
    assert len(w._route_held) == 1 and w.c["no_tunnel"] == 0
    since, f = w._route_held[0]
    w._route_held[0] = (since - wmod.ROUTE_HOLD - 0.01, f)
    w._retry_routes()
    assert not w._route_held and w.c["no_tunnel"] == 1 and w.c["route_waits"] == 1


def test_worker_cpu_list_parsing() -> None:
    from protego.errors import ConfigError
    from protego.gpn.engine import parse_cpu_list

    assert parse_cpu_list("") == () and parse_cpu_list(" 3,1-2 ", available={1, 2, 3}) == (1, 2, 3)
    for bad, why in (("x", "not a CPU number"), ("3-1", "bad CPU list"), ("-1", "not a CPU number"),
                     ("1-9", "does not have: 4, 5, 6, 7, 8, 9")):
        with pytest.raises(ConfigError, match=why):
            parse_cpu_list(bad, available={0, 1, 2, 3})


@pytest.mark.parametrize("pin", [False, True])
def test_workers_run_on_the_cpus_they_are_given(pin: bool) -> None:
    """``worker_cpus``: the workers leave the agent's CPUs for these (the testbed keeps
    its control plane and data path apart this way); with pinning, one CPU each."""
    last = max(os.sched_getaffinity(0))
    eng = Engine(EngineConfig("127.0.0.1", workers=2, natt_port=_free_udp_port(), vxlan_port=_free_udp_port(),
                              hb_port=_free_udp_port(), raw_esp=False, pin_cpu=pin, worker_cpus=(last,))).start()
    try:
        eng.sync()  # the workers are past their start-up (affinity set first)
        assert [os.sched_getaffinity(pid) for pid in eng.pids] == [{last}, {last}]
    finally:
        eng.stop()
