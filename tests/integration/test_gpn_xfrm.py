"""The GPN's xfrm backend against a real kernel with ESP (the kernel lane).

A peer namespace does kernel ESP with ``ip xfrm`` (the SAs' other halves), the GPN
namespace runs the backend (``tests/integration/xfrm_driver.py``, driven over a pipe
with the same calls the GPN agent makes), two tenant hosts with the SAME prefix sit on
VXLAN behind it. Shown here: both tenants ping through ESP-in-UDP and raw ESP both
ways and stay apart; a make-before-break switch to new SAs loses nothing; counters;
the read-back repairs what somebody else removed and never re-adds an outbound SA;
heartbeats stop when the kernel path is broken (a firewall drops ESP-in-UDP) and come
back; removal leaves no state, policy or device behind.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until

pytestmark = [pytest.mark.root, pytest.mark.kernel]

ROOT = Path(__file__).resolve().parents[2]
PEER, GPN_INET = "198.18.1.1", "198.18.1.254"
FABRIC = "192.0.2.21"
GATEWAY_MAC = "02:00:00:00:00:01"


@dataclass
class Tunnel:
    tenant: str
    vni: int
    vip: str
    site_net: str
    site_addr: str
    host_mac: str
    vtep: str
    suite: str
    encap: bool
    reqid: int
    esn: bool = False
    spi_in: int = 0
    spi_out: int = 0
    keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # "in/<spi>" -> (enc, integ)
    made: dict[str, tuple[str, bool]] = field(default_factory=dict)  # "in/<spi>" -> (suite, esn) it was made with


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res


SUITES = {  # suite -> (encryption key bytes incl. salt, integrity key bytes, ip xfrm's names)
    "aes128gcm16": (20, 0, "rfc4106(gcm(aes))"), "aes256gcm16": (36, 0, "rfc4106(gcm(aes))"),
    "aes128-sha1": (16, 20, "hmac(sha1)"), "aes256-sha1": (32, 20, "hmac(sha1)"),
    "aes128-sha256": (16, 32, "hmac(sha256)"), "aes256-sha256": (32, 32, "hmac(sha256)"),
}


def _keys(suite: str) -> tuple[bytes, bytes]:
    enc, integ, _name = SUITES[suite]
    return os.urandom(enc), os.urandom(integ)


def _ipx_alg(suite: str, enc: bytes, integ: bytes) -> list[str]:
    _e, _i, name = SUITES[suite]
    if "gcm" in suite:
        return ["aead", name, "0x" + enc.hex(), "128"]
    return ["enc", "cbc(aes)", "0x" + enc.hex(), "auth-trunc", name, "0x" + integ.hex(),
            "96" if "sha1" in suite else "128"]


class Bed:
    """P (peer, kernel ESP) -- G (GPN, xfrm backend) -- fabric bridge -- H1, H2 (tenant hosts)."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns = {k: f"px{tag}-{k}" for k in ("p", "g", "f", "h1", "h2")}
        self.procs: list[subprocess.Popen[str]] = []
        self.driver: subprocess.Popen[str] | None = None
        self.tunnels = [
            Tunnel("acme", 1001, "203.0.113.11", "10.201.0.0/24", "10.201.0.1", "02:00:00:e9:00:0a",
                   "192.0.2.101", "aes128gcm16", True, 1),
            Tunnel("globex", 1002, "203.0.113.12", "10.202.0.0/24", "10.202.0.1", "02:00:00:ea:00:0a",
                   "192.0.2.102", "aes256-sha256", False, 2),
        ]
        self.host_ns = {"acme": self.ns["h1"], "globex": self.ns["h2"]}

    # -------------------------------------------------------------- topology
    def build(self) -> None:
        n = self.ns
        for name in n.values():
            _sh("ip", "netns", "add", name)
            _sh("ip", "-n", name, "link", "set", "lo", "up")
        _sh("ip", "link", "add", "p0", "netns", n["p"], "type", "veth", "peer", "name", "inet0", "netns", n["g"])
        _sh("ip", "-n", n["p"], "addr", "add", f"{PEER}/24", "dev", "p0")
        _sh("ip", "-n", n["g"], "addr", "add", f"{GPN_INET}/24", "dev", "inet0")
        for ns, dev in ((n["p"], "p0"), (n["g"], "inet0")):
            _sh("ip", "-n", ns, "link", "set", dev, "up")
        _sh("ip", "-n", n["f"], "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", n["f"], "link", "set", "br0", "up")
        for node, addr in (("g", FABRIC), ("h1", "192.0.2.101"), ("h2", "192.0.2.102")):
            _sh("ip", "link", "add", f"f-{node}", "netns", n["f"], "type", "veth", "peer", "name", "fab0",
                "netns", n[node])
            _sh("ip", "-n", n["f"], "link", "set", f"f-{node}", "master", "br0", "up")
            _sh("ip", "-n", n[node], "addr", "add", f"{addr}/24", "dev", "fab0")
            _sh("ip", "-n", n[node], "link", "set", "fab0", "up")
        for t in self.tunnels:
            h = self.host_ns[t.tenant]
            _sh("ip", "-n", h, "link", "add", "tnet0", "type", "vxlan", "id", str(t.vni), "local", t.vtep,
                "dstport", "4789")
            _sh("ip", "-n", h, "link", "set", "tnet0", "address", t.host_mac, "up")
            _sh("ip", "-n", h, "addr", "add", "10.1.0.10/24", "dev", "tnet0")
            _sh("ip", "-n", h, "route", "add", "default", "via", "10.1.0.1")
            _sh("ip", "-n", h, "neigh", "add", "10.1.0.1", "lladdr", GATEWAY_MAC, "dev", "tnet0", "nud", "permanent")
            _sh("bridge", "-n", h, "fdb", "add", GATEWAY_MAC, "dev", "tnet0", "dst", FABRIC, "self", "permanent")
            _sh("ip", "-n", n["g"], "addr", "add", f"{t.vip}/32", "dev", "lo")
            _sh("ip", "-n", n["p"], "addr", "add", f"{t.site_addr}/32", "dev", "lo")
        _sh("ip", "-n", n["p"], "route", "add", "10.1.0.0/24", "via", GPN_INET)
        _sh("ip", "-n", n["p"], "route", "add", "203.0.113.0/24", "via", GPN_INET)
        # the peer's ESP-in-UDP socket (what charon opens on a real peer)
        encap = ("import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                 "s.bind(('0.0.0.0',4500))\ns.setsockopt(socket.IPPROTO_UDP,100,2)\ntime.sleep(1e6)\n")
        self.procs.append(subprocess.Popen(["ip", "netns", "exec", n["p"], sys.executable, "-c", encap],
                                           start_new_session=True))
        self.driver = subprocess.Popen(
            ["ip", "netns", "exec", n["g"], sys.executable, "-m", "tests.integration.xfrm_driver",
             "--fabric", FABRIC], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
            start_new_session=True)
        assert self.driver.stdout is not None
        first = json.loads(self.driver.stdout.readline() or "{}")
        assert first.get("started"), f"the xfrm driver did not start: {first}"

    def close(self) -> None:
        if self.driver is not None and self.driver.poll() is None:
            try:
                self.call("stop")
            except (AssertionError, OSError, ValueError):
                pass
            try:
                self.driver.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.driver.pid, signal.SIGKILL)
                self.driver.wait()
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(10)
        for name in reversed(list(self.ns.values())):
            _sh("ip", "netns", "del", name, check=False)

    # -------------------------------------------------------------- driver
    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.driver is not None and self.driver.stdin is not None and self.driver.stdout is not None
        self.driver.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.driver.stdin.flush()
        out = json.loads(self.driver.stdout.readline() or '{"error": "driver gone"}')
        assert "error" not in out, f"{op}: {out['error']}"
        return out

    def record(self, t: Tunnel, direction: str, spi: int) -> dict[str, Any]:
        enc, integ = t.keys[f"{direction}/{spi:08x}"]
        suite, esn = t.made[f"{direction}/{spi:08x}"]
        inbound = direction == "in"
        return {
            "spi": f"{spi:08x}", "vip": t.vip, "direction": direction, "tenant": t.tenant, "tunnel": "hq",
            "vni": t.vni, "gpn": "gpn1", "mode": "tunnel", "encap": t.encap,
            "src": PEER if inbound else t.vip, "dst": t.vip if inbound else PEER, "sport": 4500, "dport": 4500,
            "suite": suite, "enc_key": base64.b64encode(enc).decode(),
            "integ_key": base64.b64encode(integ).decode(), "esn": esn, "replay_window": 64,
            "local_ts": ["10.1.0.0/24"], "remote_ts": [t.site_net], "created": time.time()}

    # -------------------------------------------------------------- SAs on both sides
    def new_sas(self, t: Tunnel) -> tuple[int, int]:
        """A new inbound/outbound pair for ``t``, in the order IKE and the GMN give them:
        the GPN installs both (the GMN holds charon until the GPN acknowledged), then the
        peer installs its own and sends on the new SA at once, as a rekeying strongSwan
        does (its old outbound state goes)."""
        spi_in, spi_out = secrets.randbelow(1 << 30) | 0x40000000, secrets.randbelow(1 << 30) | 0x40000000
        p = self.ns["p"]
        for direction, spi in (("in", spi_in), ("out", spi_out)):
            t.keys[f"{direction}/{spi:08x}"] = _keys(t.suite)
            t.made[f"{direction}/{spi:08x}"] = (t.suite, t.esn)
            self.call("add", rec=self.record(t, direction, spi))
        self.call("sync")
        for direction, spi in (("out", spi_out), ("in", spi_in)):  # the peer's inbound first
            enc, integ = t.keys[f"{direction}/{spi:08x}"]
            src, dst = (PEER, t.vip) if direction == "in" else (t.vip, PEER)
            encap = ["encap", "espinudp", "4500", "4500", "0.0.0.0"] if t.encap else []
            replay = ["replay-window", "64", "flag", "esn"] if t.esn else ["replay-window", "32"]
            _sh("ip", "-n", p, "xfrm", "state", "add", "src", src, "dst", dst, "proto", "esp", "spi", hex(spi),
                "reqid", str(t.reqid), "mode", "tunnel", *_ipx_alg(t.suite, enc, integ), *replay, *encap)
        if t.spi_in:
            _sh("ip", "-n", p, "xfrm", "state", "delete", "src", PEER, "dst", t.vip, "proto", "esp",
                "spi", hex(t.spi_in), check=False)
        pol = ["tmpl", "src", PEER, "dst", t.vip, "proto", "esp", "reqid", str(t.reqid), "mode", "tunnel"]
        _sh("ip", "-n", p, "xfrm", "policy", "update", "src", t.site_net, "dst", "10.1.0.0/24", "dir", "out", *pol)
        rpol = ["tmpl", "src", t.vip, "dst", PEER, "proto", "esp", "reqid", str(t.reqid), "mode", "tunnel"]
        for d in ("in", "fwd"):
            _sh("ip", "-n", p, "xfrm", "policy", "update", "src", "10.1.0.0/24", "dst", t.site_net, "dir", d, *rpol)
        old = (t.spi_in, t.spi_out)
        t.spi_in, t.spi_out = spi_in, spi_out
        return old

    def egress(self) -> None:
        def rng(net: str) -> list[list[int]]:
            import ipaddress
            n = ipaddress.IPv4Network(net)
            return [[int(n.network_address), int(n.broadcast_address)]]
        self.call("egress", routes=[[t.vni, rng("10.1.0.0/24"), rng(t.site_net), t.spi_out] for t in self.tunnels])

    def hosts(self) -> None:
        self.call("hosts", hosts=[[t.vni, "10.1.0.10", t.host_mac, t.vtep] for t in self.tunnels])

    # -------------------------------------------------------------- traffic
    def ping(self, ns: str, dst: str, count: int = 5, src: str | None = None, interval: float = 0.2) -> tuple[int, int]:
        cmd = ["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2"]
        if src:
            cmd += ["-I", src]
        out = subprocess.run([*cmd, dst], capture_output=True, text=True, timeout=count * interval + 30).stdout
        for line in out.splitlines():
            if "packets transmitted" in line:
                parts = line.split()
                return int(parts[0]), int(parts[3])
        return count, 0

    def echo_requests(self, ns: str) -> int:
        snmp = _sh("ip", "netns", "exec", ns, "cat", "/proc/net/snmp").stdout.splitlines()
        icmp = [line.split() for line in snmp if line.startswith("Icmp:")]
        return int(dict(zip(icmp[0][1:], icmp[1][1:], strict=True))["InEchos"])

    def probe(self, ns: str, addr: str, port: int = 7471) -> str:
        """One heartbeat probe from ``ns``: "answered", "refused" or "silent"."""
        script = (
            "import socket,sys,time\nfrom protego.lb import heartbeat as hb\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(1.0)\n"
            f"s.connect(('{addr}',{port}))\n"
            "m=hb.Message(hb.PROBE,7,time.monotonic_ns())\n"
            "try:\n s.send(hb.pack(m)); d=s.recv(100); print('answered' if hb.unpack(d).seq==7 else 'bad')\n"
            "except ConnectionRefusedError: print('refused')\nexcept TimeoutError: print('silent')\n")
        res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", script], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
        return res.stdout.strip() or res.stderr.strip()


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    b = Bed()
    try:
        b.build()
        for t in b.tunnels:
            b.new_sas(t)
        b.hosts()
        b.egress()
        b.call("sync")
        yield b
    finally:
        b.close()


