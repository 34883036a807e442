"""Next-hop slots, packet marks and policy routing (pure).

The GIN keeps the VIP as the destination, so it cannot route ESP to a GPN by
destination: nftables sets a packet mark per *next hop* (a GPN's or the active
GMN's fabric address) and one ``ip rule fwmark M lookup T`` per next hop sends the
packet to a table whose only route is ``default via <next hop>``.

Everything lives in a reserved range, so the agent reads back and removes only
its own rules and routes:

* slot ``s`` in ``1..MAX_SLOT``;
* mark ``MARK_BASE + s`` (mask ``0xffffffff``);
* routing table ``TABLE_BASE + s``; rule priority ``PRIO_BASE + s``.

Slots are sticky: a next hop keeps its slot as long as it is wanted, so moving an
SPI never renumbers other next hops (:func:`assign_slots`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from protego.errors import DataplaneError

MARK_BASE = 0x50470000  # "PG"
MARK_MASK = 0xFFFFFFFF
TABLE_BASE = 7000
PRIO_BASE = 7000
MAX_SLOT = 250


def mark_of(slot: int) -> int:
    return MARK_BASE + slot


def is_our_table(table: int) -> bool:
    return TABLE_BASE < table <= TABLE_BASE + MAX_SLOT


def is_our_prio(prio: int) -> bool:
    return PRIO_BASE < prio <= PRIO_BASE + MAX_SLOT


@dataclass(frozen=True, order=True)
class PolicyRoute:
    """One next hop: rule ``fwmark mark lookup table pref prio`` + ``default via addr``."""

    slot: int
    addr: str

    @property
    def mark(self) -> int:
        return mark_of(self.slot)

    @property
    def table(self) -> int:
        return TABLE_BASE + self.slot

    @property
    def prio(self) -> int:
        return PRIO_BASE + self.slot


def assign_slots(installed: Mapping[str, int], wanted: Iterable[str]) -> dict[str, int]:
    """Sticky slot assignment: keep installed slots of wanted next hops; give new
    next hops the lowest slots not in use by *any* installed entry (stale ones are
    removed only after the nft batch no longer references them)."""
    wanted_set = sorted(set(wanted))
    out = {a: s for a, s in installed.items() if a in wanted_set}
    used = set(installed.values())
    free = (s for s in range(1, MAX_SLOT + 1) if s not in used)
    for addr in wanted_set:
        if addr not in out:
            try:
                out[addr] = next(free)
            except StopIteration:
                raise DataplaneError(f"no free next-hop slot for {addr} ({MAX_SLOT} in use)") from None
    return out


def desired_routes(slots: Mapping[str, int]) -> set[PolicyRoute]:
    return {PolicyRoute(s, a) for a, s in slots.items()}


@dataclass(frozen=True)
class RoutePlan:
    add: tuple[PolicyRoute, ...]  # before the nft batch
    remove: tuple[PolicyRoute, ...]  # after the nft batch


def plan_routes(installed: set[PolicyRoute], desired: set[PolicyRoute]) -> RoutePlan:
    wanted_slots = {p.slot for p in desired}
    stale = {p for p in installed if p.slot not in wanted_slots}
    return RoutePlan(tuple(sorted(desired - installed)), tuple(sorted(stale)))
