"""The GPN data path in the protego-mode testbed, against real strongSwan peers.

Everything is real: the sites' charons (kernel-libipsec) negotiate with the GMN's
charon through the GIN (``protego lb``), the kernel-protego plugin hands the keys
to the GMN agent, which places the SAs on the GPNs in etcd; the GPN agents
(``protego gpn run``) install them in the userspace engine. Checked: AES-GCM-128
(acme) and AES-CBC + HMAC-SHA-256 (globex) both ways with ping and iperf3, with one
and with two workers per GPN; tenants with the same prefix stay apart; a replayed
packet is dropped and counted; heartbeats; stats in etcd; a restarted GPN does not
reuse its old outbound SAs.
"""

from __future__ import annotations

import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator

import pytest

from protego.control.model import PREFIX
from protego.testbed import procs
from protego.testbed import testbed as tbmod
from protego.testbed.state import list_testbeds
from tests.conftest import unique_name
from tests.integration import gpn_bed
from tests.integration.gpn_bed import GpnBed, wait_until

pytestmark = pytest.mark.root

SITES = {"acme-hq": ("acme", "aes128gcm16"), "globex-hq": ("globex", "aes128-sha256")}
TENANT_HOST = "10.1.0.10"  # the same address in both tenants
# one more tenant with four tunnels: the remaining suites
MORE_SITES = {"initech-a": "aes256gcm16", "initech-b": "aes128-sha1", "initech-c": "aes256-sha1",
              "initech-d": "aes256-sha256"}


@pytest.fixture(scope="module")
def bed() -> Iterator[GpnBed]:
    name = unique_name("p")
    b = None
    try:
        b = gpn_bed.bring_up(name, workers=1)
        for tenant in ("acme", "globex"):
            gpn_bed.tx_checksum_off(b, f"t-{tenant}-h1", "tnet0")
        gpn_bed.tx_checksum_off(b, "t-initech-h1", "tnet0")
        yield b
    finally:
        if b is not None:
            b.close()
        if name in list_testbeds():  # a failed `up` has rolled itself back already
            tbmod.down(name)


def site_host(site: str) -> str:
    return f"s-{site}-h1"


def site_ip(bed: GpnBed, site: str) -> str:
    return str(next(s for s in bed.tb.topology.sites if s.name == site).hosts[0])


def gpn_of(bed: GpnBed, tenant: str) -> str:
    gpns = {r["gpn"] for r in bed.records(tenant).values()}
    assert len(gpns) == 1, gpns
    return gpns.pop()


def rx_packets(bed: GpnBed, node: str, ifname: str) -> int:
    out = bed.ns_run(node, "cat", f"/sys/class/net/{ifname}/statistics/rx_packets").stdout
    return int(out.strip() or 0)


def test_gpns_registered_with_backend(bed: GpnBed) -> None:
    for g in ("gpn1", "gpn2"):
        node = bed.etcd.get_json(f"{PREFIX}gpn/nodes/{g}")
        assert node["backend"] == "userspace" and node["cores"] >= 1
        assert node["fabric_addr"] == bed.fabric_addr(g) and node["started"] > 0
    log = (bed.tb.state.logs / "gpn1.gpn-agent.log").read_text()
    assert "data-path backend: userspace" in log


@pytest.mark.parametrize("site", sorted(SITES))
def test_ping_both_directions(bed: GpnBed, site: str) -> None:
    tenant, suite = SITES[site]
    assert {r["suite"] for r in bed.records(tenant).values()} == {suite}
    sent, got = bed.ping(site_host(site), TENANT_HOST, count=5)
    assert got == sent, f"{site} -> {tenant}: {got}/{sent}"
    sent, got = bed.ping(f"t-{tenant}-h1", site_ip(bed, site), count=5)
    assert got == sent, f"{tenant} -> {site}: {got}/{sent}"


@pytest.mark.parametrize("site", sorted(MORE_SITES))
def test_every_other_suite_both_directions(bed: GpnBed, site: str) -> None:
    peer = bed.peer_child(site)
    assert peer is not None
    recs = [r for r in bed.records("initech").values() if r["spi"] in (peer["spi_in"], peer["spi_out"])]
    assert len(recs) == 2 and {r["suite"] for r in recs} == {MORE_SITES[site]} and {r["tunnel"] for r in recs} == {site}
    sent, got = bed.ping(site_host(site), "10.3.0.10", count=3)
    assert got == sent, f"{site} -> initech: {got}/{sent}"
    sent, got = bed.ping("t-initech-h1", site_ip(bed, site), count=3)
    assert got == sent, f"initech -> {site}: {got}/{sent}"


