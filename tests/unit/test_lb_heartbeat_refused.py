"""The heartbeat monitor's refused-probe path on real sockets (loopback, no namespace):
a GPN address where nothing listens on the heartbeat port is declared dead after one
probe's ICMP port unreachable, long before three rounds would have been missed."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from protego.lb import heartbeat as hb


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _answering_gpn(addr: str, port: int) -> Iterator[None]:
    """A GPN stand-in on ``addr:port`` that answers every probe, until the block ends."""
    gpn = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gpn.bind((addr, port))
    gpn.settimeout(0.05)
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            try:
                data, src = gpn.recvfrom(2048)
            except TimeoutError:
                continue
            gpn.sendto(hb.pack(hb.answer_for(hb.unpack(data))), src)

    th = threading.Thread(target=answer, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(1)
        gpn.close()


def _watch_answering(cfg: hb.DetectorConfig, gpns: dict[str, str], answering: str,
                     seconds: float) -> tuple[hb.HeartbeatMonitor, list[hb.Transition]]:
    """A monitor of ``gpns`` run for ``seconds`` while ``answering`` answers its probes;
    the monitor (stopped) and the transitions it reported."""
    port = _free_udp_port()
    seen: list[hb.Transition] = []
    mon = hb.HeartbeatMonitor(hb.Detector(cfg), seen.append, bind_addr="127.0.0.1", port=port)
    mon.set_gpns(gpns)
    with _answering_gpn(answering, port):
        mon.start()
        try:
            time.sleep(seconds)
        finally:
            mon.stop()
    return mon, seen


def _monitor(refused_is_dead: bool) -> tuple[hb.HeartbeatMonitor, list[tuple[float, hb.Transition]]]:
    seen: list[tuple[float, hb.Transition]] = []
    det = hb.Detector(hb.DetectorConfig(interval=0.2, misses=3, refused_is_dead=refused_is_dead))
    mon = hb.HeartbeatMonitor(det, lambda tr: seen.append((time.monotonic(), tr)), bind_addr="127.0.0.1",
                              port=_free_udp_port())
    return mon, seen


def _first_declaration(mon: hb.HeartbeatMonitor, seen: list[tuple[float, hb.Transition]], within: float) -> float:
    """Run ``mon`` until its first declaration (or ``within`` seconds); its start time."""
    t0 = time.monotonic()
    mon.start()
    try:
        while not seen and time.monotonic() < t0 + within:
            time.sleep(0.005)
    finally:
        mon.stop()
    return t0


def test_refused_probe_declares_dead_within_one_round() -> None:
    mon, seen = _monitor(True)
    # 127.0.0.2 is local too, but nothing is bound to it on this port: the kernel refuses
    mon.set_gpns({"gpnx": "127.0.0.2"})
    t0 = _first_declaration(mon, seen, 2.0)
    assert seen, "no declaration within 2 s"
    at, tr = seen[0]
    assert (tr.gpn, tr.state) == ("gpnx", "dead") and "refused" in tr.reason
    assert at - t0 < 0.2  # within the first round: three missed rounds would take 0.6 s
    assert mon.stats()["gpnx"]["refusals"] >= 1


def test_answering_gpn_is_not_refused_and_off_switch_waits_for_misses() -> None:
    mon, seen = _monitor(False)
    mon.set_gpns({"gpnx": "127.0.0.2"})
    t0 = _first_declaration(mon, seen, 3.0)
    assert seen and seen[0][1].state == "dead" and "missed" in seen[0][1].reason
    assert seen[0][0] - t0 >= 0.4  # the third missed round, not the first refusal

    # a GPN that answers is never refused
    mon2, seen2 = _watch_answering(hb.DetectorConfig(interval=0.02, misses=3, recover=3),
                                   {"gpny": "127.0.0.3"}, "127.0.0.3", 0.5)
    assert [(t.gpn, t.state) for t in seen2] == [("gpny", "alive")]
    assert mon2.stats()["gpny"]["refusals"] == 0


def test_a_refusing_gpn_never_costs_a_healthy_one_its_probes() -> None:
    """The kernel reports an ICMP error on the socket's *next* call, which may be the
    probe to another GPN: that probe must still go out (regression: the healthy GPN
    missed every round and was declared dead 3 rounds after the dead one)."""
    # gpnx sorts first: its probe (refused) goes out before gpny's in every round
    mon, seen = _watch_answering(hb.DetectorConfig(interval=0.01, misses=3, recover=5),
                                 {"gpnx": "127.0.0.2", "gpny": "127.0.0.3"}, "127.0.0.3", 1.0)
    assert ("gpnx", "dead") in [(t.gpn, t.state) for t in seen]
    assert [(t.gpn, t.state) for t in seen if t.gpn == "gpny"] == [("gpny", "alive")]
    st = mon.stats()
    assert st["gpny"]["answers"] >= 0.8 * st["gpny"]["rounds"] and st["gpnx"]["refusals"] >= 1
