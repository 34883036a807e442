"""What a testbed needs from this host, checked before ``up`` creates anything.

``up`` used to find a missing piece only when a daemon died of it half-way (a
kernel-libipsec charon without ``/dev/net/tun`` crashes at start and looked like
"does not answer VICI"). :func:`check` looks first and fails with one message that
names every missing program and kernel feature and how to get it.

Kernel features are loaded where they are modules (``modprobe``, when this host
has it) and then tried for real in a throw-away network namespace, so a feature
that is built in, loaded, or auto-loaded on use all pass, and one that is absent
fails here rather than inside a daemon.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from protego.errors import TestbedError

log = logging.getLogger(__name__)

# Programs the testbed runs (the test suite checks that bootstrap.sh installs the
# Debian package of each, tests/unit/test_setup_packages.py).
PROGRAMS: dict[str, str] = {
    "ip": "iproute2",
    "bridge": "iproute2",
    "ping": "iputils-ping",
    "iperf3": "iperf3",
    "unshare": "util-linux",
    "mount": "mount",
    "sh": "dash",
    "chrt": "util-linux",
    "taskset": "util-linux",
    "nft": "nftables",
    "/usr/sbin/swanctl": "strongswan-swanctl",
    "/usr/lib/ipsec/charon": "strongswan-charon",
    "/usr/bin/etcd": "etcd-server",
    "/usr/bin/etcdctl": "etcd-client",
}

MODPROBE_CANDIDATES = ("/usr/sbin/modprobe", "/sbin/modprobe")


@dataclass(frozen=True)
class KernelFeature:
    name: str
    modules: tuple[str, ...]  # loaded first where they are modules
    what: str  # who needs it (for the error message)


TUN = KernelFeature("tun", ("tun",), "the sites' strongSwan kernel-libipsec (/dev/net/tun)")
VETH = KernelFeature("veth", ("veth",), "the links between the testbed's namespaces")
VXLAN = KernelFeature("vxlan", ("vxlan",), "the tenants' virtual networks")
NFTABLES = KernelFeature("nftables", ("nf_tables", "nft_numgen", "nft_limit"),
                         "the GIN/GEN's steering and rate limits")
BASE_FEATURES = (VETH, VXLAN, NFTABLES)


def modprobe_path() -> str | None:
    for p in MODPROBE_CANDIDATES:
        if os.access(p, os.X_OK):
            return p
    return None


def load_modules(modules: Iterable[str]) -> None:
    """``modprobe -q`` each module (quietly: built in or absent is decided by the test)."""
    mp = modprobe_path()
    if mp is None:
        return
    for m in modules:
        subprocess.run([mp, "-q", m], capture_output=True, timeout=30, check=False)


def missing_programs(programs: Iterable[str] = PROGRAMS) -> list[str]:
    out = []
    for prog in programs:
        if prog.startswith("/"):
            if not os.access(prog, os.X_OK):
                out.append(prog)
        elif shutil.which(prog) is None:
            out.append(prog)
    return out


def _tun_present() -> bool:
    return os.path.exists("/sys/class/misc/tun") and os.path.exists("/dev/net/tun")


def _try_in_scratch_netns(features: list[KernelFeature]) -> dict[str, str]:
    """Create what each feature stands for in a throw-away namespace; ``name -> error``."""
    ns = f"ppf-{secrets.token_hex(4)}"
    failed: dict[str, str] = {}

    def run(*cmd: str) -> str | None:
        res = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=30)
        return None if res.returncode == 0 else (res.stderr.strip() or f"exit status {res.returncode}")

    res = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        return {"netns": res.stderr.strip() or "cannot create a network namespace"}
    try:
        for f in features:
            err: str | None = None
            if f is VETH:
                err = run("ip", "link", "add", "pfa", "type", "veth", "peer", "name", "pfb")
            elif f is VXLAN:
                err = run("ip", "link", "add", "pfvx", "type", "vxlan", "id", "42", "dstport", "4789",
                          "local", "127.0.0.1")
            elif f is NFTABLES:
                err = run("nft", "add table ip pf; add chain ip pf c; "
                                 "add rule ip pf c numgen random mod 2 0 limit rate 10/second counter")
            if err:
                failed[f.name] = err
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
    return failed


def check(need_tun: bool, extra: tuple[KernelFeature, ...] = ()) -> None:
    """Raise one :class:`TestbedError` naming everything missing (programs first:
    the kernel checks use ``ip`` and ``nft``)."""
    programs = missing_programs()
    if programs:
        pkgs = sorted({PROGRAMS[p] for p in programs})
        raise TestbedError(
            f"this host lacks {', '.join(programs)} (Debian packages {', '.join(pkgs)}): "
            "run ./bootstrap.sh")
    features = [*BASE_FEATURES, *extra] + ([TUN] if need_tun else [])
    load_modules(m for f in features for m in f.modules)
    problems = []
    if need_tun and not _tun_present():
        problems.append(f"tun (for {TUN.what}): no /dev/net/tun")
    scratch = [f for f in features if f is not TUN]
    for name, err in _try_in_scratch_netns(scratch).items():
        what = next((f.what for f in scratch if f.name == name), "network namespaces")
        problems.append(f"{name} (for {what}): {err}")
    if problems:
        hint = ("load the modules (modprobe " + " ".join(sorted({m for f in features for m in f.modules})) + ")"
                if modprobe_path() else "this host has no modprobe (Debian package kmod)")
        raise TestbedError("this kernel lacks what the testbed needs: " + "; ".join(problems) + f"; {hint}")
    log.info("preflight: programs and kernel features present")
