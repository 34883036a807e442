"""Elastic provisioning of the GPN pool (paper §5): pure algorithms, no I/O.

- :mod:`.params`: Table 1 parameters (σ, T_H, ε, τ) and node activation latencies.
- :mod:`.distribution`: usage histograms U_i, FFT convolution Y, reserve C and ⌈C/T_H⌉.
- :mod:`.packing`: Best Fit, Best Fit Decreasing, hotspot detection and migration choice.
- :mod:`.nodes`: the active / inactive / shut-down node state machine.
- :mod:`.reserve`: the reserve minute by minute (paper's independent model, time-of-day).
- :mod:`.controller`: :class:`Provisioner`, the controller's decisions step by step.
"""

from protego.provisioning.controller import Provisioner, StepResult
from protego.provisioning.distribution import (
    convolve_all,
    quantize,
    reserve_for_window,
    reserved_capacity,
    reserved_nodes,
    usage_distributions,
)
from protego.provisioning.nodes import NodePool, NodeState
from protego.provisioning.packing import (
    Packing,
    best_fit_decreasing,
    best_fit_node,
    hotspots,
    select_migrations,
)
from protego.provisioning.params import NodeLatencies, ProvisioningParams
from protego.provisioning.reserve import DemandModel, reservation_schedule

__all__ = [
    "DemandModel",
    "NodeLatencies",
    "NodePool",
    "NodeState",
    "Packing",
    "Provisioner",
    "ProvisioningParams",
    "StepResult",
    "best_fit_decreasing",
    "best_fit_node",
    "convolve_all",
    "hotspots",
    "quantize",
    "reservation_schedule",
    "reserve_for_window",
    "reserved_capacity",
    "reserved_nodes",
    "select_migrations",
    "usage_distributions",
]
