"""The HA relay's mirror writes against a real etcd: pipelined across IKE SAs, in order
per IKE SA, retried after an etcd error (protego/gmn/ha_service.py)."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from protego.errors import ProtegoError
from protego.gmn import ha
from protego.gmn.ha_service import HaService
from protego.store.etcd import Etcd, encode_json
from tests.conftest import wait_until
from tests.unit.test_gmn_ha import child_add, ike_add, ike_id, ike_update, mid

LEADER = "/protego/v1/gmn/leader"


class SpyEtcd:
    """The real client, with every mirror transaction held ``delay`` s first (so that
    writes overlap) and watched: which entries are in flight at once, and how many
    transactions. ``fail`` transactions raise before reaching etcd."""

    def __init__(self, real: Etcd, delay: float = 0.03, fail: int = 0) -> None:
        self.real = real
        self.delay = delay
        self.fail = fail
        self.lock = threading.Lock()
        self.in_flight: set[str] = set()
        self.overlaps: list[str] = []  # an entry written by two transactions at once
        self.max_txns = 0
        self.txns = 0
        self._open = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def txn(self, compares: Any, success: Any = (), failure: Any = ()) -> Any:
        keys = [op.key for op in success]
        with self.lock:
            self.overlaps += [k for k in keys if k in self.in_flight]
            self.in_flight.update(keys)
            self._open += 1
            self.max_txns = max(self.max_txns, self._open)
            self.txns += 1
            failing = self.fail > 0
            self.fail -= 1 if failing else 0
        try:
            time.sleep(self.delay)
            if failing:
                raise ProtegoError("etcd txn: injected failure")
            return self.real.txn(compares, success, failure)
        finally:
            with self.lock:
                self.in_flight.difference_update(keys)
                self._open -= 1


@pytest.fixture
def relay(etcd: Etcd) -> Iterator[Any]:
    """A relay made active under a real leadership key, and a socket standing in for
    charon's end of the HA stream."""
    made: list[tuple[HaService, socket.socket]] = []

    def make(spy: SpyEtcd) -> tuple[HaService, socket.socket, Any]:
        port = 20000 + secrets.randbelow(20000)
        svc = HaService("gmnx", spy, "/nonexistent/charon.vici", LEADER, port=port)  # type: ignore[arg-type]
        charon = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        charon.bind((ha.CHARON_HA_ADDR, port))
        made.append((svc, charon))
        svc.start()
        lease = etcd.lease(10)
        etcd.put(LEADER, encode_json({"node": "gmnx"}), lease=lease)
        svc.lease, svc.active = lease.id, True  # what activate() ends with (it needs a charon)
        return svc, charon, lambda m: charon.sendto(m, (ha.AGENT_HA_ADDR, port))

    yield make
    for svc, charon in made:
        svc.stop()
        charon.close()
    etcd.delete_prefix(ha.HA_PREFIX)


def stored(etcd: Etcd, ike: bytes) -> list[bytes] | None:
    kv = etcd.get(ha.entry_key(ike))
    return ha.decode_entry(kv.value) if kv else None


def test_writes_overlap_across_ike_sas_never_within_one_and_land_in_order(etcd: Etcd, relay: Any) -> None:
    spy = SpyEtcd(etcd, delay=0.03)
    svc, _charon, send = relay(spy)
    ikes = [ike_id(0x60 + i) for i in range(6)]
    sent = 0
    for ike in ikes:  # each IKE SA's first datagrams while the previous one's write is held
        send(ike_add(ike))
        send(ike_update(ike))
        sent += 2
        time.sleep(spy.delay / 3)
    # message IDs race ahead while earlier writes of the same entry are in flight
    for n in range(1, 9):
        for i, ike in enumerate(ikes):
            send(mid(ike, n))
            sent += 1
            if n == 4:
                send(child_add(ike, 0xC1000000 + i))
                sent += 1
        time.sleep(0.005)

    def final(ike: bytes) -> bool:
        return stored(etcd, ike) == svc.mirror.raw(ike)

    wait_until(lambda: all(final(i) for i in ikes), 10, "every entry in etcd as the relay holds it")
    for i, ike in enumerate(ikes):  # the last message ID won: no older write landed after a newer one
        entry = stored(etcd, ike)
        assert entry is not None and entry[-1] == mid(ike, 8), ike.hex()
        assert child_add(ike, 0xC1000000 + i) in entry
    wait_until(lambda: svc.counts["mirrored"] == sent, 5, "every datagram counted as mirrored")
    assert svc.hist.snapshot()["count"] == sent
    assert spy.overlaps == [], "two transactions wrote one entry at once"
    assert spy.max_txns >= 2, "writes for different IKE SAs never overlapped"
    assert spy.txns < sent, "no datagram shared a transaction"
    assert svc.counts["write_errors"] == 0 and svc.counts["fenced"] == 0


def test_a_failed_write_is_retried_and_its_datagrams_counted_once_written(etcd: Etcd, relay: Any) -> None:
    spy = SpyEtcd(etcd, delay=0.0, fail=2)
    svc, _charon, send = relay(spy)
    a = ike_id(0x71)
    msgs = [ike_add(a), ike_update(a), mid(a, 1)]
    for m in msgs:
        send(m)
    wait_until(lambda: stored(etcd, a) == msgs, 5, "the entry written after the failures")
    assert svc.counts["write_errors"] == 2
    wait_until(lambda: svc.counts["mirrored"] == 3, 5, "the datagrams counted once in etcd")
    assert svc.hist.snapshot()["count"] == 3
    assert svc.active


def test_forget_child_is_written_by_the_relay(etcd: Etcd, relay: Any) -> None:
    spy = SpyEtcd(etcd, delay=0.0)
    svc, _charon, send = relay(spy)
    a = ike_id(0x72)
    msgs = [ike_add(a), ike_update(a), child_add(a, 0xC2000001), child_add(a, 0xC2000002)]
    for m in msgs:
        send(m)
    wait_until(lambda: stored(etcd, a) == msgs, 5, "the entry with both CHILD_SAs")
    assert svc.forget_child(ha.ike_spis(a), 0xC2000001)
    wait_until(lambda: stored(etcd, a) == [msgs[0], msgs[1], msgs[3]], 5, "the rekeyed CHILD_SA gone from etcd")
