"""The pure parts of ``protego bench e2e``: ping parsing, prefixes, agent log, the result."""

from __future__ import annotations

import ipaddress
from datetime import datetime

import pytest

from protego.bench.e2e import bulk_prefix, format_table, parse_agent_log, parse_ping_rtts, summarize

PING = """PING 10.1.0.10 (10.1.0.10) 56(84) bytes of data.
64 bytes from 10.1.0.10: icmp_seq=1 ttl=64 time=0.812 ms
64 bytes from 10.1.0.10: icmp_seq=2 ttl=64 time=1.20 ms
64 bytes from 10.1.0.10: icmp_seq=2 ttl=64 time=1.30 ms (DUP!)
64 bytes from 10.1.0.10: icmp_seq=4 ttl=64 time=0.5 ms
64 bytes from 10.1.0.10: icmp_seq=5 ttl=64 time=12.1 ms

--- 10.1.0.10 ping statistics ---
5 packets transmitted, 4 received, +1 duplicates, 20% packet loss, time 41ms
rtt min/avg/max/mdev = 0.500/3.653/12.100/4.880 ms
"""


def test_parse_ping_rtts_takes_each_reply_and_skips_duplicates() -> None:
    assert parse_ping_rtts(PING) == [0.812, 1.2, 0.5, 12.1]
    assert parse_ping_rtts("") == []
    assert parse_ping_rtts("From 10.1.0.1 icmp_seq=1 Destination Host Unreachable") == []


def test_bulk_prefix() -> None:
    assert bulk_prefix(0) == ipaddress.IPv4Network("10.210.0.0/24")
    assert bulk_prefix(99) == ipaddress.IPv4Network("10.210.99.0/24")
    assert bulk_prefix(255) == ipaddress.IPv4Network("10.210.255.0/24")
    assert bulk_prefix(256) == ipaddress.IPv4Network("10.211.0.0/24")
    with pytest.raises(ValueError):
        bulk_prefix(-1)


def _ts(s: str) -> float:
    return datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_parse_agent_log_first_time_of_each_step() -> None:
    log = "\n".join([
        "2026-11-26 09:26:30,418 INFO protego.gmn.agent: tunnel acme/bulk1 loaded into charon",
        "2026-11-26 09:26:33,489 INFO protego.gmn.agent: tunnel acme/bulk1: ike-up",
        "2026-11-26 09:26:33,496 INFO protego.gmn.agent: tunnel acme/bulk1: in SA c1e3713c placed on gpn1",
        "2026-11-26 09:26:33,517 INFO protego.gmn.agent: tunnel acme/bulk1: out SA 36696ccb placed on gpn1",
        "2026-11-26 09:26:33,534 INFO protego.gmn.agent: tunnel acme/bulk1: child-up",
        "2026-11-26 09:26:40,000 INFO protego.gmn.agent: tunnel acme/bulk1: child-up",
        "2026-11-26 09:26:31,000 INFO protego.gmn.agent: tunnel globex/bulk1 loaded into charon",
        "2026-11-26 09:26:31,000 WARNING protego.gmn.agent: acme/bulk2 SA 0000: not acknowledged",
    ])
    got = parse_agent_log(log, "acme")
    assert set(got) == {"bulk1"}
    assert got["bulk1"] == {
        "loaded": _ts("2026-11-26 09:26:30,418"), "ike-up": _ts("2026-11-26 09:26:33,489"),
        "in": _ts("2026-11-26 09:26:33,496"), "out": _ts("2026-11-26 09:26:33,517"),
        "child-up": _ts("2026-11-26 09:26:33,534"),
    }


def test_summarize_ratio_latency_and_targets() -> None:
    res = summarize({"gbps": 0.4, "rtt_ms": 0.9}, {"gbps": 0.6, "rtt_ms": 1.3},
                    {"tunnels": 100, "passed": 100, "setup_s": 12.345}, {"total_mb": 71.84})
    assert res["ratio"] == 1.5 and res["added_latency_ms"] == pytest.approx(0.4)
    assert res["setup_100_s"] == 12.35 and res["gmn_rss_mb"] == 71.8
    t = res["targets"]
    assert t["ratio"]["met"] is True
    assert t["added_latency_ms"]["met"] is False
    assert t["setup_100_s"]["met"] is True
    table = format_table(res)
    assert "ratio protego/baseline" in table and "NO" in table


def test_summarize_setup_target_only_for_100_and_missing_values() -> None:
    res = summarize({"gbps": 0.0, "rtt_ms": None}, {"gbps": 0.5, "rtt_ms": 1.0},
                    {"tunnels": 10, "passed": 10, "setup_s": 3.0}, None)
    assert res["ratio"] is None and res["added_latency_ms"] is None
    assert res["targets"]["setup_100_s"]["met"] is None
    assert res["targets"]["ratio"]["met"] is False
    res = summarize({"gbps": 0.4, "rtt_ms": 1.0}, {"gbps": 0.4, "rtt_ms": 1.0},
                    {"tunnels": 100, "passed": 97, "setup_s": None}, None)
    assert res["setup_100_s"] is None and res["targets"]["setup_100_s"]["met"] is False
    assert "97/100 passed" in format_table(res)
