"""Anti-replay window (RFC 4303 3.4.3) and ESN inference (Appendix A)."""

from __future__ import annotations

import random

import pytest

from protego.esp.replay import ReplayWindow


class ReferenceWindow:
    """Obviously-correct model: a set of every accepted number."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.top = 0
        self.seen: set[int] = set()

    def accept(self, seq: int) -> bool:
        if seq <= 0 or seq + self.size <= self.top or seq in self.seen:
            return False
        self.seen.add(seq)
        self.top = max(self.top, seq)
        return True


@pytest.mark.parametrize("size", [64, 65, 100, 128, 1000, 4096])
def test_edges(size: int) -> None:
    w = ReplayWindow(size)
    assert not w.check(0)
    assert w.update(1) and not w.check(1) and not w.update(1)
    assert w.update(size + 10)
    top = size + 10
    assert w.check(top - size + 1)  # the oldest number still in the window
    assert not w.check(top - size)  # just left of the window
    assert w.update(top - size + 1) and not w.check(top - size + 1)
    assert w.check(top + 1)
    # a jump much larger than the ring clears everything
    assert w.update(top + 10 * size)
    assert w.check(top + 10 * size - 1) and not w.check(top + 10 * size)
    assert not w.check(top + 9 * size)


@pytest.mark.parametrize("size", [64, 72, 129, 512, 4096])
def test_matches_reference_model(size: int) -> None:
    rng = random.Random(size)
    w, ref = ReplayWindow(size), ReferenceWindow(size)
    seq = 1
    for _ in range(20000):
        r = rng.random()
        if r < 0.5:
            seq += rng.randint(1, 3)
            candidate = seq
        elif r < 0.8:
            candidate = seq - rng.randint(0, size + 5)  # replays, in-window and too old
        elif r < 0.95:
            seq += rng.randint(1, 2 * size)
            candidate = seq
        else:
            candidate = rng.randint(-2, seq + 3 * size)
        expected = ref.accept(candidate)
        assert w.check(candidate) == expected
        assert w.update(candidate) == expected


def test_size_limits() -> None:
    for bad in (0, 32, 63, 4097):
        with pytest.raises(ValueError):
            ReplayWindow(bad)


# ---------------------------------------------------------------- ESN
def test_esn_start_of_sa() -> None:
    w = ReplayWindow(64, esn=True)
    assert w.infer(0) == -1  # seq 0 is never sent
    assert w.infer(1) == 1
    assert w.infer(0xFFFFFFFF) == -1  # would be "before the start"
    assert w.infer(1000) == 1000


def test_esn_case_a_and_b() -> None:
    size = 64
    w = ReplayWindow(size, esn=True)
    # Case A: window entirely in subspace hi=2
    w.update((2 << 32) | 1000)
    assert w.infer(1000 - 63) == (2 << 32) | (1000 - 63)  # bottom of the window
    assert w.infer(2000) == (2 << 32) | 2000  # ahead, same subspace
    assert w.infer(500) == (3 << 32) | 500  # below the window: assumed next subspace
    # Case B: window straddles the 2^32 boundary (top low bits = 10)
    w2 = ReplayWindow(size, esn=True)
    w2.update((5 << 32) | 10)
    assert w2.infer(5) == (5 << 32) | 5
    assert w2.infer(0xFFFFFFF0) == (4 << 32) | 0xFFFFFFF0  # before the wrap, in window
    assert w2.infer(100) == (5 << 32) | 100


def test_esn_wrap_of_low_32_bits() -> None:
    size = 128
    w = ReplayWindow(size, esn=True)
    base = (7 << 32) - 20  # hi = 6, low = 2^32 - 20
    assert w.update(base)
    # packets after the wrap: transmitted low bits are small
    for lo in (0, 1, 5):
        seq = w.infer(lo)
        assert seq == (7 << 32) | lo
        assert w.check(seq)
        assert w.update(seq)
    assert w.top == (7 << 32) | 5
    # a late packet from just before the wrap is still inside the window
    late = w.infer(0xFFFFFFFF - 30)
    assert late == (6 << 32) | (0xFFFFFFFF - 30)
    assert w.check(late) and w.update(late)
    assert not w.check(late)  # replay after the wrap
    # too old: more than the window behind the top
    old = w.infer(0xFFFFFFFF - 200)
    assert old >> 32 == 7 and w.check(old)  # inferred as *next* subspace: ICV will fail


def test_esn_property_inference_recovers_true_sequence() -> None:
    """For packets no more than (window - 1) behind the top, or less than 2^32 -
    window ahead, the inferred full number is the true one (RFC 4303 A2.2)."""
    rng = random.Random(4303)
    for size in (64, 256, 4096):
        w = ReplayWindow(size, esn=True)
        top = rng.randint(1, 5) << 32
        top -= rng.randint(0, 3 * size)  # land near a wrap
        w.update(top)
        for _ in range(5000):
            if rng.random() < 0.5:
                true = w.top - rng.randint(0, size - 1)
            else:
                true = w.top + rng.randint(1, (1 << 32) - size)
            if true <= 0:
                continue
            assert w.infer(true & 0xFFFFFFFF) == true
            if rng.random() < 0.3 and w.check(true):
                w.update(true)
