"""The provisioning controller's decisions (paper §5.3–5.4), free of I/O.

:class:`Provisioner` owns a placement (tunnel → node) and a :class:`NodePool`. The
caller feeds it measured CPU usages α_i once per measurement interval τ and tells it
when to consolidate; it answers with migrations and node state changes. The simulator
drives it from a trace; a live GMN agent would drive it from GPN reports and carry the
migrations out by IKE rekeying.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protego.errors import ConfigError
from protego.provisioning.nodes import NodePool, NodeState
from protego.provisioning.packing import (
    FIT_TOLERANCE,
    best_fit_decreasing,
    best_fit_node,
    hotspots,
    select_migrations,
)
from protego.provisioning.params import NodeLatencies, ProvisioningParams

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class StepResult:
    """What one controller step did."""

    migrations: int
    activated: int
    deactivated: int
    boots: int


class Provisioner:
    """Placement, hotspot migration, BFD consolidation and reservation for n tunnels."""

    def __init__(self, tunnels: int, params: ProvisioningParams,
                 latencies: NodeLatencies | None = None) -> None:
        if tunnels < 1:
            raise ConfigError(f"need at least one tunnel, got {tunnels}")
        self.params = params
        self.pool = NodePool(latencies or NodeLatencies())
        self.node_of = np.full(tunnels, -1, dtype=np.int64)
        self.reserve_target = 0

    # -- views -----------------------------------------------------------------------
    def beta(self, alpha: FloatArray) -> FloatArray:
        """β_j: the summed usage of the tunnels on every node (0 for empty nodes)."""
        beta: FloatArray = np.bincount(self.node_of, weights=alpha,
                                       minlength=len(self.pool)).astype(np.float64)
        return beta

    def _mask(self, state: NodeState) -> npt.NDArray[np.bool_]:
        mask = np.zeros(len(self.pool), dtype=bool)
        mask[self.pool.nodes(state)] = True
        return mask

    @property
    def active_nodes(self) -> int:
        return self.pool.count(NodeState.ACTIVE)

    def _check_alpha(self, alpha: FloatArray) -> None:
        if alpha.shape != self.node_of.shape:
            raise ConfigError(f"expected {self.node_of.size} usages, got shape {alpha.shape}")
        if float(alpha.max(initial=0.0)) > self.params.sigma + FIT_TOLERANCE:
            raise ConfigError(f"a tunnel's usage exceeds sigma={self.params.sigma:g}")

    # -- reservation -----------------------------------------------------------------
    def set_reserve(self, target: int, now: int, already_booted: bool = False) -> int:
        """Keep at least ``target`` nodes booted (active + inactive + booting).

        Boots shut-down nodes when short; shuts down surplus *inactive* nodes (never an
        active one). ``already_booted`` creates the missing nodes as INACTIVE at once
        (the steady state before a simulation starts). Returns the boots started.
        """
        self.reserve_target = target
        boots = 0
        while self.pool.booted < target:
            if already_booted:
                self.pool.add_inactive()
            else:
                self.pool.boot(now)
                boots += 1
        surplus = self.pool.booted - target
        for node in reversed(self.pool.nodes(NodeState.INACTIVE)):
            if surplus <= 0:
                break
            self.pool.shut_down(node)
            surplus -= 1
        return boots

    def _request_capacity(self, nodes_needed: int, now: int) -> int:
        """Boot enough nodes so that ``nodes_needed`` more will be there soon."""
        pending = self.pool.count(NodeState.BOOTING)
        boots = 0
        for _ in range(max(0, nodes_needed - pending)):
            self.pool.boot(now)
            boots += 1
        if boots:
            log.info("minute %d: no inactive node left, booting %d", now, boots)
        return boots

    # -- placement -------------------------------------------------------------------
    def consolidate(self, alpha: FloatArray, now: int) -> StepResult:
        """Best Fit Decreasing over all tunnels; empty active nodes become inactive.

        The new bins are matched to nodes so that as many tunnels as possible stay where
        they are (the bins' identities are arbitrary, only the grouping matters). If the
        booted pool is too small, the excess bins' tunnels are spread over the emptiest
        bins and nodes are booted; hotspot migration moves them once the nodes are up.
        """
        alpha = np.asarray(alpha, dtype=np.float64)
        self._check_alpha(alpha)
        t_h = self.params.T_H
        self.pool.tick(now)
        packing = best_fit_decreasing(alpha, t_h)
        bin_of = np.asarray(packing.bin_of, dtype=np.int64)
        usable = self.pool.nodes(NodeState.ACTIVE) + self.pool.nodes(NodeState.INACTIVE)
        boots = 0
        bins = packing.bins
        if bins > len(usable) and self.pool.latencies.boot_min == 0:
            for _ in range(bins - len(usable)):
                usable.append(self.pool.boot(now))  # instantly INACTIVE
                boots += 1
        if bins > len(usable):
            keep = len(usable)
            if keep == 0:
                # Bootstrapping an empty pool: there is nothing to place on but the
                # tunnels must go somewhere, so one node is taken as already booted.
                usable = [self.pool.add_inactive()]
                keep = 1
            load = np.bincount(bin_of, weights=alpha, minlength=bins)[:keep].copy()
            for i in np.flatnonzero(bin_of >= keep).tolist():
                target = int(np.argmin(load))
                bin_of[i] = target
                load[target] += alpha[i]
            boots += self._request_capacity(bins - keep, now)
            bins = keep
        # Match bins to nodes by the number of tunnels they share, largest overlap first.
        overlap = Counter(zip(bin_of.tolist(), self.node_of.tolist()))
        node_for_bin: dict[int, int] = {}
        taken: set[int] = set()
        usable_set = set(usable)
        for (b, node), _ in sorted(overlap.items(), key=lambda kv: (-kv[1], kv[0])):
            if b in node_for_bin or node in taken or node not in usable_set:
                continue
            node_for_bin[b] = node
            taken.add(node)
        free = [n for n in self.pool.nodes(NodeState.ACTIVE) if n not in taken]
        free += [n for n in self.pool.nodes(NodeState.INACTIVE) if n not in taken]
        free.reverse()
        for b in range(bins):
            if b not in node_for_bin:
                node_for_bin[b] = free.pop()
        lookup = np.array([node_for_bin[b] for b in range(bins)], dtype=np.int64)
        new_node_of = lookup[bin_of]
        migrations = int(np.count_nonzero((new_node_of != self.node_of) & (self.node_of >= 0)))
        self.node_of = new_node_of
        used = set(lookup.tolist())
        activated = deactivated = 0
        for node in used:
            if self.pool.state(node) is NodeState.INACTIVE:
                self.pool.activate(node)
                activated += 1
        for node in self.pool.nodes(NodeState.ACTIVE):
            if node not in used:
                self.pool.deactivate(node)
                deactivated += 1
        log.debug("minute %d: consolidated %d tunnels onto %d nodes, %d migrations",
                  now, alpha.size, bins, migrations)
        return StepResult(migrations, activated, deactivated, boots)

    def migrate_hotspots(self, alpha: FloatArray, now: int) -> StepResult:
        """Relieve every node with β_j > T_H (paper §5.4, tunnel migration).

        From each hotspot the largest tunnels are moved, in decreasing α, until the
        moved sum exceeds β_j − T_H; each goes to the Best Fit active node; when none
        fits, an inactive node is activated; when there is none, one is booted and the
        tunnel waits for it (it is retried at every measurement) unless booting is
        instantaneous.
        """
        alpha = np.asarray(alpha, dtype=np.float64)
        self._check_alpha(alpha)
        t_h = self.params.T_H
        self.pool.tick(now)
        beta = self.beta(alpha)
        active = self._mask(NodeState.ACTIVE)
        migrations = activated = boots = 0
        unplaced = 0.0
        for j in hotspots(beta, t_h):
            members = np.flatnonzero(self.node_of == j)
            for k in select_migrations(alpha[members], t_h):
                tunnel = int(members[k])
                size = float(alpha[tunnel])
                candidates = active.copy()
                candidates[j] = False
                target = best_fit_node(beta, candidates, size, t_h)
                if target is None:
                    spare = self.pool.nodes(NodeState.INACTIVE)
                    if spare:
                        target = spare[0]
                    elif self.pool.latencies.boot_min == 0:
                        target = self.pool.boot(now)  # instantly INACTIVE
                        boots += 1
                    else:
                        unplaced += size
                        continue
                    self.pool.activate(target)
                    activated += 1
                    if target >= active.size:  # pool grew since the masks were built
                        grow = len(self.pool) - active.size
                        active = np.concatenate([active, np.zeros(grow, dtype=bool)])
                        beta = np.concatenate([beta, np.zeros(grow)])
                    active[target] = True
                self.node_of[tunnel] = target
                beta[j] -= size
                beta[target] += size
                migrations += 1
        if unplaced:
            boots += self._request_capacity(math.ceil(unplaced / t_h), now)
        return StepResult(migrations, activated, 0, boots)
