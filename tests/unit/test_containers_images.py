"""The container images (containers/<role>/Containerfile) and their entrypoints.

No container engine runs on this machine, so the images are not built here:
these tests parse each Containerfile (FROM/RUN/COPY/ENTRYPOINT, with a small
parser of our own) and check what it would build — the base image, exactly the
Debian packages each role needs (the GMN's derived from charon's plugin load
list in protego.gmn.charon_conf), what crosses from the build stages into the
final one, and the entrypoint scripts (present, executable, ``bash -n``; the
GMN's and the others' are also run against stand-in binaries).
``PROTEGO_BUILD_IMAGES=1`` with podman or docker on PATH builds them for real.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "containers"
ROLES = ["gmn", "gpn", "lb"]
BASE = "debian:12-slim"

# Debian 12 (bookworm): which package ships /usr/lib/ipsec/plugins/libstrongswan-<plugin>.so
# (checked against dpkg on machines that have strongSwan installed, see below).
PLUGIN_PACKAGE = {
    "random": "libstrongswan", "nonce": "libstrongswan", "kdf": "libstrongswan", "pem": "libstrongswan",
    "pkcs1": "libstrongswan", "x509": "libstrongswan", "pubkey": "libstrongswan",
    "kernel-netlink": "libstrongswan", "openssl": "libstrongswan-standard-plugins",
    "socket-default": "strongswan-libcharon", "vici": "strongswan-swanctl", "ha": "libcharon-extra-plugins",
}
# Depends: of the packages that matter here (bookworm)
DEPENDS = {
    "strongswan-charon": {"libstrongswan", "strongswan-libcharon", "strongswan-starter", "iproute2"},
    "strongswan-swanctl": {"libstrongswan", "strongswan-libcharon"},
    "libstrongswan-standard-plugins": {"libstrongswan"},
    "libcharon-extra-plugins": {"libstrongswan"},
    "strongswan-starter": {"libstrongswan", "strongswan-libcharon"},
    "python3-nftables": {"libnftables1", "python3"},
}
# exactly what each final image installs
FINAL_PACKAGES = {
    "gmn": {"python3", "strongswan-charon", "strongswan-swanctl", "libstrongswan-standard-plugins",
            "libcharon-extra-plugins"},
    "gpn": {"python3"},
    "lb": {"python3", "python3-nftables"},
}
PLUGIN_SO = "/usr/lib/ipsec/plugins/libstrongswan-kernel-protego.so"
PLUGIN_CONF = "/etc/strongswan.d/charon/kernel-protego.conf"


# --------------------------------------------------------------------------- #
# a small Containerfile parser
# --------------------------------------------------------------------------- #


@dataclass
class Instruction:
    op: str
    args: str
    line: int

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        if self.args.lstrip().startswith("["):
            return {}, list(json.loads(self.args))
        words = shlex.split(self.args)
        flags = {}
        while words and words[0].startswith("--"):
            k, _, v = words.pop(0)[2:].partition("=")
            flags[k] = v
        return flags, words


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def ops(self, op: str) -> list[Instruction]:
        return [i for i in self.instructions if i.op == op]

    def apt_packages(self) -> set[str]:
        pkgs: set[str] = set()
        for run in self.ops("RUN"):
            for cmd in re.split(r"&&|;|\|\|", run.args):
                words = shlex.split(cmd)
                if len(words) >= 2 and words[0] in ("apt-get", "apt") and "install" in words:
                    rest = words[words.index("install") + 1:]
                    pkgs |= {w for w in rest if not w.startswith("-")}
        return pkgs


def parse_containerfile(path: Path) -> list[Stage]:
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append((start, buf + line))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    stages: list[Stage] = []
    for n, text in logical:
        op, _, args = text.strip().partition(" ")
        op = op.upper()
        assert op in {"FROM", "RUN", "COPY", "ENTRYPOINT", "ENV", "USER", "WORKDIR", "ARG", "LABEL", "CMD"}, \
            f"{path}:{n}: unexpected instruction {op}"
        if op == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"{path}:{n}: FROM {args}"
            stages.append(Stage(words[0], name))
            continue
        assert stages, f"{path}:{n}: {op} before FROM"
        stages[-1].instructions.append(Instruction(op, args.strip(), n))
    return stages


def stages_of(role: str) -> list[Stage]:
    return parse_containerfile(CONTAINERS / role / "Containerfile")


def final(role: str) -> Stage:
    return stages_of(role)[-1]


def closure(pkgs: set[str]) -> set[str]:
    out, todo = set(), list(pkgs)
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += DEPENDS.get(p, ())
    return out


# --------------------------------------------------------------------------- #
# Containerfiles
# --------------------------------------------------------------------------- #


def test_one_containerfile_per_role_and_no_etcd_image() -> None:
    for role in ROLES:
        assert (CONTAINERS / role / "Containerfile").is_file(), role
    # etcd: Debian's etcd-server needs nothing special; the README points at the upstream image
    assert not (CONTAINERS / "etcd").exists()
    readme = (CONTAINERS / "README.md").read_text()
    assert "gcr.io/etcd-development/etcd" in readme or "quay.io/coreos/etcd" in readme


@pytest.mark.parametrize("role", ROLES)
def test_every_stage_is_debian_12_slim(role: str) -> None:
    stages = stages_of(role)
    assert all(s.base == BASE for s in stages), [s.base for s in stages]
    assert stages[-1].name is None  # the image is the last, unnamed stage
    assert len({s.name for s in stages[:-1]}) == len(stages) - 1


@pytest.mark.parametrize("role", ROLES)
def test_final_stage_installs_exactly_what_the_role_needs(role: str) -> None:
    st = final(role)
    assert st.apt_packages() == FINAL_PACKAGES[role]
    for run in st.ops("RUN"):
        if "apt-get install" in run.args:
            assert "--no-install-recommends" in run.args, run.line
            assert "rm -rf /var/lib/apt/lists" in run.args, run.line


def test_gmn_packages_follow_charons_plugin_load_list() -> None:
    from protego.gmn.charon_conf import GMN_PLUGINS, HA_PLUGIN

    plugins = [*GMN_PLUGINS.split(), HA_PLUGIN]  # the image's charon runs with ha (entrypoint.sh)
    assert plugins[0] == "kernel-protego"
    needed = {"strongswan-charon"} | {PLUGIN_PACKAGE[p] for p in plugins[1:]}  # charon + every plugin
    installed = final("gmn").apt_packages()
    assert needed <= closure(installed), needed - closure(installed)
    # nothing beyond what charon's plugins and the agent need
    minimal = {p for p in needed if not any(p in DEPENDS.get(q, ()) for q in needed)}
    assert installed == minimal | {"python3"}
    # kernel-protego comes from the plugin build stage, not from Debian
    copied = [i.flags_and_words() for i in final("gmn").ops("COPY")]
    assert any(f.get("from") == "plugin" and PLUGIN_SO in w[:-1] for f, w in copied)


def test_plugin_package_table_matches_dpkg() -> None:
    """The bookworm table above, against this machine's dpkg (when strongSwan is installed)."""
    paths = {p: f"/usr/lib/ipsec/plugins/libstrongswan-{p}.so" for p in PLUGIN_PACKAGE}
    if shutil.which("dpkg") is None or not all(Path(x).exists() for x in paths.values()):
        pytest.skip("strongSwan's plugins are not installed here")
    res = subprocess.run(["dpkg", "-S", *paths.values()], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    owner = {}
    for line in res.stdout.splitlines():
        pkg, _, path = line.partition(": ")
        owner[path.strip()] = pkg.split(":")[0]
    assert {p: owner[x] for p, x in paths.items()} == PLUGIN_PACKAGE


def test_gmn_plugin_stage_builds_with_build_sh_and_only_the_plugin_crosses() -> None:
    stages = {s.name: s for s in stages_of("gmn")}
    plugin = stages["plugin"]
    assert {"strongswan-charon", "gcc", "libc6-dev", "dpkg-dev"} <= plugin.apt_packages()
    assert any("/charon-plugins/build.sh" in r.args for r in plugin.ops("RUN"))
    crossing = set()
    for ins in final("gmn").ops("COPY"):
        flags, words = ins.flags_and_words()
        if flags.get("from") == "plugin":
            crossing |= set(words[:-1])
    assert PLUGIN_SO in crossing and PLUGIN_CONF in crossing
    assert crossing <= {PLUGIN_SO, PLUGIN_CONF, "/kernel-protego.built-against"}
    # the final image checks it runs the strongSwan the plugin was built and ABI-checked against
    assert any("built-against" in r.args and "dpkg-query" in r.args for r in final("gmn").ops("RUN"))


@pytest.mark.parametrize("role", ROLES)
def test_protego_package_is_pip_installed_into_a_venv(role: str) -> None:
    stages = {s.name: s for s in stages_of(role)}
    py = stages["python"]
    assert py.apt_packages() == {"python3", "python3-venv"}
    runs = " ".join(r.args for r in py.ops("RUN"))
    # --system-site-packages: python3-nftables (lb) comes from Debian
    assert "python3 -m venv --system-site-packages /opt/protego/venv" in runs
    assert "/opt/protego/venv/bin/pip install" in runs and "/src" in runs
    sources = [w for i in py.ops("COPY") for w in i.flags_and_words()[1][:-1]]
    assert "pyproject.toml" in sources and "protego" in sources
    copied = [i.flags_and_words() for i in final(role).ops("COPY")]
    assert ({"from": "python"}, ["/opt/protego/venv", "/opt/protego/venv"]) in copied


@pytest.mark.parametrize("role", ROLES)
def test_copies_name_existing_files_never_the_whole_tree(role: str) -> None:
    for st in stages_of(role):
        for ins in st.ops("COPY"):
            flags, words = ins.flags_and_words()
            if "from" in flags:
                continue
            for src in words[:-1]:
                assert src not in (".", "./", "*"), f"{role}:{ins.line}: copies the whole tree (.venv, .git)"
                assert (ROOT / src).exists(), f"{role}:{ins.line}: {src} does not exist"


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "(?:/.*)?$")  # a matched directory covers what is inside


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, ``!`` re-includes."""
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        if _dockerignore_regex(pat.lstrip("!").strip("/")).match(path):
            result = not neg
    return result


@pytest.mark.parametrize("role", ROLES)
def test_build_context_filter_keeps_what_is_copied_and_drops_the_rest(role: str) -> None:
    lines = (CONTAINERS / role / "Containerfile.dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    for st in stages_of(role):
        for ins in st.ops("COPY"):
            flags, words = ins.flags_and_words()
            if "from" in flags:
                continue
            for src in words[:-1]:
                assert not ignored(src.rstrip("/"), patterns), f"{role}: {src} is filtered out of the context"
                if (ROOT / src).is_dir():
                    for f in (ROOT / src).rglob("*.[chpy]"):
                        rel = str(f.relative_to(ROOT))
                        if "__pycache__" not in rel and "/build/" not in rel:
                            assert not ignored(rel, patterns), rel
    for heavy in (".venv", ".venv/lib/python3.11/site-packages/x.py", ".git/objects/ab",
                  "charon-plugins/.strongswan-src/strongswan-5.9.8/configure",
                  "charon-plugins/kernel-protego/build/libstrongswan-kernel-protego.so",
                  "protego/gmn/__pycache__/agent.cpython-311.pyc", "tests/unit/test_repo.py"):
        assert ignored(heavy, patterns), heavy


@pytest.mark.parametrize("role", ROLES)
def test_entrypoint(role: str) -> None:
    st = final(role)
    (ep,) = st.ops("ENTRYPOINT")
    _, argv = ep.flags_and_words()
    assert ep.args.startswith("["), "exec form: signals reach the script"
    target = argv[0]
    src = next(w[0] for f, w in (i.flags_and_words() for i in st.ops("COPY")) if w[-1] == target)
    script = ROOT / src
    assert script == CONTAINERS / role / "entrypoint.sh"
    assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
    assert script.read_text().startswith("#!/bin/bash\n")
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert [u.args for u in st.ops("USER")] == ["root"]


def test_gmn_entrypoint_starts_the_agent_before_charon() -> None:
    text = (CONTAINERS / "gmn" / "entrypoint.sh").read_text()
    lines = text.splitlines()
    agent = next(i for i, ln in enumerate(lines) if re.match(r'\s*"\$venv/bin/protego" .*&$', ln))
    wait = next(i for i, ln in enumerate(lines) if '[ -S "$plugin" ]' in ln)
    charon = next(i for i, ln in enumerate(lines) if re.match(r'\s*STRONGSWAN_CONF=\$conf "\$charon" &', ln))
    supervise = next(i for i, ln in enumerate(lines) if re.match(r'\s*wait -n "\$agent_pid" "\$charon_pid"', ln))
    assert agent < wait < charon < supervise
    assert "gmn_strongswan_conf" in text  # the conf comes from the same code as the testbed's


# --------------------------------------------------------------------------- #
# the entrypoints, run against stand-ins for protego and charon
# --------------------------------------------------------------------------- #


def _fake_venv(tmp: Path, protego_body: str) -> Path:
    venv = tmp / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    fake = venv / "bin" / "protego"
    fake.write_text("#!/bin/bash\n" + protego_body)
    fake.chmod(0o755)
    return venv


def _run_entrypoint(role: str, env: dict[str, str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROTEGO_")}
    return subprocess.run(["bash", str(CONTAINERS / role / "entrypoint.sh"), "--extra-flag"],
                          env={**base, **env}, capture_output=True, text=True, timeout=timeout)


def test_gmn_entrypoint_supervises_agent_and_charon(tmp_path: Path) -> None:
    """Agent first; charon once the plugin socket exists; the pair ends with either."""
    events = tmp_path / "events"
    # the stand-in agent records its arguments, serves the plugin socket and runs until killed
    venv = _fake_venv(tmp_path, f"""
