"""The gmn-failover benchmark's table and verdicts (the run itself needs a testbed)."""

from __future__ import annotations

from protego.bench.gmn_failover import TARGETS, _met, format_table, other_gmn


def result(**over: object) -> dict:
    res = {"trials": 10, "mode": "charon", "replication_ms_p99": 12.5, "replication_ms_p50": 3.0,
           "replication_ms_p99_steady": 9.0, "replication_samples": 180, "takeover_ms": 300.0,
           "takeover_max_ms": 900.0, "active_ms_median": 70.0, "esp_lost_packets": 0, "esp_sent_packets": 40000,
           "esp_max_gap_ms": 50.0, "renegotiated_tunnels": 0, "failed_trials": 0, "rows": [], "wall_s": 30.0,
           "cpus": 2}
    res.update(over)
    res["met"] = {k: _met(res.get(k), *TARGETS[k]) for k in TARGETS}
    return res


def test_all_targets_met_reads_yes() -> None:
    table = format_table(result())
    assert "NO" not in table
    assert "0 of 40000" in table and "<= 1000" in table


def test_each_missed_target_reads_no() -> None:
    for field, bad in (("esp_lost_packets", 1), ("renegotiated_tunnels", 2), ("takeover_ms", 1000.5),
                       ("replication_ms_p99", 20.25)):
        res = result(**{field: bad})
        assert res["met"][field] is False
        line = next(ln for ln in format_table(res).splitlines() if ln.startswith(field))
        assert line.rstrip().endswith("NO"), line


def test_missing_figures_are_not_counted_as_met() -> None:
    res = result(takeover_ms=None, replication_ms_p99=None)
    assert res["met"]["takeover_ms"] is None and res["met"]["replication_ms_p99"] is None
    assert other_gmn("gmn1") == "gmn2" and other_gmn("gmn2") == "gmn1"
