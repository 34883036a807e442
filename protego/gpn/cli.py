"""``protego gpn``: run the GPN agent (inside the GPN's network namespace)."""

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
@click.pass_context
def run(ctx: click.Context, node: str, fabric_addr: str, backend: str, workers: int, lease_ttl: int,
        report_interval: float, resync_interval: float, no_vips: bool, no_raw_esp: bool) -> None:
    """Run the GPN agent and its data path until SIGTERM/SIGINT."""
    from protego.gpn.agent import GpnAgent, GpnConfig

    obj = ctx.find_object(CliContext) or CliContext()
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
                        resync_interval=resync_interval, manage_vips=not no_vips, raw_esp=not no_raw_esp)
        agent = GpnAgent(cfg, obj.etcd)
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        agent.start()
    except ProtegoError as exc:
        raise click.ClickException(str(exc)) from None
    del endpoints
    while not done.wait(0.5):
        if agent.failed:
            break
    agent.stop()
    obj.close()
    if agent.failed:
        raise click.ClickException(f"GPN data path failed: {agent.failed}")
