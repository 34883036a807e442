"""The kernel lane: Debian's stock kernel in a QEMU guest, for what needs kernel ESP.

A host whose kernel has no ESP (no kernel IPsec) can still run what needs it: the
lane boots Debian's own ``linux-image-amd64`` kernel under QEMU's software
emulation (TCG) with virtme-ng (``vng``). The guest sees this host's root file
system read-only over 9p with throw-away writable overlays (``/etc /usr /var /tmp``
..., and the repository itself), runs one command as root and hands its exit code
back. A directory given as ``rwdir`` is shared writable, for results.

* The kernel is fetched once into ``<root>/<kver>/`` (``<root>`` is
  :data:`DEFAULT_ROOT` or ``$PROTEGO_LANE_ROOT``; never under ``/var/cache``, which
  is a tmpfs inside the guest): ``apt-get download`` + ``dpkg-deb -x``, a stamp
  written last, older kernels removed (:func:`fetch_kernel`).
* :func:`status` says what the lane lacks on this host, one reason per line.
* :func:`run` boots one guest for one command with a preamble that loads the
  kernel modules Protego uses (:data:`GUEST_MODULES`), brings ``lo`` up, exports
  ``PROTEGO_LANE_GUEST=1`` and the caller's variables, and changes into the
  repository. The console goes to a log file (and optionally a callback); on
  timeout the whole QEMU process group is killed by its id.

The guest is for correctness only: emulation makes it roughly ten times slower
than the host, so nothing measured in it is a performance figure.

Pure parts (:func:`parse_depends`, :func:`guest_script`, :func:`vng_argv`,
:func:`missing_reasons`, :func:`runs_to_prune`) take no I/O; the rest is the edge.
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from protego.errors import ProtegoError

__all__ = [
    "DEFAULT_ROOT",
    "GUEST_ENV",
    "GUEST_MODULES",
    "GuestRun",
    "LaneError",
    "LaneTimeout",
    "fetch_kernel",
    "in_guest",
    "installed_kernel",
    "kernel_package",
    "lane",
    "lane_root",
    "lane_timeout",
    "new_run_dir",
    "repo_root",
    "run",
    "run_guest",
    "status",
]

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/var/lib/protego/lane")
ROOT_ENV = "PROTEGO_LANE_ROOT"
GUEST_ENV = "PROTEGO_LANE_GUEST"
TIMEOUT_ENV = "PROTEGO_LANE_TIMEOUT"
DEFAULT_TIMEOUT = 1200.0  # the lane's CI budget: 20 minutes

META_PACKAGE = "linux-image-amd64"
STAMP = ".protego-lane-kernel"  # in <root>/<kver>/, written after a complete unpack
LOGS = "logs"  # <root>/logs/<run>/: console log, guest script, results of one guest
KEEP_RUNS = 10
GUEST_SCRIPT = "lane-guest.sh"
READY_MARKER = "protego-lane: guest ready"

QEMU = "qemu-system-x86_64"
VNG = "vng"
BUSYBOX_NAMES = ("busybox-static", "busybox.static", "busybox")  # what vng looks for
# QEMU's translation-block cache: the default (1 GiB under TCG) inflates QEMU's RSS.
QEMU_OPTS = "-accel tcg,tb-size=256"

# Loaded in the guest when the kernel has them (Debian builds them as modules).
GUEST_MODULES = ("esp4", "xfrm_user", "xfrm_interface", "vrf", "vxlan", "veth", "tun",
                 "macvlan", "nf_tables", "nft_numgen", "nft_limit")

_KVER = re.compile(r"^\d+\.\d+\.\d+-\d+-[a-z0-9-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LaneError(ProtegoError):
    """The kernel lane cannot be set up or a guest failed to run."""


class LaneTimeout(LaneError):
    """A guest did not finish in time (its QEMU process group was killed)."""


# ----------------------------------------------------------------------------- settings

def lane_root() -> Path:
    """The lane's cache folder: ``$PROTEGO_LANE_ROOT`` or :data:`DEFAULT_ROOT`."""
    value = os.environ.get(ROOT_ENV)
    return Path(value) if value else DEFAULT_ROOT


