"""``protego bench dataplane [--json]``: per-core ESP rates and a tunnel comparison.

* ``suites`` -- the per-core micro benchmark (:mod:`protego.bench.dataplane_micro`):
  encapsulation/decapsulation of every suite at 64/512/1400 bytes, no I/O.
* ``tunnel`` -- TCP throughput (iperf3, one stream) between two hosts through one
  IPsec tunnel (AES-GCM-128, ESP-in-UDP), measured twice in the same run on the
  same topology of fresh network namespaces::

      host A --- gateway A ==== (wan) ==== gateway B --- host B

  ``protego_gbps``: both gateways are Protego GPN data paths (``--backend userspace``:
  the userspace engine, one worker each; ``--backend xfrm``: the GPN's kernel XFRM
  backend, which needs a kernel with ESP); the hosts reach them over VXLAN, the GPN's
  tenant side, on the same veth links;
  ``libipsec_gbps``: both gateways are strongSwan charons with kernel-libipsec.
  Hosts use an MTU of 1400 in both runs (libipsec's TUN MTU), so neither side
  fragments ESP; GRO is on for the gateways' veths in both runs.
  ``ratio = protego / libipsec``.

The Protego engines get their SAs from this harness (random keys, handed over a
pipe to the gateway process; never written anywhere): the benchmark measures
the data path, not IKE. Needs root (namespaces), iperf3 and charon.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

__all__ = ["bench_dataplane", "measure_tunnel"]

CHARON = "/usr/lib/ipsec/charon"
FABRIC_A, FABRIC_B = "192.0.2.1", "192.0.2.2"
HOST_FAB_A, HOST_FAB_B = "192.0.2.101", "192.0.2.102"
WAN_A, WAN_B = "198.18.0.1", "198.18.0.2"
LAN_A, LAN_B = "10.10.1.0/24", "10.20.1.0/24"
HOST_A, HOST_B = "10.10.1.10", "10.20.1.10"
GW_A, GW_B = "10.10.1.1", "10.20.1.1"
HOST_MAC_A, HOST_MAC_B = "02:00:00:00:0a:0a", "02:00:00:00:14:0a"
GATEWAY_MAC = "02:00:00:00:00:01"
VNI = 100
MTU = 1400


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


def _nsrun(ns: str, *cmd: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout,
                          check=check)


class _Lab:
    """host A, gateway A, gateway B, host B in fresh namespaces (removed by ``close``)."""

    def __init__(self, vxlan: bool) -> None:
        tag = secrets.token_hex(3)
        self.ns = {k: f"pbd{tag}-{k}" for k in ("ha", "ga", "gb", "hb")}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.vxlan = vxlan
        self.dir = Path(f"/var/lib/protego/bench/{tag}")  # not /run: charon gets a private /run
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        ns = self.ns
        for n in ns.values():
            _ip("netns", "add", n)
            _ip("-n", n, "link", "set", "lo", "up")
        tag = ns["ha"].split("-")[0][3:]
        pairs = [("ha", "eth0", "ga", "lan0"), ("ga", "wan0", "gb", "wan0"), ("hb", "eth0", "gb", "lan0")]
        for i, (a, ia, b, ib) in enumerate(pairs):
            tmp_a, tmp_b = f"pb{tag}{i}a", f"pb{tag}{i}b"
            _ip("link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
            _ip("link", "set", tmp_a, "netns", ns[a])
            _ip("link", "set", tmp_b, "netns", ns[b])
            _ip("-n", ns[a], "link", "set", tmp_a, "name", ia)
            _ip("-n", ns[b], "link", "set", tmp_b, "name", ib)
            _ip("-n", ns[a], "link", "set", ia, "up")
            _ip("-n", ns[b], "link", "set", ib, "up")
        for gw in ("ga", "gb"):
            for ifname in ("lan0", "wan0"):
                _gro_on(ns[gw], ifname)
        _ip("-n", ns["ga"], "addr", "add", f"{WAN_A}/24", "dev", "wan0")
        _ip("-n", ns["gb"], "addr", "add", f"{WAN_B}/24", "dev", "wan0")
        for host, gw, hip, gip, fab_h, fab_g, mac, lan in (
                ("ha", "ga", HOST_A, GW_A, HOST_FAB_A, FABRIC_A, HOST_MAC_A, LAN_B),
                ("hb", "gb", HOST_B, GW_B, HOST_FAB_B, FABRIC_B, HOST_MAC_B, LAN_A)):
            if self.vxlan:
                # the GPN's tenant side: a VXLAN segment over the veth, the gateway MAC at the GPN
                _ip("-n", ns[host], "addr", "add", f"{fab_h}/24", "dev", "eth0")
                _ip("-n", ns[gw], "addr", "add", f"{fab_g}/24", "dev", "lan0")
                _ip("-n", ns[host], "link", "add", "tnet0", "address", mac, "mtu", str(MTU), "type", "vxlan",
                    "id", str(VNI), "local", fab_h, "dev", "eth0", "dstport", "4789", "nolearning")
                _ip("-n", ns[host], "link", "set", "tnet0", "up")
                _ip("-n", ns[host], "addr", "add", f"{hip}/24", "dev", "tnet0")
                _ip("-n", ns[host], "neigh", "add", gip, "lladdr", GATEWAY_MAC, "dev", "tnet0", "nud", "permanent")
                subprocess.run(["bridge", "-n", ns[host], "fdb", "append", GATEWAY_MAC, "dev", "tnet0", "dst", fab_g],
                               check=True, capture_output=True)
                _ip("-n", ns[host], "route", "add", lan, "via", gip)
                _tx_checksum_off(ns[host], "tnet0")
            else:
                _ip("-n", ns[host], "link", "set", "eth0", "mtu", str(MTU))
                _ip("-n", ns[host], "addr", "add", f"{hip}/24", "dev", "eth0")
                _ip("-n", ns[gw], "addr", "add", f"{gip}/24", "dev", "lan0")
                _ip("-n", ns[host], "route", "add", lan, "via", gip)
                _nsrun(ns[gw], "sysctl", "-qw", "net.ipv4.ip_forward=1", check=True)

    def spawn(self, node: str, cmd: list[str], stdin: bytes | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        full = dict(os.environ)
        full.update(env or {})
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[node], *cmd], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=full)
        if stdin is not None:
            assert p.stdin is not None
            p.stdin.write(stdin)
            p.stdin.close()
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for n in self.ns.values():
            _ip("netns", "del", n, check=False)
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)


def _gro_on(ns: str, ifname: str) -> None:
    """Enable GRO on a veth (it runs NAPI then): UDP datagrams of one flow reach a
    ``UDP_GRO`` socket as one super-datagram. Applied to both gateways in both runs."""
    code = ("import ctypes, fcntl, socket, struct, sys\n"
            "val = ctypes.create_string_buffer(struct.pack('II', 0x2c, 1))\n"
            "ifr = struct.pack('16sP', sys.argv[1].encode(), ctypes.addressof(val)) + bytes(16)\n"
            "fcntl.ioctl(socket.socket(), 0x8946, ifr)\n")
    _nsrun(ns, sys.executable, "-c", code, ifname, check=True)


def _tx_checksum_off(ns: str, ifname: str) -> None:
    """A userspace gateway reads VXLAN payloads as bytes: the inner TCP checksum must
    be complete (veth carries it unfinished otherwise)."""
    code = ("import ctypes, fcntl, socket, struct, sys\n"
            "val = ctypes.create_string_buffer(struct.pack('II', 0x17, 0))\n"
            "ifr = struct.pack('16sP', sys.argv[1].encode(), ctypes.addressof(val)) + bytes(16)\n"
            "fcntl.ioctl(socket.socket(), 0x8946, ifr)\n")
    _nsrun(ns, sys.executable, "-c", code, ifname, check=True)


def _iperf(lab: _Lab, seconds: float) -> float:
    from protego.errors import TestbedError
    from protego.testbed.traffic import iperf3

    try:  # a one-off server, retried until it listens
        res = iperf3(lab.ns["hb"], HOST_B, lab.ns["ha"], seconds=seconds)
    except TestbedError as exc:
        raise click.ClickException(f"iperf3 failed: {exc}") from None
    return res.receiver_bps / 1e9


def _wait_ping(lab: _Lab, timeout: float = 20) -> None:
    """Until host A reaches host B through the tunnel. ``PROTEGO_BENCH_START_S`` (default 180
    in the kernel lane, whose emulation takes tens of seconds to start a Python gateway)
    raises the limit."""
    from protego.lane import in_guest

    timeout = float(os.environ.get("PROTEGO_BENCH_START_S", 180 if in_guest() else timeout))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _nsrun(lab.ns["ha"], "ping", "-c", "1", "-W", "1", HOST_B).returncode == 0:
            return
        time.sleep(0.3)
    raise click.ClickException(f"the tunnel does not carry traffic after {timeout:.0f} s")


# ----------------------------------------------------------------------------- protego

def _sa_records() -> dict[str, list[dict[str, Any]]]:
    """Two SAs per direction of the tunnel, as the GMN would write them."""
    k_ab, k_ba = base64.b64encode(os.urandom(20)).decode(), base64.b64encode(os.urandom(20)).decode()

    def rec(spi: int, direction: str, vip: str, peer: str, key: str, local: str, remote: str) -> dict[str, Any]:
        inbound = direction == "in"
        return {"spi": f"{spi:08x}", "vip": vip, "direction": direction, "tenant": "bench", "tunnel": "t",
                "vni": VNI, "gpn": "bench", "mode": "tunnel", "encap": True,
                "src": peer if inbound else vip, "dst": vip if inbound else peer, "sport": 4500, "dport": 4500,
                "suite": "aes128gcm16", "enc_key": key, "integ_key": "", "esn": False, "replay_window": 64,
                "local_ts": [local], "remote_ts": [remote], "created": time.time()}

    return {
        "a": [rec(0x1000A, "out", WAN_A, WAN_B, k_ab, LAN_A, LAN_B), rec(0x2000B, "in", WAN_A, WAN_B, k_ba, LAN_A, LAN_B)],
        "b": [rec(0x2000B, "out", WAN_B, WAN_A, k_ba, LAN_B, LAN_A), rec(0x1000A, "in", WAN_B, WAN_A, k_ab, LAN_B, LAN_A)],
    }


def _gateway_main() -> None:
    """``python -m protego.bench.dataplane --gateway FABRIC HOST_IP HOST_MAC HOST_VTEP``:
    a Protego engine with the SAs read from stdin (JSON), until SIGTERM."""
    import ipaddress

    from protego.gpn.agent import egress_routes
    from protego.gpn.engine import Engine, EngineConfig
    from protego.gpn.records import parse_sa_record
    from protego.gpn.tenant import mac_bytes

    fabric, host_ip, host_mac, host_vtep = sys.argv[2:6]
    backend = sys.argv[6] if len(sys.argv) > 6 else "userspace"
    recs = json.loads(sys.stdin.read())
    eng: Any
    if backend == "xfrm":
        from protego.gpn.kernel import KernelConfig, KernelDataPath

        eng = KernelDataPath(KernelConfig(fabric)).start()
    else:
        eng = Engine(EngineConfig(fabric, workers=1, raw_esp=False)).start()
    sas = [parse_sa_record(r) for r in recs]
    for g in sas:
        eng.add_sa(g)
    eng.set_egress(egress_routes(sas, {}))
    eng.set_hosts({(VNI, int(ipaddress.IPv4Address(host_ip))): (mac_bytes(host_mac), host_vtep)})
    eng.sync()
    done = False

    def stop(*_: Any) -> None:
        nonlocal done
        done = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    dump = os.environ.get("PROTEGO_BENCH_STATS")
    while not done and not eng.check():
        time.sleep(0.5)
        if dump:  # diagnostics: counters only (no keys)
            st = eng.stats()
            Path(dump).write_text(json.dumps({"counters": st.counters, "drops": st.drops}))
    eng.stop()


def _protego_tunnel(seconds: float, backend: str = "userspace") -> float:
    lab = _Lab(vxlan=True)
    try:
        recs = _sa_records()
        for side, gw, fab, hip, mac, hfab in (("a", "ga", FABRIC_A, HOST_A, HOST_MAC_A, HOST_FAB_A),
                                              ("b", "gb", FABRIC_B, HOST_B, HOST_MAC_B, HOST_FAB_B)):
            lab.spawn(gw, [sys.executable, "-m", "protego.bench.dataplane", "--gateway", fab, hip, mac, hfab,
                           backend], stdin=json.dumps(recs[side]).encode())
        _wait_ping(lab)
        return _iperf(lab, seconds)
    finally:
        lab.close()


# ----------------------------------------------------------------------------- libipsec

def _libipsec_tunnel(seconds: float) -> float:
    from protego.testbed.strongswan import CharonFiles, strongswan_conf
    from protego.vici_client import ViciClient

    lab = _Lab(vxlan=False)
    psk = secrets.token_urlsafe(24).encode()
    try:
        for gw, me, peer, local, remote in (("ga", WAN_A, WAN_B, LAN_A, LAN_B), ("gb", WAN_B, WAN_A, LAN_B, LAN_A)):
            files = CharonFiles(lab.dir / gw)
            files.conf_dir.mkdir(parents=True, exist_ok=True)
            files.strongswan_conf.write_text(strongswan_conf(files, lab.dir / gw / "charon.log"))
            inner = "mount -t tmpfs -o mode=0755 tmpfs /run && exec " + CHARON
            lab.spawn(gw, ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner],
                      env={"STRONGSWAN_CONF": str(files.strongswan_conf)})
            deadline = time.monotonic() + 15
            while not files.vici_socket.exists():
                if time.monotonic() > deadline:
                    raise click.ClickException(f"charon on {gw} did not start")
                time.sleep(0.05)
            with ViciClient(files.vici_socket) as v:
                v.wait_ready(10)
                v.load_psk("bench", psk, [me, peer])
                v.load_conn("bench", {
                    "version": "2", "local_addrs": [me], "remote_addrs": [peer], "encap": "yes",
                    "proposals": ["aes128gcm16-prfsha256-ecp256"],
                    "local-1": {"auth": "psk", "id": me}, "remote-1": {"auth": "psk", "id": peer},
                    "children": {"bench": {"local_ts": [local], "remote_ts": [remote],
                                           "esp_proposals": ["aes128gcm16"]}},
                })
        with ViciClient(CharonFiles(lab.dir / "ga").vici_socket) as v:
            for _ in v.session.initiate({"child": "bench", "timeout": "10000"}):
                pass
        _wait_ping(lab)
        return _iperf(lab, seconds)
    finally:
        lab.close()


def measure_tunnel(seconds: float = 5.0, backend: str = "userspace") -> dict[str, float]:
    protego = _protego_tunnel(seconds, backend)
    libipsec = _libipsec_tunnel(seconds)
    return {"protego_gbps": round(protego, 3), "libipsec_gbps": round(libipsec, 3),
            "ratio": round(protego / libipsec, 2) if libipsec > 0 else 0.0}


@click.command("dataplane")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--seconds", type=click.FloatRange(0.05, 60), default=0.5, show_default=True,
              help="Measuring time per suite and size (micro benchmark).")
@click.option("--tunnel-seconds", type=click.FloatRange(1, 120), default=5.0, show_default=True,
              help="iperf3 duration of each tunnel run.")
@click.option("--no-tunnel", is_flag=True, help="Skip the tunnel comparison (needs root, charon, iperf3).")
@click.option("--backend", type=click.Choice(["userspace", "xfrm"]), default="userspace", show_default=True,
              help="The Protego gateways' data path in the tunnel run: the userspace engine, or kernel XFRM "
                   "(the GPN's xfrm backend; needs a kernel with ESP).")
def bench_dataplane(as_json: bool, seconds: float, tunnel_seconds: float, no_tunnel: bool, backend: str) -> None:
    """ESP encap/decap per core for every suite, and Protego vs libipsec tunnel throughput."""
    from protego.bench.dataplane_micro import format_table, run

    if backend == "xfrm" and not no_tunnel:
        from protego.xfrm import probe_kernel_esp

        probe = probe_kernel_esp()
        if not probe.kernel_esp:
            raise click.ClickException(f"--backend xfrm needs a kernel with ESP: {probe.message} "
                                       "(run it in the kernel lane: protego lane run -- ...)")
    rows = run(None, seconds=seconds)
    tunnel = None if no_tunnel else measure_tunnel(tunnel_seconds, backend)
    if as_json:
        click.echo(json.dumps({"suites": rows, "tunnel": tunnel, "backend": backend}))
        return
    click.echo(format_table(rows))
    if tunnel is not None:
        click.echo(f"\ntunnel (AES-GCM-128, TCP, one stream): Protego ({backend}) {tunnel['protego_gbps']:.3f} Gbit/s, "
                   f"libipsec {tunnel['libipsec_gbps']:.3f} Gbit/s, ratio {tunnel['ratio']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "--gateway":  # FABRIC HOST_IP HOST_MAC HOST_VTEP [BACKEND]
        _gateway_main()
    else:
        bench_dataplane()
