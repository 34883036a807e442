"""Desired nftables tables of the GIN/GEN, read-back parsing and the diff (pure).

The agent owns two tables (family ``ip``), one per role, and never touches any
other:

* ``protego_gin`` — ingress: IKE (UDP 500, UDP 4500 with the zero non-ESP marker) is
  marked for the active GMN; ESP and ESP-in-UDP are looked up by ``(VIP, SPI)`` in
  the verdict map ``spi_in`` and jump to a per-(tunnel, next hop) chain that applies
  the tunnel's inbound limit, tags a sample for heartbeats and sets the next hop's
  mark; policy routing (:mod:`protego.lb.policy`) does the rest.  The VIP stays the
  destination.  NAT keepalives and unknown SPIs are dropped and counted.
* ``protego_gen`` — egress: VXLAN (UDP 4789) addressed to this node's own VTEP is
  looked up by ``(VNI, inner destination, inner source)`` in the interval verdict map
  ``tun_out`` and jumps to a per-tunnel chain that applies the tunnel's outbound
  limit, tags a sample and rewrites the *outer* destination to the GPN's fabric
  address (stateless; the inner tenant packet is untouched).

Every rule carries the comment ``pg:<chain digest>:<index>``: the read-back
compares these tags, so a chain somebody changed (or that we changed) is rewritten
as a whole.  Limit objects are named after their rate (``lin_<tunnel>_<bytes/s>``):
a rate change creates a new object and deletes the old one in the same batch,
which sidesteps nft 1.0.6 keeping the old rate on ``add limit``.

:func:`diff` turns (desired, installed) into one list of nft commands that the
adapter sends as ONE transaction; :func:`rebuild` is the fallback (delete and
recreate the table atomically).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from protego.lb.model import SteeringState, tunnel_id
from protego.lb.policy import MAX_SLOT, mark_of

FAMILY = "ip"
GIN_TABLE = "protego_gin"
GEN_TABLE = "protego_gen"
OWNED_TABLES = (GIN_TABLE, GEN_TABLE)
TAG_PREFIX = "pg:"
PRIO_RAW = -300  # after defragmentation (-400), before conntrack (-200)


@dataclass(frozen=True)
class Params:
    """Data-path knobs (from the agent's configuration)."""

    sample: int = 1000  # tag 1 in ``sample`` packets per GPN for heartbeats; 0 = off
    tag_dscp: int = 0x37  # DSCP value of a tagged packet (pool 3, experimental use)
    vip_prefixes: tuple[str, ...] = ()  # where the VIPs live (besides those named in steer/in)

    def __post_init__(self) -> None:
        for p in self.vip_prefixes:
            try:
                ipaddress.IPv4Network(p, strict=True)
            except ValueError:
                raise ValueError(f"VIP prefix {p!r} is not an IPv4 prefix") from None
        if self.sample < 0:
            raise ValueError("sample must be >= 0")
        if not 0 < self.tag_dscp < 64:
            raise ValueError("tag_dscp must be 1..63")


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[str, ...]
    hook: str | None = None  # e.g. "prerouting"
    prio: int = 0

    @property
    def digest(self) -> str:
        h = hashlib.sha1(self.name.encode())
        for r in self.rules:
            h.update(b"\0" + r.encode())
        h.update(f"\0{self.hook}\0{self.prio}".encode())
        return h.hexdigest()[:10]

    @property
    def tags(self) -> tuple[str, ...]:
        d = self.digest
        return tuple(f"{TAG_PREFIX}{d}:{i}" for i in range(len(self.rules)))

    def rendered_rules(self) -> list[str]:
        return [f'{r} comment "{t}"' for r, t in zip(self.rules, self.tags)]


@dataclass(frozen=True)
class Map:
    name: str
    decl: str  # e.g. "typeof ip daddr . esp spi : verdict;"
    type_sig: tuple[str, ...]  # as read back: JSON "type" entries + "map" kind
    elements: Mapping[str, str]  # canonical key text -> value text


@dataclass
class Table:
    name: str
    comment: str
    counters: set[str] = field(default_factory=set)
    limits: dict[str, int] = field(default_factory=dict)  # name -> bytes/second
    maps: dict[str, Map] = field(default_factory=dict)
    chains: dict[str, Chain] = field(default_factory=dict)

    def add_chain(self, c: Chain) -> None:
        self.chains[c.name] = c


@dataclass
class Installed:
    """What the kernel has for one of our tables (parsed from ``nft -j list table``)."""

    name: str
    counters: set[str] = field(default_factory=set)
    limits: set[str] = field(default_factory=set)
    maps: dict[str, tuple[tuple[str, ...], dict[str, str]]] = field(default_factory=dict)
    chains: dict[str, tuple[tuple[str | None, int], tuple[str, ...]]] = field(default_factory=dict)


# --------------------------------------------------------------------------- #
# desired state


def rate_bytes(rate_mbps: float) -> int:
    return max(1, round(rate_mbps * 1_000_000 / 8))


def _limit_rule(name: str) -> str:
    return f'limit name "{name}" counter drop'


def _tag_counter(gpn: str) -> str:
    return "tag_" + hashlib.sha1(gpn.encode()).hexdigest()[:8]


def _tag_rule(p: Params, gpn: str) -> str:
    return f'numgen random mod {p.sample} 0 ip dscp set {p.tag_dscp:#04x} counter name "{_tag_counter(gpn)}"'


def spi_key(vip: str, spi: int) -> str:
    return f"{vip} . 0x{spi:08x}"


def _hex(v: int) -> str:
    return f"0x{v:08x}"


def _rng(lo: int, hi: int) -> str:
    return _hex(lo) if lo == hi else f"{_hex(lo)}-{_hex(hi)}"


def vxlan_key(vni: int, dst: tuple[int, int], src: tuple[int, int]) -> str:
    # @th,96,32 is the VNI (24 bits) followed by a reserved byte (0)
    return f"{_hex(vni << 8)} . {_rng(*dst)} . {_rng(*src)}"


def vip_ranges(state: SteeringState, p: Params) -> list[tuple[int, int]]:
    """The configured VIP prefixes, every tenant's VIP and every VIP of steer/in, merged
    into disjoint ranges."""
    spans = []
    for pfx in p.vip_prefixes:
        net = ipaddress.IPv4Network(pfx)
        spans.append((int(net.network_address), int(net.broadcast_address)))
    spans += [(int(ipaddress.IPv4Address(s.vip)),) * 2 for s in state.steer_in]
    spans += [(int(ipaddress.IPv4Address(v)),) * 2 for v in state.tenant_vips]
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _vip_match(ranges: list[tuple[int, int]]) -> str:
    """First rule of the GIN: only packets to a VIP are steered (a GPN's own outbound ESP
    and a GMN's IKE replies transit the lb towards the peers untouched)."""
    if not ranges:
        return "return"  # no VIP known yet: steer nothing
    def one(lo: int, hi: int) -> str:
        a, b = ipaddress.IPv4Address(lo), ipaddress.IPv4Address(hi)
        return str(a) if lo == hi else f"{a}-{b}"
    return "ip daddr != { " + ", ".join(one(lo, hi) for lo, hi in ranges) + " } return"


def gin_table(state: SteeringState, slots: Mapping[str, int], p: Params) -> Table:
    """The ingress table for ``state``; ``slots``: next-hop address → slot."""
    t = Table(GIN_TABLE, "protego lb: GIN (ingress steering)")
    t.counters |= {"ike_to_gmn", "ike_no_gmn", "esp_unknown_spi", "udp_unknown_spi", "nat_keepalive",
                   "ct_invalid"}
    elements: dict[str, str] = {}
    for s in state.steer_in:
        gpn = state.gpns[s.gpn]
        slot = slots[gpn.fabric_addr]
        tid = tunnel_id(s.tenant, s.tunnel)
        chain = f"in_{tid}_{slot}"
        if chain not in t.chains:
            rules = []
            rate = state.rate_of(s.tenant, s.tunnel)
            if rate > 0:
                lim = f"lin_{tid}_{rate_bytes(rate)}"
                t.limits[lim] = rate_bytes(rate)
                rules.append(_limit_rule(lim))
            if p.sample:
                t.counters.add(_tag_counter(s.gpn))
                rules.append(_tag_rule(p, s.gpn))
            rules.append(f"meta mark set {mark_of(slot):#010x} counter accept")
            t.add_chain(Chain(chain, tuple(rules)))
        elements[spi_key(s.vip, s.spi)] = f"jump {chain}"
    t.maps["spi_in"] = Map("spi_in", "typeof ip daddr . esp spi : verdict;",
                           ("ipv4_addr", "integer", "verdict"), elements)
    if state.gmn_addr is not None:
        ike = f'meta mark set {mark_of(slots[state.gmn_addr]):#010x} counter name "ike_to_gmn" accept'
    else:
        ike = 'counter name "ike_no_gmn" drop'
    t.add_chain(Chain("c_ike", (ike,)))
    t.add_chain(Chain("c_esp", (
        "notrack",
        "ip daddr . esp spi vmap @spi_in",
        'counter name "esp_unknown_spi" drop',
    )))
    t.add_chain(Chain("c_natt", (
        'udp length 9 @th,64,8 0xff counter name "nat_keepalive" drop',
        "@th,64,32 0 jump c_ike",
        "ip daddr . @th,64,32 vmap @spi_in",
        'counter name "udp_unknown_spi" drop',
    )))
    t.add_chain(Chain("prerouting", (
        # only packets to a VIP; this also leaves traffic for the lb itself alone
        _vip_match(vip_ranges(state, p)),
        f"ip dscp {p.tag_dscp:#04x} ip dscp set cs0",
        "ip protocol esp jump c_esp",
        "udp dport 500 notrack jump c_ike",
        "udp dport 4500 notrack jump c_natt",
        # any ct expression enables conntrack's defragmentation (priority -400) in this
        # namespace; ESP/IKE are notrack'ed above, so only reassembly applies to them
        'ct state invalid counter name "ct_invalid"',
    ), hook="prerouting", prio=PRIO_RAW))
    return t


def gen_table(state: SteeringState, p: Params) -> Table:
    t = Table(GEN_TABLE, "protego lb: GEN (egress steering)")
    t.counters |= {"vxlan_no_tunnel"}
    elements: dict[str, str] = {}
    for s in state.steer_out:
        gpn = state.gpns[s.gpn]
        tid = tunnel_id(s.tenant, s.tunnel)
        chain = f"out_{tid}"
        rules = []
        if s.rate_mbps > 0:
            lim = f"lout_{tid}_{rate_bytes(s.rate_mbps)}"
            t.limits[lim] = rate_bytes(s.rate_mbps)
            rules.append(_limit_rule(lim))
        if p.sample:
            t.counters.add(_tag_counter(s.gpn))
            rules.append(_tag_rule(p, s.gpn))
        rules.append(f"ip daddr set {gpn.fabric_addr} counter accept")
        t.add_chain(Chain(chain, tuple(rules)))
        for dst in s.remote_ts:
            for src in s.local_ts:
                elements[vxlan_key(s.vni, (dst.lo, dst.hi), (src.lo, src.hi))] = f"jump {chain}"
    t.maps["tun_out"] = Map("tun_out", "typeof @th,96,32 . @th,368,32 . @th,336,32 : verdict; flags interval;",
                            ("integer", "integer", "integer", "verdict"), elements)
    t.add_chain(Chain("c_vxlan", (
        "notrack",
        f"ip dscp {p.tag_dscp:#04x} ip dscp set cs0",
        "@th,96,32 . @th,368,32 . @th,336,32 vmap @tun_out",
        'counter name "vxlan_no_tunnel" drop',
    )))
    t.add_chain(Chain("prerouting", (
        # VXLAN (I flag set) to our own VTEP carrying IPv4 (inner ethertype at th+28)
        "udp dport 4789 @th,64,8 0x08 @th,224,16 0x0800 fib daddr type local jump c_vxlan",
    ), hook="prerouting", prio=PRIO_RAW))
    # the GEN sends steered VXLAN back out of the interface it came in on: no redirects
    t.add_chain(Chain("output", ("icmp type redirect drop",), hook="output", prio=0))
    return t


def desired_tables(state: SteeringState, slots: Mapping[str, int], roles: Iterable[str],
                   p: Params) -> list[Table]:
    out = []
    roles = set(roles)
    if "gin" in roles:
        out.append(gin_table(state, slots, p))
    if "gen" in roles:
        out.append(gen_table(state, p))
    return out


# next-hop slots held for registered GPNs that own no inbound SPI yet (the rest stay
# free for the GPNs that do, and for the transitions between them)
SPARE_HOP_SLOTS = MAX_SLOT // 2


def wanted_next_hops(state: SteeringState, roles: Iterable[str]) -> set[str]:
    """Next hops the GIN marks for: GPNs owning inbound SPIs and the active GMN, and
    (while slots last, ``SPARE_HOP_SLOTS``) every other registered GPN. The latter have
    their policy route before any tunnel moves to them: a pass that had to add one (netlink,
    pyroute2) took 35 ms on this lab machine under load, on the path of a recovery from a
    dead GPN, whose tunnels the GMN holds until the GIN steers their new inbound SPIs."""
    if "gin" not in set(roles):
        return set()
    hops = {state.gpns[s.gpn].fabric_addr for s in state.steer_in}
    if state.gmn_addr is not None:
        hops.add(state.gmn_addr)
    spare = sorted({g.fabric_addr for g in state.gpns.values()} - hops)
    return hops | set(spare[:max(0, SPARE_HOP_SLOTS - len(hops))])


# --------------------------------------------------------------------------- #
# rendering


def _q(tname: str) -> str:
    return f"{FAMILY} {tname}"


def _chain_decl(t: str, c: Chain) -> str:
    if c.hook is None:
        return f"add chain {_q(t)} {c.name}"
    return (f"add chain {_q(t)} {c.name} {{ type filter hook {c.hook} priority {c.prio} ; "
            f"policy accept ; }}")


def _elements(cmd: str, t: str, m: str, items: list[str], chunk: int = 500) -> list[str]:
    return [f"{cmd} element {_q(t)} {m} {{ {', '.join(items[i:i + chunk])} }}"
            for i in range(0, len(items), chunk)]


def _create(t: Table) -> list[str]:
    cmds = [f'add table {_q(t.name)} {{ comment "{t.comment}" ; }}']
    cmds += [f"add counter {_q(t.name)} {c}" for c in sorted(t.counters)]
    cmds += [f"add limit {_q(t.name)} {n} {{ rate over {r} bytes/second ; }}"
             for n, r in sorted(t.limits.items())]
    cmds += [f"add map {_q(t.name)} {m.name} {{ {m.decl} }}" for m in t.maps.values()]
    regular = [c for c in t.chains.values() if c.hook is None]
    base = [c for c in t.chains.values() if c.hook is not None]
    for c in regular + base:
        cmds.append(_chain_decl(t.name, c))
    for c in regular:
        cmds += [f"add rule {_q(t.name)} {c.name} {r}" for r in c.rendered_rules()]
    for m in t.maps.values():
        cmds += _elements("add", t.name, m.name, [f"{k} : {v}" for k, v in sorted(m.elements.items())])
    for c in base:
        cmds += [f"add rule {_q(t.name)} {c.name} {r}" for r in c.rendered_rules()]
    return cmds


def rebuild(t: Table) -> list[str]:
    """Delete (if present) and recreate the table in one transaction."""
    return [f"add table {_q(t.name)}", f"delete table {_q(t.name)}", *_create(t)]


def delete_table(name: str) -> list[str]:
    return [f"add table {_q(name)}", f"delete table {_q(name)}"]


def diff(desired: Table, installed: Installed | None) -> list[str] | None:
    """Commands turning ``installed`` into ``desired`` ([] if equal).

    ``None`` means the difference cannot be expressed incrementally (a map or base
    chain changed type): the caller uses :func:`rebuild`."""
    if installed is None:
        return _create(desired)
    t = desired.name
    cmds: list[str] = []
    cmds += [f"add counter {_q(t)} {c}" for c in sorted(desired.counters - installed.counters)]
    cmds += [f"add limit {_q(t)} {n} {{ rate over {r} bytes/second ; }}"
             for n, r in sorted(desired.limits.items()) if n not in installed.limits]
    for m in desired.maps.values():
        have = installed.maps.get(m.name)
        if have is None:
            cmds.append(f"add map {_q(t)} {m.name} {{ {m.decl} }}")
        elif have[0] != m.type_sig:
            return None
    new_chains = [c for c in desired.chains.values() if c.name not in installed.chains]
    for c in desired.chains.values():
        have_c = installed.chains.get(c.name)
        if have_c is not None and have_c[0] != (c.hook, c.prio):
            return None
    # regular chains first so jumps and map verdicts find them
    for c in sorted(new_chains, key=lambda c: c.hook is not None):
        cmds.append(_chain_decl(t, c))
    changed = [c for c in desired.chains.values()
               if c.name in installed.chains and installed.chains[c.name][1] != c.tags]
    for c in sorted(changed + new_chains, key=lambda c: c.hook is not None):
        if c.name in installed.chains:
            cmds.append(f"flush chain {_q(t)} {c.name}")
        cmds += [f"add rule {_q(t)} {c.name} {r}" for r in c.rendered_rules()]
    for m in desired.maps.values():
        have_el = installed.maps[m.name][1] if m.name in installed.maps else {}
        stale = sorted(k for k, v in have_el.items() if m.elements.get(k) != v)
        fresh = sorted(k for k, v in m.elements.items() if have_el.get(k) != v)
        cmds += _elements("delete", t, m.name, stale)
        cmds += _elements("add", t, m.name, [f"{k} : {m.elements[k]}" for k in fresh])
    for name in sorted(set(installed.chains) - set(desired.chains)):
        cmds += [f"flush chain {_q(t)} {name}", f"delete chain {_q(t)} {name}"]
    for name in sorted(set(installed.maps) - set(desired.maps)):
        cmds.append(f"delete map {_q(t)} {name}")
    cmds += [f"delete limit {_q(t)} {n}" for n in sorted(installed.limits - set(desired.limits))]
    cmds += [f"delete counter {_q(t)} {n}" for n in sorted(installed.counters - desired.counters)]
    return cmds


# --------------------------------------------------------------------------- #
# read-back (JSON from libnftables)


def _key_part(v: Any) -> str:
    if isinstance(v, bool):
        raise TypeError(f"unexpected set key {v!r}")
    if isinstance(v, int):
        return _hex(v)
    if isinstance(v, str):
        return v
    if isinstance(v, dict):
        if "range" in v:
            lo, hi = (_num(x) for x in v["range"])
            return _rng(lo, hi)
        if "prefix" in v:
            addr, plen = _num(v["prefix"]["addr"]), int(v["prefix"]["len"])
            span = (1 << (32 - plen)) - 1
            return _rng(addr, addr | span)
    raise ValueError(f"unexpected set key {v!r}")


def _num(v: Any) -> int:
    if isinstance(v, int):
        return v
    return int(ipaddress.IPv4Address(v))


def element_key(v: Any) -> str:
    if isinstance(v, dict) and "concat" in v:
        return " . ".join(_key_part(x) for x in v["concat"])
    if isinstance(v, dict) and "elem" in v:  # element with options (timeout, comment)
        return element_key(v["elem"]["val"])
    return _key_part(v)


def element_value(v: Any) -> str:
    if isinstance(v, dict):
        for verdict in ("jump", "goto"):
            if verdict in v:
                return f"{verdict} {v[verdict]['target']}"
        if len(v) == 1:
            return str(next(iter(v)))
    if isinstance(v, int):
        return _hex(v)
    return str(v)


def parse_installed(doc: Mapping[str, Any], table: str) -> Installed | None:
    """``nft -j list table ip <table>`` output → :class:`Installed` (None: no table)."""
    items = doc.get("nftables", [])
    found = any("table" in i and i["table"].get("name") == table for i in items)
    if not found:
        return None
    inst = Installed(table)
    rules: dict[str, list[str]] = {}
    for item in items:
        kind, body = next(iter(item.items()))
        if not isinstance(body, dict) or body.get("table") != table:
            continue
        if kind == "counter":
            inst.counters.add(body["name"])
        elif kind == "limit":
            inst.limits.add(body["name"])
        elif kind == "map":
            ty = body.get("type")
            sig = tuple(ty if isinstance(ty, list) else [ty]) + (str(body.get("map")),)
            elems = {element_key(k): element_value(v) for k, v in body.get("elem", [])}
            inst.maps[body["name"]] = (sig, elems)
        elif kind == "chain":
            inst.chains[body["name"]] = ((body.get("hook"), int(body.get("prio", 0))), ())
            rules.setdefault(body["name"], [])
        elif kind == "rule":
            rules.setdefault(body["chain"], []).append(str(body.get("comment", "")))
    for name, comments in rules.items():
        if name in inst.chains:
            inst.chains[name] = (inst.chains[name][0], tuple(comments))
    return inst


def as_installed(t: Table) -> Installed:
    """What :func:`parse_installed` reads back once ``t`` is loaded (the agent's cache)."""
    inst = Installed(t.name, set(t.counters), set(t.limits))
    for m in t.maps.values():
        inst.maps[m.name] = (m.type_sig, dict(m.elements))
    for c in t.chains.values():
        inst.chains[c.name] = ((c.hook, c.prio), c.tags)
    return inst


def owned(installed: Installed) -> bool:
    """Every rule of the table carries our tag (a table we may clean up)."""
    return all(all(c.startswith(TAG_PREFIX) for c in tags) for _, tags in installed.chains.values())
