"""The xfrm backend's desired kernel state, computed purely from what the agent installs.

The GPN agent hands the backend the SAs placed on this GPN, the egress routes (per
tunnel: the outbound SA to use) and the VNET host directory, exactly as it hands them
to the userspace engine. :func:`plan` turns them into the kernel objects that carry
the same packet paths (docs/gpn.md, "The xfrm backend"):

* per tenant (VNI ``v``), a VRF ``pgvrf<v>`` (routing table ``IF_ID_BASE | v``) holding
  an XFRM interface ``pgx<v>`` (``if_id = IF_ID_BASE | v``), the tenant's VXLAN device
  ``pgv<v>`` (VNI ``v``, on the fabric address) and a macvlan ``pgm<v>`` on it that owns
  the tenant gateway's MAC (frames the GEN forwards arrive addressed to it); overlapping
  tenant prefixes stay apart because every lookup happens in the tenant's own table and
  every policy and state carries the tenant's ``if_id``;
* per SA, one XFRM state (tunnel mode, the VIP as its outer address, ``reqid`` = SPI);
* per tunnel, ``in`` and ``fwd`` policies (site prefixes to tenant prefixes, template
  peer -> VIP) while it has any SA here, and an ``out`` policy (template VIP -> peer,
  ``reqid`` = the SPI of the tunnel's chosen outbound SA) with routes for the site
  prefixes into the XFRM interface while it has an egress route here;
* per known tenant host, a /32 route into the VXLAN device, a permanent neighbour and a
  permanent FDB entry towards its VTEP.

:func:`diff` compares two plans. Everything here is pure: no sockets, no root.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from protego.xfrm.constants import XFRM_POLICY_FWD, XFRM_POLICY_IN, XFRM_POLICY_OUT
from protego.xfrm.convert import state_from_sa
from protego.xfrm.messages import LifetimeCfg, Selector, XfrmPolicy, XfrmState, XfrmTemplate

from .records import GpnSa
from .tenant import EgressRoute

__all__ = ["IF_ID_BASE", "KernelPlan", "PlanDiff", "TenantDevices", "diff", "is_ours", "plan", "ranges_to_nets",
           "same_policy", "same_state"]

#: Protego's XFRM if_ids and VRF tables are ``IF_ID_BASE | VNI`` (VNIs are 24 bits): the
#: tag by which the backend recognises its own states and policies when it reads the
#: kernel back, whatever else runs on the host.
IF_ID_BASE = 0x50 << 24
_IF_ID_MASK = 0xFF << 24

Net = ipaddress.IPv4Network
PolicyKey = tuple[int, int, str, str]  # (if_id, direction, source net, destination net)
StateKey = tuple[str, int]  # (outer destination, SPI)


def is_ours(if_id: int | None) -> bool:
    """An XFRM state or policy this backend installed (its if_id carries our tag)."""
    return bool(if_id) and (if_id & _IF_ID_MASK) == IF_ID_BASE  # type: ignore[operator]


@dataclass(frozen=True)
class TenantDevices:
    """The kernel devices of one tenant (VNI) on this GPN."""

    vni: int

    @property
    def if_id(self) -> int:
        return IF_ID_BASE | self.vni

    @property
    def table(self) -> int:
        return IF_ID_BASE | self.vni

    @property
    def vrf(self) -> str:
        return f"pgvrf{self.vni}"

    @property
    def xfrmi(self) -> str:
        return f"pgx{self.vni}"

    @property
    def vxlan(self) -> str:
        return f"pgv{self.vni}"

    @property
    def macvlan(self) -> str:
        return f"pgm{self.vni}"

    @property
    def names(self) -> tuple[str, str, str, str]:
        """Creation order (the VRF first, the macvlan after its VXLAN device)."""
        return (self.vrf, self.xfrmi, self.vxlan, self.macvlan)


def ranges_to_nets(ranges: Iterable[tuple[int, int]]) -> list[Net]:
    """Address ranges (first, last) as the fewest CIDR prefixes; no range: ``0.0.0.0/0``."""
    out: list[Net] = []
    for first, last in ranges:
        out += ipaddress.summarize_address_range(ipaddress.IPv4Address(first), ipaddress.IPv4Address(last))
    return sorted(set(out)) if out else [ipaddress.IPv4Network("0.0.0.0/0")]


@dataclass
class KernelPlan:
    tenants: dict[int, TenantDevices] = field(default_factory=dict)
    states: dict[StateKey, XfrmState] = field(default_factory=dict)
    outbound: set[StateKey] = field(default_factory=set)  # the states that encrypt
    policies: dict[PolicyKey, XfrmPolicy] = field(default_factory=dict)
    routes: dict[tuple[int, str], str] = field(default_factory=dict)  # (table, dst) -> device
    neighbours: dict[tuple[str, str], str] = field(default_factory=dict)  # (device, ip) -> MAC
    fdb: dict[tuple[str, str], str] = field(default_factory=dict)  # (device, MAC) -> VTEP


def state_for(g: GpnSa, if_id: int) -> XfrmState:
    """The XFRM state of one SA. Byte and packet limits stay infinite in the kernel: the
    GMN rekeys by its own clock, and a kernel that expired an outbound state on its own
    would make it vanish under the agent (whose soft-limit report asks for the rekey)."""
    st = state_from_sa(g.sa, if_id=if_id)
    return XfrmState(
        src=st.src, dst=st.dst, spi=st.spi, reqid=g.spi, replay_window=st.replay_window, flags=st.flags,
        lifetime=LifetimeCfg(), algorithms=st.algorithms, encap=st.encap, if_id=if_id)


def _policy(if_id: int, direction: int, src: Net, dst: Net, tmpl_src: str, tmpl_dst: str,
            reqid: int) -> tuple[PolicyKey, XfrmPolicy]:
    sel = Selector.between(str(src), str(dst))
    tmpl = XfrmTemplate(src=tmpl_src, dst=tmpl_dst, reqid=reqid)
    return (if_id, direction, str(src), str(dst)), XfrmPolicy(sel, direction, (tmpl,), if_id=if_id)


def _newest(sas: list[GpnSa]) -> GpnSa:
    return max(sas, key=lambda g: (g.created, g.spi))


def plan(sas: Iterable[GpnSa], egress: Iterable[EgressRoute],
         hosts: Mapping[tuple[int, int], tuple[bytes, str]], keep_vnis: Iterable[int] = ()) -> KernelPlan:
    """The kernel objects for ``sas`` (every SA installed or lingering here), the egress
    ``routes`` and the host directory (``(vni, ip) -> (mac, vtep)``). ``keep_vnis``: tenants
    whose devices (and host entries) stay although no SA of theirs is here (a tunnel that
    just left may come back: creating the devices is the slowest part of an install)."""
    p = KernelPlan()
    for vni in keep_vnis:
        p.tenants.setdefault(vni, TenantDevices(vni))
    by_tunnel: dict[tuple[str, str], list[GpnSa]] = {}
    out_by_spi: dict[tuple[int, int], GpnSa] = {}
    for g in sas:
        t = p.tenants.setdefault(g.vni, TenantDevices(g.vni))
        key = (str(g.sa.dst), g.spi)
        p.states[key] = state_for(g, t.if_id)
        if not g.inbound:
            p.outbound.add(key)
            out_by_spi[(g.vni, g.spi)] = g
        by_tunnel.setdefault((g.tenant, g.tunnel), []).append(g)
    # in and fwd: while the tunnel has any SA here (a migration's target gets the
    # inbound SA first); the template's source is the peer of its newest inbound SA
    for group in by_tunnel.values():
        newest = _newest(group)
        inbound = [g for g in group if g.inbound]
        peer = _newest(inbound).peer if inbound else newest.peer
        if_id = p.tenants[newest.vni].if_id
        for remote in ranges_to_nets(newest.remote_ts.ranges):
            for local in ranges_to_nets(newest.local_ts.ranges):
                for direction in (XFRM_POLICY_IN, XFRM_POLICY_FWD):
                    k, pol = _policy(if_id, direction, remote, local, peer, newest.vip, 0)
                    p.policies[k] = pol
    # out: the egress route names the outbound SA; its reqid picks exactly that state
    for r in egress:
        g = out_by_spi.get((r.vni, r.spi))
        if g is None:
            continue
        t = p.tenants[r.vni]
        remotes = ranges_to_nets(r.remote)
        for local in ranges_to_nets(r.local):
            for remote in remotes:
                k, pol = _policy(t.if_id, XFRM_POLICY_OUT, local, remote, g.vip, g.peer, g.spi)
                p.policies[k] = pol
        for remote in remotes:
            p.routes[(t.table, str(remote))] = t.xfrmi
    for (vni, ip), (mac, vtep) in sorted(hosts.items()):
        t = p.tenants.get(vni)
        if t is None:
            continue
        addr = str(ipaddress.IPv4Address(ip))
        mac_text = ":".join(f"{b:02x}" for b in mac)
        p.routes[(t.table, f"{addr}/32")] = t.vxlan
        p.neighbours[(t.vxlan, addr)] = mac_text
        p.fdb[(t.vxlan, mac_text)] = vtep
    return p


@dataclass
class PlanDiff:
    """What to change, per kind of object: ``add`` (also replace), ``remove``."""

    add_tenants: list[TenantDevices] = field(default_factory=list)
    remove_tenants: list[TenantDevices] = field(default_factory=list)
    add_states: list[XfrmState] = field(default_factory=list)
    update_states: list[XfrmState] = field(default_factory=list)
    remove_states: list[XfrmState] = field(default_factory=list)
    set_policies: list[tuple[XfrmPolicy, bool]] = field(default_factory=list)  # (policy, update)
    remove_policies: list[XfrmPolicy] = field(default_factory=list)
    set_routes: list[tuple[int, str, str]] = field(default_factory=list)  # table, dst, device
    remove_routes: list[tuple[int, str]] = field(default_factory=list)
    set_neighbours: list[tuple[str, str, str]] = field(default_factory=list)  # device, ip, MAC
    remove_neighbours: list[tuple[str, str]] = field(default_factory=list)
    set_fdb: list[tuple[str, str, str]] = field(default_factory=list)  # device, MAC, VTEP
    remove_fdb: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(bool(v) for v in vars(self).values())


def same_state(a: XfrmState, b: XfrmState) -> bool:
    """Equal as installed (the kernel's counters aside): ``b`` may be read back from it."""
    return (a.src, a.dst, a.spi, a.reqid, a.replay_window, a.esn, a.algorithms, a.encap, a.if_id) == \
        (b.src, b.dst, b.spi, b.reqid, b.replay_window, b.esn, b.algorithms, b.encap, b.if_id)


def _tmpl_key(t: XfrmTemplate) -> tuple[object, ...]:
    return (t.src, t.dst, t.proto, t.spi, t.reqid, t.mode)


def same_policy(a: XfrmPolicy, b: XfrmPolicy) -> bool:
    """Equal as installed (the kernel's index, lifetimes and defaults aside)."""
    return (a.selector, a.direction, a.if_id, a.action, [_tmpl_key(t) for t in a.templates]) == \
        (b.selector, b.direction, b.if_id, b.action, [_tmpl_key(t) for t in b.templates])


def diff(old: KernelPlan, new: KernelPlan) -> PlanDiff:
    d = PlanDiff()
    d.add_tenants = [t for v, t in sorted(new.tenants.items()) if v not in old.tenants]
    d.remove_tenants = [t for v, t in sorted(old.tenants.items()) if v not in new.tenants]
    for k, st in sorted(new.states.items()):
        cur = old.states.get(k)
        if cur is None:
            d.add_states.append(st)
        elif not same_state(cur, st):
            d.update_states.append(st)
    d.remove_states = [st for k, st in sorted(old.states.items()) if k not in new.states]
    for k, pol in sorted(new.policies.items()):
        cur = old.policies.get(k)
        if cur is None or not same_policy(cur, pol):
            d.set_policies.append((pol, cur is not None))
    d.remove_policies = [pol for k, pol in sorted(old.policies.items()) if k not in new.policies]
    d.set_routes = [(t, dst, dev) for (t, dst), dev in sorted(new.routes.items()) if old.routes.get((t, dst)) != dev]
    d.remove_routes = [k for k in sorted(old.routes) if k not in new.routes]
    d.set_neighbours = [(dev, ip, mac) for (dev, ip), mac in sorted(new.neighbours.items())
                        if old.neighbours.get((dev, ip)) != mac]
    d.remove_neighbours = [k for k in sorted(old.neighbours) if k not in new.neighbours]
    d.set_fdb = [(dev, mac, vtep) for (dev, mac), vtep in sorted(new.fdb.items()) if old.fdb.get((dev, mac)) != vtep]
    d.remove_fdb = [k for k in sorted(old.fdb) if k not in new.fdb]
    return d
