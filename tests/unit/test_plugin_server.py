"""The agent-side plugin server, driven by a fake plugin over a unix socket (no root)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from protego.gmn import plugin_protocol as pp
from protego.gmn.plugin_server import Counters, PluginServer

PEER = pp.Host.parse("198.18.0.1", 4500)
VIP = pp.Host.parse("203.0.113.10", 4500)


class FakePlugin:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(path))
        self.reader = pp.FrameReader()
        self.pending: list[bytes] = []
        self.next_id = 1

    def send(self, msg: pp.Message, request_id: int | None = None) -> int:
        if request_id is None:
            self.next_id += 1
            request_id = self.next_id
        self.sock.sendall(pp.encode(msg, request_id))
        return request_id

    def recv(self) -> tuple[int, pp.Message]:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.pending += self.reader.feed(data)
        return pp.decode(self.pending.pop(0))

    def call(self, msg: pp.Message) -> pp.Reply:
        rid = self.send(msg)
        got_id, reply = self.recv()
        assert got_id == rid and isinstance(reply, pp.Reply)
        assert reply.request_type == msg.TYPE
        return reply

    def hello(self) -> pp.Reply:
        return self.call(pp.Hello(software="fake", pid=1))

    def close(self) -> None:
        self.sock.close()


def sa(spi: int, inbound: bool, key: bytes = b"k" * 20) -> pp.AddSa:
    src, dst = (PEER, VIP) if inbound else (VIP, PEER)
    return pp.AddSa(src=src, dst=dst, spi=spi, reqid=1, enc_alg=20, enc_key=pp.Secret(key),
                    flags=pp.SaFlag.INBOUND if inbound else pp.SaFlag.NONE)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PluginServer]:
    spis = iter([0xC0000001, 0xC0000002])
    srv = PluginServer(tmp_path / "p.sock", spi_allocator=lambda req, used: next(spis),
                       counters=lambda q: Counters(100, 2, 5) if q.spi == 0xC0000001 else None)
    with srv:
        yield srv


@pytest.fixture
def plugin(server: PluginServer) -> Iterator[FakePlugin]:
    fake = FakePlugin(server.path)
    assert fake.hello().status == pp.Status.OK
    yield fake
    fake.close()


def test_socket_is_private(server: PluginServer) -> None:
    assert server.path.stat().st_mode & 0o077 == 0


def test_get_spi_add_query_del(server: PluginServer, plugin: FakePlugin) -> None:
    reply = plugin.call(pp.GetSpi(src=PEER, dst=VIP))
    assert reply.spi == 0xC0000001 and 0xC0000001 in server.allocated
    assert plugin.call(sa(0xC0000001, True)).status == pp.Status.OK
    assert plugin.call(sa(0x11110000, False)).status == pp.Status.OK
    assert set(server.sas) == {(0xC0000001, 50, "203.0.113.10"), (0x11110000, 50, "198.18.0.1")}
    q = plugin.call(pp.QuerySa(src=PEER, dst=VIP, spi=0xC0000001))
    assert (q.bytes, q.packets, q.idle) == (100, 2, 5)
    q = plugin.call(pp.QuerySa(src=VIP, dst=PEER, spi=0x11110000))  # source knows nothing
    assert (q.status, q.bytes, q.packets, q.idle) == (pp.Status.OK, 0, 0, None)
    q = plugin.call(pp.QuerySa(src=VIP, dst=PEER, spi=0x2222))
    assert q.status == pp.Status.NOT_FOUND
    assert plugin.call(pp.DelSa(src=PEER, dst=VIP, spi=0xC0000001)).status == pp.Status.OK
    assert plugin.call(pp.DelSa(src=PEER, dst=VIP, spi=0xC0000001)).status == pp.Status.NOT_FOUND
    assert [e.kind for e in server.events] == ["hello", "get_spi", "add_sa", "add_sa", "del_sa",
                                               "del_sa"]


def test_update_sa_moves_the_record(server: PluginServer, plugin: FakePlugin) -> None:
    plugin.call(sa(0x1234, True))
    new_src = pp.Host.parse("198.18.0.99", 4501)
    reply = plugin.call(pp.UpdateSa(src=PEER, dst=VIP, spi=0x1234, new_src=new_src, new_dst=VIP,
                                    flags=pp.SaFlag.ENCAP | pp.SaFlag.NEW_ENCAP))
    assert reply.status == pp.Status.OK
    rec = server.sas[(0x1234, 50, "203.0.113.10")]
    assert rec.sa.src == new_src and rec.sa.encap and rec.sa.inbound
    assert rec.sa.enc_key == pp.Secret(b"k" * 20)


def test_version_mismatch_is_refused(server: PluginServer) -> None:
    fake = FakePlugin(server.path)
    reply = fake.call(pp.Hello(version=(2, 0)))
    assert reply.status == pp.Status.VERSION and reply.version == pp.VERSION
    with pytest.raises((EOFError, ConnectionResetError)):
        fake.recv()
    assert server.hello is None


def test_state_dump_replaces_state(server: PluginServer, plugin: FakePlugin) -> None:
    plugin.call(sa(0x1, True))
    plugin.call(sa(0x2, False))
    # the plugin reconnects (agent view stale: 0x1 was deleted meanwhile, 0x3 added)
    plugin.close()
    again = FakePlugin(server.path)
    again.hello()
    again.send(pp.DumpBegin(sa_count=2, policy_count=1), 0)
    again.send(pp.AddSa(**{**_fields(sa(0x2, False)), "dump": True, "age": 30}), 0)
    again.send(pp.AddSa(**{**_fields(sa(0x3, True, b"z" * 20)), "dump": True, "age": 1}), 0)
    pol = pp.AddPolicy(dir=pp.PolicyDir.IN, src_ts=pp.TrafficSelector.from_network("10.1.0.0/16"),
                       dst_ts=pp.TrafficSelector.from_network("10.2.0.0/16"), reqid=1, dump=True)
    again.send(pol, 0)
    again.send(pp.DumpEnd(sa_count=2, policy_count=1), 0)
    assert server.wait_for(lambda s: len(s.dumps) == 1, 5)
    assert {k[0] for k in server.sas} == {0x2, 0x3}
    assert server.sas[(0x3, 50, "203.0.113.10")].sa.enc_key == pp.Secret(b"z" * 20)
    assert list(server.policies.values()) == [pol]
    assert server.connections == 2
    again.close()


def test_expire_event_reaches_plugin(server: PluginServer, plugin: FakePlugin) -> None:
    server.send_expire(0xC0000001, VIP, hard=True)
    rid, msg = plugin.recv()
    assert rid == 0 and msg == pp.Expire(spi=0xC0000001, dst=VIP, hard=True)


def test_unknown_request_gets_not_supported(server: PluginServer, plugin: FakePlugin) -> None:
    plugin.sock.sendall(bytes.fromhex("00000008" "0100" "0077" "00000063"))
    rid, reply = plugin.recv()
    assert rid == 0x63 and isinstance(reply, pp.Reply)
    assert reply.status == pp.Status.NOT_SUPPORTED and reply.request_type == 0x77


def test_policies_recorded(server: PluginServer, plugin: FakePlugin) -> None:
    pol = pp.AddPolicy(dir=pp.PolicyDir.OUT, src_ts=pp.TrafficSelector.from_network("10.2.0.0/16"),
                       dst_ts=pp.TrafficSelector.from_network("10.1.0.0/16"), reqid=1,
                       esp_spi=0x99)
    assert plugin.call(pol).status == pp.Status.OK
    assert server.policies[pol.key] == pol
    delete = pp.DelPolicy(dir=pol.dir, src_ts=pol.src_ts, dst_ts=pol.dst_ts)
    assert plugin.call(delete).status == pp.Status.OK
    assert not server.policies


def _fields(msg: pp.Message) -> dict[str, object]:
    return {f.name: getattr(msg, f.name) for f in msg.FIELDS}


# ------------------------------------------------------------------ issue #19, item 6


def test_the_call_history_is_bounded_and_keeps_no_key(server: PluginServer, plugin: FakePlugin) -> None:
    """Was: ``events`` grew forever and kept deleted SAs' keys (20k add/del pairs: 49 MB)."""
    from protego.gmn import plugin_server as ps

    key = b"\x5a" * 20
    for i in range(ps.EVENT_HISTORY // 2 + 50):  # more calls than the history keeps
        spi = 0x1000 + i
        assert plugin.call(sa(spi, True, key)).status == pp.Status.OK
        assert plugin.call(pp.DelSa(src=PEER, dst=VIP, spi=spi)).status == pp.Status.OK
    assert len(server.events) == ps.EVENT_HISTORY
    adds = [e.message for e in server.events if e.kind == "add_sa"]
    assert adds and all(len(m.enc_key) == 0 and len(m.int_key) == 0 for m in adds)  # type: ignore[attr-defined]
    assert server.sas == {}


def test_a_peer_of_another_user_is_refused(tmp_path: Path) -> None:
    import os

    srv = PluginServer(tmp_path / "p.sock", allowed_uids={os.geteuid() + 4242})
    with srv:
        fake = FakePlugin(srv.path)
        with pytest.raises((EOFError, ConnectionResetError)):
            fake.hello()
        fake.close()
        assert srv.refused_peers == 1 and srv.hello is None


def test_an_add_sa_the_agent_could_not_record_is_answered_failed(tmp_path: Path) -> None:
    """Was: an add_sa whose etcd write failed was still answered OK (charon then used an
    SA no data path had)."""
    from protego.errors import PeerError

    def on_change(ev: object) -> None:
        if getattr(ev, "kind", "") == "add_sa":
            raise PeerError("etcd unavailable")

    srv = PluginServer(tmp_path / "p.sock", on_change=on_change)
    with srv:
        fake = FakePlugin(srv.path)
        assert fake.hello().status == pp.Status.OK
        reply = fake.call(sa(0x4321, True))
        assert reply.status == pp.Status.FAILED and "could not be recorded" in (reply.error or "")
        assert srv.sas == {}  # charon does not hold it: neither does the server
        assert fake.call(pp.DelSa(src=PEER, dst=VIP, spi=0x4321)).status == pp.Status.NOT_FOUND
        fake.close()
