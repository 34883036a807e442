"""Heartbeat codec, detector state machine and reference responder (pure)."""

from __future__ import annotations

import struct

import pytest

from protego.lb import heartbeat as hb
from protego.lb.heartbeat_responder import Responder, classify_raw

I = 0.010


def test_codec_round_trip_and_errors() -> None:
    m = hb.Message(hb.PROBE, 7, 123456789)
    raw = hb.pack(m)
    assert len(raw) == 24 and raw[:4] == b"PGHB" and raw[4] == 1 and raw[5] == 1
    assert hb.unpack(raw) == m
    t = hb.Message(hb.TAG_ANSWER, 3, 9, hb.TagInfo(50, 0x37, 0x1234, 99))
    assert hb.unpack(hb.pack(t)) == t and len(hb.pack(t)) == 36
    assert hb.answer_for(m) == hb.Message(hb.ANSWER, 7, 123456789)
    for bad, msg in ((b"x", "too short"), (b"XXXX" + raw[4:], "bad magic"),
                     (raw[:4] + b"\x02" + raw[5:], "version 2"), (raw[:5] + b"\x09" + raw[6:], "unknown"),
                     (hb.pack(t)[:30], "tag answer too short")):
        with pytest.raises(hb.HeartbeatError, match=msg):
            hb.unpack(bad)


def run(det: hb.Detector, t0: float, rounds: int, answer: set[str], tag: set[str] = frozenset()) -> list[hb.Transition]:
    """Drive ``rounds`` rounds: GPNs in ``answer`` answer their probes, ``tag`` send tag answers."""
    out = []
    now = t0
    for _ in range(rounds):
        probes, trans = det.tick(now)
        out += trans
        for name, addr, seq in probes:
            if name in answer:
                det.on_message(addr, hb.Message(hb.ANSWER, seq, 0), now + I / 2)
        for name in tag:
            det.on_message(det.tracks[name].addr, hb.Message(hb.TAG_ANSWER, 1, 0), now + I / 3)
        now += I
    return out


def test_alive_then_dead_after_three_misses_then_alive_after_recover() -> None:
    det = hb.Detector(hb.DetectorConfig(interval=I, misses=3, recover=10))
    det.set_gpns({"gpn1": "192.0.2.21", "gpn2": "192.0.2.22"})
    tr = run(det, 0.0, 11, {"gpn1", "gpn2"})
    assert [(t.gpn, t.state) for t in tr] == [("gpn1", "alive"), ("gpn2", "alive")]
    assert tr[0].at == pytest.approx(10 * I)  # 10 answered rounds closed
    # gpn2 stops answering: declared dead when its third unanswered round closes
    tr = run(det, 11 * I, 4, {"gpn1"})
    assert [(t.gpn, t.state) for t in tr] == [("gpn2", "dead")]
    assert tr[0].at == pytest.approx(14 * I) and "3 consecutive" in tr[0].reason
    # a flapping answer (every other round) never recovers it
    now = 15 * I
    for i in range(20):
        tr = run(det, now, 1, {"gpn1", "gpn2"} if i % 2 else {"gpn1"})
        assert tr == []
        now += I
    tr = run(det, now, 11, {"gpn1", "gpn2"})
    assert [(t.gpn, t.state) for t in tr] == [("gpn2", "alive")]


def test_unknown_gpn_never_answering_is_declared_dead() -> None:
    det = hb.Detector(hb.DetectorConfig(interval=I))
    det.set_gpns({"gpn1": "192.0.2.21"})
    tr = run(det, 0.0, 4, set())
    assert [(t.gpn, t.state) for t in tr] == [("gpn1", "dead")]


