"""The synthetic trace: reproducible and calibrated to paper §7.4."""

from __future__ import annotations

import numpy as np
import pytest

from protego.errors import ConfigError
from protego.sim.synthetic import synthetic_trace
from protego.sim.trace import Trace


@pytest.fixture(scope="module")
def default_trace() -> Trace:
    return synthetic_trace()


def test_same_seed_same_trace_other_seed_other_trace(default_trace: Trace) -> None:
    again = synthetic_trace(seed=1)
    np.testing.assert_array_equal(again.throughput_gbps, default_trace.throughput_gbps)
    other = synthetic_trace(seed=2)
    assert not np.array_equal(other.throughput_gbps, default_trace.throughput_gbps)


def test_calibrated_to_section_7_4(default_trace: Trace) -> None:
    tp = default_trace.throughput_gbps
    assert tp.shape == (1440, 170)  # 170 tunnels, 24 h at 1-minute resolution
    assert float(tp.max()) == 1.5  # maximum tunnel throughput normalised to 1.5 Gbit/s
    assert float(tp.min()) >= 0.0
    assert float(tp.sum(axis=1).mean()) == pytest.approx(57.49, rel=1e-3)


def test_diurnal_heterogeneous_and_bursty(default_trace: Trace) -> None:
    tp = default_trace.throughput_gbps
    hourly = tp.sum(axis=1).reshape(24, 60).mean(axis=1)
    assert hourly.max() > 1.5 * hourly.min()  # a clear day/night cycle
    assert 10 <= int(np.argmax(hourly)) <= 17  # busiest in the working day
    means = tp.mean(axis=0)
    assert means.max() > 5 * np.median(means)  # a few big tunnels, many small
    assert np.quantile(means, 0.9) > 3 * np.quantile(means, 0.1)
    # Bursts: most tunnels at some minute jump to more than twice their own median.
    assert np.mean(tp.max(axis=0) > 2 * np.median(tp, axis=0)) > 0.8


def test_scales_with_the_tunnel_count() -> None:
    trace = synthetic_trace(tunnels=340, seed=3, minutes=120)
    assert trace.throughput_gbps.shape == (120, 340)
    assert len(set(trace.tunnels)) == 340


def test_bad_generator_parameters_are_named() -> None:
    with pytest.raises(ConfigError, match="--tunnels"):
        synthetic_trace(tunnels=0)
    with pytest.raises(ConfigError, match="--seed"):
        synthetic_trace(seed=-1)
