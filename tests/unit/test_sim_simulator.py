"""The simulator on hand-made traces whose answers can be worked out by hand.

Four tunnels on GPNs of 5 Gbit/s; 1.25 Gbit/s is 0.25 of a GPN, 1.5 Gbit/s is 0.3.
With T_H = 1.0 the four fit one GPN at 1.25 each. Tunnel 3 rises to 1.5 Gbit/s for a
few minutes: its GPN is then asked for 1.05 > 1, and under a fair scheduler only
tunnel 3 (the one above the fair share) is violated, in every minute it stays there.
"""

from __future__ import annotations

import numpy as np
import pytest

from protego.errors import ConfigError
from protego.sim.simulator import SimConfig, simulate
from protego.sim.trace import Trace


def _trace(high_minutes: list[int], minutes: int = 10) -> Trace:
    tp = np.full((minutes, 4), 1.25)
    tp[high_minutes, 3] = 1.5
    return Trace(("t0", "t1", "t2", "t3"), tp)


def test_hotspot_relieved_from_a_spare_inactive_node() -> None:
    # Tunnel 3 high in minutes 5–6. U_3 puts 0.2 on 30 units, so Pr(Y > 1 node) = 0.2 >
    # eps → C = 2, reserve ⌈2/1.0⌉ = 2: one inactive spare. Minute 5 is violated (the
    # placement came from minute 4); after measuring minute 5 tunnel 3 moves to the
    # spare, so minute 6 is not. Active: 1 node in minutes 0–5, 2 in 6–9.
    config = SimConfig(th=1.0, eps=0.05, intervals=(100, 8, 3))
    result = simulate(_trace([5, 6]), config)
    assert result.reserved_nodes == 2
    never, every8, every3 = result.intervals
    assert never.violation_minutes.tolist() == [0, 0, 0, 1]
    assert never.guarantee_p99_pct == pytest.approx(90.0)  # 4 tunnels: the worst one
    assert never.active_nodes.tolist() == [1] * 6 + [2] * 4
    assert never.active_capacity_gbps == pytest.approx(7.0)
    assert never.saving_pct == pytest.approx(100 * (1 - 7.0 / (2 * 4 * 1.5)))
    assert never.migrations == 1
    # Consolidating at minute 8 (from minute 7's demand, all 1.25) packs all four onto
    # one node again: tunnel 3 moves back, the spare goes inactive.
    assert every8.violation_minutes.tolist() == [0, 0, 0, 1]
    assert every8.active_nodes.tolist() == [1] * 6 + [2] * 2 + [1] * 2
    assert every8.migrations == 2
    # Every 3 minutes: at minute 6 BFD of minute 5's demand (0.3, 0.25 ×3, T_H 1.0)
    # needs two nodes; tunnel 2 is the one left over; at minute 9 one node again.
    assert every3.violation_minutes.tolist() == [0, 0, 0, 1]
    assert every3.active_nodes.tolist() == [1] * 6 + [2] * 3 + [1]
    assert every3.active_capacity_gbps == pytest.approx(6.5)
    assert every3.migrations == 2


def test_no_spare_node_means_waiting_for_a_boot() -> None:
    # Tunnel 3 high in minutes 5–8; eps = 0.5 tolerates Pr(Y > 1 node) = 0.4, so the
    # reserve is one node and the relief has to be booted (2 minutes): booted after
    # measuring minute 5 (at 6), ready at 8. Minutes 5, 6, 7 are violated.
    config = SimConfig(th=1.0, eps=0.5, intervals=(100,), boot_min=2)
    result = simulate(_trace([5, 6, 7, 8]), config)
    assert result.reserved_nodes == 1
    (run,) = result.intervals
    assert run.violation_minutes.tolist() == [0, 0, 0, 3]
    assert run.guarantee_p99_pct == pytest.approx(70.0)
    assert run.active_nodes.tolist() == [1] * 8 + [2] * 2
    assert run.boots == 1 and run.migrations == 1


def test_a_trace_that_always_fits_is_never_violated() -> None:
    tp = np.full((30, 3), 1.5)  # 3 × 0.3 = 0.9 = T_H: one node, never a hotspot
    result = simulate(Trace(("a", "b", "c"), tp), SimConfig(intervals=(1, 7)))
    for run in result.intervals:
        assert run.guarantee_p99_pct == 100.0
        assert run.active_capacity_gbps == pytest.approx(5.0)
        assert run.migrations == 0
    # Y is a point mass at 0.9 node: C = 1 node, and the paper reserves ⌈C / T_H⌉ = 2.
    assert result.reserved_nodes == 2


def test_parameters_out_of_range_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="--gpn-gbps"):
        SimConfig(gpn_gbps=0)
    with pytest.raises(ConfigError, match="--max-tunnel-gbps"):
        SimConfig(max_tunnel_gbps=-1)
    with pytest.raises(ConfigError, match="--max-tunnel-gbps .* must be below --gpn-gbps"):
        SimConfig(max_tunnel_gbps=6)
    with pytest.raises(ConfigError, match="--intervals"):
        SimConfig(intervals=(0,))
    with pytest.raises(ConfigError, match="--eps"):
        SimConfig(eps=1.0)
    with pytest.raises(ConfigError, match="--th"):
        SimConfig(th=0.2)


def test_a_trace_above_the_tunnel_maximum_is_refused() -> None:
    with pytest.raises(ConfigError, match="tunnel 't3' reaches 1.5 Gbit/s, above --max"):
        simulate(_trace([5]), SimConfig(max_tunnel_gbps=1.4))


def test_on_the_synthetic_day_only_the_time_of_day_reserve_keeps_its_promise() -> None:
    # Pr(Y > C) <= eps is the paper's promise. With diurnally correlated tunnels the
    # independent model's C is exceeded far more often than eps; hour-conditioned
    # distributions keep the aggregate under T_H × reserve in (almost) every minute.
    from protego.provisioning.reserve import DemandModel
    from protego.sim.synthetic import synthetic_trace

    trace = synthetic_trace()
    over = {}
    for model in DemandModel:
        config = SimConfig(intervals=(60,), demand_model=model)
        result = simulate(trace, config)
        over[model] = result.minutes_over_reserve(config.th) / result.minutes
    assert over[DemandModel.INDEPENDENT] > 0.05
    assert over[DemandModel.TIME_OF_DAY] <= 0.05
