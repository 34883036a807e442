"""GPN node states and their transitions (paper §5.2, "hierarchy of virtual machine").

    SHUTDOWN --boot--> BOOTING --(boot_min minutes)--> INACTIVE
    INACTIVE --activate--> ACTIVE   (immediate: "added almost instantly")
    ACTIVE --deactivate--> INACTIVE          INACTIVE --shut_down--> SHUTDOWN

A zero boot latency makes booting immediate. Any other transition raises
:class:`~protego.errors.ConflictError`: the state machine is enforced, not advisory.
"""

from __future__ import annotations

import enum
import logging

from protego.errors import ConflictError
from protego.provisioning.params import NodeLatencies

log = logging.getLogger(__name__)


class NodeState(enum.Enum):
    SHUTDOWN = "shutdown"
    BOOTING = "booting"
    INACTIVE = "inactive"
    ACTIVE = "active"


class NodePool:
    """A growable pool of identical GPNs, all SHUTDOWN at first."""

    def __init__(self, latencies: NodeLatencies) -> None:
        self.latencies = latencies
        self._state: list[NodeState] = []
        self._ready_at: list[int] = []
        self._by_state: dict[NodeState, set[int]] = {s: set() for s in NodeState}

    def __len__(self) -> int:
        return len(self._state)

    def state(self, node: int) -> NodeState:
        return self._state[node]

    def nodes(self, state: NodeState) -> list[int]:
        return sorted(self._by_state[state])

    def count(self, state: NodeState) -> int:
        return len(self._by_state[state])

    @property
    def booted(self) -> int:
        """Nodes counted against the reservation: active, inactive or booting."""
        return sum(self.count(s) for s in NodeState if s is not NodeState.SHUTDOWN)

    def _set(self, node: int, state: NodeState) -> None:
        self._by_state[self._state[node]].discard(node)
        self._state[node] = state
        self._by_state[state].add(node)

    def _expect(self, node: int, *allowed: NodeState) -> None:
        if self._state[node] not in allowed:
            names = "/".join(s.value for s in allowed)
            raise ConflictError(f"node {node} is {self._state[node].value}, expected {names}")

    def _shutdown_node(self) -> int:
        spare = self._by_state[NodeState.SHUTDOWN]
        if spare:
            return min(spare)
        self._state.append(NodeState.SHUTDOWN)
        self._ready_at.append(0)
        node = len(self._state) - 1
        self._by_state[NodeState.SHUTDOWN].add(node)
        return node

    def boot(self, now: int) -> int:
        """Start one shut-down node; it becomes INACTIVE after the boot latency."""
        node = self._shutdown_node()
        if self.latencies.boot_min == 0:
            self._set(node, NodeState.INACTIVE)
        else:
            self._set(node, NodeState.BOOTING)
            self._ready_at[node] = now + self.latencies.boot_min
        log.debug("node %d: boot at minute %d -> %s", node, now, self._state[node].value)
        return node

    def add_inactive(self) -> int:
        """A node that is already booted (the steady state before the trace starts)."""
        node = self._shutdown_node()
        self._set(node, NodeState.INACTIVE)
        return node

    def activate(self, node: int) -> None:
        self._expect(node, NodeState.INACTIVE)
        self._set(node, NodeState.ACTIVE)

    def deactivate(self, node: int) -> None:
        self._expect(node, NodeState.ACTIVE)
        self._set(node, NodeState.INACTIVE)

    def shut_down(self, node: int) -> None:
        self._expect(node, NodeState.INACTIVE)
        self._set(node, NodeState.SHUTDOWN)

    def tick(self, now: int) -> None:
        """Complete every pending transition whose latency has elapsed by ``now``."""
        for node in list(self._by_state[NodeState.BOOTING]):
            if self._ready_at[node] <= now:
                self._set(node, NodeState.INACTIVE)
