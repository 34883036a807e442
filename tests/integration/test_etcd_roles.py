"""Least privilege against a real etcd (issue #19): `protego etcd setup-auth` makes one
role and user per node; each is refused what it must not touch, and allowed what its
agent reads and writes. etcd's own decisions are compared with the table the roles are
made from (protego/store/roles.py), key by key."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from protego.store import roles
from protego.store.etcd import Etcd, EtcdPermissionError
from tests.conftest import unique_name
from tests.unit.test_etcd_roles import KEYS, WHO

pytestmark = pytest.mark.root

P = roles.PREFIX


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], dict[str, str], Path]]:
    """An etcd of its own (authentication is cluster-wide), set up by the CLI: the
    endpoints, each user's password, and the folder of the plan."""
    from protego.store.server import EtcdCluster

    base = tmp_path_factory.mktemp("etcd-auth")
    cluster = EtcdCluster(unique_name("ea"), str(base / "data"), str(base / "logs"), members=1)
    cluster.start(wait=True)
    try:
        eps = list(cluster.endpoints)
        with Etcd(eps) as e:  # what each role will be asked about, written before auth is on
            for key in KEYS:
                e.put(key, b"{}")
        passwords = {"root": "root-" + unique_name("pw") * 2}
        users = []
        for kind, node in WHO.values():
            name = roles.role_name(kind, node)
            passwords[name] = f"{name}-" + unique_name("pw") * 2
            (base / f"{name}.pw").write_text(passwords[name])
            users.append({"kind": kind, "node": node, "password_file": str(base / f"{name}.pw")})
        (base / "root.pw").write_text(passwords["root"])
        (base / "plan.json").write_text(json.dumps({"root_password_file": str(base / "root.pw"), "users": users}))
        out = subprocess.run([sys.executable, "-m", "protego", "--etcd", ",".join(eps), "etcd", "setup-auth",
                              "--plan", str(base / "plan.json")], capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        assert "authentication enabled" in out.stdout
        for pw in passwords.values():
            assert pw not in out.stdout + out.stderr  # never a password in the output
        yield eps, passwords, base
    finally:
        cluster.destroy()


def _client(eps: list[str], passwords: dict[str, str], user: str | None) -> Etcd:
    return Etcd(eps, user=user, password=passwords[user] if user else None, attempts=1)


def _can(fn) -> bool:  # type: ignore[no-untyped-def]
    try:
        fn()
        return True
    except EtcdPermissionError:
        return False


def test_each_role_is_refused_what_it_must_not_touch(auth_etcd: tuple[list[str], dict[str, str], Path]) -> None:
    eps, passwords, _ = auth_etcd
    for who, (kind, node) in WHO.items():
        with _client(eps, passwords, roles.role_name(kind, node)) as e:
            for key, (readers, writers) in KEYS.items():
                assert _can(lambda k=key: e.get(k)) == (who in readers), (who, "may read", key)
                assert _can(lambda k=key: e.put(k, b"{}")) == (who in writers), (who, "may write", key)


def test_what_the_agents_watch_is_readable_by_their_roles(auth_etcd: tuple[list[str], dict[str, str], Path]) -> None:
    """The prefixes the GPN and GIN/GEN agents watch (their own modules' constants)."""
    from protego.control.acks import ACKS_PREFIX
    from protego.lb import agent as lb_agent
    from protego.lb import model as lb_model

    eps, passwords, _ = auth_etcd
    watched = {
        "gpn-gpn1": [f"{P}sas/", f"{P}vnet/", f"{P}steer/", ACKS_PREFIX],
        "lb-lb1": [lb_model.PREFIX + sub for sub in lb_agent.WATCHED] + [ACKS_PREFIX],
    }
    for user, prefixes in watched.items():
        with _client(eps, passwords, user) as e:
            for prefix in prefixes:
                e.get_prefix(prefix)  # raises EtcdPermissionError if refused
            with pytest.raises(EtcdPermissionError):
                e.get_prefix(f"{P}secrets/")


def test_without_credentials_nothing_and_setup_again_changes_nothing(
        auth_etcd: tuple[list[str], dict[str, str], Path]) -> None:
    eps, passwords, base = auth_etcd
    with _client(eps, passwords, None) as e:
        assert not _can(lambda: e.get(f"{P}tenants/acme"))
    # again, as root: idempotent (a node added later is set up the same way)
    env = {"PROTEGO_ETCD_USER": "root", "PROTEGO_ETCD_PASSWORD": passwords["root"]}
    import os

    out = subprocess.run([sys.executable, "-m", "protego", "--etcd", ",".join(eps), "etcd", "setup-auth",
                          "--plan", str(base / "plan.json")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env}, check=False)
    assert out.returncode == 0, out.stderr
    assert "roles created: -; users created: -" in out.stdout
    with _client(eps, passwords, "lb-lb1") as e:
        assert not _can(lambda: e.get(f"{P}sas/203.0.113.11/c0000001"))
        assert _can(lambda: e.get(f"{P}steer/in/203.0.113.11/c0000001"))
