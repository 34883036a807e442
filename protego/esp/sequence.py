"""Outbound sequence numbers: never reused, never wrapped, leased in blocks.

:class:`OutboundSequence` hands out 1, 2, 3, ... up to the end of the sequence
space (2^32 - 1, or 2^64 - 1 with ESN; RFC 4303 3.3.3: the counter must not
cycle). Past ``soft_limit`` it sets :attr:`OutboundSequence.rekey_requested`
(the agent asks charon for a rekey); at ``hard_limit`` it raises
:class:`~protego.esp.sa.SequenceExhaustedError` and never hands out a number again.

:class:`SequenceLeaser` lets several workers send on one SA without a lock per
packet: each worker *leases* a block of consecutive numbers and uses them
locally. Numbers of a block that a worker does not use are simply skipped
(a receiver does not care about gaps); they are never handed out again.

Drift rule (why a receiver's replay window is never overrun)
------------------------------------------------------------
Let ``W`` be the receiver's replay window (strongSwan's default is 32) and
``M`` a margin kept free for reordering in the network (``W_eff = W - M``). A new
block ``[start, end]`` is granted only if::

    end - min(start of every active lease, including the new one) < W_eff

Claim: when a worker sends ``s``, every number sent before it is below
``s + W_eff``. Proof: ``s`` comes from an active lease ``L``, so ``s >= L.start``.
Every number granted *before* ``L`` is below ``L.start``; every block granted
*while* ``L`` is active ends below ``L.start + W_eff``. So at the moment ``s`` is
sent the highest number sent so far is ``top < L.start + W_eff <= s + W_eff``,
i.e. ``s > top - W_eff``: the interleaving of the workers never pushes ``s`` out
of the receiver's window, and ``s`` still survives being overtaken in the network
by later packets numbered up to ``M`` above that ``top``. (Reordering by more than
that would drop packets of a single-worker sender as well.)

A worker that cannot get a block (``lease`` returns ``None``) must wait until
the slowest worker moves on or releases its block; that is the price of the
bound. Blocks must therefore be small: ``block_size <= W_eff / workers`` lets
every worker hold one block at a time.

The leaser itself is single-threaded; in the multi-process GPN it lives with
the SA's owner and workers lease through it (a lease per block, not per packet).
"""

from __future__ import annotations

import logging

from .sa import SequenceExhaustedError

__all__ = ["MAX_SEQ_32", "MAX_SEQ_64", "OutboundSequence", "SequenceLease", "SequenceLeaser"]

log = logging.getLogger(__name__)

MAX_SEQ_32 = 0xFFFFFFFF
MAX_SEQ_64 = 0xFFFFFFFFFFFFFFFF


