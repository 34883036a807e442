"""Outbound sequence numbers of one SA shared by several worker processes.

Every worker that encrypts for an outbound SA takes its sequence numbers from
*blocks* leased from one shared counter per SA (a slot in shared memory). The
grant rule is the drift rule of :class:`protego.esp.sequence.SequenceLeaser`
(see its docstring for the proof), applied to leases held by *processes*::

    a block [start, end] is granted only if
    end - min(start of every active lease, the new one included) < W - M

with ``W`` the receiver's replay window (strongSwan: 32) and ``M`` a margin for
reordering between the workers' transmit paths. ``block <= (W - M) / workers`` lets
every worker hold one block at a time. Numbers of a block that are not used are
skipped, never handed out again. Workers send in batches: a worker's registration
covers its lowest *unsent* number until the batch has been sent (the proof's "sent"
is "handed to the kernel"), then it releases. A worker busy with other traffic thus
never holds back the others for longer than one round.

The shared counter is the only source of sequence numbers for the SA: no number
is handed out twice (hence no AES-GCM IV repeats). A slot carries a *tag* (unique
per installed SA): a worker that still refers to a removed SA gets nothing from a
slot re-used by another SA. The lock is taken once per block, never per packet.

:class:`LocalSequence` is the single-worker case: the SA's own counter, no lock.
"""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.context
from typing import Any

from protego.esp.sa import SequenceExhaustedError
from protego.esp.sequence import MAX_SEQ_32, MAX_SEQ_64

__all__ = ["LeaseRefused", "SharedSequences", "SlotGone", "WorkerLeases"]

_TAG, _NEXT, _HARD, _SOFT, _REKEY = range(5)
_FIXED = 5


class SlotGone(Exception):
    """The slot no longer belongs to the SA (it was removed)."""


class LeaseRefused(Exception):
    """Granting a block now would let workers drift beyond the receiver's window."""


