"""Least privilege in etcd: one role per node, granting only the keys that node's agent
reads and writes (issue #19; docs/etcd-schema.md, "Who may touch what").

etcd checks every request against the user's roles: a permission is a key range
(one key, or a prefix) with read, write or both, and a transaction needs read on
every key it compares and write on every key it puts or deletes. The roles:

- ``gmn`` (the GMN agents and their HA relays): everything under the schema's prefix
  and the HA mirror's (charon's IKE SA state is theirs alone).
- ``gpn-<node>``: reads what it installs and follows (``sas/``: keys sealed to their
  GPN, ``steer/``, ``vnet/``, the GMNs' acknowledgement addresses); writes only its own
  registration, acknowledgement, load, acknowledgement key and refused records, and
  the counters of SAs (``sastats/<vip>/<spi>``: per SA, not per node, so one GPN could
  overwrite another's counters; they carry no key).
- ``lb-<node>`` (a GIN/GEN): reads the steering, the active GMN, the GPNs'
  registrations, the tenants and the GMNs' acknowledgement addresses; writes the GPNs'
  health and its own acknowledgement, acknowledgement key and refused records. No
  ``sas/``, no ``secrets/``, no keys.
- ``operator`` (the CLI, a controller): everything under the schema's prefix but the
  SA records and the acknowledgement keys (the PSKs it writes are sealed to the GMNs).

:func:`setup` creates the roles and users over etcd's Auth API and enables
authentication; it is idempotent (what exists is checked and completed: a role's
permissions are made exactly those listed here).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from protego.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "/protego/v1/"
HA_PREFIX = "/protego/ha/v1/"

READ, WRITE, READWRITE = 0, 1, 2  # etcd's authpb.Permission.Type
_MODE_NAMES = {READ: "READ", WRITE: "WRITE", READWRITE: "READWRITE"}  # etcdctl's names
KINDS = ("gmn", "gpn", "lb", "operator")
ROOT = "root"
_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with ``prefix`` (etcd's range end)."""
    b = bytearray(prefix.encode("latin-1"))  # Protego's keys are ASCII
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return b.decode("latin-1")
        b.pop()
    return "\0"  # every key


@dataclass(frozen=True)
class Grant:
    """One permission: ``key`` alone, every key under it (``prefix``), or the keys in
    [``key``, ``end``)."""

    key: str
    prefix: bool
    mode: int
    end: str = ""

    @property
    def range_end(self) -> str:
        return self.end or (prefix_end(self.key) if self.prefix else "")

    def covers(self, key: str) -> bool:
        if self.end:
            return self.key <= key < self.end
        return key.startswith(self.key) if self.prefix else key == self.key

    def describe(self) -> str:
        what = f"[{self.key}, {self.end})" if self.end else f"{self.key}{'*' if self.prefix else ''}"
        return f"{_MODE_NAMES[self.mode]} {what}"


def _prefix_except(prefix: str, holes: Iterable[str], mode: int) -> list[Grant]:
    """``prefix`` minus the prefixes ``holes`` (under it): etcd has no deny, so the rest
    of the range is granted piece by piece."""
    out: list[Grant] = []
    start = prefix
    for hole in sorted(holes):
        if not hole.startswith(prefix):
            raise ConfigError(f"{hole!r} is not under {prefix!r}")
        if start < hole:
            out.append(Grant(start, False, mode, end=hole))
        start = prefix_end(hole)
    out.append(Grant(start, False, mode, end=prefix_end(prefix)))
    return out


def check_node(node: str) -> str:
    if not _NODE_RE.fullmatch(node or ""):
        raise ConfigError(f"node name {node!r}: letters, digits, '.', '_' and '-' (at most 63), "
                          f"starting with a letter or digit")
    return node


def role_name(kind: str, node: str | None = None) -> str:
    """``gmn``, ``operator``, ``gpn-<node>``, ``lb-<node>``."""
    if kind not in KINDS:
        raise ConfigError(f"role kind {kind!r}: one of {', '.join(KINDS)}")
    if kind in ("gpn", "lb"):
        if not node:
            raise ConfigError(f"a {kind} role is per node: give the node's name")
        return f"{kind}-{check_node(node)}"
    return kind


