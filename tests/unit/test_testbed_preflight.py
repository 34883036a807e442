"""`testbed up`'s preflight and the demo's table (no root: the host checks are faked)."""

from __future__ import annotations

import pytest

from protego.errors import TestbedError
from protego.testbed import preflight
from protego.testbed.demo import format_table, row_failed


def test_missing_programs_are_named_with_their_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "missing_programs", lambda programs=preflight.PROGRAMS: ["iperf3", "/usr/bin/etcd"])
    with pytest.raises(TestbedError) as info:
        preflight.check(need_tun=False)
    msg = str(info.value)
    assert "iperf3, /usr/bin/etcd" in msg and "etcd-server, iperf3" in msg and "bootstrap.sh" in msg


def test_missing_kernel_features_are_reported_in_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    monkeypatch.setattr(preflight, "missing_programs", lambda programs=preflight.PROGRAMS: [])
    monkeypatch.setattr(preflight, "load_modules", lambda mods: loaded.extend(mods))
    monkeypatch.setattr(preflight, "_tun_present", lambda: False)
    monkeypatch.setattr(preflight, "_try_in_scratch_netns",
                        lambda feats: {"vxlan": "Error: Unknown device type."})
    monkeypatch.setattr(preflight, "modprobe_path", lambda: "/usr/sbin/modprobe")
    with pytest.raises(TestbedError) as info:
        preflight.check(need_tun=True)
    msg = str(info.value)
    assert "tun (for the sites' strongSwan kernel-libipsec (/dev/net/tun)): no /dev/net/tun" in msg
    assert "vxlan (for the tenants' virtual networks): Error: Unknown device type." in msg
    assert "modprobe" in msg and "tun" in loaded and "vxlan" in loaded  # loading was tried first


def test_without_modprobe_the_hint_names_kmod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "missing_programs", lambda programs=preflight.PROGRAMS: [])
    monkeypatch.setattr(preflight, "_tun_present", lambda: False)
    monkeypatch.setattr(preflight, "_try_in_scratch_netns", lambda feats: {})
    monkeypatch.setattr(preflight, "modprobe_path", lambda: None)
    with pytest.raises(TestbedError, match="no modprobe .Debian package kmod."):
        preflight.check(need_tun=True)
    preflight.check(need_tun=False)  # tun only matters to kernel-libipsec charons


def _row(**kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "tenant": "acme", "site": "hq", "gateway": "gpn1", "spi_in": "c1", "spi_out": "c2",
        "site_to_tenant_mbps": 200.0, "tenant_to_site_mbps": 210.0, "rtt_ms": 0.9, "lost": 0,
        "isolated": True, "errors": []}
    row.update(kw)
    return row


def test_a_timed_out_measurement_shows_in_the_table_and_fails_the_demo() -> None:
    ok = _row()
    bad = _row(site="branch", tenant_to_site_mbps=None,
               errors=["iperf3 tenant->site: no result within 35 s (a 5 s test)"])
    out = format_table([ok, bad])
    lines = out.splitlines()
    assert "200 Mb" in lines[1] and "FAILED" not in lines[1]
    assert "FAILED" in lines[2]
    assert "acme/branch: iperf3 tenant->site: no result within 35 s" in out
    assert not row_failed(ok) and row_failed(bad)
    assert row_failed(_row(lost=1)) and row_failed(_row(isolated=False))
