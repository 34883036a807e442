"""The network-namespace testbed: baseline mode end to end, clean teardown, rollback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protego.errors import TestbedError
from protego.testbed import procs
from protego.testbed import testbed as tbmod
from protego.testbed.state import FAILED_ROOT, STATE_ROOT, TestbedState, list_testbeds
from protego.testbed.topology import default_topology_text, load_topology
from protego.testbed.traffic import icmp_counters, ping
from tests.conftest import unique_name

pytestmark = pytest.mark.root

PROTEGO = [sys.executable, "-m", "protego"]


def leftovers(name: str, pids: list[int], host_ifname: str) -> list[str]:
    """Everything of testbed ``name`` still on the machine."""
    found = []
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in ns.splitlines() if line.startswith(f"{name}-")]
    if subprocess.run(["ip", "link", "show", host_ifname], capture_output=True).returncode == 0:
        found.append(f"interface {host_ifname}")
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {m}" for m in mounts.split() if m.startswith(f"/run/netns/{name}-")]
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append(f"process {pid}")
    if (STATE_ROOT / name).exists():
        found.append(f"state dir {STATE_ROOT / name} (holds etcd data and configs)")
    return found


def all_pids(tb: tbmod.Testbed) -> list[int]:
    pids = [r.pid for r in tb.state.procs]
    cluster = tb.etcd_cluster()
    if cluster is not None:
        pids += [p for p in cluster.pids if p]
    return pids


# ----------------------------------------------------------------------------
# baseline mode: every tunnel up, traffic both ways, tenants apart


def test_every_site_tunnel_is_up(baseline_testbed: tbmod.Testbed) -> None:
    tunnels = tbmod.site_tunnels(baseline_testbed)
    assert set(tunnels) == {s.name for s in baseline_testbed.topology.sites}
    for site, t in tunnels.items():
        assert t["ike_state"] == "ESTABLISHED", site
        assert t["child_state"] == "INSTALLED", site
        assert t["encr"] == "AES_GCM_16" and t["encr_keysize"] == "128"
        assert len(t["spi_in"]) == 8 and t["spi_in"] != t["spi_out"]


@pytest.mark.parametrize("site", ["acme-hq", "globex-hq", "initech-hq"])
def test_ping_and_iperf3_both_ways(baseline_testbed: tbmod.Testbed, site: str) -> None:
    from protego.testbed.demo import site_traffic

    row = site_traffic(baseline_testbed, site, seconds=5.0, pings=10)
    assert row["errors"] == []
    assert row["pings"] == 20 and row["lost"] == 0
    assert row["tenant_echos"] == 10  # the tenant's host answered every echo itself
    assert row["isolated"], f"echo requests leaked to {row['leaked_to']}"
    # libipsec runs at hundreds of Mbit/s here; 10 Mbit/s proves a working TCP path both ways
    assert row["site_to_tenant_mbps"] > 10
    assert row["tenant_to_site_mbps"] > 10
    # the traffic went through the tunnel: the site's charon counted it
    t = tbmod.site_tunnels(baseline_testbed)[site]
    assert t["bytes_out"] > 1_000_000 and t["bytes_in"] > 1_000_000


def test_overlapping_tenants_stay_apart(baseline_testbed: tbmod.Testbed) -> None:
    topo = baseline_testbed.topology
    acme, globex = topo.tenant("acme"), topo.tenant("globex")
    assert acme.network == globex.network and acme.hosts[0] == globex.hosts[0]
    a_ns, g_ns = baseline_testbed.ns("t-acme-h1"), baseline_testbed.ns("t-globex-h1")
    for src_site, own, other in (("acme-hq", a_ns, g_ns), ("globex-hq", g_ns, a_ns)):
        before_own, before_other = icmp_counters(own)["InEchos"], icmp_counters(other)["InEchos"]
        res = ping(baseline_testbed.ns(f"s-{src_site}-h1"), str(acme.hosts[0]), count=20, interval=0.05)
        assert res.received == 20
        assert icmp_counters(own)["InEchos"] - before_own == 20
        assert icmp_counters(other)["InEchos"] == before_other, f"{src_site}'s pings reached the other tenant"


def test_status_reports_everything(baseline_testbed: tbmod.Testbed) -> None:
    out = subprocess.run([*PROTEGO, "testbed", "status", "--name", baseline_testbed.name, "--json"],
                         capture_output=True, text=True, check=True).stdout
    import json

    st = json.loads(out)
    assert st["mode"] == "baseline" and st["phase"] == "up"
    assert all(n["present"] for n in st["nodes"])
    assert all(p["alive"] for n in st["nodes"] for p in n["processes"])
    assert st["etcd"]["healthy"] == [True]
    assert {k: v["child_state"] for k, v in st["tunnels"].items()} == {
        s.name: "INSTALLED" for s in baseline_testbed.topology.sites
    }


def test_exec_runs_in_the_node_namespace(baseline_testbed: tbmod.Testbed) -> None:
    res = subprocess.run([*PROTEGO, "testbed", "exec", baseline_testbed.name, "s-acme-hq", "--",
                          "swanctl", "--list-conns"], capture_output=True, text=True, check=True)
    assert "acme-hq: IKEv2" in res.stdout
    res = subprocess.run([*PROTEGO, "testbed", "exec", baseline_testbed.name, "t-acme-h1", "--",
                          "ip", "-o", "-4", "addr", "show", "dev", "tnet0"], capture_output=True, text=True, check=True)
    assert "10.1.0.10/24" in res.stdout


def test_psks_never_written_to_files(baseline_testbed: tbmod.Testbed) -> None:
    store = baseline_testbed.etcd()
    try:
        psks = [store.get(f"{tbmod.TESTBED_ETCD_PREFIX}{baseline_testbed.name}/sites/{s.name}/psk").value
                for s in baseline_testbed.topology.sites]
    finally:
        store.close()
    assert all(len(p) >= 32 for p in psks)
    root = baseline_testbed.state.root
    for path in root.rglob("*"):
        if path.is_file() and "etcd" not in path.relative_to(root).parts[0]:
            data = path.read_bytes()
            for p in psks:
                assert p not in data, f"a PSK leaked into {path}"


# ----------------------------------------------------------------------------
# clean teardown, rollback, bad input


def test_down_leaves_nothing_behind() -> None:
    name = unique_name("d")
    tb = tbmod.up(load_topology(None), name=name, mode="protego")
    try:
        pids = all_pids(tb)
        # etcd, one charon per site, per GMN its charon and agent, per GPN its agent, the lb agent
        assert len(pids) == 1 + len(tb.topology.sites) + 2 * 2 + tb.topology.gpns + 1
        before = leftovers(name, pids, tb.plan.host_ifname)
        assert len([x for x in before if x.startswith("netns")]) == len(tb.plan.namespaces)
        assert f"interface {tb.plan.host_ifname}" in before
        assert len([x for x in before if x.startswith("process")]) == len(pids)
    finally:
        tbmod.down(name)
    assert leftovers(name, pids, tb.plan.host_ifname) == []


def test_down_after_a_crash_uses_the_state_on_disk() -> None:
    """A crashed `up` (state phase 'creating') is still removed completely by `down`."""
    name = unique_name("c")
    tb = tbmod.up(load_topology(None), name=name, mode="protego")
    try:
        st = TestbedState.load(name)
        st.phase = "creating"  # as if the process died half-way
        st.save()
        pids = all_pids(tb)
        res = subprocess.run([*PROTEGO, "testbed", "down", "--name", name], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert leftovers(name, pids, tb.plan.host_ifname) == []
    finally:
        if name in list_testbeds():
            tbmod.down(name)


def test_failure_half_way_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique_name("r")
    started: list[int] = []
    real = tbmod._configure_charon
    calls = {"n": 0}

    def failing(tb, node, rec, sites, store):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            started.extend(all_pids(tb))
            raise TestbedError(f"injected failure while starting {node}")
        real(tb, node, rec, sites, store)

    monkeypatch.setattr(tbmod, "_configure_charon", failing)
    with pytest.raises(TestbedError, match="rolled back: injected failure") as info:
        tbmod.up(load_topology(None), name=name, mode="baseline")
    shutil.rmtree(str(info.value).rsplit("logs kept in ", 1)[1].strip(), ignore_errors=True)
    assert len(started) >= 3  # etcd and two charons were running when it failed
    assert leftovers(name, started, f"pm{name}") == []


def test_a_failed_up_keeps_the_dead_charons_log_and_shows_its_last_lines(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #17's failure, injected: charons without the openssl plugin die at start.
    The rollback keeps the logs in FAILED_ROOT/<name>-<time>/, the error names that
    folder (not the removed one) and quotes the dead charon's own log."""
    name = unique_name("f")
    real = tbmod.strongswan_conf

    def without_openssl(files, log_path, *esp):  # type: ignore[no-untyped-def]
        return real(files, log_path, *esp).replace(" openssl ", " ")

    monkeypatch.setattr(tbmod, "strongswan_conf", without_openssl)
    with pytest.raises(TestbedError) as info:
        tbmod.up(load_topology(None), name=name, mode="baseline")
    msg = str(info.value)
    kept = Path(msg.rsplit("logs kept in ", 1)[1].strip().rstrip("/"))
    try:
        assert kept.parent == FAILED_ROOT and kept.name.startswith(f"{name}-"), msg
        assert str(STATE_ROOT / name) not in msg  # that folder is gone
        dead = sorted(kept.glob("bg-*.charon.log"))
        assert dead, f"no charon log in {kept}: {sorted(p.name for p in kept.iterdir())}"
        text = dead[0].read_text()
        assert "unmet dependency" in text  # charon's own words on why it stopped
        assert f"last lines of {dead[0].name}:" in msg and "unmet dependency" in msg
        assert (kept / "state.json").is_file()
        assert leftovers(name, [], f"pm{name}") == []
    finally:
        shutil.rmtree(kept, ignore_errors=True)


