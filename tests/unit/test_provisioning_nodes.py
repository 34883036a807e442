"""The node state machine and its latencies (paper §5.2)."""

from __future__ import annotations

import pytest

from protego.errors import ConfigError, ConflictError
from protego.provisioning.nodes import NodePool, NodeState
from protego.provisioning.params import NodeLatencies, ProvisioningParams


def test_a_shut_down_node_takes_the_boot_latency_to_become_inactive() -> None:
    pool = NodePool(NodeLatencies(boot_min=5))
    node = pool.boot(now=10)
    assert pool.state(node) is NodeState.BOOTING
    pool.tick(14)
    assert pool.state(node) is NodeState.BOOTING
    pool.tick(15)
    assert pool.state(node) is NodeState.INACTIVE
    pool.activate(node)  # inactive → active is immediate
    assert pool.state(node) is NodeState.ACTIVE
    assert pool.booted == 1


def test_zero_boot_latency_is_immediate_and_nodes_are_reused() -> None:
    pool = NodePool(NodeLatencies(boot_min=0))
    a = pool.boot(0)
    assert pool.state(a) is NodeState.INACTIVE
    pool.shut_down(a)
    assert pool.boot(1) == a  # a shut-down node is booted again before a new one is made
    assert len(pool) == 1


@pytest.mark.parametrize("action", ["activate", "deactivate", "shut_down"])
def test_illegal_transitions_are_refused(action: str) -> None:
    pool = NodePool(NodeLatencies(boot_min=3))
    node = pool.boot(0)  # BOOTING: none of these is allowed
    with pytest.raises(ConflictError, match=f"node {node} is booting"):
        getattr(pool, action)(node)


def test_an_active_node_cannot_be_shut_down_directly() -> None:
    pool = NodePool(NodeLatencies())
    node = pool.add_inactive()
    pool.activate(node)
    with pytest.raises(ConflictError):
        pool.shut_down(node)
    pool.deactivate(node)
    pool.shut_down(node)
    assert pool.count(NodeState.SHUTDOWN) == 1


def test_parameters_out_of_range_name_the_parameter() -> None:
    with pytest.raises(ConfigError, match="boot_min"):
        NodeLatencies(boot_min=-1)
    with pytest.raises(ConfigError, match="--th"):
        ProvisioningParams(T_H=1.5)
    with pytest.raises(ConfigError, match="--th"):
        ProvisioningParams(sigma=0.3, T_H=0.25)
    with pytest.raises(ConfigError, match="--eps"):
        ProvisioningParams(epsilon=0.0)
    with pytest.raises(ConfigError, match="sigma"):
        ProvisioningParams(sigma=1.2)