@pytest.mark.parametrize("probe_busy", [False, True])
def test_tag_answers_count_as_answers_and_may_replace_probes(probe_busy: bool) -> None:
    det = hb.Detector(hb.DetectorConfig(interval=I, probe_busy=probe_busy))
    det.set_gpns({"gpn1": "192.0.2.21"})
    tr = run(det, 0.0, 30, set(), tag={"gpn1"})
    assert [(t.gpn, t.state) for t in tr] == [("gpn1", "alive")]
    # the paper's saving: only the very first round needed a probe; else one every round
    assert det.tracks["gpn1"].probes_sent == (30 if probe_busy else 1)
    # traffic stops: probes resume at once, so an answering GPN stays alive
    tr = run(det, 30 * I, 30, {"gpn1"})
    assert tr == [] and det.tracks["gpn1"].probes_sent > 20


def test_foreign_answers_do_not_count() -> None:
    det = hb.Detector(hb.DetectorConfig(interval=I))
    det.set_gpns({"gpn1": "192.0.2.21", "gpn2": "192.0.2.22"})
    now = 0.0
    trans = []
    for _ in range(4):
        probes, tr = det.tick(now)
        trans += tr
        for name, addr, seq in probes:
            if name == "gpn1":
                det.on_message("192.0.2.22", hb.Message(hb.ANSWER, seq, 0), now)  # gpn2 answers gpn1's seq
                det.on_message("192.0.2.99", hb.Message(hb.ANSWER, seq, 0), now)  # not a GPN of ours
                det.on_message(addr, hb.Message(hb.ANSWER, seq + 100, 0), now)  # never sent
        now += I
    assert [(t.gpn, t.state) for t in trans] == [("gpn1", "dead"), ("gpn2", "dead")]


def test_late_answers_of_a_briefly_descheduled_gpn_keep_it_alive() -> None:
    det = hb.Detector(hb.DetectorConfig(interval=I))
    det.set_gpns({"gpn1": "192.0.2.21"})
    now = 0.0
    backlog: list[int] = []
    trans = []
    for r in range(40):
        probes, tr = det.tick(now)
        trans += tr
        backlog += [seq for _n, _a, seq in probes]
        if r % 2 == 1:  # the GPN runs only every other round (20 ms stalls) and answers its backlog
            for seq in backlog:
                det.on_message("192.0.2.21", hb.Message(hb.ANSWER, seq, 0), now + I / 2)
            backlog.clear()
        now += I
    assert [t.state for t in trans] == []  # never 10 answered rounds in a row, never 3 misses
    assert det.tracks["gpn1"].misses <= 1


def test_late_wakeup_counts_one_round_not_many() -> None:
    det = hb.Detector(hb.DetectorConfig(interval=I))
    det.set_gpns({"gpn1": "192.0.2.21"})
    probes, _ = det.tick(0.0)
    det.on_message("192.0.2.21", hb.Message(hb.ANSWER, probes[0][2], 0), 0.001)
    _, tr = det.tick(0.5)  # the lb was descheduled for 500 ms: one answered round, no misses
    assert tr == [] and det.tracks["gpn1"].misses == 0 and det.tracks["gpn1"].hits == 1


def test_set_gpns_forgets_removed_and_readdressed() -> None:
    det = hb.Detector()
    det.set_gpns({"gpn1": "192.0.2.21", "gpn2": "192.0.2.22"})
    det.tracks["gpn1"].state = "dead"
    det.set_gpns({"gpn1": "192.0.2.31"})
    assert list(det.tracks) == ["gpn1"] and det.tracks["gpn1"].state == "unknown"
    assert det.next_deadline() == 0.0
    with pytest.raises(ValueError):
        hb.DetectorConfig(interval=0)


