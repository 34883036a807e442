"""The reservation schedule: sliding window (paper) and time-of-day (beyond the paper)."""

from __future__ import annotations

import numpy as np
import pytest

from protego.errors import ConfigError
from protego.provisioning.params import ProvisioningParams
from protego.provisioning.reserve import DemandModel, reservation_schedule


def test_whole_day_window_gives_one_constant_reserve() -> None:
    rng = np.random.default_rng(0)
    alpha = rng.uniform(0, 0.3, (1440, 50))
    schedule = reservation_schedule(alpha, ProvisioningParams())
    assert schedule.min() == schedule.max() > 0


def test_sliding_window_follows_the_trailing_measurements() -> None:
    # 20 tunnels: 0.05 each in the first 120 minutes, 0.25 in the next 120. Window 60,
    # recomputed every 60: minute 0 wraps to the high end of the trace.
    alpha = np.concatenate([np.full((120, 20), 0.05), np.full((120, 20), 0.25)])
    params = ProvisioningParams(window_min=60, reserve_every_min=60)
    schedule = reservation_schedule(alpha, params)
    low, high = 2, 6  # C = ⌈20·0.05⌉ = 1 → ⌈1/0.9⌉ = 2;  C = 5 → ⌈5/0.9⌉ = 6
    assert schedule[:60].tolist() == [high] * 60       # window = minutes 180..239
    assert schedule[60:180].tolist() == [low] * 120    # windows inside the low part
    assert schedule[180:].tolist() == [high] * 60


def _lockstep_day(tunnels: int = 40) -> np.ndarray:
    """Perfectly correlated tunnels: all at 0.3 from 12:00 to 14:00, 0.03 otherwise."""
    alpha = np.full((1440, tunnels), 0.03)
    alpha[720:840] = 0.3
    return alpha


def test_independence_assumption_under_reserves_for_correlated_tunnels() -> None:
    alpha = _lockstep_day()
    params = ProvisioningParams(epsilon=0.05)
    schedule = reservation_schedule(alpha, params, DemandModel.INDEPENDENT)
    # Each tunnel is high 1/12 of the day; summed as if independent, 40 such tunnels
    # are rarely all high, so C is far below the real 12-node peak:
    aggregate = alpha.sum(axis=1)
    assert (schedule * params.T_H).max() < aggregate.max() / 2
    # and the aggregate exceeds the usable reserve for two hours, not 5 % of the day.
    assert np.mean(aggregate > schedule * params.T_H) == pytest.approx(120 / 1440)


def test_time_of_day_reserve_follows_the_correlated_peak_ahead_of_time() -> None:
    alpha = _lockstep_day()
    params = ProvisioningParams(epsilon=0.05)
    schedule = reservation_schedule(alpha, params, DemandModel.TIME_OF_DAY,
                                    bucket_min=60, lead_min=6)
    peak = int(np.ceil(12 / 0.9))     # C = 12 nodes in the busy hours
    quiet = int(np.ceil(2 / 0.9))     # C = ⌈40 · 0.03⌉ = 2 otherwise
    assert schedule[720:840].min() == peak  # covered for the whole peak...
    assert schedule[714:720].tolist() == [peak] * 6  # ...booted 6 minutes ahead
    assert schedule[:714].max() == quiet and schedule[846:].max() == quiet
    assert not np.any(alpha.sum(axis=1) > schedule * params.T_H + 1e-9)


def test_bad_schedule_parameters() -> None:
    with pytest.raises(ConfigError, match="bucket_min"):
        reservation_schedule(np.zeros((10, 2)), ProvisioningParams(), bucket_min=0)
    with pytest.raises(ConfigError, match="non-empty"):
        reservation_schedule(np.zeros((0, 2)), ProvisioningParams())
