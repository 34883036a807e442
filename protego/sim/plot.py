"""Figure 11 of the paper: aggregate throughput, reserved and active capacity over time.

Matplotlib is imported here only, with the non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protego.errors import ConfigError
from protego.sim.simulator import SimResult


def plot_figure11(result: SimResult, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = np.arange(result.minutes) / 60.0
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        ax.plot(hours, result.aggregate_gbps, color="black", linewidth=0.8,
                label="Aggregate throughput")
        ax.step(hours, result.reserved * result.gpn_gbps, where="post", color="tab:red",
                linestyle="--", label="Reserved capacity")
        for r in result.intervals:
            ax.step(hours, r.active_nodes * result.gpn_gbps, where="post", linewidth=0.9,
                    label=f"Active capacity ({r.consolidation_min}-min consolidation)")
        ax.set_xlabel("Time (hours)")
        ax.set_ylabel("Gbit/s")
        ax.set_xlim(0, result.minutes / 60.0)
        ax.set_ylim(bottom=0)
        ax.set_title(f"Resource provisioning efficiency ({result.tunnels} tunnels, "
                     f"{result.demand_model.value} demand model)")
        ax.legend(loc="lower right", fontsize="small")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        try:
            fig.savefig(str(path), dpi=120)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--plot: cannot write {path}: {exc}") from None
    finally:
        plt.close(fig)