def in_guest() -> bool:
    """True inside a kernel-lane guest (its preamble exports ``PROTEGO_LANE_GUEST=1``)."""
    return os.environ.get(GUEST_ENV) == "1"


def lane_timeout() -> float:
    """Seconds a whole guest may take: ``$PROTEGO_LANE_TIMEOUT`` or :data:`DEFAULT_TIMEOUT`."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise LaneError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise LaneError(f"{TIMEOUT_ENV}={value!r} must be more than 0 seconds")
    return seconds


def repo_root() -> Path:
    """The repository this ``protego`` package lives in (the guest sees it at the same path)."""
    return Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- pure

def parse_depends(text: str, meta: str = META_PACKAGE) -> str:
    """The kernel image package that ``apt-cache depends META`` names.

    >>> parse_depends("linux-image-amd64\\n  Depends: linux-image-6.1.0-57-amd64\\n")
    'linux-image-6.1.0-57-amd64'
    """
    for line in text.splitlines():
        key, _, value = line.strip().lstrip("|").partition(":")
        value = value.strip()
        if key == "Depends" and value.startswith("linux-image-") and not value.startswith("<"):
            return value
    raise LaneError(f"apt-cache depends {meta} names no linux-image package "
                    f"(is {meta} in the apt lists? try apt-get update)")


def kernel_version(package: str) -> str:
    """``linux-image-6.1.0-57-amd64`` -> ``6.1.0-57-amd64``."""
    kver = package.removeprefix("linux-image-")
    if kver == package or not _KVER.match(kver):
        raise LaneError(f"{package!r} is not a versioned linux-image package")
    return kver


def guest_script(command: str, *, cwd: Path, env: Mapping[str, str] | None = None,
                 modules: Sequence[str] = GUEST_MODULES) -> str:
    """The shell script a guest runs: the preamble, then ``command``.

    Module loading is best effort (``set -e`` is off): a module the kernel lacks
    is named on the console and the command still runs. The script's exit status
    is the command's.
    """
    env = dict(env or {})
    for name in env:
        if not _ENV_NAME.match(name):
            raise LaneError(f"not an environment variable name: {name!r}")
    lines = [
        "# Written by protego.lane: runs as root inside one kernel-lane guest.",
        f"modprobe -a -q {' '.join(shlex.quote(m) for m in modules)} 2>/dev/null",
        f"for m in {' '.join(shlex.quote(m) for m in modules)}; do",
        '    [ -d "/sys/module/$m" ] || modprobe -q "$m" 2>/dev/null ||',
        '        echo "protego-lane: kernel module $m not loaded" >&2',
        "done",
        "ip link set lo up",
        f"export {GUEST_ENV}=1",
        *(f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())),
        f"cd {shlex.quote(str(cwd))} || exit 125",
        (f'echo "{READY_MARKER}: kernel $(uname -r), $(nproc) CPUs, '
         'up $(cut -d" " -f1 /proc/uptime) s"'),
        command,
        "",
    ]
    return "\n".join(lines)


def vng_argv(vng: Path, vmlinuz: Path, *, script: Path, rwdir: Path, overlay: Path,
             cpus: int, memory: str) -> list[str]:
    """The ``vng`` command line that boots ``vmlinuz`` and runs ``sh script``.

    Always TCG (``--disable-kvm``): this project's hosts may offer a KVM that
    cannot run a stock kernel. The root is shared over 9p straight away (vng would
    first try virtiofsd, seconds lost where it cannot start). The kernel's console
    joins the output (``--verbose``) at ``loglevel=4``: errors, oopses and panics
    only, so a guest that dies says why. ``overlay`` (the repository) is writable
    in the guest and discarded with it; ``rwdir`` is shared with the host.
    """
    return [
        str(vng), "--run", str(vmlinuz), "--name", "protego-lane", "--disable-kvm",
        "--force-9p", "--verbose", "--append", "loglevel=4",
        "--cpus", str(cpus), "--memory", memory,
        "--rwdir", str(rwdir), "--overlay-rwdir", str(overlay),
        f"--qemu-opts={QEMU_OPTS}",
        "--exec", f"sh {shlex.quote(str(script))}",
    ]


def missing_reasons(*, is_root: bool, qemu: str | None, vng: Path | None,
                    busybox: str | None, modprobe: str | None, kernel: Path | None,
                    root: Path) -> list[str]:
    """What the lane lacks, one human-readable reason each (empty: ready)."""
    reasons = []
    if not is_root:
        reasons.append("not running as root (the guest's tests and `ip netns` need root)")
    if qemu is None:
        reasons.append(f"no {QEMU} on PATH (Debian package qemu-system-x86; "
                       "./bootstrap.sh installs it)")
    if vng is None:
        reasons.append(f"no {VNG} (virtme-ng) on PATH or next to this Python "
                       "(pip install virtme-ng==1.42; ./bootstrap.sh installs it)")
    if busybox is None:
        reasons.append("no busybox for the guest's initramfs (Debian package busybox-static; "
                       "./bootstrap.sh installs it)")
    if modprobe is None:
        reasons.append("no modprobe to load the guest's modules (Debian package kmod; "
                       "./bootstrap.sh installs it)")
    if kernel is None:
        reasons.append(f"no guest kernel fetched into {root} "
                       "(run ./bootstrap.sh or `protego lane setup`)")
    return reasons


def runs_to_prune(names: Iterable[str], keep: int = KEEP_RUNS) -> list[str]:
    """The run folders (named so that they sort by age) beyond the newest ``keep``."""
    ordered = sorted(names)
    return ordered[:-keep] if keep > 0 else ordered


# ----------------------------------------------------------------------------- kernel cache

def _find_sbin(name: str) -> str | None:
    """A system program that may live outside a user's PATH (``/sbin``)."""
    return shutil.which(name, path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin",
         "/usr/bin", "/sbin", "/bin"]))


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _apt(argv: list[str], cwd: Path | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        raise LaneError(f"no {argv[0]} here: the kernel lane fetches Debian's kernel "
                        "with apt (a Debian host)")
    logger.debug("running %s", shlex.join(argv))
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise LaneError(f"{shlex.join(argv)} took more than {timeout:.0f} s "
                        "(a slow or missing network?)") from None


def kernel_package() -> str:
    """The versioned kernel package ``linux-image-amd64`` depends on (from the apt lists)."""
    res = _apt(["apt-cache", "depends", META_PACKAGE])
    if res.returncode != 0:
        raise LaneError(f"apt-cache depends {META_PACKAGE} failed: {_last_line(res.stderr)}")
    return parse_depends(res.stdout)


def installed_kernel(root: Path | None = None) -> Path | None:
    """The ``vmlinuz`` of the newest completely fetched kernel under ``root``, if any."""
    root = root or lane_root()
    found: list[tuple[float, Path]] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return None
    for folder in entries:
        stamp = folder / STAMP
        vmlinuz = folder / "boot" / f"vmlinuz-{folder.name}"
        if stamp.is_file() and vmlinuz.is_file():
            found.append((stamp.stat().st_mtime, vmlinuz))
    return max(found)[1] if found else None


def _download(package: str, into: Path) -> Path:
    """``apt-get download package`` into ``into``; on failure refresh the lists once."""
    res = _apt(["apt-get", "download", package], cwd=into)
    if res.returncode != 0:
        logger.info("apt-get download %s failed (%s): refreshing the apt lists", package,
                 _last_line(res.stderr))
        upd = _apt(["apt-get", "update", "-q"])
        if upd.returncode != 0:
            raise LaneError(f"cannot download {package}: {_last_line(res.stderr)}; and "
                            f"apt-get update failed (no network?): {_last_line(upd.stderr)}")
        res = _apt(["apt-get", "download", package], cwd=into)
        if res.returncode != 0:
            raise LaneError(f"cannot download {package} (no network, or not in the "
                            f"configured archives?): {_last_line(res.stderr)}")
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise LaneError(f"apt-get download {package} left no {package}_*.deb in {into}")
    return debs[-1]


def _deb_version(deb: Path) -> str:
    res = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True,
                         text=True, check=False)
    return res.stdout.strip() if res.returncode == 0 else "unknown"


