"""Speed benchmark: 10,000 synthetic tunnels, one day, 10-minute consolidation.

    .venv/bin/python bench/sim_scale.py [--tunnels 10000] [--interval 10] [--seed 1]

Target (issue 7): the simulation itself finishes in at most 60 s on the project's
2-core machine. Prints a table of the phases and the result. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time

from protego.provisioning.reserve import reservation_schedule
from protego.sim.simulator import SimConfig, simulate_interval
from protego.sim.synthetic import synthetic_trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=10_000)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=60.0)
    args = parser.parse_args()

    config = SimConfig(intervals=(args.interval,))
    t0 = time.perf_counter()
    trace = synthetic_trace(tunnels=args.tunnels, seed=args.seed)
    t1 = time.perf_counter()
    alpha = (trace.throughput_gbps / config.gpn_gbps).clip(max=config.sigma)
    reserve = reservation_schedule(alpha, config.params(), config.demand_model,
                                   bucket_min=config.bucket_min, lead_min=config.boot_min + 1)
    t2 = time.perf_counter()
    run = simulate_interval(alpha, reserve, config, args.interval)
    t3 = time.perf_counter()

    sim_s = t3 - t1
    rows = [
        ("tunnels", f"{args.tunnels}"),
        ("minutes", f"{trace.minutes}"),
        ("consolidation interval (min)", f"{args.interval}"),
        ("mean aggregate (Gbit/s)", f"{trace.aggregate_gbps.mean():.1f}"),
        ("reserved nodes", f"{int(reserve.max())}"),
        ("active capacity (Gbit/s)", f"{run.active_capacity_gbps:.1f}"),
        ("99th-pct guarantee (%)", f"{run.guarantee_p99_pct:.2f}"),
        ("resource saving (%)", f"{run.saving_pct:.2f}"),
        ("migrations", f"{run.migrations}"),
        ("generate trace (s)", f"{t1 - t0:.2f}"),
        ("reservation: histograms + FFT convolution (s)", f"{t2 - t1:.2f}"),
        ("replay 1440 minutes (s)", f"{t3 - t2:.2f}"),
        ("simulation total, reserve + replay (s)", f"{sim_s:.2f}"),
        (f"within {args.budget_s:g} s budget", "yes" if sim_s <= args.budget_s else "NO"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value:>10}")


if __name__ == "__main__":
    main()
