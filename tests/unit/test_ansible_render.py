"""The Ansible roles' templates rendered for the example inventory, and what they say.

Templates are rendered with jinja2 from the role defaults, the example inventory's
host variables and the roles' private vars (the precedence Ansible applies:
defaults < inventory < role vars), evaluated lazily like Ansible does. The
results are checked against the code that runs the same processes in the testbed:
the GMN's strongswan.conf must be exactly ``protego.gmn.charon_conf.gmn_strongswan_conf``
for the same paths, and every unit's ExecStart must parse with the real click
commands. At the end, ansible-playbook itself runs the config tasks
(``--tags protego_config``) of protego_gmn and protego_gpn in ``--check --diff``
mode on this machine (host gmn1 with ``ansible_connection=local``, no apt, no
systemd) over a scratch directory pre-filled with what this renderer produced:
it must find nothing to change and must write nothing.
"""

from __future__ import annotations

import configparser
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

jinja2 = pytest.importorskip("jinja2")
yaml = pytest.importorskip("yaml")
from jinja2.defaults import DEFAULT_NAMESPACE  # noqa: E402  (range, dict, namespace ...)
from jinja2.nativetypes import NativeEnvironment  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
ROLES = ANSIBLE / "roles"
INVENTORY = ANSIBLE / "inventory.example.yml"
ANSIBLE_MANAGED = "Ansible managed"  # ansible-core's default ansible_managed


# --------------------------------------------------------------------------- #
# A small, lazy Ansible-like variable resolver
# --------------------------------------------------------------------------- #


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    return str(value).strip().lower() in ("yes", "on", "1", "true", "y", "t")


def _filters(env: jinja2.Environment) -> None:
    # the Ansible filters the roles use in templates and variables
    env.filters["bool"] = _to_bool
    env.filters["dirname"] = posixpath.dirname
    env.filters["basename"] = posixpath.basename
    env.filters["quote"] = shlex.quote


