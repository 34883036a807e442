"""``protego bench dataplane --json``: the issue's JSON shape, measured for real
(short runs: the numbers themselves are reported, not asserted beyond sanity)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root


def _bench(*extra: str, timeout: float = 180) -> dict:  # type: ignore[type-arg]
    res = subprocess.run([sys.executable, "-m", "protego.bench.dataplane", "--json", "--seconds", "0.05",
                          "--tunnel-seconds", "2", *extra], capture_output=True, text=True, timeout=timeout,
                         check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    out: dict = json.loads(res.stdout)  # type: ignore[type-arg]
    return out


def test_bench_dataplane_json() -> None:
    out = _bench()
    assert out["backend"] == "userspace"
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


@pytest.mark.kernel
def test_bench_dataplane_json_with_the_xfrm_backend() -> None:
    """The same JSON with kernel XFRM gateways (in the kernel lane: emulated, so the
    figures are not performance claims)."""
    out = _bench("--backend", "xfrm", timeout=900)
    assert out["backend"] == "xfrm"
    assert len({r["suite"] for r in out["suites"]}) == 6
    t = out["tunnel"]
    assert set(t) == {"protego_gbps", "libipsec_gbps", "ratio"}
    assert t["protego_gbps"] > 0.001 and t["libipsec_gbps"] > 0.001
    print(f"\ntunnel (xfrm): {t}")


def test_bench_dataplane_xfrm_refuses_a_kernel_without_esp() -> None:
    from protego.xfrm import probe_kernel_esp

    if probe_kernel_esp().kernel_esp:
        pytest.skip("this kernel has ESP: the refusal cannot be shown here")
    res = subprocess.run([sys.executable, "-m", "protego.bench.dataplane", "--json", "--backend", "xfrm"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode != 0
    assert "--backend xfrm needs a kernel with ESP" in res.stderr and "protego lane run" in res.stderr
