"""The testbed plan: which namespaces, links, addresses and routes a topology needs.

Pure: computed from a :class:`~protego.testbed.topology.Topology`, a testbed name,
a mode and a management subnet index, with no I/O, so it is tested without root.
:mod:`protego.testbed.netns` applies it.

Layout (every name below is prefixed with ``<testbed>-``):

* ``inet``  the internet router: bridge ``inet0`` carrying the internet segment;
  VIPs are routed to the GIN (protego mode) or to each tenant's baseline gateway.
* ``fab``   Protego's fabric: bridge ``fab0``; VXLAN underlay for tenant networks.
* ``mgmt``  management: bridge ``mgmt0`` with etcd; one veth to the host
  (``pm<testbed>``) so the CLI reaches etcd.
* ``lb``, ``gmn1``, ``gmn2``, ``gpnN`` Protego's roles (protego mode).
* ``bg-<tenant>`` one plain strongSwan gateway per tenant (baseline mode).
* ``s-<site>`` a site's strongSwan gateway; ``s-<site>-hN`` its hosts.
* ``t-<tenant>-hN`` a tenant's hosts on the tenant's VXLAN network.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from protego.errors import ConfigError
from protego.testbed.topology import GPN_BACKENDS, Topology, baseline_public

Mode = Literal["protego", "baseline"]
MODES: tuple[Mode, ...] = ("protego", "baseline")
DEFAULT_GPN_BACKEND = "userspace"
# how the progress line names each backend
BACKEND_LABELS = {"userspace": "userspace ESP engine", "xfrm": "kernel XFRM",
                  "auto": "auto: the agent probes the kernel"}

VXLAN_PORT = 4789
# In protego mode every tenant network's gateway address (held by Protego: the GEN
# steers, GPNs answer) has this MAC, reached through the GIN/GEN's VTEP.
GATEWAY_MAC = "02:00:00:00:00:01"


def tenant_host_mac(vni: int, index: int) -> str:
    """A deterministic MAC for a tenant host (what the VNET directory publishes)."""
    return f"02:{(vni >> 16) & 255:02x}:{(vni >> 8) & 255:02x}:{vni & 255:02x}:00:{index & 255:02x}"
MGMT_SUPERNET = ipaddress.IPv4Network("198.19.0.0/16")
HOST_IFNAME_PREFIX = "pm"


def gpn_backends(topo: Topology, requested: str | None = None) -> dict[str, str]:
    """The data-path backend of each GPN (``gpn1`` ... in order): ``requested``
    (``testbed up --backend``) for every GPN when given, else the topology's
    ``[testbed].gpn_backends``, else :data:`DEFAULT_GPN_BACKEND`."""
    if requested is not None and requested not in GPN_BACKENDS:
        raise ConfigError(f"--backend {requested!r}: expected one of {', '.join(GPN_BACKENDS)}")
    if requested is not None:
        chosen = [requested] * topo.gpns
    elif topo.gpn_backends:
        chosen = list(topo.gpn_backends)
    else:
        chosen = [DEFAULT_GPN_BACKEND] * topo.gpns
    return {f"gpn{i}": b for i, b in enumerate(chosen, start=1)}


def describe_backends(backends: dict[str, str]) -> str:
    """``userspace ESP engine`` when every GPN runs the same one, else one per GPN."""
    kinds = set(backends.values())
    if len(kinds) == 1:
        return BACKEND_LABELS[kinds.pop()]
    return ", ".join(f"{node}: {BACKEND_LABELS[b]}" for node, b in backends.items())


def mgmt_subnet(index: int) -> ipaddress.IPv4Network:
    if not 1 <= index <= 254:
        raise ValueError(f"management index {index} out of range 1..254")
    return ipaddress.IPv4Network(f"198.19.{index}.0/24")


@dataclass(frozen=True)
class Namespace:
    node: str  # node name within the testbed, e.g. "s-acme-hq"
    name: str  # network namespace name, e.g. "pt-s-acme-hq"
    role: str  # router | fabric | mgmt | gin | gmn | gpn | baseline | site | site-host | tenant-host
    forwarding: bool = False
    tenant: str | None = None
    site: str | None = None


@dataclass(frozen=True)
class Bridge:
    ns: str
    name: str
    addrs: tuple[str, ...] = ()  # CIDR strings


@dataclass(frozen=True)
class Veth:
    """A veth pair; a side is attached to its ``master`` bridge when one is set."""

    ns_a: str | None  # None = the host's namespace
    name_a: str
    ns_b: str
    name_b: str
    master_a: str | None = None
    master_b: str | None = None
    addrs_a: tuple[str, ...] = ()
    addrs_b: tuple[str, ...] = ()


@dataclass(frozen=True)
class Vxlan:
    ns: str
    name: str
    vni: int
    local: str
    underlay: str  # ifname of the underlay device
    addrs: tuple[str, ...]
    remotes: tuple[str, ...]  # head-end replication: flood to these VTEPs
    mac: str | None = None
    neigh: tuple[tuple[str, str], ...] = ()  # static (ip, mac) entries
    fdb: tuple[tuple[str, str], ...] = ()  # static (mac, vtep) entries


@dataclass(frozen=True)
class Route:
    ns: str
    dst: str  # CIDR or "default"
    via: str


@dataclass(frozen=True)
class LoopbackAddr:
    ns: str
    addr: str  # CIDR


@dataclass(frozen=True)
class Charon:
    node: str
    ns: str
    kind: Literal["site", "baseline"]
    local_addr: str
    tenant: str
    site: str | None = None  # for kind == "site"


@dataclass
class Plan:
    name: str
    mode: Mode
    mgmt: ipaddress.IPv4Network
    namespaces: list[Namespace] = field(default_factory=list)
    bridges: list[Bridge] = field(default_factory=list)
    veths: list[Veth] = field(default_factory=list)
    vxlans: list[Vxlan] = field(default_factory=list)
    loopback: list[LoopbackAddr] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    charons: list[Charon] = field(default_factory=list)
    etcd_addrs: list[str] = field(default_factory=list)
    host_ifname: str = ""
    host_addr: str = ""

    def ns(self, node: str) -> str:
        return f"{self.name}-{node}"

    def node(self, node: str) -> Namespace:
        for n in self.namespaces:
            if n.node == node:
                return n
        raise KeyError(node)

    @property
    def etcd_endpoints(self) -> list[str]:
        return [f"http://{a}:2379" for a in self.etcd_addrs]


def _cidr(addr: ipaddress.IPv4Address, net: ipaddress.IPv4Network) -> str:
    return f"{addr}/{net.prefixlen}"


def build_plan(topo: Topology, name: str, mode: Mode, mgmt_index: int) -> Plan:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    mgmt = mgmt_subnet(mgmt_index)
    plan = Plan(name=name, mode=mode, mgmt=mgmt)
    ns = plan.ns
    ports = {"inet": 0, "fab": 0, "mgmt": 0}

    def port(hub: str) -> str:
        ports[hub] += 1
        return f"p{ports[hub]}"

    # hubs
    plan.namespaces += [
        Namespace("inet", ns("inet"), "router", forwarding=True),
        Namespace("fab", ns("fab"), "fabric"),
        Namespace("mgmt", ns("mgmt"), "mgmt"),
    ]
    plan.bridges += [
        Bridge(ns("inet"), "inet0", (_cidr(topo.router, topo.internet),)),
        Bridge(ns("fab"), "fab0"),
    ]
    mgmt_hosts = list(mgmt.hosts())  # .1 ... .254
    plan.etcd_addrs = [str(mgmt_hosts[i]) for i in range(topo.etcd_members)]
    plan.bridges.append(Bridge(ns("mgmt"), "mgmt0", tuple(f"{a}/24" for a in plan.etcd_addrs)))
    plan.host_ifname = f"{HOST_IFNAME_PREFIX}{name}"
    plan.host_addr = f"{mgmt_hosts[-1]}/24"
    # the only interface a testbed puts in the host's namespace: the CLI's way to etcd
    plan.veths.append(
        Veth(None, plan.host_ifname, ns("mgmt"), "host0", addrs_a=(plan.host_addr,), master_b="mgmt0")
    )

    fab_hosts = list(topo.fabric.hosts())

    def attach(hub: str, bridge: str, node: str, ifname: str, addrs: tuple[str, ...]) -> None:
        plan.veths.append(Veth(ns(hub), port(hub), ns(node), ifname, master_a=bridge, addrs_b=addrs))

    def mgmt_attach(node: str, host_index: int) -> None:
        attach("mgmt", "mgmt0", node, "mgmt0", (f"{mgmt_hosts[host_index - 1]}/24",))

    tenant_vteps: dict[str, list[str]] = {t.name: [] for t in topo.tenants}
    gateway_vteps: dict[str, list[str]] = {t.name: [] for t in topo.tenants}

    if mode == "protego":
        gin = ns("lb")
        plan.namespaces.append(Namespace("lb", gin, "gin", forwarding=True))
        attach("inet", "inet0", "lb", "wan0", (_cidr(topo.gin, topo.internet),))
        attach("fab", "fab0", "lb", "fab0", (_cidr(fab_hosts[0], topo.fabric),))
        mgmt_attach("lb", 10)
        plan.routes.append(Route(gin, "default", str(topo.router)))
        for t in topo.tenants:
            gateway_vteps[t.name].append(str(fab_hosts[0]))
        for i in (1, 2):
            node = f"gmn{i}"
            plan.namespaces.append(Namespace(node, ns(node), "gmn"))
            attach("fab", "fab0", node, "fab0", (_cidr(fab_hosts[10 + i - 1], topo.fabric),))
            mgmt_attach(node, 10 + i)
            # replies leave from the VIP (held on lo by the agent) through the GIN
            plan.routes.append(Route(ns(node), "default", str(fab_hosts[0])))
        for i in range(1, topo.gpns + 1):
            node = f"gpn{i}"
            addr = fab_hosts[20 + i - 1]
            plan.namespaces.append(Namespace(node, ns(node), "gpn"))
            attach("fab", "fab0", node, "fab0", (_cidr(addr, topo.fabric),))
            mgmt_attach(node, 20 + i)
            plan.routes.append(Route(ns(node), "default", str(fab_hosts[0])))
            for t in topo.tenants:
                gateway_vteps[t.name].append(str(addr))
        for t in topo.tenants:
            plan.routes.append(Route(ns("inet"), f"{t.vip}/32", str(topo.gin)))
    else:
        for ti, t in enumerate(topo.tenants):
            node = f"bg-{t.name}"
            pub = baseline_public(topo, ti)
            fab_addr = fab_hosts[40 + ti]
            plan.namespaces.append(Namespace(node, ns(node), "baseline", forwarding=True, tenant=t.name))
            attach("inet", "inet0", node, "wan0", (_cidr(pub, topo.internet),))
            attach("fab", "fab0", node, "fab0", (_cidr(fab_addr, topo.fabric),))
            plan.loopback.append(LoopbackAddr(ns(node), f"{t.vip}/32"))
            plan.routes.append(Route(ns(node), "default", str(topo.router)))
            plan.routes.append(Route(ns("inet"), f"{t.vip}/32", str(pub)))
            gateway_vteps[t.name].append(str(fab_addr))
            plan.charons.append(Charon(node, ns(node), "baseline", str(t.vip), t.name))

    # tenant hosts: fabric underlay + the tenant's VXLAN network
    k = 0
    host_fab: dict[tuple[str, int], str] = {}
    for t in topo.tenants:
        for j, _h in enumerate(t.hosts, start=1):
            fab_addr = str(fab_hosts[100 + k])
            k += 1
            host_fab[(t.name, j)] = fab_addr
            tenant_vteps[t.name].append(fab_addr)
    for t in topo.tenants:
        for j, h in enumerate(t.hosts, start=1):
            node = f"t-{t.name}-h{j}"
            plan.namespaces.append(Namespace(node, ns(node), "tenant-host", tenant=t.name))
            fab_addr = host_fab[(t.name, j)]
            attach("fab", "fab0", node, "fab0", (_cidr(ipaddress.IPv4Address(fab_addr), topo.fabric),))
            static: dict[str, tuple[tuple[str, str], ...]] = {}
            if mode == "protego":
                static = {"neigh": ((str(t.gateway), GATEWAY_MAC),), "fdb": ((GATEWAY_MAC, str(fab_hosts[0])),)}
            plan.vxlans.append(
                Vxlan(ns(node), "tnet0", t.vni, fab_addr, "fab0", (_cidr(h, t.network),),
                      tuple(gateway_vteps[t.name]), mac=tenant_host_mac(t.vni, j), **static)
            )
            plan.routes.append(Route(ns(node), "default", str(t.gateway)))
    if mode == "baseline":
        for ti, t in enumerate(topo.tenants):
            node = f"bg-{t.name}"
            plan.vxlans.append(
                Vxlan(ns(node), "tnet0", t.vni, str(fab_hosts[40 + ti]), "fab0",
                      (_cidr(t.gateway, t.network),), tuple(tenant_vteps[t.name]))
            )

    # sites: a gateway on the internet with a LAN bridge, hosts behind it
    for s in topo.sites:
        node = f"s-{s.name}"
        plan.namespaces.append(Namespace(node, ns(node), "site", forwarding=True, tenant=s.tenant, site=s.name))
        attach("inet", "inet0", node, "wan0", (_cidr(s.public, topo.internet),))
        plan.routes.append(Route(ns(node), "default", str(topo.router)))
        plan.bridges.append(Bridge(ns(node), "lan0", (_cidr(s.gateway, s.network),)))
        plan.charons.append(Charon(node, ns(node), "site", str(s.public), s.tenant, s.name))
        for j, h in enumerate(s.hosts, start=1):
            hnode = f"{node}-h{j}"
            plan.namespaces.append(Namespace(hnode, ns(hnode), "site-host", tenant=s.tenant, site=s.name))
            plan.veths.append(Veth(ns(node), f"h{j}", ns(hnode), "eth0", master_a="lan0",
                                   addrs_b=(_cidr(h, s.network),)))
            plan.routes.append(Route(ns(hnode), "default", str(s.gateway)))
    return plan
