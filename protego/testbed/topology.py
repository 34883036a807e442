"""Testbed topologies: a TOML document describing sites, tenants and Protego's nodes.

Parsing and validation are pure: a topology is rejected with one clear message
naming the place (file, section, entry, field) before anything is created.
The format is documented in ``docs/testbed.md``. Packaged topologies are loaded by
name: ``default`` (``protego/data/topology-default.toml``) and ``lane`` (the same
tenants and sites with timings relaxed for the kernel lane's emulated guest,
``protego/data/topology-lane.toml``).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from protego.errors import ConfigError

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,11}$")
TESTBED_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")

DEFAULT_IKE_PROPOSAL = "aes128gcm16-prfsha256-ecp256"
DEFAULT_ESP_PROPOSAL = "aes128gcm16"
_PROPOSAL_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

# the GPN agent's data-path backends (``protego gpn run --backend``)
GPN_BACKENDS = ("userspace", "xfrm", "auto")
# topologies shipped in protego/data/topology-<name>.toml, loaded by name
BUILTIN_TOPOLOGIES = ("default", "lane")


@dataclass(frozen=True)
class Tenant:
    name: str
    vni: int
    network: IPv4Network
    gateway: IPv4Address
    vip: IPv4Address
    hosts: tuple[IPv4Address, ...]


@dataclass(frozen=True)
class Site:
    name: str
    tenant: str
    public: IPv4Address
    network: IPv4Network
    gateway: IPv4Address
    hosts: tuple[IPv4Address, ...]
    ike_proposal: str = DEFAULT_IKE_PROPOSAL
    esp_proposal: str = DEFAULT_ESP_PROPOSAL
    rekey_time: int = 0  # Protego's CHILD_SA rekey time for this site's tunnel (0: the CLI's default)


@dataclass(frozen=True)
class Timings:
    """How often and how long the testbed's daemons are given (``[timings]``).

    The defaults suit the project's 2-CPU host. Every role shares its CPUs, so the
    GIN/GEN probes each GPN every 50 ms (the lb agent's own default is 10 ms, which a
    busy Python GPN misses under load); a GMN cut off from etcd is replaced after the
    shortest lease etcd grants. An emulated guest (the lane topology) needs all of
    them relaxed: its daemons start and answer 10-50 times slower.
    """

    hb_interval_ms: float = 50.0  # the GIN/GEN probes every GPN at least this often
    hb_misses: int = 3  # consecutive missed heartbeats that declare a GPN dead
    gmn_lease_ttl: int = 2  # s: the GMN's leadership lease in etcd
    daemon_start_s: float = 30.0  # s: every start-up wait (charon's VICI, agents' sockets, GPN registration)
    tunnel_wait_s: float = 60.0  # s: until every site's tunnel is up (baseline up, demo)
    apply_timeout_s: float = 2.0  # s: longest a GMN holds charon for a GPN's or GIN/GEN's acknowledgement


DEFAULT_TIMINGS = Timings()


@dataclass(frozen=True)
class Topology:
    source: str = field(compare=False)
    etcd_members: int
    gpns: int
    internet: IPv4Network
    router: IPv4Address
    gin: IPv4Address
    fabric: IPv4Network
    tenants: tuple[Tenant, ...]
    sites: tuple[Site, ...]
    timings: Timings = DEFAULT_TIMINGS
    # the backend of each GPN (gpn1 first); empty: the one ``testbed up --backend`` names
    gpn_backends: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def tenant(self, name: str) -> Tenant:
        for t in self.tenants:
            if t.name == name:
                return t
        raise KeyError(name)

    def sites_of(self, tenant: str) -> tuple[Site, ...]:
        return tuple(s for s in self.sites if s.tenant == tenant)


# ----------------------------------------------------------------------------
# loading


def builtin_topology_text(name: str) -> str:
    if name not in BUILTIN_TOPOLOGIES:
        raise ConfigError(f"no packaged topology named {name!r} (packaged: {', '.join(BUILTIN_TOPOLOGIES)})")
    return (resources.files("protego") / "data" / f"topology-{name}.toml").read_text()


def default_topology_text() -> str:
    return builtin_topology_text("default")


def builtin_source(name: str) -> str:
    """The ``source`` of a packaged topology (what error messages and state records show)."""
    return f"<{name} topology>"


def load_topology(path: str | Path | None = None) -> Topology:
    """Load and validate a topology: ``None`` is the packaged default; a bare name of
    :data:`BUILTIN_TOPOLOGIES` (a ``str`` such as ``"lane"``, no directory, no suffix)
    is that packaged topology, also when a file of that name exists here (say
    ``./lane`` for the file); anything else is a file."""
    if path is None:
        path = "default"
    if isinstance(path, str) and path in BUILTIN_TOPOLOGIES:
        return parse_topology(builtin_topology_text(path), source=builtin_source(path))
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read topology: {exc.strerror}") from None
    return parse_topology(text, source=str(p))


def load_topology_source(source: str) -> Topology:
    """Load the topology a testbed was built from, by its recorded ``source``."""
    for name in BUILTIN_TOPOLOGIES:
        if source == builtin_source(name):
            return load_topology(name)
    return load_topology(Path(source))


class _Ctx:
    """Where we are in the document, for error messages."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {msg}")


