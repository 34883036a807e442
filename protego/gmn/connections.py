"""charon's connections for Protego's tunnels, as VICI ``load-conn`` messages (pure).

One connection per tunnel, named ``<tenant>_<tunnel>`` (names are ``[a-z0-9-]``,
so the underscore is unambiguous; a dot would split swanctl's sections), with one child of the same name.  The GMN is always
the responder: it never initiates, and clears a tunnel whose peer is gone.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from protego.control.model import Tenant, Tunnel


def conn_name(tenant: str, tunnel: str) -> str:
    return f"{tenant}_{tunnel}"


def split_conn_name(name: str) -> tuple[str, str] | None:
    if name.count("_") != 1:
        return None
    a, b = name.split("_")
    return (a, b) if a and b else None


def secret_id(tenant: str, tunnel: str) -> str:
    return f"protego-psk-{tenant}_{tunnel}"


def connection(tenant: Tenant, tunnel: Tunnel) -> dict[str, Any]:
    name = conn_name(tenant.name, tunnel.name)
    return {
        "version": "2",
        "local_addrs": [tenant.vip],
        "remote_addrs": [tunnel.remote_addrs],
        "proposals": [tunnel.ike_proposals],
        "rekey_time": str(tunnel.ike_rekey_time),
        "dpd_delay": str(tunnel.dpd_delay),
        "unique": "replace",
        "mobike": "no",
        "local-1": {"auth": "psk", "id": tunnel.effective_local_id(tenant)},
        "remote-1": {"auth": "psk", "id": tunnel.effective_remote_id()},
        "children": {
            name: {
                "mode": "tunnel",
                "local_ts": list(tunnel.effective_local_ts(tenant)),
                "remote_ts": list(tunnel.remote_ts),
                "esp_proposals": [tunnel.esp_proposals],
                "rekey_time": str(tunnel.rekey_time),
                "life_time": str(tunnel.effective_life_time()),
                "start_action": "none",
                "dpd_action": "clear",
                "close_action": "none",
            }
        },
    }


def fingerprint(conn: dict[str, Any], owners: list[str]) -> str:
    """What changes a loaded connection: its definition and its secret's owners."""
    return hashlib.sha256(json.dumps([conn, owners], sort_keys=True).encode()).hexdigest()


def desired_connections(tenants: list[Tenant], tunnels: list[Tunnel], secrets: set[tuple[str, str]]
                        ) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """name -> (load-conn body, secret owners), for every tunnel whose tenant and PSK exist.

    A tunnel without its PSK yet is left out: nothing is half-loaded.
    """
    by_name = {t.name: t for t in tenants}
    out = {}
    for tun in tunnels:
        tenant = by_name.get(tun.tenant)
        if tenant is None or (tun.tenant, tun.name) not in secrets:
            continue
        owners = [tun.effective_local_id(tenant), tun.effective_remote_id()]
        out[conn_name(tenant.name, tun.name)] = (connection(tenant, tun), owners)
    return out
