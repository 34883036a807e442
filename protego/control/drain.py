"""Draining a GPN (maintenance, scale-in): migrate every tunnel off it.

``gpn/admin/<gpn>`` = ``{"state": "draining", ...}`` takes the GPN out of placement
(the GMN places no new SA there, a rekey moves off it) without treating it as failed;
then each tunnel placed on it is migrated by rekey (:mod:`protego.control.migrate`) to
the healthy GPN carrying the fewest tunnels, a few at a time. The mark stays after the
drain, so nothing lands there again until ``protego gpn undrain``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from protego.control.migrate import MigrationResult, request_migration, wait_migration
from protego.control.model import PREFIX
from protego.errors import ConfigError, ProtegoError
from protego.store.etcd import Etcd

ADMIN_PREFIX = f"{PREFIX}gpn/admin/"


def admin_key(gpn: str) -> str:
    return f"{ADMIN_PREFIX}{gpn}"


@dataclass(frozen=True)
class Pool:
    """The GPNs as placement sees them, from one etcd snapshot."""

    registered: frozenset[str]
    dead: frozenset[str]
    draining: frozenset[str]
    tunnels: dict[str, list[tuple[str, str]]]  # gpn -> tunnels placed there

    def usable(self) -> list[str]:
        return sorted(self.registered - self.dead - self.draining)


def read_pool(etcd: Etcd) -> Pool:
    kvs = etcd.get_prefix(f"{PREFIX}gpn/")[1] + etcd.get_prefix(f"{PREFIX}placement/")[1]
    registered: set[str] = set()
    dead: set[str] = set()
    draining: set[str] = set()
    tunnels: dict[str, list[tuple[str, str]]] = {}
    for kv in kvs:
        rest = kv.key[len(PREFIX):]
        try:
            val: Any = json.loads(kv.value)
        except ValueError:
            continue
        if rest.startswith("gpn/nodes/"):
            registered.add(rest.rsplit("/", 1)[1])
        elif rest.startswith("gpn/health/") and isinstance(val, dict) and val.get("state") == "dead":
            dead.add(rest.rsplit("/", 1)[1])
        elif rest.startswith("gpn/admin/") and isinstance(val, dict) and val.get("state") == "draining":
            draining.add(rest.rsplit("/", 1)[1])
        elif rest.startswith("placement/") and isinstance(val, dict) and val.get("gpn"):
            parts = rest[len("placement/"):].split("/")
            if len(parts) == 2:
                tunnels.setdefault(val["gpn"], []).append((parts[0], parts[1]))
    for lst in tunnels.values():
        lst.sort()
    return Pool(frozenset(registered), frozenset(dead), frozenset(draining), tunnels)


def plan_targets(pool: Pool, source: str, moving: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Each tunnel to the usable GPN (never ``source``) with the fewest tunnels, counting
    the ones this plan already sent there."""
    load = {g: len(pool.tunnels.get(g, [])) for g in pool.usable() if g != source}
    if not load:
        raise ConfigError(f"no healthy GPN other than {source} can take its tunnels")
    out = {}
    for tun in moving:
        g = min(load, key=lambda n: (load[n], n))
        out[tun] = g
        load[g] += 1
    return out


def set_draining(etcd: Etcd, gpn: str, on: bool) -> None:
    if on:
        etcd.put(admin_key(gpn), json.dumps({"state": "draining", "since": time.time()}).encode())
    else:
        etcd.delete(admin_key(gpn))


@dataclass
class DrainReport:
    gpn: str
    results: list[MigrationResult] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # tunnel -> why it could not start
    seconds: float = 0.0

    @property
    def moved(self) -> int:
        return sum(1 for r in self.results if r.state == "done")

    @property
    def failed(self) -> int:
        return len(self.results) - self.moved + len(self.errors)

    def to_json(self) -> dict[str, Any]:
        return {"gpn": self.gpn, "moved": self.moved, "failed": self.failed, "seconds": round(self.seconds, 3),
                "migrations": [r.__dict__ for r in self.results], "errors": self.errors}


def drain(etcd: Etcd, gpn: str, parallel: int = 4, timeout: float = 45.0,
          progress: Callable[[str], None] | None = None) -> DrainReport:
    """Mark ``gpn`` draining and migrate each tunnel placed on it; ``parallel`` at a time."""
    pool = read_pool(etcd)
    if gpn not in pool.registered and gpn not in pool.tunnels:
        known = sorted(pool.registered | set(pool.tunnels))
        raise ConfigError(f"unknown GPN {gpn!r} (known: {', '.join(known) or 'none'})")
    set_draining(etcd, gpn, True)
    t0 = time.monotonic()
    report = DrainReport(gpn)
    moving = pool.tunnels.get(gpn, [])
    if not moving:
        if progress:
            progress(f"{gpn} carries no tunnel; it is marked draining")
        return report
    targets = plan_targets(pool, gpn, moving)
    total = len(moving)
    if progress:
        progress(f"draining {gpn}: {total} tunnel(s), {parallel} at a time")

    def one(tun: tuple[str, str]) -> MigrationResult:
        request_migration(etcd, tun[0], tun[1], targets[tun])
        return wait_migration(etcd, tun[0], tun[1], timeout)

    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="drain") as ex:
        futs = {ex.submit(one, tun): tun for tun in moving}
        for fut in as_completed(futs):
            tun = futs[fut]
            name = f"{tun[0]}/{tun[1]}"
            try:
                res = fut.result()
            except ProtegoError as exc:
                report.errors[name] = str(exc)
                line = f"{name}: not moved: {exc}"
            else:
                report.results.append(res)
                line = (f"{name}: {res.source} -> {res.target} in {res.switch_ms or 0:.0f} ms" if res.state == "done"
                        else f"{name}: migration failed: {res.detail}")
            if progress:
                progress(f"[{len(report.results) + len(report.errors)}/{total}] {line}")
    report.seconds = time.monotonic() - t0
    return report
