"""``wait_migration`` follows the request's key by a watch (a real etcd on loopback):
it sees every state the GMN writes, does not poll etcd, and reports failures.
``request_migration`` refuses a second migration of a tunnel in progress and replaces
a finished request its requester never collected."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from protego.control.migrate import request_key, request_migration, wait_migration
from protego.control.model import tunnel_key
from protego.errors import ConfigError, ConflictError, PeerError
from protego.store.etcd import Etcd


class CountingEtcd(Etcd):
    """The real client, counting the reads of single keys."""

    gets = 0

    def get(self, key: str, *args: Any, **kw: Any) -> Any:  # type: ignore[override]
        CountingEtcd.gets += 1
        return super().get(key, *args, **kw)


def _play_gmn(endpoints: list[str], key: str, states: list[dict[str, Any]], step: float) -> threading.Thread:
    def run() -> None:
        gmn = Etcd(endpoints)
        try:
            for st in states:
                time.sleep(step)
                gmn.put(key, json.dumps(st).encode())
        finally:
            gmn.close()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def test_wait_sees_every_state_by_watch_and_removes_the_key(etcd_loopback: list[str]) -> None:
    client = CountingEtcd(etcd_loopback)
    try:
        client.delete_prefix("/protego/")
        key = request_key("acme", "hq")
        t0 = time.time()
        base = {"to": "gpn2", "from": "gpn1", "requested": t0}
        client.put(key, json.dumps({**base, "state": "requested"}).encode())
        th = _play_gmn(etcd_loopback, key, [{**base, "state": "rekeying"},
                                            {**base, "state": "rekeying", "switched": t0 + 0.03},
                                            {**base, "state": "done", "switched": t0 + 0.03, "finished": t0 + 0.6}], step=0.2)
        seen: list[str] = []
        CountingEtcd.gets = 0
        w0 = time.monotonic()
        res = wait_migration(client, "acme", "hq", timeout=10, progress=seen.append, poll=5.0)
        waited = time.monotonic() - w0
        th.join(2)
        assert res.state == "done" and res.source == "gpn1" and res.target == "gpn2"
        assert res.switch_ms == pytest.approx(30, abs=1)
        assert seen == ["acme/hq: requested", "acme/hq: rekeying", "acme/hq: done"]
        assert waited < 1.5  # the final state seen when it landed (0.6 s), not at the next poll (5 s)
        # read through the watch: at most the first read before the snapshot (a 20 ms poll
        # would have read ~30 times)
        assert CountingEtcd.gets <= 2
        assert client.get(key) is None
    finally:
        client.delete_prefix("/protego/")
        client.close()


def test_wait_reports_a_vanished_request_and_a_timeout(etcd_loopback: list[str]) -> None:
    client = Etcd(etcd_loopback)
    try:
        client.delete_prefix("/protego/")
        key = request_key("acme", "hq")
        client.put(key, json.dumps({"state": "requested", "to": "gpn2", "requested": time.time()}).encode())
        threading.Timer(0.3, lambda: client.delete(key)).start()
        with pytest.raises(PeerError, match="vanished"):
            wait_migration(client, "acme", "hq", timeout=10, poll=5.0)
        client.put(key, json.dumps({"state": "rekeying", "to": "gpn2", "requested": time.time()}).encode())
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="did not finish within 1 s"):
            wait_migration(client, "acme", "hq", timeout=1.0, poll=0.3)
        assert 0.9 <= time.monotonic() - t0 < 3.0
        assert client.get(key) is None  # a timed-out request is withdrawn
    finally:
        client.delete_prefix("/protego/")
        client.close()


def test_request_refuses_a_migration_in_progress_and_replaces_a_finished_one(etcd_loopback: list[str]) -> None:
    client = Etcd(etcd_loopback)
    try:
        client.delete_prefix("/protego/")
        key = request_key("acme", "hq")
        with pytest.raises(ConfigError, match="unknown tunnel 'acme/hq'"):
            request_migration(client, "acme", "hq", "gpn2")
        assert client.get(key) is None
        client.put(tunnel_key("acme", "hq"), b"{}")
        t0 = request_migration(client, "acme", "hq", "gpn2")
        first = client.get(key)
        assert first is not None and first.json() == {"to": "gpn2", "state": "requested", "requested": t0}
        # in progress (requested, then rekeying): refused, the request left as it was
        for state in ("requested", "rekeying"):
            client.put(key, json.dumps({**first.json(), "state": state}).encode())
            before = client.get(key)
            with pytest.raises(ConflictError, match="already being migrated"):
                request_migration(client, "acme", "hq", "gpn1")
            after = client.get(key)
            assert after is not None and before is not None and after.mod_revision == before.mod_revision
        # finished, but its requester was interrupted before it removed the key
        for state in ("done", "failed"):
            client.put(key, json.dumps({"to": "gpn2", "state": state, "requested": t0, "finished": t0 + 1}).encode())
            t1 = request_migration(client, "acme", "hq", "gpn1")
            now = client.get(key)
            assert now is not None and now.json() == {"to": "gpn1", "state": "requested", "requested": t1}
        # a value that is not ours to judge is not replaced
        client.put(key, b"not json")
        with pytest.raises(ConflictError):
            request_migration(client, "acme", "hq", "gpn2")
        kv = client.get(key)
        assert kv is not None and kv.value == b"not json"
    finally:
        client.delete_prefix("/protego/")
        client.close()