def _env(native: bool) -> jinja2.Environment:
    cls = NativeEnvironment if native else jinja2.Environment
    # Ansible's template module: trim_blocks, keep the trailing newline
    env = cls(trim_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    _filters(env)
    return env


class Vars(Mapping[str, Any]):
    """Variables of one host; strings holding Jinja are rendered on access."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self._cache: dict[str, Any] = {}
        self._native = _env(native=True)
        self._active: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        if key in self._cache:
            return self._cache[key]
        if key not in self.raw:
            raise KeyError(key)
        if key in self._active:
            raise RecursionError(f"variable {key} refers to itself")
        self._active.add(key)
        try:
            value = self.resolve(self.raw[key])
        finally:
            self._active.discard(key)
        self._cache[key] = value
        return value

    def __contains__(self, key: object) -> bool:
        return key in self.raw

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def resolve(self, value: Any) -> Any:
        if isinstance(value, str) and ("{{" in value or "{%" in value):
            return _render_native(self._native.from_string(value), self)
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        return value

    def child(self, **extra: Any) -> "Vars":
        return Vars({**self.raw, **extra})


def _render_native(tmpl: Any, variables: Mapping[str, Any]) -> Any:
    ctx = tmpl.new_context(variables, shared=True)
    return tmpl.environment.concat(tmpl.root_render_func(ctx))  # type: ignore[attr-defined]


def render_file(path: Path, variables: Mapping[str, Any]) -> str:
    env = _env(native=False)
    tmpl = env.from_string(path.read_text())
    ctx = tmpl.new_context(variables, shared=True)
    return "".join(tmpl.root_render_func(ctx))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) or {}


def load_inventory(path: Path = INVENTORY) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    """(groups, hostvars) of a YAML inventory: all.vars < group vars < host vars."""
    inv = load_yaml(path)
    groups: dict[str, list[str]] = {"all": [], "ungrouped": []}
    hostvars: dict[str, dict[str, Any]] = {}

    def walk(name: str, node: dict[str, Any], inherited: dict[str, Any]) -> list[str]:
        node = node or {}
        gvars = {**inherited, **(node.get("vars") or {})}
        members: list[str] = []
        for host, hv in (node.get("hosts") or {}).items():
            hostvars.setdefault(host, {}).update({**gvars, **(hv or {})})
            members.append(host)
        for child, cnode in (node.get("children") or {}).items():
            members += walk(child, cnode, gvars)
        groups[name] = sorted(set(groups.get(name, [])) | set(members), key=members.index)
        return members

    walk("all", inv["all"], {})
    return groups, hostvars


GROUPS, HOSTVARS = load_inventory()


def host_vars(host: str, roles: list[str], **overrides: Any) -> Vars:
    """The variables a role's tasks see on ``host`` (roles: dependencies first)."""
    raw: dict[str, Any] = {}
    for r in roles:
        raw.update(load_yaml(ROLES / r / "defaults" / "main.yml"))
    raw.update(HOSTVARS.get(host, {}))
    raw.update(overrides)  # like -e / inventory overrides, below role vars
    for r in roles:
        raw.update(load_yaml(ROLES / r / "vars" / "main.yml"))
    magic = {
        "inventory_hostname": host,
        "group_names": sorted(g for g, m in GROUPS.items() if host in m and g not in ("all", "ungrouped")),
        "groups": GROUPS,
        "hostvars": HOSTVARS,
        "playbook_dir": str(ANSIBLE),
        "ansible_managed": ANSIBLE_MANAGED,
    }
    raw.update(magic)
    return Vars({**DEFAULT_NAMESPACE, **raw})


ROLE_CHAIN = {
    "protego_gmn": ["protego_common", "protego_gmn"],
    "protego_gpn": ["protego_common", "protego_gpn"],
    "protego_lb": ["protego_common", "protego_lb"],
    "protego_etcd": ["protego_etcd"],
    "protego_common": ["protego_common"],
}


def render(role: str, template: str, host: str, **overrides: Any) -> str:
    return render_file(ROLES / role / "templates" / template, host_vars(host, ROLE_CHAIN[role], **overrides))


def unit(text: str) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=True, delimiters=("=",), interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(text)
    return cp


def etcd_endpoints(scheme: str = "http") -> list[str]:
    return [f"{scheme}://{HOSTVARS[h]['ansible_host']}:2379" for h in GROUPS["etcd"]]


# --------------------------------------------------------------------------- #
# The example inventory
# --------------------------------------------------------------------------- #


def test_example_inventory_has_every_role() -> None:
    assert len(GROUPS["etcd"]) in (1, 3, 5)
    assert len(GROUPS["gmn"]) == 2
    assert len(GROUPS["gpn"]) >= 1
    assert len(GROUPS["lb"]) >= 1
    for h in GROUPS["gmn"] + GROUPS["gpn"] + GROUPS["lb"]:
        assert "protego_fabric_address" in HOSTVARS[h], h


def test_templates_render_without_leftovers() -> None:
    """Every template of every role renders for a host of its group (StrictUndefined)."""
    where = {"protego_gmn": "gmn", "protego_gpn": "gpn", "protego_lb": "lb", "protego_etcd": "etcd",
             "protego_common": "gpn"}
    seen = 0
    for role, group in where.items():
        for t in sorted((ROLES / role / "templates").glob("*.j2")):
            for host in GROUPS[group]:
                text = render(role, t.name, host)
                assert "{{" not in text and "{%" not in text, (role, t.name)
                assert text.endswith("\n"), (role, t.name)
                seen += 1
    assert seen >= 12


# --------------------------------------------------------------------------- #
# GMN
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("host", GROUPS["gmn"])
def test_gmn_strongswan_conf_is_the_testbeds(host: str) -> None:
    from protego.gmn.charon_conf import GMN_PLUGINS, HA_PLUGIN, gmn_strongswan_conf

    v = host_vars(host, ROLE_CHAIN["protego_gmn"])
    text = render("protego_gmn", "strongswan.conf.j2", host)
    expected = gmn_strongswan_conf(Path(v["protego_gmn_vici_socket"]), Path(v["protego_gmn_plugin_socket"]),
                                   Path(v["protego_gmn_charon_log"]))
    assert text == expected
    load = re.search(r"^\s*load = (.*)$", text, re.M)
    assert load is not None
    assert load.group(1).split()[0] == "kernel-protego"
    assert load.group(1) == f"{GMN_PLUGINS} {HA_PLUGIN}"


def test_gmn_strongswan_conf_follows_the_paths() -> None:
    """Changed paths go everywhere the Python function puts them."""
    from protego.gmn.charon_conf import gmn_strongswan_conf

    text = render("protego_gmn", "strongswan.conf.j2", "gmn1", protego_gmn_run_dir="/run/pg",
                  protego_gmn_charon_log="/var/log/pg/c.log")
    assert text == gmn_strongswan_conf(Path("/run/pg/charon.vici"), Path("/run/pg/plugin.sock"),
                                       Path("/var/log/pg/c.log"))


def _exec_argv(cp: configparser.RawConfigParser, key: str = "ExecStart") -> list[str]:
    return shlex.split(cp.get("Service", key))


def _split_protego(argv: list[str], venv: str = "/opt/protego/venv") -> list[str]:
    assert argv[0] == f"{venv}/bin/protego"
    return argv[1:]


def _parse_cli(args: list[str]) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Parse ``protego [global] GROUP run [opts]`` with the real click commands."""
    import importlib

    from protego import cli as protego_cli

    top = protego_cli.cli.make_context("protego", list(args), resilient_parsing=False)
    with warnings.catch_warnings():  # click 8.2 deprecates protected_args (merged into args in 9)
        warnings.simplefilter("ignore", DeprecationWarning)
        rest = list(getattr(top, "protected_args", [])) + list(top.args)
    group_name, sub, *sub_args = rest
    target = protego_cli._COMMANDS.get(group_name) or {
        "gpn": "protego.gpn.cli:gpn", "lb": "protego.lb.cli:lb"}[group_name]
    mod, attr = target.split(":")
    group = getattr(importlib.import_module(mod), attr)
    cmd = group.get_command(top, sub)
    assert cmd is not None, f"protego {group_name} has no {sub!r} command"
    ctx = cmd.make_context(sub, list(sub_args), parent=top)
    return dict(top.params), group_name, dict(ctx.params)


@pytest.mark.parametrize("host", GROUPS["gmn"])
def test_gmn_agent_unit(host: str) -> None:
    v = host_vars(host, ROLE_CHAIN["protego_gmn"])
    cp = unit(render("protego_gmn", "protego-gmn-agent.service.j2", host))
    args = _split_protego(_exec_argv(cp))
    top, group, params = _parse_cli(args)
    assert group == "gmn"
    assert top["etcd"] == ",".join(etcd_endpoints())
    assert params["node"] == host
    assert params["fabric_addr"] == HOSTVARS[host]["protego_fabric_address"]
    assert params["vici_socket"] == v["protego_gmn_vici_socket"]
    assert params["plugin_socket"] == v["protego_gmn_plugin_socket"]
    assert params["no_vips"] is False
    assert params["ha_rt_priority"] == 10
    assert cp.get("Unit", "Before") == "protego-charon.service"
    assert cp.get("Service", "EnvironmentFile") == "-/etc/protego/etcd-client.env"
    assert cp.get("Service", "RuntimeDirectory") == "protego/gmn"
    assert cp.get("Install", "WantedBy") == "multi-user.target"
    assert params["ack_port"] == 7472  # where GPNs and GIN/GENs acknowledge directly
    # the sockets the agent serves are the ones charon's strongswan.conf names
    conf = render("protego_gmn", "strongswan.conf.j2", host)
    assert f"socket = {params['plugin_socket']}" in conf
    assert f"socket = unix://{params['vici_socket']}" in conf


def test_gmn_agent_unit_options() -> None:
    cp = unit(render("protego_gmn", "protego-gmn-agent.service.j2", "gmn2", protego_gmn_manage_vips=False,
                     protego_log_level=2, protego_gmn_lease_ttl=7, protego_gmn_extra_args=["--resync", "60"],
                     protego_gmn_ha_rt_priority=0, protego_gmn_ack_port=0))
    argv = _exec_argv(cp)
    assert argv[1:3] == ["-v", "-v"]
    top, _, params = _parse_cli(_split_protego(argv))
    assert top["verbose"] == 2
    assert params["no_vips"] is True
    assert params["lease_ttl"] == 7
    assert params["resync_interval"] == 60.0
    assert params["ha_rt_priority"] == 0
    assert params["ack_port"] == 0  # the direct acknowledgement channel off


@pytest.mark.parametrize("host", GROUPS["gmn"])
def test_gmn_charon_unit_starts_after_the_agent(host: str) -> None:
    v = host_vars(host, ROLE_CHAIN["protego_gmn"])
    cp = unit(render("protego_gmn", "protego-charon.service.j2", host))
    assert cp.get("Service", "ExecStart") == "/usr/lib/ipsec/charon"
    assert cp.get("Service", "Environment") == f"STRONGSWAN_CONF={v['protego_config_dir']}/gmn/strongswan.conf"
    assert "protego-gmn-agent.service" in cp.get("Unit", "After").split()
    assert "protego-gmn-agent.service" in cp.get("Unit", "Wants").split()
    # Wants, not Requires/BindsTo: an agent restart must not restart charon
    assert not cp.has_option("Unit", "Requires") and not cp.has_option("Unit", "BindsTo")
    assert "strongswan-starter.service" in cp.get("Unit", "Conflicts").split()
    pre = cp.get("Service", "ExecStartPre")
    assert v["protego_gmn_plugin_socket"] in pre and "-S" in pre
    assert "$" not in pre  # systemd would expand it


# --------------------------------------------------------------------------- #
# GPN, GIN/GEN
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("host", GROUPS["gpn"])
def test_gpn_unit(host: str) -> None:
    cp = unit(render("protego_gpn", "protego-gpn.service.j2", host))
    top, group, params = _parse_cli(_split_protego(_exec_argv(cp)))
    assert group == "gpn"
    assert top["etcd"] == ",".join(etcd_endpoints())
    assert params["node"] == host
    assert params["fabric_addr"] == HOSTVARS[host]["protego_fabric_address"]
    assert params["backend"] == "auto"
    assert params["workers"] == HOSTVARS[host].get("protego_gpn_workers", 0)
    assert params["no_vips"] is False and params["no_raw_esp"] is False
    assert cp.get("Service", "KillMode") == "control-group"


@pytest.mark.parametrize("host", GROUPS["lb"])
def test_lb_unit(host: str) -> None:
    cp = unit(render("protego_lb", "protego-lb.service.j2", host))
    top, group, params = _parse_cli(_split_protego(_exec_argv(cp)))
    assert group == "lb"
    assert list(params["etcd_endpoints"]) == etcd_endpoints()
    assert list(params["vips"]) == HOSTVARS[host]["protego_lb_vips"]
    assert params["node"] == host
    assert params["role"] == "both"
    assert params["hb_bind"] == HOSTVARS[host]["protego_fabric_address"]
    assert params["tag_dscp"] == 0x37
    assert params["cleanup_on_exit"] is False
    assert params["status_file"] == "/run/protego/lb/status.json"
    assert cp.get("Service", "RuntimeDirectory") == "protego/lb"


def test_lb_unit_options() -> None:
    cp = unit(render("protego_lb", "protego-lb.service.j2", "lb1", protego_lb_role="gin", protego_lb_heartbeat=False,
                     protego_lb_vips=["203.0.113.0/25", "203.0.113.128/25"], protego_lb_cleanup_on_exit=True))
    _, _, params = _parse_cli(_split_protego(_exec_argv(cp)))
    assert params["role"] == "gin" and params["no_heartbeat"] is True and params["cleanup_on_exit"] is True
    assert list(params["vips"]) == ["203.0.113.0/25", "203.0.113.128/25"]


def test_units_reach_the_agent_commands_through_the_protego_entry_point() -> None:
    """The units run ``protego <group> run``: the group must be registered in protego/cli.py."""
    from protego import cli as protego_cli

    missing = [g for g in ("gmn", "gpn", "lb") if g not in protego_cli._COMMANDS]
    if missing:
        pytest.xfail(f"not registered in protego/cli.py _COMMANDS yet: {', '.join(missing)}")


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser: unknown keys, bad values, bad ordering show up here."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    units = {"protego-gmn-agent.service": ("protego_gmn", "gmn1"), "protego-charon.service": ("protego_gmn", "gmn1"),
             "protego-gpn.service": ("protego_gpn", "gpn1"), "protego-lb.service": ("protego_lb", "lb1")}
    for name, (role, host) in units.items():
        (tmp_path / name).write_text(render(role, f"{name}.j2", host))
    res = subprocess.run([analyze, "verify", "--man=no", *(str(tmp_path / n) for n in units)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice", "SYSTEMD_LOG_COLOR": "0"})
    # the venv exists only on a deployed node (and charon where strongSwan is installed)
    noise = re.compile(r"^protego-[a-z-]+\.service: Command "
                       r"(/opt/protego/venv/bin/protego|/usr/lib/ipsec/charon) is not executable")
    complaints = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip() and not noise.match(ln)]
    assert not complaints, complaints


# --------------------------------------------------------------------------- #
# common: sysctls, etcd endpoints, credentials
# --------------------------------------------------------------------------- #


def _sysctls(text: str) -> dict[str, str]:
    return dict(tuple(p.strip() for p in line.split("=", 1)) for line in text.splitlines()  # type: ignore[misc]
                if line.strip() and not line.startswith("#"))


def test_sysctls_forward_on_gateway_roles_only() -> None:
    for group, forward in (("gpn", "1"), ("lb", "1"), ("gmn", "0")):
        for host in GROUPS[group]:
            s = _sysctls(render("protego_common", "sysctl.conf.j2", host))
            assert s["net.ipv4.ip_forward"] == forward, host
            assert s["net.ipv4.conf.all.rp_filter"] == "0"
    s = _sysctls(render("protego_common", "sysctl.conf.j2", "gpn1",
                        protego_sysctls={"net.core.rmem_max": 33554432}))
    assert s["net.core.rmem_max"] == "33554432"


def test_etcd_endpoints_follow_the_etcd_group() -> None:
    v = host_vars("gpn1", ROLE_CHAIN["protego_gpn"])
    assert v["protego_etcd_endpoints"] == etcd_endpoints()
    v = host_vars("gpn1", ROLE_CHAIN["protego_gpn"], protego_etcd_tls=True)
    assert v["protego_etcd_endpoints"] == etcd_endpoints("https")
    v = host_vars("gpn1", ROLE_CHAIN["protego_gpn"], protego_etcd_endpoints=["http://10.9.9.9:2379"])
    assert v["protego_etcd_endpoints"] == ["http://10.9.9.9:2379"]


def test_etcd_client_env_carries_the_credentials() -> None:
    text = render("protego_common", "etcd-client.env.j2", "gmn1", protego_etcd_user="protego",
                  protego_etcd_password="s3cret", protego_etcd_ca_file="/etc/protego/ca.pem")
    env = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert env["PROTEGO_ETCD_USER"] == "protego"
    assert env["PROTEGO_ETCD_PASSWORD"] == "s3cret"
    assert env["PROTEGO_ETCD_CACERT"] == "/etc/protego/ca.pem"


# --------------------------------------------------------------------------- #
# etcd
# --------------------------------------------------------------------------- #


def _envfile(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


@pytest.mark.parametrize("host", GROUPS["etcd"])
def test_etcd_member_settings(host: str) -> None:
    env = _envfile(render("protego_etcd", "etcd.default.j2", host))
    addr = HOSTVARS[host]["ansible_host"]
    members = env["ETCD_INITIAL_CLUSTER"].split(",")
    assert members == [f"{h}=http://{HOSTVARS[h]['ansible_host']}:2380" for h in GROUPS["etcd"]]
    assert env["ETCD_NAME"] == host
    assert f"{host}=http://{addr}:2380" in members
    assert env["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == env["ETCD_LISTEN_PEER_URLS"] == f"http://{addr}:2380"
    assert env["ETCD_ADVERTISE_CLIENT_URLS"] == f"http://{addr}:2379"
    assert env["ETCD_LISTEN_CLIENT_URLS"].split(",") == [f"http://{addr}:2379", "http://127.0.0.1:2379"]
    assert env["ETCD_INITIAL_CLUSTER_STATE"] == "new"
    assert env["ETCD_DATA_DIR"] == "/var/lib/etcd/protego"  # not Debian's default member's
    assert not any(k.startswith("ETCD_CERT") for k in env)
    # what the agents are told is what the members advertise
    agent = host_vars("gpn1", ROLE_CHAIN["protego_gpn"])
    assert env["ETCD_ADVERTISE_CLIENT_URLS"] in agent["protego_etcd_endpoints"]


def test_etcd_member_settings_with_tls() -> None:
    tls = {"protego_etcd_tls": True, "protego_etcd_cert_file": "/etc/etcd/tls/server.pem",
           "protego_etcd_key_file": "/etc/etcd/tls/server.key", "protego_etcd_trusted_ca_file": "/etc/etcd/tls/ca.pem",
           "protego_etcd_client_cert_auth": True, "protego_etcd_peer_tls": True,
           "protego_etcd_peer_cert_file": "/etc/etcd/tls/peer.pem", "protego_etcd_peer_key_file": "/etc/etcd/tls/peer.key",
           "protego_etcd_peer_trusted_ca_file": "/etc/etcd/tls/ca.pem",
           "protego_etcd_extra_env": {"quota_backend_bytes": 8589934592}}
    env = _envfile(render("protego_etcd", "etcd.default.j2", "etcd2", **tls))
    assert env["ETCD_ADVERTISE_CLIENT_URLS"] == "https://198.19.0.2:2379"
    assert all(m.split("=", 1)[1].startswith("https://") for m in env["ETCD_INITIAL_CLUSTER"].split(","))
    assert env["ETCD_CERT_FILE"] == "/etc/etcd/tls/server.pem"
    assert env["ETCD_CLIENT_CERT_AUTH"] == "true"
    assert env["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
    assert env["ETCD_QUOTA_BACKEND_BYTES"] == "8589934592"


def test_etcd_role_talks_to_its_member_where_it_listens() -> None:
    chain = ROLE_CHAIN["protego_etcd"]
    assert host_vars("etcd2", chain)["__protego_etcd_local_endpoint"] == "http://127.0.0.1:2379"
    assert host_vars("etcd2", chain, protego_etcd_listen_localhost=False)["__protego_etcd_local_endpoint"] == \
        "http://198.19.0.2:2379"
    # with TLS, the address the certificate names
    assert host_vars("etcd2", chain, protego_etcd_tls=True)["__protego_etcd_local_endpoint"] == \
        "https://198.19.0.2:2379"


def test_etcd_dropin_is_a_unit_fragment() -> None:
    cp = unit(render("protego_etcd", "etcd-dropin.conf.j2", "etcd1"))
    assert cp.get("Service", "Restart") == "on-failure"
    assert not cp.has_option("Service", "CPUSchedulingPolicy")  # dedicated etcd hosts: normal class
    cp = unit(render("protego_etcd", "etcd-dropin.conf.j2", "etcd1", protego_etcd_rt_priority=5))
    assert cp.get("Service", "CPUSchedulingPolicy") == "rr"
    assert cp.get("Service", "CPUSchedulingPriority") == "5"


# --------------------------------------------------------------------------- #
# ansible-playbook --check --diff over a scratch root (no apt, no systemd)
# --------------------------------------------------------------------------- #


def _ansible_bin(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _module_python() -> str:
    # modules need only the standard library; Debian's python starts faster than the venv's
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def _config_tasks(role: str) -> list[dict[str, Any]]:
    return [t for t in load_yaml(ROLES / role / "tasks" / "main.yml")
            if "protego_config" in (t.get("tags") or [])]


# two GMNs need their shared sealing key (a vault holds it in a real inventory)
TEST_SEAL_SECRET = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY="  # base64 of 32 test bytes
PREFILL_VARS = {"protego_gmn_seal_secret": TEST_SEAL_SECRET}


def _prefill(root_of: Any, host: str, roles: list[str]) -> None:
    """Do what the protego_config tasks do, with this module's renderer."""
    for role in roles:
        chain = ROLE_CHAIN[role]
        for task in _config_tasks(role):
            items = task.get("loop") or [None]
            for item in items:
                v = host_vars(host, chain, protego_config_root=str(root_of(host)), **PREFILL_VARS)
                if item is not None:
                    v = v.child(item=v.resolve(item))
                if "ansible.builtin.assert" in task:
                    continue
                if "ansible.builtin.file" in task:
                    a = task["ansible.builtin.file"]
                    p = Path(v.resolve(a["path"]))
                    p.mkdir(parents=True, exist_ok=True)
                    p.chmod(int(str(v.resolve(a["mode"])), 8))
                elif "ansible.builtin.template" in task:
                    a = task["ansible.builtin.template"]
                    dest = Path(v.resolve(a["dest"]))
                    dest.write_text(render_file(ROLES / role / "templates" / a["src"], v))
                    dest.chmod(int(str(a["mode"]), 8))
                else:  # pragma: no cover - test_ansible_roles forbids it
                    raise AssertionError(f"unexpected config task {task['name']}")


def _snapshot(root: Path) -> dict[str, tuple[int, float, bytes]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime, p.read_bytes() if p.is_file() else b"")
    return out


def test_ansible_check_mode_finds_the_rendered_files_current(tmp_path: Path) -> None:
    playbook = _ansible_bin("ansible-playbook")
    if playbook is None:
        pytest.skip("ansible-core is not installed (pip install 'ansible-core>=2.15')")
    scratch = tmp_path / "root"
    root_of = lambda host: scratch / host  # noqa: E731
    # one host (gmn1) runs both roles: protego_common's tasks run once, which
    # halves the time; the GPN unit is then rendered with gmn1's variables
    host = "gmn1"
    _prefill(root_of, host, ["protego_common", "protego_gmn", "protego_gpn"])
    before = _snapshot(scratch)
    assert f"{host}/etc/protego/gmn/strongswan.conf" in before
    assert f"{host}/etc/systemd/system/protego-gpn.service" in before

    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{
        "name": "config tasks of protego_gmn and protego_gpn",
        "hosts": host,
        "gather_facts": False,
        "roles": ["protego_gmn", "protego_gpn"],
    }], sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update({
        "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        "ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-rtmp"),
        "ANSIBLE_ROLES_PATH": str(ROLES),
        "ANSIBLE_CONFIG": str(tmp_path / "none.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_PIPELINING": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
    })
    res = subprocess.run(
        [playbook, "-i", str(INVENTORY), str(play), "--check", "--diff", "--tags", "protego_config",
         "-e", "ansible_connection=local", "-e", f"ansible_python_interpreter={_module_python()}",
         "-e", "protego_manage_services=false", "-e", f"protego_gmn_seal_secret={TEST_SEAL_SECRET}",
         "-e", f"protego_config_root={scratch}/{{{{ inventory_hostname }}}}"],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    recap = dict(re.findall(r"^(\S+)\s+:\s+ok=\d+\s+changed=(\d+)", res.stdout, re.M))
    assert recap == {host: "0"}, out
    # the templates and the credentials file were all visited
    for task in ("Write charon's strongswan.conf", "Write the agent's systemd unit", "Write charon's systemd unit",
                 "Write the GPN agent's systemd unit", "Write the sysctls", "Write the agents' etcd credentials",
                 "Write the GMN sealing key (the PSKs in etcd are sealed to it)"):
        assert task in out, task
    assert _snapshot(scratch) == before  # check mode wrote nothing


def test_etcd_client_env_gives_gmns_their_own_user() -> None:
    """Only the GMNs' user can read the HA mirror (charon's IKE SA keys): GMN hosts get
    it, every other host the agents' user."""
    creds = dict(protego_etcd_user="protego", protego_etcd_password="ag3nt",
                 protego_etcd_gmn_user="protego-gmn", protego_etcd_gmn_password="gmn-s3cret")

    def env_of(host: str) -> dict[str, str]:
        text = render("protego_common", "etcd-client.env.j2", host, **creds)
        return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))

    assert (env_of("gmn1")["PROTEGO_ETCD_USER"], env_of("gmn1")["PROTEGO_ETCD_PASSWORD"]) == \
        ("protego-gmn", "gmn-s3cret")
    for host in (GROUPS["gpn"][0], GROUPS["lb"][0]):
        assert (env_of(host)["PROTEGO_ETCD_USER"], env_of(host)["PROTEGO_ETCD_PASSWORD"]) == ("protego", "ag3nt")