def grants(kind: str, node: str | None = None, prefix: str = PREFIX, ha_prefix: str = HA_PREFIX) -> list[Grant]:
    """What a node of ``kind`` may touch (see the module's docstring)."""
    p = prefix
    if kind == "gmn":
        return [Grant(p, True, READWRITE), Grant(ha_prefix, True, READWRITE)]
    if kind == "operator":
        return _prefix_except(p, (f"{p}sas/", f"{p}acks/keys/"), READWRITE)
    n = check_node(node or "")
    if kind == "gpn":
        return [
            Grant(f"{p}sas/", True, READ), Grant(f"{p}steer/", True, READ), Grant(f"{p}vnet/", True, READ),
            Grant(f"{p}gmn/acks/", True, READ),
            Grant(f"{p}gpn/nodes/{n}", False, READWRITE), Grant(f"{p}gpn/applied/{n}", False, READWRITE),
            Grant(f"{p}gpn/load/{n}", False, READWRITE), Grant(f"{p}acks/keys/gpn/{n}", False, READWRITE),
            Grant(f"{p}refused/gpn/{n}", False, READWRITE), Grant(f"{p}sastats/", True, READWRITE),
        ]
    if kind == "lb":
        return [
            # gmn/leader: watched as a prefix (a prefix watch needs the whole range)
            Grant(f"{p}steer/", True, READ), Grant(f"{p}gmn/leader", True, READ), Grant(f"{p}gmn/acks/", True, READ),
            Grant(f"{p}gpn/nodes/", True, READ), Grant(f"{p}tenants/", True, READ),
            Grant(f"{p}gpn/health/", True, READWRITE), Grant(f"{p}lb/applied/{n}", False, READWRITE),
            Grant(f"{p}acks/keys/lb/{n}", False, READWRITE), Grant(f"{p}refused/lb/{n}", False, READWRITE),
        ]
    raise ConfigError(f"role kind {kind!r}: one of {', '.join(KINDS)}")


def allowed(gs: Iterable[Grant], key: str, write: bool) -> bool:
    """Whether ``gs`` let a user read (or write) ``key``: what etcd will decide."""
    need = WRITE if write else READ
    return any(g.covers(key) and g.mode in (need, READWRITE) for g in gs)


@dataclass(frozen=True)
class User:
    """An etcd user for one node: its name is its role's (``gpn-gpn1``, ``gmn``...)."""

    kind: str
    node: str | None
    password: str

    @property
    def name(self) -> str:
        return role_name(self.kind, self.node)


def setup(etcd: Any, users: Iterable[User], root_password: str, *, prefix: str = PREFIX,
          ha_prefix: str = HA_PREFIX, enable: bool = True) -> dict[str, Any]:
    """Create (or complete) the roles and users, then enable authentication.

    ``etcd`` is a :class:`protego.store.etcd.Etcd` connected as ``root`` if
    authentication is on already, or without a user if it is not yet. Returns what
    was done: ``{"roles": [...], "users": [...], "enabled": bool}`` (never passwords)."""
    from pyetcd import etcdrpc

    done: dict[str, Any] = {"roles": [], "users": [], "enabled": False}
    roles = {r for r in etcd.auth("RoleList", etcdrpc.AuthRoleListRequest()).roles}
    names = {u for u in etcd.auth("UserList", etcdrpc.AuthUserListRequest()).users}
    if ROOT not in roles:
        etcd.auth("RoleAdd", etcdrpc.AuthRoleAddRequest(name=ROOT))
        done["roles"].append(ROOT)
    if ROOT not in names:
        etcd.auth("UserAdd", etcdrpc.AuthUserAddRequest(name=ROOT, password=root_password))
        done["users"].append(ROOT)
    etcd.auth("UserGrantRole", etcdrpc.AuthUserGrantRoleRequest(user=ROOT, role=ROOT))
    for u in users:
        role = u.name
        want = {(g.key, g.range_end, g.mode) for g in grants(u.kind, u.node, prefix, ha_prefix)}
        if role not in roles:
            etcd.auth("RoleAdd", etcdrpc.AuthRoleAddRequest(name=role))
            done["roles"].append(role)
            have: set[tuple[str, str, int]] = set()
        else:
            got = etcd.auth("RoleGet", etcdrpc.AuthRoleGetRequest(role=role)).perm
            have = {(p.key.decode("latin-1"), p.range_end.decode("latin-1"), int(p.permType)) for p in got}
        for key, end, mode in sorted(have - want):
            etcd.auth("RoleRevokePermission", etcdrpc.AuthRoleRevokePermissionRequest(
                role=role, key=key.encode("latin-1"), range_end=end.encode("latin-1")))
        for key, end, mode in sorted(want - have):
            etcd.auth("RoleGrantPermission", etcdrpc.AuthRoleGrantPermissionRequest(
                name=role, perm=etcdrpc.Permission(permType=mode, key=key.encode("latin-1"),
                                                   range_end=end.encode("latin-1"))))
        if role not in names:
            etcd.auth("UserAdd", etcdrpc.AuthUserAddRequest(name=role, password=u.password))
            done["users"].append(role)
        else:  # the password is the one given (a rotation, or a testbed brought up again)
            etcd.auth("UserChangePassword", etcdrpc.AuthUserChangePasswordRequest(name=role, password=u.password))
        etcd.auth("UserGrantRole", etcdrpc.AuthUserGrantRoleRequest(user=role, role=role))
    if enable:
        etcd.auth("AuthEnable", etcdrpc.AuthEnableRequest())
        done["enabled"] = True
    log.info("etcd auth: roles %s and users %s created; authentication %s", ", ".join(done["roles"]) or "-",
             ", ".join(done["users"]) or "-", "enabled" if enable else "left as it was")
    return done


def describe(kind: str, node: str | None = None) -> list[str]:
    """The role's permissions, one per line (``protego etcd roles``)."""
    return [g.describe() for g in grants(kind, node)]
