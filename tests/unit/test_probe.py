"""The sequence-numbered UDP probe on loopback: exact counts, lost packets by sequence number."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from protego.testbed.probe import _compress, _expand


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _echo(port: int) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-m", "protego.testbed.probe", "echo", "--port", str(port),
                          "--bind", "127.0.0.1"], stdout=subprocess.PIPE, text=True)
    assert p.stdout and p.stdout.readline().strip() == "ready"
    return p


def _send(port: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "protego.testbed.probe", "send", "--dst", "127.0.0.1",
                             "--port", str(port), *args], stdout=subprocess.PIPE, text=True)


def test_ranges_round_trip() -> None:
    seqs = [0, 1, 2, 5, 7, 8, 100]
    assert _compress(seqs) == [[0, 2], [5, 5], [7, 8], [100, 100]]
    assert _expand(_compress(seqs)) == set(seqs)
    assert _compress([]) == []


def test_every_datagram_comes_back_and_is_counted() -> None:
    port = _free_port()
    echo = _echo(port)
    try:
        out, _ = _send(port, "--count", "200", "--interval-ms", "2", "--linger", "2").communicate(timeout=30)
        res = json.loads(out)
    finally:
        echo.terminate()
        eout, _ = echo.communicate(timeout=10)
    assert res["sent"] == 200 and res["received"] == 200 and res["missing"] == []
    assert res["rtt_median_ms"] is not None and res["rtt_median_ms"] < 50
    assert json.loads(eout)["seen"] == [[0, 199]]


def test_datagrams_sent_before_the_echo_starts_are_reported_missing() -> None:
    port = _free_port()
    t0 = time.time()
    sender = _send(port, "--interval-ms", "5", "--linger", "1")
    time.sleep(0.5)
    t1 = time.time()
    echo = _echo(port)
    try:
        time.sleep(0.5)
        sender.terminate()
        res = json.loads(sender.communicate(timeout=30)[0])
    finally:
        echo.terminate()
        seen = _expand(json.loads(echo.communicate(timeout=10)[0])["seen"])
    missing = _expand(res["missing"])
    assert missing and 0 in missing, "the first datagrams went nowhere"
    assert res["received"] == res["sent"] - len(missing) > 0
    assert not missing & seen, "the echo never saw what is missing: forward losses"
    assert res["max_gap_ms"] is not None
    # each missing range is dated by when its ends were sent: before the echo started
    assert len(res["missing_at"]) == len(res["missing"])
    first, last = res["missing_at"][0]
    assert t0 <= first <= last <= t1 + 0.5, (t0, t1, res["missing_at"])
    from protego.testbed.probe import ProbeResult, _lost_at
    at = _lost_at(res)
    assert set(at) == missing and at[0] == first
    text = ProbeResult(sent=res["sent"], received=res["received"], lost_forward=sorted(missing),
                       lost_at=at).describe()
    assert f"0-{res['missing'][0][1]} sent {time.strftime('%H:%M:%S', time.gmtime(first))}" in text
