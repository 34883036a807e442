"""The GIN/GEN in the whole protego-mode testbed: real strongSwan sites, the GMNs, the
GPN engines and ``protego lb`` in the lb namespace (started by the testbed).

"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import unique_name

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def protego_testbed() -> Iterator[Any]:
    from protego.testbed import testbed as tbmod
    from protego.testbed.topology import load_topology

    name = unique_name("p")
    tb = tbmod.up(load_topology(None), name=name, mode="protego")
    try:
        yield tb
    finally:
        tbmod.down(name)


def _health(store: Any, gpn: str) -> dict[str, Any] | None:
    kv = store.get(f"/protego/v1/gpn/health/{gpn}")
    return None if kv is None else dict(kv.json())


def test_tunnels_through_gin_gen_and_gpn_failure(protego_testbed: Any) -> None:
    tb = protego_testbed
    from protego.testbed.testbed import wait_for_tunnels

    wait_for_tunnels(tb, 60)
    # both directions through the GIN (ESP-in-UDP by SPI) and the GEN (VXLAN by VNI + selectors)
    for s in tb.topology.sites:
        host = tb.topology.tenant(s.tenant).hosts[0]
        r = subprocess.run(["ip", "netns", "exec", tb.ns(f"s-{s.name}-h1"), "ping", "-c", "3", "-i", "0.2",
                            "-W", "2", str(host)], capture_output=True, text=True, check=False)
        assert r.returncode == 0, f"{s.name}: {r.stdout}{r.stderr}"
    store = tb.etcd()
    try:
        deadline = time.monotonic() + 10
        while not all((_health(store, g) or {}).get("state") == "alive" for g in ("gpn1", "gpn2")):
            assert time.monotonic() < deadline, [_health(store, g) for g in ("gpn1", "gpn2")]
            time.sleep(0.05)
        since1 = _health(store, "gpn1")["since"]  # type: ignore[index]
        engine = next(r for r in tb.state.procs if r.kind == "gpn-agent" and r.node == "gpn2")
        t_kill = time.time()
        os.killpg(engine.pid, signal.SIGKILL)  # the GPN engine: agent and its workers
        deadline = time.monotonic() + 5
        while True:
            h = _health(store, "gpn2") or {}
            if h.get("state") == "dead" and h["since"] >= t_kill:
                break
            assert time.monotonic() < deadline, h
            time.sleep(0.002)
        detect_ms = (h["since"] - t_kill) * 1000
        print(f"GPN engine killed: declared dead after {detect_ms:.1f} ms")
        lb = next(r for r in tb.state.procs if r.kind == "lb-agent")
        interval = float(lb.cmd[lb.cmd.index("--hb-interval-ms") + 1]) if "--hb-interval-ms" in lb.cmd else 10.0
        # three consecutive misses at the probe interval, plus one interval of slack
        assert detect_ms < 4 * interval + 20
        assert _health(store, "gpn1")["since"] == since1  # type: ignore[index]
    finally:
        store.close()
