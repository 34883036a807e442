"""The etcd roles of least privilege (protego/store/roles.py): what each may touch, as
computed here (the integration test checks etcd decides the same)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protego.errors import ConfigError
from protego.store import roles
from protego.store.cli import load_plan

P = roles.PREFIX


def test_prefix_end_is_the_first_key_after_the_prefix() -> None:
    assert roles.prefix_end("/protego/v1/sas/") == "/protego/v1/sas0"
    assert roles.prefix_end("a\xff") == "b"


def test_a_prefix_minus_holes_covers_everything_else_and_nothing_of_the_holes() -> None:
    gs = roles._prefix_except(P, (f"{P}sas/", f"{P}acks/keys/"), roles.READWRITE)
    for key in (f"{P}tenants/acme", f"{P}acks/", f"{P}acks/keyz", f"{P}sas", f"{P}sas0", f"{P}sastats/v/1",
                f"{P}zzz", P):
        assert roles.allowed(gs, key, write=True), key
    for key in (f"{P}sas/203.0.113.11/c0000001", f"{P}acks/keys/gpn/gpn1", "/protego/v2/x", "/protego/ha/v1/ike/1"):
        assert not roles.allowed(gs, key, write=False), key
    with pytest.raises(ConfigError):
        roles._prefix_except(P, ("/elsewhere/",), roles.READ)


KEYS = {  # key -> (who may read, who may write); gpn1 and lb1 are the nodes' roles
    f"{P}sas/203.0.113.11/c0000001": ({"gmn", "gpn1"}, {"gmn"}),
    f"{P}secrets/acme/hq": ({"gmn", "operator"}, {"gmn", "operator"}),
    f"{P}acks/keys/gpn/gpn1": ({"gmn", "gpn1"}, {"gmn", "gpn1"}),
    f"{P}acks/keys/gpn/gpn2": ({"gmn"}, {"gmn"}),
    f"{P}acks/keys/lb/lb1": ({"gmn", "lb1"}, {"gmn", "lb1"}),
    f"{P}steer/in/203.0.113.11/c0000001": ({"gmn", "gpn1", "lb1", "operator"}, {"gmn", "operator"}),
    f"{P}gpn/nodes/gpn1": ({"gmn", "gpn1", "lb1", "operator"}, {"gmn", "gpn1", "operator"}),
    f"{P}gpn/nodes/gpn2": ({"gmn", "lb1", "operator"}, {"gmn", "operator"}),
    f"{P}gpn/load/gpn2": ({"gmn", "operator"}, {"gmn", "operator"}),
    f"{P}gpn/health/gpn1": ({"gmn", "lb1", "operator"}, {"gmn", "lb1", "operator"}),
    f"{P}lb/applied/lb2": ({"gmn", "operator"}, {"gmn", "operator"}),
    f"{P}tenants/acme": ({"gmn", "lb1", "operator"}, {"gmn", "operator"}),
    f"{P}sastats/203.0.113.11/c0000001": ({"gmn", "gpn1", "operator"}, {"gmn", "gpn1", "operator"}),
    "/protego/ha/v1/ike/0001": ({"gmn"}, {"gmn"}),
}
WHO = {"gmn": ("gmn", None), "operator": ("operator", None), "gpn1": ("gpn", "gpn1"), "lb1": ("lb", "lb1")}


@pytest.mark.parametrize("key", sorted(KEYS))
def test_each_role_reaches_only_its_keys(key: str) -> None:
    readers, writers = KEYS[key]
    for who, (kind, node) in WHO.items():
        gs = roles.grants(kind, node)
        assert roles.allowed(gs, key, write=False) == (who in readers), (who, "may read", key)
        assert roles.allowed(gs, key, write=True) == (who in writers), (who, "may write", key)


def test_role_names_and_bad_node_names() -> None:
    assert roles.role_name("gpn", "gpn1") == "gpn-gpn1" and roles.role_name("gmn") == "gmn"
    for bad in ("", "a/b", "-x", "x" * 64):
        with pytest.raises(ConfigError):
            roles.role_name("lb", bad)
    with pytest.raises(ConfigError):
        roles.grants("gpn", None)
    with pytest.raises(ConfigError):
        roles.role_name("admin")


def test_a_setup_plan_takes_passwords_from_files_only(tmp_path: Path) -> None:
    (tmp_path / "root.pw").write_text("root-password-long\n")
    (tmp_path / "g1.pw").write_text("gpn1-password-long")
    (tmp_path / "short.pw").write_text("short")
    plan = {"root_password_file": str(tmp_path / "root.pw"),
            "users": [{"kind": "gpn", "node": "gpn1", "password_file": str(tmp_path / "g1.pw")},
                      {"kind": "operator", "password_file": str(tmp_path / "g1.pw")}]}
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(plan))
    root, users = load_plan(str(f))
    assert root == "root-password-long"
    assert [(u.name, u.password) for u in users] == [("gpn-gpn1", "gpn1-password-long"),
                                                     ("operator", "gpn1-password-long")]
    for broken, why in (({**plan, "users": [{"kind": "gpn", "password_file": str(tmp_path / "g1.pw")}]}, "per node"),
                        ({**plan, "users": plan["users"] * 2}, "twice"),
                        ({**plan, "root_password_file": str(tmp_path / "short.pw")}, "shorter than 12"),
                        ({**plan, "users": [{"kind": "gpn", "node": "gpn1", "password_file": "/nonexistent"}]},
                         "cannot read")):
        f.write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match=why) as exc:
            load_plan(str(f))
        assert "password-long" not in str(exc.value)  # never a password in an error


def test_every_client_takes_its_credentials_from_the_environment() -> None:
    """The CLI, the agents (the GIN/GEN's made its own client without them) and the
    testbed make their etcd clients with the environment's credentials."""
    from protego.store.etcd import etcd_from_env

    with pytest.raises(ConfigError, match="user and password go together"):
        etcd_from_env(["127.0.0.1:2379"], env={"PROTEGO_ETCD_USER": "gpn-gpn1"})
    with pytest.raises(ConfigError, match="cannot read TLS files"):
        etcd_from_env(["127.0.0.1:2379"], env={"PROTEGO_ETCD_CACERT": "/nonexistent/ca.pem"})
    e = etcd_from_env(["127.0.0.1:2379"], env={})
    e.close()
