"""Tenants and tunnels in a real etcd, through the store and through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from protego.control.model import Tenant, Tunnel, secret_key, tunnel_key
from protego.control.store import ControlStore
from protego.errors import ConfigError, ConflictError

PSK = b"0123456789abcdef0123456789abcdef"


def tun(tenant: str = "acme", name: str = "hq", ts: str = "10.201.0.0/24") -> Tunnel:
    return Tunnel(tenant=tenant, name=name, remote_addrs="198.18.1.1", remote_ts=(ts,))


@pytest.fixture(autouse=True)
def gmn_key(etcd):  # type: ignore[no-untyped-def]
    """The GMNs' sealing key, published as a GMN agent does (the store seals PSKs to it)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from protego import sealing
    from protego.control.model import GMN_SEAL_KEY

    key = X25519PrivateKey.generate()
    etcd.put_json(GMN_SEAL_KEY, {"key": sealing.public_bytes(key).hex()})
    return key


def stored_psk(etcd, gmn_key, tenant: str, tunnel: str) -> bytes:  # type: ignore[no-untyped-def]
    """The PSK etcd holds for a tunnel, opened with the GMNs' key (it is sealed: issue #19)."""
    from protego import sealing

    value = etcd.get(secret_key(tenant, tunnel)).value
    assert PSK not in value and sealing.is_sealed(value.decode())
    return sealing.unseal(gmn_key, value.decode(), f"secrets/{tenant}/{tunnel}")


@pytest.fixture
def store(etcd) -> ControlStore:  # type: ignore[no-untyped-def]
    s = ControlStore(etcd)
    s.add_tenant(Tenant("acme", 1001, "10.1.0.0/24", "203.0.113.11"))
    return s


def snapshot(etcd) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    _rev, kvs = etcd.get_prefix("/protego/")
    return {kv.key: kv.value for kv in kvs}


def test_duplicates_are_refused_and_change_nothing(store, etcd) -> None:  # type: ignore[no-untyped-def]
    before = snapshot(etcd)
    with pytest.raises(ConflictError, match="tenant acme already exists"):
        store.add_tenant(Tenant("acme", 2000, "10.2.0.0/24", "203.0.113.99"))
    with pytest.raises(ConflictError, match="VNI 1001 is already used by tenant acme"):
        store.add_tenant(Tenant("globex", 1001, "10.1.0.0/24", "203.0.113.12"))
    with pytest.raises(ConflictError, match="VIP 203.0.113.11 is already used by tenant acme"):
        store.add_tenant(Tenant("globex", 1002, "10.1.0.0/24", "203.0.113.11"))
    assert snapshot(etcd) == before
    # overlapping prefixes across tenants are fine
    store.add_tenant(Tenant("globex", 1002, "10.1.0.0/24", "203.0.113.12"))
    assert [t.name for t in store.list_tenants()] == ["acme", "globex"]


def test_tunnel_lifecycle(store, etcd, gmn_key) -> None:  # type: ignore[no-untyped-def]
    store.add_tunnel(tun(), PSK)
    assert stored_psk(etcd, gmn_key, "acme", "hq") == PSK
    assert store.get_tunnel("acme", "hq") == tun()
    with pytest.raises(ConflictError, match="already exists"):
        store.add_tunnel(tun(), PSK)
    before = snapshot(etcd)
    with pytest.raises(ConfigError, match="overlaps 10.201.0.0/24 of tunnel hq"):
        store.add_tunnel(tun(name="branch", ts="10.201.0.0/16"), PSK)
    with pytest.raises(ConfigError, match="unknown tenant 'nobody'"):
        store.add_tunnel(tun(tenant="nobody"), PSK)
    with pytest.raises(ConfigError, match="16 to 1024 bytes"):
        store.add_tunnel(tun(name="short"), b"short")
    assert snapshot(etcd) == before
    store.remove_tunnel("acme", "hq")
    assert etcd.get(tunnel_key("acme", "hq")) is None and etcd.get(secret_key("acme", "hq")) is None
    with pytest.raises(ConfigError, match="unknown tunnel 'acme/hq'"):
        store.remove_tunnel("acme", "hq")


