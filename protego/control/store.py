"""Tenants and tunnels in etcd: atomic create, list, show and remove.

Every change is one etcd transaction guarded by compare-and-swap, so two
operators racing cannot create duplicates or overlapping tunnels, and a refused
change leaves nothing behind.  PSKs are stored only under ``secrets/`` in etcd, sealed
to the GMNs' key (``gmn/seal-key``, protego/sealing.py): only a GMN opens them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from protego import sealing
from protego.control.model import (
    GMN_SEAL_KEY,
    PREFIX,
    Tenant,
    Tunnel,
    check_new_tunnel,
    check_psk,
    secret_key,
    tenant_key,
    tunnel_guard_key,
    tunnel_key,
    tunnels_prefix,
    vip_index_key,
    vni_index_key,
)
from protego.errors import ConfigError, ConflictError
from protego.store.etcd import DeleteOp, Etcd, PutOp, key_absent, mod_revision_is

log = logging.getLogger(__name__)

_RETRIES = 5
# etcd's default --max-txn-ops; a larger batch is added one by one (and rolled back)
MAX_TXN_OPS = 128


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


class ControlStore:
    """The operator-facing objects (tenants, tunnels) over an injected :class:`Etcd`."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    # ----------------------------------------------------------------- tenants
    def add_tenant(self, tenant: Tenant) -> Tenant:
        """Store ``tenant`` (its VIP and network in canonical form, indexed so). Returns
        what was stored."""
        tenant = tenant.canonical().validate()
        res = self.etcd.txn(
            [key_absent(tenant_key(tenant.name)), key_absent(vni_index_key(tenant.vni)),
             key_absent(vip_index_key(tenant.vip))],
            [PutOp(tenant_key(tenant.name), _dump(tenant.to_json())),
             PutOp(vni_index_key(tenant.vni), tenant.name.encode()),
             PutOp(vip_index_key(tenant.vip), tenant.name.encode())],
        )
        if res.succeeded:
            log.info("tenant %s added (vni %d, vip %s)", tenant.name, tenant.vni, tenant.vip)
            return tenant
        if self.etcd.get(tenant_key(tenant.name)) is not None:
            raise ConflictError(f"tenant {tenant.name} already exists")
        owner = self.etcd.get(vni_index_key(tenant.vni))
        if owner is not None:
            raise ConflictError(f"VNI {tenant.vni} is already used by tenant {owner.value.decode()}")
        owner = self.etcd.get(vip_index_key(tenant.vip))
        if owner is not None:
            raise ConflictError(f"VIP {tenant.vip} is already used by tenant {owner.value.decode()}")
        raise ConflictError(f"tenant {tenant.name}: concurrent change, try again")

    def get_tenant(self, name: str) -> Tenant:
        kv = self.etcd.get(tenant_key(name))
        if kv is None:
            raise ConfigError(f"unknown tenant '{name}'")
        return Tenant.from_json(json.loads(kv.value))

    def list_tenants(self) -> list[Tenant]:
        _rev, kvs = self.etcd.get_prefix(f"{PREFIX}tenants/")
        return sorted((Tenant.from_json(json.loads(kv.value)) for kv in kvs), key=lambda t: t.name)

    def remove_tenant(self, name: str, with_tunnels: bool = False) -> list[str]:
        """Remove a tenant; its tunnels too when ``with_tunnels``. Returns the removed tunnels."""
        kv = self.etcd.get(tenant_key(name))
        if kv is None:
            raise ConfigError(f"unknown tenant '{name}'")
        tenant = Tenant.from_json(json.loads(kv.value))
        tunnels = [t.name for t in self.list_tunnels(name)]
        if tunnels and not with_tunnels:
            raise ConfigError(
                f"tenant {name} still has tunnels ({', '.join(tunnels)}); remove them first or use --with-tunnels"
            )
        guard = self.etcd.get(tunnel_guard_key(name))
        res = self.etcd.txn(
            [mod_revision_is(tenant_key(name), kv.mod_revision),
             mod_revision_is(tunnel_guard_key(name), guard.mod_revision if guard else 0)],
            [DeleteOp(tenant_key(name)), DeleteOp(vni_index_key(tenant.vni)),
             DeleteOp(vip_index_key(tenant.vip)), DeleteOp(tunnels_prefix(name), prefix=True),
             DeleteOp(f"{PREFIX}secrets/{name}/", prefix=True), DeleteOp(tunnel_guard_key(name))],
        )
        if not res.succeeded:
            raise ConflictError(f"tenant {name} changed while removing it; try again")
        log.info("tenant %s removed with %d tunnel(s)", name, len(tunnels))
        return tunnels

    # ----------------------------------------------------------------- tunnels
    def _gmn_seal_key(self) -> bytes:
        kv = self.etcd.get(GMN_SEAL_KEY)
        try:
            key = sealing.parse_public(json.loads(kv.value).get("key")) if kv is not None else None
        except (ValueError, AttributeError):
            key = None
        if key is None:
            raise ConfigError("no GMN sealing key in etcd (gmn/seal-key): start a GMN agent first; "
                              "PSKs are stored sealed to it")
        return key

    def _sealed_psk(self, tunnel: Tunnel, psk: bytes, gmn_key: bytes) -> bytes:
        """The PSK as etcd keeps it: sealed to the GMNs' key for its own record."""
        return sealing.seal(gmn_key, psk, secret_key(tunnel.tenant, tunnel.name)[len(PREFIX):]).encode()

    def add_tunnel(self, tunnel: Tunnel, psk: bytes) -> None:
        check_psk(f"tunnel {tunnel.tenant}/{tunnel.name}", psk)
        sealed = self._sealed_psk(tunnel, psk, self._gmn_seal_key())
        for _ in range(_RETRIES):
            tkv = self.etcd.get(tenant_key(tunnel.tenant))
            if tkv is None:
                raise ConfigError(f"unknown tenant '{tunnel.tenant}'")
            tenant = Tenant.from_json(json.loads(tkv.value))
            guard = self.etcd.get(tunnel_guard_key(tunnel.tenant))
            check_new_tunnel(tunnel, tenant, self.list_tunnels(tunnel.tenant))
            res = self.etcd.txn(
                [mod_revision_is(tenant_key(tunnel.tenant), tkv.mod_revision),
                 mod_revision_is(tunnel_guard_key(tunnel.tenant), guard.mod_revision if guard else 0),
                 key_absent(tunnel_key(tunnel.tenant, tunnel.name))],
                [PutOp(tunnel_key(tunnel.tenant, tunnel.name), _dump(tunnel.to_json())),
                 PutOp(secret_key(tunnel.tenant, tunnel.name), sealed),
                 PutOp(tunnel_guard_key(tunnel.tenant), tunnel.name.encode())],
            )
            if res.succeeded:
                log.info("tunnel %s/%s added (remote %s)", tunnel.tenant, tunnel.name, tunnel.remote_addrs)
                return
        raise ConflictError(f"tunnel {tunnel.tenant}/{tunnel.name}: too many concurrent changes, try again")

    def add_tunnels(self, items: list[tuple[Tunnel, bytes]]) -> None:
        """Add every tunnel of ``items`` or none: one transaction when it fits etcd's
        limit of operations per transaction, else one by one, the ones added removed
        again if a later one is refused."""
        for t, psk in items:
            check_psk(f"tunnel {t.tenant}/{t.name}", psk)
        gmn_key = self._gmn_seal_key()
        tenants = sorted({t.tenant for t, _ in items})
        if 3 * len(items) + len(tenants) <= MAX_TXN_OPS:
            for _ in range(_RETRIES):
                compares, ops = [], []
                for name in tenants:
                    tkv = self.etcd.get(tenant_key(name))
                    if tkv is None:
                        raise ConfigError(f"unknown tenant '{name}'")
                    tenant = Tenant.from_json(json.loads(tkv.value))
                    guard = self.etcd.get(tunnel_guard_key(name))
                    existing = self.list_tunnels(name)
                    mine = [t for t, _ in items if t.tenant == name]
                    for t in mine:
                        check_new_tunnel(t, tenant, existing)
                        existing.append(t)
                    compares += [mod_revision_is(tenant_key(name), tkv.mod_revision),
                                 mod_revision_is(tunnel_guard_key(name), guard.mod_revision if guard else 0)]
                    ops.append(PutOp(tunnel_guard_key(name), mine[-1].name.encode()))
                for t, psk in items:
                    compares.append(key_absent(tunnel_key(t.tenant, t.name)))
                    ops += [PutOp(tunnel_key(t.tenant, t.name), _dump(t.to_json())),
                            PutOp(secret_key(t.tenant, t.name), self._sealed_psk(t, psk, gmn_key))]
                if self.etcd.txn(compares, ops).succeeded:
                    log.info("%d tunnel(s) added in one transaction", len(items))
                    return
            raise ConflictError(f"{len(items)} tunnels: too many concurrent changes, try again")
        added: list[Tunnel] = []
        try:
            for t, psk in items:
                self.add_tunnel(t, psk)
                added.append(t)
        except BaseException:
            for t in reversed(added):
                try:
                    self.remove_tunnel(t.tenant, t.name)
                except Exception as exc:  # noqa: BLE001 - reported, the original error goes on
                    log.error("tunnel %s/%s: added, and could not be removed again: %s", t.tenant, t.name, exc)
            if added:
                log.warning("%d tunnel(s) added and removed again: a later one was refused", len(added))
            raise

    def get_tunnel(self, tenant: str, name: str) -> Tunnel:
        kv = self.etcd.get(tunnel_key(tenant, name))
        if kv is None:
            self.get_tenant(tenant)  # a clearer error when the tenant is unknown
            raise ConfigError(f"unknown tunnel '{tenant}/{name}'")
        return Tunnel.from_json(json.loads(kv.value))

    def list_tunnels(self, tenant: str | None = None) -> list[Tunnel]:
        _rev, kvs = self.etcd.get_prefix(tunnels_prefix(tenant))
        out = [Tunnel.from_json(json.loads(kv.value)) for kv in kvs]
        return sorted(out, key=lambda t: (t.tenant, t.name))

    def remove_tunnel(self, tenant: str, name: str) -> None:
        kv = self.etcd.get(tunnel_key(tenant, name))
        if kv is None:
            self.get_tenant(tenant)
            raise ConfigError(f"unknown tunnel '{tenant}/{name}'")
        res = self.etcd.txn(
            [mod_revision_is(tunnel_key(tenant, name), kv.mod_revision)],
            [DeleteOp(tunnel_key(tenant, name)), DeleteOp(secret_key(tenant, name)),
             PutOp(tunnel_guard_key(tenant), b"")],
        )
        if not res.succeeded:
            raise ConflictError(f"tunnel {tenant}/{name} changed while removing it; try again")
        log.info("tunnel %s/%s removed", tenant, name)

    # ----------------------------------------------------------------- SAs
    def list_sas(self) -> list[dict[str, Any]]:
        """SA records the GMN agent wrote (keys stripped: never shown by the CLI)."""
        _rev, kvs = self.etcd.get_prefix(f"{PREFIX}sas/")
        out = []
        for kv in kvs:
            rec = json.loads(kv.value)
            for secret in ("enc_key", "integ_key", "key", "salt"):
                rec.pop(secret, None)
            out.append(rec)
        return sorted(out, key=lambda r: (r.get("tenant", ""), r.get("tunnel", ""), r.get("direction", "")))
