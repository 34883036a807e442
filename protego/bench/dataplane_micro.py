"""Per-core ESP encapsulation/decapsulation micro-benchmark.

For every suite and packet size, one core encapsulates batches of inner IPv4
packets and decapsulates the result (sequence numbers and the replay window
advance as in real traffic). ``packet_bytes`` is the inner (plaintext) packet
size; Gbit/s counts inner bytes. No I/O is involved: this is the upper bound of
one worker's crypto + framing path.

Run: ``python -m protego.bench.dataplane_micro [--json] [--seconds S]``.
The JSON object has the ``suites`` list of issue 4; ``tunnel`` is ``null``
until the tunnel benchmark exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from protego.esp import (
    Decapsulator,
    Direction,
    OutboundSa,
    SaKeys,
    SecurityAssociation,
    Suite,
    UdpEncap,
    Verdict,
)
from protego.esp.framing import build_ipv4_header

__all__ = ["format_table", "main", "measure", "run"]

SIZES = (64, 512, 1400)
BATCH = 2000


def _pair(suite: Suite) -> tuple[OutboundSa, Decapsulator]:
    keys = SaKeys.from_keymat(suite, os.urandom(suite.spec.keymat_len))
    common: dict[str, Any] = {"suite": suite, "keys": keys, "src": "198.18.0.1",
                                  "dst": "198.18.0.2", "encap": UdpEncap(), "replay_window": 64}
    out = OutboundSa(SecurityAssociation(0x1000, Direction.OUTBOUND, **common))
    dec = Decapsulator()
    dec.add(SecurityAssociation(0x1000, Direction.INBOUND, **common))
    return out, dec


def measure(suite: Suite, size: int, seconds: float = 0.5) -> dict[str, Any]:
    """Encap and decap rates of one suite at one inner packet size."""
    out, dec = _pair(suite)
    inner = build_ipv4_header("10.1.0.1", "10.2.0.1", 17, size - 20) + os.urandom(size - 20)
    encap = out.encapsulate
    decap = dec.decap_udp
    t_enc = t_dec = 0.0
    packets = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or packets == 0:
        t0 = time.perf_counter()
        batch = [encap(inner) for _ in range(BATCH)]
        t1 = time.perf_counter()
        results = [decap(p) for p in batch]
        t2 = time.perf_counter()
        if results[-1].verdict is not Verdict.ACCEPT:
            raise RuntimeError(f"benchmark decapsulation failed: {results[-1].reason}")
        t_enc += t1 - t0
        t_dec += t2 - t1
        packets += BATCH
    enc_pps = packets / t_enc
    dec_pps = packets / t_dec
    return {
        "suite": suite.value,
        "packet_bytes": size,
        "encap_gbps_per_core": round(enc_pps * size * 8 / 1e9, 3),
        "decap_gbps_per_core": round(dec_pps * size * 8 / 1e9, 3),
        "encap_pps_per_core": round(enc_pps),
        "decap_pps_per_core": round(dec_pps),
    }


def run(suites: list[Suite] | None = None, sizes: tuple[int, ...] = SIZES,
        seconds: float = 0.5) -> list[dict[str, Any]]:
    return [measure(s, n, seconds) for s in (suites or list(Suite)) for n in sizes]


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'suite':<15}{'bytes':>6}{'encap Gb/s':>12}{'decap Gb/s':>12}"
            f"{'encap pps':>12}{'decap pps':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['suite']:<15}{r['packet_bytes']:>6}{r['encap_gbps_per_core']:>12.3f}"
            f"{r['decap_gbps_per_core']:>12.3f}{r['encap_pps_per_core']:>12,}"
            f"{r['decap_pps_per_core']:>12,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=0.5,
                        help="measuring time per suite and size (default 0.5)")
    parser.add_argument("--suite", action="append", type=Suite.parse,
                        help="suite to measure (repeatable; default: all)")
    args = parser.parse_args(argv)
    rows = run(args.suite, SIZES, args.seconds)
    if args.json:
        json.dump({"suites": rows, "tunnel": None}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
