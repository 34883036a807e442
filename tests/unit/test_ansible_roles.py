"""The Ansible rollout (ansible/): layout, variable naming, secrets, handlers, and
what ansible-core itself says about the playbook and the example inventory.

Rendered results are checked in test_ansible_render.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
ROLES = ANSIBLE / "roles"
ROLE_NAMES = ["protego_common", "protego_etcd", "protego_gmn", "protego_gpn", "protego_lb"]
# what a task may do when it carries the protego_config tag (the rendering run)
CONFIG_MODULES = {"ansible.builtin.assert", "ansible.builtin.file", "ansible.builtin.template"}
TASK_KEYWORDS = {
    "name", "when", "tags", "notify", "register", "loop", "loop_control", "vars", "become", "no_log",
    "changed_when", "failed_when", "until", "retries", "delay", "run_once", "delegate_to", "environment",
    "listen", "ignore_errors", "check_mode", "diff", "args",
}
SECRET_NAME = re.compile(r"password|secret|passphrase", re.I)
VAR_REF = re.compile(r"\b(_{0,2}protego_[a-z0-9_]+)\b")


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) or {}


def tasks_of(role: str, kind: str = "tasks") -> list[dict[str, Any]]:
    return list(load(ROLES / role / kind / "main.yml"))


def module_of(task: dict[str, Any]) -> str:
    mods = [k for k in task if k not in TASK_KEYWORDS]
    assert len(mods) == 1, f"{task.get('name')}: modules {mods}"
    return mods[0]


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def all_tasks() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for role in ROLE_NAMES:
        for kind in ("tasks", "handlers"):
            for t in tasks_of(role, kind):
                yield role, kind, t


# --------------------------------------------------------------------------- #
# layout and naming (linux-system-roles style)
# --------------------------------------------------------------------------- #


def test_layout() -> None:
    for f in ("site.yml", "inventory.example.yml", "README.md", "ansible.cfg"):
        assert (ANSIBLE / f).is_file(), f
    for role in ROLE_NAMES:
        for sub in ("defaults", "vars", "tasks", "handlers", "meta"):
            assert (ROLES / role / sub / "main.yml").is_file(), f"{role}/{sub}"
    plays = load(ANSIBLE / "site.yml")
    by_hosts = {p["hosts"]: p["roles"] for p in plays}
    assert by_hosts == {"etcd": ["protego_etcd"], "gpn": ["protego_gpn"], "lb": ["protego_lb"],
                        "gmn": ["protego_gmn"]}
    assert [p["hosts"] for p in plays][0] == "etcd"  # state store first
    for role in ("protego_gmn", "protego_gpn", "protego_lb"):
        deps = load(ROLES / role / "meta" / "main.yml")["dependencies"]
        assert {"role": "protego_common"} in deps, role


def test_public_variables_in_defaults_private_in_vars() -> None:
    for role in ROLE_NAMES:
        defaults = load(ROLES / role / "defaults" / "main.yml")
        private = load(ROLES / role / "vars" / "main.yml")
        assert defaults, role
        for k in defaults:
            assert k.startswith("protego_"), f"{role} defaults: {k}"
        for k in private:
            assert k.startswith("__protego_"), f"{role} vars: {k}"
        assert not set(defaults) & set(private)


def test_every_variable_used_is_defined() -> None:
    """A typo in a variable name is caught here, not on a production node."""
    defined: set[str] = set()
    for role in ROLE_NAMES:
        defined |= set(load(ROLES / role / "defaults" / "main.yml"))
        defined |= set(load(ROLES / role / "vars" / "main.yml"))
    registered = {t["register"] for _, _, t in all_tasks() if "register" in t}
    exprs: list[tuple[str, str]] = []  # (where, Jinja expression text)
    jinja = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)
    for path in list(ROLES.rglob("*.yml")) + list(ROLES.rglob("*.j2")):
        if "meta" in path.parts:
            continue
        exprs += [(str(path.relative_to(ANSIBLE)), m.group(0)) for m in jinja.finditer(path.read_text())]
    for role, kind, task in all_tasks():  # bare expressions
        for key in ("when", "changed_when", "failed_when", "until"):
            exprs += [(f"{role}/{kind}: {task['name']}", e) for e in strings(task.get(key))]
        if "ansible.builtin.assert" in task:
            exprs += [(f"{role}: {task['name']}", e) for e in strings(task["ansible.builtin.assert"]["that"])]
    used: dict[str, str] = {}
    for where, expr in exprs:
        for m in VAR_REF.finditer(expr):
            used.setdefault(m.group(1), where)
    assert len(used) > 40
    unknown = {k: v for k, v in used.items() if k not in defined | registered}
    assert not unknown, unknown


def test_shared_defaults_agree() -> None:
    """Variables that protego_common and protego_etcd both default must default alike."""
    common = load(ROLES / "protego_common" / "defaults" / "main.yml")
    etcd = load(ROLES / "protego_etcd" / "defaults" / "main.yml")
    shared = set(common) & set(etcd)
    assert {"protego_etcd_client_port", "protego_etcd_peer_port", "protego_etcd_tls", "protego_config_root",
            "protego_manage_services", "protego_etcd_user", "protego_etcd_password"} <= shared
    for k in shared:
        assert common[k] == etcd[k], k


def test_gmn_charon_load_list_is_the_codes() -> None:
    from protego.gmn.charon_conf import GMN_PLUGINS, HA_PLUGIN

    private = load(ROLES / "protego_gmn" / "vars" / "main.yml")
    assert private["__protego_gmn_charon_load"].split() == GMN_PLUGINS.split() + [HA_PLUGIN]
    assert GMN_PLUGINS.split()[0] == "kernel-protego"


def test_templates_exist_and_are_used() -> None:
    for role in ROLE_NAMES:
        used = {t["ansible.builtin.template"]["src"] for t in tasks_of(role) if "ansible.builtin.template" in t}
        present = {p.name for p in (ROLES / role / "templates").glob("*.j2")}
        assert used == present, role


# --------------------------------------------------------------------------- #
# secrets
# --------------------------------------------------------------------------- #


def secret_variables() -> set[str]:
    """Variables holding secrets: by name, and every variable built from one."""
    values: dict[str, Any] = {}
    for role in ROLE_NAMES:
        values.update(load(ROLES / role / "defaults" / "main.yml"))
        values.update(load(ROLES / role / "vars" / "main.yml"))
    secret = {k for k in values if SECRET_NAME.search(k)}
    grew = True
    while grew:
        grew = False
        for k, v in values.items():
            if k not in secret and any(s in "\n".join(strings(v)) for s in secret):
                secret.add(k)
                grew = True
    return secret


def touches_secret(role: str, task: dict[str, Any], secret: set[str]) -> bool:
    text = "\n".join(s for s in strings({k: v for k, v in task.items() if k != "name"}))
    if "ansible.builtin.template" in task:
        text += (ROLES / role / "templates" / task["ansible.builtin.template"]["src"]).read_text()
    return any(re.search(rf"\b{re.escape(s)}\b", text) for s in secret)


def test_secret_variables_are_known() -> None:
    secret = secret_variables()
    assert {"protego_etcd_password", "protego_etcd_root_password"} <= secret


def test_every_task_touching_a_secret_has_no_log() -> None:
    secret = secret_variables()
    touching = []
    for role, kind, task in all_tasks():
        if touches_secret(role, task, secret):
            touching.append(f"{role}/{kind}: {task['name']}")
            assert task.get("no_log") is True, f"{role}/{kind}: {task['name']} handles a secret without no_log"
    # not vacuous: the credentials file, the credential check, the auth set-up
    assert len(touching) >= 3, touching
    assert any("etcd credentials" in t for t in touching)
    assert any("authentication" in t for t in touching)


def test_example_inventory_holds_no_secrets() -> None:
    text = (ANSIBLE / "inventory.example.yml").read_text()
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        assert not SECRET_NAME.search(line), line


# --------------------------------------------------------------------------- #
# handlers, idempotence, the rendering run
# --------------------------------------------------------------------------- #


def test_notifications_reach_handlers() -> None:
    names: set[str] = set()
    for role in ROLE_NAMES:
        for h in tasks_of(role, "handlers"):
            names.add(h["name"])
            listen = h.get("listen")
            names |= set([listen] if isinstance(listen, str) else listen or [])
    for role, kind, task in all_tasks():
        notify = task.get("notify")
        for n in [notify] if isinstance(notify, str) else notify or []:
            assert n in names, f"{role}: {task['name']} notifies unknown handler {n!r}"


def test_config_changes_restart_their_services() -> None:
    expected = {
        ("protego_gmn", "strongswan.conf.j2"): "protego restart charon",
        ("protego_gmn", "protego-charon.service.j2"): "protego restart charon",
        ("protego_gmn", "protego-gmn-agent.service.j2"): "protego restart gmn agent",
        ("protego_gpn", "protego-gpn.service.j2"): "protego restart gpn",
        ("protego_lb", "protego-lb.service.j2"): "protego restart lb",
        ("protego_etcd", "etcd.default.j2"): "protego restart etcd",
        ("protego_common", "sysctl.conf.j2"): "protego apply sysctls",
        ("protego_common", "etcd-client.env.j2"): "protego restart agents",
    }
    for (role, src), handler in expected.items():
        task = next(t for t in tasks_of(role) if t.get("ansible.builtin.template", {}).get("src") == src)
        notify = task["notify"] if isinstance(task["notify"], list) else [task["notify"]]
        assert handler in notify, (role, src)
    # the package or credentials topic restarts every agent
    listeners = {r for r in ("protego_gmn", "protego_gpn", "protego_lb")
                 for h in tasks_of(r, "handlers") if h.get("listen") == "protego restart agents"}
    assert listeners == {"protego_gmn", "protego_gpn", "protego_lb"}
    # GMN handlers: the agent is restarted before charon (handlers run in file order)
    order = [h["name"] for h in tasks_of("protego_gmn", "handlers")]
    assert order.index("protego restart gmn agent") < order.index("protego restart charon")


def test_handlers_and_service_tasks_obey_manage_services() -> None:
    for role, kind, task in all_tasks():
        mod = module_of(task)
        if mod in ("ansible.builtin.systemd", "ansible.builtin.command", "ansible.builtin.shell",
                   "ansible.builtin.uri") and kind == "handlers" or mod == "ansible.builtin.systemd":
            when = task.get("when")
            when = [when] if isinstance(when, str) else when or []
            assert "protego_manage_services | bool" in when, f"{role}/{kind}: {task['name']}"


def test_commands_declare_when_they_change_something() -> None:
    for role, kind, task in all_tasks():
        if module_of(task) in ("ansible.builtin.command", "ansible.builtin.shell"):
            assert "changed_when" in task or "creates" in str(task), f"{role}: {task['name']}"


def test_config_tasks_only_write_under_the_config_root() -> None:
    """What --tags protego_config runs: files and templates under protego_config_root, nothing else."""
    count = 0
    for role in ROLE_NAMES:
        for task in tasks_of(role):
            if "protego_config" not in (task.get("tags") or []):
                continue
            mod = module_of(task)
            assert mod in CONFIG_MODULES, f"{role}: {task['name']} ({mod})"
            if mod == "ansible.builtin.file":
                assert task[mod]["path"].startswith("{{ protego_config_root }}"), task["name"]
                count += 1
            elif mod == "ansible.builtin.template":
                assert task[mod]["dest"].startswith("{{ protego_config_root }}"), task["name"]
                count += 1
            assert "notify" not in task or all(
                "protego_manage_services | bool" in str(h.get("when"))
                for r in ROLE_NAMES for h in tasks_of(r, "handlers"))
    assert count >= 10
    # every template task is a config task (so the rendering run covers them all)
    for role in ROLE_NAMES:
        for task in tasks_of(role):
            if "ansible.builtin.template" in task:
                assert "protego_config" in task["tags"], task["name"]


def test_every_task_is_named_and_tagged() -> None:
    for role, kind, task in all_tasks():
        assert task.get("name"), role
        if kind == "tasks":
            assert task.get("tags"), f"{role}: {task['name']}"


# --------------------------------------------------------------------------- #
# ansible-core
# --------------------------------------------------------------------------- #


def _ansible(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.skip("ansible-core is not installed (pip install 'ansible-core>=2.15')")
    return found


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update({"ANSIBLE_HOME": str(tmp / "home"), "ANSIBLE_LOCAL_TEMP": str(tmp / "tmp"),
                "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"})
    return env


def test_site_playbook_syntax(tmp_path: Path) -> None:
    res = subprocess.run([_ansible("ansible-playbook"), "--syntax-check", "-i", "inventory.example.yml", "site.yml"],
                         cwd=ANSIBLE, capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[WARNING]" not in res.stderr, res.stderr


def test_example_inventory_parses(tmp_path: Path) -> None:
    res = subprocess.run([_ansible("ansible-inventory"), "-i", "inventory.example.yml", "--list"],
                         cwd=ANSIBLE, capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert res.returncode == 0, res.stderr
    inv = json.loads(res.stdout)
    assert inv["gmn"]["hosts"] == ["gmn1", "gmn2"]
    assert len(inv["etcd"]["hosts"]) == 3
    assert len(inv["gpn"]["hosts"]) >= 1 and len(inv["lb"]["hosts"]) >= 1
    hv = inv["_meta"]["hostvars"]
    assert hv["lb1"]["protego_lb_vips"] == ["203.0.113.0/24"]
    assert hv["gpn3"]["protego_gpn_workers"] == 8
    fabric = [hv[h]["protego_fabric_address"] for g in ("gmn", "gpn", "lb") for h in inv[g]["hosts"]]
    assert len(set(fabric)) == len(fabric)
    # test_ansible_render reads the inventory itself: it must agree with ansible's view
    from tests.unit.test_ansible_render import HOSTVARS

    for host, own in HOSTVARS.items():
        assert {k: hv[host].get(k) for k in own} == own, host


# --------------------------------------------------------------------------- #
# etcd authentication set-up, against a stand-in etcdctl
# --------------------------------------------------------------------------- #

FAKE_ETCDCTL = r'''
import json, os, sys
state_path, log_path = os.environ["FAKE_ETCD_STATE"], os.environ["FAKE_ETCD_LOG"]
st = json.load(open(state_path)) if os.path.exists(state_path) else {
    "auth": False, "users": {}, "roles": {}}
argv = sys.argv[1:]
with open(log_path, "a") as f:
    f.write(json.dumps(argv) + "\n")
if argv[:1] == ["--endpoints"]:
    argv = argv[2:]
def fail(msg):
    print("Error: " + msg, file=sys.stderr); sys.exit(1)
if st["auth"]:
    who = os.environ.get("ETCDCTL_USER", "")
    if not who:
        fail("etcdserver: user name is empty")
    name, _, pw = who.partition(":")
    if st["users"].get(name, {}).get("password") != pw:
        fail("etcdserver: authentication failed, invalid user ID or password")
words = [a for a in argv if not a.startswith("--")]
flags = [a for a in argv if a.startswith("--")]
cmd = words[:2]
if cmd == ["user", "list"]:
    print("\n".join(st["users"]))
elif cmd == ["user", "get"]:
    u = st["users"].get(words[2]) or fail("etcdserver: user name not found")
    print(f"User: {words[2]}\nRoles: {' '.join(u['roles'])}")
elif cmd == ["role", "get"]:
    r = st["roles"].get(words[2])
    if r is None:
        fail("etcdserver: role name not found")
    print(f"Role {words[2]}")
elif cmd == ["role", "add"]:
    st["roles"][words[2]] = []
elif cmd == ["user", "add"]:
    assert "--interactive=false" in flags and ":" not in words[2]
    st["users"][words[2]] = {"password": sys.stdin.readline().rstrip("\n"), "roles": []}
elif cmd == ["user", "grant-role"]:
    if words[3] not in st["roles"]:
        fail("etcdserver: role name not found")
    st["users"][words[2]]["roles"].append(words[3])
elif cmd == ["role", "grant-permission"]:
    st["roles"][words[2]].append([words[3], words[4], "--prefix=true" in flags])
elif cmd == ["auth", "enable"]:
    if "root" not in st["users"].get("root", {}).get("roles", []):
        fail("etcdserver: root user does not have root role")
    st["auth"] = True
else:
    fail(f"unexpected {argv}")
json.dump(st, open(state_path, "w"))
'''


def test_etcd_auth_setup_is_idempotent_and_keeps_passwords_off_command_lines(tmp_path: Path) -> None:
    task = next(t for t in tasks_of("protego_etcd") if t["name"] == "Set up etcd authentication")
    assert task["no_log"] is True and task["run_once"] is True
    script = task["ansible.builtin.shell"]["cmd"]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "etcdctl").write_text(f"#!{sys.executable}\n{FAKE_ETCDCTL}")
    (fake_bin / "etcdctl").chmod(0o755)
    state, log = tmp_path / "state.json", tmp_path / "argv.log"
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "FAKE_ETCD_STATE": str(state), "FAKE_ETCD_LOG": str(log),
           "EP": "http://127.0.0.1:2379", "ROOT_PW": "r00t-pw", "AGENT_USER": "protego", "AGENT_PW": "ag3nt-pw",
           "PREFIX": "/protego/v1/", "GMN_USER": "protego-gmn", "GMN_PW": "gmn-pw", "HA_PREFIX": "/protego/ha/"}

    def run(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", script], env={**env, **extra}, capture_output=True, text=True,
                              timeout=30)

    first = run()
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "changed"
    st = json.loads(state.read_text())
    assert st["auth"] is True
    assert st["users"]["root"] == {"password": "r00t-pw", "roles": ["root"]}
    assert st["users"]["protego"] == {"password": "ag3nt-pw", "roles": ["protego"]}
    assert st["roles"]["protego"] == [["readwrite", "/protego/v1/", True]]
    # the GMNs' user alone reaches the HA mirror
    assert st["users"]["protego-gmn"] == {"password": "gmn-pw", "roles": ["protego-gmn"]}
    assert st["roles"]["protego-gmn"] == [["readwrite", "/protego/v1/", True], ["readwrite", "/protego/ha/", True]]
    second = run()
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "unchanged"
    assert json.loads(state.read_text()) == st
    assert run(ROOT_PW="wrong").returncode != 0
    argv_log = log.read_text()
    assert "r00t-pw" not in argv_log and "ag3nt-pw" not in argv_log and "wrong" not in argv_log
    assert "gmn-pw" not in argv_log
