"""Processes inside network namespaces, started and stopped by PID.

A process is started with ``ip netns exec`` in a new session, optionally in a
private mount namespace with its own ``/run`` (charon hard-codes
``/run/charon.pid``).  Every wrapper ``exec``s, so the PID we record is the
daemon's own.  Stopping checks the recorded start time first: a PID that was
recycled for somebody else's process is left alone.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from protego.testbed.state import ProcRecord

log = logging.getLogger(__name__)


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    rest = raw[raw.rindex(")") + 2 :].split()
    return int(rest[19])


def children(pid: int) -> list[int]:
    """PIDs of the live processes whose parent is ``pid`` (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == str(pid) and fields[0] != "Z":
            out.append(int(d))
    return sorted(out)


def is_alive(rec: ProcRecord) -> bool:
    st = proc_start_time(rec.pid)
    if st is None or st != rec.start_time:
        return False
    try:
        state = Path(f"/proc/{rec.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def spawn(
    node: str,
    kind: str,
    netns: str | None,
    cmd: list[str],
    log_path: Path,
    *,
    private_run: bool = False,
    env: dict[str, str] | None = None,
) -> ProcRecord:
    """Start ``cmd`` in ``netns`` (host namespace when None), output appended to ``log_path``."""
    argv = list(cmd)
    if private_run:
        inner = "mount -t tmpfs -o mode=0755 tmpfs /run && exec " + shlex.join(argv)
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with open(log_path, "ab") as out:
        p = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=full_env, close_fds=True,
        )
    st = proc_start_time(p.pid)
    rec = ProcRecord(node=node, kind=kind, pid=p.pid, start_time=st or 0, cmd=cmd, log=str(log_path))
    # keep the Popen object from warning when it is garbage-collected while running
    p.returncode = 0
    log.info("started %s on %s: pid %d", kind, node, p.pid)
    return rec


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(rec: ProcRecord, timeout: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``. Returns True if it was ours and is gone."""
    if not is_alive(rec):
        reap(rec.pid)
        return False
    try:
        os.kill(rec.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap(rec.pid)
        if not is_alive(rec):
            return True
        time.sleep(0.05)
    log.warning("%s on %s (pid %d) ignored SIGTERM; killing", rec.kind, rec.node, rec.pid)
    try:
        os.kill(rec.pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    for _ in range(100):
        reap(rec.pid)
        if not is_alive(rec):
            break
        time.sleep(0.02)
    return True


def run_in(netns: str, cmd: list[str], timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short command in a namespace and wait for it."""
    return subprocess.run(
        ["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True, timeout=timeout, check=check
    )