def _depmod(tree: Path, kver: str) -> None:
    """Index the unpacked modules (the package leaves that to its postinst): the
    guest's ``modprobe`` needs ``modules.dep``."""
    depmod = _find_sbin("depmod")
    if depmod is None:
        raise LaneError("no depmod to index the guest kernel's modules (Debian package kmod; "
                        "./bootstrap.sh installs it)")
    res = subprocess.run([depmod, "-a", "-b", str(tree), kver], capture_output=True, text=True,
                         check=False)
    if res.returncode != 0 or not (tree / "lib" / "modules" / kver / "modules.dep").is_file():
        raise LaneError(f"depmod for kernel {kver} failed: {_last_line(res.stderr)}")


def fetch_kernel(root: Path | None = None,
                 report: Callable[[str], None] | None = None) -> Path:
    """Make sure the current Debian kernel is unpacked under ``root``; return its vmlinuz.

    Idempotent: a kernel folder with its stamp is kept as is (no download). A new
    kernel is downloaded and unpacked into a hidden folder, stamped last and
    renamed into place, so an interrupted fetch never looks complete. Older kernel
    folders are removed afterwards. ``report`` gets one line per thing done.
    """
    root = root or lane_root()
    say = report or (lambda line: logger.info("%s", line))
    package = kernel_package()
    kver = kernel_version(package)
    final = root / kver
    vmlinuz = final / "boot" / f"vmlinuz-{kver}"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LaneError(f"cannot create the lane's folder {root}: {exc.strerror}") from None
    if (final / STAMP).is_file() and vmlinuz.is_file():
        say(f"kernel {kver} already fetched: {vmlinuz}")
    else:
        work = root / f".fetch-{kver}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        (work / "tree").mkdir(parents=True)
        try:
            deb = _download(package, work)
            version = _deb_version(deb)
            say(f"downloaded {deb.name} ({deb.stat().st_size / 1e6:.0f} MB)")
            res = subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "tree")],
                                 capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise LaneError(f"dpkg-deb -x {deb.name} failed: {_last_line(res.stderr)}")
            tree = work / "tree"
            if not (tree / "boot" / f"vmlinuz-{kver}").is_file() or not (
                    tree / "lib" / "modules" / kver / "modules.order").is_file():
                raise LaneError(f"{deb.name} has no boot/vmlinuz-{kver} or "
                                f"lib/modules/{kver}/modules.order")
            _depmod(tree, kver)
            (tree / STAMP).write_text(json.dumps(
                {"package": package, "version": version, "kernel": kver,
                 "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
            shutil.rmtree(final, ignore_errors=True)  # an unstamped leftover
            os.rename(tree, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        say(f"unpacked kernel {kver} ({package} {version}) into {final}")
    for old in sorted(root.iterdir()):
        if old.name == kver or not old.is_dir():
            continue
        if old.name.startswith(".fetch-") or _KVER.match(old.name):
            shutil.rmtree(old, ignore_errors=True)
            say(f"removed {old}")
    return vmlinuz


# ----------------------------------------------------------------------------- status

def find_vng() -> Path | None:
    """``vng`` next to this Python (its venv) or on PATH."""
    beside = Path(sys.executable).parent / VNG
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(VNG)
    return Path(found) if found else None


def _find_busybox() -> str | None:
    return next((p for p in map(_find_sbin, BUSYBOX_NAMES) if p), None)


def status(root: Path | None = None) -> list[str]:
    """What the lane lacks on this host, as exact reasons; empty when it can run."""
    root = root or lane_root()
    return missing_reasons(
        is_root=os.geteuid() == 0, qemu=shutil.which(QEMU), vng=find_vng(),
        busybox=_find_busybox(), modprobe=_find_sbin("modprobe"), kernel=installed_kernel(root),
        root=root)


# ----------------------------------------------------------------------------- guests

@dataclass(frozen=True)
class GuestRun:
    """How one guest went."""

    returncode: int
    seconds: float  # wall time, host side, from start to exit
    boot_seconds: float | None  # until the guest's preamble ran (None: it never did)
    kernel: str
    log: Path


def new_run_dir(root: Path | None = None) -> Path:
    """A fresh ``<root>/logs/<time>-<pid>/`` for one guest's files; keeps the newest few."""
    logs = (root or lane_root()) / LOGS
    folder = logs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=False)
    except OSError as exc:
        raise LaneError(f"cannot create {folder}: {exc.strerror}") from None
    for name in runs_to_prune(p.name for p in logs.iterdir() if p.is_dir()):
        shutil.rmtree(logs / name, ignore_errors=True)
    return folder


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the guest's whole process group (vng, QEMU), by the group's id."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        logger.warning("lane guest process %d survived SIGKILL for 10 s", proc.pid)


def run_guest(command: str, *, rwdir: Path, log: Path, timeout: float, cpus: int = 2,
              memory: str = "3G", env: Mapping[str, str] | None = None,
              on_line: Callable[[str], None] | None = None, kernel: Path | None = None,
              cwd: Path | None = None, vng: Path | None = None) -> GuestRun:
    """Boot one guest that runs ``command`` (after the preamble) in ``cwd``.

    ``cwd`` defaults to the repository, which is writable in the guest and
    discarded with it; ``rwdir`` is shared with the host (the guest script is
    written there too). The console (the command's stdout and stderr) is written
    to ``log`` line by line and, from the preamble's "ready" line on, passed to
    ``on_line`` (the kernel's boot lines stay in the log). Raises :class:`LaneTimeout`
    after ``timeout`` seconds, having killed the guest. ``kernel`` and ``vng``
    default to the fetched kernel and :func:`find_vng`.
    """
    vmlinuz = kernel or installed_kernel()
    if vmlinuz is None:
        raise LaneError(f"no guest kernel fetched into {lane_root()} "
                        "(run ./bootstrap.sh or `protego lane setup`)")
    vng = vng or find_vng()
    if vng is None:
        raise LaneError(f"no {VNG} (virtme-ng) on PATH or next to {sys.executable}")
    repo = repo_root()
    rwdir.mkdir(parents=True, exist_ok=True)
    script = rwdir / GUEST_SCRIPT
    script.write_text(guest_script(command, cwd=cwd or repo, env=env))
    argv = vng_argv(vng, vmlinuz, script=script, rwdir=rwdir, overlay=repo, cpus=cpus,
                    memory=memory)
    proc_env = dict(os.environ)
    proc_env["PATH"] = f"{vng.parent}{os.pathsep}{proc_env.get('PATH', '')}"  # virtme-run
    kver = vmlinuz.name.removeprefix("vmlinuz-")
    log.parent.mkdir(parents=True, exist_ok=True)
    logger.info("booting a lane guest (kernel %s, %d CPUs, %s): %s; console: %s",
                kver, cpus, memory, command, log)
    start = time.monotonic()
    boot: float | None = None
    with log.open("w", encoding="utf-8") as out:
        out.write(f"protego-lane: host: {shlex.join(argv)}\n"
                  f"protego-lane: host: guest command: {command}\n")
        out.flush()

        def emit(raw: bytes) -> None:
            nonlocal boot
            line = raw.decode("utf-8", errors="replace").rstrip("\r")
            if boot is None and line.startswith(READY_MARKER):
                boot = time.monotonic() - start
                line = f"{line} (host: {boot:.1f} s after start)"
            out.write(line + "\n")
            out.flush()
            if on_line is not None and boot is not None:  # the boot's own lines: log only
                on_line(line)

        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=proc_env, cwd=repo,
                                start_new_session=True)
        assert proc.stdout is not None
        try:
            deadline = start + timeout
            fd = proc.stdout.fileno()
            buf = b""
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise subprocess.TimeoutExpired(argv, timeout)
                    if not sel.select(min(remaining, 1.0)):
                        continue
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    *lines, buf = (buf + chunk).split(b"\n")
                    for raw in lines:
                        emit(raw)
            if buf:
                emit(buf)
            code = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out.write(f"protego-lane: host: no exit after {timeout:.0f} s: "
                      f"killed the guest's process group {proc.pid}\n")
            raise LaneTimeout(f"the kernel lane's guest did not finish within {timeout:.0f} s "
                              f"and was killed (console log: {log})") from None
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            proc.stdout.close()
        seconds = time.monotonic() - start
        out.write(f"protego-lane: host: guest exited with status {code} after {seconds:.1f} s"
                  f"{'' if boot is None else f' (booted in {boot:.1f} s)'}\n")
    logger.info("lane guest exited with status %d after %.1f s", code, seconds)
    return GuestRun(code, seconds, boot, kver, log)


def run(command: str, *, rwdir: Path, log: Path, timeout: float, cpus: int = 2,
        memory: str = "3G", env: Mapping[str, str] | None = None,
        on_line: Callable[[str], None] | None = None) -> int:
    """Run ``command`` in one guest (see :func:`run_guest`); its exit code."""
    return run_guest(command, rwdir=rwdir, log=log, timeout=timeout, cpus=cpus,
                     memory=memory, env=env, on_line=on_line).returncode


# ----------------------------------------------------------------------------- CLI

@click.group()
def lane() -> None:
    """The kernel lane: Debian's kernel in a QEMU guest, for what needs kernel ESP."""


@lane.command()
def setup() -> None:
    """Fetch the guest kernel (idempotent; quick when it is cached)."""
    vmlinuz = fetch_kernel(report=click.echo)
    missing = status()
    click.echo(f"kernel lane: guest kernel {vmlinuz}")
    if missing:
        click.echo("kernel lane: not ready yet: " + "; ".join(missing))


@lane.command("status")
def status_cmd() -> None:
    """Exit 0 when a guest can boot here; else 1 with every reason."""
    missing = status()
    if missing:
        for reason in missing:
            click.echo(f"kernel lane: {reason}", err=True)
        sys.exit(1)
    click.echo(f"kernel lane: ready (kernel {installed_kernel()})")


@lane.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--timeout", type=float, default=None,
              help=f"Seconds before the guest is killed (default ${TIMEOUT_ENV} or "
                   f"{DEFAULT_TIMEOUT:.0f}).")
@click.option("--cpus", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--memory", default="3G", show_default=True)
@click.option("--rwdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Host folder the guest may write (default: this run's log folder).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run_cmd(timeout: float | None, cpus: int, memory: str, rwdir: Path | None,
            command: tuple[str, ...]) -> None:
    """Run COMMAND as root in one guest, in the repository; exit with its code.

    Example: protego lane run -- .venv/bin/protego bench dataplane --json
    """
    missing = status()
    if missing:
        raise LaneError("the kernel lane cannot run: " + "; ".join(missing))
    folder = new_run_dir()
    console = folder / "console.log"
    click.echo(f"kernel lane: console log {console}", err=True)
    result = run_guest(shlex.join(command), rwdir=(rwdir or folder).resolve(), log=console,
                       timeout=timeout if timeout is not None else lane_timeout(), cpus=cpus,
                       memory=memory, on_line=click.echo)
    boot = "never booted" if result.boot_seconds is None else \
        f"booted in {result.boot_seconds:.1f} s"
    click.echo(f"kernel lane: exit status {result.returncode} after {result.seconds:.1f} s "
               f"({boot}; console log {console})", err=True)
    sys.exit(result.returncode)
