"""A real ``protego gmn run`` against a real etcd: bad records are refused one by one,
published for ``protego status``, and the agent goes on (issue #19's repros: each of
these records killed the GMN's reconcile thread while the process lived on).

The agent runs beside the session's etcd on loopback, so with ``--no-vips`` (the VIPs
would go on this machine's own ``lo``): the records reach its reconcile loop through
charon's connections (tenants, tunnels and secrets are read there first), which is
where they stopped it. That a refused VIP never reaches the kernel is a unit test
(tests/unit/test_refused_records.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protego.control.model import PREFIX, Tenant

pytestmark = pytest.mark.root

ACME = Tenant("acme", 1001, "10.1.0.0/24", "203.0.113.11")


def test_gmn_run_skips_bad_records_and_goes_on(etcd: Any, etcd_loopback: list[str], tmp_path: Path) -> None:
    from protego.control.status import summarize
    from tests.conftest import unique_name, wait_until

    node = unique_name("g")
    log = open(tmp_path / "gmn.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "protego", "--etcd", ",".join(etcd_loopback),
         "gmn", "run", "--node", node, "--vici", str(tmp_path / "no-charon.vici"),
         "--plugin-socket", str(tmp_path / "plugin.sock"), "--seal-key-file", str(tmp_path / "gmn.key"),
         "--no-ha", "--no-vips", "--ack-port", "0",
         "--resync", "2"],
        stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())
    report_key = f"{PREFIX}refused/gmn/{node}"

    def refused() -> set[str]:
        kv = etcd.get(report_key)
        return {r["key"] for r in json.loads(kv.value)["records"]} if kv is not None else set()

    def wait(pred: Callable[[], object], what: str) -> None:
        try:
            wait_until(pred, 30, what)
        except AssertionError as exc:
            log.flush()
            raise AssertionError(f"{exc}; the agent's log:\n{(tmp_path / 'gmn.log').read_text()[-4000:]}") from None

    try:
        etcd.put(f"{PREFIX}tenants/zz", b'{"name":"zz"}')  # no vni, network, vip
        etcd.put_json(f"{PREFIX}tenants/v6", {"name": "v6", "vni": 7, "network": "10.7.0.0/24", "vip": "2001:db8::1"})
        etcd.put(f"{PREFIX}tenants/junk", b"\xff not json")
        etcd.put_json(f"{PREFIX}tenants/acme", ACME.to_json())
        etcd.put(f"{PREFIX}secrets/acme/hq", b"k" * 70_000)  # more than VICI carries
        wait(lambda: refused() >= {"tenants/zz", "tenants/v6", "tenants/junk", "secrets/acme/hq"},
             "the GMN to publish the records it refused")
        _rev, kvs = etcd.get_prefix(PREFIX)
        st = summarize(kvs)
        mine = [r for r in st["refused"] if r["agent"] == f"gmn/{node}"]
        assert mine and mine[0]["count"] == 4
        # the loop is alive: a deleted record leaves the list, a new bad one joins it
        etcd.delete(f"{PREFIX}tenants/zz")
        etcd.put_json(f"{PREFIX}tenants/globex", {"name": "globex", "vni": "1002", "network": "10.2.0.0/24",
                                                  "vip": "203.0.113.12"})
        wait(lambda: refused() == {"tenants/v6", "tenants/junk", "secrets/acme/hq", "tenants/globex"},
             "the deleted record to leave the list and a new bad one to join it")
        assert proc.poll() is None, "the GMN agent exited"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    text = (tmp_path / "gmn.log").read_text()
    assert "Traceback" not in text, text[-3000:]
    assert text.count("tenants/zz (revision") == 1  # logged once, not at every pass
    assert proc.returncode == 0, text[-3000:]
