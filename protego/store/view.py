"""A local mirror of an etcd prefix, kept by :meth:`Etcd.snapshot_and_watch`.

Agents read their desired state from this mirror and are told (``on_change``)
when it changed; the mirror itself never does I/O.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from protego.store.etcd import KV, Event, EventType


class PrefixView:
    """key -> KV under one prefix; thread-safe; ``on_change()`` after every update.

    Every record Protego keeps is a JSON object: :meth:`get_json` and :meth:`json_items`
    give objects only. A value that is not one (corrupt, or written by hand) is skipped,
    never fatal, and handed to ``on_bad(kv, reason)`` (an agent's refused-records list)."""

    def __init__(self, on_change: Callable[[], None] | None = None,
                 on_bad: Callable[[KV, str], None] | None = None) -> None:
        self.on_bad = on_bad
        self._kvs: dict[str, KV] = {}
        self._lock = threading.Lock()
        self._on_change = on_change
        self.revision = 0
        self.synced = threading.Event()

    # WatchHandler
    def on_snapshot(self, revision: int, kvs: list[KV]) -> None:
        with self._lock:
            self._kvs = {kv.key: kv for kv in kvs}
            self.revision = revision
        self.synced.set()
        if self._on_change:
            self._on_change()

    def on_events(self, events: list[Event]) -> None:
        with self._lock:
            for ev in events:
                if ev.type is EventType.PUT:
                    self._kvs[ev.key] = ev.kv
                else:
                    self._kvs.pop(ev.key, None)
                self.revision = max(self.revision, ev.revision)
        if self._on_change:
            self._on_change()

    # reads
    def get(self, key: str) -> KV | None:
        with self._lock:
            return self._kvs.get(key)

    def get_json(self, key: str) -> dict[str, Any] | None:
        kv = self.get(key)
        return self._object(kv) if kv is not None else None

    def revision_of(self, key: str) -> int | None:
        kv = self.get(key)
        return kv.mod_revision if kv is not None else None

    def items(self, prefix: str) -> list[KV]:
        with self._lock:
            return [kv for k, kv in self._kvs.items() if k.startswith(prefix)]

    def json_items(self, prefix: str) -> dict[str, dict[str, Any]]:
        out = {}
        for kv in self.items(prefix):
            obj = self._object(kv)
            if obj is not None:
                out[kv.key] = obj
        return out

    def _object(self, kv: KV) -> dict[str, Any] | None:
        try:
            obj = json.loads(kv.value)
        except ValueError:
            reason = "not JSON"
        else:
            if isinstance(obj, dict):
                return obj
            reason = f"a JSON {type(obj).__name__}, not an object"
        if self.on_bad is not None:
            self.on_bad(kv, reason)
        return None
