"""``LatestWriter``: the newest item is written, in order, without holding up the submitter;
failures go to the owner; stop writes what is pending."""

from __future__ import annotations

import threading
import time

from protego.store.writer import LatestWriter


class Gated:
    """A write that holds item 1 until ``gate`` opens (``started`` says it is being written)."""

    def __init__(self) -> None:
        self.gate, self.started = threading.Event(), threading.Event()
        self.written: list[int] = []

    def __call__(self, item: int) -> None:
        if item == 1:
            self.started.set()
            assert self.gate.wait(5)
        self.written.append(item)


def test_items_submitted_during_a_write_collapse_into_the_newest() -> None:
    g = Gated()
    gate, started, written = g.gate, g.started, g.written
    w: LatestWriter[int] = LatestWriter("test-writer", g)
    try:
        t0 = time.monotonic()
        w.submit(1)
        assert started.wait(5)
        for i in (2, 3, 4):  # while 1 is being written
            w.submit(i)
        assert time.monotonic() - t0 < 0.5  # the submitter never waits for the write
        assert not w.flush(0.1)  # 1 is still being written
        gate.set()
        assert w.flush(5)
        assert written == [1, 4]
        w.submit(5)
        assert w.flush(5) and written == [1, 4, 5]
    finally:
        gate.set()
        w.stop()


def test_a_failed_write_goes_to_the_owner_and_the_writer_goes_on() -> None:
    failures: list[tuple[int, str]] = []
    written: list[int] = []

    def write(item: int) -> None:
        if item == 2:
            raise RuntimeError("etcd unreachable")
        written.append(item)

    w: LatestWriter[int] = LatestWriter("test-writer", write, lambda item, exc: failures.append((item, str(exc))))
    try:
        for i in (1, 2, 3):
            w.submit(i)
            assert w.flush(5)
        assert written == [1, 3] and failures == [(2, "etcd unreachable")]
    finally:
        w.stop()


def test_stop_writes_what_is_pending_and_refuses_more() -> None:
    g = Gated()
    gate, started, written = g.gate, g.started, g.written
    w: LatestWriter[int] = LatestWriter("test-writer", g)
    w.submit(1)
    assert started.wait(5)
    w.submit(2)
    threading.Timer(0.1, gate.set).start()
    w.stop(5)
    assert written == [1, 2]
    try:
        w.submit(3)
    except RuntimeError:
        pass
    else:
        raise AssertionError("a stopped writer accepted an item")