@pytest.mark.parametrize("site", sorted(SITES))
def test_iperf3_both_directions(bed: GpnBed, site: str) -> None:
    tenant, _suite = SITES[site]
    up = bed.iperf(f"t-{tenant}-h1", TENANT_HOST, site_host(site), seconds=2)
    down = bed.iperf(f"t-{tenant}-h1", TENANT_HOST, site_host(site), seconds=2, reverse=True)
    print(f"\n{site} ({SITES[site][1]}): site->tenant {up:.3f} Gbit/s, tenant->site {down:.3f} Gbit/s")
    assert up > 0.01 and down > 0.01


def test_stats_and_load_reported(bed: GpnBed) -> None:
    bed.ping(site_host("acme-hq"), TENANT_HOST, count=3)
    for r in bed.records("acme").values():
        stats = wait_until(lambda r=r: (s := bed.sastats(r["vip"], r["spi"])) and s.get("packets") and s, 5,
                           f"sastats of {r['spi']}")
        assert stats["bytes"] > 0 and time.time() - stats["last_use"] < 60 and stats["ts"] > 0
    load = bed.load(gpn_of(bed, "acme"))
    node = bed.etcd.get_json(f"{PREFIX}gpn/nodes/{gpn_of(bed, 'acme')}")
    assert 0.0 <= load["cpu"] <= 1.0 and len(load["per_core"]) == node["cores"] and load["ts"] > 0


def test_overlapping_tenants_stay_apart(bed: GpnBed) -> None:
    before = {t: rx_packets(bed, f"t-{t}-h1", "tnet0") for t in ("acme", "globex")}
    sent, got = bed.ping(site_host("acme-hq"), TENANT_HOST, count=5, interval=0.1)
    assert got == sent
    after = {t: rx_packets(bed, f"t-{t}-h1", "tnet0") for t in ("acme", "globex")}
    assert after["acme"] - before["acme"] >= 5
    assert after["globex"] - before["globex"] < 2  # nothing of acme's ping (an ARP at most)
    # acme's host cannot reach globex's site: no tunnel of VNI 1001 covers it
    sent, got = bed.ping("t-acme-h1", site_ip(bed, "globex-hq"), count=2, interval=0.2)
    assert got == 0


CAPTURE = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    s.bind(("fab0", 0))
    s.settimeout(1)
    spi = bytes.fromhex(sys.argv[1])
    end = time.time() + 10
    while time.time() < end:
        try:
            frame = s.recv(65535)
        except socket.timeout:
            continue
        ip = frame[14:]
        ihl = (ip[0] & 15) * 4
        if ip[9] != 17:
            continue
        udp = ip[ihl:]
        if int.from_bytes(udp[2:4], "big") != 4500 or udp[8:12] != spi:
            continue
        print(udp[8:int.from_bytes(udp[4:6], "big")].hex())
        break
""")

REPLAY = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(int(sys.argv[3])):
        s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 4500))
""")


