"""How many nodes to keep booted, minute by minute (paper §5.3, and one step beyond).

``independent`` is the paper's method: U_i from the measurements in a sliding window,
Y = Σ U_i assuming independent tunnels, reserve ⌈C/T_H⌉.

``time-of-day`` accounts for the correlation the paper ignores: real tunnels share a
diurnal rhythm, so at 14:00 they are all high together and the day-long U_i, summed as
if independent, under-estimate the afternoon tail and over-estimate the night's. Here
U_i^b is built only from the window's samples that fall in the same time-of-day bucket
b (an hour by default). Conditioned on the hour, what remains (bursts, noise) is much
closer to independent, so Y^b = Σ U_i^b is a better model of that hour's aggregate.
The reserve follows the day, looking ``lead_min`` ahead so that nodes booted for the
next bucket are up in time.

The window is cyclic: the measurements are taken as one representative day that
repeats, so the window before minute 0 is the end of the measurements.
"""

from __future__ import annotations

import enum
import logging

import numpy as np
import numpy.typing as npt

from protego.errors import ConfigError
from protego.provisioning.distribution import quantize, reserve_for_window
from protego.provisioning.params import ProvisioningParams

log = logging.getLogger(__name__)

MINUTES_PER_DAY = 1440


class DemandModel(enum.Enum):
    INDEPENDENT = "independent"
    TIME_OF_DAY = "time-of-day"


def _window(minutes: int, start: int, length: int) -> npt.NDArray[np.int64]:
    """Row indices of the ``length`` minutes before ``start``, wrapping around."""
    if length >= minutes:
        return np.arange(minutes, dtype=np.int64)
    return (np.arange(start - length, start, dtype=np.int64)) % minutes


def reservation_schedule(alpha: npt.NDArray[np.float64], params: ProvisioningParams,
                         model: DemandModel = DemandModel.INDEPENDENT,
                         bucket_min: int = 60, lead_min: int = 0) -> npt.NDArray[np.int64]:
    """Reserved node count for every minute of ``alpha`` (shape (minutes, tunnels)).

    Recomputed every ``params.reserve_every_min`` minutes from the trailing
    ``params.window_min`` minutes of measurements, and held in between.
    """
    if alpha.ndim != 2 or alpha.shape[0] == 0 or alpha.shape[1] == 0:
        raise ConfigError("reservation_schedule needs a non-empty (minutes, tunnels) array")
    if not 1 <= bucket_min <= MINUTES_PER_DAY:
        raise ConfigError(f"bucket_min must be in [1, {MINUTES_PER_DAY}], got {bucket_min}")
    if lead_min < 0:
        raise ConfigError(f"lead_min must be >= 0, got {lead_min}")
    minutes = alpha.shape[0]
    upn = params.units_per_node
    max_units = int(np.ceil(params.sigma * upn - 1e-9))
    units = np.minimum(quantize(alpha, upn), max_units)
    schedule = np.zeros(minutes, dtype=np.int64)
    whole_window = params.window_min >= minutes
    cached: npt.NDArray[np.int64] | None = None
    buckets = MINUTES_PER_DAY // bucket_min + (1 if MINUTES_PER_DAY % bucket_min else 0)
    minute_of_day = np.arange(minutes) % MINUTES_PER_DAY
    bucket_of_minute = minute_of_day // bucket_min
    for start in range(0, minutes, params.reserve_every_min):
        end = min(minutes, start + params.reserve_every_min)
        if cached is None or not whole_window:
            rows = _window(minutes, start, params.window_min)
            if model is DemandModel.INDEPENDENT:
                _, r = reserve_for_window(units[rows], max_units, upn, params.epsilon, params.T_H)
                per_bucket = np.full(buckets, r, dtype=np.int64)
            else:
                per_bucket = np.zeros(buckets, dtype=np.int64)
                has_data = np.zeros(buckets, dtype=bool)
                row_bucket = bucket_of_minute[rows]
                for b in range(buckets):
                    sel = rows[row_bucket == b]
                    if sel.size:
                        has_data[b] = True
                        _, per_bucket[b] = reserve_for_window(
                            units[sel], max_units, upn, params.epsilon, params.T_H)
                # Buckets without data borrow the largest reserve seen (conservative).
                per_bucket[~has_data] = per_bucket.max()
            cached = per_bucket
        for t in range(start, end):
            ahead = (t + np.arange(0, lead_min + 1)) % MINUTES_PER_DAY // bucket_min
            schedule[t] = int(cached[ahead].max())
    log.debug("reservation (%s): min %d, max %d nodes", model.value,
              int(schedule.min()), int(schedule.max()))
    return schedule
