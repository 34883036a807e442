"""A seeded synthetic trace calibrated to what paper §7.4 says of the production one.

What §7.4 states: 170 tunnels, one day at one-minute resolution, throughputs scaled so
that the largest tunnel throughput is 1.5 Gbit/s, a mean aggregate of 57.49 Gbit/s.
What it implies (Figure 11): a diurnal aggregate. What real site-to-site VPN traffic
shows and the generator adds: tunnels of very different sizes (log-normal levels),
per-tunnel diurnal amplitude and phase (sites in different time zones and business
hours), minute-to-minute autocorrelated noise and occasional bursts (backups, bulk
transfers) that push a tunnel to its rate limit.

Each tunnel i in minute t:

    x_i(t) = L_i · (1 + A_i · (D(t − φ_i) − 1)) · exp(n_i(t)) · (1 + (B_i − 1)·b_i(t))

with D the shared diurnal shape (peak 14:00, trough 04:00), L_i ~ logNormal(0, 0.9),
A_i ~ U(0.4, 1), φ_i ~ N(0, 90 min), n_i an AR(1) with ρ = 0.7 per minute and
stationary deviation 0.45, b_i a two-state burst chain (≈6 bursts a day of ≈5 minutes
mean) and B_i ~ U(2, 5). Then min(s·x_i(t), max) with the scale s solved by Newton's method
so that the mean aggregate hits its target (before rounding to kbit/s).

The minute-scale volatility (ρ, deviation, bursts) is not stated in the paper; it was
chosen so that the guarantee of the paper's method lands near Table 2's (see
docs/provisioning.md). Everything else follows §7.4.
"""

from __future__ import annotations

import logging

import numpy as np

from protego.errors import ConfigError
from protego.sim.trace import Trace

log = logging.getLogger(__name__)

PAPER_TUNNELS = 170
PAPER_MEAN_AGGREGATE_GBPS = 57.49
PAPER_MAX_TUNNEL_GBPS = 1.5
MINUTES_PER_DAY = 1440

LEVEL_SIGMA = 0.9
NOISE_RHO = 0.7
NOISE_DEV = 0.45
BURSTS_PER_DAY = 6.0
BURST_MEAN_MIN = 5.0


def diurnal_shape(minute_of_day: np.ndarray) -> np.ndarray:
    """Shared daily shape with mean ≈ 1: trough around 04:00, peak around 14:00."""
    phase = 2 * np.pi * (minute_of_day - 14 * 60) / MINUTES_PER_DAY
    shape: np.ndarray = 1.0 + 0.55 * np.cos(phase) + 0.12 * np.cos(2 * phase)
    return shape


def synthetic_trace(tunnels: int = PAPER_TUNNELS, seed: int = 1,
                    minutes: int = MINUTES_PER_DAY,
                    max_tunnel_gbps: float = PAPER_MAX_TUNNEL_GBPS,
                    mean_aggregate_gbps: float | None = None) -> Trace:
    """A reproducible trace; by default the mean aggregate scales as 57.49 · tunnels/170."""
    if tunnels < 1:
        raise ConfigError(f"--tunnels must be >= 1, got {tunnels}")
    if minutes < 1:
        raise ConfigError(f"minutes must be >= 1, got {minutes}")
    if max_tunnel_gbps <= 0:
        raise ConfigError(f"--max-tunnel-gbps must be > 0, got {max_tunnel_gbps:g}")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    if mean_aggregate_gbps is None:
        mean_aggregate_gbps = PAPER_MEAN_AGGREGATE_GBPS * tunnels / PAPER_TUNNELS
    if not 0 < mean_aggregate_gbps < tunnels * max_tunnel_gbps:
        raise ConfigError(f"mean aggregate {mean_aggregate_gbps:g} Gbit/s is not reachable "
                          f"with {tunnels} tunnels of at most {max_tunnel_gbps:g} Gbit/s")
    rng = np.random.default_rng(seed)
    level = rng.lognormal(0.0, LEVEL_SIGMA, tunnels)
    amplitude = rng.uniform(0.4, 1.0, tunnels)
    shift = rng.normal(0.0, 90.0, tunnels)
    burst_factor = rng.uniform(2.0, 5.0, tunnels)
    t = np.arange(minutes, dtype=np.float64)[:, None]
    profile = 1.0 + amplitude * (diurnal_shape((t - shift) % MINUTES_PER_DAY) - 1.0)

    rho, dev = NOISE_RHO, NOISE_DEV
    innov = rng.normal(0.0, dev * np.sqrt(1 - rho * rho), (minutes, tunnels))
    p_start, p_end = BURSTS_PER_DAY / MINUTES_PER_DAY, 1.0 / BURST_MEAN_MIN
    uniforms = rng.random((minutes, tunnels))
    noise = np.empty((minutes, tunnels))
    burst = np.zeros((minutes, tunnels), dtype=bool)
    state = rng.normal(0.0, dev, tunnels)
    on = rng.random(tunnels) < p_start / (p_start + p_end)
    for m in range(minutes):
        state = rho * state + innov[m]
        noise[m] = state
        on = np.where(on, uniforms[m] >= p_end, uniforms[m] < p_start)
        burst[m] = on
    x = level * profile * np.exp(noise - dev * dev / 2) * np.where(burst, burst_factor, 1.0)

    # Solve mean_t Σ_i min(s·x_i(t), max) = target for s. The left side is concave and
    # piecewise linear in s, so Newton's method from below converges monotonically.
    target_total = mean_aggregate_gbps * minutes
    scale = target_total / float(x.sum())  # without clipping: a lower bound
    for _ in range(100):
        clipped = scale * x >= max_tunnel_gbps
        total = float(np.where(clipped, max_tunnel_gbps, scale * x).sum())
        slope = float(x[~clipped].sum())
        if abs(total - target_total) <= 1e-12 * target_total or slope <= 0.0:
            break
        scale += (target_total - total) / slope
    throughput = np.round(np.minimum(scale * x, max_tunnel_gbps), 6).astype(np.float64)
    width = len(str(tunnels - 1))
    names = tuple(f"t{i:0{width}d}" for i in range(tunnels))
    log.info("synthetic trace: %d tunnels, %d minutes, seed %d, mean aggregate %.2f Gbit/s",
             tunnels, minutes, seed, float(throughput.sum(axis=1).mean()))
    return Trace(tunnels=names, throughput_gbps=throughput)
