"""The GMN's inbound SPIs (``GmnAgent._allocate_spi``), against a real etcd on loopback:
each one reserved in etcd (``spi/<vip>/<spi>``) before charon gets it, and one spare per
VIP reserved ahead in the background, so that the get_spi before a rekey's
CREATE_CHILD_SA request (a migration, a recovery) needs no etcd round trip; a removed
tenant's spare goes with the rest of its keys."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from protego.control.model import Tenant, tenant_key
from protego.gmn import plugin_protocol as pp
from protego.gmn import agent as gmn_agent
from protego.gmn.agent import GmnAgent
from protego.gmn.records import sa_key, spi_reservation_key
from protego.store.etcd import KV, Etcd
from protego.store.view import PrefixView
from tests.conftest import wait_until

VIP = "203.0.113.11"
ACME = KV(tenant_key("acme"), json.dumps(Tenant("acme", 1001, "10.1.0.0/24", VIP).to_json()).encode(), 1, 1, 1)


def _record_parsing(a: Any) -> None:
    """What GmnAgent's record readers (_parsed: tenants, tunnels, SA records) need."""
    import threading as _threading

    from protego.store.refused import RefusedPublisher, RefusedRecords

    a._parse_lock = _threading.Lock()
    a._parse_cache = {}
    a.refused = RefusedRecords("gmn", "gmn1")
    a._refused_pub = RefusedPublisher(a.refused, lambda _key, _report: None)



class CountingEtcd(Etcd):
    txns = 0

    def txn(self, *args: Any, **kw: Any) -> Any:  # type: ignore[override]
        CountingEtcd.txns += 1
        return super().txn(*args, **kw)


def _agent(etcd: Etcd) -> GmnAgent:
    """Only what the SPI allocation touches."""
    a = GmnAgent.__new__(GmnAgent)
    _record_parsing(a)
    a.etcd = etcd
    a.cfg = SimpleNamespace(node="gmn1")  # type: ignore[assignment]
    a._lease = SimpleNamespace(id=0)  # type: ignore[assignment]  # no lease: reservations stay
    a.view = PrefixView()
    a.view.on_snapshot(1, [ACME])
    a._stop = threading.Event()
    a._spi_lock = threading.Lock()
    a._spi_stash = {}
    a._spi_refilling = set()
    return a


def _get_spi() -> pp.GetSpi:
    return pp.GetSpi(src=pp.Host.parse("198.18.1.1"), dst=pp.Host.parse(VIP))


def _reserved(etcd: Etcd) -> set[int]:
    _rev, kvs = etcd.get_prefix(f"/protego/v1/spi/{VIP}/")
    assert all(kv.value == b"gmn1" for kv in kvs)
    return {int(kv.key.rsplit("/", 1)[1], 16) for kv in kvs}


def test_every_spi_is_reserved_and_the_next_one_comes_from_the_spare(etcd_loopback: list[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gmn_agent, "SPI_REFILL_DELAY_S", 0.05)
    etcd = CountingEtcd(etcd_loopback)
    try:
        etcd.delete_prefix("/protego/")
        a = _agent(etcd)
        first = a._allocate_spi(_get_spi(), set())
        assert first in _reserved(etcd) and first >= 0xC0000000
        wait_until(lambda: len(a._spi_stash.get(VIP, [])) == 1, 10, "the spare SPI was not reserved")
        spare = a._spi_stash[VIP][0][0]
        assert _reserved(etcd) == {first, spare} and spare != first
        CountingEtcd.txns = 0
        second = a._allocate_spi(_get_spi(), {first})
        assert second == spare and CountingEtcd.txns == 0  # no round trip before charon's request
        wait_until(lambda: len(a._spi_stash.get(VIP, [])) == 1, 10, "the spare SPI was not replaced")
        third_spare = a._spi_stash[VIP][0][0]
        assert len({first, second, third_spare}) == 3 and _reserved(etcd) == {first, second, third_spare}

        # a spare reserved under an older lease went with it: not used, a new one reserved
        a._spi_stash[VIP] = [(third_spare, 12345)]
        fourth = a._allocate_spi(_get_spi(), {first, second})
        assert fourth not in (first, second, third_spare) and fourth in _reserved(etcd)
        wait_until(lambda: len(a._spi_stash.get(VIP, [])) == 1, 10, "no spare after a lease change")

        # a spare that an SA record names (never this GMN's doing, but never a duplicate)
        named = a._spi_stash[VIP][0][0]
        a.view.on_snapshot(1, [ACME, KV(sa_key(VIP, named), b"{}", 1, 1, 1)])
        fifth = a._allocate_spi(_get_spi(), {first, second, fourth})
        assert fifth != named
        assert etcd.get(spi_reservation_key(VIP, fifth)) is not None

        # the tenant goes: its spare's reservation goes with it (no key of it is left)
        wait_until(lambda: len(a._spi_stash.get(VIP, [])) == 1, 10, "no spare after the fifth")
        spare = a._spi_stash[VIP][0][0]
        a.view.on_snapshot(2, [])
        a._release_spare_spis()
        assert VIP not in a._spi_stash and etcd.get(spi_reservation_key(VIP, spare)) is None
        # a refill that starts after its tenant went reserves nothing
        a._refill_spi_stash(VIP, set())
        wait_until(lambda: not a._spi_refilling, 10, "the refill did not end")
        assert VIP not in a._spi_stash and _reserved(etcd) == {first, second, third_spare, fourth, named, fifth}
    finally:
        wait_until(lambda: not a._spi_refilling, 10, "a refill still running")
        etcd.delete_prefix("/protego/")
        etcd.close()
