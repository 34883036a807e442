"""``protego gpn``: run the GPN agent (inside the GPN's network namespace); drain and undrain a GPN."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from protego.context import CliContext
from protego.errors import ProtegoError

log = logging.getLogger(__name__)


@click.group()
def gpn() -> None:
    """The processing node agent (the ESP data path)."""


@gpn.command()
@click.option("--node", required=True, help="This GPN's name (e.g. gpn1).")
@click.option("--fabric-addr", required=True, help="This GPN's fabric address (VXLAN and heartbeats arrive here).")
@click.option("--backend", type=click.Choice(["userspace", "xfrm", "auto"]), default="auto", show_default=True,
              help="ESP data path: Protego's userspace engine or the kernel's XFRM (auto: probe the kernel).")
@click.option("--workers", type=click.IntRange(0, 256), default=0, show_default=True,
              help="Worker processes (0: one per core).")
@click.option("--lease-ttl", type=click.IntRange(2, 60), default=5, show_default=True)
@click.option("--report-interval", type=click.FloatRange(0.2, 60), default=2.0, show_default=True,
              help="Seconds between sastats/load reports.")
@click.option("--resync", "resync_interval", type=click.FloatRange(1, 3600), default=30.0, show_default=True,
              help="Seconds between full resyncs with etcd.")
@click.option("--no-vips", is_flag=True, help="Do not manage the SAs' VIPs on lo.")
@click.option("--no-raw-esp", is_flag=True, help="Do not open raw protocol-50 sockets (ESP-in-UDP only).")
@click.option("--worker-cpus", default="", metavar="LIST",
              help="CPUs for the worker processes, e.g. 2-7 or 1,3 (default: the agent's).")
@click.option("--canary-interval-ms", type=click.FloatRange(10, 10000), default=100.0, show_default=True,
              help="xfrm backend: milliseconds between ESP canaries through the kernel.")
@click.option("--canary-misses", type=click.IntRange(1, 100), default=3, show_default=True,
              help="xfrm backend: canaries lost in a row that stop the heartbeats (the GPN is then declared dead).")
@click.option("--seal-key-file", default="", metavar="PATH",
              help="This GPN's X25519 private key, which the SA keys in etcd are sealed to (made on first "
                   "start, mode 0600; default /var/lib/protego/keys/gpn-NODE.key).")
@click.pass_context
def run(ctx: click.Context, node: str, fabric_addr: str, backend: str, workers: int, lease_ttl: int,
        report_interval: float, resync_interval: float, no_vips: bool, no_raw_esp: bool, worker_cpus: str,
        canary_interval_ms: float, canary_misses: int, seal_key_file: str) -> None:
    """Run the GPN agent and its data path until SIGTERM/SIGINT."""
    from protego.gpn.agent import GpnAgent, GpnConfig
    from protego.store.refused import EXIT_THREAD_DIED, FatalThreads
    from protego.gpn.engine import parse_cpu_list

    obj = ctx.find_object(CliContext) or CliContext()
    fatal = FatalThreads().install()  # no thread dies silently: the process exits non-zero
    # the agent's loop shares the GIL with its etcd watch, lease and writer threads: with the
    # default 5 ms slices, a pass that installs a migration's SA waited out several of them
    # (passes of 10-30 ms on an idle testbed, measured); the workers are processes of their own
    sys.setswitchinterval(0.0005)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    elif root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        endpoints = obj.etcd_endpoints()
        cfg = GpnConfig(node=node, fabric_addr=fabric_addr, backend=backend, workers=workers,
                        lease_ttl=lease_ttl, report_interval=report_interval,
                        resync_interval=resync_interval, manage_vips=not no_vips, raw_esp=not no_raw_esp,
                        worker_cpus=parse_cpu_list(worker_cpus), canary_interval=canary_interval_ms / 1000.0,
                        canary_misses=canary_misses, seal_key_file=seal_key_file)
        agent = GpnAgent(cfg, obj.etcd)
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        agent.start()
    except ProtegoError as exc:
        raise click.ClickException(str(exc)) from None
    del endpoints
    while not done.wait(0.5):
        if agent.failed or fatal.event.is_set():
            break
    fatal.stopping()
    agent.stop()
    obj.close()
    if agent.failed:
        raise click.ClickException(f"GPN data path failed: {agent.failed}")
    if fatal.reason:
        raise SystemExit(EXIT_THREAD_DIED)


@gpn.command()
@click.argument("name")
@click.option("--parallel", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Migrations in flight at once.")
@click.option("--timeout", type=click.FloatRange(1, 600), default=45.0, show_default=True,
              help="Seconds each migration may take.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report at the end.")
@click.pass_context
def drain(ctx: click.Context, name: str, parallel: int, timeout: float, as_json: bool) -> None:
    """Migrate every tunnel off GPN NAME (no packet lost) and keep new ones away.

    The GPN stays marked draining until `protego gpn undrain NAME`."""
    import json

    from protego.control.drain import drain as do_drain

    obj = ctx.find_object(CliContext) or CliContext()
    try:
        report = do_drain(obj.etcd(), name, parallel=parallel, timeout=timeout,
                          progress=None if as_json else (lambda m: click.echo(m, err=True)))
    except ProtegoError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        obj.close()
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        click.echo(f"{name}: {report.moved} tunnel(s) moved, {report.failed} failed, in {report.seconds:.1f} s; "
                   f"it stays draining (protego gpn undrain {name})")
    if report.failed:
        raise click.ClickException(f"{report.failed} tunnel(s) could not be moved off {name}")


@gpn.command()
@click.argument("name")
@click.pass_context
def undrain(ctx: click.Context, name: str) -> None:
    """Let GPN NAME take tunnels again after a drain."""
    from protego.control.drain import set_draining

    obj = ctx.find_object(CliContext) or CliContext()
    try:
        set_draining(obj.etcd(), name, False)
    except ProtegoError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        obj.close()
    click.echo(f"{name} takes tunnels again")
