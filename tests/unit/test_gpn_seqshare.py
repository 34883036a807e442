"""Sequence blocks shared by worker processes: never reused, never beyond the
receiver's window (the drift rule of protego.esp.sequence.SequenceLeaser)."""

from __future__ import annotations

import multiprocessing
import random

import pytest

from protego.esp.sa import SequenceExhaustedError
from protego.esp.sequence import OutboundSequence, SequenceLeaser
from protego.gpn.seqshare import LeaseRefused, SharedSequences, SlotGone, WorkerLeases


def test_blocks_sized_for_the_window() -> None:
    s = SharedSequences(4, workers=2, receiver_window=32, reorder_margin=8)
    assert s.block == 12 and s.effective_window == 24
    with pytest.raises(ValueError):
        SharedSequences(4, workers=30, receiver_window=32, reorder_margin=8)


def test_same_decisions_as_the_single_process_leaser() -> None:
    """Random lease/release sequences: the shared table grants exactly what
    SequenceLeaser grants (same numbers, same refusals)."""
    rnd = random.Random(11)
    for _trial in range(200):
        workers = rnd.randint(1, 4)
        shared = SharedSequences(1, workers, receiver_window=32, reorder_margin=4)
        slot, tag = shared.allocate()
        ref = SequenceLeaser(OutboundSequence(), block_size=shared.block, receiver_window=32, reorder_margin=4)
        for _step in range(60):
            w = rnd.randrange(workers)
            if rnd.random() < 0.3:
                shared.release(slot, tag, w)
                ref.release(w)
                continue
            want = ref.lease(w)
            try:
                got = shared.lease(slot, tag, w, shared.block)
            except LeaseRefused:
                got = None
            assert (got is None) == (want is None)
            if want is not None:
                assert got == (want.start, want.end)


def test_numbers_never_reused_and_drift_bounded_with_batched_sends() -> None:
    """Workers queue packets and send them in batches (then release), as the GPN
    worker does; whenever a number is sent, every number sent before it is below
    it + the effective window, so the receiver's window (32) is never overrun."""
    shared = SharedSequences(2, workers=3, receiver_window=32, reorder_margin=8)
    slot, tag = shared.allocate()
    leases = [WorkerLeases(shared, w) for w in range(3)]
    queues: list[list[int]] = [[], [], []]
    rnd = random.Random(5)
    sent: list[int] = []
    top = 0

    def flush(w: int) -> None:
        nonlocal top
        for seq in queues[w]:
            assert top < seq + shared.effective_window, (top, seq)
            top = max(top, seq)
            sent.append(seq)
        queues[w].clear()
        leases[w].release_all()

    for _ in range(30000):
        w = rnd.randrange(3)
        seq = leases[w].take(slot, tag)
        if seq is None:
            flush(w)  # what the worker does before waiting for a block
            seq = leases[w].take(slot, tag)
        if seq is not None:
            queues[w].append(seq)
        if rnd.random() < 0.05:
            flush(w)
    for w in range(3):
        flush(w)
    assert len(sent) == len(set(sent)) > 20000


def test_slot_reuse_does_not_leak_numbers_to_a_removed_sa() -> None:
    shared = SharedSequences(1, workers=2)
    slot, tag = shared.allocate()
    assert shared.lease(slot, tag, 0, 5) == (1, 5)
    shared.free(slot, tag)
    slot2, tag2 = shared.allocate()
    assert slot2 == slot and tag2 != tag
    with pytest.raises(SlotGone):
        shared.lease(slot, tag, 1, 5)  # a worker still holding the old SA gets nothing
    assert shared.lease(slot2, tag2, 1, 5)[0] == 1
    w = WorkerLeases(shared, 0)
    assert w.take(slot, tag) is None and w.refused == 1


def test_a_block_of_a_removed_sa_is_not_used_for_the_next_sa_in_its_slot() -> None:
    shared = SharedSequences(1, workers=2, receiver_window=32, reorder_margin=8)
    slot, tag = shared.allocate()
    w = WorkerLeases(shared, 0)
    for _ in range(5):
        w.take(slot, tag)  # block 1..12 held, 6 is next
    shared.free(slot, tag)
    slot2, tag2 = shared.allocate()  # same slot, new SA, counter from 1
    assert slot2 == slot
    assert w.take(slot2, tag2) == 1  # from the new counter, not 6 from the old block


def test_exhaustion_and_rekey_flag() -> None:
    shared = SharedSequences(1, workers=2, receiver_window=32, reorder_margin=8)
    slot, tag = shared.allocate(hard_limit=20, soft_limit=10)
    assert shared.lease(slot, tag, 0, 12) == (1, 12)
    assert shared.rekey_requested(slot)
    assert shared.lease(slot, tag, 1, 12) == (13, 20)  # trimmed at the hard limit
    with pytest.raises(SequenceExhaustedError):
        shared.lease(slot, tag, 0, 12)


def _worker(shared: SharedSequences, slot: int, tag: int, w: int, n: int, q: multiprocessing.Queue[list[int]]) -> None:
    leases = WorkerLeases(shared, w)
    out = []
    while len(out) < n:
        seq = leases.take(slot, tag)
        if seq is not None:
            out.append(seq)
        if len(out) % 7 == 0:
            leases.release_all()
    leases.release_all()
    q.put(out)


def test_two_processes_share_one_counter() -> None:
    ctx = multiprocessing.get_context("fork")
    shared = SharedSequences(4, workers=2, ctx=ctx)
    slot, tag = shared.allocate()
    q: multiprocessing.Queue[list[int]] = ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(shared, slot, tag, w, 3000, q)) for w in range(2)]
    for p in ps:
        p.start()
    got = [q.get(timeout=30) for _ in ps]
    for p in ps:
        p.join(10)
    allnums = got[0] + got[1]
    assert len(allnums) == len(set(allnums)) == 6000
    assert all(a < b for a, b in zip(got[0], got[0][1:]))  # each worker's numbers increase