class OutboundSequence:
    """Monotonic sequence counter of one outbound SA."""

    __slots__ = ("_next", "esn", "hard_limit", "label", "rekey_requested", "soft_limit")

    def __init__(
        self,
        esn: bool = False,
        soft_limit: int | None = None,
        hard_limit: int | None = None,
        label: str = "",
    ) -> None:
        end = MAX_SEQ_64 if esn else MAX_SEQ_32
        hard = end if hard_limit is None else hard_limit
        if not 1 <= hard <= end:
            raise ValueError(f"hard_limit must be in 1..{end:#x}")
        # Default soft limit: 1/8 of the space before the end. For 32-bit counters
        # that leaves 2^29 numbers (about 1.5 h at 100k packets/s) to finish a rekey.
        soft = hard - (hard >> 3) if soft_limit is None else soft_limit
        if not 1 <= soft <= hard:
            raise ValueError("soft_limit must be in 1..hard_limit")
        self.esn = esn
        self.hard_limit = hard
        self.soft_limit = soft
        self._next = 1
        self.rekey_requested = False
        self.label = label

    def __repr__(self) -> str:
        return (f"<OutboundSequence next={self._next} soft={self.soft_limit} "
                f"hard={self.hard_limit} rekey={self.rekey_requested}>")

    @property
    def next_value(self) -> int:
        """The number the next call to :meth:`next` returns."""
        return self._next

    @property
    def exhausted(self) -> bool:
        return self._next > self.hard_limit

    def next(self) -> int:
        """Return the next unused sequence number."""
        seq = self._next
        if seq > self.hard_limit:
            raise SequenceExhaustedError(
                f"{self.label}: outbound sequence numbers exhausted, rekey required"
            )
        self._next = seq + 1
        if seq >= self.soft_limit and not self.rekey_requested:
            self.rekey_requested = True
            log.warning("%s: sequence number %d reached soft limit, requesting rekey",
                        self.label, seq)
        return seq

    def reserve(self, count: int) -> tuple[int, int]:
        """Reserve up to ``count`` consecutive numbers; return ``(first, last)``.

        The block is trimmed at the hard limit; raises when nothing is left.
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        first = self._next
        if first > self.hard_limit:
            raise SequenceExhaustedError(
                f"{self.label}: outbound sequence numbers exhausted, rekey required"
            )
        last = min(first + count - 1, self.hard_limit)
        self._next = last + 1
        if last >= self.soft_limit and not self.rekey_requested:
            self.rekey_requested = True
            log.warning("%s: sequence number %d reached soft limit, requesting rekey",
                        self.label, last)
        return first, last


class SequenceLease:
    """A block of sequence numbers owned by one worker (used without locks)."""

    __slots__ = ("_next", "active", "end", "start", "worker")

    def __init__(self, worker: int, start: int, end: int) -> None:
        self.worker = worker
        self.start = start
        self.end = end
        self._next = start
        self.active = True

    def __repr__(self) -> str:
        return f"<SequenceLease worker={self.worker} [{self.start}..{self.end}] next={self._next}>"

    @property
    def remaining(self) -> int:
        return self.end - self._next + 1 if self.active else 0

    def take(self) -> int | None:
        """Next number of the block, or ``None`` when used up or released."""
        seq = self._next
        if not self.active or seq > self.end:
            return None
        self._next = seq + 1
        return seq


class SequenceLeaser:
    """Grants blocks of one SA's sequence space to workers under the drift rule."""

    def __init__(
        self,
        sequence: OutboundSequence,
        block_size: int,
        receiver_window: int = 32,
        reorder_margin: int = 0,
    ) -> None:
        effective = receiver_window - reorder_margin
        if effective < 1:
            raise ValueError("reorder_margin must be smaller than the receiver window")
        if not 1 <= block_size <= effective:
            raise ValueError(
                f"block_size must be in 1..{effective} (receiver window minus margin)"
            )
        self.sequence = sequence
        self.block_size = block_size
        self.receiver_window = receiver_window
        self.reorder_margin = reorder_margin
        self.effective_window = effective
        self._active: dict[int, SequenceLease] = {}

    @property
    def active_leases(self) -> list[SequenceLease]:
        return list(self._active.values())

    def lease(self, worker: int) -> SequenceLease | None:
        """Grant ``worker`` a new block (its previous block is released first).

        Returns ``None`` when granting would break the drift rule; the worker
        retries later. Raises ``SequenceExhaustedError`` at the end of the space.
        """
        old = self._active.pop(worker, None)
        if old is not None:
            old.active = False
        start = self.sequence.next_value
        if start > self.sequence.hard_limit:
            self.sequence.reserve(1)  # raises SequenceExhaustedError
        end = min(start + self.block_size - 1, self.sequence.hard_limit)
        low = min((lease.start for lease in self._active.values()), default=start)
        if end - low >= self.effective_window:
            return None
        first, last = self.sequence.reserve(end - start + 1)
        lease = SequenceLease(worker, first, last)
        self._active[worker] = lease
        return lease

    def release(self, worker: int) -> None:
        """The worker is done (idle or stopping); its unused numbers are skipped."""
        old = self._active.pop(worker, None)
        if old is not None:
            old.active = False