def test_concurrent_overlapping_tunnels_only_one_wins(store) -> None:  # type: ignore[no-untyped-def]
    results: list[str] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            store.add_tunnel(tun(name=f"t{i}", ts=f"10.201.{i}.0/24" if i % 2 else "10.201.0.0/16"), PSK)
            results.append(f"t{i}")
        except (ConfigError, ConflictError):
            pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tunnels = store.list_tunnels("acme")
    assert sorted(t.name for t in tunnels) == sorted(results)
    # whatever won, no two remaining tunnels overlap
    from protego.control.model import overlapping_selectors

    for t in tunnels:
        assert overlapping_selectors(t, tunnels) is None


def test_tenant_removal(store, etcd) -> None:  # type: ignore[no-untyped-def]
    store.add_tunnel(tun(), PSK)
    with pytest.raises(ConfigError, match="still has tunnels \\(hq\\)"):
        store.remove_tenant("acme")
    assert store.remove_tenant("acme", with_tunnels=True) == ["hq"]
    assert set(snapshot(etcd)) == {"/protego/v1/gmn/seal-key"}


def cli(etcd_loopback: list[str], *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "protego", "--etcd", ",".join(etcd_loopback), *args],
                          capture_output=True, input=stdin, timeout=60)


def test_cli_round_trip(etcd, etcd_loopback, gmn_key) -> None:  # type: ignore[no-untyped-def]
    r = cli(etcd_loopback, "tenant", "add", "acme", "--vni", "1001", "--network", "10.1.0.0/24",
            "--vip", "203.0.113.11")
    assert r.returncode == 0, r.stderr
    r = cli(etcd_loopback, "tunnel", "add", "acme/hq", "--remote-addrs", "198.18.1.1", "--remote-ts",
            "10.201.0.0/24", "--rate", "100", "--psk-file", "-", stdin=PSK + b"\n")
    assert r.returncode == 0, r.stderr
    assert stored_psk(etcd, gmn_key, "acme", "hq") == PSK  # trailing newline stripped
    listed = json.loads(cli(etcd_loopback, "tunnel", "list", "--json").stdout)
    assert [(t["tenant"], t["name"], t["rate_mbps"]) for t in listed] == [("acme", "hq", 100.0)]
    shown = cli(etcd_loopback, "tunnel", "show", "acme/hq").stdout
    assert b"remote_addrs: 198.18.1.1" in shown and PSK not in shown
    tenants = json.loads(cli(etcd_loopback, "tenant", "list", "--json").stdout)
    assert tenants == [{"name": "acme", "vni": 1001, "network": "10.1.0.0/24", "vip": "203.0.113.11",
                        "tunnels": 1}]
    assert json.loads(cli(etcd_loopback, "sa", "list", "--json").stdout) == []