def test_responder_answers_probes_and_tags() -> None:
    r = Responder(dscp=0x37)
    probe = hb.pack(hb.Message(hb.PROBE, 5, 77))
    assert r.on_tagged(hb.TagInfo(50, 0x37, 1, 1), 0.0) == []  # nobody probed us yet
    assert hb.unpack(r.on_datagram(probe, ("192.0.2.1", 7471), 0.0) or b"") == hb.Message(hb.ANSWER, 5, 77)
    assert r.on_datagram(b"junk", ("192.0.2.1", 7471), 0.0) is None
    assert r.on_datagram(hb.pack(hb.Message(hb.ANSWER, 1, 1)), ("192.0.2.1", 7471), 0.0) is None
    out = r.on_tagged(hb.TagInfo(50, 0x37, 0x1234, 9), 0.5)
    assert len(out) == 1 and out[0][1] == ("192.0.2.1", 7471)
    m = hb.unpack(out[0][0])
    assert m.type == hb.TAG_ANSWER and m.tag == hb.TagInfo(50, 0x37, 0x1234, 9)
    assert r.on_tagged(hb.TagInfo(50, 0x37, 0x1234, 10), 2.0) == []  # the lb went quiet


def _ip(proto: int, tos: int, body: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(body), 0, 0, 64, proto, 0,
                       bytes(4), bytes(4)) + body


def test_classify_raw() -> None:
    tag = 0x37 << 2
    assert classify_raw(_ip(50, tag, struct.pack("!II", 0x1234, 7)), 0x37) == hb.TagInfo(50, 0x37, 0x1234, 7)
    assert classify_raw(_ip(50, 0, struct.pack("!II", 0x1234, 7)), 0x37) is None
    udp = struct.pack("!HHHH", 4500, 4500, 16, 0) + struct.pack("!II", 0x99, 3)
    assert classify_raw(_ip(17, tag, udp), 0x37) == hb.TagInfo(17, 0x37, 0x99, 3)
    ike = struct.pack("!HHHH", 4500, 4500, 16, 0) + bytes(8)
    assert classify_raw(_ip(17, tag, ike), 0x37) is None
    vx = struct.pack("!HHHH", 1234, 4789, 16, 0) + struct.pack("!II", 0x08000000, 1001 << 8)
    assert classify_raw(_ip(17, tag, vx), 0x37) == hb.TagInfo(17, 0x37, 1001, 0)
    assert classify_raw(b"\x60" + bytes(40), 0x37) is None


def test_refusal_declares_dead_at_once_only_for_recent_probes() -> None:
    det = hb.Detector(hb.DetectorConfig(interval=I, misses=3))
    det.set_gpns({"gpn1": "192.0.2.21", "gpn2": "192.0.2.22"})
    probes, _ = det.tick(0.0)
    seq1 = next(s for n, _a, s in probes if n == "gpn1")
    seq2 = next(s for n, _a, s in probes if n == "gpn2")
    assert det.on_refused("192.0.2.21", seq2, 0.001) is None  # gpn2's probe, "refused" by gpn1
    assert det.on_refused("192.0.2.99", seq1, 0.001) is None  # not a GPN of ours
    assert det.on_refused("192.0.2.21", seq1 + 100, 0.001) is None  # never sent
    assert det.tracks["gpn1"].state == "unknown"
    tr = det.on_refused("192.0.2.21", seq1, 0.002)
    assert tr is not None and (tr.gpn, tr.state, tr.at) == ("gpn1", "dead", 0.002)
    assert "refused" in tr.reason
    assert det.on_refused("192.0.2.21", seq1, 0.003) is None  # already dead: no second declaration
    assert det.tracks["gpn1"].refusals == 2 and det.tracks["gpn2"].state == "unknown"
    # it comes back like any dead GPN: `recover` answered rounds
    _, trans = det.tick(I)
    assert trans == []
    got = run(det, I, 12, answer={"gpn1", "gpn2"})
    assert sorted((t.gpn, t.state) for t in got) == [("gpn1", "alive"), ("gpn2", "alive")]


def test_refusal_can_be_turned_off() -> None:
    det = hb.Detector(hb.DetectorConfig(interval=I, refused_is_dead=False))
    det.set_gpns({"gpn1": "192.0.2.21"})
    probes, _ = det.tick(0.0)
    assert det.on_refused("192.0.2.21", probes[0][2], 0.001) is None
    assert det.tracks["gpn1"].state == "unknown"


