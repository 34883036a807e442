"""``protego gmn``: run the GMN agent (inside the GMN's network namespace)."""

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
def gmn() -> None:
    """The management node agent (charon under Protego's control)."""


@gmn.command()
@click.option("--node", required=True, help="This GMN's name (e.g. gmn1).")
@click.option("--vici", "vici_socket", required=True, help="Path of charon's VICI socket.")
@click.option("--plugin-socket", required=True, help="Path of the kernel-protego plugin socket to serve.")
@click.option("--fabric-addr", default="", help="This GMN's fabric address (where the GIN steers IKE).")
@click.option("--ack-port", type=click.IntRange(0, 65535), default=7472, show_default=True,
              help="UDP port on the fabric address where GPNs and GIN/GENs acknowledge applied changes "
                   "directly (docs/migration.md); 0: through etcd only.")
@click.option("--lease-ttl", type=click.IntRange(2, 60), default=5, show_default=True,
              help="Seconds of the etcd lease behind the leadership: a GMN cut off from etcd is replaced "
                   "after this (it makes its own IKE SAs passive after half of it).")
@click.option("--resync", "resync_interval", type=click.FloatRange(1, 3600), default=30.0, show_default=True,
              help="Seconds between full resyncs.")
@click.option("--no-vips", is_flag=True, help="Do not manage tenant VIPs on lo.")
@click.option("--no-ha", is_flag=True, help="charon runs without the ha plugin: no IKE SA mirror, no takeover.")
@click.option("--ha-listen", default="127.0.0.2", show_default=True,
              help="Address of charon's plugins.ha.remote (this agent receives the HA stream there, port 4510).")
@click.option("--ha-charon", default="127.0.0.1", show_default=True, help="Address of charon's plugins.ha.local.")
@click.option("--ha-rt-priority", type=click.IntRange(0, 99), default=10, show_default=True,
              help="SCHED_RR priority of the HA relay process (replication latency is a target); "
                   "0: the normal class at nice -10.")
@click.option("--apply-timeout", type=click.FloatRange(0.1, 4.5), default=2.0, show_default=True,
              help="Seconds charon's SA calls wait at most for the GPNs' and GIN/GENs' acknowledgements "
                   "(below kernel-protego's reply timeout, 5 s).")
@click.option("--seal-key-file", default="/var/lib/protego/keys/gmn.key", show_default=True, metavar="PATH",
              help="The GMNs' X25519 private key, which the PSKs in etcd are sealed to: the same file on every GMN "
                   "(made on first start, mode 0600).")
@click.pass_context
def run(ctx: click.Context, node: str, vici_socket: str, plugin_socket: str, fabric_addr: str, ack_port: int,
        lease_ttl: int, resync_interval: float, no_vips: bool, no_ha: bool, ha_listen: str, ha_charon: str,
        ha_rt_priority: int, apply_timeout: float, seal_key_file: str) -> None:
    """Run the GMN agent until SIGTERM/SIGINT."""
    from protego.gmn.agent import GmnAgent, GmnConfig
    from protego.store.refused import EXIT_THREAD_DIED, FatalThreads

    obj = ctx.find_object(CliContext) or CliContext()
    fatal = FatalThreads().install()  # no thread dies silently: the process exits non-zero
    # charon's kernel-protego calls are answered inside an IKE exchange: they must not
    # wait out 5 ms GIL slices of the reconcile loop
    sys.setswitchinterval(0.0005)
    if not logging.getLogger().handlers or logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    try:
        cfg = GmnConfig(node=node, etcd=obj.etcd_endpoints(), vici_socket=vici_socket,
                        plugin_socket=plugin_socket, fabric_addr=fabric_addr, lease_ttl=lease_ttl,
                        resync_interval=resync_interval, manage_vips=not no_vips, ha=not no_ha,
                        ha_local=ha_listen, ha_charon=ha_charon, ha_rt_priority=ha_rt_priority,
                        ack_port=ack_port or None, apply_timeout=apply_timeout, seal_key_file=seal_key_file)
        agent = GmnAgent(cfg, obj.etcd()).start()
    except ProtegoError as exc:
        raise click.ClickException(str(exc)) from None
    done = threading.Event()
    fatal.on_fatal = done.set  # a thread that dies ends the wait too
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    fatal.stopping()
    agent.stop()
    obj.close()
    if fatal.reason:
        raise SystemExit(EXIT_THREAD_DIED)
