"""kernel-protego against real charons: a peer (kernel-libipsec) and a GMN.

Two network namespaces joined by a veth (198.18.77.0/24); each charon runs in
its own mount namespace with a private /run, its own strongswan.conf and VICI
socket.  The GMN's charon loads kernel-protego first, so every SA it
negotiates reaches the agent-side PluginServer running in this test process.

Needs: root, strongSwan 5.9.8 and the plugin installed by
``charon-plugins/build.sh``.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from protego.gmn import plugin_protocol as pp
from protego.gmn.plugin_server import Counters, PluginServer

pytestmark = pytest.mark.root

PLUGIN = Path("/usr/lib/ipsec/plugins/libstrongswan-kernel-protego.so")
CHARON = "/usr/lib/ipsec/charon"
PEER_IP, GMN_IP = "198.18.77.1", "198.18.77.2"
PEER_NET, GMN_NET = "10.91.1.0/24", "10.91.2.0/24"
PEER_HOST, GMN_HOST = "10.91.1.1", "10.91.2.1"
SHORT_PEER_NET, SHORT_GMN_NET = "10.91.3.0/24", "10.91.4.0/24"
EXT_PEER_NET, EXT_GMN_NET = "10.91.5.0/24", "10.91.6.0/24"
ENCR_AES_GCM_ICV16 = 20  # IKEv2 transform id, strongSwan's encryption_algorithm_t
SHORT_REKEY_S = 4

PEER_PLUGINS = ("random nonce openssl kdf pem pkcs1 x509 pubkey kernel-libipsec kernel-netlink "
                "socket-default vici updown")
GMN_PLUGINS = ("kernel-protego random nonce openssl kdf pem pkcs1 x509 pubkey kernel-netlink "
               "socket-default vici")


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Charon:
    name: str
    netns: str
    vici_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes]

    def session(self) -> Any:
        import vici

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.vici_path))
        return vici.Session(sock)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def start_charon(name: str, netns: str, workdir: Path, plugins: str, extra: str) -> Charon:
    conf = workdir / f"{name}.conf"
    vici_path = workdir / f"{name}-vici.sock"
    log_path = workdir / f"{name}.log"
    conf.write_text(textwrap.dedent(f"""\
        charon {{
            load = {plugins}
            filelog {{
                main {{
                    path = {log_path}
                    time_format = %T
                    default = 1
                    knl = 2
                    ike = 1
                    flush_line = yes
                }}
            }}
            plugins {{
                vici {{
                    socket = unix://{vici_path}
                }}
            }}
        {textwrap.indent(extra, "    ")}
        }}
        """))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "STRONGSWAN_CONF": str(conf)}
    with open(workdir / f"{name}.stderr", "wb") as stderr:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "unshare", "-m", "sh", "-c",
             f"mount -t tmpfs -o mode=0755 tmpfs /run && exec {CHARON}"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True)
    charon = Charon(name, netns, vici_path, log_path, proc)
    try:
        wait_until(lambda: vici_path.exists() or proc.poll() is not None, 15, f"{name} VICI")
        if proc.poll() is not None:
            raise AssertionError(f"{name} charon exited: {charon.log()[-2000:]}")
        wait_until(lambda: _vici_ok(charon), 10, f"{name} VICI answers")
    except BaseException:
        charon.stop()
        raise
    return charon


def _vici_ok(charon: Charon) -> bool:
    try:
        charon.session().version()
        return True
    except OSError:
        return False


def conn_config(local: str, remote: str, local_id: str, remote_id: str,
                children: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "version": "2",
        "local_addrs": [local],
        "remote_addrs": [remote],
        "proposals": ["aes128-sha256-x25519"],
        "local": {"auth": "psk", "id": local_id},
        "remote": {"auth": "psk", "id": remote_id},
        "children": children,
    }


def child_sas(session: Any, ike: str) -> dict[str, dict[str, Any]]:
    """child name-uniqueid -> attributes (str), from VICI list-sas."""
    out: dict[str, dict[str, Any]] = {}
    for entry in session.list_sas({"ike": ike}):
        for ike_sa in entry.values():
            for cname, child in ike_sa.get("child-sas", {}).items():
                out[cname] = {k: (v.decode() if isinstance(v, bytes) else v)
                              for k, v in child.items()}
    return out


def installed(session: Any, ike: str, child: str) -> list[dict[str, Any]]:
    return [c for c in child_sas(session, ike).values()
            if c["name"] == child and c["state"] == "INSTALLED"]


# ------------------------------------------------------------------ fixtures


@dataclass
class Bed:
    peer: Charon
    gmn: Charon
    peer_ns: str
    gmn_ns: str
    server: PluginServer
    sock_path: Path
    workdir: Path
    psk: str


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    if not PLUGIN.exists():
        pytest.fail(f"{PLUGIN} is missing: run charon-plugins/build.sh first")
    workdir = tmp_path_factory.mktemp("kp")
    os.chmod(workdir, 0o700)
    tag = secrets.token_hex(3)
    peer_ns, gmn_ns = f"pt-kpp-{tag}", f"pt-kpg-{tag}"
    created: list[str] = []
    charons: list[Charon] = []
    server: PluginServer | None = None
    bed_obj: Bed | None = None
    try:
        for ns in (peer_ns, gmn_ns):
            run("ip", "netns", "add", ns)
            created.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", f"kp{tag}", "netns", peer_ns, "type", "veth",
            "peer", "name", f"kg{tag}", "netns", gmn_ns)
        run("ip", "-n", peer_ns, "addr", "add", f"{PEER_IP}/24", "dev", f"kp{tag}")
        run("ip", "-n", gmn_ns, "addr", "add", f"{GMN_IP}/24", "dev", f"kg{tag}")
        run("ip", "-n", peer_ns, "link", "set", f"kp{tag}", "up")
        run("ip", "-n", gmn_ns, "link", "set", f"kg{tag}", "up")
        run("ip", "-n", peer_ns, "addr", "add", f"{PEER_HOST}/32", "dev", "lo")
        # libipsec's routes need a source address inside each local selector
        for addr in ("10.91.3.1/32", "10.91.5.1/32"):
            run("ip", "-n", peer_ns, "addr", "add", addr, "dev", "lo")

        sock_path = workdir / "gmn-plugin.sock"
        server = PluginServer(sock_path).start()
        peer = start_charon("peer", peer_ns, workdir, PEER_PLUGINS, "")
        charons.append(peer)
        gmn = start_charon("gmn", gmn_ns, workdir, GMN_PLUGINS, textwrap.dedent(f"""\
            install_routes = no
            delete_rekeyed_delay = 1
            plugins {{
                kernel-protego {{
                    socket = {sock_path}
                    retry_interval = 200
                }}
            }}
            """))
        charons.append(gmn)
        assert server.wait_for(lambda s: s.hello is not None, 10), "plugin never said hello"

        psk = secrets.token_urlsafe(24)  # only ever sent over VICI
        long_child = {"esp_proposals": ["aes128gcm16-x25519"], "rekey_time": "1h",
                      "life_time": "2h", "rand_time": "0"}
        peer_s, gmn_s = peer.session(), gmn.session()
        for sess, (lid, rid) in ((peer_s, ("peer", "gmn")), (gmn_s, ("gmn", "peer"))):
            sess.load_shared({"type": "IKE", "data": psk, "owners": [lid, rid]})
        peer_s.load_conn({"kp": conn_config(PEER_IP, GMN_IP, "peer", "gmn", {
            "net": {**long_child, "local_ts": [PEER_NET], "remote_ts": [GMN_NET]},
            "short": {**long_child, "local_ts": [SHORT_PEER_NET], "remote_ts": [SHORT_GMN_NET]},
            "ext": {**long_child, "local_ts": [EXT_PEER_NET], "remote_ts": [EXT_GMN_NET]},
        })})
        gmn_s.load_conn({"kp": conn_config(GMN_IP, PEER_IP, "gmn", "peer", {
            "net": {**long_child, "local_ts": [GMN_NET], "remote_ts": [PEER_NET]},
            # lifetime-driven rekeys come from the GMN's (plugin's) timers
            "short": {"esp_proposals": ["aes128gcm16-x25519"],
                      "rekey_time": f"{SHORT_REKEY_S}s", "life_time": "60s",
                      "rand_time": "0", "local_ts": [SHORT_GMN_NET],
                      "remote_ts": [SHORT_PEER_NET]},
            "ext": {**long_child, "local_ts": [EXT_GMN_NET], "remote_ts": [EXT_PEER_NET]},
        })})
        for _ in peer_s.initiate({"ike": "kp", "child": "net", "timeout": 10000}):
            pass
        bed_obj = Bed(peer, gmn, peer_ns, gmn_ns, server, sock_path, workdir, psk)
        yield bed_obj
    finally:
        for charon in reversed(charons):
            charon.stop()
        for srv in {id(x): x for x in (server, bed_obj and bed_obj.server) if x}.values():
            srv.stop()
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def current(bed: Bed) -> PluginServer:
    return bed.server


def spi_hex(spi: int) -> str:
    return f"{spi:08x}"


def sa_pair(server: PluginServer, reqid: int) -> tuple[pp.AddSa, pp.AddSa]:
    """The installed (inbound, outbound) SAs of a reqid, newest first."""
    sas = sorted((r for r in server.sas.values() if r.sa.reqid == reqid),
                 key=lambda r: r.installed, reverse=True)
    inbound = next(r.sa for r in sas if r.sa.inbound)
    outbound = next(r.sa for r in sas if not r.sa.inbound)
    return inbound, outbound


# --------------------------------------------------------------------- tests


def test_tunnel_up_and_sas_exported(bed: Bed) -> None:
    peer_s, gmn_s = bed.peer.session(), bed.gmn.session()
    peer_child = wait_until(lambda: installed(peer_s, "kp", "net"), 10, "peer CHILD_SA")[0]
    gmn_child = wait_until(lambda: installed(gmn_s, "kp", "net"), 10, "GMN CHILD_SA")[0]
    reqid = int(gmn_child["reqid"])
    server = current(bed)
    assert server.wait_for(lambda s: sum(r.sa.reqid == reqid for r in s.sas.values()) >= 2, 5)
    inbound, outbound = sa_pair(server, reqid)

    # SPIs: the GMN's inbound SA is the peer's outbound one and vice versa
    assert spi_hex(inbound.spi) == peer_child["spi-out"] == gmn_child["spi-in"]
    assert spi_hex(outbound.spi) == peer_child["spi-in"] == gmn_child["spi-out"]
    # the agent allocated the inbound SPI
    assert any(e.kind == "get_spi" for e in server.events)
    # agreed algorithms and everything else charon handed over
    assert peer_child["encr-alg"] == "AES_GCM_16" and peer_child["encr-keysize"] == "128"
    for sa in (inbound, outbound):
        assert sa.enc_alg == ENCR_AES_GCM_ICV16
        assert len(sa.enc_key) == 16 + 4  # AES-128 key + 4-byte salt
        assert sa.mode == pp.Mode.TUNNEL
        assert sa.encap  # libipsec peers always use ESP-in-UDP
        assert sa.lifetime is not None and sa.lifetime.time_life == 7200
        assert sa.replay_window > 0
    # charon puts the soft (rekey) lifetime on the inbound SA only
    assert inbound.lifetime.time_rekey == 3600 and outbound.lifetime.time_rekey == 0
    assert str(inbound.src.address) == PEER_IP and inbound.src.port == 4500
    assert str(inbound.dst.address) == GMN_IP and inbound.dst.port == 4500
    assert [str(t) for t in inbound.src_ts] == [PEER_NET]
    assert [str(t) for t in inbound.dst_ts] == [GMN_NET]
    assert not outbound.inbound and str(outbound.dst.address) == PEER_IP
    assert inbound.enc_key != outbound.enc_key
    # policies for the CHILD_SA reached the agent too (in, out, fwd)
    dirs = {p.dir for p in server.policies.values() if p.reqid == reqid}
    assert {pp.PolicyDir.IN, pp.PolicyDir.OUT} <= dirs
    # keys never in the GMN's log, nor in any repr
    log = bed.gmn.log()
    for sa in (inbound, outbound):
        assert sa.enc_key.reveal().hex() not in log
        assert sa.enc_key.reveal().hex() not in repr(sa)
    assert bed.psk not in log and bed.psk not in bed.peer.log()


CAPTURE = r"""
import socket, struct, sys, time
ifname, spi, deadline = sys.argv[1], int(sys.argv[2], 16), time.time() + float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind((ifname, 0))
s.settimeout(0.5)
print("ready", flush=True)
while time.time() < deadline:
    try:
        frame = s.recv(65535)
    except socket.timeout:
        continue
    ip = frame[14:]
    if ip[0] >> 4 != 4 or ip[9] != 17:
        continue
    udp = ip[(ip[0] & 15) * 4:]
    if struct.unpack(">H", udp[2:4])[0] != 4500 or len(udp) < 16:
        continue
    esp = udp[8:]
    if struct.unpack(">I", esp[:4])[0] == spi:
        print(esp.hex(), flush=True)
        sys.exit(0)
