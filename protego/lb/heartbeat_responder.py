"""Reference GPN-side heartbeat responder (docs/heartbeat.md).

The GPN engine embeds :class:`Responder`: it calls :meth:`Responder.on_datagram` for
every datagram received on the heartbeat port and :meth:`Responder.on_tagged` for
every data packet whose outer DSCP is the tag value; both return what to send where.
:func:`serve` runs it standalone (used by tests until the GPN engine exists)::

    python -m protego.lb.heartbeat_responder --bind 192.0.2.21 [--watch-tags]

``--watch-tags`` also opens raw sockets (ESP, UDP) to see tagged packets the way
the GPN engine's receive path will.
"""

from __future__ import annotations

import argparse
import logging
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from protego.lb import heartbeat as hb

log = logging.getLogger(__name__)

LB_MEMORY = 1.0  # seconds: tag answers go to every lb that probed us this recently


@dataclass
class Responder:
    dscp: int = 0x37
    lbs: dict[tuple[str, int], float] = field(default_factory=dict)
    seq: int = 0
    probes: int = 0
    tagged: int = 0

    def on_datagram(self, data: bytes, src: tuple[str, int], now: float) -> bytes | None:
        """A datagram on the heartbeat port → the answer to send back to ``src``."""
        try:
            m = hb.unpack(data)
        except hb.HeartbeatError:
            return None
        if m.type != hb.PROBE:
            return None
        self.lbs[src] = now
        self.probes += 1
        return hb.pack(hb.answer_for(m))

    def on_tagged(self, tag: hb.TagInfo, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        """A tagged data packet → tag answers, one per lb that probed us recently."""
        for k in [k for k, t in self.lbs.items() if now - t > LB_MEMORY]:
            del self.lbs[k]
        if not self.lbs:
            return []
        self.tagged += 1
        self.seq += 1
        msg = hb.pack(hb.Message(hb.TAG_ANSWER, self.seq, time.monotonic_ns(), tag))
        return [(msg, dst) for dst in self.lbs]


def classify_raw(pkt: bytes, dscp: int) -> hb.TagInfo | None:
    """An IPv4 packet from a raw socket → TagInfo if its outer DSCP is the tag."""
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        return None
    if pkt[1] >> 2 != dscp:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    proto = pkt[9]
    body = pkt[ihl:]
    if proto == 50 and len(body) >= 8:
        spi, seq = struct.unpack_from("!II", body)
        return hb.TagInfo(50, dscp, spi, seq)
    if proto == 17 and len(body) >= 16:
        dport = struct.unpack_from("!H", body, 2)[0]
        if dport == 4500:
            spi, seq = struct.unpack_from("!II", body, 8)
            return hb.TagInfo(17, dscp, spi, seq) if spi else None
        if dport == 4789:
            vni = struct.unpack_from("!I", body, 12)[0] >> 8
            return hb.TagInfo(17, dscp, vni, 0)
    return None


def serve(bind: str, port: int, dscp: int, watch_tags: bool, rt_priority: int = 0) -> None:
    if rt_priority:
        hb.set_rt_priority(rt_priority)
    r = Responder(dscp=dscp)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind, port))
    socks = [sock]
    raws = []
    if watch_tags:
        for proto in (socket.IPPROTO_ESP if hasattr(socket, "IPPROTO_ESP") else 50, socket.IPPROTO_UDP):
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            raws.append(s)
        socks += raws
    stop = False

    def on_term(_s: int, _f: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log.info("heartbeat responder on %s:%d (tags %s)", bind, port, "watched" if watch_tags else "ignored")
    while not stop:
        ready, _, _ = select.select(socks, [], [], 0.2)
        now = time.monotonic()
        for s in ready:
            for _ in range(256):
                try:
                    data, src = s.recvfrom(65535, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if s is sock:
                    reply = r.on_datagram(data, src, now)
                    if reply is not None:
                        send_answer(sock, reply, src)
                else:
                    tag = classify_raw(data, dscp)
                    if tag is not None:
                        for msg, dst in r.on_tagged(tag, now):
                            send_answer(sock, msg, dst)
    for s in socks:
        s.close()


def send_answer(sock: socket.socket, msg: bytes, dst: tuple[str, int]) -> bool:
    """Send one answer; False if the network refused it. A link that went down between a
    probe and its answer fails the send with ENETUNREACH: that answer is lost (the lb
    counts a miss, as it should), the responder is not (it died of it once, and its GPN
    stayed dead for the lb after the link came back: an integration test failed on it)."""
    try:
        sock.sendto(msg, dst)
    except OSError as exc:
        log.debug("heartbeat answer to %s:%d not sent: %s", dst[0], dst[1], exc)
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=hb.DEFAULT_PORT)
    ap.add_argument("--dscp", type=lambda s: int(s, 0), default=0x37)
    ap.add_argument("--watch-tags", action="store_true")
    ap.add_argument("--rt-priority", type=int, default=0, help="SCHED_FIFO priority (0: normal)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    serve(a.bind, a.port, a.dscp, a.watch_tags, a.rt_priority)


if __name__ == "__main__":
    main()
