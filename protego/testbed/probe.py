"""A sequence-numbered UDP probe: which packets were lost, in which direction, and the
longest gap in the traffic.

``ping`` cannot answer these exactly: stopped by a signal, it counts the last request as
lost even when its reply is still on the way, and it does not say whether a request or its
reply was lost. The probe has two halves, each run in its own namespace:

- ``echo`` sends every datagram back and, when stopped, prints (JSON) which sequence
  numbers it saw;
- ``send`` sends one datagram every ``--interval-ms`` until stopped (SIGTERM/SIGINT) or
  ``--count`` is reached, then stops sending, waits ``--linger`` seconds for the replies
  still in flight and prints (JSON) what came back.

The Python API (:class:`UdpProbe`) starts both in a testbed's namespaces and combines the
two reports: requests lost on the way (forward), replies lost on the way back (reverse),
the longest gap between consecutive replies and the median round trip.

Payload: 8 bytes run id, 8 bytes sequence number, 8 bytes send time (ns), padding.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

HEADER = struct.Struct("!QQQ")
DEFAULT_PORT = 7878


def _compress(seqs: list[int]) -> list[list[int]]:
    """Sorted sequence numbers as [first, last] ranges (a short report for long runs)."""
    out: list[list[int]] = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def _expand(ranges: list[list[int]]) -> set[int]:
    return {s for a, b in ranges for s in range(a, b + 1)}


class _Stop:
    def __init__(self) -> None:
        self.stop = False

    def __call__(self, *_: Any) -> None:
        self.stop = True


def run_echo(port: int, bind: str) -> dict[str, Any]:
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind, port))
    seen: set[int] = set()
    runs: set[int] = set()
    print("ready", flush=True)
    while not stop.stop:
        try:
            r, _, _ = select.select([sock], [], [], 0.2)
        except InterruptedError:
            continue
        if not r:
            continue
        data, peer = sock.recvfrom(65535)
        if len(data) < HEADER.size:
            continue
        run, seq, _ = HEADER.unpack_from(data)
        runs.add(run)
        seen.add(seq)
        sock.sendto(data, peer)
    return {"received": len(seen), "seen": _compress(list(seen)), "runs": len(runs)}


def run_send(dst: str, port: int, interval_ms: float, count: int, size: int, linger: float) -> dict[str, Any]:
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    sock.connect((dst, port))
    sock.setblocking(False)
    run = int.from_bytes(os.urandom(8), "big")
    pad = b"\0" * max(0, size - HEADER.size)
    interval = interval_ms / 1000.0
    sent = 0
    replies: dict[int, float] = {}  # seq -> rtt (s)
    arrivals: list[float] = []  # monotonic time of each first reply
    send_errors = 0
    sent_at: list[float] = []  # wall-clock time of each send (to date the losses)
    start = time.monotonic()
    next_send = start
    linger_until: float | None = None

    def receive() -> None:
        while True:
            try:
                data = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP errors surface here (e.g. port unreachable): keep going
                continue
            now = time.monotonic()
            if len(data) < HEADER.size:
                continue
            r, seq, t_ns = HEADER.unpack_from(data)
            if r != run or seq in replies:
                continue
            replies[seq] = now - t_ns / 1e9
            arrivals.append(now)

    while True:
        now = time.monotonic()
        if linger_until is None and (stop.stop or (count and sent >= count)):
            linger_until = now + linger
        if linger_until is not None:
            if now >= linger_until or len(replies) == sent:
                break
            timeout = linger_until - now
        else:
            if now >= next_send:
                sent_at.append(time.time())
                try:
                    sock.send(HEADER.pack(run, sent, time.monotonic_ns()) + pad)
                except (BlockingIOError, OSError):
                    send_errors += 1  # counted as sent: the probe could not get it out
                sent += 1
                next_send += interval
                if next_send < now - 1.0:  # far behind (the process was starved): do not burst
                    next_send = now
                continue
            timeout = next_send - now
        try:
            r, _, _ = select.select([sock], [], [], max(0.0, timeout))
        except InterruptedError:
            continue
        if r:
            receive()
    missing = sorted(set(range(sent)) - set(replies))
    ranges = _compress(missing)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    rtts = sorted(replies.values())
    return {
        "sent": sent, "received": len(replies), "missing": ranges,
        # when each missing range was sent: wall-clock seconds of its first and last datagram
        "missing_at": [[round(sent_at[a], 3), round(sent_at[b], 3)] for a, b in ranges],
        "max_gap_ms": round(max(gaps) * 1000, 3) if gaps else None,
        "rtt_median_ms": round(statistics.median(rtts) * 1000, 3) if rtts else None,
        "duration_s": round(time.monotonic() - start, 3), "send_errors": send_errors,
        "interval_ms": interval_ms,
    }


@dataclass
class ProbeResult:
    sent: int
    received: int
    lost_forward: list[int] = field(default_factory=list)  # requests that never reached the echo
    lost_reverse: list[int] = field(default_factory=list)  # replies that never came back
    max_gap_ms: float | None = None
    rtt_median_ms: float | None = None
    duration_s: float = 0.0
    lost_at: dict[int, float] = field(default_factory=dict)  # lost seq -> when it was sent (wall clock)

    @property
    def lost(self) -> int:
        return self.sent - self.received

    def describe(self) -> str:
        def short(x: list[int]) -> str:
            out = []
            for a, b in _compress(x)[:8]:
                at = self.lost_at.get(a)
                when = time.strftime("%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}" if at else "?"
                out.append(f"{a}-{b} sent {when}")
            return "[" + ", ".join(out) + "]"
        return (f"{self.lost} of {self.sent} lost (forward {short(self.lost_forward)}, "
                f"reverse {short(self.lost_reverse)}), max gap {self.max_gap_ms} ms")


def _lost_at(snd: dict[str, Any]) -> dict[int, float]:
    """Every lost sequence number -> when it was sent (the sender dates its missing ranges
    by their ends; inside a range, interpolated)."""
    out: dict[int, float] = {}
    for (a, b), (ta, tb) in zip(snd.get("missing", []), snd.get("missing_at", [])):
        for s in range(a, b + 1):
            out[s] = ta + (tb - ta) * (s - a) / (b - a) if b > a else ta
    return out


class UdpProbe:
    """A running probe between two namespaces: start it, do something, :meth:`stop` it."""

    def __init__(self, src_ns: str, dst_ns: str, dst: str, port: int = DEFAULT_PORT,
                 interval_ms: float = 10.0, size: int = 64, linger: float = 1.0,
                 prefix: list[str] | None = None) -> None:
        """``prefix``: before both commands (e.g. ``taskset -c 1``)."""
        py = sys.executable
        pre = list(prefix or [])
        self.echo = subprocess.Popen(
            [*pre, "ip", "netns", "exec", dst_ns, py, "-m", "protego.testbed.probe", "echo", "--port", str(port),
             "--bind", dst],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = self.echo.stdout.readline() if self.echo.stdout else ""
            if line.strip() != "ready":
                err = self.echo.stderr.read() if self.echo.stderr else ""
                raise RuntimeError(f"probe echo in {dst_ns} did not start: {line!r} {err.strip()}")
            self.sender = subprocess.Popen(
                [*pre, "ip", "netns", "exec", src_ns, py, "-m", "protego.testbed.probe", "send", "--dst", dst,
                 "--port", str(port), "--interval-ms", str(interval_ms), "--size", str(size),
                 "--linger", str(linger)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except BaseException:
            self.echo.kill()
            self.echo.wait()
            raise
        self._result: ProbeResult | None = None

    def stop(self) -> ProbeResult:
        if self._result is not None:
            return self._result
        try:
            self.sender.send_signal(signal.SIGTERM)
            out, err = self.sender.communicate(timeout=30)
            if self.sender.returncode != 0:
                raise RuntimeError(f"probe sender failed ({self.sender.returncode}): {err.strip()}")
            snd = json.loads(out)
        finally:
            self.echo.send_signal(signal.SIGTERM)
            eout, _ = self.echo.communicate(timeout=10)
        echo = json.loads(eout.splitlines()[-1])
        missing = sorted(_expand(snd["missing"]))
        seen = _expand(echo["seen"])
        self._result = ProbeResult(
            sent=snd["sent"], received=snd["received"],
            lost_forward=[s for s in missing if s not in seen],
            lost_reverse=[s for s in missing if s in seen],
            max_gap_ms=snd["max_gap_ms"], rtt_median_ms=snd["rtt_median_ms"], duration_s=snd["duration_s"],
            lost_at=_lost_at(snd))
        return self._result

    def __enter__(self) -> UdpProbe:
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in (getattr(self, "sender", None), self.echo):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m protego.testbed.probe", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo", help="echo datagrams back; print the sequence numbers seen when stopped")
    e.add_argument("--port", type=int, default=DEFAULT_PORT)
    e.add_argument("--bind", default="0.0.0.0")
    s = sub.add_parser("send", help="send numbered datagrams until stopped; print what came back")
    s.add_argument("--dst", required=True)
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--interval-ms", type=float, default=10.0)
    s.add_argument("--count", type=int, default=0, help="stop after this many (0: until signalled)")
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--linger", type=float, default=1.0, help="seconds to wait for replies after the last send")
    a = ap.parse_args(argv)
    if a.cmd == "echo":
        res = run_echo(a.port, a.bind)
    else:
        if a.interval_ms <= 0 or a.size < HEADER.size or a.linger < 0:
            ap.error(f"--interval-ms must be > 0, --size >= {HEADER.size}, --linger >= 0")
        res = run_send(a.dst, a.port, a.interval_ms, a.count, a.size, a.linger)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