class SharedSequences:
    """A table of per-SA sequence counters and per-worker leases in shared memory.

    Create it in the parent before the workers fork; every process then uses the
    same memory and lock.
    """

    def __init__(self, slots: int, workers: int, receiver_window: int = 32, reorder_margin: int = 8,
                 ctx: multiprocessing.context.BaseContext | None = None) -> None:
        if workers < 1 or slots < 1:
            raise ValueError("slots and workers must be >= 1")
        effective = receiver_window - reorder_margin
        if effective < workers:
            raise ValueError("receiver window minus margin must leave one number per worker")
        ctx = ctx or multiprocessing.get_context("fork")
        self.slots = slots
        self.workers = workers
        self.effective_window = effective
        self.block = max(1, effective // workers)
        self._stride = _FIXED + 2 * workers
        self._a: Any = ctx.RawArray("Q", slots * self._stride)
        self._lock = ctx.Lock()
        self._tags = itertools.count(1)
        self._free = list(range(slots - 1, -1, -1))

    # -- owner side (the engine in the agent process) ------------------------ #
    def allocate(self, esn: bool = False, soft_limit: int | None = None,
                 hard_limit: int | None = None) -> tuple[int, int]:
        """A fresh counter starting at 1; returns ``(slot, tag)``."""
        if not self._free:
            raise SequenceExhaustedError("no free sequence slot (too many outbound SAs)")
        slot = self._free.pop()
        tag = next(self._tags)
        end = MAX_SEQ_64 if esn else MAX_SEQ_32
        hard = end if hard_limit is None else min(hard_limit, end)
        soft = hard - (hard >> 3) if soft_limit is None else soft_limit
        base = slot * self._stride
        with self._lock:
            a = self._a
            for i in range(self._stride):
                a[base + i] = 0
            a[base + _NEXT] = 1
            a[base + _HARD] = hard
            a[base + _SOFT] = soft
            a[base + _TAG] = tag
        return slot, tag

    def free(self, slot: int, tag: int) -> None:
        """The SA is gone: invalidate the slot (tag 0) and make it reusable."""
        base = slot * self._stride
        with self._lock:
            if self._a[base + _TAG] == tag:
                self._a[base + _TAG] = 0
        self._free.append(slot)

    def next_value(self, slot: int) -> int:
        return int(self._a[slot * self._stride + _NEXT])

    def rekey_requested(self, slot: int) -> bool:
        return bool(self._a[slot * self._stride + _REKEY])

    # -- worker side ---------------------------------------------------------- #
    def lease(self, slot: int, tag: int, worker: int, want: int, keep_low: int = 0) -> tuple[int, int]:
        """Grant ``worker`` up to ``min(want, block)`` numbers. Its previous block on
        this slot is released first, unless ``keep_low`` is given: the lowest number
        the worker may still have *unsent* (queued for a batched send); the worker's
        registration then stays at that number, so no other worker can run ahead of
        it by the window. Raises :class:`LeaseRefused` (retry later; the worker's
        registration is left at ``keep_low``), :class:`SlotGone` or
        ``SequenceExhaustedError``."""
        base = slot * self._stride
        own = base + _FIXED + 2 * worker
        a = self._a
        with self._lock:
            if a[base + _TAG] != tag:
                raise SlotGone(slot)
            a[own] = keep_low
            start = a[base + _NEXT]
            hard = a[base + _HARD]
            if start > hard:
                raise SequenceExhaustedError("outbound sequence numbers exhausted, rekey required")
            end = min(start + min(max(want, 1), self.block) - 1, hard)
            mine = min(start, keep_low) if keep_low else start
            low = mine
            for w in range(self.workers):
                s = a[base + _FIXED + 2 * w]
                if s and s < low:
                    low = s
            if end - low >= self.effective_window:
                raise LeaseRefused(slot)
            a[base + _NEXT] = end + 1
            a[own] = mine
            a[own + 1] = end
            if end >= a[base + _SOFT]:
                a[base + _REKEY] = 1
        return int(start), int(end)

    def release(self, slot: int, tag: int, worker: int) -> None:
        base = slot * self._stride
        with self._lock:
            if self._a[base + _TAG] == tag:
                self._a[base + _FIXED + 2 * worker] = 0


class WorkerLeases:
    """One worker's blocks; lock-free per packet.

    ``take`` hands out the numbers of the current block; when it is used up the next
    block is leased with ``keep_low`` = the first number leased since the last
    :meth:`release_all`, because the worker queues packets and sends them in a batch:
    until that batch is sent, its registration must cover its lowest unsent number.
    The worker calls :meth:`release_all` right *after* each batch is sent (and when a
    block is refused: send what is queued, release, retry).
    """

    __slots__ = ("_held", "_low", "_shared", "refused", "worker")

    def __init__(self, shared: SharedSequences, worker: int) -> None:
        self._shared = shared
        self.worker = worker
        # keyed by (slot, tag): a block of a removed SA is never used for the SA that
        # re-uses its slot (its numbers come from the old counter)
        self._held: dict[tuple[int, int], list[int]] = {}  # current block: [next, end]
        self._low: dict[tuple[int, int], int] = {}  # lowest number leased since the last release
        self.refused = 0

    def take(self, slot: int, tag: int, want: int = 1 << 30) -> int | None:
        """The next sequence number for the SA in ``slot`` or ``None`` when a block
        cannot be granted right now (or the SA is gone)."""
        key = (slot, tag)
        cur = self._held.get(key)
        if cur is not None and cur[0] <= cur[1]:
            seq = cur[0]
            cur[0] = seq + 1
            return seq
        try:
            start, end = self._shared.lease(slot, tag, self.worker, want, self._low.get(key, 0))
        except (LeaseRefused, SlotGone):
            self.refused += 1
            self._held.pop(key, None)
            return None
        self._held[key] = [start + 1, end]
        self._low.setdefault(key, start)
        return start

    def holding(self) -> bool:
        """Whether this worker has leased numbers since its last :meth:`release_all`."""
        return bool(self._low)

    def release_all(self) -> None:
        """After a batch was sent: give every block back (unused numbers are skipped)."""
        if not self._low:
            return
        for slot, tag in self._low:
            self._shared.release(slot, tag, self.worker)
        self._held.clear()
        self._low.clear()
