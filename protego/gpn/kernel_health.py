"""Heartbeats of an xfrm GPN, answered only while its kernel data path works.

On a userspace GPN the engine's workers answer the GIN/GEN's heartbeats, so a dead
engine stops answering by itself. On an xfrm GPN the kernel carries the traffic and a
process that merely answers probes would prove nothing about it. :class:`HealthServer`
therefore answers (docs/heartbeat.md) only while

* an **ESP canary** passes (while the GPN holds SAs: with none there is no data path
  to break, and ``ip xfrm state`` stays empty): every ``interval`` it sends one UDP
  datagram through a dedicated ESP-in-UDP SA pair to a peer in a namespace of its own
  over a veth pair (:class:`Canary`; loopback would bypass IPsec), which sends it back
  the same way: it returns only if this namespace's kernel encrypted it, sent it out,
  and took the answer in through the backend's UDP 4500 encapsulation socket,
  decrypted it and passed the inbound policy check (a plain datagram is dropped);
  it counts as lost when it has not come back within 1.5 intervals (its echo is read
  before any verdict, so a stalled thread loses nothing), and ``misses`` lost in a
  row (a send the kernel refuses counts as lost) break the data path (:class:`CanaryJudge`); and
* the backend reports no failure (its last apply or read-back of the kernel failed).

When either fails the heartbeat socket is **closed**: the GIN/GEN's next probe is
refused by the kernel (ICMP port unreachable) and the GPN is declared dead at once, so
the GMN rekeys its tunnels onto healthy GPNs. The socket is opened again when the
canary passes again. A killed agent closes it too. Tagged data packets (the outer DSCP
the GIN/GEN sets on a sample) are seen through raw sockets whose BPF filter keeps only
tagged copies, and answered the same way, so ``--hb-tag-only`` works with xfrm GPNs.

The canary's key is random per start and never leaves this process and the kernel.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import IO

from pyroute2 import IPRoute, NetlinkError

from protego.errors import DataplaneError
from protego.lb.heartbeat_responder import Responder, classify_raw, send_answer
from protego.xfrm.messages import XfrmPolicy, XfrmState
from protego.xfrm.netlink import XfrmSocket

from . import bpf
from .canary_peer import canary_sas, fork_peer
from .tenant import VXLAN_PORT

__all__ = ["CANARY_IFNAME", "CANARY_PORT", "Canary", "CanaryJudge", "HealthServer"]

log = logging.getLogger(__name__)

CANARY_NET = "169.254.249.0/30"  # the canary's veth pair: the GPN's end .1, the peer's .2
CANARY_LOCAL, CANARY_REMOTE = "169.254.249.1", "169.254.249.2"
CANARY_IFNAME, CANARY_PEER_IFNAME = "pgc0", "pgc1"
CANARY_PORT = 7479  # UDP, the canary peer's echo port
CANARY_REQID = 0x50000000  # outside the SPIs the tenants' states use as reqid
PEER_START_S = 30.0  # seconds for the forked peer to answer (generous: software emulation)


class Canary:
    """An ESP-in-UDP round trip through this namespace's kernel XFRM, to a peer process in
    a namespace of its own (:mod:`protego.gpn.canary_peer`) over a veth pair: loopback
    traffic bypasses IPsec on Linux, so the canary must leave the namespace.

    :meth:`start` starts the peer and the link (for the backend's life); :meth:`install`
    and :meth:`remove` add and delete this end's states and policies (while the GPN holds
    SAs), with fresh SPIs and keys each time (the peer gets them over its pipe)."""

    def __init__(self, xfrm: XfrmSocket | None, natt_port: int = 4500) -> None:
        self._xfrm = xfrm
        self.natt_port = natt_port
        self.installed = False
        self.installed_at = 0.0  # monotonic
        self._pid = 0
        self._conn: socket.socket | None = None
        self._r: IO[str] | None = None
        self._w: IO[str] | None = None
        self._mine: tuple[list[XfrmState], list[XfrmPolicy]] | None = None

    @staticmethod
    def is_canary_state(st: XfrmState) -> bool:
        return {str(st.src), str(st.dst)} == {CANARY_LOCAL, CANARY_REMOTE}

    @staticmethod
    def is_canary_policy(pol: XfrmPolicy) -> bool:
        sel = pol.selector
        return not pol.if_id and {str(sel.saddr), str(sel.daddr)} == {CANARY_LOCAL, CANARY_REMOTE}

    # ------------------------------------------------------------------ the peer
    def start(self) -> None:
        """Fork the peer (before the agent has threads) and create the veth pair."""
        self._pid, self._conn = fork_peer()
        self._r, self._w = self._conn.makefile("r"), self._conn.makefile("w")
        try:
            self._read()  # {"hello": pid}: the peer is in its namespace
            with IPRoute() as ip:
                for stale in ip.link_lookup(ifname=CANARY_IFNAME):
                    ip.link("del", index=stale)
                ip.link("add", ifname=CANARY_IFNAME, kind="veth",
                        peer={"ifname": CANARY_PEER_IFNAME, "net_ns_pid": self._pid})
                idx = ip.link_lookup(ifname=CANARY_IFNAME)[0]
                ip.addr("add", index=idx, address=CANARY_LOCAL, prefixlen=30)
                ip.link("set", index=idx, state="up")
        except BaseException:
            self.stop()
            raise

    def _read(self) -> dict[str, object]:
        assert self._r is not None
        ready, _, _ = select.select([self._conn], [], [], PEER_START_S)
        line = self._r.readline() if ready else ""
        if not line:
            raise DataplaneError(f"the ESP canary's peer (pid {self._pid}) did not answer within "
                                 f"{PEER_START_S:.0f} s")
        answer: dict[str, object] = json.loads(line)
        if "error" in answer:
            raise DataplaneError(f"the ESP canary's peer failed: {answer['error']}")
        return answer

    def stop(self) -> None:
        self.remove()
        if self._conn is not None:
            for f in (self._r, self._w, self._conn):
                if f is not None:
                    f.close()  # the peer exits: its namespace and the veth go
            self._conn = self._r = self._w = None
        if self._pid:
            deadline = time.monotonic() + 10
            while True:
                try:
                    done, _status = os.waitpid(self._pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(self._pid, 9)
                    os.waitpid(self._pid, 0)
                    break
                time.sleep(0.02)
            self._pid = 0
        with IPRoute() as ip:
            for stale in ip.link_lookup(ifname=CANARY_IFNAME):
                try:
                    ip.link("del", index=stale)
                except NetlinkError:
                    pass

    def attach(self, xfrm: XfrmSocket) -> None:
        """The XFRM socket this end's SAs go through (opened after :meth:`start` forked)."""
        self._xfrm = xfrm

    # ------------------------------------------------------------------ this end's SAs
    def install(self) -> None:
        """(Re)install both ends' SAs with fresh SPIs and keys."""
        assert self._w is not None
        spi_a, spi_b = (0x100 + secrets.randbelow(0x3FFFFF00) for _ in range(2))
        key_a, key_b = secrets.token_bytes(20), secrets.token_bytes(20)
        self.remove()
        self._w.write(json.dumps({
            "ifname": CANARY_PEER_IFNAME, "local": CANARY_REMOTE, "remote": CANARY_LOCAL, "port": CANARY_PORT,
            "natt_port": self.natt_port, "spi_in": spi_a, "spi_out": spi_b, "key_in": key_a.hex(),
            "key_out": key_b.hex(), "reqid": CANARY_REQID}) + "\n")
        self._w.flush()
        self._read()  # {"ready": true}
        states, policies = canary_sas(CANARY_LOCAL, CANARY_REMOTE, CANARY_PORT, self.natt_port, spi_b, spi_a,
                                      key_b, key_a, CANARY_REQID, server=False)
        assert self._xfrm is not None
        for st in states:
            self._xfrm.add_state(st)
        for pol in policies:
            self._xfrm.update_policy(pol)
        self._mine = (states, policies)
        self.installed, self.installed_at = True, time.monotonic()

    def remove(self) -> None:
        if self._mine is not None and self._xfrm is not None:
            states, policies = self._mine
            for pol in policies:
                try:
                    self._xfrm.delete_policy(pol.selector, pol.direction)
                except DataplaneError:
                    pass
            for st in states:
                try:
                    self._xfrm.delete_state(str(st.dst), st.spi, str(st.src))
                except DataplaneError:
                    pass
            self._mine = None
        self.installed = False