@pytest.mark.parametrize("args,msg", [
    (["tunnel", "add", "acme/x", "--remote-addrs", "198.18.1", "--remote-ts", "10.9.0.0/24"], b"malformed address"),
    (["tunnel", "add", "acme/x", "--remote-addrs", "198.18.1.2", "--remote-ts", "10.9.0.0/24",
      "--esp-proposals", "3des-md5"], b"not supported by Protego's data plane"),
    (["tunnel", "add", "nobody/x", "--remote-addrs", "198.18.1.2", "--remote-ts", "10.9.0.0/24"],
     b"unknown tenant 'nobody'"),
    (["tunnel", "add", "acme-x", "--remote-addrs", "198.18.1.2", "--remote-ts", "10.9.0.0/24"],
     b"expected TENANT/TUNNEL"),
    (["tenant", "add", "bad", "--vni", "1001", "--network", "10.5.0.0/24", "--vip", "203.0.113.50"],
     b"VNI 1001 is already used"),
    (["tunnel", "remove", "acme/none"], b"unknown tunnel 'acme/none'"),
    # issue #19's repros: each was accepted and stored
    (["tenant", "add", "lo", "--vni", "7", "--network", "10.7.0.0/24", "--vip", "127.0.0.1"], b"loopback"),
    (["tenant", "add", "any", "--vni", "7", "--network", "10.7.0.0/24", "--vip", "0.0.0.0"], b"unspecified"),
    (["tenant", "add", "mc", "--vni", "7", "--network", "10.7.0.0/24", "--vip", "224.0.0.1"], b"multicast"),
    (["tenant", "add", "v6", "--vni", "7", "--network", "10.7.0.0/24", "--vip", "2001:db8::1"], b"IPv4 addresses only"),
    (["tunnel", "add", "acme/x", "--remote-addrs", "198.18.1.2", "--remote-ts", "10.9.0.0/24", "--rate", "nan"],
     b"not a number in range"),
    (["tunnel", "add", "acme/x", "--remote-addrs", "198.18.1.2", "--remote-ts", "10.9.0.0/24", "--rate", "inf"],
     b"not a number in range"),
    (["tunnel", "add", "acme/x", "--remote-addrs", "198.18.1.2", "--remote-ts", "10.9.0.0/24",
      "--local-id", "x" * 70_000], b"local_id: 70000 bytes long"),
    (["tunnel", "add", "acme/x", "--remote-addrs", "127.0.0.1", "--remote-ts", "10.9.0.0/24"], b"loopback"),
])
def test_cli_bad_input_one_clear_error(etcd, etcd_loopback, args, msg) -> None:  # type: ignore[no-untyped-def]
    ControlStore(etcd).add_tenant(Tenant("acme", 1001, "10.1.0.0/24", "203.0.113.11"))
    before = snapshot(etcd)
    r = cli(etcd_loopback, *args, stdin=PSK)
    assert r.returncode != 0
    assert msg in r.stderr, r.stderr
    assert b"Traceback" not in r.stderr
    assert snapshot(etcd) == before


def test_cli_refuses_a_psk_out_of_bounds(etcd, etcd_loopback) -> None:  # type: ignore[no-untyped-def]
    ControlStore(etcd).add_tenant(Tenant("acme", 1001, "10.1.0.0/24", "203.0.113.11"))
    before = snapshot(etcd)
    for psk, msg in ((b"k" * 1_300_000, b"16 to 1024 bytes long (it is 1300000)"), (b"short", b"(it is 5)")):
        r = cli(etcd_loopback, "tunnel", "add", "acme/x", "--remote-addrs", "198.18.1.2", "--remote-ts",
                "10.9.0.0/24", "--psk-file", "-", stdin=psk)
        assert r.returncode != 0 and msg in r.stderr, r.stderr[-300:]
        assert psk not in r.stderr and snapshot(etcd) == before


def test_without_a_gmn_key_no_tunnel_is_added(store, etcd) -> None:  # type: ignore[no-untyped-def]
    """A PSK is never stored in clear: with no GMN sealing key in etcd the tunnel waits."""
    from protego.control.model import GMN_SEAL_KEY

    etcd.delete(GMN_SEAL_KEY)
    before = snapshot(etcd)
    with pytest.raises(ConfigError, match="no GMN sealing key in etcd"):
        store.add_tunnel(tun(), PSK)
    assert snapshot(etcd) == before


def test_a_vip_is_stored_and_indexed_in_canonical_form(store, etcd) -> None:  # type: ignore[no-untyped-def]
    """Was: ``2001:db8::1`` and ``2001:DB8:0::1`` were accepted as two VIPs (the index
    was keyed by the raw string). IPv6 is refused now; every VIP is indexed canonically."""
    with pytest.raises(ConfigError, match="IPv4 addresses only"):
        store.add_tenant(Tenant("v6", 7, "10.7.0.0/24", "2001:DB8:0::1"))
    assert etcd.get("/protego/v1/index/vip/203.0.113.11").value == b"acme"
    with pytest.raises(ConflictError, match="VIP 203.0.113.11 is already used by tenant acme"):
        store.add_tenant(Tenant("globex", 7, "10.7.0.0/24", "203.0.113.11"))


