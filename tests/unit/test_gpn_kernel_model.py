"""The xfrm backend's desired kernel state (pure: no root, no kernel)."""

from __future__ import annotations

import base64
import ipaddress
import os
import time

from protego.gpn import bpf
from protego.gpn.kernel_model import (
    IF_ID_BASE,
    KernelPlan,
    TenantDevices,
    diff,
    is_ours,
    plan,
    ranges_to_nets,
    same_policy,
    same_state,
)
from protego.gpn.records import parse_sa_record
from protego.gpn.tenant import EgressRoute, mac_bytes
from protego.xfrm.constants import XFRM_POLICY_FWD, XFRM_POLICY_IN, XFRM_POLICY_OUT

ACME_VIP, GLOBEX_VIP, PEER = "203.0.113.11", "203.0.113.12", "198.18.1.1"


def sa(spi: int, direction: str, vni: int = 1001, vip: str = ACME_VIP, tenant: str = "acme",
       remote_ts: str = "10.201.0.0/24", created: float | None = None, suite: str = "aes128gcm16"):  # type: ignore[no-untyped-def]
    inbound = direction == "in"
    enc = os.urandom(20 if "gcm" in suite else 32)
    return parse_sa_record({
        "spi": f"{spi:08x}", "vip": vip, "direction": direction, "tenant": tenant, "tunnel": "hq", "vni": vni,
        "gpn": "gpn1", "mode": "tunnel", "encap": True, "src": PEER if inbound else vip,
        "dst": vip if inbound else PEER, "sport": 4500, "dport": 4500, "suite": suite,
        "enc_key": base64.b64encode(enc).decode(),
        "integ_key": base64.b64encode(b"" if "gcm" in suite else os.urandom(32)).decode(),
        "replay_window": 128, "local_ts": ["10.1.0.0/24"], "remote_ts": [remote_ts],
        "created": time.time() if created is None else created})


def net(text: str) -> tuple[tuple[int, int], ...]:
    n = ipaddress.IPv4Network(text)
    return ((int(n.network_address), int(n.broadcast_address)),)


def test_tenant_devices_and_tags() -> None:
    t = TenantDevices(1001)
    assert t.if_id == t.table == IF_ID_BASE | 1001
    assert t.names == ("pgvrf1001", "pgx1001", "pgv1001", "pgm1001")
    assert all(len(n) <= 15 for n in TenantDevices((1 << 24) - 1).names)  # IFNAMSIZ
    assert is_ours(IF_ID_BASE | 5) and not is_ours(5) and not is_ours(None) and not is_ours(0)


def test_ranges_become_the_fewest_prefixes() -> None:
    first, last = int(ipaddress.IPv4Address("10.0.0.0")), int(ipaddress.IPv4Address("10.0.2.255"))
    assert [str(n) for n in ranges_to_nets([(first, last)])] == ["10.0.0.0/23", "10.0.2.0/24"]
    assert [str(n) for n in ranges_to_nets([])] == ["0.0.0.0/0"]


def test_two_tenants_with_the_same_prefix_get_separate_devices_policies_and_tables() -> None:
    a_in, a_out = sa(0xA100, "in"), sa(0xA200, "out")
    g_in, g_out = sa(0xB100, "in", 1002, GLOBEX_VIP, "globex"), sa(0xB200, "out", 1002, GLOBEX_VIP, "globex")
    hosts = {(1001, int(ipaddress.IPv4Address("10.1.0.10"))): (mac_bytes("02:00:00:e9:00:0a"), "192.0.2.101"),
             (1002, int(ipaddress.IPv4Address("10.1.0.10"))): (mac_bytes("02:00:00:ea:00:0a"), "192.0.2.102")}
    egress = [EgressRoute(1001, net("10.1.0.0/24"), net("10.201.0.0/24"), 0xA200),
              EgressRoute(1002, net("10.1.0.0/24"), net("10.201.0.0/24"), 0xB200)]
    p = plan([a_in, a_out, g_in, g_out], egress, hosts)
    assert sorted(p.tenants) == [1001, 1002]
    # one state per SA, tagged with the tenant's if_id, reqid = SPI
    st = p.states[(ACME_VIP, 0xA100)]
    assert st.if_id == IF_ID_BASE | 1001 and st.reqid == 0xA100 and st.replay_window == 128
    assert p.outbound == {(PEER, 0xA200), (PEER, 0xB200)}
    # the same selectors, apart by if_id
    for vni, vip, out_spi in ((1001, ACME_VIP, 0xA200), (1002, GLOBEX_VIP, 0xB200)):
        if_id = IF_ID_BASE | vni
        out = p.policies[(if_id, XFRM_POLICY_OUT, "10.1.0.0/24", "10.201.0.0/24")]
        (tmpl,) = out.templates
        assert (str(tmpl.src), str(tmpl.dst), tmpl.reqid) == (vip, PEER, out_spi)
        for d in (XFRM_POLICY_IN, XFRM_POLICY_FWD):
            (tmpl,) = p.policies[(if_id, d, "10.201.0.0/24", "10.1.0.0/24")].templates
            assert (str(tmpl.src), str(tmpl.dst), tmpl.reqid) == (PEER, vip, 0)
        assert p.routes[(if_id, "10.201.0.0/24")] == f"pgx{vni}"
        assert p.routes[(if_id, "10.1.0.10/32")] == f"pgv{vni}"
    assert p.neighbours[("pgv1001", "10.1.0.10")] == "02:00:00:e9:00:0a"
    assert p.fdb[("pgv1002", "02:00:00:ea:00:0a")] == "192.0.2.102"
    assert len(p.policies) == 6