class CanaryJudge:
    """The canary's verdict: broken after ``misses`` canaries lost in a row.

    A canary is lost when its echo has not been read ``timeout`` seconds after it was
    sent, or when the kernel refused to send it. Echoes are read before tokens expire
    (the caller drains the socket first), so a thread stalled by the scheduler or the
    GIL (seconds under emulation) does not count the echoes waiting in its socket as
    lost: only canaries the kernel never brought back are. Pure (the clock is passed in).
    """

    def __init__(self, misses: int, timeout: float) -> None:
        self.misses = misses
        self.timeout = timeout
        self.missed = 0  # lost in a row
        self.sent = 0
        self.ok = 0
        self.lost = 0
        self._pending: dict[bytes, float] = {}

    def on_sent(self, token: bytes, now: float) -> None:
        self.sent += 1
        self._pending[token] = now

    def on_refused(self) -> None:
        """The kernel would not send the canary (e.g. no state: an acquire)."""
        self.lost += 1
        self.missed += 1

    def on_echo(self, token: bytes) -> bool:
        """An echo came back; False for a token that is not (or no longer) pending."""
        if self._pending.pop(token, None) is None:
            return False
        self.ok += 1
        self.missed = 0
        return True

    def expire(self, now: float) -> None:
        for token in [t for t, at in self._pending.items() if now - at > self.timeout]:
            del self._pending[token]
            self.lost += 1
            self.missed += 1

    def reset(self) -> None:
        """The canary's SAs went (no tunnel left): nothing in flight counts."""
        self._pending.clear()
        self.missed = 0

    def verdict(self) -> str | None:
        if self.missed >= self.misses:
            return f"the ESP canary did not come back through the kernel {self.missed} times in a row"
        return None


