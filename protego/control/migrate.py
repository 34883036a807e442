"""Live tunnel migration requests (paper §4.5), as the CLI and the controller make them.

A request is one etcd key, ``requests/migrate/<tenant>/<tunnel>``; the active GMN
agent carries it out (pin the next placement, rekey the CHILD_SA) and records its
progress in the same key: ``requested`` → ``rekeying`` (+ ``switched``) → ``done`` or
``failed``.  The requester removes the key once it has read the outcome; a finished
request left behind (its requester was interrupted) is replaced by the next request.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protego.control.model import PREFIX, tunnel_key
from protego.errors import ConfigError, ConflictError, PeerError
from protego.store.etcd import KV, Etcd, PutOp, key_absent, key_present, mod_revision_is
from protego.store.view import PrefixView

MIGRATE_PREFIX = f"{PREFIX}requests/migrate/"

log = logging.getLogger(__name__)


def request_key(tenant: str, tunnel: str) -> str:
    return f"{MIGRATE_PREFIX}{tenant}/{tunnel}"


@dataclass(frozen=True)
class MigrationResult:
    tenant: str
    tunnel: str
    source: str | None
    target: str
    state: str  # done | failed
    detail: str
    switch_ms: float | None  # request -> new SAs on the target and outbound switched
    total_ms: float  # request -> old SAs gone from the source


FINAL_STATES = ("done", "failed")


def request_migration(etcd: Etcd, tenant: str, tunnel: str, target: str) -> float:
    """Write the request (refused if the tunnel is unknown or already migrating). Returns its time.

    A request in a final state (``done``, ``failed``) whose requester never came back for
    it (a CLI interrupted while it waited, a controller that crashed) is not a migration
    in progress: it is replaced, in one transaction that fails if it changed meanwhile."""
    key = request_key(tenant, tunnel)
    for _ in range(3):
        now = time.time()
        put = PutOp(key, json.dumps({"to": target, "state": "requested", "requested": now}).encode())
        res = etcd.txn([key_present(tunnel_key(tenant, tunnel)), key_absent(key)], [put])
        if res.succeeded:
            return now
        if etcd.get(tunnel_key(tenant, tunnel)) is None:
            raise ConfigError(f"unknown tunnel '{tenant}/{tunnel}'")
        old = etcd.get(key)
        if old is None:
            continue  # its requester removed it meanwhile: try again
        try:
            state = old.json().get("state")
        except (ConfigError, AttributeError):  # not JSON, not an object: not ours to replace
            state = None
        if state not in FINAL_STATES:
            raise ConflictError(f"tunnel {tenant}/{tunnel} is already being migrated")
        if etcd.txn([key_present(tunnel_key(tenant, tunnel)), mod_revision_is(key, old.mod_revision)],
                    [put]).succeeded:
            log.info("%s/%s: replaced a finished migration request nobody collected (%s)", tenant, tunnel, state)
            return now
    raise ConflictError(f"tunnel {tenant}/{tunnel}: its migration request keeps changing; try again")


def wait_migration(etcd: Etcd, tenant: str, tunnel: str, timeout: float = 45.0,
                   progress: Callable[[str], None] | None = None, poll: float = 1.0) -> MigrationResult:
    """Follow the request's key until it reads ``done`` or ``failed`` (then remove it).

    The key is *watched*: every state the GMN writes is seen as it lands, and etcd is
    not asked again and again (a drain waits on several migrations at once, and etcd
    shares its CPUs with the GMN, which answers charon only after etcd answered it).
    ``poll``: a read of the key anyway if the watch stayed silent that long."""
    key = request_key(tenant, tunnel)
    changed = threading.Event()
    view = PrefixView(on_change=changed.set)
    watch = etcd.snapshot_and_watch(key, view, name=f"migrate-{tenant}-{tunnel}")
    deadline = time.monotonic() + timeout
    last_state = None
    direct: KV | None = None  # read from etcd itself after a silent `poll`
    try:
        while time.monotonic() < deadline:
            changed.clear()
            if direct is not None:
                kv, direct = direct, None
            elif view.synced.is_set():
                kv = view.get(key)  # a prefix watch: only our exact key counts
            else:
                kv = etcd.get(key)
            if kv is None:
                raise PeerError(f"the migration request of {tenant}/{tunnel} vanished")
            req: dict[str, Any] = kv.json()
            state = req.get("state")
            if state != last_state and progress:
                progress(f"{tenant}/{tunnel}: {state}" + (f" ({req['detail']})" if req.get("detail") else ""))
            last_state = state
            if state in ("done", "failed"):
                etcd.delete(key)
                t0 = float(req["requested"])
                return MigrationResult(
                    tenant, tunnel, req.get("from"), req["to"], state, req.get("detail", ""),
                    (float(req["switched"]) - t0) * 1000 if req.get("switched") else None,
                    (float(req.get("finished", time.time())) - t0) * 1000,
                )
            if not changed.wait(max(0.0, min(poll, deadline - time.monotonic()))):
                direct = etcd.get(key)  # the watch stayed silent: etcd itself
                if direct is None:
                    raise PeerError(f"the migration request of {tenant}/{tunnel} vanished")
    finally:
        watch.cancel()
    etcd.delete(key)
    raise PeerError(f"migration of {tenant}/{tunnel} did not finish within {timeout:.0f} s "
                    f"(last state {last_state!r}); is a GMN agent active?")


def migrate(etcd: Etcd, tenant: str, tunnel: str, target: str, timeout: float = 45.0,
            progress: Callable[[str], None] | None = None) -> MigrationResult:
    request_migration(etcd, tenant, tunnel, target)
    return wait_migration(etcd, tenant, tunnel, timeout, progress)
