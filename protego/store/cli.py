"""``protego etcd``: the etcd roles of least privilege (protego/store/roles.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from protego.context import CliContext
from protego.errors import ConfigError
from protego.store import roles


@click.group("etcd")
def etcd() -> None:
    """etcd authentication: one role and user per node, with only the keys it needs."""


@etcd.command("roles")
@click.argument("kind", type=click.Choice(roles.KINDS))
@click.option("--node", default=None, help="The node's name (gpn and lb roles are per node).")
def roles_cmd(kind: str, node: str | None) -> None:
    """Print what a role may read and write."""
    click.echo(f"role {roles.role_name(kind, node)}:")
    for line in roles.describe(kind, node):
        click.echo(f"  {line}")


def _password(path: str, what: str) -> str:
    try:
        pw = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if len(pw) < 12:
        raise ConfigError(f"{what}: the password in {path} is shorter than 12 characters")
    return pw


def load_plan(path: str) -> tuple[str, list[roles.User]]:
    """The root password and the users of a setup file (JSON)::

        {"root_password_file": "/etc/protego/etcd-root.pw",
         "users": [{"kind": "gpn", "node": "gpn1", "password_file": "/etc/protego/gpn1.pw"}, ...]}

    Passwords only ever come from files (never a command line)."""
    try:
        spec: Any = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("root_password_file"), str) \
            or not isinstance(spec.get("users"), list):
        raise ConfigError(f"{path}: needs root_password_file (a path) and users (a list)")
    users = []
    for i, u in enumerate(spec["users"]):
        if not isinstance(u, dict) or u.get("kind") not in roles.KINDS or not isinstance(u.get("password_file"), str):
            raise ConfigError(f"{path}: users[{i}] needs kind ({', '.join(roles.KINDS)}) and password_file")
        node = u.get("node")
        if node is not None and not isinstance(node, str):
            raise ConfigError(f"{path}: users[{i}].node is not a string")
        name = roles.role_name(u["kind"], node)  # checks the node's name
        users.append(roles.User(u["kind"], node if u["kind"] in ("gpn", "lb") else None,
                                _password(u["password_file"], f"etcd user {name}")))
    names = [u.name for u in users]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: a user is listed twice")
    return _password(spec["root_password_file"], "etcd user root"), users


@etcd.command("setup-auth")
@click.option("--plan", "plan_file", required=True, type=click.Path(dir_okay=False),
              help="JSON: root_password_file and users [{kind, node, password_file}].")
@click.pass_obj
def setup_auth(ctx: CliContext, plan_file: str) -> None:
    """Create the roles and users of a plan and enable authentication (idempotent: run it
    again after adding nodes; with authentication on, give PROTEGO_ETCD_USER=root and
    PROTEGO_ETCD_PASSWORD)."""
    root_password, users = load_plan(plan_file)
    done = roles.setup(ctx.etcd(), users, root_password)
    click.echo(f"roles created: {', '.join(done['roles']) or '-'}; users created: {', '.join(done['users']) or '-'}; "
               f"{len(users)} user(s) checked; authentication enabled")