def _check_fields(ctx: _Ctx, where: str, table: Any, required: set[str], optional: set[str]) -> None:
    if not isinstance(table, dict):
        raise ctx.fail(where, f"expected a table, got {type(table).__name__}")
    unknown = sorted(set(table) - required - optional)
    if unknown:
        allowed = ", ".join(sorted(required | optional))
        raise ctx.fail(where, f"unknown field '{unknown[0]}' (allowed: {allowed})")
    missing = sorted(required - set(table))
    if missing:
        raise ctx.fail(where, f"missing field '{missing[0]}'")


def _addr(ctx: _Ctx, where: str, value: Any) -> IPv4Address:
    if not isinstance(value, str):
        raise ctx.fail(where, f"expected an IPv4 address string, got {value!r}")
    try:
        return IPv4Address(value)
    except ValueError:
        raise ctx.fail(where, f"malformed IPv4 address {value!r}") from None


def _net(ctx: _Ctx, where: str, value: Any) -> IPv4Network:
    if not isinstance(value, str):
        raise ctx.fail(where, f"expected an IPv4 prefix string, got {value!r}")
    try:
        return IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ctx.fail(where, f"malformed IPv4 prefix {value!r} ({exc})") from None


def _int(ctx: _Ctx, where: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.fail(where, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ctx.fail(where, f"{value} is out of range {lo}..{hi}")
    return value


def _name(ctx: _Ctx, where: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ctx.fail(
            where, f"bad name {value!r}: 1-12 characters, a-z, 0-9 and '-', starting with a letter"
        )
    return value


def _hosts(ctx: _Ctx, where: str, value: Any, net: IPv4Network, gw: IPv4Address) -> tuple[IPv4Address, ...]:
    if not isinstance(value, list) or not value:
        raise ctx.fail(where, "expected a non-empty list of host addresses")
    seen: set[IPv4Address] = set()
    out = []
    for i, v in enumerate(value):
        w = f"{where}[{i}]"
        a = _addr(ctx, w, v)
        if a not in net or a in (net.network_address, net.broadcast_address):
            raise ctx.fail(w, f"host {a} is not a usable address of {net}")
        if a == gw:
            raise ctx.fail(w, f"duplicate address {a}: it is the gateway address")
        if a in seen:
            raise ctx.fail(w, f"duplicate address {a}")
        seen.add(a)
        out.append(a)
    return tuple(out)


def _number(ctx: _Ctx, where: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ctx.fail(where, f"expected a number, got {value!r}")
    if not lo <= value <= hi:
        raise ctx.fail(where, f"{value} is out of range {lo:g}..{hi:g}")
    return float(value)


def _timings(ctx: _Ctx, table: Any) -> Timings:
    d = DEFAULT_TIMINGS
    _check_fields(ctx, "[timings]", table, set(),
                  {"hb_interval_ms", "hb_misses", "gmn_lease_ttl", "daemon_start_s", "tunnel_wait_s",
                   "apply_timeout_s"})
    return Timings(
        hb_interval_ms=_number(ctx, "[timings].hb_interval_ms", table.get("hb_interval_ms", d.hb_interval_ms),
                               1, 10000),
        hb_misses=_int(ctx, "[timings].hb_misses", table.get("hb_misses", d.hb_misses), 1, 100),
        # the GMN agent's --lease-ttl range (etcd grants no shorter lease than 2 s)
        gmn_lease_ttl=_int(ctx, "[timings].gmn_lease_ttl", table.get("gmn_lease_ttl", d.gmn_lease_ttl), 2, 60),
        daemon_start_s=_number(ctx, "[timings].daemon_start_s", table.get("daemon_start_s", d.daemon_start_s),
                               1, 3600),
        tunnel_wait_s=_number(ctx, "[timings].tunnel_wait_s", table.get("tunnel_wait_s", d.tunnel_wait_s),
                              1, 3600),
        # under kernel-protego's reply timeout (5 s): charon must get its answer
        apply_timeout_s=_number(ctx, "[timings].apply_timeout_s", table.get("apply_timeout_s", d.apply_timeout_s),
                                0.1, 4.5),
    )


def _gpn_backends(ctx: _Ctx, value: Any, gpns: int) -> tuple[str, ...]:
    where = "[testbed].gpn_backends"
    if not isinstance(value, list):
        raise ctx.fail(where, f"expected a list of backends, one per GPN, got {value!r}")
    if len(value) != gpns:
        raise ctx.fail(where, f"{len(value)} backends for {gpns} GPNs (one per GPN: [testbed].gpns)")
    for i, b in enumerate(value):
        if b not in GPN_BACKENDS:
            raise ctx.fail(f"{where}[{i}]", f"unknown backend {b!r} (expected one of {', '.join(GPN_BACKENDS)})")
    return tuple(value)


def _proposal(ctx: _Ctx, where: str, value: Any) -> str:
    if not isinstance(value, str) or not _PROPOSAL_RE.match(value):
        raise ctx.fail(where, f"malformed proposal {value!r}")
    return value


def _entry(section: str, i: int, table: Any) -> str:
    name = table.get("name") if isinstance(table, dict) else None
    return f"{section}[{i}] ({name})" if isinstance(name, str) else f"{section}[{i}]"


def parse_topology(text: str, source: str = "<topology>") -> Topology:
    ctx = _Ctx(source)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: TOML syntax error: {exc}") from None

    _check_fields(ctx, "top level", doc, {"tenants", "sites"}, {"testbed", "internet", "fabric", "timings"})

    tb = doc.get("testbed", {})
    _check_fields(ctx, "[testbed]", tb, set(), {"etcd_members", "gpns", "gpn_backends"})
    etcd_members = _int(ctx, "[testbed].etcd_members", tb.get("etcd_members", 1), 1, 3)
    if etcd_members == 2:
        raise ctx.fail("[testbed].etcd_members", "must be 1 or 3 (2 members cannot lose one)")
    gpns = _int(ctx, "[testbed].gpns", tb.get("gpns", 2), 1, 16)
    gpn_backends = _gpn_backends(ctx, tb["gpn_backends"], gpns) if "gpn_backends" in tb else ()
    timings = _timings(ctx, doc.get("timings", {}))

    inet = doc.get("internet", {})
    _check_fields(ctx, "[internet]", inet, set(), {"prefix", "router", "gin"})
    internet = _net(ctx, "[internet].prefix", inet.get("prefix", "198.18.0.0/16"))
    hosts_iter = internet.hosts()
    router = _addr(ctx, "[internet].router", inet.get("router", str(next(hosts_iter))))
    gin = _addr(ctx, "[internet].gin", inet.get("gin", str(next(hosts_iter))))

    fab = doc.get("fabric", {})
    _check_fields(ctx, "[fabric]", fab, set(), {"prefix"})
    fabric = _net(ctx, "[fabric].prefix", fab.get("prefix", "192.0.2.0/24"))

    # every address on the shared "internet" plane (and VIPs routed on it)
    public: dict[IPv4Address, str] = {}

    def claim(addr: IPv4Address, where: str) -> None:
        if addr in public:
            raise ctx.fail(where, f"duplicate address {addr} (already used by {public[addr]})")
        public[addr] = where

    for addr, where in ((router, "[internet].router"), (gin, "[internet].gin")):
        if addr not in internet:
            raise ctx.fail(where, f"{addr} is not in the internet prefix {internet}")
        claim(addr, where)

    raw_tenants = doc["tenants"]
    if not isinstance(raw_tenants, list) or not raw_tenants:
        raise ctx.fail("[[tenants]]", "at least one tenant is required")
    tenants: list[Tenant] = []
    vnis: dict[int, str] = {}
    for i, rt in enumerate(raw_tenants):
        where = _entry("tenants", i, rt)
        _check_fields(ctx, where, rt, {"name", "vni", "network", "vip", "hosts"}, {"gateway"})
        name = _name(ctx, f"{where}.name", rt["name"])
        if any(t.name == name for t in tenants):
            raise ctx.fail(f"{where}.name", f"duplicate tenant name '{name}'")
        vni = _int(ctx, f"{where}.vni", rt["vni"], 1, 2**24 - 1)
        if vni in vnis:
            raise ctx.fail(f"{where}.vni", f"duplicate VNI {vni} (already used by {vnis[vni]})")
        vnis[vni] = where
        network = _net(ctx, f"{where}.network", rt["network"])
        if network.prefixlen > 29:
            raise ctx.fail(f"{where}.network", f"{network} is too small (at most /29)")
        gateway = _addr(ctx, f"{where}.gateway", rt.get("gateway", str(next(network.hosts()))))
        if gateway not in network or gateway in (network.network_address, network.broadcast_address):
            raise ctx.fail(f"{where}.gateway", f"{gateway} is not a usable address of {network}")
        vip = _addr(ctx, f"{where}.vip", rt["vip"])
        if vip in internet:
            raise ctx.fail(f"{where}.vip", f"VIP {vip} must not be inside the internet segment {internet}")
        claim(vip, f"{where}.vip")
        hosts = _hosts(ctx, f"{where}.hosts", rt["hosts"], network, gateway)
        tenants.append(Tenant(name, vni, network, gateway, vip, hosts))

    raw_sites = doc["sites"]
    if not isinstance(raw_sites, list) or not raw_sites:
        raise ctx.fail("[[sites]]", "at least one site is required")
    sites: list[Site] = []
    for i, rs in enumerate(raw_sites):
        where = _entry("sites", i, rs)
        _check_fields(
            ctx, where, rs, {"name", "tenant", "public", "network", "hosts"},
            {"gateway", "ike_proposal", "esp_proposal", "rekey_time"},
        )
        name = _name(ctx, f"{where}.name", rs["name"])
        if any(s.name == name for s in sites):
            raise ctx.fail(f"{where}.name", f"duplicate site name '{name}'")
        tname = rs["tenant"]
        tenant = next((t for t in tenants if t.name == tname), None)
        if tenant is None:
            raise ctx.fail(
                f"{where}.tenant", f"the site's peer, tenant {tname!r}, is not defined in [[tenants]]"
            )
        pub = _addr(ctx, f"{where}.public", rs["public"])
        if pub not in internet or pub in (internet.network_address, internet.broadcast_address):
            raise ctx.fail(f"{where}.public", f"{pub} is not a usable address of the internet {internet}")
        claim(pub, f"{where}.public")
        network = _net(ctx, f"{where}.network", rs["network"])
        if network.prefixlen > 29:
            raise ctx.fail(f"{where}.network", f"{network} is too small (at most /29)")
        if network.overlaps(tenant.network):
            raise ctx.fail(
                f"{where}.network", f"{network} overlaps its tenant's network {tenant.network}"
            )
        for other in sites:
            if other.tenant == tenant.name and other.network.overlaps(network):
                raise ctx.fail(
                    f"{where}.network",
                    f"{network} overlaps site '{other.name}' ({other.network}) of the same tenant",
                )
        gateway = _addr(ctx, f"{where}.gateway", rs.get("gateway", str(next(network.hosts()))))
        if gateway not in network or gateway in (network.network_address, network.broadcast_address):
            raise ctx.fail(f"{where}.gateway", f"{gateway} is not a usable address of {network}")
        hosts = _hosts(ctx, f"{where}.hosts", rs["hosts"], network, gateway)
        ike = _proposal(ctx, f"{where}.ike_proposal", rs.get("ike_proposal", DEFAULT_IKE_PROPOSAL))
        esp = _proposal(ctx, f"{where}.esp_proposal", rs.get("esp_proposal", DEFAULT_ESP_PROPOSAL))
        rekey_time = rs.get("rekey_time", 0)
        if isinstance(rekey_time, bool) or not isinstance(rekey_time, int) or not 0 <= rekey_time <= 86400 * 7:
            raise ctx.fail(f"{where}.rekey_time", f"{rekey_time!r} is not a number of seconds (0..604800)")
        if 0 < rekey_time < 5:
            raise ctx.fail(f"{where}.rekey_time", "at least 5 seconds (a CHILD_SA must live long enough to carry traffic)")
        sites.append(Site(name, tenant.name, pub, network, gateway, hosts, ike, esp, rekey_time))

    # the fabric must have room for Protego's nodes, baseline gateways and tenant hosts
    if internet.num_addresses < len(tenants) + len(sites) + 8:
        raise ctx.fail("[internet].prefix", f"{internet} is too small for this topology")
    needed = 1 + 2 + gpns + len(tenants) + sum(len(t.hosts) for t in tenants) + 2
    if fabric.num_addresses < needed:
        raise ctx.fail("[fabric].prefix", f"{fabric} is too small for {needed} nodes")
    # baseline gateways take internet addresses after the GIN: make sure they are free
    topo = Topology(source, etcd_members, gpns, internet, router, gin, fabric, tuple(tenants), tuple(sites),
                    timings=timings, gpn_backends=gpn_backends)
    for t_index, t in enumerate(topo.tenants):
        addr = baseline_public(topo, t_index)
        if addr in public:
            raise ctx.fail(
                public[addr], f"address {addr} is reserved for tenant {t.name}'s baseline gateway"
            )
    return topo


def baseline_public(topo: Topology, tenant_index: int) -> IPv4Address:
    """The internet address of a tenant's baseline gateway (baseline mode)."""
    return topo.internet.broadcast_address - 2 - tenant_index
