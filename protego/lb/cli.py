"""``protego lb``: the GIN/GEN agent and its maintenance commands.

Registered in :mod:`protego.cli` as ``"lb": "protego.lb.cli:lb"``; also runnable as
``python -m protego.lb.cli`` (what the tests spawn inside the lb's namespace).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import Any

import click

from protego.errors import ConfigError, ProtegoError

ROLES = {"gin": {"gin"}, "gen": {"gen"}, "both": {"gin", "gen"}}


def _int0(_ctx: Any, _p: Any, value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 0)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number") from None


@click.group()
def lb() -> None:
    """GIN/GEN: steer IKE, ESP and tenant traffic with nftables; detect GPN failures.

    Run inside the load balancer's network namespace."""


def _default_endpoints() -> tuple[str, ...]:
    """protego's own ``--etcd``/``--testbed`` (its context object), else the local etcd."""
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        obj = ctx.obj
        if obj is not None and hasattr(obj, "etcd_endpoints"):
            try:
                return tuple(obj.etcd_endpoints())
            except ConfigError:
                break
        ctx = ctx.parent
    return ("127.0.0.1:2379",)


@lb.command("run")
@click.option("--role", type=click.Choice(sorted(ROLES)), default="both", show_default=True,
              help="gin: ingress steering; gen: egress steering; both.")
@click.option("--etcd", "etcd_endpoints", multiple=True,
              help="etcd endpoint host:port (repeat for several; default: protego's --etcd/--testbed, "
                   "else 127.0.0.1:2379).")
@click.option("--vip", "vips", multiple=True, metavar="CIDR",
              help="Prefix holding the gateway VIPs (repeat). Only packets to a VIP (these, and every VIP "
                   "named in steer/in) are steered by the GIN.")
@click.option("--node", default=None, help="This agent's name in gpn/health entries (default: hostname).")
@click.option("--sample", type=int, default=1000, show_default=True,
              help="Tag 1 in N packets per GPN for heartbeats (0: off).")
@click.option("--tag-dscp", default="0x37", show_default=True, callback=_int0,
              help="DSCP value marking a tagged packet.")
@click.option("--hb-interval-ms", type=float, default=10.0, show_default=True,
              help="Every GPN is probed at least this often.")
@click.option("--hb-misses", type=int, default=3, show_default=True,
              help="Consecutive missed heartbeats that declare a GPN dead.")
@click.option("--hb-recover", type=int, default=10, show_default=True,
              help="Consecutive answered heartbeats that declare a GPN alive again.")
@click.option("--hb-tag-only", is_flag=True,
              help="No probe to a GPN whose sampled data packets answered the last round (the paper's saving; "
                   "a dead engine is then found a round later).")
@click.option("--hb-bind", default="0.0.0.0", show_default=True, help="Address of the heartbeat socket.")
@click.option("--hb-port", type=int, default=7471, show_default=True, help="Heartbeat UDP port (both ends).")
@click.option("--hb-rt-priority", type=click.IntRange(0, 99), default=0, show_default=True,
              help="Run the heartbeat thread at this SCHED_FIFO priority (0: normal scheduling).")
@click.option("--no-heartbeat", is_flag=True, help="Do not run GPN failure detection.")
@click.option("--resync", type=float, default=10.0, show_default=True,
              help="Seconds between full resyncs (repairs foreign changes).")