@pytest.mark.parametrize("count", [3, 60])  # one transaction; more than etcd takes in one (one by one)
def test_store_adds_every_tunnel_or_none(store, etcd, count) -> None:  # type: ignore[no-untyped-def]
    store.add_tunnel(tun(name="taken", ts="10.250.0.0/24"), PSK)
    items = [(tun(name=f"b{i}", ts=f"10.210.{i}.0/24"), PSK) for i in range(count)]
    items.insert(count - 1, (tun(name="taken", ts="10.251.0.0/24"), PSK))  # refused at etcd, not before
    def state() -> dict[str, bytes]:  # the tenant's guard is a change counter: bumped by the roll-back
        return {k: v for k, v in snapshot(etcd).items() if "/guard/" not in k}

    before = state()
    with pytest.raises(ConflictError, match="tunnel acme/taken already exists"):
        store.add_tunnels(items)
    assert state() == before
    store.add_tunnels([it for it in items if it[0].name != "taken"])
    assert len(store.list_tunnels("acme")) == count + 1


def _line(name: str, ts: str, **kw: object) -> bytes:
    doc = {"tenant": "acme", "name": name, "remote_addrs": "198.18.1.1", "remote_id": f"{name}.example",
           "remote_ts": [ts], "psk": PSK.decode(), **kw}
    return json.dumps(doc).encode() + b"\n"


def test_cli_load_adds_many_tunnels_or_none(etcd, etcd_loopback, gmn_key) -> None:  # type: ignore[no-untyped-def]
    ControlStore(etcd).add_tenant(Tenant("acme", 1001, "10.1.0.0/24", "203.0.113.11"))
    good = b"".join(_line(f"b{i}", f"10.210.{i}.0/24") for i in range(5))
    before = snapshot(etcd)
    # a bad line anywhere (overlap with an earlier line, bad proposal, bad JSON) adds nothing,
    # and the error never shows the line (it holds a PSK)
    for bad, msg in ((_line("b9", "10.210.1.0/25"), b"line 6: tunnel acme/b9: remote_ts 10.210.1.0/25 overlaps"),
                     (_line("b9", "10.211.0.0/24", esp_proposals="3des-md5"), b"not supported"),
                     (b'{"tenant": "acme", ' + PSK + b"\n", b"line 6: not JSON"),
                     (_line("b0", "10.212.0.0/24"), b"appears twice"),
                     (_line("b9", "10.212.0.0/24", colour="red"), b"unknown field(s) colour"),
                     # issue #19: a non-string PSK was stored as its repr; NaN rates were stored
                     (_line("b9", "10.212.0.0/24", psk=12345678901234567890), b"psk must be a string, not int"),
                     (_line("b9", "10.212.0.0/24", rate_mbps=float("nan")), b"not a number in range"),
                     (_line("b9", "10.212.0.0/24", rate_mbps=True), b"not a number in range"),
                     (_line("b9", "10.212.0.0/24", remote_id=7), b"remote_id must be a string, not int"),
                     (_line("b9", "10.212.0.0/24", psk="k" * 2000), b"16 to 1024 bytes")):
        r = cli(etcd_loopback, "tunnel", "load", "-", stdin=good + bad)
        assert r.returncode != 0 and msg in r.stderr, r.stderr
        assert PSK not in r.stderr and b"Traceback" not in r.stderr
        assert snapshot(etcd) == before
    r = cli(etcd_loopback, "tunnel", "load", "-", stdin=b"# five branches\n" + good)
    assert r.returncode == 0, r.stderr
    assert b"5 tunnel(s) added" in r.stdout
    store = ControlStore(etcd)
    assert sorted(t.name for t in store.list_tunnels("acme")) == [f"b{i}" for i in range(5)]
    assert store.get_tunnel("acme", "b3").remote_id == "b3.example"
    assert stored_psk(etcd, gmn_key, "acme", "b4") == PSK
    # loading the same again: they exist already, nothing changes
    before = snapshot(etcd)
    r = cli(etcd_loopback, "tunnel", "load", "-", stdin=good)
    assert r.returncode != 0 and b"already exists" in r.stderr
    assert snapshot(etcd) == before
    # a bad line 2 of 3 adds nothing (issue #19: line 1 was added)
    three = _line("c1", "10.220.1.0/24") + _line("c2", "10.220.2.0/24", rate_mbps="fast") + \
        _line("c3", "10.220.3.0/24")
    r = cli(etcd_loopback, "tunnel", "load", "-", stdin=three)
    assert r.returncode != 0 and b"line 2" in r.stderr, r.stderr
    assert snapshot(etcd) == before
