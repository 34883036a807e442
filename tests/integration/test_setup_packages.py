"""Every Debian package the project uses is installed by its own set-up.

A machine that had a package installed by hand hides a missing install step: the
tests pass there and fail on a new machine (issue #17: the charons' ``openssl``
plugin lives in ``libstrongswan-standard-plugins``, which bootstrap.sh never
installed). These tests do not trust what is installed: for every charon plugin
named in a ``load =`` list the project writes, and every program the code runs,
they find the file, ask ``dpkg -S`` which package ships it, and require that
package to be installed by the set-up that deploys it: bootstrap.sh's list or its
dependency closure (``apt-cache depends --recurse --no-recommends``), the Ansible
role's package list, the container image's ``apt-get install``. The base system
(Debian's Essential and Priority "required" packages, which every Debian machine
has) counts as installed.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from protego.gmn.charon_conf import GMN_PLUGINS, HA_PLUGIN
from protego.testbed import preflight
from protego.testbed.strongswan import LIBIPSEC_PLUGINS

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = Path("/usr/lib/ipsec/plugins")
OURS = {"kernel-protego"}  # built and installed by charon-plugins/build.sh, not a package

pytestmark = pytest.mark.skipif(shutil.which("dpkg") is None or shutil.which("apt-cache") is None,
                                reason="not a Debian host: no dpkg/apt-cache to ask which package ships a file")


# ----------------------------------------------------------------------------- helpers

def bootstrap_packages(text: str | None = None) -> list[str]:
    """The APT_PACKAGES array of bootstrap.sh."""
    text = (ROOT / "bootstrap.sh").read_text() if text is None else text
    m = re.search(r"^APT_PACKAGES=\((.*?)^\)", text, re.S | re.M)
    assert m, "bootstrap.sh has no APT_PACKAGES=( ... ) list"
    body = "\n".join(line.split("#", 1)[0] for line in m.group(1).splitlines())
    return body.split()


@functools.lru_cache(maxsize=None)
def closure(packages: tuple[str, ...]) -> frozenset[str]:
    """``packages`` and everything they depend on (pre-depends included, no recommends)."""
    res = subprocess.run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
         "--no-breaks", "--no-replaces", "--no-enhances", *packages],
        capture_output=True, text=True, timeout=120, check=True)
    names = {line.strip().split(":")[0] for line in res.stdout.splitlines()
             if line and not line.startswith((" ", "<"))}
    return frozenset(names | set(packages))


@functools.lru_cache(maxsize=1)
def base_system() -> frozenset[str]:
    """Packages every Debian machine has: Essential, or Priority required."""
    res = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Essential} ${Priority}\n"],
                         capture_output=True, text=True, check=True)
    out = set()
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and ("yes" in parts[1:2] or parts[-1] == "required"):
            out.add(parts[0])
    return frozenset(out)


def _usrmerge_variants(path: str) -> list[str]:
    out = [path]
    for a, b in (("/usr/bin/", "/bin/"), ("/usr/sbin/", "/sbin/"), ("/usr/lib/", "/lib/")):
        if path.startswith(a):
            out.append(b + path[len(a):])
        elif path.startswith(b):
            out.append(a + path[len(b):])
    return out


def owning_package(path: str) -> str | None:
    """The Debian package that ships ``path`` (following symlinks and the /usr merge)."""
    for p in dict.fromkeys(_usrmerge_variants(path) + _usrmerge_variants(os.path.realpath(path))):
        res = subprocess.run(["dpkg", "-S", p], capture_output=True, text=True)
        for line in res.stdout.splitlines():
            if line.startswith("diversion by "):
                continue
            return line.split(":", 1)[0].split(",")[0].strip()
    return None


def plugin_words(load: str) -> list[str]:
    return [w for w in load.split() if w]


def unshipped(plugins: list[str], packages: list[str]) -> list[str]:
    """The plugins of a load list that the given set-up does not install (with why)."""
    installed = closure(tuple(packages)) | base_system()
    bad = []
    for name in plugins:
        if name in OURS:
            continue
        so = PLUGIN_DIR / f"libstrongswan-{name}.so"
        if not so.exists():
            bad.append(f"{name}: {so} does not exist on this machine (no installed package ships it)")
            continue
        pkg = owning_package(str(so))
        if pkg is None:
            bad.append(f"{name}: {so} belongs to no Debian package")
        elif pkg not in installed:
            bad.append(f"{name}: {so} is shipped by {pkg}, which is neither in the list nor a dependency of it")
    return bad


# ----------------------------------------------------------------------------- charon plugins

def test_bootstrap_installs_every_plugin_of_the_testbed_and_gmn_charons() -> None:
    """Sites, baseline gateways (LIBIPSEC_PLUGINS) and GMNs (GMN_PLUGINS + ha) on the
    machine bootstrap.sh set up."""
    plugins = plugin_words(LIBIPSEC_PLUGINS) + plugin_words(GMN_PLUGINS) + [HA_PLUGIN]
    bad = unshipped(plugins, bootstrap_packages())
    assert not bad, "\n".join(bad)


def test_the_check_catches_a_bootstrap_without_the_openssl_plugins_package() -> None:
    """The regression of issue #17: without libstrongswan-standard-plugins in bootstrap's
    list, the check names the openssl plugin and its package (even though the package is
    installed on this machine)."""
    packages = [p for p in bootstrap_packages() if p != "libstrongswan-standard-plugins"]
    bad = unshipped(plugin_words(GMN_PLUGINS), packages)
    assert any(b.startswith("openssl:") and "libstrongswan-standard-plugins" in b for b in bad), bad


def test_every_load_list_in_the_code_is_covered_by_bootstrap() -> None:
    """Any other strongswan.conf the code or the tests write (e.g. a test's own peers):
    every Python string that reads like a charon load list."""
    lists = []
    for path in [*(ROOT / "protego").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                words = node.value.split()
                if "nonce" in words and "random" in words and all(re.fullmatch(r"[a-z0-9-]+", w) for w in words):
                    lists.append((path.relative_to(ROOT), words))
    assert lists, "found no load lists: the scan is broken"
    bad = [f"{p}: {b}" for p, words in lists for b in unshipped(words, bootstrap_packages())]
    assert not bad, "\n".join(bad)


def test_the_ansible_gmn_role_installs_every_plugin_it_loads() -> None:
    role = ROOT / "ansible/roles/protego_gmn"
    load = yaml.safe_load((role / "vars/main.yml").read_text())["__protego_gmn_charon_load"]
    packages = yaml.safe_load((role / "defaults/main.yml").read_text())["protego_gmn_packages"]
    bad = unshipped(plugin_words(load), packages)
    assert not bad, "\n".join(bad)


def test_the_gmn_container_image_installs_every_plugin_it_loads() -> None:
    text = (ROOT / "containers/gmn/Containerfile").read_text()
    final = text[text.rindex("\nFROM "):]  # the image's own stage
    m = re.search(r"apt-get install -y --no-install-recommends ([^\\\n&]+)", final)
    assert m, "no apt-get install in the gmn image's final stage"
    packages = m.group(1).split()
    bad = unshipped(plugin_words(GMN_PLUGINS) + [HA_PLUGIN], packages)
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- programs

# Words that name an installed program by accident when they appear as strings in the
# code (dictionary keys, CLI arguments), never run as programs.
NOT_PROGRAMS = {"test", "true", "false", "link", "watch", "lb", "ss", "w", "dir", "last", "top", "mesg",
                "node", "route", "red", "init", "shutdown", "time"}


def programs_named_in_code() -> dict[str, set[str]]:
    """Program name -> files, for every string literal in protego/, bench/ and tests/ that
    is an executable's name found on this machine's PATH, or an absolute path to one."""
    found: dict[str, set[str]] = {}
    for path in [*(ROOT / "protego").rglob("*.py"), *(ROOT / "bench").rglob("*.py"),
                 *(ROOT / "tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            word = node.value
            if word in NOT_PROGRAMS:
                continue
            if re.fullmatch(r"[a-z][a-z0-9_.+-]{1,30}", word) or re.fullmatch(
                    r"/(usr/)?(s?bin|lib/ipsec)/[a-z0-9_.+-]+", word):
                found.setdefault(word, set()).add(str(path.relative_to(ROOT)))
    return found


def program_package(word: str) -> tuple[str, str | None] | None:
    """(path, package) of a program this machine has, None if it is not a program here
    or not a Debian one (the venv's own scripts)."""
    path = word if word.startswith("/") else shutil.which(word, path="/usr/local/sbin:/usr/local/bin:"
                                                                     "/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None or not os.path.isfile(path) or not os.access(path, os.X_OK):
        return None
    if path.startswith("/usr/local/"):
        return None  # this machine's own additions (docker's client): optional, never relied on
    return (path, owning_package(path))


def test_bootstrap_installs_every_program_the_code_runs() -> None:
    installed = closure(tuple(bootstrap_packages())) | base_system()
    found = programs_named_in_code()
    assert "iperf3" in found and "ip" in found, "the scan found no programs: it is broken"
    bad = []
    for word, files in sorted(found.items()):
        hit = program_package(word)
        if hit is None:
            continue
        path, pkg = hit
        if pkg is None:
            bad.append(f"{word} ({path}, named in {', '.join(sorted(files))}) comes from no Debian package")
        elif pkg not in installed:
            bad.append(f"{word} ({path}, named in {', '.join(sorted(files))}) is shipped by {pkg}, "
                       "which bootstrap.sh does not install")
    assert not bad, "\n".join(bad)


def test_the_testbed_preflight_knows_every_program_it_needs() -> None:
    """preflight.PROGRAMS (what `testbed up` checks first) exist here and come from the
    packages it names, all of them installed by bootstrap."""
    installed = closure(tuple(bootstrap_packages())) | base_system()
    for prog, pkg in preflight.PROGRAMS.items():
        hit = program_package(prog)
        assert hit is not None, f"{prog}: not on this machine"
        assert hit[1] == pkg, f"{prog}: shipped by {hit[1]}, preflight says {pkg}"
        assert pkg in installed, f"{prog}: {pkg} is not installed by bootstrap.sh"
