"""`testbed up`'s preflight and the demo's table (no root: the host checks are faked)."""

from __future__ import annotations

import pytest

from protego.errors import TestbedError
from protego.testbed import preflight
from protego.testbed.demo import format_table, row_failed
from protego.xfrm import EspProbeResult


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


def test_kernel_paths_decide_the_kernel_features() -> None:
    assert preflight.kernel_features("libipsec", ["userspace", "auto"]) == ()
    [esp] = preflight.kernel_features("kernel", ["userspace"])
    assert esp.name == "esp" and esp.what == "the sites' strongSwan kernel-netlink"
    assert "esp4" in esp.modules and "xfrm_user" in esp.modules
    names = [f.name for f in preflight.kernel_features("libipsec", ["xfrm", "userspace"])]
    assert names == ["esp", "xfrm_interface", "vrf", "macvlan"]
    esp = preflight.kernel_features("kernel", ["xfrm"])[0]
    assert esp.what == "the sites' strongSwan kernel-netlink and the xfrm GPNs"
    # every feature but ESP (asked of the probe) and TUN (a device file) is tried in the scratch namespace
    for f in preflight.kernel_features("kernel", ["xfrm"])[1:] + preflight.BASE_FEATURES:
        assert preflight._SCRATCH_TESTS[f.name]


NO_ESP = EspProbeResult(False, "userspace", "kernel has no ESP", 38,
                        {"aes128gcm16": 38, "aes128-sha256": 93})


def test_kernel_esp_is_asked_of_the_probe_and_named_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[list[str]] = []
    monkeypatch.setattr(preflight, "missing_programs", lambda programs=preflight.PROGRAMS: [])
    monkeypatch.setattr(preflight, "load_modules", lambda mods: list(mods))
    monkeypatch.setattr(preflight, "_try_in_scratch_netns", lambda feats: tried.append([f.name for f in feats]) or {})
    monkeypatch.setattr(preflight, "modprobe_path", lambda: "/usr/sbin/modprobe")
    monkeypatch.setattr(preflight, "probe_esp", lambda: pytest.fail("the default probe must not run"))
    with pytest.raises(TestbedError) as info:
        preflight.check(need_tun=False, extra=preflight.kernel_features("kernel", ["xfrm"]),
                        esp_probe=lambda: NO_ESP)
    msg = str(info.value)
    assert ("esp (for the sites' strongSwan kernel-netlink and the xfrm GPNs): the kernel refused an ESP SA "
            "(aes128gcm16 ENOSYS, aes128-sha256 EPROTONOSUPPORT)") in msg
    assert tried[-1] == ["veth", "vxlan", "nftables", "xfrm_interface", "vrf", "macvlan"]
    ok = EspProbeResult(True, "xfrm", "kernel ESP available", None, {"aes128gcm16": 0})
    preflight.check(need_tun=False, extra=preflight.kernel_features("kernel", []), esp_probe=lambda: ok)
    preflight.check(need_tun=False)  # no kernel path: no probe at all


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
