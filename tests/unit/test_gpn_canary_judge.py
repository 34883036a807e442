"""The xfrm GPN's canary verdict (protego/gpn/kernel_health.py CanaryJudge): broken only
after ``misses`` canaries the kernel never brought back, in a row; a stalled reader
whose echoes wait in its socket loses nothing."""

from __future__ import annotations

from protego.gpn.kernel_health import CanaryJudge


def test_echoed_canaries_keep_the_path_healthy() -> None:
    j = CanaryJudge(misses=3, timeout=0.15)
    for i in range(10):
        t = bytes([i])
        j.on_sent(t, i * 0.1)
        assert j.on_echo(t)
        j.expire(i * 0.1 + 0.1)
    assert j.verdict() is None
    assert (j.sent, j.ok, j.lost) == (10, 10, 0)


def test_three_lost_in_a_row_break_it_and_one_echo_heals_it() -> None:
    j = CanaryJudge(misses=3, timeout=0.15)
    now = 0.0
    for i in range(3):
        j.on_sent(bytes([i]), now)
        now += 0.1
        j.expire(now)
    assert j.verdict() is None  # the third is not late yet
    now += 0.1
    j.expire(now)
    assert j.missed == 3 and j.lost == 3
    why = j.verdict()
    assert why is not None and "canary" in why and "3 times in a row" in why
    j.on_sent(b"x", now)
    assert j.on_echo(b"x")
    assert j.verdict() is None and j.missed == 0


def test_losses_that_are_not_in_a_row_do_not_break_it() -> None:
    j = CanaryJudge(misses=3, timeout=0.15)
    now = 0.0
    for i in range(12):
        t = bytes([i])
        j.on_sent(t, now)
        if i % 3 == 2:  # every third comes back
            j.on_echo(t)
        now += 0.2
        j.expire(now)
        assert j.verdict() is None, i
    assert j.lost == 8 and j.ok == 4


def test_a_stalled_reader_loses_nothing_when_the_echoes_are_read_before_expiry() -> None:
    """The caller drains its socket before expire(): echoes that arrived while its
    thread was stalled for seconds count as received."""
    j = CanaryJudge(misses=3, timeout=0.15)
    j.on_sent(b"a", 0.0)
    # 5 s later (the thread did not run): first the waiting echo, then the expiry
    assert j.on_echo(b"a")
    j.expire(5.0)
    assert j.verdict() is None and j.lost == 0


def test_refused_sends_count_as_lost() -> None:
    j = CanaryJudge(misses=2, timeout=0.15)
    j.on_refused()
    assert j.verdict() is None
    j.on_refused()
    assert j.verdict() is not None and j.lost == 2


def test_an_unknown_or_late_echo_is_ignored_and_reset_forgets_what_was_in_flight() -> None:
    j = CanaryJudge(misses=1, timeout=0.15)
    assert not j.on_echo(b"never sent")
    j.on_sent(b"a", 0.0)
    j.expire(1.0)
    assert not j.on_echo(b"a")  # already counted lost
    assert j.verdict() is not None
    j.on_sent(b"b", 1.0)
    j.reset()  # the canary's SAs went with the last tunnel
    j.expire(10.0)
    assert j.verdict() is None and j.missed == 0
