"""The metrics of paper §7.4, pure functions.

Violation: in a minute, a tunnel's guarantee is violated when the tunnels on its GPN
together demand more than the GPN's capacity *and* the tunnel demands more than its
max-min fair share (a completely fair scheduler serves every tunnel that asks for no
more than its fair share in full).

DailyBandwidthGuarantee(%) = (TotalAvailableMinutes − MinutesOfViolation) /
TotalAvailableMinutes, per tunnel. The 99th-percentile guarantee is the largest value g
such that at least 99 % of the tunnels have a guarantee >= g.

Resource saving = 1 − (mean active GPN capacity) / (2 · tunnels · max tunnel
throughput): one dedicated VM per tunnel sized for its peak, doubled for 1+1 HA.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from protego.errors import ConfigError


def fair_share_violations(demands: npt.ArrayLike, capacity: float) -> npt.NDArray[np.bool_]:
    """Which demands a max-min fair scheduler with ``capacity`` cannot serve in full."""
    d = np.asarray(demands, dtype=np.float64)
    violated = np.zeros(d.shape, dtype=bool)
    if d.size == 0 or float(d.sum()) <= capacity * (1 + 1e-12):
        return violated
    order = np.argsort(d, kind="stable")
    remaining = capacity
    for pos, idx in enumerate(order.tolist()):
        left = d.size - pos
        if d[idx] * left <= remaining:
            remaining -= float(d[idx])
            continue
        # Water level remaining/left is below this demand and every larger one.
        violated[order[pos:]] = True
        break
    return violated


def tunnel_guarantees(violation_minutes: npt.ArrayLike, minutes: int) -> npt.NDArray[np.float64]:
    """Per-tunnel daily bandwidth guarantee, as a fraction."""
    if minutes <= 0:
        raise ConfigError(f"minutes must be positive, got {minutes}")
    v = np.asarray(violation_minutes, dtype=np.float64)
    result: npt.NDArray[np.float64] = (minutes - v) / minutes
    return result


def guarantee_percentile(guarantees: npt.ArrayLike, pct: float = 99.0) -> float:
    """The largest g met (>=) by at least ``pct`` % of the tunnels."""
    g = np.sort(np.asarray(guarantees, dtype=np.float64))[::-1]
    if g.size == 0:
        raise ConfigError("no tunnels")
    if not 0.0 < pct <= 100.0:
        raise ConfigError(f"percentile must be in (0, 100], got {pct:g}")
    need = math.ceil(pct / 100.0 * g.size - 1e-9)
    return float(g[max(need, 1) - 1])


def resource_saving(active_capacity_gbps: float, tunnels: int, max_tunnel_gbps: float) -> float:
    """Saving versus one dedicated VM per tunnel with 1+1 HA, as a fraction."""
    dedicated = 2.0 * tunnels * max_tunnel_gbps
    if dedicated <= 0:
        raise ConfigError("dedicated capacity must be positive")
    return 1.0 - active_capacity_gbps / dedicated