def test_both_tenants_on_the_same_prefix_pass_traffic_both_ways_and_stay_apart(bed: Bed) -> None:
    for t in bed.tunnels:
        other = next(o for o in bed.tunnels if o is not t)
        before = bed.echo_requests(bed.host_ns[other.tenant])
        sent, got = bed.ping(bed.ns["p"], "10.1.0.10", src=t.site_addr)
        assert (sent, got) == (5, 5), f"{t.tenant}: site -> tenant host {got}/{sent}"
        sent, got = bed.ping(bed.host_ns[t.tenant], t.site_addr)
        assert (sent, got) == (5, 5), f"{t.tenant}: tenant host -> site {got}/{sent}"
        assert bed.echo_requests(bed.host_ns[other.tenant]) == before, f"{t.tenant}'s echoes reached {other.tenant}"
    st = bed.call("stats")
    for t in bed.tunnels:
        pk_in = st["sas"][f"in/{t.spi_in:08x}"][0]
        pk_out = st["sas"][f"out/{t.spi_out:08x}"][0]
        assert pk_in >= 10 and pk_out >= 10, (t.tenant, st["sas"])  # 5 requests + 5 replies each way
        assert st["first"][f"in/{t.spi_in:08x}"] > 0


def test_tcp_both_ways_through_the_kernel(bed: Bed) -> None:
    from protego.testbed.traffic import iperf3

    t = bed.tunnels[0]
    for reverse in (False, True):  # tenant host -> site, then site -> tenant host
        res = iperf3(bed.ns["p"], t.site_addr, bed.host_ns[t.tenant], seconds=2.0, reverse=reverse)
        assert res.receiver_bps > 1e6, ("reverse" if reverse else "forward", res)


