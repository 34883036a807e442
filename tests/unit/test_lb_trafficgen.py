"""Synthetic traffic tool: stream parsing, packet payloads and receive accounting (pure)."""

from __future__ import annotations

import struct

import pytest

from protego.lb import trafficgen as tg


def test_parse_stream() -> None:
    s = tg.parse_stream("esp:203.0.113.11:0x1234:20000:1000")
    assert (s.kind, s.dst, s.key, s.pps, s.size) == ("esp", "203.0.113.11", 0x1234, 20000.0, 1000)
    assert tg.parse_stream("ike:203.0.113.11:500:10").size == 100
    with pytest.raises(ValueError):
        tg.parse_stream("esp:1.2.3.4")


def test_payloads_have_the_sizes_and_markers_the_gin_looks_at() -> None:
    data, port = tg.payload(tg.parse_stream("esp:1.2.3.4:0x1234:1:1000"), 7)
    assert port == 0 and len(data) == 980 and struct.unpack_from("!II", data) == (0x1234, 7)
    data, port = tg.payload(tg.parse_stream("udp:1.2.3.4:0x1234:1:1000"), 7)
    assert port == 4500 and len(data) == 972 and data[:4] != b"\0\0\0\0"
    data, port = tg.payload(tg.parse_stream("ike:1.2.3.4:4500:1"), 3)
    assert port == 4500 and data[:4] == b"\0\0\0\0" and len(data) == 32
    data, port = tg.payload(tg.parse_stream("ike:1.2.3.4:500:1"), 3)
    assert port == 500 and len(data) == 28
    assert tg.payload(tg.parse_stream("keepalive:1.2.3.4:0:1"), 1) == (b"\xff", 4500)
    data, port = tg.payload(tg.parse_stream("plain:10.201.0.10:9001:1:472"), 5)
    assert port == 9001 and len(data) == 444
    with pytest.raises(ValueError):
        tg.payload(tg.Stream("gre", "1.2.3.4", 1, 1), 1)


def test_counter_ranges_and_bins() -> None:
    c = tg.Counter()
    for seq in (1, 2, 3, 5, 6, 9):
        c.add(seq, 100, 10.0 + seq * 0.05, 10.0)
    assert c.ranges() == [[1, 3], [5, 6], [9, 9]]
    rep = c.report(10.0)
    assert rep["packets"] == 6 and rep["bytes"] == 600
    assert sum(rep["bins"].values()) == 600
