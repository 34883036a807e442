"""The heartbeat monitor's refused-probe path on real sockets (loopback, no namespace):
a GPN address where nothing listens on the heartbeat port is declared dead after one
probe's ICMP port unreachable, long before three rounds would have been missed."""

from __future__ import annotations

import socket
import threading
import time

from protego.lb import heartbeat as hb


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _monitor(refused_is_dead: bool) -> tuple[hb.HeartbeatMonitor, list[tuple[float, hb.Transition]]]:
    seen: list[tuple[float, hb.Transition]] = []
    det = hb.Detector(hb.DetectorConfig(interval=0.2, misses=3, refused_is_dead=refused_is_dead))
    mon = hb.HeartbeatMonitor(det, lambda tr: seen.append((time.monotonic(), tr)), bind_addr="127.0.0.1",
                              port=_free_udp_port())
    return mon, seen


def test_refused_probe_declares_dead_within_one_round() -> None:
    mon, seen = _monitor(True)
    # 127.0.0.2 is local too, but nothing is bound to it on this port: the kernel refuses
    mon.set_gpns({"gpnx": "127.0.0.2"})
    t0 = time.monotonic()
    mon.start()
    try:
        deadline = t0 + 2.0
        while not seen and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        mon.stop()
    assert seen, "no declaration within 2 s"
    at, tr = seen[0]
    assert (tr.gpn, tr.state) == ("gpnx", "dead") and "refused" in tr.reason
    assert at - t0 < 0.2  # within the first round: three missed rounds would take 0.6 s
    assert mon.stats()["gpnx"]["refusals"] >= 1


def test_answering_gpn_is_not_refused_and_off_switch_waits_for_misses() -> None:
    mon, seen = _monitor(False)
    mon.set_gpns({"gpnx": "127.0.0.2"})
    t0 = time.monotonic()
    mon.start()
    try:
        deadline = t0 + 3.0
        while not seen and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        mon.stop()
    assert seen and seen[0][1].state == "dead" and "missed" in seen[0][1].reason
    assert seen[0][0] - t0 >= 0.4  # the third missed round, not the first refusal

    # a GPN that answers is never refused
    port = _free_udp_port()
    gpn = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gpn.bind(("127.0.0.3", port))
    stop = threading.Event()

    def answer() -> None:
        gpn.settimeout(0.05)
        while not stop.is_set():
            try:
                data, src = gpn.recvfrom(2048)
            except TimeoutError:
                continue
            gpn.sendto(hb.pack(hb.answer_for(hb.unpack(data))), src)

    seen2: list[hb.Transition] = []
    det = hb.Detector(hb.DetectorConfig(interval=0.02, misses=3, recover=3))
    mon2 = hb.HeartbeatMonitor(det, seen2.append, bind_addr="127.0.0.1", port=port)
    mon2.set_gpns({"gpny": "127.0.0.3"})
    th = threading.Thread(target=answer, daemon=True)
    th.start()
    mon2.start()
    try:
        time.sleep(0.5)
    finally:
        mon2.stop()
        stop.set()
        th.join(1)
        gpn.close()
    assert [(t.gpn, t.state) for t in seen2] == [("gpny", "alive")]
    assert mon2.stats()["gpny"]["refusals"] == 0


def test_a_refusing_gpn_never_costs_a_healthy_one_its_probes() -> None:
    """The kernel reports an ICMP error on the socket's *next* call, which may be the
    probe to another GPN: that probe must still go out (regression: the healthy GPN
    missed every round and was declared dead 3 rounds after the dead one)."""
    port = _free_udp_port()
    gpn = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gpn.bind(("127.0.0.3", port))
    stop = threading.Event()

    def answer() -> None:
        gpn.settimeout(0.05)
        while not stop.is_set():
            try:
                data, src = gpn.recvfrom(2048)
            except TimeoutError:
                continue
            gpn.sendto(hb.pack(hb.answer_for(hb.unpack(data))), src)

    seen: list[hb.Transition] = []
    det = hb.Detector(hb.DetectorConfig(interval=0.01, misses=3, recover=5))
    mon = hb.HeartbeatMonitor(det, seen.append, bind_addr="127.0.0.1", port=port)
    # gpnx sorts first: its probe (refused) goes out before gpny's in every round
    mon.set_gpns({"gpnx": "127.0.0.2", "gpny": "127.0.0.3"})
    th = threading.Thread(target=answer, daemon=True)
    th.start()
    mon.start()
    try:
        time.sleep(1.0)
    finally:
        mon.stop()
        stop.set()
        th.join(1)
        gpn.close()
    assert ("gpnx", "dead") in [(t.gpn, t.state) for t in seen]
    assert [(t.gpn, t.state) for t in seen if t.gpn == "gpny"] == [("gpny", "alive")]
    st = mon.stats()
    assert st["gpny"]["answers"] >= 0.8 * st["gpny"]["rounds"] and st["gpnx"]["refusals"] >= 1
