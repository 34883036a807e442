"""Pure parts of the migration and failover benchmarks."""

from __future__ import annotations

from protego.bench.migration import dip_pct, format_failover, format_migration, parse_interval_line


def test_interval_lines_parse_and_summaries_do_not() -> None:
    assert parse_interval_line("[  5]   0.10-0.20   sec  1.25 MBytes   105 Mbits/sec    0   85.5 KBytes") == \
        (0.10, 0.20, 105e6)
    assert parse_interval_line("[  5]   1.00-1.10   sec   512 KBytes  41.9 Mbits/sec  0.010 ms  0/373 (0%)") == \
        (1.0, 1.1, 41.9e6)
    assert parse_interval_line("[  5]   0.00-10.00  sec   125 MBytes   105 Mbits/sec    3   sender") is None
    assert parse_interval_line("[ ID] Interval           Transfer     Bitrate") is None
    assert parse_interval_line("[  5]   0.20-0.30   sec  0.00 Bytes  0.00 bits/sec    0") == (0.2, 0.3, 0.0)


def test_dip_is_the_worst_sample_during_relative_to_the_second_before() -> None:
    samples = [(t / 10, 100e6) for t in range(0, 10)] + [(1.0, 90e6), (1.1, 60e6), (1.2, 100e6), (1.5, 20e6)]
    # migration from 1.0 to 1.1 (+100 ms): the 60 Mbit/s sample is the worst; 1.5 is after
    assert round(dip_pct(samples, 1.0, 1.1) or 0, 6) == 40.0
    later = [(t, b) for t, b in samples if t != 1.1] + [(1.25, 60e6)]
    assert round(dip_pct(later, 1.0, 1.1) or 0, 6) == 10.0  # the 60 Mbit/s sample is past the switch + 100 ms
    assert dip_pct([(5.0, 1e6)], 1.0, 1.1) is None  # nothing before: no reference
    assert dip_pct([(0.5, 100e6), (1.05, 120e6)], 1.0, 1.0) == 0.0  # faster is no dip


def test_tables_say_whether_targets_are_met() -> None:
    mig = {"done": 20, "migrations": 20, "lost_packets": 0, "switch_ms": 31.0, "switch_p95_ms": 60.0,
           "out_ms_median": 29.5, "in_ms_median": 30.5, "switch_unmeasured": 0,
           "dip_pct": 7.5, "dip_median_pct": 1.0, "done_ms_median": 5100.0, "load_mbps": 99.0,
           "load_cap_mbps": 100.0, "ike_renegotiated": False, "probe_sent": 1000, "probe_interval_ms": 2.0,
           "wall_s": 150.0, "cpus": 2,
           "targets": {"lost_packets": {"op": "==", "bound": 0, "met": True},
                       "switch_ms": {"op": "<=", "bound": 50.0, "met": True},
                       "dip_pct": {"op": "<=", "bound": 5.0, "met": False}}}
    out = format_migration(mig)
    assert "dip_pct (worst)" in out and "NO" in out.split("dip_pct (worst)")[1].splitlines()[0]
    assert "29.5" in out.split("outbound:")[1].splitlines()[0] and "30.5" in out.split("inbound:")[1].splitlines()[0]
    fo = {"trials": 10, "detect_ms": 160.0, "outage_ms": 250.0, "outage_p95_ms": 400.0, "ike_renegotiated": False,
          "rate_mbps": 300.0, "direction": "to-site", "probe_interval_ms": 1.0, "wall_s": 90.0, "cpus": 2,
          "false_declarations": 1,
          "targets": {"outage_ms": {"op": "<=", "bound": 100.0, "met": False}}}
    out = format_failover(fo)
    assert "outage_ms (median)          250.0" in out and "offered to-site" in out
    assert "NO" in out.split("healthy GPNs declared dead")[1].splitlines()[0]


def test_first_inbound_reads_the_newest_inbound_sa_of_the_target() -> None:
    import json

    from protego.bench.migration import PREFIX, _first_inbound
    from protego.store.etcd import KV

    def sa(spi: str, gpn: str, direction: str, created: float) -> KV:
        rec = {"tenant": "acme", "tunnel": "hq", "vip": "203.0.113.11", "spi": spi, "gpn": gpn,
               "direction": direction, "created": created}
        return KV(f"{PREFIX}sas/203.0.113.11/{spi}", json.dumps(rec).encode(), 1, 1, 1)

    class Etcd:
        def __init__(self, kvs: list[KV], stats: dict[str, dict[str, float]]) -> None:
            self.kvs, self.stats = kvs, stats

        def get_prefix(self, prefix: str) -> tuple[int, list[KV]]:
            return 1, [kv for kv in self.kvs if kv.key.startswith(prefix)]

        def get_json(self, key: str) -> dict[str, float] | None:
            return self.stats.get(key)

    kvs = [sa("c0000001", "gpn2", "in", 100.0), sa("c0000002", "gpn2", "in", 200.0),
           sa("c0000003", "gpn2", "out", 300.0), sa("c0000004", "gpn1", "in", 400.0)]
    stats = {f"{PREFIX}sastats/203.0.113.11/c0000001": {"first_use": 101.0},
             f"{PREFIX}sastats/203.0.113.11/c0000002": {"first_use": 200.05}}
    assert _first_inbound(Etcd(kvs, stats), "acme", "hq", "gpn2", 150.0) == 200.05
    # the newest inbound SA there predates the request, or has carried nothing yet: None
    assert _first_inbound(Etcd(kvs, stats), "acme", "hq", "gpn2", 250.0, timeout=0.3) is None
    assert _first_inbound(Etcd(kvs, stats), "acme", "hq", "gpn1", 150.0, timeout=0.3) is None
