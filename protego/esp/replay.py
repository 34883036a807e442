"""Anti-replay window (RFC 4303 section 3.4.3; ESN inference per Appendix A).

The window is a fixed ring bitmap allocated once per SA (in the style of
RFC 6479): the ring holds ``ring_bits`` bits (a power of two, at least
``size + 8``), sequence number ``s`` lives at bit ``s mod ring_bits``. When the
top of the window moves forward, the whole bytes ("blocks") between the old and
the new top are cleared with slice assignment from a pre-allocated zero buffer;
nothing grows or is reallocated per packet.

Usage per inbound packet (the engine does this):

1. ``seq = window.infer(seq_lo)`` -- full sequence number (ESN: with the inferred
   high-order 32 bits), or ``-1`` when no valid number can be inferred.
2. ``window.check(seq)`` -- cheap pre-check before the ICV (RFC 4303 3.4.3).
3. verify the ICV with ``seq >> 32`` as the implicit high bits;
4. ``window.update(seq)`` -- only after the ICV verified.

Not implemented: the optional ESN re-synchronisation of RFC 4303 Appendix A3
(after more than 2^32 consecutive lost packets the receiver would be stuck; the
SA is rekeyed long before that).
"""

from __future__ import annotations

from .sa import MAX_REPLAY_WINDOW, MIN_REPLAY_WINDOW

__all__ = ["ReplayWindow"]

_MASK32 = 0xFFFFFFFF


class ReplayWindow:
    """Sliding receive window of ``size`` sequence numbers."""

    __slots__ = ("_ring", "_ring_bytes", "_ring_mask", "_zeros", "esn", "size", "top")

    def __init__(self, size: int, esn: bool = False) -> None:
        if not MIN_REPLAY_WINDOW <= size <= MAX_REPLAY_WINDOW:
            raise ValueError(
                f"replay window {size} not in {MIN_REPLAY_WINDOW}..{MAX_REPLAY_WINDOW}"
            )
        self.size = size
        self.esn = esn
        self.top = 0  # highest authenticated sequence number so far (0: none)
        ring_bytes = 1
        while ring_bytes * 8 < size + 8:
            ring_bytes <<= 1
        self._ring_bytes = ring_bytes
        self._ring_mask = ring_bytes * 8 - 1
        self._ring = bytearray(ring_bytes)
        self._zeros = bytes(ring_bytes)

    def __repr__(self) -> str:
        return f"<ReplayWindow size={self.size} esn={self.esn} top={self.top}>"

    def infer(self, seq_lo: int) -> int:
        """Full sequence number for the transmitted low 32 bits.

        Without ESN this is ``seq_lo`` itself (0 is never valid: ``-1``). With ESN
        it follows RFC 4303 Appendix A2.2: the high-order bits are chosen so the
        number falls in or above the window; ``-1`` if that would be negative.
        """
        if not self.esn:
            return seq_lo if seq_lo else -1
        top = self.top
        th = top & _MASK32
        hi = top >> 32
        tl = (top - self.size + 1) & _MASK32  # low 32 bits of the window bottom
        if th >= self.size - 1:
            # Case A: the window lies within one 2^32 subspace.
            if seq_lo < tl:
                hi += 1
        else:
            # Case B: the window spans two subspaces (or we are at the start).
            if seq_lo >= tl:
                hi -= 1
        if hi < 0:
            return -1
        seq = (hi << 32) | seq_lo
        return seq if seq else -1

    def check(self, seq: int) -> bool:
        """True if ``seq`` is new: above the top or in the window and unseen."""
        if seq <= 0:
            return False
        top = self.top
        if seq > top:
            return True
        if seq + self.size <= top:
            return False  # too old: left of the window
        bit = seq & self._ring_mask
        return not (self._ring[bit >> 3] >> (bit & 7)) & 1

    def update(self, seq: int) -> bool:
        """Mark ``seq`` as received (after its ICV verified).

        Returns False (and changes nothing) if ``seq`` is not acceptable, so a
        caller that skipped :meth:`check` still cannot accept a replay.
        """
        if not self.check(seq):
            return False
        top = self.top
        if seq > top:
            old_block = top >> 3
            new_block = seq >> 3
            diff = new_block - old_block
            ring = self._ring
            nbytes = self._ring_bytes
            if diff >= nbytes:
                ring[:] = self._zeros
            elif diff > 0:
                start = (old_block + 1) % nbytes
                end = start + diff
                if end <= nbytes:
                    ring[start:end] = self._zeros[:diff]
                else:
                    ring[start:] = self._zeros[: nbytes - start]
                    ring[: end - nbytes] = self._zeros[: end - nbytes]
            self.top = seq
        bit = seq & self._ring_mask
        self._ring[bit >> 3] |= 1 << (bit & 7)
        return True
