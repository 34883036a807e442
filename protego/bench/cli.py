"""``protego bench``: benchmarks that print a table (``--json``: one JSON object),
each compared side by side with its reference in the same run."""

from __future__ import annotations

import importlib

import click

_BENCHES: dict[str, tuple[str, str]] = {
    "dataplane": ("protego.bench.dataplane:bench_dataplane",
                  "ESP per-core speed per suite; Protego vs strongSwan libipsec tunnel."),
    "e2e": ("protego.bench.e2e:bench_e2e",
            "End to end vs the baseline: throughput, added latency, setup of 100 tunnels, GMN RSS."),
    "failover": ("protego.bench.migration:bench_failover",
                 "GPN killed under load: detection time and traffic outage, over trials."),
    "gmn-failover": ("protego.bench.gmn_failover:bench_gmn_failover",
                     "Active GMN killed under traffic: HA replication, takeover time, ESP loss, renegotiations."),
    "lb": ("protego.lb.cli:bench_cmd", "GIN/GEN: steering update latency, GPN failure detection."),
    "migration": ("protego.bench.migration:bench_migration",
                  "Live migration by rekey under load: lost packets, switch time, throughput dip."),
}


class _LazyBenches(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_BENCHES)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _BENCHES:
            return None
        module, attr = _BENCHES[name][0].split(":")
        cmd = getattr(importlib.import_module(module), attr)
        assert isinstance(cmd, click.Command)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Benchmarks"):
            formatter.write_dl([(n, h) for n, (_t, h) in sorted(_BENCHES.items())])


@click.group(cls=_LazyBenches)
def bench() -> None:
    """Benchmarks (tables; --json for one JSON object)."""
