"""The GMN in the testbed: real site peers negotiate with the GMN's charon.

The protego-mode testbed runs every role (GIN/GEN steers IKE to gmn1, GPN agents
register and carry the SAs). VIPs the tests add on the fly (203.0.113.0/24 beyond
the topology's, 100.64.0.0/16) are routed from the GIN's namespace straight to gmn1.
Checked: SA records carry the peers' SPIs and the real keys, rekeys (VICI and
lifetime) replace records, the agent and charon survive kill -9 (charon's IKE SAs
through the standby GMN), migration by
rekey moves the records, 100 tunnels come up through one GMN.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protego.control.model import PREFIX, Tenant, Tunnel
from protego.control.store import ControlStore
from protego.testbed import procs
from protego.testbed import testbed as tbmod
from protego.testbed.topology import load_topology
from protego.vici_client import ViciClient
from tests.conftest import unique_name, wait_until

pytestmark = pytest.mark.root


class Bed:
    """A protego-mode testbed with sites routed straight to gmn1."""

    def __init__(self, tb: tbmod.Testbed) -> None:
        self.tb = tb
        self.etcd = tb.etcd()
        self.store = ControlStore(self.etcd)

    def site_vici(self, site: str) -> ViciClient:
        return self.tb.vici(f"s-{site}")

    def gmn_vici(self) -> ViciClient:
        return ViciClient(tbmod.gmn_paths(self.tb, "gmn1")[1])

    def records(self, tenant: str | None = None) -> dict[str, dict[str, Any]]:
        _rev, kvs = self.etcd.get_prefix(f"{PREFIX}sas/")
        recs = {kv.key: kv.json() for kv in kvs}
        return {k: r for k, r in recs.items() if tenant is None or r["tenant"] == tenant}

    def peer_child(self, site: str) -> dict[str, Any] | None:
        with self.site_vici(site) as v:
            for sa in v.list_sas(site):
                if sa.get("child_state") == "INSTALLED":
                    return sa
        return None

    def initiate(self, site: str, child: str | None = None, tries: int = 3) -> None:
        """Initiate a CHILD_SA from a site (retried: an earlier attempt may still be pending)."""
        import vici

        for attempt in range(tries):
            try:
                with self.site_vici(site) as v:
                    for _ in v.session.initiate({"child": child or site, "timeout": "10000"}):
                        pass
                return
            except vici.exception.CommandException:
                if attempt == tries - 1:
                    raise
                time.sleep(1)


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    name = unique_name("g")
    tb = tbmod.up(load_topology(None), name=name, mode="protego")
    b = None
    try:
        fab_gmn1 = "192.0.2.11"
        subprocess.run(["ip", "-n", tb.ns("inet"), "route", "add", "203.0.113.0/24", "via", str(tb.topology.gin)],
                       check=False)
        subprocess.run(["ip", "-n", tb.ns("lb"), "route", "add", "203.0.113.0/24", "via", fab_gmn1], check=True)
        b = Bed(tb)
        tbmod.wait_for_tunnels(tb, 60)
        yield b
    finally:
        if b is not None:
            b.etcd.close()
        tbmod.down(name)


def sa_pairs(bed: Bed, tenant: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"in": set(), "out": set()}
    for r in bed.records(tenant).values():
        out[r["direction"]].add(r["spi"])
    return out


def open_key(bed: Bed, key: str, rec: dict[str, Any], field: str) -> bytes:
    """A key field of an SA record, opened with the key of the GPN it was sealed to (the
    record itself holds no usable key: issue #19)."""
    from protego import sealing

    assert sealing.is_sealed(rec[field]), f"{key}: {field} is not sealed"
    with pytest.raises(ValueError):
        base64.b64decode(rec[field], validate=True)  # not a key in base64 either
    gpn_key = sealing.load_or_create(tbmod.gpn_seal_key_file(bed.tb, rec["gpn"]))
    return sealing.unseal(gpn_key, rec[field], f"{key[len(PREFIX):]}/{field}")


def test_sa_records_match_the_peers(bed: Bed) -> None:
    for s in bed.tb.topology.sites:
        peer = bed.peer_child(s.name)
        assert peer is not None
        want = {"in": {peer["spi_out"]}, "out": {peer["spi_in"]}}
        wait_until(lambda: sa_pairs(bed, s.tenant) == want, 10, f"records of {s.name}")
        for key, r in bed.records(s.tenant).items():
            assert r["suite"] == "aes128gcm16" and peer["encr"] == "AES_GCM_16"
            assert r["gpn"] in ("gpn1", "gpn2") and r["gmn"] == "gmn1"
            assert r["vip"] == str(bed.tb.topology.tenant(s.tenant).vip)
            assert len(open_key(bed, key, r, "enc_key")) == 20  # 16-byte key + 4-byte salt
            spi = int(r["spi"], 16)
            if r["direction"] == "in":
                steer = bed.etcd.get(f"{PREFIX}steer/in/{r['vip']}/{r['spi']}")
                assert steer is not None and steer.json()["gpn"] == r["gpn"]
            else:
                steer = bed.etcd.get(f"{PREFIX}steer/out/{s.tenant}/{s.name}")
                assert steer is not None and steer.json()["spi"] == f"{spi:08x}"
    # the CLI shows the same, without keys
    out = subprocess.run([sys.executable, "-m", "protego", "--etcd", ",".join(bed.tb.state.etcd_endpoints),
                          "sa", "list", "--json"], capture_output=True, text=True, check=True).stdout
    import json

    listed = json.loads(out)
    assert {r["spi"] for r in listed} == {r["spi"] for r in bed.records().values()}
    assert "enc_key" not in out and "integ_key" not in out
    # charon's VICI events became Protego events
    events = {(e["kind"], e["tenant"], e["tunnel"]) for e in
              (kv.json() for kv in bed.etcd.get_prefix(f"{PREFIX}events/")[1])}
    for s in bed.tb.topology.sites:
        assert ("ike-up", s.tenant, s.name) in events and ("child-up", s.tenant, s.name) in events


CAPTURE = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    s.bind(("fab0", 0))
    s.settimeout(10)
    spi = bytes.fromhex(sys.argv[1])
    end = time.time() + 10
    while time.time() < end:
        frame = s.recv(65535)
        ip = frame[14:]
        ihl = (ip[0] & 15) * 4
        if ip[9] != 17:
            continue
        udp = ip[ihl:]
        if int.from_bytes(udp[2:4], "big") != 4500 or udp[8:12] != spi:
            continue
        print(udp[8:].hex())
        break
""")


def test_exported_inbound_key_decrypts_what_the_peer_sends(bed: Bed) -> None:
    site = bed.tb.topology.sites[0]
    tenant = bed.tb.topology.tenant(site.tenant)
    rec = next(r for r in bed.records(site.tenant).values() if r["direction"] == "in")
    # the GIN steers the peer's ESP to the GPN holding the SA: capture it there
    cap = subprocess.Popen(["ip", "netns", "exec", bed.tb.ns(rec["gpn"]), sys.executable, "-c", CAPTURE, rec["spi"]],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    subprocess.run(["ip", "netns", "exec", bed.tb.ns(f"s-{site.name}-h1"), "ping", "-c", "3", "-i", "0.2", "-W", "1",
                    str(tenant.hosts[0])], capture_output=True)
    esp = bytes.fromhex(cap.communicate(timeout=15)[0].strip())
    assert esp, "no ESP packet from the peer reached the GMN"
    rec_key = next(k for k, r in bed.records(site.tenant).items() if r["spi"] == rec["spi"] and r["direction"] == "in")
    keymat = open_key(bed, rec_key, rec, "enc_key")
    key, salt = keymat[:-4], keymat[-4:]
    iv, ct = esp[8:16], esp[16:]
    plain = AESGCM(key).decrypt(salt + iv, ct, esp[:8])  # raises if the key is not the real one
    assert plain[-1] == 4  # next header: IPv4
    inner = plain[: len(plain) - 2 - plain[-2]]  # payload || padding || pad length || next header
    assert inner[0] >> 4 == 4
    import ipaddress

    assert ipaddress.IPv4Address(inner[12:16]) == site.hosts[0]
    assert ipaddress.IPv4Address(inner[16:20]) == tenant.hosts[0]
    assert inner[20] == 8  # ICMP echo request


def test_vici_rekey_replaces_the_records(bed: Bed) -> None:
    site = bed.tb.topology.sites[1]
    before = sa_pairs(bed, site.tenant)
    peer = bed.peer_child(site.name)
    assert peer is not None
    with bed.site_vici(site.name) as v:
        v.rekey_child(peer["child_id"])
    new_peer = wait_until(lambda: (c := bed.peer_child(site.name)) and c["spi_in"] != peer["spi_in"] and c,
                          15, "the peer's new CHILD_SA")
    want = {"in": {new_peer["spi_out"]}, "out": {new_peer["spi_in"]}}
    # old SAs disappear once charon deletes them (rekeyed inbound SAs linger ~5 s)
    wait_until(lambda: sa_pairs(bed, site.tenant) == want, 20, "records of the rekeyed SAs only")
    assert not (before["in"] & want["in"]) and not (before["out"] & want["out"])


def test_lifetime_driven_rekey(bed: Bed) -> None:
    """A tunnel whose CHILD_SA lifetime is short on the GMN side is rekeyed by the
    plugin's expire timers (no kernel raises them here)."""
    bed.store.add_tenant(Tenant("lt", 1999, "10.99.0.0/24", "203.0.113.99"))
    psk = os.urandom(24).hex().encode()
    site = bed.tb.topology.sites[0]
    bed.store.add_tunnel(Tunnel(tenant="lt", name="short", remote_addrs=str(site.public),
                                remote_ts=(str(site.network),), rekey_time=6, life_time=12), psk)
    with bed.site_vici(site.name) as v:
        v.load_psk("lt-short", psk, [str(site.public), "203.0.113.99"])
        v.load_conn("lt-short", {
            "version": "2", "local_addrs": [str(site.public)], "remote_addrs": ["203.0.113.99"],
            "proposals": ["aes128gcm16-prfsha256-ecp256"], "encap": "yes",
            "local-1": {"auth": "psk", "id": str(site.public)}, "remote-1": {"auth": "psk", "id": "203.0.113.99"},
            "children": {"lt-short": {"local_ts": [str(site.network)], "remote_ts": ["10.99.0.0/24"],
                                      "esp_proposals": ["aes128gcm16"], "rekey_time": "1h"}},
        })
    try:
        wait_until(lambda: "lt_short" in gmn_conns(bed), 10, "the tunnel loaded into the GMN's charon")
        bed.initiate(site.name, "lt-short")
        first = wait_until(lambda: sa_pairs(bed, "lt")["in"], 10, "the first SA records")
        # rekey at ~6 s (minus jitter); the old SAs go when charon deletes them
        wait_until(lambda: (p := sa_pairs(bed, "lt")["in"]) and not (p & first), 30,
                   "a lifetime rekey and the removal of the first SAs")

        def peer_current_recorded() -> bool:
            peer = [sa for sa in _site_sas(bed, site.name) if sa["ike"] == "lt-short"]
            return bool(peer) and peer[0]["child_state"] == "INSTALLED" and \
                peer[0]["spi_out"] in sa_pairs(bed, "lt")["in"]

        wait_until(peer_current_recorded, 10, "the peer's current SA in the records")
    finally:
        bed.store.remove_tenant("lt", with_tunnels=True)
        with bed.site_vici(site.name) as v:
            v.terminate_ike("lt-short")
            v.unload_conn("lt-short")
        # removing the tunnel removes every trace of it on the GMN side
        wait_until(lambda: not bed.records("lt") and "lt_short" not in gmn_conns(bed), 15,
                   "the removed tunnel's connection and records to go")


def gmn_conns(bed: Bed) -> list[str]:
    with bed.gmn_vici() as v:
        return v.get_conns()


def _site_sas(bed: Bed, site: str) -> list[dict[str, Any]]:
    with bed.site_vici(site) as v:
        return list(v.list_sas())


def _procs(bed: Bed, kind: str) -> list[procs.ProcRecord]:
    return [r for r in bed.tb.state.procs if r.node == "gmn1" and r.kind == kind and procs.is_alive(r)]


def _respawn(bed: Bed, rec: procs.ProcRecord, env: dict[str, str] | None = None, private_run: bool = False) -> None:
    new = procs.spawn(rec.node, rec.kind, bed.tb.ns(rec.node), rec.cmd, bed.tb.state.logs / f"{rec.node}.{rec.kind}.log",
                      env=env, private_run=private_run)
    bed.tb.state.procs.append(new)
    bed.tb.state.save()


def test_agent_kill9_and_restart_drops_no_tunnel(bed: Bed) -> None:
    ike_before = {s.name: bed.peer_child(s.name) for s in bed.tb.topology.sites}
    recs_before = {k: (r["spi"], r["gpn"]) for k, r in bed.records().items()}
    [agent] = _procs(bed, "gmn-agent")
    os.kill(agent.pid, signal.SIGKILL)
    wait_until(lambda: not procs.is_alive(agent), 5, "the agent to die")
    _respawn(bed, agent)
    time.sleep(8)  # past the old lease's TTL: leadership must not have moved
    leader = bed.etcd.get(f"{PREFIX}gmn/leader").json()
    assert leader["node"] == "gmn1"
    for s in bed.tb.topology.sites:
        now = bed.peer_child(s.name)
        assert now is not None, f"{s.name}'s tunnel dropped"
        assert (now["ike_spi_i"], now["spi_in"]) == (ike_before[s.name]["ike_spi_i"], ike_before[s.name]["spi_in"])
    wait_until(lambda: {k: (r["spi"], r["gpn"]) for k, r in bed.records().items()} == recs_before, 10,
               "SA records to converge")


def test_charon_kill9_keeps_the_tunnels_and_catches_up(bed: Bed) -> None:
    """The GMNs mirror charon's IKE SAs through etcd (docs/gmn-ha.md): a charon that dies
    costs no tunnel. gmn2 takes the IKE SAs over; gmn1's restarted charon catches up from
    etcd as the standby and, handed the leadership back, carries on with the same SAs."""
    from protego.bench.gmn_failover import (fail_gmn, gmn_leader, restore_gmn, site_ike_spis, site_rekey,
                                            wait_standby_caught_up, wait_takeover)

    assert gmn_leader(bed.tb) == "gmn1"
    spis = site_ike_spis(bed.tb)
    children = {s.name: bed.peer_child(s.name)["spi_in"] for s in bed.tb.topology.sites}  # type: ignore[index]
    recs = {k: (r["spi"], r["gpn"]) for k, r in bed.records().items()}
    [charon] = _procs(bed, "charon")
    os.kill(charon.pid, signal.SIGKILL)
    wait_until(lambda: not procs.is_alive(charon), 5, "charon to die")
    assert wait_takeover(bed.tb, "gmn2", spis) is not None, "gmn2 did not take over"
    tbmod.start_gmn_charon(bed.tb, "gmn1")
    assert wait_standby_caught_up(bed.tb, "gmn1", spis), "gmn1's new charon did not catch up from etcd"
    # back to gmn1 (the other tests route IKE for their own VIPs straight to it)
    fail_gmn(bed.tb, "gmn2", "charon")
    assert wait_takeover(bed.tb, "gmn1", spis) is not None, "gmn1 did not take over again"
    restore_gmn(bed.tb, "gmn2", "charon")
    assert site_ike_spis(bed.tb) == spis
    assert {s.name: bed.peer_child(s.name)["spi_in"] for s in bed.tb.topology.sites} == children  # type: ignore[index]
    assert {k: (r["spi"], r["gpn"]) for k, r in bed.records().items()} == recs
    # the next exchange works against the restarted charon, and the records follow it
    for s in bed.tb.topology.sites:
        site_rekey(bed.tb, s.name)
        new = bed.peer_child(s.name)
        assert new is not None and new["ike_spi_i"] == spis[s.name]
        wait_until(lambda s=s, new=new: sa_pairs(bed, s.tenant) == {"in": {new["spi_out"]}, "out": {new["spi_in"]}},
                   15, f"records of {s.name} to converge")


def test_100_tunnels_through_one_gmn(bed: Bed) -> None:
    """100 tenants, one tunnel each, from one site gateway: time and memory."""
    site = bed.tb.topology.sites[2]
    subprocess.run(["ip", "-n", bed.tb.ns("inet"), "route", "replace", "100.64.0.0/16", "via",
                    str(bed.tb.topology.gin)], check=True)
    subprocess.run(["ip", "-n", bed.tb.ns("lb"), "route", "replace", "100.64.0.0/16", "via", "192.0.2.11"], check=True)
    psk = b"scale-test-psk-0123456789"
    t0 = time.monotonic()
    with bed.site_vici(site.name) as v:
        for i in range(100):
            vip = f"100.64.{i // 250}.{i % 250 + 1}"
            name = f"s{i:03d}"
            bed.store.add_tenant(Tenant(name, 3000 + i, f"10.{100 + i // 100}.{i % 100}.0/24", vip))
            bed.store.add_tunnel(Tunnel(tenant=name, name="t", remote_addrs=str(site.public),
                                        remote_ts=(str(site.network),)), psk)
            v.load_psk(f"scale-{i}", psk, [str(site.public), vip])
            v.load_conn(name, {
                "version": "2", "local_addrs": [str(site.public)], "remote_addrs": [vip],
                "proposals": ["aes128gcm16-prfsha256-ecp256"], "encap": "yes",
                "local-1": {"auth": "psk", "id": str(site.public)}, "remote-1": {"auth": "psk", "id": vip},
                "children": {name: {"local_ts": [str(site.network)],
                                    "remote_ts": [f"10.{100 + i // 100}.{i % 100}.0/24"],
                                    "esp_proposals": ["aes128gcm16"]}},
            })
    wait_until(lambda: sum(1 for c in gmn_conns(bed) if c.startswith("s") and c.endswith("_t")) == 100, 60,
               "100 connections loaded into the GMN's charon")
    t_loaded = time.monotonic()
    with bed.site_vici(site.name) as v:
        for i in range(100):
            for _ in v.session.initiate({"child": f"s{i:03d}", "timeout": "-1"}):  # do not wait
                pass
    wait_until(lambda: len({r["tenant"] for r in bed.records().values() if r["tenant"].startswith("s")
                            and r["direction"] == "out"}) == 100, 120, "SA records of 100 tunnels", step=0.5)
    t_up = time.monotonic()
    [charon] = _procs(bed, "charon")
    [agent] = _procs(bed, "gmn-agent")

    def rss(pid: int) -> float:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    print(f"\n100 tunnels: loaded in {t_loaded - t0:.1f} s, all up (records written) {t_up - t_loaded:.1f} s later; "
          f"charon RSS {rss(charon.pid):.1f} MB, agent RSS {rss(agent.pid):.1f} MB")
    assert rss(charon.pid) > 0 and rss(agent.pid) > 0


def test_migration_by_rekey_moves_the_records(bed: Bed) -> None:
    """`protego tunnel migrate` pins the next placement and rekeys: the new SAs are placed on
    the target, steering follows, the old SAs and their records leave the source."""
    site = bed.tb.topology.sites[0]
    ref = f"{site.tenant}/{site.name}"
    for _round in range(2):
        recs = bed.records(site.tenant)
        source = next(iter({r["gpn"] for r in recs.values()}))
        target = "gpn2" if source == "gpn1" else "gpn1"
        peer_before = bed.peer_child(site.name)
        res = subprocess.run([sys.executable, "-m", "protego", "--etcd", ",".join(bed.tb.state.etcd_endpoints),
                              "tunnel", "migrate", ref, "--to", target, "--json"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        import json

        out = json.loads(res.stdout)
        assert (out["state"], out["source"], out["target"]) == ("done", source, target)
        assert 0 < out["switch_ms"] <= out["total_ms"]
        recs = bed.records(site.tenant)
        assert {r["gpn"] for r in recs.values()} == {target}
        peer = bed.peer_child(site.name)
        assert peer is not None and peer["spi_in"] != peer_before["spi_in"]  # type: ignore[index]
        assert peer["ike_spi_i"] == peer_before["ike_spi_i"]  # type: ignore[index]  # same IKE SA
        assert sa_pairs(bed, site.tenant) == {"in": {peer["spi_out"]}, "out": {peer["spi_in"]}}
        steer = bed.etcd.get(f"{PREFIX}steer/out/{site.tenant}/{site.name}").json()
        assert steer["gpn"] == target
    # a migration to an unknown GPN fails cleanly and changes nothing
    res = subprocess.run([sys.executable, "-m", "protego", "--etcd", ",".join(bed.tb.state.etcd_endpoints),
                          "tunnel", "migrate", ref, "--to", "gpn9"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "not a healthy GPN" in res.stderr
    assert {r["gpn"] for r in bed.records(site.tenant).values()} == {target}
    events = [kv.json()["kind"] for kv in bed.etcd.get_prefix(f"{PREFIX}events/")[1]]
    assert events.count("migration-done") == 2 and "migration-failed" in events