def test_a_tunnel_with_only_its_inbound_sa_here_has_no_out_policy_or_route() -> None:
    """A migration's target gets the inbound SA first: in/fwd, but nothing sends yet."""
    p = plan([sa(0xA100, "in")], [], {})
    assert {k[1] for k in p.policies} == {XFRM_POLICY_IN, XFRM_POLICY_FWD}
    assert p.routes == {}


def test_the_outbound_switch_is_one_policy_update() -> None:
    old_in, old_out = sa(0xA100, "in", created=1.0), sa(0xA200, "out", created=1.0)
    new_in, new_out = sa(0xC100, "in", created=2.0), sa(0xC200, "out", created=2.0)
    before = plan([old_in, old_out, new_in, new_out], [EgressRoute(1001, net("10.1.0.0/24"),
                                                                   net("10.201.0.0/24"), 0xA200)], {})
    after = plan([old_in, old_out, new_in, new_out], [EgressRoute(1001, net("10.1.0.0/24"),
                                                                  net("10.201.0.0/24"), 0xC200)], {})
    d = diff(before, after)
    assert [(pol.direction, pol.templates[0].reqid, update) for pol, update in d.set_policies] == \
        [(XFRM_POLICY_OUT, 0xC200, True)]
    assert not (d.add_states or d.remove_states or d.set_routes or d.remove_routes or d.add_tenants)
    # then the old SAs go: only their states
    gone = plan([new_in, new_out], [EgressRoute(1001, net("10.1.0.0/24"), net("10.201.0.0/24"), 0xC200)], {})
    d = diff(after, gone)
    assert sorted(st.spi for st in d.remove_states) == [0xA100, 0xA200]
    assert not (d.set_policies or d.remove_policies or d.remove_tenants)


def test_removing_everything_removes_every_object() -> None:
    p = plan([sa(0xA100, "in"), sa(0xA200, "out")], [EgressRoute(1001, net("10.1.0.0/24"), net("10.201.0.0/24"), 0xA200)],
             {(1001, int(ipaddress.IPv4Address("10.1.0.10"))): (mac_bytes("02:00:00:e9:00:0a"), "192.0.2.101")})
    d = diff(p, KernelPlan())
    assert [t.vni for t in d.remove_tenants] == [1001]
    assert len(d.remove_states) == 2 and len(d.remove_policies) == 3
    assert len(d.remove_routes) == 2 and d.remove_neighbours and d.remove_fdb
    assert not diff(p, p)


def test_state_and_policy_equality_ignore_what_the_kernel_adds() -> None:
    import dataclasses

    p = plan([sa(0xA100, "in")], [], {})
    st = p.states[(ACME_VIP, 0xA100)]
    read_back = dataclasses.replace(st, flags=st.flags | 0x20, cur_bytes=99, cur_packets=1, seq=7)
    assert same_state(st, read_back)
    assert not same_state(st, dataclasses.replace(st, reqid=1))
    pol = next(iter(p.policies.values()))
    assert same_policy(pol, dataclasses.replace(pol, index=12345, priority=0))
    assert not same_policy(pol, dataclasses.replace(pol, if_id=7))