def test_keep_on_failure_leaves_the_failed_testbed_up_for_inspection(monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique_name("k")
    real = tbmod._configure_charon

    def failing(tb, node, rec, sites, store):  # type: ignore[no-untyped-def]
        raise TestbedError(f"injected failure while starting {node}")

    monkeypatch.setattr(tbmod, "_configure_charon", failing)
    try:
        with pytest.raises(TestbedError, match="kept for inspection"):
            tbmod.up(load_topology(None), name=name, mode="baseline", keep_on_failure=True)
        st = TestbedState.load(name)
        assert st.phase == "failed"
        assert st.extra.get("etcd") and st.etcd_endpoints  # etcd was running when it failed
        assert f"{name}-mgmt" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        pids = [p.pid for p in st.procs]
    finally:
        monkeypatch.setattr(tbmod, "_configure_charon", real)
        tbmod.down(name)
    assert leftovers(name, pids, f"pm{name}") == []


def test_bad_topology_rejected_before_anything_is_created(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(default_topology_text().replace('public = "198.18.2.1"', 'public = "198.18.1.1"'))
    name = unique_name("x")
    res = subprocess.run([*PROTEGO, "testbed", "up", "--topology", str(bad), "--name", name],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert f"{bad}: sites[1] (globex-hq).public: duplicate address 198.18.1.1" in res.stderr
    assert res.stderr.count("\n") == 1  # one clear message, no traceback
    assert leftovers(name, [], f"pm{name}") == []


def test_existing_name_is_refused() -> None:
    name = unique_name("e")
    tb = tbmod.up(load_topology(None), name=name, mode="protego")
    try:
        with pytest.raises(TestbedError, match="already exists"):
            tbmod.up(load_topology(None), name=name, mode="protego")
        assert all(procs.is_alive(r) for r in tb.state.procs)  # the first one is untouched
    finally:
        tbmod.down(name)


def test_three_member_etcd_cluster_survives_a_member_kill(tmp_path: Path) -> None:
    topo_file = tmp_path / "three.toml"
    topo_file.write_text(default_topology_text().replace("etcd_members = 1", "etcd_members = 3"))
    name = unique_name("m")
    tb = tbmod.up(load_topology(topo_file), name=name, mode="protego")
    pids = all_pids(tb)
    try:
        assert len(tb.state.etcd_endpoints) == 3
        cluster = tb.etcd_cluster()
        assert cluster is not None and all(cluster.pids)
        cluster.kill_member(0)
        store = tb.etcd()
        try:
            store.put("/protego-testbed/probe", b"still-here")
            kv = store.get("/protego-testbed/probe")
            assert kv is not None and kv.value == b"still-here"
        finally:
            store.close()
    finally:
        tbmod.down(name)
    assert leftovers(name, pids, tb.plan.host_ifname) == []

