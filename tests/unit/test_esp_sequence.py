"""Outbound sequence numbers and the per-worker sequence block leases.

The drift rule (protego/esp/sequence.py): a block ``[start, end]`` is granted only
if ``end - min(start of active leases) < W - M``. These tests simulate several
workers (some stalling) sending on one SA in random interleavings and check

* the invariant: whenever ``s`` is sent, everything sent before is below
  ``s + W - M``;
* end to end: a receiver with strongSwan's default window of 32 accepts every
  packet, also when the network lets later packets numbered up to ``M`` above the
  previous top overtake a packet.
"""

from __future__ import annotations

import random

import pytest

from protego.esp import OutboundSequence, SequenceExhaustedError, SequenceLeaser
from protego.esp.sequence import MAX_SEQ_32, MAX_SEQ_64


class Receiver:
    """RFC 4303 receiver window of ``size`` (any size, e.g. strongSwan's 32)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.top = 0
        self.seen: set[int] = set()
        self.too_old = 0
        self.replayed = 0

    def receive(self, seq: int) -> None:
        if seq + self.size <= self.top:
            self.too_old += 1
        elif seq in self.seen:
            self.replayed += 1
        else:
            self.seen.add(seq)
            self.top = max(self.top, seq)


def test_counter_never_reuses_and_refuses_to_wrap() -> None:
    s = OutboundSequence(hard_limit=10, soft_limit=8)
    got = [s.next() for _ in range(7)]
    assert got == list(range(1, 8)) and not s.rekey_requested
    assert s.next() == 8 and s.rekey_requested
    assert s.reserve(5) == (9, 10)  # trimmed at the hard limit
    assert s.exhausted
    for _ in range(2):
        with pytest.raises(SequenceExhaustedError):
            s.next()
        with pytest.raises(SequenceExhaustedError):
            s.reserve(1)


def test_limits_defaults_and_validation() -> None:
    s32, s64 = OutboundSequence(), OutboundSequence(esn=True)
    assert s32.hard_limit == MAX_SEQ_32 and s64.hard_limit == MAX_SEQ_64
    assert s32.soft_limit < s32.hard_limit - (1 << 28)
    assert s64.soft_limit < s64.hard_limit - (1 << 60)
    s32._next = MAX_SEQ_32
    assert s32.next() == MAX_SEQ_32
    with pytest.raises(SequenceExhaustedError):
        s32.next()
    for kwargs in ({"hard_limit": 0}, {"hard_limit": MAX_SEQ_32 + 1},
                   {"soft_limit": 0}, {"soft_limit": 11, "hard_limit": 10}):
        with pytest.raises(ValueError):
            OutboundSequence(**kwargs)  # type: ignore[arg-type]


def simulate(workers: int, block: int, window: int, margin: int, steps: int,
             seed: int, stall_prob: float = 0.0) -> tuple[Receiver, int]:
    """Workers lease blocks and send their numbers in a random interleaving."""
    rng = random.Random(seed)
    leaser = SequenceLeaser(OutboundSequence(), block, window, margin)
    leases: dict[int, object] = {}
    sent: list[int] = []
    refused = 0
    for _ in range(steps):
        w = rng.randrange(workers)
        if rng.random() < stall_prob:
            continue  # this worker is descheduled for a while
        lease = leases.get(w)
        seq = lease.take() if lease is not None else None  # type: ignore[attr-defined]
        if seq is None:
            new = leaser.lease(w)
            if new is None:
                refused += 1
                continue
            leases[w] = new
            seq = new.take()
        sent.append(seq)
        if rng.random() < 0.01:  # occasionally a worker goes idle and releases
            leaser.release(w)
            leases.pop(w, None)
    assert len(sent) == len(set(sent)), "a sequence number was sent twice"
    # the invariant behind the drift rule
    top = 0
    tops_before = []
    for s in sent:
        assert top < s + window - margin, (top, s)
        tops_before.append(top)
        top = max(top, s)
    # network: packet i may be overtaken by later packets numbered at most
    # tops_before[i] + margin (a packet that would overtake it by more waits)
    arrival: list[int] = []
    held: list[int] = []  # indexes of delayed packets, in send order
    for i, s in enumerate(sent):
        for j in list(held):
            if s > max(tops_before[j], sent[j]) + margin:
                arrival.append(j)  # j must arrive before i could overtake it
                held.remove(j)
        if rng.random() < 0.3:
            held.append(i)
        else:
            arrival.append(i)
    arrival.extend(held)
    rx = Receiver(window)
    for i in arrival:
        rx.receive(sent[i])
    assert len(rx.seen) == len(sent)
    return rx, refused


@pytest.mark.parametrize("workers,block,margin", [
    (2, 16, 0), (4, 8, 0), (4, 4, 8), (8, 4, 0), (3, 10, 2)])
def test_leases_never_overrun_a_32_packet_replay_window(workers: int, block: int,
                                                        margin: int) -> None:
    for seed in range(5):
        rx, _refused = simulate(workers, block, 32, margin, 20000, seed, stall_prob=0.3)
        assert rx.too_old == 0 and rx.replayed == 0


def test_naive_blocks_do_overrun_the_window() -> None:
    """Control: without the drift rule (blocks of 64 per worker) packets fall out."""
    rng = random.Random(1)
    seq = OutboundSequence()
    blocks = {}
    for w in range(4):
        a, b = seq.reserve(64)
        blocks[w] = iter(range(a, b + 1))
    sent = []
    for _ in range(10000):
        w = rng.randrange(4)
        try:
            sent.append(next(blocks[w]))
        except StopIteration:
            a, b = seq.reserve(64)
            blocks[w] = iter(range(a + 1, b + 1))
            sent.append(a)
    rx = Receiver(32)
    for s in sent:
        rx.receive(s)
    assert rx.too_old > 0


def test_stalled_worker_blocks_the_others_until_released() -> None:
    leaser = SequenceLeaser(OutboundSequence(), block_size=8, receiver_window=32)
    a = leaser.lease(0)
    assert a is not None and (a.start, a.end) == (1, 8)
    granted = [leaser.lease(w) for w in (1, 2, 3)]
    assert all(g is not None for g in granted)  # 1..32 in flight: exactly the window
    assert leaser.lease(1) is None  # 33..40 would be 32+ ahead of worker 0's block
    leaser.release(0)
    assert a.take() is None  # a released block is dead: its rest is skipped
    b = leaser.lease(1)
    assert b is not None and (b.start, b.end) == (33, 40)  # the refusal reserved nothing


def test_refused_lease_reserves_nothing() -> None:
    seq = OutboundSequence()
    leaser = SequenceLeaser(seq, block_size=16, receiver_window=32)
    assert leaser.lease(0) is not None
    assert leaser.lease(1) is not None
    before = seq.next_value
    assert leaser.lease(2) is None
    assert seq.next_value == before


def test_leaser_validation_and_exhaustion() -> None:
    with pytest.raises(ValueError):
        SequenceLeaser(OutboundSequence(), block_size=33, receiver_window=32)
    with pytest.raises(ValueError):
        SequenceLeaser(OutboundSequence(), block_size=4, receiver_window=32, reorder_margin=32)
    leaser = SequenceLeaser(OutboundSequence(hard_limit=10), block_size=4, receiver_window=32)
    spans = []
    for w in range(3):
        lease = leaser.lease(w)
        assert lease is not None
        spans.append((lease.start, lease.end))
    assert spans == [(1, 4), (5, 8), (9, 10)]
    with pytest.raises(SequenceExhaustedError):
        leaser.lease(3)
