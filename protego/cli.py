"""The ``protego`` command line.

Sub-commands live next to the code they drive and are imported lazily, so
``protego --help`` stays fast and a command's heavy imports (numpy, pyroute2,
grpc) are paid only when that command runs.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from protego import __version__
from protego.context import CliContext
from protego.errors import ProtegoError

# name -> "module:attribute" of a click command or group
_COMMANDS: dict[str, str] = {
    "testbed": "protego.testbed.cli:testbed",
    "sim": "protego.sim.cli:sim",
    "tenant": "protego.control.cli:tenant",
    "tunnel": "protego.control.cli:tunnel",
    "sa": "protego.control.cli:sa",
    "gmn": "protego.gmn.cli:gmn",
    "status": "protego.control.status:status",
    "lb": "protego.lb.cli:lb",
    "gpn": "protego.gpn.cli:gpn",
    "bench": "protego.bench.cli:bench",
    "lane": "protego.lane:lane",
    "etcd": "protego.store.cli:etcd",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, attr = target.split(":")
        module = importlib.import_module(module_name)
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_LazyGroup)
@click.version_option(__version__, prog_name="protego")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--etcd", "etcd", envvar="PROTEGO_ETCD", default=None, metavar="HOST:PORT[,...]",
              help="etcd endpoints (default: the running testbed's).")
@click.option("--testbed", "testbed_name", envvar="PROTEGO_TESTBED", default=None, metavar="NAME",
              help="Use the etcd of this testbed.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, etcd: str | None, testbed_name: str | None) -> None:
    """Protego: multitenant, distributed IPsec VPN gateway service."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    ctx.obj = CliContext(etcd_option=etcd, testbed_option=testbed_name)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ProtegoError as exc:
        click.echo(f"protego: error: {exc}", err=True)
        sys.exit(1)
