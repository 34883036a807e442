"""Throughput traces: one throughput per tunnel per minute.

CSV format (UTF-8, comma separated)::

    # optional comment lines start with '#'
    minute,tunnel,throughput_gbps
    0,tenant-a/site-1,0.4125
    0,tenant-b/hq,1.2
    1,tenant-a/site-1,0.398
    ...

- ``minute``: integer minute since the start of the trace (0-based). Minute 0 is
  taken as midnight by the time-of-day demand model.
- ``tunnel``: any non-empty id without a comma.
- ``throughput_gbps``: the tunnel's average throughput in that minute, Gbit/s, a finite
  number >= 0 and <= the maximum tunnel throughput of the simulation.
- Every tunnel has exactly one row for every minute 0..M−1; rows may come in any order.

Parsing (:func:`parse_trace`) is pure over an iterable of lines; :func:`read_trace`
and :func:`write_trace` are the only functions that touch files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from protego.errors import ConfigError

HEADER = ("minute", "tunnel", "throughput_gbps")


@dataclass(frozen=True)
class Trace:
    """``throughput_gbps[t, i]`` is tunnel ``tunnels[i]``'s throughput in minute t."""

    tunnels: tuple[str, ...]
    throughput_gbps: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        shape = self.throughput_gbps.shape
        if len(shape) != 2 or shape[1] != len(self.tunnels):
            raise ConfigError(f"trace matrix shape {shape} does not match "
                              f"{len(self.tunnels)} tunnels")
        if shape[0] == 0 or shape[1] == 0:
            raise ConfigError("trace is empty")

    @property
    def minutes(self) -> int:
        return int(self.throughput_gbps.shape[0])

    @property
    def aggregate_gbps(self) -> npt.NDArray[np.float64]:
        total: npt.NDArray[np.float64] = self.throughput_gbps.sum(axis=1)
        return total


def parse_trace(lines: Iterable[str], source: str = "trace",
                max_tunnel_gbps: float | None = None) -> Trace:
    """Parse and validate CSV lines; any problem raises one ConfigError naming the line."""
    rows: dict[str, dict[int, tuple[float, int]]] = {}
    header_seen = False
    max_minute = -1
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        where = f"{source}: line {lineno}"
        if not header_seen:
            if tuple(fields) != HEADER:
                raise ConfigError(f"{where}: expected header {','.join(HEADER)!r}, got {line!r}")
            header_seen = True
            continue
        if len(fields) != 3:
            raise ConfigError(f"{where}: expected 3 fields (minute,tunnel,throughput_gbps), "
                              f"got {len(fields)}")
        minute_s, tunnel, value_s = fields
        try:
            minute = int(minute_s)
        except ValueError:
            raise ConfigError(f"{where}: minute {minute_s!r} is not an integer") from None
        if minute < 0:
            raise ConfigError(f"{where}: minute {minute} is negative")
        if not tunnel:
            raise ConfigError(f"{where}: empty tunnel id")
        try:
            value = float(value_s)
        except ValueError:
            raise ConfigError(f"{where}: throughput {value_s!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{where}: throughput {value_s!r} is not finite")
        if value < 0:
            raise ConfigError(f"{where}: throughput {value:g} Gbit/s is negative")
        if max_tunnel_gbps is not None and value > max_tunnel_gbps * (1 + 1e-9):
            raise ConfigError(f"{where}: tunnel {tunnel!r} throughput {value:g} Gbit/s exceeds "
                              f"the maximum tunnel throughput {max_tunnel_gbps:g} Gbit/s "
                              f"(--max-tunnel-gbps)")
        per_tunnel = rows.setdefault(tunnel, {})
        if minute in per_tunnel:
            raise ConfigError(f"{where}: duplicate row for tunnel {tunnel!r} minute {minute} "
                              f"(first on line {per_tunnel[minute][1]})")
        per_tunnel[minute] = (value, lineno)
        max_minute = max(max_minute, minute)
    if not header_seen:
        raise ConfigError(f"{source}: empty trace (no header {','.join(HEADER)!r})")
    if not rows:
        raise ConfigError(f"{source}: trace has a header but no rows")
    minutes = max_minute + 1
    tunnels = tuple(rows)
    # every tunnel complete before the matrix is made: its size is then the rows read (a
    # row at minute 10^9 must not allocate gigabytes before it is found alone)
    for tunnel in tunnels:
        per_tunnel = rows[tunnel]
        if len(per_tunnel) != minutes:
            missing = next(m for m in range(minutes) if m not in per_tunnel)
            previous = per_tunnel.get(missing - 1)
            hint = f" (after line {previous[1]})" if previous else ""
            raise ConfigError(f"{source}: tunnel {tunnel!r} has no row for minute {missing}"
                              f"{hint}; every tunnel needs minutes 0..{minutes - 1}")
    matrix = np.zeros((minutes, len(tunnels)), dtype=np.float64)
    for i, tunnel in enumerate(tunnels):
        for m, (value, _) in rows[tunnel].items():
            matrix[m, i] = value
    return Trace(tunnels=tunnels, throughput_gbps=matrix)


def read_trace(path: str | Path, max_tunnel_gbps: float | None = None) -> Trace:
    p = Path(path)
    try:
        with p.open(encoding="utf-8") as fh:
            return parse_trace(fh, source=str(p), max_tunnel_gbps=max_tunnel_gbps)
    except OSError as exc:
        raise ConfigError(f"cannot read trace {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason})") from None


def format_trace(trace: Trace) -> Iterable[str]:
    """The CSV lines (with newlines) of a trace, minute by minute."""
    yield ",".join(HEADER) + "\n"
    for t in range(trace.minutes):
        row = trace.throughput_gbps[t]
        for i, tunnel in enumerate(trace.tunnels):
            yield f"{t},{tunnel},{float(row[i]):.6f}\n"


def write_trace(trace: Trace, path: str | Path) -> None:
    for tunnel in trace.tunnels:
        if not tunnel or "," in tunnel or "\n" in tunnel:
            raise ConfigError(f"tunnel id {tunnel!r} cannot be written to CSV")
    with Path(path).open("w", encoding="utf-8") as fh:
        fh.writelines(format_trace(trace))
