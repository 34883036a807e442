"""The GPN's ``xfrm`` backend: the SAs placed on this GPN as kernel XFRM states and policies.

:class:`KernelDataPath` offers the GPN agent the same interface as the userspace
:class:`~protego.gpn.engine.Engine` (``add_sa``, ``remove_sa``, ``set_egress``,
``set_hosts``, ``sync``, ``stats``, ``check``, ``stop``), so the agent's rules
(which SAs to install, outbound SAs never reinstalled, lingering, acknowledgements)
are the same for both backends. Underneath it is a reconciler: every change recomputes
the desired kernel objects (:func:`protego.gpn.kernel_model.plan`, pure) and
:meth:`sync` applies the difference against what it last applied, in an order that
never leaves a packet without a path (devices, states, policies, routes first;
removals last). :meth:`check` reads the kernel back every ``verify_interval`` seconds
and repairs what somebody else changed, recognising its own objects by their
``if_id`` tag and device names (felix's "read back by tags it owns").

Outbound sequence numbers are never reused: an outbound state that vanished from the
kernel (flushed by someone, or expired) is never added again; it is reported as lost
(``rekey_requested`` in its statistics), and the GMN rekeys the tunnel.

The data path is checked, not assumed: :mod:`protego.gpn.kernel_health` answers the
GIN/GEN's heartbeats only while an ESP-in-UDP canary through this kernel's XFRM
succeeds and the last apply and read-back succeeded.

Keys go to the kernel over netlink (``NETLINK_CAP_ACK``: never echoed back) and are
never logged.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from protego.errors import DataplaneError
from protego.lb.heartbeat import DEFAULT_PORT as HB_PORT
from protego.xfrm.messages import XfrmPolicy, XfrmState
from protego.xfrm.netlink import XfrmSocket, open_xfrm_socket

from .engine import EngineStats, gpn_mac
from .kernel_health import Canary, HealthServer
from .kernel_model import KernelPlan, PlanDiff, TenantDevices, diff, is_ours, plan, same_policy, same_state
from .records import GpnSa
from .tenant import GATEWAY_MAC, VXLAN_PORT, EgressRoute

__all__ = ["KernelConfig", "KernelDataPath", "UDP_ENCAP", "UDP_ENCAP_ESPINUDP"]

log = logging.getLogger(__name__)

UDP_ENCAP = 100  # setsockopt(IPPROTO_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
UDP_ENCAP_ESPINUDP = 2
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
MACVLAN_MODE_PRIVATE = 1
_OUR_PREFIXES = ("pgvrf", "pgx", "pgv", "pgm")


def _is_our_device(name: str) -> bool:
    for p in _OUR_PREFIXES:
        if name.startswith(p) and name[len(p):].isdigit():
            return True
    return False


@dataclass(frozen=True)
class KernelConfig:
    fabric_addr: str
    natt_port: int = 4500
    vxlan_port: int = VXLAN_PORT
    hb_port: int = HB_PORT
    dscp: int = 0x37
    verify_interval: float = 5.0  # seconds between read-backs of the kernel
    canary_interval: float = 0.1  # seconds between ESP canaries
    canary_misses: int = 3  # consecutive lost canaries that stop the heartbeats
    tenant_keep_s: float = 30.0  # a tenant's devices stay this long after its last SA here left
    src_mac: bytes | None = None  # the tenant-side source MAC (default: gpn_mac(fabric))


def _write_sysctl(path: str, value: str) -> None:
    with open(f"/proc/sys/{path}", "w") as f:
        f.write(value)


def _read_sysctl(path: str) -> str:
    with open(f"/proc/sys/{path}") as f:
        return f.read().strip()


class KernelDataPath:
    """The xfrm backend (one per GPN agent, in the GPN's network namespace)."""

    def __init__(self, cfg: KernelConfig) -> None:
        self.cfg = cfg
        self.workers = os.cpu_count() or 1  # the kernel's softirqs run on every core
        self.requests = 0
        self._lock = threading.RLock()
        self._sas: dict[tuple[str, int], GpnSa] = {}  # ("in"/"out", spi) -> SA
        self._egress: list[EgressRoute] = []
        self._hosts: dict[tuple[int, int], tuple[bytes, str]] = {}
        self._applied = KernelPlan()
        self._dirty = False
        self._xfrm: XfrmSocket | None = None
        self._encap: socket.socket | None = None
        self._health: HealthServer | None = None
        self._canary_peer: Canary | None = None
        self._lost: set[tuple[str, int]] = set()  # outbound states that vanished from the kernel
        self._vni_active: set[int] = set()  # VNIs with an SA here at the last sync
        self._vni_left: dict[int, float] = {}  # VNI -> when its last SA here left (monotonic)
        self._last: dict[tuple[str, int], tuple[int, float]] = {}  # key -> (packets, last change)
        self._next_verify = 0.0
        self._canary_seen = False
        self.repairs = 0
        self.apply_errors = 0
        self.started = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> KernelDataPath:
        try:
            # the canary's peer is forked first: before this process has threads or sockets
            self._canary_peer = Canary(None, self.cfg.natt_port)
            self._canary_peer.start()
            self._xfrm = open_xfrm_socket()
            self._canary_peer.attach(self._xfrm)
            _write_sysctl("net/ipv4/ip_forward", "1")
            self._remove_leftovers()
            self._encap = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._encap.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._encap.bind(("0.0.0.0", self.cfg.natt_port))
            self._encap.setsockopt(socket.IPPROTO_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
            self._encap.setblocking(False)
            self._health = HealthServer(self.cfg.fabric_addr, self.cfg.hb_port, self.cfg.dscp, self._canary_peer,
                                        self._encap, self.cfg.canary_interval, self.cfg.canary_misses,
                                        datapath_ok=self._datapath_ok).start()
        except OSError as exc:
            self._close()
            raise DataplaneError(f"xfrm backend: cannot start ({exc.strerror or exc})", exc.errno) from None
        except DataplaneError:
            self._close()
            raise
        self.started = time.time()
        log.info("GPN xfrm backend: kernel XFRM on %s (ESP-in-UDP :%d, raw ESP, VXLAN :%d, heartbeat :%d, "
                 "canary every %.0f ms)", self.cfg.fabric_addr, self.cfg.natt_port, self.cfg.vxlan_port,
                 self.cfg.hb_port, self.cfg.canary_interval * 1000)
        return self

    def _datapath_ok(self) -> str | None:
        """Why the data path is broken (None: it is not), for the heartbeat server."""
        if self.apply_errors:
            return f"{self.apply_errors} failed apply/repair attempt(s) in a row"
        return None

    def stop(self) -> None:
        """Remove every state, policy and device this backend created."""
        with self._lock:
            if self._health is not None:
                self._health.stop()
            try:
                self._apply(KernelPlan())
            except (DataplaneError, OSError) as exc:
                log.error("xfrm backend: removing its kernel objects failed: %s", exc)
            if self._canary_peer is not None:
                self._canary_peer.stop()
                self._canary_peer = None
            self._close()
        log.info("GPN xfrm backend stopped (its states, policies and devices removed)")

    def _close(self) -> None:
        if self._canary_peer is not None:  # a failed start
            self._canary_peer.stop()
            self._canary_peer = None
        if self._encap is not None:
            self._encap.close()
            self._encap = None
        if self._xfrm is not None:
            self._xfrm.close()
            self._xfrm = None

    # ------------------------------------------------------------------ the agent's interface
    def add_sa(self, g: GpnSa, update: bool = False) -> None:
        with self._lock:
            self._sas[("in" if g.inbound else "out", g.spi)] = g
            self._touch()

    def remove_sa(self, g: GpnSa) -> None:
        with self._lock:
            key = ("in" if g.inbound else "out", g.spi)
            self._sas.pop(key, None)
            self._last.pop(key, None)
            self._lost.discard((str(g.sa.dst), g.spi))  # gone for good: the SPI may come back one day
            self._touch()

    def set_egress(self, routes: list[EgressRoute]) -> None:
        with self._lock:
            self._egress = list(routes)
            self._touch()

    def set_hosts(self, entries: dict[tuple[int, int], tuple[bytes, str]]) -> None:
        with self._lock:
            self._hosts = dict(entries)
            self._touch()

    def _touch(self) -> None:
        self.requests += 1
        self._dirty = True

    @property
    def pending(self) -> bool:
        """Changes not applied yet (a failed :meth:`sync` leaves them pending)."""
        return self._dirty

    def sync(self, timeout: float = 1.0) -> None:
        """Apply every change made since the last sync to the kernel (one pass)."""
        with self._lock:
            if not self._dirty:
                return
            self._apply(self._without_lost(plan(self._sas.values(), self._egress, self._hosts,
                                                self._kept_vnis(time.monotonic()))))
            self._dirty = False

    def _kept_vnis(self, now: float) -> set[int]:
        """The VNIs whose devices stay: those with an SA here, and for
        ``cfg.tenant_keep_s`` those whose last SA left (a migration back and forth, or a
        drain undone, finds them in place); older ones are forgotten."""
        active = {g.vni for g in self._sas.values()}
        for vni in self._vni_active - active:
            self._vni_left[vni] = now
        self._vni_active = active
        self._vni_left = {v: at for v, at in self._vni_left.items()
                          if v not in active and now - at < self.cfg.tenant_keep_s}
        return active | set(self._vni_left)

    def check(self) -> list[int]:
        """Every ``verify_interval``: read the kernel back and repair it. Never a dead worker."""
        now = time.monotonic()
        with self._lock:
            if any(now - at >= self.cfg.tenant_keep_s for at in self._vni_left.values()):
                self._touch()  # a tenant's keep ran out: its devices go at the next sync
        if now >= self._next_verify:
            self._next_verify = now + self.cfg.verify_interval
            with self._lock:
                try:
                    self.verify()
                except (DataplaneError, OSError) as exc:
                    self.apply_errors += 1
                    log.error("xfrm backend: read-back/repair failed: %s", exc)
        return []

    @property
    def pids(self) -> list[int]:
        return []

    # ------------------------------------------------------------------ apply
    def _apply(self, want: KernelPlan) -> None:
        d = diff(self._applied, want)
        if not d:
            return
        try:
            self._apply_diff(d, want)
        except (DataplaneError, OSError, NetlinkError) as exc:
            self.apply_errors += 1
            # what is in the kernel is no longer known exactly: read it back next time
            self._next_verify = 0.0
            code = getattr(exc, "code", None) or getattr(exc, "errno", None)
            raise DataplaneError(f"xfrm backend: applying changes failed: {exc}", code) from None
        self.apply_errors = 0
        self._applied = want
        self._canary(bool(want.states))

    def _canary(self, wanted: bool) -> None:
        """The canary runs while the GPN holds SAs (none: ``ip xfrm`` shows nothing of ours)."""
        canary = self._health.canary if self._health is not None else None
        if canary is None or canary.installed == wanted:
            return
        if wanted:
            canary.install()
        else:
            canary.remove()

    def _apply_diff(self, d: PlanDiff, want: KernelPlan) -> None:
        assert self._xfrm is not None
        gone_tenants = {t.vni for t in d.remove_tenants}
        with self._ipr() as ip:
            for t in d.add_tenants:
                with _doing(f"devices of VNI {t.vni}"):
                    self._create_tenant(ip, t)
                log.info("tenant devices for VNI %d created (%s)", t.vni, ", ".join(t.names))
            for st in d.add_states:
                with _doing(f"state spi={st.spi:08x} dst {st.dst}"):
                    self._state(st, update=False)
            for st in d.update_states:
                with _doing(f"state update spi={st.spi:08x} dst {st.dst}"):
                    self._state(st, update=True)
            for pol, update in d.set_policies:
                sel = pol.selector
                with _doing(f"policy {sel.saddr}/{sel.prefixlen_s} -> {sel.daddr}/{sel.prefixlen_d} dir "
                            f"{pol.direction} if_id {pol.if_id:#x}"):
                    self._policy(pol, update)
            for table, dst, dev in d.set_routes:
                with _doing(f"route {dst} dev {dev} table {table:#x}"):
                    ip.route("replace", dst=dst, oif=self._index(ip, dev), table=table)
            for dev, addr, mac in d.set_neighbours:
                with _doing(f"neighbour {addr} lladdr {mac} dev {dev}"):
                    ip.neigh("replace", dst=addr, lladdr=mac, ifindex=self._index(ip, dev), state=NUD_PERMANENT)
            for dev, mac, vtep in d.set_fdb:
                with _doing(f"fdb {mac} dst {vtep} dev {dev}"):
                    ip.fdb("replace", ifindex=self._index(ip, dev), lladdr=mac, dst=vtep, state=NUD_PERMANENT,
                           flags=NTF_SELF)
            # removals: what no path uses any more
            for table, dst in d.remove_routes:
                if table & 0xFFFFFF not in gone_tenants:
                    self._ignore_missing(lambda: ip.route("del", dst=dst, table=table))
            for dev, addr in d.remove_neighbours:
                if not self._device_gone(dev, gone_tenants):
                    self._ignore_missing(lambda: ip.neigh("del", dst=addr, ifindex=self._index(ip, dev)))
            for dev, mac in d.remove_fdb:
                if not self._device_gone(dev, gone_tenants):
                    self._ignore_missing(lambda: ip.fdb("del", ifindex=self._index(ip, dev), lladdr=mac, flags=NTF_SELF))
            for pol in d.remove_policies:
                self._ignore_missing(lambda: self._xfrm.delete_policy(pol.selector, pol.direction,  # type: ignore[union-attr]
                                                                      if_id=pol.if_id))
            for st in d.remove_states:
                self._ignore_missing(lambda: self._xfrm.delete_state(str(st.dst), st.spi, str(st.src)))  # type: ignore[union-attr]
            for t in d.remove_tenants:
                self._remove_tenant(ip, t)
                log.info("tenant devices for VNI %d removed", t.vni)

    @staticmethod
    def _device_gone(dev: str, gone: set[int]) -> bool:
        """A tenant device (``pgv<vni>``...) of a tenant being removed (it goes with it)."""
        for p in _OUR_PREFIXES:
            if dev.startswith(p) and dev[len(p):].isdigit():
                return int(dev[len(p):]) in gone
        return False

    @staticmethod
    def _ignore_missing(fn: Any) -> None:
        try:
            fn()
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
                raise
        except DataplaneError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESRCH):
                raise

    def _state(self, st: XfrmState, update: bool) -> None:
        assert self._xfrm is not None
        try:
            if update:
                self._xfrm.update_state(st)
            else:
                self._xfrm.add_state(st)
        except DataplaneError as exc:
            if not update and exc.errno == errno.EEXIST:  # left over: replace it
                self._xfrm.update_state(st)
            else:
                raise

    def _policy(self, pol: XfrmPolicy, update: bool) -> None:
        assert self._xfrm is not None
        try:
            if update:
                self._xfrm.update_policy(pol)
            else:
                self._xfrm.add_policy(pol)
        except DataplaneError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOENT):
                self._xfrm.update_policy(pol)  # UPDPOLICY adds or replaces
            else:
                raise

    # ------------------------------------------------------------------ devices
    @contextmanager
    def _ipr(self) -> Iterator[IPRoute]:
        ip = IPRoute()
        try:
            yield ip
        finally:
            ip.close()

    @staticmethod
    def _index(ip: IPRoute, name: str) -> int:
        found = ip.link_lookup(ifname=name)
        if not found:
            raise DataplaneError(f"xfrm backend: device {name} is missing", errno.ENODEV)
        return int(found[0])

    def _create_tenant(self, ip: IPRoute, t: TenantDevices) -> None:
        for name in t.names:  # a half-created tenant from an earlier failure
            if ip.link_lookup(ifname=name):
                ip.link("del", index=ip.link_lookup(ifname=name)[0])
        ip.link("add", ifname=t.vrf, kind="vrf", vrf_table=t.table)
        vrf = self._index(ip, t.vrf)
        ip.link("set", index=vrf, state="up")
        ip.link("add", ifname=t.xfrmi, kind="xfrm", xfrm_if_id=t.if_id)
        ip.link("add", ifname=t.vxlan, kind="vxlan", vxlan_id=t.vni, vxlan_local=self.cfg.fabric_addr,
                vxlan_port=self.cfg.vxlan_port, vxlan_learning=0)
        src_mac = self.cfg.src_mac or gpn_mac(self.cfg.fabric_addr)
        ip.link("set", index=self._index(ip, t.vxlan), address=":".join(f"{b:02x}" for b in src_mac))
        ip.link("add", ifname=t.macvlan, kind="macvlan", link=self._index(ip, t.vxlan),
                macvlan_mode="private")
        ip.link("set", index=self._index(ip, t.macvlan), address=":".join(f"{b:02x}" for b in GATEWAY_MAC))
        for name in (t.xfrmi, t.vxlan, t.macvlan):
            # no addresses on these devices: reverse-path filtering would drop every
            # packet they receive (docs/gpn.md)
            _write_sysctl(f"net/ipv4/conf/{name}/rp_filter", "0")
            ip.link("set", index=self._index(ip, name), master=vrf, state="up")
        self._exempt_from_rp_filter()

    def _remove_tenant(self, ip: IPRoute, t: TenantDevices) -> None:
        for name in reversed(t.names):
            found = ip.link_lookup(ifname=name)
            if found:
                self._ignore_missing(lambda: ip.link("del", index=found[0]))

    def _exempt_from_rp_filter(self) -> None:
        """The effective rp_filter of a device is the higher of its own and ``all``'s: with
        ``all`` above 0 our devices would still filter. Lower ``all`` to 0 and raise every
        other device's own value to the old ``all`` value, so nothing else changes."""
        old = int(_read_sysctl("net/ipv4/conf/all/rp_filter") or "0")
        if old == 0:
            return
        for dev in os.listdir("/proc/sys/net/ipv4/conf"):
            if dev in ("all",) or _is_our_device(dev):
                continue
            path = f"net/ipv4/conf/{dev}/rp_filter"
            try:
                if int(_read_sysctl(path)) < old:
                    _write_sysctl(path, str(old))
            except OSError:
                continue
        _write_sysctl("net/ipv4/conf/all/rp_filter", "0")
        log.info("rp_filter: 'all' lowered from %d to 0, every other device keeps %d", old, old)

    # ------------------------------------------------------------------ read-back
    def _remove_leftovers(self) -> None:
        """A previous incarnation's objects (crash, kill -9): never reused, removed."""
        assert self._xfrm is not None
        for st in self._xfrm.dump_states():
            if is_ours(st.if_id) or Canary.is_canary_state(st):
                self._ignore_missing(lambda: self._xfrm.delete_state(str(st.dst), st.spi, str(st.src)))  # type: ignore[union-attr]
        for pol in self._xfrm.dump_policies():
            if is_ours(pol.if_id) or Canary.is_canary_policy(pol):
                self._ignore_missing(lambda: self._xfrm.delete_policy(pol.selector, pol.direction,  # type: ignore[union-attr]
                                                                      if_id=pol.if_id))
        with self._ipr() as ip:
            links = [(lk["index"], lk.get_attr("IFLA_IFNAME")) for lk in ip.get_links()]
            for index, name in sorted(links, key=lambda x: (not str(x[1]).startswith("pgm"), x[1])):
                if name and _is_our_device(name):
                    self._ignore_missing(lambda: ip.link("del", index=index))
                    log.info("removed leftover device %s", name)

    def verify(self) -> None:
        """Read the kernel back (states, policies, devices, routes, neighbours, FDB) and
        apply the difference to what was last applied: missing objects come back, stray
        ones tagged as ours go. A vanished outbound state is never added again."""
        assert self._xfrm is not None
        want = self._applied
        if _read_sysctl("net/ipv4/ip_forward") != "1":
            log.warning("ip_forward was turned off: turning it on again")
            _write_sysctl("net/ipv4/ip_forward", "1")
            self.repairs += 1
        have = self._read_back(want)
        for k in sorted(want.outbound & set(want.states)):
            if k not in have.states and k not in self._lost:
                log.error("outbound SA spi=%08x vanished from the kernel: not added again (its sequence numbers "
                          "are gone); reported for a rekey", k[1])
                self._lost.add(k)
        canary = self._health.canary if self._health is not None else None
        if canary is not None and canary.installed and not self._canary_seen:
            log.warning("the ESP canary's state vanished from the kernel: installing it again")
            canary.install()
            self.repairs += 1
        target = self._without_lost(want)
        changes = diff(have, target)
        if not changes:
            return
        self.repairs += 1
        log.warning("xfrm backend: the kernel differs from what was applied (to add or fix: %d tenants, %d states, "
                    "%d policies, %d routes; to remove: %d states, %d policies): repairing",
                    len(changes.add_tenants), len(changes.add_states) + len(changes.update_states),
                    len(changes.set_policies), len(changes.set_routes), len(changes.remove_states),
                    len(changes.remove_policies))
        self._applied = have
        self._apply(target)

    def _without_lost(self, p: KernelPlan) -> KernelPlan:
        if not self._lost:
            return p
        return KernelPlan(tenants=p.tenants, states={k: v for k, v in p.states.items() if k not in self._lost},
                          outbound=p.outbound - self._lost, policies=p.policies, routes=p.routes,
                          neighbours=p.neighbours, fdb=p.fdb)

    def _read_back(self, want: KernelPlan) -> KernelPlan:
        """What the kernel holds of ``want`` (in ``want``'s terms), plus stray objects that
        carry our tag (so that :func:`diff` removes them)."""
        assert self._xfrm is not None
        have = KernelPlan(outbound=set(want.outbound))
        self._canary_seen = False
        for st in self._xfrm.dump_states():
            self._canary_seen |= Canary.is_canary_state(st)
            if not is_ours(st.if_id):
                continue
            key = (str(st.dst), st.spi)
            w = want.states.get(key)
            have.states[key] = w if w is not None and same_state(w, st) else st
        for pol in self._xfrm.dump_policies():
            if not is_ours(pol.if_id):
                continue
            sel = pol.selector
            key = (pol.if_id or 0, pol.direction, f"{sel.saddr}/{sel.prefixlen_s}", f"{sel.daddr}/{sel.prefixlen_d}")
            w = want.policies.get(key)
            have.policies[key] = w if w is not None and same_policy(w, pol) else pol
        with self._ipr() as ip:
            links = {lk.get_attr("IFLA_IFNAME"): lk for lk in ip.get_links()}
            for vni, t in want.tenants.items():
                devs = [links.get(n) for n in t.names]
                vrf = devs[0]
                if all(d is not None and d["flags"] & 1 for d in devs) and vrf is not None and all(
                        d.get_attr("IFLA_MASTER") == vrf["index"] for d in devs[1:] if d is not None):
                    have.tenants[vni] = t
            for table in sorted({t.table for t in have.tenants.values()}):
                for r in ip.get_routes(family=socket.AF_INET, table=table):
                    dst = r.get_attr("RTA_DST")
                    if dst is None or (r.get_attr("RTA_TABLE") or r["table"]) != table:
                        continue
                    key = (table, f"{dst}/{r['dst_len']}")
                    oif = r.get_attr("RTA_OIF")
                    dev = next((n for n, lk in links.items() if lk["index"] == oif), None)
                    if dev is not None and want.routes.get(key) == dev:
                        have.routes[key] = dev
            for vni, t in have.tenants.items():
                index = links[t.vxlan]["index"]
                for n in ip.get_neighbours(family=socket.AF_INET, ifindex=index):
                    key = (t.vxlan, str(n.get_attr("NDA_DST")))
                    if want.neighbours.get(key) == n.get_attr("NDA_LLADDR"):
                        have.neighbours[key] = want.neighbours[key]
                for n in ip.get_neighbours(family=socket.AF_BRIDGE, ifindex=index):
                    key = (t.vxlan, str(n.get_attr("NDA_LLADDR")))
                    if want.fdb.get(key) == n.get_attr("NDA_DST"):
                        have.fdb[key] = want.fdb[key]
        return have

    # ------------------------------------------------------------------ statistics
    def stats(self, timeout: float = 2.0) -> EngineStats:
        out = EngineStats()
        now = time.time()
        with self._lock:
            assert self._xfrm is not None
            states = {(str(s.dst), s.spi): s for s in self._xfrm.dump_states() if is_ours(s.if_id)}
            for (direction, spi), g in self._sas.items():
                key = (direction, spi)
                st = states.get((str(g.sa.dst), spi))
                if st is None:
                    if direction == "out" and (str(g.sa.dst), spi) in self._lost:
                        out.rekey.add(key)
                    continue
                packets, last_change = self._last.get(key, (0, 0.0))
                if st.cur_packets != packets:
                    last_change = now
                    self._last[key] = (st.cur_packets, now)
                out.sas[key] = (st.cur_packets, st.cur_bytes, last_change)
                if direction == "in" and st.cur_use_time:
                    out.first[key] = float(st.cur_use_time)
                if direction == "out" and self._needs_rekey(g, st):
                    out.rekey.add(key)
        out.drops = _xfrm_stat()
        if self._health is not None:
            out.counters = self._health.counters()
        out.counters["repairs"] = self.repairs
        return out

    @staticmethod
    def _needs_rekey(g: GpnSa, st: XfrmState) -> bool:
        """The outbound SA passed its soft byte limit or most of its sequence space."""
        soft = g.sa.lifetime.soft_bytes
        if soft and st.cur_bytes >= soft:
            return True
        limit = (1 << 64) if g.sa.esn else (1 << 32)
        return st.oseq >= limit - (limit >> 4)


@contextmanager
def _doing(what: str) -> Iterator[None]:
    """Name the object in the error of a failed kernel operation (never a key)."""
    try:
        yield
    except NetlinkError as exc:
        raise DataplaneError(f"{what}: {os.strerror(exc.code) if exc.code > 0 else exc}", exc.code) from None
    except DataplaneError as exc:
        raise DataplaneError(f"{what}: {exc}", exc.errno) from None


def parse_xfrm_stat(text: str) -> dict[str, int]:
    """The counters of a ``/proc/net/xfrm_stat`` text that are not zero."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and int(parts[1]):
            out[parts[0]] = int(parts[1])
    return out


def _xfrm_stat() -> dict[str, int]:
    """This namespace's XFRM error counters (``/proc/net/xfrm_stat``) that are not zero."""
    try:
        with open("/proc/net/xfrm_stat") as f:
            return parse_xfrm_stat(f.read())
    except OSError:
        return {}
