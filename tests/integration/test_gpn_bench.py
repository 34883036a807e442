"""``protego bench dataplane --json``: the issue's JSON shape, measured for real
(short runs: the numbers themselves are reported, not asserted beyond sanity)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root


def test_bench_dataplane_json() -> None:
    res = subprocess.run([sys.executable, "-m", "protego.bench.dataplane", "--json", "--seconds", "0.05",
                          "--tunnel-seconds", "2"], capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert {r["suite"] for r in out["suites"]} == {"aes128gcm16", "aes256gcm16", "aes128-sha1", "aes256-sha1",
                                                   "aes128-sha256", "aes256-sha256"}
    for r in out["suites"]:
        assert set(r) == {"suite", "packet_bytes", "encap_gbps_per_core", "decap_gbps_per_core",
                          "encap_pps_per_core", "decap_pps_per_core"}
        assert r["encap_pps_per_core"] > 0 and r["decap_pps_per_core"] > 0
    t = out["tunnel"]
    assert set(t) == {"protego_gbps", "libipsec_gbps", "ratio"}
    assert t["protego_gbps"] > 0.01 and t["libipsec_gbps"] > 0.01
    print(f"\ntunnel: {t}")
