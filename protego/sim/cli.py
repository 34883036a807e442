"""``protego sim``: replay a throughput trace through the provisioning algorithm."""

from __future__ import annotations

import json
import logging

import click

from protego.errors import ConfigError
from protego.provisioning.reserve import DemandModel
from protego.sim.simulator import DEFAULT_INTERVALS, SimConfig

log = logging.getLogger(__name__)


def parse_intervals(text: str) -> tuple[int, ...]:
    """``"3,5,10"`` → (3, 5, 10); errors name ``--intervals``."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            k = int(part)
        except ValueError:
            raise ConfigError(f"--intervals: {part!r} is not a whole number of minutes") from None
        if k < 1:
            raise ConfigError(f"--intervals: consolidation interval {k} must be >= 1 minute")
        if k in values:
            raise ConfigError(f"--intervals: {k} is listed twice")
        values.append(k)
    return tuple(values)


@click.command("sim")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), default=None,
              help="Trace CSV (minute,tunnel,throughput_gbps); see docs/provisioning.md.")
@click.option("--synthetic", is_flag=True, help="Use the seeded synthetic trace (paper §7.4).")
@click.option("--tunnels", type=int, default=None, help="Synthetic tunnels [170].")
@click.option("--seed", type=int, default=None, help="Synthetic seed [1].")
@click.option("--gpn-gbps", type=float, default=5.0, show_default=True,
              help="Throughput capacity of one GPN.")
@click.option("--max-tunnel-gbps", type=float, default=1.5, show_default=True,
              help="Rate limit of a tunnel (sigma = this / --gpn-gbps).")
@click.option("--th", type=float, default=0.9, show_default=True,
              help="Hotspot threshold T_H (fraction of a GPN).")
@click.option("--eps", type=float, default=0.05, show_default=True,
              help="Violation tolerance epsilon: Pr(Y > C) <= eps.")
@click.option("--intervals", default=",".join(map(str, DEFAULT_INTERVALS)), show_default=True,
              help="Consolidation intervals in minutes, comma separated.")
@click.option("--demand-model", type=click.Choice([m.value for m in DemandModel]),
              default=DemandModel.INDEPENDENT.value, show_default=True,
              help="independent = the paper; time-of-day = reserve from hour-conditioned "
                   "distributions (accounts for diurnal correlation).")
@click.option("--boot-min", type=int, default=5, show_default=True,
              help="Minutes for a shut-down GPN to boot.")
@click.option("--window-min", type=int, default=1440, show_default=True,
              help="Sliding window of measurements behind U_i.")
@click.option("--write-trace", type=click.Path(dir_okay=False), default=None,
              help="Also write the trace used to this CSV file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw the paper's Figure 11 to this PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def sim(trace_path: str | None, synthetic: bool, tunnels: int | None, seed: int | None,
        gpn_gbps: float, max_tunnel_gbps: float, th: float, eps: float, intervals: str,
        demand_model: str, boot_min: int, window_min: int, write_trace: str | None,
        plot_path: str | None, as_json: bool) -> None:
    """Simulate elastic provisioning on a trace and print the paper's Table 2."""
    from protego.sim.report import format_table, to_json
    from protego.sim.simulator import simulate
    from protego.sim.synthetic import synthetic_trace
    from protego.sim.trace import read_trace
    from protego.sim.trace import write_trace as write_csv

    if (trace_path is None) == (not synthetic):
        raise ConfigError("give exactly one of --trace FILE or --synthetic")
    if trace_path is not None and (tunnels is not None or seed is not None):
        raise ConfigError("--tunnels and --seed only apply to --synthetic")
    if boot_min < 0:
        raise ConfigError(f"--boot-min must be >= 0, got {boot_min}")
    if window_min < 1:
        raise ConfigError(f"--window-min must be >= 1, got {window_min}")
    config = SimConfig(gpn_gbps=gpn_gbps, max_tunnel_gbps=max_tunnel_gbps, th=th, eps=eps,
                       intervals=parse_intervals(intervals),
                       demand_model=DemandModel(demand_model), boot_min=boot_min,
                       window_min=window_min)
    if synthetic:
        n = 170 if tunnels is None else tunnels
        s = 1 if seed is None else seed
        trace = synthetic_trace(tunnels=n, seed=s, max_tunnel_gbps=max_tunnel_gbps)
        source = f"synthetic trace (seed {s})"
    else:
        assert trace_path is not None
        trace = read_trace(trace_path, max_tunnel_gbps=max_tunnel_gbps)
        source = f"trace {trace_path}"
    if write_trace:
        write_csv(trace, write_trace)
    result = simulate(trace, config)
    if plot_path:
        from protego.sim.plot import plot_figure11

        plot_figure11(result, plot_path)
    if as_json:
        click.echo(json.dumps(to_json(result)))
    else:
        click.echo(format_table(result, source, th, eps))
