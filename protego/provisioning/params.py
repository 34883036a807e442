"""Parameters of the provisioning algorithm, named as in Table 1 of the paper.

All CPU quantities are normalised to one GPN: a node has capacity 1 and a tunnel's
CPU usage is its throughput divided by the GPN's throughput capacity (paper §5.2:
"all ESP packets with the same size consume the same amount of CPU resource").
"""

from __future__ import annotations

from dataclasses import dataclass

from protego.errors import ConfigError


@dataclass(frozen=True)
class ProvisioningParams:
    """Table 1 of the paper, plus the few knobs the paper leaves implicit.

    sigma:       maximum CPU usage of a tunnel (σ_i, the same for every tunnel here),
                 ``max_tunnel_gbps / gpn_gbps``; 0 < sigma < 1.
    T_H:         CPU utilisation threshold for hotspot detection; sigma < T_H <= 1.
    epsilon:     throughput guarantee violation tolerance ε; Pr(Y > C) <= ε.
    tau_min:     measurement interval τ of α_i, in minutes.
    units_per_node: resolution of the usage histograms U_i: one node is split into
                 this many equal CPU units (100 → 1 % of a GPN per bin).
    window_min:  length of the sliding measurement window from which U_i is built.
    reserve_every_min: how often the reserved node count is recomputed.
    """

    sigma: float = 0.3
    T_H: float = 0.9
    epsilon: float = 0.05
    tau_min: int = 1
    units_per_node: int = 100
    window_min: int = 1440
    reserve_every_min: int = 60

    def __post_init__(self) -> None:
        if not 0.0 < self.sigma < 1.0:
            raise ConfigError(
                f"sigma (max tunnel / GPN capacity) must be in (0, 1), got {self.sigma:g}"
            )
        if not 0.0 < self.T_H <= 1.0:
            raise ConfigError(f"T_H (--th) must be in (0, 1], got {self.T_H:g}")
        if self.T_H <= self.sigma:
            raise ConfigError(
                f"T_H (--th) must exceed sigma = max tunnel / GPN capacity "
                f"(paper §5.4: T_H > max α_i), got T_H={self.T_H:g} <= sigma={self.sigma:g}"
            )
        if not 0.0 < self.epsilon < 1.0:
            raise ConfigError(f"epsilon (--eps) must be in (0, 1), got {self.epsilon:g}")
        if self.tau_min < 1:
            raise ConfigError(f"tau_min must be >= 1 minute, got {self.tau_min}")
        if not 1 <= self.units_per_node <= 10_000:
            raise ConfigError(f"units_per_node must be in [1, 10000], got {self.units_per_node}")
        if self.window_min < 1:
            raise ConfigError(f"window_min must be >= 1, got {self.window_min}")
        if self.reserve_every_min < 1:
            raise ConfigError(f"reserve_every_min must be >= 1, got {self.reserve_every_min}")


@dataclass(frozen=True)
class NodeLatencies:
    """How long a node takes to become usable, by the state it starts from (paper §5.2).

    Inactive VMs are booted and under Protego's control: they are "added almost
    instantly", so INACTIVE → ACTIVE is immediate here. Shut-down VMs "take at least
    several minutes to be active": SHUTDOWN → INACTIVE takes ``boot_min`` minutes.
    """

    boot_min: int = 5

    def __post_init__(self) -> None:
        if self.boot_min < 0:
            raise ConfigError(f"boot_min (shut-down -> inactive latency) must be >= 0, "
                              f"got {self.boot_min}")
