"""Policy-routing adapter (pyroute2): reads back and changes only Protego's own
rules and tables (see :mod:`protego.lb.policy`). Runs in the agent's own network
namespace (the agent is started inside it; no ``setns()``)."""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from protego.errors import DataplaneError
from protego.lb.policy import (
    MARK_MASK,
    PRIO_BASE,
    TABLE_BASE,
    PolicyRoute,
    is_our_prio,
    is_our_table,
)

log = logging.getLogger(__name__)


class RouteAdapter:
    def __init__(self, ipr: Any | None = None) -> None:
        self._ipr = ipr or IPRoute()

    def close(self) -> None:
        self._ipr.close()

    def read(self) -> set[PolicyRoute]:
        """Our (slot, next hop) pairs; a rule without its route (or vice versa) is
        reported with addr "" so the plan replaces it."""
        rules: dict[int, int] = {}
        for r in self._ipr.get_rules(family=socket.AF_INET):
            prio = r.get_attr("FRA_PRIORITY") or 0
            table = r.get_attr("FRA_TABLE") or r["table"]
            if is_our_prio(prio) and is_our_table(table):
                rules[prio - PRIO_BASE] = table
        out: set[PolicyRoute] = set()
        for slot, table in rules.items():
            addr = ""
            if table == TABLE_BASE + slot:
                for rt in self._ipr.get_routes(family=socket.AF_INET, table=table):
                    if rt["dst_len"] == 0 and rt.get_attr("RTA_GATEWAY"):
                        addr = rt.get_attr("RTA_GATEWAY")
            out.add(PolicyRoute(slot, addr))
        return out

    def add(self, pr: PolicyRoute) -> None:
        try:
            self._ipr.route("replace", dst="0.0.0.0/0", gateway=pr.addr, table=pr.table)
            try:
                self._ipr.rule("add", family=socket.AF_INET, fwmark=pr.mark, fwmask=MARK_MASK,
                               table=pr.table, priority=pr.prio)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
        except NetlinkError as exc:
            raise DataplaneError(f"policy route slot {pr.slot} via {pr.addr}: {exc}", exc.code) from exc
        log.info("policy route slot %d: fwmark 0x%x -> table %d via %s", pr.slot, pr.mark, pr.table, pr.addr)

    def remove(self, pr: PolicyRoute) -> None:
        try:
            for r in self._ipr.get_rules(family=socket.AF_INET):
                if (r.get_attr("FRA_PRIORITY") or 0) == pr.prio:
                    self._ipr.rule("del", family=socket.AF_INET, priority=pr.prio,
                                   table=r.get_attr("FRA_TABLE") or r["table"])
            self._ipr.flush_routes(table=pr.table, family=socket.AF_INET)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise DataplaneError(f"removing policy route slot {pr.slot}: {exc}", exc.code) from exc
        log.info("policy route slot %d (%s) removed", pr.slot, pr.addr or "?")

    def remove_all(self) -> int:
        n = 0
        for pr in sorted(self.read()):
            self.remove(pr)
            n += 1
        return n