class HealthServer:
    """The xfrm GPN's heartbeat responder, gated by the canary (a daemon thread)."""

    def __init__(self, fabric_addr: str, hb_port: int, dscp: int, canary: Canary, encap: socket.socket,
                 interval: float = 0.1, misses: int = 3,
                 datapath_ok: Callable[[], str | None] = lambda: None) -> None:
        self.fabric_addr = fabric_addr
        self.hb_port = hb_port
        self.dscp = dscp
        self.canary = canary
        self.interval = interval
        self.misses = misses
        self._datapath_ok = datapath_ok
        self._encap = encap
        self._responder = Responder(dscp=dscp)
        self._hb: socket.socket | None = None
        self._raws: list[socket.socket] = []
        self._rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # sends and gets the echo
        self._rx.bind((CANARY_LOCAL, 0))
        self._rx.setblocking(False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.judge = CanaryJudge(misses, interval * 1.5)
        self.broken: str | None = "starting"
        self._c = {"hb_probes": 0, "hb_tag_answers": 0, "ike_ignored": 0, "heartbeats_stopped": 0}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> HealthServer:
        for proto, ports in ((50, ()), (socket.IPPROTO_UDP, (4500, VXLAN_PORT))):
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
            bpf.attach(raw, bpf.SO_ATTACH_FILTER, bpf.tagged_only(self.dscp, ports))
            raw.setblocking(False)
            self._raws.append(raw)
        self._thread = threading.Thread(target=self._run, name="gpn-xfrm-health", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._close_hb()
        for s in (*self._raws, self._rx):
            s.close()

    def counters(self) -> dict[str, int]:
        out = dict(self._c)
        out["canary_sent"], out["canary_ok"], out["canary_lost"] = self.judge.sent, self.judge.ok, self.judge.lost
        out["hb_probes"] = self._responder.probes
        out["hb_tag_answers"] = self._responder.tagged
        return out

    # ------------------------------------------------------------------ heartbeat socket
    def _open_hb(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((self.fabric_addr, self.hb_port))
        except OSError:
            s.close()
            raise
        s.setblocking(False)
        self._hb = s

    def _close_hb(self) -> None:
        if self._hb is not None:
            self._hb.close()
            self._hb = None

    def _judge(self, now: float) -> None:
        """Open or close the heartbeat socket by the canary's and the backend's verdicts."""
        why = self._datapath_ok()
        if why is None and self.canary.installed:
            why = self.judge.verdict()
        if why is None and self.broken is not None:
            try:
                self._open_hb()
            except OSError as exc:
                log.error("heartbeat socket %s:%d: %s", self.fabric_addr, self.hb_port, exc)
                return
            if self.broken != "starting":
                log.warning("xfrm data path works again: answering heartbeats")
            self.broken = None
        elif why is not None and self.broken is None:
            log.error("xfrm data path broken (%s): heartbeats stop, so the GIN/GEN declares this GPN dead", why)
            self._c["heartbeats_stopped"] += 1
            self._close_hb()
            self.broken = why

    # ------------------------------------------------------------------ loop
    def _send_canary(self, now: float) -> None:
        if not self.canary.installed:
            self.judge.reset()
            return
        self._drain(self._rx, now)  # echoes already here count before anything expires
        self.judge.expire(now)
        token = os.urandom(12)
        try:
            self._rx.sendto(token, (CANARY_REMOTE, CANARY_PORT))
            self.judge.on_sent(token, now)
        except OSError as exc:  # e.g. EAGAIN while the kernel has no state (acquire)
            log.debug("canary not sent: %s", exc)
            self.judge.on_refused()

    def _drain(self, s: socket.socket, now: float) -> None:
        for _ in range(256):
            try:
                data, src = s.recvfrom(65535, socket.MSG_DONTWAIT)
            except OSError:  # BlockingIOError: empty; others: closed under us (stop)
                break
            self._on(s, data, src, now)

    def _run(self) -> None:
        next_canary = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_canary:
                next_canary = now + self.interval
                self._send_canary(now)
                self._judge(now)
            socks = [self._rx, self._encap, *self._raws] + ([self._hb] if self._hb is not None else [])
            try:
                ready, _, _ = select.select(socks, [], [], max(0.0, min(0.05, next_canary - time.monotonic())))
            except (OSError, ValueError):  # a socket closed under us (stop)
                continue
            now = time.monotonic()
            for s in ready:
                self._drain(s, now)

    def _on(self, s: socket.socket, data: bytes, src: tuple[str, int], now: float) -> None:
        if s is self._rx:
            if self.judge.on_echo(data) and self.broken is not None:
                self._judge(now)
        elif s is self._encap:
            self._c["ike_ignored"] += 1  # IKE (zero marker) reaching a GPN: the GMN's job
        elif s is self._hb:
            reply = self._responder.on_datagram(data, src, now)
            if reply is not None:
                send_answer(s, reply, src)
        else:
            tag = classify_raw(data, self.dscp)
            if tag is not None and self._hb is not None:
                for msg, dst in self._responder.on_tagged(tag, now):
                    send_answer(self._hb, msg, dst)