sys.exit(1)
"""


def test_exported_inbound_key_decrypts_peer_traffic(bed: Bed) -> None:
    """Capture the peer's ESP-in-UDP on the GMN's veth; decrypt it with the exported key."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    gmn_child = installed(bed.gmn.session(), "kp", "net")[0]
    inbound, _ = sa_pair(current(bed), int(gmn_child["reqid"]))
    veth = next(line.split(":")[1].strip().split("@")[0]
                for line in run("ip", "-n", bed.gmn_ns, "-o", "link").stdout.splitlines()
                if line.split(":")[1].strip().startswith("kg"))
    cap = subprocess.Popen(["ip", "netns", "exec", bed.gmn_ns, sys.executable, "-c", CAPTURE,
                            veth, spi_hex(inbound.spi), "10"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert cap.stdout is not None and cap.stdout.readline().strip() == "ready"
        run("ip", "netns", "exec", bed.peer_ns, "ping", "-c", "3", "-i", "0.2", "-W", "1",
            "-I", PEER_HOST, GMN_HOST, check=False)
        out, _ = cap.communicate(timeout=15)
    finally:
        if cap.poll() is None:
            os.kill(cap.pid, signal.SIGKILL)
            cap.wait()
    assert cap.returncode == 0, "no ESP packet with the inbound SPI seen on the GMN's veth"
    esp = bytes.fromhex(out.strip().splitlines()[-1])
    spi, seq = struct.unpack(">II", esp[:8])
    iv, sealed = esp[8:16], esp[16:]
    key = inbound.enc_key.reveal()
    plain = AESGCM(key[:16]).decrypt(key[16:] + iv, sealed, esp[:8])  # RFC 4106
    pad_len, next_header = plain[-2], plain[-1]
    inner = plain[:-2 - pad_len]
    assert spi == inbound.spi and seq >= 1
    assert next_header == 4  # IPv4 in tunnel mode
    assert inner[9] == 1 and inner[20] == 8  # ICMP echo request
    assert socket.inet_ntoa(inner[12:16]) == PEER_HOST
    assert socket.inet_ntoa(inner[16:20]) == GMN_HOST


def test_vici_rekey_replaces_sas(bed: Bed) -> None:
    server = current(bed)
    gmn_s, peer_s = bed.gmn.session(), bed.peer.session()
    child = installed(gmn_s, "kp", "net")[0]
    reqid = int(child["reqid"])
    old_in, old_out = sa_pair(server, reqid)
    adds_before = len(server.events_of("add_sa"))
    gmn_s.rekey({"child-id": child["uniqueid"]})

    def rekeyed(s: PluginServer) -> bool:
        dels = {e.message.spi for e in s.events if e.kind == "del_sa"}  # type: ignore[attr-defined]
        return old_in.spi in dels and old_out.spi in dels

    assert server.wait_for(rekeyed, 15), "old SAs were not deleted after the rekey"
    new_adds = [e.message for e in server.events_of("add_sa")[adds_before:]]
    assert {a.inbound for a in new_adds} == {True, False}  # type: ignore[attr-defined]
    new_in, new_out = sa_pair(server, reqid)
    assert {new_in.spi, new_out.spi}.isdisjoint({old_in.spi, old_out.spi})
    assert old_in.key not in server.sas and old_out.key not in server.sas
    peer_child = wait_until(lambda: installed(peer_s, "kp", "net"), 10, "peer child")[0]
    assert peer_child["spi-out"] == spi_hex(new_in.spi)
    assert peer_child["spi-in"] == spi_hex(new_out.spi)
    assert new_in.enc_key != old_in.enc_key


def test_lifetime_expiry_rekeys(bed: Bed) -> None:
    """The GMN child 'short' has rekey_time 4 s: the plugin's timer must trigger the rekey."""
    server = current(bed)
    peer_s, gmn_s = bed.peer.session(), bed.gmn.session()
    for _ in peer_s.initiate({"ike": "kp", "child": "short", "timeout": 10000}):
        pass
    child = wait_until(lambda: installed(gmn_s, "kp", "short"), 10, "short child")[0]
    reqid = int(child["reqid"])
    first_in, first_out = sa_pair(server, reqid)
    t0 = time.monotonic()
    assert first_in.lifetime is not None and first_in.lifetime.time_rekey == SHORT_REKEY_S

    def rekeyed(s: PluginServer) -> bool:
        dels = {e.message.spi for e in s.events if e.kind == "del_sa"}  # type: ignore[attr-defined]
        return first_in.spi in dels and first_out.spi in dels

    assert server.wait_for(rekeyed, SHORT_REKEY_S + 15), "no lifetime-driven rekey"
    elapsed = time.monotonic() - t0
    new_in, new_out = sa_pair(server, reqid)
    assert new_in.spi != first_in.spi and new_out.spi != first_out.spi
    assert elapsed >= SHORT_REKEY_S - 1
    assert f"lifetime soft expire of SA {spi_hex(first_in.spi)}" in bed.gmn.log() or \
        f"lifetime soft expire of SA {spi_hex(first_out.spi)}" in bed.gmn.log()
    # stop the 4-second rekey cycle before the next tests
    child = installed(gmn_s, "kp", "short")[0]
    for _ in gmn_s.terminate({"child-id": child["uniqueid"], "timeout": 5000}):
        pass
    assert server.wait_for(lambda s: not any(r.sa.reqid == reqid for r in s.sas.values()), 10)


def test_agent_expire_events(bed: Bed) -> None:
    """EXPIRE from the agent (e.g. a GPN reports a byte limit): soft rekeys, hard deletes."""
    server = current(bed)
    peer_s, gmn_s = bed.peer.session(), bed.gmn.session()
    for _ in peer_s.initiate({"ike": "kp", "child": "ext", "timeout": 10000}):
        pass
    child = wait_until(lambda: installed(gmn_s, "kp", "ext"), 10, "ext child")[0]
    reqid = int(child["reqid"])
    old_in, old_out = sa_pair(server, reqid)
    server.send_expire(old_in.spi, old_in.dst, hard=False)  # type: ignore[arg-type]

    def deleted(*spis: int) -> Any:
        return lambda s: set(spis) <= {e.message.spi for e in s.events if e.kind == "del_sa"}

    assert server.wait_for(deleted(old_in.spi, old_out.spi), 15), "soft expire did not rekey"
    assert "agent soft expire of SA " + spi_hex(old_in.spi) in bed.gmn.log()
    new_in, new_out = sa_pair(server, reqid)
    assert {new_in.spi, new_out.spi}.isdisjoint({old_in.spi, old_out.spi})
    # a hard expire makes charon delete the CHILD_SA, as a kernel's would (charon
    # 5.9.8 then recreates it: the tunnel is still wanted)
    server.send_expire(new_in.spi, new_in.dst, hard=True)  # type: ignore[arg-type]
    assert server.wait_for(deleted(new_in.spi, new_out.spi), 15), "hard expire did not delete"
    assert "agent hard expire of SA " + spi_hex(new_in.spi) in bed.gmn.log()
    wait_until(lambda: "closing expired CHILD_SA ext" in bed.gmn.log(), 5, "charon closing it")
    recreated = wait_until(lambda: installed(gmn_s, "kp", "ext"), 10, "recreated ext child")[0]
    assert recreated["spi-in"] not in (spi_hex(new_in.spi), spi_hex(old_in.spi))
    assert {k[0] for k in server.sas if k[0] in (new_in.spi, new_out.spi)} == set()
    # an expire for an SA the plugin does not know is ignored
    server.send_expire(0x12345678, new_in.dst, hard=True)  # type: ignore[arg-type]
    wait_until(lambda: "agent expire for unknown SA 12345678" in bed.gmn.log(), 5, "ignored")
    assert installed(gmn_s, "kp", "net")


def refuse_other_version_once(path: Path) -> None:
    """Play an agent that speaks protocol 2.0 for one connection."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(5)
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            reader = pp.FrameReader()
            bodies: list[bytes] = []
            while not bodies:
                bodies = reader.feed(conn.recv(4096))
            rid, hello = pp.decode(bodies[0])
            assert isinstance(hello, pp.Hello) and hello.version == pp.VERSION
            conn.sendall(pp.encode(pp.Reply(request_type=pp.MsgType.HELLO,
                                            status=pp.Status.VERSION, version=(2, 0)), rid))
            conn.recv(4096)  # the plugin closes
    finally:
        listener.close()
        path.unlink()


def test_agent_restart_gets_state_dump(bed: Bed) -> None:
    old = bed.server
    gmn_s = bed.gmn.session()

    def settled() -> bool:  # rekeyed SAs of earlier tests are gone: agent == charon
        spis = {int(c[f"spi-{d}"], 16) for c in child_sas(gmn_s, "kp").values()
                for d in ("in", "out")}
        with old._lock:
            return {k[0] for k in old.sas} == spis

    wait_until(settled, 10, "the agent's SAs to match charon's")
    before = {k: r.sa for k, r in old.sas.items()}
    assert before
    old.stop()
    wait_until(lambda: "connection to agent at" in bed.gmn.log(), 5, "plugin noticing the loss")
    # while the agent is away charon's calls fail cleanly (no hang): a rekey
    # needs get_spi, which fails at once, and the CHILD_SA stays installed
    child = installed(gmn_s, "kp", "net")[0]
    t0 = time.monotonic()
    gmn_s.rekey({"child-id": child["uniqueid"]})
    wait_until(lambda: "unable to get SPI from agent" in bed.gmn.log(), 5, "failed get_spi")
    assert time.monotonic() - t0 < 5
    assert installed(gmn_s, "kp", "net")

    # an agent speaking another major version is refused by the plugin
    refuse_other_version_once(bed.sock_path)
    wait_until(lambda: "agent speaks protocol 2.0, this plugin speaks 1.0" in bed.gmn.log(), 5,
               "the plugin refusing protocol 2.0")

    counters = {"calls": 0}

    def report(q: pp.QuerySa) -> Counters:
        counters["calls"] += 1
        return Counters(bytes=4242, packets=42, idle=1)

    new = PluginServer(bed.sock_path, counters=report).start()
    bed.server = new
    assert new.wait_for(lambda s: len(s.dumps) == 1, 10), "no state dump after reconnect"
    after = {k: r.sa for k, r in new.sas.items()}
    assert after.keys() == before.keys()
    for key, sa in after.items():
        assert sa.dump and sa.enc_key == before[key].enc_key and sa.spi == before[key].spi
    assert new.dumps[0].sa_count == len(before)
    assert new.policies
    # query_sa reaches the new agent: charon reports its counters over VICI
    child = installed(gmn_s, "kp", "net")[0]
    assert int(child["bytes-in"]) == 4242 and int(child["packets-in"]) == 42
    assert counters["calls"] > 0
    # and the tunnel keeps working with the new agent: rekey once more
    reqid = int(child["reqid"])
    old_in, _ = sa_pair(new, reqid)
    gmn_s.rekey({"child-id": child["uniqueid"]})
    assert new.wait_for(lambda s: any(e.kind == "del_sa" and e.message.spi == old_in.spi  # type: ignore[attr-defined]
                                      for e in s.events), 15)
    assert installed(bed.peer.session(), "kp", "net")


def test_calls_for_different_ike_sas_do_not_wait_for_each_other(bed: Bed) -> None:
    """An outbound add_sa of a rekey may wait for the agent (the GMN holds it until the
    data path has the new inbound SA). Another IKE SA's CHILD_SA must not wait behind
    it: the plugin once held its state lock across every request, and a GPN's failed
    tunnels were recovered one after the other."""
    server = current(bed)
    peer_s, gmn_s = bed.peer.session(), bed.gmn.session()
    run("ip", "-n", bed.peer_ns, "addr", "add", "10.91.7.1/32", "dev", "lo")
    child2 = {"esp_proposals": ["aes128gcm16-x25519"], "rekey_time": "1h", "life_time": "2h", "rand_time": "0"}
    for sess, ids in ((peer_s, ["peer2", "gmn2"]), (gmn_s, ["gmn2", "peer2"])):
        sess.load_shared({"type": "IKE", "data": bed.psk, "owners": ids})
    peer_s.load_conn({"kp2": conn_config(PEER_IP, GMN_IP, "peer2", "gmn2", {
        "net2": {**child2, "local_ts": ["10.91.7.0/24"], "remote_ts": ["10.91.8.0/24"]}})})
    gmn_s.load_conn({"kp2": conn_config(GMN_IP, PEER_IP, "gmn2", "peer2", {
        "net2": {**child2, "local_ts": ["10.91.8.0/24"], "remote_ts": ["10.91.7.0/24"]}})})
    try:
        for _ in peer_s.initiate({"ike": "kp2", "child": "net2", "timeout": 10000}):
            pass
        a = wait_until(lambda: installed(gmn_s, "kp", "net"), 10, "kp/net")[0]
        b = wait_until(lambda: installed(gmn_s, "kp2", "net2"), 10, "kp2/net2")[0]
        reqid_a, reqid_b = int(a["reqid"]), int(b["reqid"])
        assert reqid_a != reqid_b
        held: dict[str, float] = {}
        seen_b: dict[str, float] = {}

        trace: list[str] = []

        def hook(event: Any) -> None:
            msg = event.message
            trace.append(f"{time.monotonic():.3f} {event.kind} reqid={getattr(msg, 'reqid', '-')} "
                         f"in={getattr(msg, 'inbound', '-')}")
            if event.kind != "add_sa":
                return
            if msg.reqid == reqid_a and not msg.inbound and "start" not in held:
                held["start"] = time.monotonic()
                time.sleep(1.5)  # the agent takes its time with this one
                held["end"] = time.monotonic()
            elif msg.reqid == reqid_b:
                seen_b["in" if msg.inbound else "out"] = time.monotonic()

        server._on_change = hook  # type: ignore[assignment]
        gmn_s.rekey({"child-id": a["uniqueid"]})
        wait_until(lambda: "start" in held, 10, "kp/net's outbound add_sa to be held")
        # (VICI answers this only once it has walked every IKE SA, kp's too: after the hold)
        gmn_s.rekey({"child-id": b["uniqueid"]})
        wait_until(lambda: "out" in seen_b and "end" in held, 10, "both rekeys' outbound SAs")
        assert seen_b["out"] < held["end"] - 0.5, (
            "kp2's CHILD_SA waited for kp's held add_sa:\n" + "\n".join(trace))
    finally:
        server._on_change = None  # type: ignore[assignment]
        for _ in gmn_s.terminate({"ike": "kp2", "timeout": 5000}):
            pass
