"""Replay a throughput trace through the provisioning controller (paper §7.4).

Causality: the placement used in minute t was decided from the measurements up to
minute t − 1. In every minute the simulator

1. scores minute t: on each GPN whose tunnels demand more than its capacity, the
   tunnels above their max-min fair share are violated for that minute;
2. hands the controller the measurement α(t): at a consolidation point (every
   ``consolidation_min`` minutes) it repacks everything with Best Fit Decreasing,
   otherwise it migrates tunnels off hotspots; the result holds from minute t + 1;
3. applies the reservation for minute t + 1 (boots or shuts down spare nodes).

The trace is treated as a day that repeats: the initial placement is a BFD of the
last minute, and the reservation window wraps around.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from protego.errors import ConfigError
from protego.provisioning.controller import Provisioner
from protego.provisioning.params import NodeLatencies, ProvisioningParams
from protego.provisioning.reserve import DemandModel, reservation_schedule
from protego.sim.metrics import (
    fair_share_violations,
    guarantee_percentile,
    resource_saving,
    tunnel_guarantees,
)
from protego.sim.trace import Trace

log = logging.getLogger(__name__)

DEFAULT_INTERVALS = (3, 5, 10, 30, 60)


@dataclass(frozen=True)
class SimConfig:
    gpn_gbps: float = 5.0
    max_tunnel_gbps: float = 1.5
    th: float = 0.9
    eps: float = 0.05
    intervals: tuple[int, ...] = DEFAULT_INTERVALS
    demand_model: DemandModel = DemandModel.INDEPENDENT
    window_min: int = 1440
    reserve_every_min: int = 60
    bucket_min: int = 60
    boot_min: int = 5
    units_per_node: int = 100

    def __post_init__(self) -> None:
        if not self.gpn_gbps > 0:
            raise ConfigError(f"--gpn-gbps must be > 0, got {self.gpn_gbps:g}")
        if not self.max_tunnel_gbps > 0:
            raise ConfigError(f"--max-tunnel-gbps must be > 0, got {self.max_tunnel_gbps:g}")
        if self.max_tunnel_gbps >= self.gpn_gbps:
            raise ConfigError(f"--max-tunnel-gbps ({self.max_tunnel_gbps:g}) must be below "
                              f"--gpn-gbps ({self.gpn_gbps:g}): a tunnel must fit on one GPN")
        if not self.intervals:
            raise ConfigError("--intervals must list at least one consolidation interval")
        for k in self.intervals:
            if k < 1:
                raise ConfigError(f"--intervals: consolidation interval {k} must be >= 1 minute")
        self.params()  # validates th, eps and the rest

    @property
    def sigma(self) -> float:
        return self.max_tunnel_gbps / self.gpn_gbps

    def params(self) -> ProvisioningParams:
        return ProvisioningParams(sigma=self.sigma, T_H=self.th, epsilon=self.eps,
                                  units_per_node=self.units_per_node,
                                  window_min=self.window_min,
                                  reserve_every_min=self.reserve_every_min)


@dataclass(frozen=True)
class IntervalResult:
    consolidation_min: int
    active_capacity_gbps: float
    guarantee_p99_pct: float
    saving_pct: float
    migrations: int
    boots: int
    violation_minutes: npt.NDArray[np.int64] = field(repr=False)
    active_nodes: npt.NDArray[np.int64] = field(repr=False)


@dataclass(frozen=True)
class SimResult:
    tunnels: int
    minutes: int
    gpn_gbps: float
    max_tunnel_gbps: float
    demand_model: DemandModel
    reserved: npt.NDArray[np.int64] = field(repr=False)
    aggregate_gbps: npt.NDArray[np.float64] = field(repr=False)
    intervals: tuple[IntervalResult, ...]

    @property
    def reserved_nodes(self) -> int:
        return int(self.reserved.max())

    @property
    def mean_reserved_capacity_gbps(self) -> float:
        return float(self.reserved.mean()) * self.gpn_gbps

    @property
    def mean_throughput_gbps(self) -> float:
        return float(self.aggregate_gbps.mean())

    def minutes_over_reserve(self, t_h: float) -> int:
        """Minutes in which the aggregate demand exceeds T_H × the reserved capacity:
        how often the reserve itself, not the placement, was too small."""
        usable = self.reserved * self.gpn_gbps * t_h
        return int(np.count_nonzero(self.aggregate_gbps > usable + 1e-9))


def _violations(alpha_t: npt.NDArray[np.float64], node_of: npt.NDArray[np.int64],
                nodes: int) -> npt.NDArray[np.int64]:
    """Indices of the tunnels violated in one minute (node capacity 1)."""
    beta = np.bincount(node_of, weights=alpha_t, minlength=nodes)
    over = np.flatnonzero(beta > 1.0 + 1e-12)
    if over.size == 0:
        return np.empty(0, dtype=np.int64)
    hit: list[npt.NDArray[np.int64]] = []
    for j in over.tolist():
        members = np.flatnonzero(node_of == j)
        hit.append(members[fair_share_violations(alpha_t[members], 1.0)])
    return np.concatenate(hit)


def simulate_interval(alpha: npt.NDArray[np.float64], reserve: npt.NDArray[np.int64],
                      config: SimConfig, consolidation_min: int) -> IntervalResult:
    """One replay of the whole trace with one consolidation interval."""
    minutes, tunnels = alpha.shape
    prov = Provisioner(tunnels, config.params(), NodeLatencies(boot_min=config.boot_min))
    prov.set_reserve(int(reserve[0]), 0, already_booted=True)
    prov.consolidate(alpha[-1], 0)
    violation_minutes = np.zeros(tunnels, dtype=np.int64)
    active = np.zeros(minutes, dtype=np.int64)
    migrations = boots = 0
    for t in range(minutes):
        active[t] = prov.active_nodes
        hit = _violations(alpha[t], prov.node_of, len(prov.pool))
        if hit.size:
            violation_minutes[hit] += 1
        nxt = t + 1
        if nxt % consolidation_min == 0:
            step = prov.consolidate(alpha[t], nxt)
        else:
            step = prov.migrate_hotspots(alpha[t], nxt)
        migrations += step.migrations
        boots += step.boots + prov.set_reserve(int(reserve[nxt % minutes]), nxt)
    active_capacity = float(active.mean()) * config.gpn_gbps
    guarantees = tunnel_guarantees(violation_minutes, minutes)
    return IntervalResult(
        consolidation_min=consolidation_min,
        active_capacity_gbps=active_capacity,
        guarantee_p99_pct=100.0 * guarantee_percentile(guarantees, 99.0),
        saving_pct=100.0 * resource_saving(active_capacity, tunnels, config.max_tunnel_gbps),
        migrations=migrations,
        boots=boots,
        violation_minutes=violation_minutes,
        active_nodes=active,
    )


def simulate(trace: Trace, config: SimConfig) -> SimResult:
    """Replay ``trace`` once per consolidation interval of ``config``."""
    peak = float(trace.throughput_gbps.max())
    if peak > config.max_tunnel_gbps * (1 + 1e-9):
        tunnel = trace.tunnels[int(np.argmax(trace.throughput_gbps.max(axis=0)))]
        raise ConfigError(f"tunnel {tunnel!r} reaches {peak:g} Gbit/s, above "
                          f"--max-tunnel-gbps {config.max_tunnel_gbps:g}")
    alpha = np.minimum(trace.throughput_gbps / config.gpn_gbps, config.sigma)
    reserve = reservation_schedule(alpha, config.params(), config.demand_model,
                                   bucket_min=config.bucket_min,
                                   lead_min=config.boot_min + 1)
    results = []
    for k in config.intervals:
        res = simulate_interval(alpha, reserve, config, k)
        log.info("interval %d min: active %.2f Gbit/s, p99 guarantee %.2f %%, saving %.2f %%, "
                 "%d migrations", k, res.active_capacity_gbps, res.guarantee_p99_pct,
                 res.saving_pct, res.migrations)
        results.append(res)
    return SimResult(tunnels=len(trace.tunnels), minutes=trace.minutes,
                     gpn_gbps=config.gpn_gbps, max_tunnel_gbps=config.max_tunnel_gbps,
                     demand_model=config.demand_model, reserved=reserve,
                     aggregate_gbps=trace.aggregate_gbps, intervals=tuple(results))
