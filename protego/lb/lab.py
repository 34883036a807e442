"""A small GIN/GEN lab in bare network namespaces, for integration tests and
``python -m protego.lb.bench``: the real agent in the lb's namespace, etcd (also in
that namespace, reachable from the host through one veth), a fabric bridge, GPNs and
a GMN holding the VIPs on ``lo``, an internet peer and two tenant hosts on VXLAN.

Independent of the testbed (whose protego mode starts GMN/GPN agents of its own).
Everything it starts is stopped by PID; every namespace and the host veth are removed
by :meth:`Lab.close`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from protego.testbed import procs
from protego.testbed.state import ProcRecord

P = "/protego/v1/"
PY = sys.executable
VIP_A, VIP_B, VIP_C = "203.0.113.11", "203.0.113.12", "203.0.113.13"
GPN = {"gpn1": "192.0.2.21", "gpn2": "192.0.2.22"}
GMN1 = "192.0.2.11"
LB_FABRIC = "192.0.2.1"


class Lab:
    """Bare namespaces for the GIN/GEN (independent of the evolving testbed):

    * ``peer`` — the internet side: wan0 198.18.0.1/24, routes the VIPs to the lb;
    * ``lb`` — wan0 198.18.0.2/24, fab0 192.0.2.1/24, mgmt0 169.254.N.2/30 (etcd runs
      here; the host's veth ``pl<name>`` 169.254.N.1/30 lets the test reach it);
    * ``fab`` — the fabric bridge; ``gmn1`` .11, ``gpn1`` .21, ``gpn2`` .22 with the VIPs on lo;
    * ``t-acme-h1`` / ``t-globex-h1`` — tenant hosts, both 10.1.0.10/24, VXLAN VNI 1001 /
      1002 over the fabric (VTEPs .101 / .102) flooding to the lb and the GPNs.

    Everything started is stopped by PID; every namespace and the host veth are removed.
    """

    def __init__(self, prefix: str) -> None:
        if len(prefix) != 8 or not prefix.isalnum():
            raise ValueError("prefix: 8 characters, a letter and 7 hex digits (tests.conftest.unique_name)")
        self.prefix = prefix
        self.namespaces: list[str] = []
        self.host_link: str | None = None
        self.procs: list[ProcRecord] = []
        self.dir = Path(f"/tmp/protego-lbtest-{prefix}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cluster: Any = None
        self.store: Any = None
        self.agent: ProcRecord | None = None
        self.endpoints: list[str] = []

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def build(self) -> None:
        from protego.store.etcd import Etcd
        from protego.store.server import EtcdCluster

        nodes = ["peer", "lb", "fab", "gmn1", "gpn1", "gpn2", "t-acme-h1", "t-globex-h1"]
        for n in nodes:
            self.ip("netns", "add", self.ns(n))
            self.namespaces.append(self.ns(n))
            self.sh(n, "sh", "-ec", "ip link set lo up; for f in /proc/sys/net/ipv4/conf/*/rp_filter; "
                    "do echo 0 > $f; done; echo 1 > /proc/sys/net/ipv4/ip_forward")
        self.ip("-n", self.ns("fab"), "link", "add", "fab0", "type", "bridge")
        self.ip("-n", self.ns("fab"), "link", "set", "fab0", "up")

        def veth(a: str, a_if: str, b: str, b_if: str, b_addr: str | None, a_addr: str | None = None) -> None:
            self.ip("link", "add", "tmpa", "netns", self.ns(a), "type", "veth", "peer", "name", "tmpb",
                    "netns", self.ns(b))
            self.ip("-n", self.ns(a), "link", "set", "tmpa", "name", a_if)
            self.ip("-n", self.ns(b), "link", "set", "tmpb", "name", b_if)
            for node, ifn, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
                if addr:
                    self.ip("-n", self.ns(node), "addr", "add", addr, "dev", ifn)
                self.ip("-n", self.ns(node), "link", "set", ifn, "up")

        veth("peer", "wan0", "lb", "wan0", "198.18.0.2/24", "198.18.0.1/24")
        self.ip("-n", self.ns("peer"), "route", "add", "203.0.113.0/24", "via", "198.18.0.2")
        fab = {"lb": "192.0.2.1", "gmn1": GMN1, **GPN, "t-acme-h1": "192.0.2.101", "t-globex-h1": "192.0.2.102"}
        for i, (node, addr) in enumerate(fab.items()):
            veth("fab", f"p{i}", node, "fab0", f"{addr}/24")
            self.ip("-n", self.ns("fab"), "link", "set", f"p{i}", "master", "fab0")
        for node in ("gpn1", "gpn2", "gmn1"):
            for vip in (VIP_A, VIP_B, VIP_C):
                self.ip("-n", self.ns(node), "addr", "add", f"{vip}/32", "dev", "lo")
            # GPNs and GMNs answer peers from the VIP, through the lb
            self.ip("-n", self.ns(node), "route", "add", "198.18.0.0/24", "via", LB_FABRIC)
        for node, vni, vtep in (("t-acme-h1", 1001, "192.0.2.101"), ("t-globex-h1", 1002, "192.0.2.102")):
            n = self.ns(node)
            self.ip("-n", n, "link", "add", "tnet0", "type", "vxlan", "id", str(vni), "local", vtep,
                    "dstport", "4789", "dev", "fab0")
            for remote in (LB_FABRIC, *GPN.values()):
                self.ip("-n", n, "link", "set", "tnet0", "up")
                subprocess.run(["bridge", "-n", n, "fdb", "append", "00:00:00:00:00:00", "dev", "tnet0",
                                "dst", remote], check=True)
            self.ip("-n", n, "addr", "add", "10.1.0.10/24", "dev", "tnet0")
            self.ip("-n", n, "route", "add", "default", "via", "10.1.0.1")
            # the tenant gateway's MAC lives at the GEN's VTEP (see docs/lb.md)
            self.ip("-n", n, "neigh", "replace", "10.1.0.1", "lladdr", "02:00:00:00:00:01", "dev", "tnet0",
                    "nud", "permanent")
            subprocess.run(["bridge", "-n", n, "fdb", "replace", "02:00:00:00:00:01", "dev", "tnet0", "dst",
                            LB_FABRIC, "self", "permanent"], check=True)
        # management: host <-> lb, etcd inside the lb namespace
        octet = int(self.prefix[1:3], 16)
        self.host_link = f"pl{self.prefix[1:]}"
        self.ip("link", "add", self.host_link, "type", "veth", "peer", "name", "mgmt0", "netns", self.ns("lb"))
        self.ip("addr", "add", f"169.254.{octet}.1/30", "dev", self.host_link)
        self.ip("link", "set", self.host_link, "up")
        self.ip("-n", self.ns("lb"), "addr", "add", f"169.254.{octet}.2/30", "dev", "mgmt0")
        self.ip("-n", self.ns("lb"), "link", "set", "mgmt0", "up")
        self.cluster = EtcdCluster(f"{self.prefix}-etcd", str(self.dir / "etcd"), str(self.dir),
                                   members=1, client_hosts=[f"169.254.{octet}.2"], netns=self.ns("lb"))
        self.cluster.start(wait=True)
        self.endpoints = list(self.cluster.endpoints)
        self.store = Etcd(self.endpoints)

    def sh(self, node: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return procs.run_in(self.ns(node), list(cmd), check=check)

    def spawn(self, node: str, kind: str, cmd: list[str]) -> ProcRecord:
        rec = procs.spawn(node, kind, self.ns(node), cmd, self.dir / f"{node}.{kind}.{len(self.procs)}.log",
                          env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        self.procs.append(rec)
        return rec

    def close(self) -> None:
        for rec in reversed(self.procs):
            procs.stop(rec)
        if self.store is not None:
            self.store.close()
        if self.cluster is not None:
            self.cluster.destroy()
        for n in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", n], check=False)
        if self.host_link:
            subprocess.run(["ip", "link", "del", self.host_link], check=False, capture_output=True)
        if not os.environ.get("PROTEGO_LB_KEEP_LOGS"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, agent_args: tuple[str, ...] = (), responders: bool = True) -> None:
        """Register the GPNs and the GMN leader, start responders and the agent."""
        for g, addr in GPN.items():
            self.put(f"gpn/nodes/{g}", {"node": g, "fabric_addr": addr, "cores": 1, "backend": "userspace"})
        self.put("gmn/leader", {"node": "gmn1", "fabric_addr": GMN1, "since": time.time()})
        if responders:
            for g, addr in GPN.items():
                self.spawn_responder(g)
        self.start_agent(agent_args)

    def spawn_responder(self, gpn: str) -> ProcRecord:
        """The reference heartbeat responder at real-time priority (as the GPN engine's
        heartbeat thread should run: the machine is shared with other test suites)."""
        return self.spawn(gpn, "responder", [PY, "-m", "protego.lb.heartbeat_responder", "--bind", GPN[gpn],
                                             "--watch-tags", "--rt-priority", "10"])

    def start_agent(self, agent_args: tuple[str, ...] = ()) -> ProcRecord:
        cmd = [PY, "-m", "protego.lb.cli", "run", "--role", "both", "--hb-bind", LB_FABRIC,
               "--vip", "203.0.113.0/24", "--resync", "2", "--node", "lb", "--hb-rt-priority", "10",
               "--status-file", str(self.dir / "lb-status.json"), *agent_args]
        for e in self.endpoints:
            cmd += ["--etcd", e]
        self.agent = self.spawn("lb", "lb-agent", cmd)
        deadline = time.monotonic() + 15
        while self.sh("lb", "nft", "list", "table", "ip", "protego_gin", check=False).returncode != 0:
            if not procs.is_alive(self.agent):
                raise RuntimeError("lb agent exited: " + Path(self.agent.log).read_text()[-2000:])
            if time.monotonic() > deadline:
                raise RuntimeError("lb agent did not install its tables within 15 s")
            time.sleep(0.05)
        return self.agent

    def stop_agent(self) -> None:
        if self.agent is not None:
            procs.stop(self.agent)
            self.agent = None

    def status(self) -> dict[str, Any]:
        return dict(json.loads((self.dir / "lb-status.json").read_text()))

    # -- etcd
    def put(self, key: str, value: Any) -> None:
        self.store.put_json(P + key, value)

    def delete(self, key: str) -> None:
        self.store.delete(P + key)

    def health(self, gpn: str) -> dict[str, Any] | None:
        kv = self.store.get(P + f"gpn/health/{gpn}")
        return None if kv is None else kv.json()

    # -- nft
    def nft_json(self, what: str) -> dict[str, Any]:
        out = self.sh("lb", "nft", "-j", "list", *what.split())
        return dict(json.loads(out.stdout))

    def counters(self, table: str = "protego_gin") -> dict[str, int]:
        doc = self.nft_json(f"counters table ip {table}")
        return {i["counter"]["name"]: i["counter"]["packets"] for i in doc["nftables"] if "counter" in i}

    def wait_element(self, spi: int, chain_suffix: str, timeout: float = 5.0) -> float:
        """Wait until spi_in maps ``spi`` to a chain ending in ``chain_suffix``."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            r = self.sh("lb", "nft", "list", "map", "ip", "protego_gin", "spi_in", check=False)
            for line in r.stdout.replace(",", "\n").splitlines():
                if f". {spi} :" in line and line.strip().rstrip("}").strip().endswith(chain_suffix):
                    return time.monotonic() - t0
            time.sleep(0.02)
        raise AssertionError(f"SPI {spi:#x} not steered to *{chain_suffix} within {timeout}s")

    # -- traffic
    def receiver(self, node: str) -> tuple[ProcRecord, Path]:
        out = self.dir / f"recv-{node}-{len(self.procs)}.json"
        rec = self.spawn(node, "recv", [PY, "-m", "protego.lb.trafficgen", "recv", "--out", str(out),
                                        "--port", "500", "--port", "4500", "--port", "4789"])
        deadline = time.monotonic() + 10
        while not Path(str(out) + ".ready").exists():
            assert procs.is_alive(rec), f"receiver on {node} died: {Path(rec.log).read_text()[-500:]}"
            assert time.monotonic() < deadline, "receiver did not start"
            time.sleep(0.02)
        return rec, out

    def collect(self, rec: ProcRecord, out: Path) -> dict[str, Any]:
        procs.stop(rec)
        deadline = time.monotonic() + 5
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return dict(json.loads(out.read_text()))

    def send(self, node: str, streams: list[str], duration: float, count: int | None = None) -> dict[str, int]:
        cmd = [PY, "-m", "protego.lb.trafficgen", "send", "--duration", str(duration)]
        if count is not None:
            cmd += ["--count", str(count)]
        for s in streams:
            cmd += ["--stream", s]
        r = procs.run_in(self.ns(node), cmd, timeout=duration + 30)
        return dict(json.loads(r.stdout))



def steer_in(lab: Lab, vip: str, spi: int, gpn: str, tenant: str, tunnel: str = "hq") -> None:
    lab.put(f"steer/in/{vip}/{spi:08x}", {"gpn": gpn, "tenant": tenant, "tunnel": tunnel})


def steer_out(lab: Lab, tenant: str, gpn: str, vni: int, local: list[str], remote: list[str],
              rate: float = 0, tunnel: str = "hq") -> None:
    lab.put(f"steer/out/{tenant}/{tunnel}", {"gpn": gpn, "vni": vni, "local_ts": local, "remote_ts": remote,
                                             "rate_mbps": rate})


def chain_suffix(lab: Lab, gpn: str) -> str:
    """The chain suffix (slot) of a GPN's next hop, read back from our ip rules."""
    deadline = time.monotonic() + 5
    while True:
        out = lab.sh("lb", "ip", "route", "show", "table", "all").stdout
        for line in out.splitlines():
            if line.startswith(f"default via {GPN[gpn]}") and "table 70" in line:
                return "_" + str(int(line.split("table ")[1].split()[0]) - 7000)
        if time.monotonic() > deadline:
            raise AssertionError(f"no policy route for {gpn}:\n{out}")
        time.sleep(0.02)


def wait_state(lab: Lab, gpn: str, state: str, after: float, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = lab.health(gpn)
        if h and h["state"] == state and h["since"] >= after:
            return float(h["since"])
        time.sleep(0.005)
    raise AssertionError(f"{gpn} not declared {state} within {timeout}s: {lab.health(gpn)}")


