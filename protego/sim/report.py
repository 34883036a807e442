"""Table 2 as text, and the ``--json`` object. Pure formatting."""

from __future__ import annotations

from typing import Any

from protego.sim.simulator import SimResult

# Paper Table 2: consolidation interval (min) -> (active VM capacity Gbit/s,
# 99th-percentile guarantee %, resource saving %).
PAPER_TABLE2: dict[int, tuple[float, float, float]] = {
    3: (61.23, 90.21, 88.00),
    5: (66.17, 93.07, 87.03),
    10: (73.97, 96.84, 85.50),
    30: (88.34, 98.24, 82.68),
    60: (93.22, 98.63, 81.72),
}
PAPER_RESERVED_NODES = 22
PAPER_MEAN_THROUGHPUT_GBPS = 57.49


def to_json(result: SimResult) -> dict[str, Any]:
    """The object ``protego sim --json`` prints (keys fixed by issue 7)."""
    return {
        "tunnels": result.tunnels,
        "minutes": result.minutes,
        "reserved_nodes": result.reserved_nodes,
        "mean_throughput_gbps": round(result.mean_throughput_gbps, 4),
        "intervals": [
            {
                "consolidation_min": r.consolidation_min,
                "active_capacity_gbps": round(r.active_capacity_gbps, 4),
                "guarantee_p99_pct": round(r.guarantee_p99_pct, 4),
                "saving_pct": round(r.saving_pct, 4),
                "migrations": r.migrations,
            }
            for r in result.intervals
        ],
    }


def format_table(result: SimResult, source: str, th: float, eps: float) -> str:
    """Table 2 with the paper's numbers under ours, where the paper has that interval."""
    label_w, col_w = 32, 9
    ks = [r.consolidation_min for r in result.intervals]

    def row(label: str, cells: list[str]) -> str:
        return label.ljust(label_w) + "".join(c.rjust(col_w) for c in cells)

    def paper(idx: int) -> list[str]:
        return [f"{PAPER_TABLE2[k][idx]:.2f}" if k in PAPER_TABLE2 else "-" for k in ks]

    sigma = result.max_tunnel_gbps / result.gpn_gbps
    setup = (f"GPN {result.gpn_gbps:g} Gbit/s, max tunnel {result.max_tunnel_gbps:g} Gbit/s "
             f"(sigma {sigma:.2f}), T_H {th:g}, eps {eps:g}, "
             f"demand model {result.demand_model.value}")
    throughput = (f"mean aggregate throughput {result.mean_throughput_gbps:.2f} Gbit/s "
                  f"(paper {PAPER_MEAN_THROUGHPUT_GBPS:.2f})")
    reserve = (f"reserved nodes {result.reserved_nodes} "
               f"= {result.reserved_nodes * result.gpn_gbps:g} Gbit/s at most, "
               f"{result.mean_reserved_capacity_gbps:.1f} Gbit/s on average "
               f"(paper {PAPER_RESERVED_NODES} = {PAPER_RESERVED_NODES * 5} Gbit/s); "
               f"aggregate above T_H x reserve in {result.minutes_over_reserve(th)} of "
               f"{result.minutes} minutes")
    lines = [
        f"protego sim: {source}, {result.tunnels} tunnels, {result.minutes} minutes",
        setup,
        throughput,
        reserve,
        "",
        row("Consolidation interval", [f"{k} min" for k in ks]),
        row("Active VM capacity (Gbit/s)",
            [f"{r.active_capacity_gbps:.2f}" for r in result.intervals]),
        row("  paper", paper(0)),
        row("99th-pct guarantee (%)",
            [f"{r.guarantee_p99_pct:.2f}" for r in result.intervals]),
        row("  paper", paper(1)),
        row("Resource saving (%)", [f"{r.saving_pct:.2f}" for r in result.intervals]),
        row("  paper", paper(2)),
        row("Migrations", [str(r.migrations) for r in result.intervals]),
        row("Boots of shut-down nodes", [str(r.boots) for r in result.intervals]),
    ]
    return "\n".join(lines)