@click.option("--cleanup-on-exit", is_flag=True, help="Remove our tables and routes when stopping.")
@click.option("--status-file", default=None, help="Write the agent's status (JSON) here every second.")
def run_cmd(role: str, etcd_endpoints: tuple[str, ...], vips: tuple[str, ...], node: str | None, sample: int, tag_dscp: int,
            hb_interval_ms: float, hb_misses: int, hb_recover: int, hb_tag_only: bool, hb_bind: str, hb_port: int,
            hb_rt_priority: int, no_heartbeat: bool, resync: float, cleanup_on_exit: bool,
            status_file: str | None) -> None:
    """Run the agent until SIGTERM/SIGINT."""
    from protego.lb import heartbeat as hb
    from protego.lb import ruleset
    from protego.lb.agent import LbAgent, LbConfig
    from protego.lb.nft import NftAdapter
    from protego.lb.routes import RouteAdapter
    from protego.store.etcd import etcd_from_env

    try:
        params = ruleset.Params(sample=sample, tag_dscp=tag_dscp, vip_prefixes=tuple(vips))
        det = hb.DetectorConfig(interval=hb_interval_ms / 1000.0, misses=hb_misses, recover=hb_recover,
                                probe_busy=not hb_tag_only)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if resync <= 0:
        raise ConfigError("--resync must be > 0")
    etcd_endpoints = etcd_endpoints or _default_endpoints()
    # the reconcile loop shares the GIL with the etcd watch, heartbeat and writer threads:
    # short slices, so an acknowledgement on a migration's path does not wait out 5 ms ones
    sys.setswitchinterval(0.0005)
    kwargs: dict[str, Any] = {}
    if node:
        kwargs["node"] = node
    cfg = LbConfig(roles=frozenset(ROLES[role]), etcd_endpoints=tuple(etcd_endpoints), params=params,
                   resync_interval=resync, heartbeat=not no_heartbeat, detector=det, hb_bind=hb_bind,
                   hb_port=hb_port, hb_rt_priority=hb_rt_priority, cleanup_on_exit=cleanup_on_exit, status_file=status_file,
                   **kwargs)
    if "gin" in cfg.roles and not vips:
        logging.getLogger(__name__).warning(
            "no --vip given: the GIN steers the VIPs of the tenants in etcd and those named in steer/in")
    from protego.store.refused import EXIT_THREAD_DIED, FatalThreads

    store = etcd_from_env(cfg.etcd_endpoints)  # the credentials of its EnvironmentFile
    routes = RouteAdapter() if "gin" in cfg.roles else None
    agent = LbAgent(cfg, store, NftAdapter(), routes)
    stop = threading.Event()

    def on_signal(_s: int, _f: Any) -> None:
        stop.set()
        agent.wake()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # no thread dies silently: the loop stops and the process exits non-zero
    fatal = FatalThreads(on_fatal=lambda: on_signal(0, None)).install()
    logging.getLogger(__name__).info("protego lb (%s) starting, etcd %s", role, ", ".join(etcd_endpoints))
    try:
        agent.run(stop)
    finally:
        fatal.stopping()
        if routes is not None:
            routes.close()
        store.close()
    if fatal.reason:
        raise SystemExit(EXIT_THREAD_DIED)


@lb.command("cleanup")
def cleanup_cmd() -> None:
    """Remove Protego's lb tables and policy routes from this namespace."""
    from protego.lb.agent import cleanup
    from protego.lb.nft import NftAdapter
    from protego.lb.routes import RouteAdapter

    routes = RouteAdapter()
    try:
        click.echo(json.dumps(cleanup(NftAdapter(), routes)))
    finally:
        routes.close()


@lb.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def status_cmd(as_json: bool) -> None:
    """Our tables' counters and policy routes in this namespace."""
    from protego.lb import ruleset
    from protego.lb.nft import NftAdapter
    from protego.lb.routes import RouteAdapter

    nft = NftAdapter()
    routes = RouteAdapter()
    try:
        out: dict[str, Any] = {
            "tables": {t: {"counters": nft.counters(t)} for t in ruleset.OWNED_TABLES
                       if nft.read(t) is not None},
            "policy_routes": [{"slot": p.slot, "via": p.addr, "mark": hex(p.mark), "table": p.table}
                              for p in sorted(routes.read())],
        }
    finally:
        routes.close()
    if as_json:
        click.echo(json.dumps(out, sort_keys=True))
        return
    for t, body in out["tables"].items():
        click.echo(f"table ip {t}")
        for name, (pk, by) in sorted(body["counters"].items()):
            click.echo(f"  {name:<24} {pk:>12} packets {by:>14} bytes")
    for p in out["policy_routes"]:
        click.echo(f"slot {p['slot']}: fwmark {p['mark']} -> table {p['table']} via {p['via']}")


@lb.command("validate")
@click.argument("key")
@click.argument("value")
@click.option("--gpn", "gpns", multiple=True, help="Registered GPN names (checks the entry's GPN exists).")
def validate_cmd(key: str, value: str, gpns: tuple[str, ...]) -> None:
    """Check a steer/in/<vip>/<spi> or steer/out/<tenant>/<tunnel> entry (VALUE: JSON) the
    way the agent will, before writing it."""
    from protego.lb import model

    try:
        obj = json.loads(value)
    except ValueError:
        raise ConfigError(f"{key}: value is not JSON") from None
    k = key.removeprefix(model.PREFIX)
    known = dict.fromkeys(gpns) if gpns else None
    if k.startswith(model.STEER_IN):
        click.echo(repr(model.validate_steer_in(k, obj, known)))
    elif k.startswith(model.STEER_OUT):
        click.echo(repr(model.validate_steer_out(k, obj, known)))
    else:
        raise ConfigError(f"{key}: not a steer/in/ or steer/out/ key")


@lb.command("bench")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("--trials", type=int, default=10, show_default=True, help="GPN kill trials (>= 10).")
@click.option("--seconds", type=float, default=1.0, show_default=True, help="Per forwarding measurement.")
def bench_cmd(as_json: bool, trials: int, seconds: float) -> None:
    """Benchmark in a private namespace lab (root): steer_update_ms, steer_update_1000_ms,
    detect_ms, forward_ratio."""
    from protego.lb import bench

    argv = ["--trials", str(trials), "--seconds", str(seconds)] + (["--json"] if as_json else [])
    bench.main(argv)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        lb(standalone_mode=True)
    except ProtegoError as exc:
        click.echo(f"protego lb: error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