def test_make_before_break_switch_to_new_sas_loses_nothing(bed: Bed) -> None:
    """As a migration or rekey does: the new SAs are added, the outbound switch is one
    policy update, the old SAs go last; a ping every 20 ms both ways loses nothing."""
    t = bed.tunnels[0]
    h = bed.host_ns[t.tenant]
    pings = [subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-n", "-D", "-O", "-i", "0.02", "-c", "150", "-W", "2",
                               *(["-I", t.site_addr] if ns == bed.ns["p"] else []), dst],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
             for ns, dst in ((h, t.site_addr), (bed.ns["p"], "10.1.0.10"))]
    time.sleep(0.7)
    marks = [("start", time.time())]
    old_in, old_out = bed.new_sas(t)
    marks.append(("new SAs", time.time()))
    bed.call("sync")
    bed.egress()
    bed.call("sync")
    marks.append(("switched", time.time()))
    time.sleep(0.5)
    for direction, spi in (("in", old_in), ("out", old_out)):
        bed.call("remove", rec=bed.record(t, direction, spi))
    bed.call("sync")
    marks.append(("old removed", time.time()))
    _sh("ip", "-n", bed.ns["p"], "xfrm", "state", "delete", "src", t.vip, "dst", PEER, "proto", "esp",
        "spi", hex(old_out), check=False)
    for p in pings:
        out, _ = p.communicate(timeout=60)
        line = next(x for x in out.splitlines() if "packets transmitted" in x)
        lost = [x for x in out.splitlines() if "no answer" in x]
        assert line.split()[0] == line.split()[3], f"{line}; {marks}; {lost[:3]} .. {lost[-1:]}"
    st = bed.call("stats")
    assert f"out/{old_out:08x}" not in st["sas"] and st["sas"][f"out/{t.spi_out:08x}"][0] > 0


