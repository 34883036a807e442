"""Traffic between testbed hosts: ping and iperf3, run inside the namespaces.

Results come from machine-readable output only: iperf3's ``-J`` JSON and the
kernel's per-namespace ``/proc/net/snmp`` counters; ping is judged by its exit
status and the ICMP counters.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass

from protego.errors import TestbedError


@dataclass(frozen=True)
class PingResult:
    sent: int
    received: int
    rtt_ms: float | None  # average

    @property
    def lost(self) -> int:
        return self.sent - self.received


_RTT = re.compile(r"= [\d.]+/([\d.]+)/")
_RECV = re.compile(r"(\d+) packets transmitted, (\d+) received")


def ping(netns: str, dst: str, count: int = 5, interval: float = 0.2, timeout: float = 2.0) -> PingResult:
    limit = count * interval + timeout + 10
    try:
        res = subprocess.run(
            ["ip", "netns", "exec", netns, "ping", "-n", "-q", "-c", str(count), "-i", str(interval),
             "-W", str(timeout), dst],
            capture_output=True, text=True, timeout=limit,
        )
    except subprocess.TimeoutExpired:
        raise TestbedError(f"ping {netns} -> {dst}: no result within {limit:.0f} s") from None
    m = _RECV.search(res.stdout)
    sent, received = (int(m.group(1)), int(m.group(2))) if m else (count, 0)
    r = _RTT.search(res.stdout)
    return PingResult(sent, received, float(r.group(1)) if r else None)


def icmp_counters(netns: str) -> dict[str, int]:
    """The namespace's ICMP counters (``InEchos``, ``OutEchoReps``...) from /proc/net/snmp."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "cat", "/proc/net/snmp"], capture_output=True, text=True, check=True
    ).stdout
    lines = [line.split() for line in out.splitlines() if line.startswith("Icmp:")]
    names, values = lines[0][1:], lines[1][1:]
    return {n: int(v) for n, v in zip(names, values, strict=True)}


@dataclass(frozen=True)
class IperfResult:
    sender_bps: float
    receiver_bps: float
    retransmits: int

    @property
    def gbps(self) -> float:
        return self.receiver_bps / 1e9


def iperf3(
    server_ns: str, server_addr: str, client_ns: str, seconds: float = 5.0, reverse: bool = False,
    port: int = 5201, udp_bps: float | None = None,
) -> IperfResult:
    """One iperf3 test from ``client_ns`` to a one-off server in ``server_ns`` (``-R``: server sends)."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server_addr, "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        cmd = ["ip", "netns", "exec", client_ns, "iperf3", "-c", server_addr, "-p", str(port), "-J",
               "-t", str(seconds), "--connect-timeout", "3000"]
        if reverse:
            cmd.append("-R")
        if udp_bps is not None:
            cmd += ["-u", "-b", str(int(udp_bps))]
        deadline = time.monotonic() + 10
        while True:
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                raise TestbedError(f"iperf3 {client_ns} -> {server_addr}: no result within "
                                   f"{seconds + 30:.0f} s (a {seconds:.0f} s test)") from None
            try:
                doc = json.loads(res.stdout)
            except ValueError:
                doc = {"error": res.stderr.strip() or "no output"}
            err = doc.get("error")
            if not err:
                break
            if "connect" in err and time.monotonic() < deadline and server.poll() is None:
                time.sleep(0.1)  # server not listening yet
                continue
            raise TestbedError(f"iperf3 {client_ns} -> {server_addr}: {err}")
        end = doc["end"]
        if udp_bps is not None:
            s = end["sum"]
            return IperfResult(s["bits_per_second"], s["bits_per_second"], 0)
        return IperfResult(
            end["sum_sent"]["bits_per_second"], end["sum_received"]["bits_per_second"],
            int(end["sum_sent"].get("retransmits", 0)),
        )
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if server.stderr is not None:
            server.stderr.close()


class Iperf3Stream:
    """An iperf3 TCP test running in the background (load while something else happens).

    ``bitrate`` caps it (bits/s; 0: as fast as it goes). :meth:`result` waits for the end
    and returns the totals; the server is a one-off (``-1``) and always stopped."""

    def __init__(self, server_ns: str, server_addr: str, client_ns: str, seconds: float,
                 bitrate: float = 0, port: int = 5201, reverse: bool = False) -> None:
        self.seconds = seconds
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server_addr, "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        cmd = ["ip", "netns", "exec", client_ns, "iperf3", "-c", server_addr, "-p", str(port), "-J",
               "-t", str(seconds), "--connect-timeout", "3000"]
        if bitrate:
            cmd += ["-b", str(int(bitrate))]
        if reverse:
            cmd.append("-R")
        time.sleep(0.3)  # the server listens
        self.client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)

    def result(self) -> IperfResult:
        try:
            out, err = self.client.communicate(timeout=self.seconds + 30)
            try:
                doc = json.loads(out)
            except ValueError:
                doc = {"error": err.strip() or "no output"}
            if doc.get("error"):
                raise TestbedError(f"iperf3: {doc['error']}")
            end = doc["end"]
            return IperfResult(end["sum_sent"]["bits_per_second"], end["sum_received"]["bits_per_second"],
                               int(end["sum_sent"].get("retransmits", 0)))
        finally:
            self.close()

    def close(self) -> None:
        for p in (self.client, self.server):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