def test_the_tag_filter_keeps_only_tagged_packets() -> None:
    def ipv4(tos: int, proto: int, payload: bytes) -> bytes:
        return bytes([0x45, tos, 0, 20 + len(payload), 0, 0, 0, 0, 64, proto, 0, 0]) + bytes(8) + payload

    def udp(dport: int) -> bytes:
        return (1234).to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(4) + bytes(8)

    esp = bpf.tagged_only(0x37)
    assert bpf.run(esp, ipv4(0x37 << 2, 50, bytes(8))) > 0
    assert bpf.run(esp, ipv4(0x37 << 2 | 1, 50, bytes(8))) > 0  # ECN bits do not matter
    assert bpf.run(esp, ipv4(0, 50, bytes(8))) == 0
    u = bpf.tagged_only(0x37, (4500, 4789))
    assert bpf.run(u, ipv4(0x37 << 2, 17, udp(4500))) > 0
    assert bpf.run(u, ipv4(0x37 << 2, 17, udp(4789))) > 0
    assert bpf.run(u, ipv4(0x37 << 2, 17, udp(53))) == 0
    assert bpf.run(u, ipv4(0, 17, udp(4500))) == 0


def test_a_kept_tenant_keeps_its_devices_and_host_entries_without_sas() -> None:
    """A tunnel moved away (its last SA left this GPN): with its VNI kept, only its states
    and policies go; devices, the tenant's host routes, neighbours and FDB entries stay,
    so that a move back needs no device creation. Without the keep, everything goes."""
    hosts = {(1001, int(ipaddress.IPv4Address("10.1.0.10"))): (mac_bytes("02:00:03:e9:00:01"), "192.0.2.101")}
    inb, out = sa(0xA100, "in"), sa(0xA200, "out")
    here = plan([inb, out], [EgressRoute(1001, net("10.1.0.0/24"), net("10.201.0.0/24"), 0xA200)], hosts)
    kept = plan([], [], hosts, keep_vnis=[1001])
    assert set(kept.tenants) == {1001} and not kept.states and not kept.policies
    assert kept.neighbours == here.neighbours and kept.fdb == here.fdb
    d = diff(here, kept)
    assert not d.remove_tenants and not d.remove_neighbours and not d.remove_fdb
    assert sorted(st.spi for st in d.remove_states) == [0xA100, 0xA200] and d.remove_policies
    # the move back: states and policies only
    back = diff(kept, here)
    assert not back.add_tenants and not back.set_neighbours and not back.set_fdb
    assert sorted(st.spi for st in back.add_states) == [0xA100, 0xA200]
    gone = diff(kept, plan([], [], hosts))
    assert [t.vni for t in gone.remove_tenants] == [1001]


def test_the_backend_keeps_a_left_tenant_for_tenant_keep_s_and_no_longer() -> None:
    """KernelDataPath._kept_vnis (no kernel touched): a VNI whose last SA left stays kept
    for tenant_keep_s from that moment, then goes; one that gets an SA back is simply active."""
    from types import SimpleNamespace

    from protego.gpn.kernel import KernelConfig, KernelDataPath

    dp = KernelDataPath(KernelConfig("192.0.2.1", tenant_keep_s=30))
    dp._sas = {("in", 1): SimpleNamespace(vni=1001), ("in", 2): SimpleNamespace(vni=1002)}  # type: ignore[dict-item]
    assert dp._kept_vnis(0.0) == {1001, 1002}
    del dp._sas[("in", 2)]
    assert dp._kept_vnis(10.0) == {1001, 1002}  # 1002 left at t=10
    assert dp._kept_vnis(39.9) == {1001, 1002}
    assert dp._kept_vnis(40.0) == {1001}
    dp._sas[("in", 3)] = SimpleNamespace(vni=1002)  # type: ignore[assignment]
    assert dp._kept_vnis(50.0) == {1001, 1002} and not dp._vni_left


def test_without_a_keep_a_left_tenant_goes_at_the_sync_that_sees_it_leave() -> None:
    """tenant_keep_s=0 (the lane's xfrm driver): the VNI is not kept even for the pass in
    which its last SA left, so one sync after the removal leaves no device behind."""
    from types import SimpleNamespace

    from protego.gpn.kernel import KernelConfig, KernelDataPath

    dp = KernelDataPath(KernelConfig("192.0.2.1", tenant_keep_s=0.0))
    dp._sas = {("in", 1): SimpleNamespace(vni=1001)}  # type: ignore[dict-item]
    assert dp._kept_vnis(5.0) == {1001}
    dp._sas = {}
    assert dp._kept_vnis(5.0) == set() and not dp._vni_left


def test_parse_xfrm_stat_keeps_the_counters_that_moved() -> None:
    from protego.gpn.kernel import parse_xfrm_stat

    text = "XfrmInError             \t0\nXfrmInStateSeqError     \t50\nXfrmOutNoStates 3\nnot a counter line\n"
    assert parse_xfrm_stat(text) == {"XfrmInStateSeqError": 50, "XfrmOutNoStates": 3}
    assert parse_xfrm_stat("") == {}