def test_every_suite_with_and_without_esn_carries_traffic_both_ways(bed: Bed) -> None:
    """AES-GCM-128/256 and AES-CBC-128/256 with HMAC-SHA1-96 or HMAC-SHA-256-128, with and
    without ESN, over raw ESP (globex): each a rekey to new SAs of that suite."""
    t = bed.tunnels[1]
    kept = (t.suite, t.esn)
    try:
        for i, suite in enumerate(SUITES):
            t.suite, t.esn = suite, bool(i % 2)
            old_in, old_out = bed.new_sas(t)
            bed.egress()
            bed.call("sync")
            for direction, spi in (("in", old_in), ("out", old_out)):
                bed.call("remove", rec=bed.record(t, direction, spi))
            bed.call("sync")
            state = _sh("ip", "-n", bed.ns["g"], "xfrm", "state").stdout
            # only this tunnel's new SAs may carry the ESN flag ("anti-replay esn context" is
            # shown for every state with a window above 32)
            assert bool(re.search(r"flag [a-z-]*\besn\b", state)) == t.esn, state
            assert bed.ping(bed.host_ns[t.tenant], t.site_addr, count=2) == (2, 2), (suite, t.esn)
            assert bed.ping(bed.ns["p"], "10.1.0.10", count=2, src=t.site_addr) == (2, 2), (suite, t.esn)
    finally:
        t.suite, t.esn = kept
        old_in, old_out = bed.new_sas(t)
        bed.egress()
        for direction, spi in (("in", old_in), ("out", old_out)):
            bed.call("remove", rec=bed.record(t, direction, spi))
        bed.call("sync")


