"""Synthetic traffic for GIN/GEN tests and benchmarks (no crypto: only headers matter).

``send`` paces one or more streams from one process::

    python -m protego.lb.trafficgen send --stream esp:203.0.113.11:0x1234:20000 \\
        --stream udp:203.0.113.11:0x1235:1000:1000 --duration 3

stream = ``kind:dst:key:pps[:size]``; kinds: ``esp`` (IP protocol 50, payload SPI +
sequence number), ``udp`` (ESP-in-UDP to port 4500, same payload), ``ike`` (UDP
``key`` = port 500 or 4500; 4500 gets the zero non-ESP marker), ``keepalive``
(one 0xFF byte to 4500), ``plain`` (UDP to port ``key``: stream id + sequence,
e.g. tenant traffic through a VXLAN device). ``size`` is the IP packet length.
Sequence numbers start at 1. With ``--count`` each stream stops after that many.

``recv`` counts what arrives in a namespace until SIGTERM, then writes JSON:
per stream (``esp:<spi>``, ``udp:<spi>``, ``ike:<port>``, ``vxlan:<vni>:<inner dst>``)
the packets, IP bytes, distinct sequence numbers as ranges, and bytes per 100 ms bin.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

ESP = 50


@dataclass
class Stream:
    kind: str
    dst: str
    key: int
    pps: float
    size: int = 100
    sent: int = 0


def parse_stream(text: str) -> Stream:
    parts = text.split(":")
    if len(parts) not in (4, 5):
        raise ValueError(f"stream {text!r}: kind:dst:key:pps[:size]")
    s = Stream(parts[0], parts[1], int(parts[2], 0), float(parts[3]))
    if len(parts) == 5:
        s.size = int(parts[4])
    return s


def payload(s: Stream, seq: int) -> tuple[bytes, int]:
    """(bytes to send, destination port or 0 for raw ESP)."""
    if s.kind == "esp":
        body = struct.pack("!II", s.key, seq)
        return body + b"\0" * max(0, s.size - 20 - len(body)), 0
    if s.kind == "udp":
        body = struct.pack("!II", s.key, seq)
        return body + b"\0" * max(0, s.size - 28 - len(body)), 4500
    if s.kind == "ike":
        body = (b"\0\0\0\0" if s.key == 4500 else b"") + struct.pack("!Q", seq) + b"\0" * 20
        return body, s.key
    if s.kind == "keepalive":
        return b"\xff", 4500
    if s.kind == "plain":
        body = struct.pack("!II", s.key, seq)
        return body + b"\0" * max(0, s.size - 28 - len(body)), s.key
    raise ValueError(f"unknown stream kind {s.kind!r}")


def send(streams: list[Stream], duration: float, count: int | None) -> dict[str, int]:
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, ESP)
    # one UDP socket on an ephemeral port: the destination port is what the GIN looks at
    # (a site's charon already owns 500/4500 in its namespace)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    # per stream: a packet template with the sequence number patched in place
    plans = []
    for s in streams:
        data, port = payload(s, 0)
        seq_off = {"esp": 4, "udp": 4, "plain": 4, "ike": 4 if s.key == 4500 else 0}.get(s.kind)
        fmt = "!Q" if s.kind == "ike" else "!I"
        sock = raw if port == 0 else udp
        plans.append((s, bytearray(data), seq_off, fmt, sock, (s.dst, port)))
    t0 = time.monotonic()
    end = t0 + duration
    pack_into = struct.pack_into
    while True:
        now = time.monotonic()
        if now >= end:
            break
        busy = False
        for s, buf, off, fmt, sock, dst in plans:
            due = int((now - t0) * s.pps) + 1 - s.sent
            if count is not None:
                due = min(due, count - s.sent)
            seq = s.sent
            for _ in range(min(due, 256)):
                seq += 1
                if off is not None:
                    pack_into(fmt, buf, off, seq)
                try:
                    sock.sendto(buf, dst)
                except BlockingIOError:
                    seq -= 1
                    break
                except OSError:
                    pass  # counted as sent: the network lost it
            if seq != s.sent:
                busy = True
                s.sent = seq
        if count is not None and all(s.sent >= count for s in streams):
            break
        if not busy:
            time.sleep(0.0002)
    return {f"{s.kind}:{s.dst}:{s.key:#x}": s.sent for s in streams}


@dataclass
class Counter:
    packets: int = 0
    bytes: int = 0
    first: float = 0.0
    last: float = 0.0
    seqs: bytearray = field(default_factory=bytearray)
    bins: dict[int, int] = field(default_factory=dict)
    dscp_tagged: int = 0

    def add(self, seq: int, nbytes: int, now: float, t0: float) -> None:
        if self.packets == 0:
            self.first = now
        self.packets += 1
        self.bytes += nbytes
        self.last = now
        b = int((now - t0) * 10)
        self.bins[b] = self.bins.get(b, 0) + nbytes
        if 0 < seq < 50_000_000:
            if seq >= len(self.seqs) * 8:
                self.seqs.extend(b"\0" * max(len(self.seqs), seq // 8 + 1 - len(self.seqs)))
            self.seqs[seq >> 3] |= 1 << (seq & 7)

    def ranges(self) -> list[list[int]]:
        out: list[list[int]] = []
        for i in range(len(self.seqs) * 8):
            if self.seqs[i >> 3] >> (i & 7) & 1:
                if out and out[-1][1] == i - 1:
                    out[-1][1] = i
                else:
                    out.append([i, i])
        return out

    def report(self, t0: float) -> dict[str, Any]:
        return {"packets": self.packets, "bytes": self.bytes, "first": self.first - t0,
                "last": self.last - t0, "seq_ranges": self.ranges(),
                "bins": {str(k): v for k, v in sorted(self.bins.items())}}


def recv(out_path: str, ports: list[int]) -> None:
    socks: dict[socket.socket, str] = {}
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, ESP)
    socks[raw] = "esp"
    for port in ports:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        u.bind(("0.0.0.0", port))
        socks[u] = f"port{port}"
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    counters: dict[str, Counter] = {}
    stop = False

    def on_term(_s: int, _f: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    with open(out_path + ".ready", "w") as f:
        f.write("ready\n")
    while not stop:
        ready, _, _ = select.select(list(socks), [], [], 0.1)
        for s in ready:
            kind = socks[s]
            for _ in range(512):
                try:
                    data = s.recv(65535, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                now = time.monotonic()
                if kind == "esp":
                    ihl = (data[0] & 0x0F) * 4
                    spi, seq = struct.unpack_from("!II", data, ihl)
                    counters.setdefault(f"esp:{spi:#x}", Counter()).add(seq, len(data), now, t0)
                elif kind == "port4500":
                    if len(data) >= 8 and data[:4] != b"\0\0\0\0":
                        spi, seq = struct.unpack_from("!II", data)
                        counters.setdefault(f"udp:{spi:#x}", Counter()).add(seq, len(data) + 28, now, t0)
                    elif len(data) == 32:  # our synthetic IKE: marker + seq + 20 bytes
                        seq = struct.unpack_from("!Q", data, 4)[0]
                        counters.setdefault("ike:4500", Counter()).add(seq, len(data) + 28, now, t0)
                    else:  # somebody else's IKE (a site's charon)
                        counters.setdefault("ike-other:4500", Counter()).add(0, len(data) + 28, now, t0)
                elif kind == "port500":
                    name = "ike:500" if len(data) == 28 else "ike-other:500"
                    seq = struct.unpack_from("!Q", data)[0] if len(data) == 28 else 0
                    counters.setdefault(name, Counter()).add(seq, len(data) + 28, now, t0)
                elif kind == "port4789" and len(data) >= 8 + 14 + 20 + 8 + 8:
                    vni = struct.unpack_from("!I", data, 4)[0] >> 8
                    inner = data[22:]
                    if data[20:22] != b"\x08\x00" or inner[0] >> 4 != 4 or inner[9] != 17:
                        counters.setdefault(f"vxlan-other:{vni}", Counter()).add(0, len(data) + 28, now, t0)
                        continue
                    ihl = (inner[0] & 0x0F) * 4
                    dst = socket.inet_ntoa(inner[16:20])
                    sid, seq = struct.unpack_from("!II", inner, ihl + 8)
                    counters.setdefault(f"vxlan:{vni}:{dst}:{sid}", Counter()).add(
                        seq, len(data) + 28, now, t0)
    with open(out_path, "w") as f:
        json.dump({k: c.report(t0) for k, c in counters.items()}, f)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="trafficgen")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("--stream", action="append", required=True)
    s.add_argument("--duration", type=float, default=1.0)
    s.add_argument("--count", type=int, default=None)
    r = sub.add_parser("recv")
    r.add_argument("--out", required=True)
    r.add_argument("--port", type=int, action="append", default=[])
    a = ap.parse_args(argv)
    if a.cmd == "send":
        res = send([parse_stream(x) for x in a.stream], a.duration, a.count)
        json.dump(res, sys.stdout)
        sys.stdout.write("\n")
    else:
        recv(a.out, a.port)


if __name__ == "__main__":
    main()