def _errqueue(errno_: int, origin: int, icmp: tuple[int, int], offender: str) -> list[tuple[int, int, bytes]]:
    import socket

    ee = hb.SOCK_EE.pack(errno_, origin, icmp[0], icmp[1], 0, 0, 0)
    sin = struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(offender))
    return [(socket.IPPROTO_IP, hb.IP_RECVERR, ee + sin)]


def test_refusal_parses_only_port_unreachable_from_the_gpn_itself() -> None:
    import errno

    probe = hb.pack(hb.Message(hb.PROBE, 42, 0))
    ok = _errqueue(errno.ECONNREFUSED, hb.SO_EE_ORIGIN_ICMP, (3, 3), "192.0.2.21")
    assert hb.refusal(probe, ok, ("192.0.2.21", 7471), 7471) == ("192.0.2.21", 42)
    assert hb.refusal(probe, ok, ("192.0.2.21", 9999), 7471) is None  # not our heartbeat port
    assert hb.refusal(hb.pack(hb.Message(hb.ANSWER, 42, 0)), ok, ("192.0.2.21", 7471), 7471) is None
    assert hb.refusal(b"junk", ok, ("192.0.2.21", 7471), 7471) is None
    router = _errqueue(errno.EHOSTUNREACH, hb.SO_EE_ORIGIN_ICMP, (3, 1), "192.0.2.1")
    assert hb.refusal(probe, router, ("192.0.2.21", 7471), 7471) is None
    relayed = _errqueue(errno.ECONNREFUSED, hb.SO_EE_ORIGIN_ICMP, (3, 3), "192.0.2.1")  # someone else says so
    assert hb.refusal(probe, relayed, ("192.0.2.21", 7471), 7471) is None
    assert hb.refusal(probe, [], ("192.0.2.21", 7471), 7471) is None


@pytest.mark.parametrize("probe_busy, rounds_to_dead", [(True, 1), (False, 2)])
def test_a_busy_gpn_whose_engine_dies_is_refused_within_a_round_when_probed_busy(
        probe_busy: bool, rounds_to_dead: int) -> None:
    """A GPN carrying traffic (tag answers) loses its engine: its host refuses the next
    probe. Probed every round, that is the round after the kill; with the paper's saving,
    the round after the kill sends no probe (the last one was tag-answered), and the
    refusal comes a round later."""
    det = hb.Detector(hb.DetectorConfig(interval=I, probe_busy=probe_busy))
    det.set_gpns({"gpn1": "192.0.2.21"})
    run(det, 0.0, 12, {"gpn1"}, tag={"gpn1"})  # alive and busy; the engine dies at 12 I
    now, dead_after = 12 * I, None
    for k in range(1, 4):
        probes, _tr = det.tick(now)
        for _name, addr, seq in probes:
            tr = det.on_refused(addr, seq, now + 0.0001)
            if tr is not None and dead_after is None:
                dead_after = k
        now += I
    assert dead_after == rounds_to_dead


def test_an_answer_the_network_refuses_does_not_stop_the_responder() -> None:
    """A link going down between a probe and its answer makes sendto fail (ENETUNREACH):
    the answer is dropped and the responder goes on (it used to die of it)."""
    import errno

    from protego.lb.heartbeat_responder import send_answer

    class DownLink:
        sent: list[tuple[bytes, tuple[str, int]]] = []

        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def sendto(self, msg: bytes, dst: tuple[str, int]) -> int:
            if self.fail:
                raise OSError(errno.ENETUNREACH, "Network is unreachable")
            self.sent.append((msg, dst))
            return len(msg)

    assert send_answer(DownLink(True), b"answer", ("192.0.2.1", 7471)) is False  # type: ignore[arg-type]
    assert send_answer(DownLink(False), b"answer", ("192.0.2.1", 7471)) is True  # type: ignore[arg-type]
    assert DownLink.sent == [(b"answer", ("192.0.2.1", 7471))]
