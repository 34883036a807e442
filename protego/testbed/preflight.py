"""What a testbed needs from this host, checked before ``up`` creates anything.

``up`` used to find a missing piece only when a daemon died of it half-way (a
kernel-libipsec charon without ``/dev/net/tun`` crashes at start and looked like
"does not answer VICI"). :func:`check` looks first and fails with one message that
names every missing program and kernel feature and how to get it.

Kernel features are loaded where they are modules (``modprobe``, when this host
has it) and then tried for real in a throw-away network namespace, so a feature
that is built in, loaded, or auto-loaded on use all pass, and one that is absent
fails here rather than inside a daemon. Kernel ESP is asked of the kernel by
:func:`protego.xfrm.probe_kernel_esp` (a throw-away SA in a fresh namespace).

What a testbed needs depends on its ESP paths (:func:`kernel_features`): TUN only
for kernel-libipsec charons; ESP for sites on kernel-netlink and for xfrm GPNs, and
for those GPNs also XFRM interfaces, VRFs and macvlan (their per-tenant separation).
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protego.errors import TestbedError

if TYPE_CHECKING:
    from protego.xfrm import EspProbeResult

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
# the kernel paths (kernel_features); ESP's ``what`` names its users
ESP_MODULES = ("esp4", "xfrm_user")
XFRM_INTERFACE = KernelFeature("xfrm_interface", ("xfrm_interface",), "the xfrm GPNs' per-tenant XFRM interfaces")
VRF = KernelFeature("vrf", ("vrf",), "the xfrm GPNs' per-tenant routing tables")
MACVLAN = KernelFeature("macvlan", ("macvlan",), "the xfrm GPNs' tenant-side interfaces")

# how each feature is tried in the scratch namespace (every command must succeed)
_SCRATCH_TESTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "veth": (("ip", "link", "add", "pfa", "type", "veth", "peer", "name", "pfb"),),
    "vxlan": (("ip", "link", "add", "pfvx", "type", "vxlan", "id", "42", "dstport", "4789",
               "local", "127.0.0.1"),),
    "nftables": (("nft", "add table ip pf; add chain ip pf c; "
                         "add rule ip pf c numgen random mod 2 0 limit rate 10/second counter"),),
    "xfrm_interface": (("ip", "link", "add", "pfxi", "type", "xfrm", "dev", "lo", "if_id", "7"),),
    "vrf": (("ip", "link", "add", "pfvrf", "type", "vrf", "table", "7"),),
    "macvlan": (("ip", "link", "add", "pfml", "type", "veth", "peer", "name", "pfmp"),
                ("ip", "link", "add", "pfmv", "link", "pfml", "type", "macvlan", "mode", "private")),
}


def kernel_features(site_esp: str, gpn_backends: Iterable[str] = ()) -> tuple[KernelFeature, ...]:
    """What the kernel paths of a testbed need beyond :data:`BASE_FEATURES` (TUN is
    ``check``'s ``need_tun``): ESP when the sites' charons use kernel-netlink
    (``site_esp == "kernel"``) or a GPN runs the ``xfrm`` backend; for xfrm GPNs also
    XFRM interfaces, VRFs and macvlan. ``auto`` GPNs need nothing: they fall back to
    the userspace engine."""
    xfrm = any(b == "xfrm" for b in gpn_backends)
    users = [u for u, needed in (("the sites' strongSwan kernel-netlink", site_esp == "kernel"),
                                 ("the xfrm GPNs", xfrm)) if needed]
    out: list[KernelFeature] = []
    if users:
        out.append(KernelFeature("esp", ESP_MODULES, " and ".join(users)))
    if xfrm:
        out += [XFRM_INTERFACE, VRF, MACVLAN]
    return tuple(out)


def probe_esp() -> "EspProbeResult":
    """Whether this kernel can do ESP: its modules loaded where they are modules,
    then a throw-away SA (:func:`protego.xfrm.probe_kernel_esp`; needs root, never raises)."""
    from protego.xfrm import probe_kernel_esp

    load_modules(ESP_MODULES)
    # the probe's own log line speaks of the GPN's backend; the testbed reports the
    # outcome in its own terms (check's error, up's progress)
    probe_log = logging.getLogger("protego.xfrm.probe")
    quiet = _DropRecords()
    probe_log.addFilter(quiet)
    try:
        result = probe_kernel_esp()
    finally:
        probe_log.removeFilter(quiet)
    log.info("preflight: kernel ESP %s", "available" if result.kernel_esp else f"absent ({_esp_problem(result)})")
    return result


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


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
            for cmd in _SCRATCH_TESTS.get(f.name, ()):
                err = run(*cmd)
                if err:
                    failed[f.name] = err
                    break
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
    return failed


def _esp_problem(result: "EspProbeResult") -> str:
    """The probe's outcome in the error's words (suite: errno name)."""
    if result.suites:
        tried = ", ".join(f"{suite} {errno_mod.errorcode.get(code, str(code))}"
                          for suite, code in result.suites.items())
        return f"the kernel refused an ESP SA ({tried})"
    code = errno_mod.errorcode.get(result.errno, str(result.errno)) if result.errno else "no errno"
    return f"no XFRM netlink socket ({code})"


def check(need_tun: bool, extra: tuple[KernelFeature, ...] = (),
          esp_probe: Callable[[], "EspProbeResult"] | None = None) -> None:
    """Raise one :class:`TestbedError` naming everything missing (programs first:
    the kernel checks use ``ip`` and ``nft``). ``need_tun``: some charon uses
    kernel-libipsec; ``extra``: e.g. :func:`kernel_features`; an ``esp`` feature
    among them is asked of ``esp_probe`` (default :func:`probe_esp`; ``up`` passes
    the result it already has)."""
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
    esp = next((f for f in features if f.name == "esp"), None)
    if esp is not None:
        result = (esp_probe or probe_esp)()
        if not result.kernel_esp:
            problems.append(f"esp (for {esp.what}): {_esp_problem(result)}")
    scratch = [f for f in features if f.name in _SCRATCH_TESTS]
    for name, err in _try_in_scratch_netns(scratch).items():
        what = next((f.what for f in scratch if f.name == name), "network namespaces")
        problems.append(f"{name} (for {what}): {err}")
    if problems:
        hint = ("load the modules (modprobe " + " ".join(sorted({m for f in features for m in f.modules})) + ")"
                if modprobe_path() else "this host has no modprobe (Debian package kmod)")
        raise TestbedError("this kernel lacks what the testbed needs: " + "; ".join(problems) + f"; {hint}")
    log.info("preflight: programs and kernel features present")
