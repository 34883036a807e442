"""``protego testbed``: a whole Protego deployment (or its baseline) in network namespaces."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from protego.errors import ProtegoError
from protego.testbed import testbed as tbmod
from protego.testbed.plan import MODES
from protego.testbed.state import list_testbeds
from protego.testbed.topology import BUILTIN_TOPOLOGIES, GPN_BACKENDS, load_topology


KEEP_HELP = ("If `up` fails, leave the failed testbed running for inspection (phase 'failed'; "
             "`protego testbed down` removes it) instead of rolling it back.")


TOPOLOGY_HELP = (f"Topology file (TOML, see docs/testbed.md), or the name of a packaged topology "
                 f"({', '.join(BUILTIN_TOPOLOGIES)}; lane: relaxed timings for an emulated guest). "
                 "Default: default.")
BACKEND_HELP = ("Every GPN's ESP data path: userspace (Protego's engine), xfrm (the kernel's), auto (the agent "
                "probes the kernel). Default: the topology's [testbed].gpn_backends, else userspace.")


def _progress(msg: str) -> None:
    click.echo(f"[testbed] {msg}", err=True)


def _fail(exc: ProtegoError) -> None:
    raise click.ClickException(str(exc))


def _need_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException("the testbed needs root (network namespaces, charon, etcd)")


@click.group()
def testbed() -> None:
    """Build, inspect and remove a Protego testbed in network namespaces."""


@testbed.command()
@click.option("--topology", "topology_file", default=None, metavar="FILE|NAME", help=TOPOLOGY_HELP)
@click.option("--name", default="pt", show_default=True, help="Testbed name: prefixes its namespaces.")
@click.option("--mode", type=click.Choice(MODES), default="protego", show_default=True,
              help="protego: Protego's roles; baseline: one strongSwan gateway per tenant.")
@click.option("--backend", type=click.Choice(GPN_BACKENDS), default=None, help=BACKEND_HELP)
@click.option("--wait", "wait_s", type=float, default=None,
              help="Seconds to wait for every site's tunnel (baseline mode). Default: the topology's "
                   "[timings].tunnel_wait_s.")
@click.option("--keep-on-failure", is_flag=True, help=KEEP_HELP)
def up(topology_file: str | None, name: str, mode: str, backend: str | None, wait_s: float | None,
       keep_on_failure: bool) -> None:
    """Create the testbed: namespaces, links, etcd, strongSwan sites and gateways."""
    _need_root()
    try:
        topo = load_topology(topology_file)
        tb = tbmod.up(topo, name=name, mode=mode, progress=_progress, wait_tunnels=wait_s,  # type: ignore[arg-type]
                      keep_on_failure=keep_on_failure, backend=backend)
    except ProtegoError as exc:
        _fail(exc)
        return
    click.echo(f"testbed '{tb.name}' is up ({mode} mode); logs in {tb.state.logs}")
    click.echo(f"  look around:  protego testbed status --name {tb.name}")
    click.echo(f"  take it down: protego testbed down --name {tb.name}")


@testbed.command()
@click.option("--name", default="pt", show_default=True)
def down(name: str) -> None:
    """Remove everything the testbed created (also after a crash)."""
    _need_root()
    try:
        tbmod.down(name, progress=_progress)
    except ProtegoError as exc:
        _fail(exc)


def _print_status(st: dict[str, Any]) -> None:
    click.echo(f"testbed {st['name']}  mode={st['mode']}  phase={st['phase']}  mgmt={st['mgmt_subnet']}")
    click.echo(f"  topology: {st['topology']}")
    backends = " ".join(f"{g}={b}" for g, b in st["gpn_backends"].items())
    click.echo(f"  ESP:      sites {st['site_esp']}{'; GPNs ' + backends if backends else ''}")
    click.echo(f"  logs:     {st['logs']}")
    health = ", ".join(
        f"{e} (pid {pid}) {'ok' if ok else 'DOWN'}"
        for e, ok, pid in zip(st["etcd"]["endpoints"], st["etcd"]["healthy"], st["etcd"]["pids"])
    )
    click.echo(f"  etcd:     {health or '-'}")
    click.echo(f"  {'NODE':<22} {'ROLE':<12} {'NETNS':<6} PROCESSES")
    for n in st["nodes"]:
        ps = " ".join(f"{p['kind']}({p['pid']},{'up' if p['alive'] else 'DEAD'})" for p in n["processes"])
        click.echo(f"  {n['node']:<22} {n['role']:<12} {'ok' if n['present'] else 'GONE':<6} {ps}")
    if st["tunnels"]:
        click.echo(f"  {'SITE':<14} {'IKE':<12} {'CHILD':<10} {'SPI IN':<10} {'SPI OUT':<10} ALG")
        for site, t in st["tunnels"].items():
            alg = f"{t.get('encr') or '-'}-{t.get('encr_keysize') or ''}"
            click.echo(
                f"  {site:<14} {t.get('ike_state') or '-':<12} {t.get('child_state') or '-':<10} "
                f"{t.get('spi_in') or '-':<10} {t.get('spi_out') or '-':<10} {alg}"
            )


@testbed.command()
@click.option("--name", default=None, help="One testbed (default: every testbed).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (a list when --name is omitted).")
def status(name: str | None, as_json: bool) -> None:
    """Show namespaces, processes, etcd and tunnels of the testbed(s)."""
    _need_root()
    names = [name] if name else list_testbeds()
    try:
        result = [tbmod.status(n) for n in names]
    except ProtegoError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(result[0] if name else result, indent=2))
        return
    if not result:
        click.echo("no testbed is up")
    for st in result:
        _print_status(st)


@testbed.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("node")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name: str, node: str, cmd: tuple[str, ...]) -> None:
    """Run CMD in NODE's namespace of testbed NAME (use `--` before CMD).

    On strongSwan nodes STRONGSWAN_CONF points at the node's configuration, so
    `swanctl --list-sas` talks to that node's charon.
    """
    _need_root()
    try:
        tb = tbmod.Testbed.open(name)
        ns = tb.plan.node(node).name
    except KeyError:
        nodes = ", ".join(n.node for n in tbmod.Testbed.open(name).plan.namespaces)
        raise click.ClickException(f"no node '{node}' in testbed {name} (nodes: {nodes})") from None
    except ProtegoError as exc:
        _fail(exc)
        return
    env = dict(os.environ)
    conf = tb.charon_files(node).strongswan_conf
    if conf.exists():
        env["STRONGSWAN_CONF"] = str(conf)
    sys.stdout.flush()
    os.execvpe("ip", ["ip", "netns", "exec", ns, *cmd], env)


@testbed.command()
@click.option("--name", default="pt", show_default=True)
@click.option("--mode", type=click.Choice(MODES), default="protego", show_default=True,
              help="Which system carries the tunnels: Protego, or the baseline (a gateway per tenant).")
@click.option("--topology", "topology_file", default=None, metavar="FILE|NAME",
              help=TOPOLOGY_HELP + " Only used when the testbed is not up yet.")
@click.option("--backend", type=click.Choice(GPN_BACKENDS), default=None,
              help=BACKEND_HELP + " Only used when the testbed is not up yet.")
@click.option("--seconds", type=float, default=5.0, show_default=True, help="iperf3 duration per direction.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--keep-on-failure", is_flag=True, help=KEEP_HELP)
def demo(name: str, mode: str, topology_file: str | None, backend: str | None, seconds: float, as_json: bool,
         keep_on_failure: bool) -> None:
    """Bring the testbed up if needed, send traffic over every tunnel, print a table."""
    _need_root()
    from protego.testbed.demo import format_table, row_failed, run_demo

    try:
        rows = run_demo(name, mode, seconds, _progress, keep_on_failure,  # type: ignore[arg-type]
                        topology=load_topology(topology_file), backend=backend)
    except ProtegoError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(format_table(rows))
    click.echo(f"\nThe testbed stays up. Look around: protego testbed status --name {name}; "
               f"protego testbed exec {name} s-<site> -- swanctl --list-sas", err=True)
    click.echo(f"Take it down: protego testbed down --name {name}", err=True)
    if any(row_failed(r) for r in rows):
        sys.exit(1)
