"""Hotspot migration and consolidation as the controller carries them out."""

from __future__ import annotations

import numpy as np

from protego.provisioning.controller import Provisioner
from protego.provisioning.nodes import NodeState
from protego.provisioning.packing import best_fit_decreasing
from protego.provisioning.params import NodeLatencies, ProvisioningParams


def _placed(node_of: list[int], booted: int, boot_min: int = 5) -> Provisioner:
    prov = Provisioner(len(node_of), ProvisioningParams(), NodeLatencies(boot_min=boot_min))
    prov.set_reserve(booted, 0, already_booted=True)
    prov.node_of = np.array(node_of, dtype=np.int64)
    for node in sorted(set(node_of)):
        prov.pool.activate(node)
    return prov


def test_hotspot_moves_the_largest_tunnel_to_the_best_fit_node() -> None:
    # node 0: 0.3+0.3+0.2+0.15 = 0.95 > 0.9; node 1 at 0.55 (room 0.35), node 2 at 0.65
    # (room 0.25, too small for 0.3). One tunnel (the first 0.3) must go, to node 1.
    alpha = np.array([0.3, 0.3, 0.2, 0.15, 0.3, 0.25, 0.3, 0.3, 0.05])
    node_of = [0, 0, 0, 0, 1, 1, 2, 2, 2]
    prov = _placed(node_of, booted=4)
    beta_before = prov.beta(alpha)
    assert np.allclose(beta_before[:3], [0.95, 0.55, 0.65])
    step = prov.migrate_hotspots(alpha, now=1)
    assert step.migrations == 1 and step.activated == 0
    assert prov.node_of[0] == 1
    assert prov.beta(alpha).max() <= 0.9 + 1e-12


def test_an_inactive_node_is_activated_when_nothing_fits() -> None:
    # node 0 at 1.2: excess 0.3 needs two tunnels (one 0.3 is not > 0.3); node 1 at 0.85
    # has no room, so node 2 (inactive) is activated and takes both.
    alpha = np.array([0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.25])
    prov = _placed([0, 0, 0, 0, 1, 1, 1], booted=3)
    step = prov.migrate_hotspots(alpha, now=1)
    assert step.migrations == 2 and step.activated == 1 and step.boots == 0
    assert prov.pool.state(2) is NodeState.ACTIVE
    assert sorted(prov.node_of.tolist()) == [0, 0, 1, 1, 1, 2, 2]
    assert prov.beta(alpha).max() <= 0.9 + 1e-12


def test_a_shut_down_node_is_booted_and_the_tunnel_waits_for_it() -> None:
    alpha = np.array([0.3, 0.3, 0.2, 0.2])
    prov = _placed([0, 0, 0, 0], booted=1, boot_min=2)
    step = prov.migrate_hotspots(alpha, now=1)
    assert step.migrations == 0 and step.boots == 1
    step = prov.migrate_hotspots(alpha, now=2)  # still booting: no second boot
    assert step.migrations == 0 and step.boots == 0
    step = prov.migrate_hotspots(alpha, now=3)  # booted at 1 + 2
    assert step.migrations == 1 and step.activated == 1
    assert prov.beta(alpha).max() <= 0.9 + 1e-12


def test_consolidation_uses_bfd_bins_and_makes_empty_nodes_inactive() -> None:
    rng = np.random.default_rng(2)
    alpha = rng.uniform(0.0, 0.3, 60)
    prov = _placed(list(range(20)) * 3, booted=25)  # spread over 20 active nodes
    bins = best_fit_decreasing(alpha, 0.9).bins
    step = prov.consolidate(alpha, now=10)
    assert prov.active_nodes == bins < 20
    assert step.deactivated == 20 - bins
    assert prov.pool.count(NodeState.INACTIVE) == 25 - bins
    assert prov.beta(alpha).max() <= 0.9 + 1e-9
    # Reconsolidating the same demand moves nothing: bins are matched to their nodes.
    assert prov.consolidate(alpha, now=11).migrations == 0


def test_reserve_boots_and_shuts_down_only_spare_nodes() -> None:
    prov = _placed([0, 0, 1], booted=2, boot_min=5)
    assert prov.set_reserve(4, now=0) == 2
    assert prov.pool.count(NodeState.BOOTING) == 2
    prov.pool.tick(5)
    prov.set_reserve(1, now=5)  # two active nodes stay; both spare ones shut down
    assert prov.active_nodes == 2
    assert prov.pool.count(NodeState.INACTIVE) == 0
    assert prov.pool.count(NodeState.SHUTDOWN) == 2


def test_with_instant_boots_the_hotspot_is_relieved_at_once() -> None:
    alpha = np.array([0.3, 0.3, 0.2, 0.2])
    prov = _placed([0, 0, 0, 0], booted=1, boot_min=0)
    step = prov.migrate_hotspots(alpha, now=1)
    assert step.migrations == 1 and step.boots == 1 and step.activated == 1
    assert prov.active_nodes == 2
    # and the reserve (1 node) does not shut the new, active node down again
    prov.set_reserve(1, now=1)
    assert prov.active_nodes == 2
