"""Where a tunnel's next SAs go: a pure placement policy.

The provisioning controller (paper §5) will replace :func:`choose_gpn`; until
then the policy is "a healthy GPN": the pinned target of a migration if there is
one, else where the tunnel already is (rekeys stay put), else the healthy GPN
carrying the fewest tunnels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from protego.errors import ProtegoError


class NoGpnError(ProtegoError):
    """No healthy GPN can take the tunnel."""


@dataclass(frozen=True)
class GpnView:
    name: str
    registered: bool  # its agent holds a lease in etcd
    healthy: bool  # the GIN has not declared it dead
    tunnels: int = 0
    draining: bool = False  # an operator is moving its tunnels off (protego gpn drain)

    @property
    def failed(self) -> bool:
        """Its tunnels must be recovered elsewhere (a draining GPN has not failed)."""
        return not (self.registered and self.healthy)

    @property
    def usable(self) -> bool:
        """New SAs may be placed here."""
        return self.registered and self.healthy and not self.draining


def choose_gpn(gpns: Mapping[str, GpnView], current: str | None = None, pinned: str | None = None) -> str:
    if pinned and pinned in gpns and gpns[pinned].usable:
        return pinned
    if current and current in gpns and gpns[current].usable:
        return current
    usable = sorted((g for g in gpns.values() if g.usable), key=lambda g: (g.tunnels, g.name))
    if not usable:
        raise NoGpnError("no healthy GPN is registered")
    return usable[0].name
