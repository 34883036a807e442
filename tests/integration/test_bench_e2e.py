"""``protego bench e2e`` reduced: 10 tunnels, 2 s of iperf3 per mode. Checks that the
measurement runs end to end and its JSON is complete and sane, not the targets."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from protego.testbed.state import list_testbeds

pytestmark = pytest.mark.root


def test_bench_e2e_reduced() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "protego", "bench", "e2e", "--json", "--seconds", "2", "--pings", "50",
         "--tunnels", "10", "--setup-timeout", "120"],
        capture_output=True, text=True, timeout=500,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    for key in ("protego_gbps", "baseline_gbps", "ratio", "added_latency_ms", "setup_100_s", "gmn_rss_mb",
                "protego_rtt_ms", "baseline_rtt_ms", "gmn_rss_detail", "targets"):
        assert key in out, key
    assert out["protego_gbps"] > 0 and out["baseline_gbps"] > 0
    assert out["ratio"] == pytest.approx(out["protego_gbps"] / out["baseline_gbps"], rel=0.01)
    assert 0 < out["protego_rtt_ms"] < 100 and 0 < out["baseline_rtt_ms"] < 100
    assert out["added_latency_ms"] == pytest.approx(out["protego_rtt_ms"] - out["baseline_rtt_ms"], abs=1e-3)
    assert out["setup_tunnels"] == 10 and out["setup_passed"] == 10
    assert out["setup"]["passed_via_own_sa"] == 10
    assert 0 < out["setup_100_s"] < 120
    assert out["targets"]["setup_100_s"]["met"] is None  # the target is for 100 tunnels
    rss = out["gmn_rss_detail"]
    assert rss["node"] in ("gmn1", "gmn2") and rss["charon_mb"] > 0 and rss["agent_mb"] > 0
    assert rss["relay_mb"] > 0  # the HA relay process counts as the GMN's too
    assert out["gmn_rss_mb"] == pytest.approx(rss["charon_mb"] + rss["agent_mb"] + rss["relay_mb"], abs=0.3)
    assert rss["tunnels"] >= 10
    # both testbeds it created (named in its progress messages) are gone
    made = set(re.findall(r"(?:baseline|protego) testbed (b[0-9a-f]{6}):", res.stderr))
    assert len(made) == 2 and not made & set(list_testbeds())