def test_replayed_packet_is_dropped_and_counted(bed: GpnBed) -> None:
    rec = next(r for r in bed.records("acme").values() if r["direction"] == "in")
    gpn = rec["gpn"]
    cap = subprocess.Popen(["ip", "netns", "exec", bed.tb.ns(gpn), gpn_bed.PY, "-c", CAPTURE, rec["spi"]],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    bed.ping(site_host("acme-hq"), TENANT_HOST, count=3)
    esp = cap.communicate(timeout=15)[0].strip()
    assert esp, "no ESP packet from the peer reached the GPN"
    before = (bed.load(gpn).get("drops") or {}).get("replayed", 0)
    rx = rx_packets(bed, "t-acme-h1", "tnet0")
    res = bed.ns_run(gpn, gpn_bed.PY, "-c", REPLAY, esp, rec["vip"], "3")
    assert res.returncode == 0, res.stderr
    wait_until(lambda: (bed.load(gpn).get("drops") or {}).get("replayed", 0) >= before + 3, 5,
               "3 replays counted")
    assert rx_packets(bed, "t-acme-h1", "tnet0") == rx  # nothing delivered


def test_heartbeats_answered_by_the_engine(bed: GpnBed) -> None:
    for g in ("gpn1", "gpn2"):
        health = wait_until(lambda g=g: bed.etcd.get_json(f"{PREFIX}gpn/health/{g}"), 10, f"{g} health")
        assert health["state"] == "alive"
    # the lb tags 1 in 100 packets: traffic makes the engine send tag answers
    bed.ping(site_host("acme-hq"), TENANT_HOST, count=200, interval=0.005)
    gpn = gpn_of(bed, "acme")
    wait_until(lambda: (bed.load(gpn).get("counters") or {}).get("hb_tag_answers", 0) > 0, 5, "tag answers")
    assert (bed.load(gpn).get("counters") or {}).get("hb_probes", 0) > 0


def test_survives_an_etcd_restart(bed: GpnBed) -> None:
    """etcd is killed and restarted: the agents resume their watches, the GPN's
    registration is there again, and a new negotiation is installed and carries traffic."""
    cluster = bed.tb.etcd_cluster()
    assert cluster is not None
    try:
        cluster.restart_member(0, kill=True)
    finally:
        bed.tb.state.extra["etcd"] = cluster.state()  # the new PID, for teardown
        bed.tb.state.save()
    wait_until(lambda: all(_registered(bed, g) for g in ("gpn1", "gpn2")), 20, "GPN registrations after the restart")
    old_in = {r["spi"] for r in bed.records("acme").values() if r["direction"] == "in"}
    bed.restart_tunnel("acme-hq")
    try:
        wait_until(lambda: bed.tunnel_ready("acme-hq") and not old_in & {
            r["spi"] for r in bed.records("acme").values() if r["direction"] == "in"}, 30, "a new acme tunnel")
    except AssertionError as exc:
        kept = tbmod.copy_logs(bed.tb, tempfile.mkdtemp(prefix="protego-etcd-restart-"))
        leader = bed.etcd.get_json(f"{PREFIX}gmn/leader")
        raise AssertionError(f"{exc}; {bed.describe_tunnel('acme-hq')}; GMN leader {leader}; "
                             f"the testbed's logs: {kept}") from None
    wait_until(lambda: bed.ping(site_host("acme-hq"), TENANT_HOST, count=1)[1] == 1, 10, "traffic on the new SAs")
    sent, got = bed.ping("t-acme-h1", site_ip(bed, "acme-hq"), count=3)
    assert got == sent


def test_no_key_material_in_logs(bed: GpnBed) -> None:
    import base64

    from protego import sealing

    logs = "".join((bed.tb.state.logs / f"{g}.gpn-agent.log").read_text() for g in ("gpn1", "gpn2"))
    assert "installed (" in logs
    checked = 0
    for key, r in bed.records().items():
        for field in ("enc_key", "integ_key"):
            if sealing.is_sealed(r[field]):  # the GMN's records: opened with the GPN's own key
                gpn_key = sealing.load_or_create(tbmod.gpn_seal_key_file(bed.tb, r["gpn"]))
                raw = sealing.unseal(gpn_key, r[field], f"{key[len(PREFIX):]}/{field}")
            else:  # the records this module writes itself
                raw = base64.b64decode(r[field])
            if raw:
                checked += 1
                assert r[field] not in logs and raw.hex() not in logs and raw[:8].hex() not in logs
    assert checked


def _registered(bed: GpnBed, gpn: str) -> bool:
    try:
        return bed.etcd.get_json(f"{PREFIX}gpn/nodes/{gpn}") is not None
    except Exception:  # noqa: BLE001 - etcd may still be coming back
        return False


def _restart_gpns(bed: GpnBed, workers: int) -> None:
    for node, rec in list(bed.gpn_procs.items()):
        assert procs.stop(rec)
        bed.start_gpn(node, workers=workers)


def test_restarted_gpn_does_not_reuse_outbound_sas_then_two_workers(bed: GpnBed) -> None:
    """A restarted GPN installs the inbound SAs again, never the old outbound ones;
    the GMN rekeys the CHILD_SAs and traffic flows again, here through two workers per
    GPN (ESP sharded by SPI, sequence numbers leased in blocks)."""
    before = {g: bed.etcd.get_json(f"{PREFIX}gpn/nodes/{g}")["started"] for g in ("gpn1", "gpn2")}
    _restart_gpns(bed, workers=2)
    wait_until(lambda: all((n := bed.etcd.get_json(f"{PREFIX}gpn/nodes/{g}")) and n["started"] != before[g]
                           and n["cores"] == 2 for g in ("gpn1", "gpn2")), 20, "the restarted GPNs to register")
    # Each restarted GPN refuses the outbound SAs created before it started, unless the GMN
    # was quicker: it rekeys a GPN's tunnels onto another GPN as soon as the stopped agent's
    # registration goes, so by the time the GPN is back there may be no old SA left on it.
    def refused_or_moved(g: str) -> bool:
        start = bed.etcd.get_json(f"{PREFIX}gpn/nodes/{g}")["started"]
        old_out = [r for t in {t for t, _s in SITES.values()} for r in bed.records(t).values()
                   if r["direction"] == "out" and r["gpn"] == g and r["created"] < start]
        return not old_out or "not installed, waiting for a rekey" in \
            (bed.tb.state.logs / f"{g}.gpn-agent.log").read_text()

    for g in ("gpn1", "gpn2"):
        wait_until(lambda g=g: refused_or_moved(g), 10, f"{g} to refuse its old outbound SAs")
    # the GMN notices the restarts and rekeys every CHILD_SA (same IKE SAs): each tunnel
    # gets an outbound SA created after its GPN started
    started = {g: bed.etcd.get_json(f"{PREFIX}gpn/nodes/{g}")["started"] for g in ("gpn1", "gpn2")}

    def fresh_outbound(tenant: str) -> bool:
        return any(r["direction"] == "out" and r["created"] > started[r["gpn"]]
                   for r in bed.records(tenant).values())

    for site, (tenant, _suite) in SITES.items():
        wait_until(lambda tenant=tenant: fresh_outbound(tenant), 30, f"{site} rekeyed by the GMN")
        try:
            wait_until(lambda site=site: bed.tunnel_ready(site), 30, f"{site} ready")
        except AssertionError as exc:  # seen once in 889 CI tests: say what the peer and etcd held
            raise AssertionError(f"{exc}: {bed.describe_tunnel(site)}") from None
    for site, (tenant, _suite) in SITES.items():
        wait_until(lambda site=site: bed.ping(site_host(site), TENANT_HOST, count=1)[1] == 1, 10,
                   f"{site} reachable again")
        sent, got = bed.ping(f"t-{tenant}-h1", site_ip(bed, site), count=5)
        assert got == sent
        up = bed.iperf(f"t-{tenant}-h1", TENANT_HOST, site_host(site), seconds=2, reverse=True)
        print(f"\n{site}, 2 workers: tenant->site {up:.3f} Gbit/s")
        assert up > 0.01
    time.sleep(2.5)  # one more report
    # every GPN that carries a tunnel now encrypted for it (the GMN may have moved all of
    # them onto one GPN while the other restarted)
    carrying = {r["gpn"] for t in {t for t, _s in SITES.values()} for r in bed.records(t).values()
                if r["direction"] == "out"}
    assert carrying
    for g in ("gpn1", "gpn2"):
        load = bed.load(g)
        counters = load.get("counters") or {}
        print(f"{g}: per-core CPU {load.get('per_core')}, counters {counters}, drops {load.get('drops')}")
        if g in carrying:
            assert counters.get("esp_out", 0) > 0, g


def test_agent_stop_removes_vips(bed: GpnBed) -> None:
    gpn = gpn_of(bed, "acme")
    out = bed.ns_run(gpn, "ip", "-4", "addr", "show", "dev", "lo").stdout
    assert "203.0.113.11/32" in out
    assert procs.stop(bed.gpn_procs[gpn])
    out = bed.ns_run(gpn, "ip", "-4", "addr", "show", "dev", "lo").stdout
    assert "203.0.113.11/32" not in out
    assert bed.etcd.get(f"{PREFIX}gpn/nodes/{gpn}") is None  # lease revoked