echo "agent $*" >> {events}
plugin=""; prev=""
for a in "$@"; do [ "$prev" = --plugin-socket ] && plugin=$a; prev=$a; done
exec {sys.executable} -c '
import os, signal, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)
signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[2], "a").write("agent-stopped\\n"), sys.exit(0)))
while True: time.sleep(0.05)
' "$plugin" {events}
""")
    charon = tmp_path / "charon"
    # the stand-in charon checks the socket is there, records its config and dies after a moment
    charon.write_text(f"""#!/bin/bash
[ -S {tmp_path}/run/plugin.sock ] && echo "charon socket-present conf=$STRONGSWAN_CONF" >> {events}
sleep 0.5
exit 3
""")
    charon.chmod(0o755)
    conf = tmp_path / "strongswan.conf"
    t0 = time.monotonic()
    res = _run_entrypoint("gmn", {
        "PROTEGO_ETCD": "10.0.0.1:2379", "PROTEGO_NODE": "gmn7", "PROTEGO_FABRIC_ADDR": "192.0.2.17",
        "PROTEGO_RUN_DIR": str(tmp_path / "run"), "PROTEGO_GMN_CONF": str(conf),
        "PROTEGO_VENV": str(venv), "PROTEGO_CHARON": str(charon),
    })
    assert time.monotonic() - t0 < 15
    assert res.returncode == 3, res.stderr  # charon's status ends the container
    log = events.read_text().splitlines()
    assert log[0].startswith("agent -v gmn run --node gmn7 ")
    assert f"--plugin-socket {tmp_path}/run/plugin.sock" in log[0]
    assert "--fabric-addr 192.0.2.17" in log[0] and log[0].endswith("--extra-flag")
    assert log[1] == f"charon socket-present conf={conf}"
    assert log[2] == "agent-stopped"  # the survivor is stopped
    from protego.gmn.charon_conf import gmn_strongswan_conf

    assert conf.read_text() == gmn_strongswan_conf(tmp_path / "run" / "charon.vici", tmp_path / "run" / "plugin.sock",
                                                   Path("stderr"))


def test_gmn_entrypoint_exits_when_the_agent_fails_to_start(tmp_path: Path) -> None:
    venv = _fake_venv(tmp_path, "echo agent-failed >&2; exit 5\n")
    charon = tmp_path / "charon"
    charon.write_text(f"#!/bin/bash\ntouch {tmp_path}/charon-ran\n")
    charon.chmod(0o755)
    res = _run_entrypoint("gmn", {"PROTEGO_ETCD": "10.0.0.1:2379", "PROTEGO_RUN_DIR": str(tmp_path / "run"),
                                  "PROTEGO_GMN_CONF": str(tmp_path / "s.conf"), "PROTEGO_VENV": str(venv),
                                  "PROTEGO_CHARON": str(charon)})
    assert res.returncode == 5
    assert not (tmp_path / "charon-ran").exists()


def test_entrypoints_refuse_to_start_without_etcd(tmp_path: Path) -> None:
    for role in ROLES:
        res = _run_entrypoint(role, {"PROTEGO_VENV": str(tmp_path / "nowhere")})
        assert res.returncode != 0 and "PROTEGO_ETCD" in res.stderr, role


@pytest.mark.parametrize("role", ["gpn", "lb"])
def test_entrypoint_arguments_parse_with_the_real_commands(role: str, tmp_path: Path) -> None:
    from tests.unit.test_ansible_render import _parse_cli

    venv = _fake_venv(tmp_path, f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n")
    env = {"PROTEGO_ETCD": "10.0.0.1:2379,10.0.0.2:2379", "PROTEGO_NODE": f"{role}9",
           "PROTEGO_FABRIC_ADDR": "192.0.2.29", "PROTEGO_VENV": str(venv), "PROTEGO_LB_VIPS": "203.0.113.0/24"}
    res = _run_entrypoint(role, env)
    assert res.returncode == 0, res.stderr
    args = json.loads(res.stdout)
    assert args[-1] == "--extra-flag"
    top, group, params = _parse_cli(args[:-1])
    assert group == role and params["node"] == f"{role}9"
    if role == "gpn":
        assert params["fabric_addr"] == "192.0.2.29" and params["backend"] == "auto"
    else:
        assert list(params["etcd_endpoints"]) == ["10.0.0.1:2379", "10.0.0.2:2379"]
        assert list(params["vips"]) == ["203.0.113.0/24"]
        assert params["hb_bind"] == "192.0.2.29"


def test_images_build() -> None:
    engine = shutil.which("podman") or shutil.which("docker")
    if os.environ.get("PROTEGO_BUILD_IMAGES") != "1" or engine is None:
        pytest.skip("no container engine on this machine: the images are not built here "
                    "(PROTEGO_BUILD_IMAGES=1 with podman or docker builds them)")
    for role in ROLES:  # pragma: no cover - needs an engine and the network
        ignore = ["--ignorefile", f"containers/{role}/Containerfile.dockerignore"] if "podman" in engine else []
        res = subprocess.run([engine, "build", "-f", f"containers/{role}/Containerfile", *ignore,
                              "-t", f"protego-{role}:test", "."], cwd=ROOT, capture_output=True, text=True,
                             timeout=3600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