def test_the_read_back_repairs_policies_and_devices_and_never_re_adds_an_outbound_sa(bed: Bed) -> None:
    t = bed.tunnels[1]
    g = bed.ns["g"]
    if_id = hex(0x50000000 | t.vni)
    _sh("ip", "-n", g, "xfrm", "policy", "delete", "src", t.site_net, "dst", "10.1.0.0/24", "dir", "fwd",
        "if_id", if_id)
    _sh("ip", "-n", g, "link", "del", f"pgm{t.vni}")
    assert bed.ping(bed.ns["p"], "10.1.0.10", count=2, src=t.site_addr)[1] == 0  # broken
    repairs = bed.call("verify")["repairs"]
    assert repairs >= 1
    assert bed.ping(bed.ns["p"], "10.1.0.10", count=3, src=t.site_addr) == (3, 3)
    assert bed.ping(bed.host_ns[t.tenant], t.site_addr, count=3) == (3, 3)
    # an outbound state flushed under the backend: gone for good, reported for a rekey
    _sh("ip", "-n", g, "xfrm", "state", "delete", "src", t.vip, "dst", PEER, "proto", "esp", "spi", hex(t.spi_out))
    bed.call("verify")
    assert f"src {t.vip} dst {PEER}" not in _sh("ip", "-n", g, "xfrm", "state").stdout
    assert f"out/{t.spi_out:08x}" in bed.call("stats")["rekey"]
    # a rekey brings the tunnel back
    old_in, old_out = bed.new_sas(t)
    bed.egress()
    bed.call("sync")
    for direction, spi in (("in", old_in), ("out", old_out)):
        bed.call("remove", rec=bed.record(t, direction, spi))
    bed.call("sync")
    assert bed.ping(bed.host_ns[t.tenant], t.site_addr, count=3) == (3, 3)


def test_heartbeats_stop_while_the_kernel_path_is_broken(bed: Bed) -> None:
    """A firewall in the GPN drops ESP-in-UDP: the canary stops coming back, the heartbeat
    socket closes (probes are refused); the rule goes, heartbeats come back."""
    probe_ns = bed.ns["h1"]
    wait_until(lambda: bed.probe(probe_ns, FABRIC) == "answered", 10, "the GPN answering heartbeats")
    g = bed.ns["g"]
    _sh("ip", "netns", "exec", g, "nft", "add table inet pxbreak; add chain inet pxbreak in "
        "{ type filter hook input priority 0; }; add rule inet pxbreak in udp dport 4500 drop")
    try:
        t0 = time.monotonic()
        wait_until(lambda: bed.call("health")["broken"], 10, "the backend noticing", step=0.05)
        # three lost canaries at 100 ms, plus the slowness of software emulation
        assert time.monotonic() - t0 < 3.0
        assert "canary" in bed.call("health")["broken"]
        assert bed.probe(probe_ns, FABRIC) == "refused"
    finally:
        _sh("ip", "netns", "exec", g, "nft", "delete table inet pxbreak")
    wait_until(lambda: bed.probe(probe_ns, FABRIC) == "answered", 10, "heartbeats answered again")
    assert bed.call("health")["broken"] is None
    assert bed.call("stats")["counters"]["heartbeats_stopped"] >= 1


def test_removal_leaves_no_state_policy_or_device(bed: Bed) -> None:
    for t in bed.tunnels:
        for direction, spi in (("in", t.spi_in), ("out", t.spi_out)):
            bed.call("remove", rec=bed.record(t, direction, spi))
    bed.call("egress", routes=[])
    bed.call("hosts", hosts=[])
    bed.call("sync")
    g = bed.ns["g"]
    assert _sh("ip", "-n", g, "xfrm", "state").stdout.strip() == ""
    assert _sh("ip", "-n", g, "xfrm", "policy").stdout.strip() == ""
    links = _sh("ip", "-n", g, "-o", "link").stdout
    # pgc0 is the ESP canary's link, there while the backend runs
    assert not [line for line in links.splitlines() if ": pg" in line and ": pgc0@" not in line], links
    # heartbeats go on: a GPN without tunnels is healthy
    assert bed.probe(bed.ns["h1"], FABRIC) == "answered"
