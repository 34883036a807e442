"""Embedded etcd launcher for the testbed and the tests.

Starts Debian's ``etcd`` (3.4) as one or more members, each in its own session
(``setsid``), optionally inside a network namespace (``ip netns exec NS``), with
``--logger=zap`` writing to one log file per member. Every process is tracked by
PID *and* kernel start time *and* a marker (its data directory) on its command
line, so stopping never touches a process this module did not start, even after
PID reuse or when the state was reloaded from disk after a crash
(:meth:`EtcdCluster.state` / :meth:`EtcdCluster.from_state`).

Nothing here kills by name; there is no global state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protego.errors import ConfigError, PeerError

log = logging.getLogger(__name__)

ETCD_BIN = "/usr/bin/etcd"
ETCDCTL_BIN = "/usr/bin/etcdctl"
IP_BIN = "ip"
CHRT_BIN = "chrt"  # util-linux

DEFAULT_START_TIMEOUT = 15.0
DEFAULT_STOP_TIMEOUT = 5.0
_KILL_WAIT = 5.0
_POLL = 0.05
_START_ATTEMPTS = 3


# --------------------------------------------------------------------------- #
# Process bookkeeping (pure-ish helpers over /proc; testable without etcd)
# --------------------------------------------------------------------------- #


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return *count* distinct TCP ports that were free on *host* a moment ago."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _read_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def proc_start_time(pid: int) -> int | None:
    """Kernel start time of *pid* in clock ticks (field 22 of /proc/PID/stat)."""
    fields = _read_stat(pid)
    return int(fields[19]) if fields else None


def proc_alive(pid: int) -> bool:
    """True when *pid* exists and is neither a zombie nor dead."""
    fields = _read_stat(pid)
    return fields is not None and bool(fields) and fields[0] not in ("Z", "X", "x")


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


@dataclass(frozen=True)
class ProcessRecord:
    """Identity of a process we started: PID, kernel start time, cmdline marker."""

    pid: int
    start_time: int
    marker: str

    def is_ours(self) -> bool:
        """The same process is still alive (not a reused PID, not a zombie)."""
        if not proc_alive(self.pid):
            return False
        if proc_start_time(self.pid) != self.start_time:
            return False
        return any(self.marker in arg for arg in proc_cmdline(self.pid))

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_time": self.start_time, "marker": self.marker}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProcessRecord:
        return cls(int(d["pid"]), int(d["start_time"]), str(d["marker"]))


def _wait_gone(record: ProcessRecord, popen: subprocess.Popen[bytes] | None,
               timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if popen is not None:
            if popen.poll() is not None:
                return True
        elif not record.is_ours():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)


def terminate_process(
    record: ProcessRecord,
    popen: subprocess.Popen[bytes] | None = None,
    timeout: float = DEFAULT_STOP_TIMEOUT,
    *,
    hard: bool = False,
) -> None:
    """SIGTERM the process of *record*, SIGKILL after *timeout*, reap if ours.

    With *hard*, SIGKILL at once. Does nothing when the PID no longer designates
    the process we started.
    """
    if popen is not None:
        if popen.poll() is not None:
            return
        # an unreaped child of ours: its PID cannot have been reused
    elif not record.is_ours():
        return
    steps = [(signal.SIGKILL, _KILL_WAIT)]
    if not hard:
        steps.insert(0, (signal.SIGTERM, timeout))
    for sig, wait in steps:
        try:
            os.kill(record.pid, sig)
        except ProcessLookupError:
            break
        if _wait_gone(record, popen, wait):
            break
        log.warning("etcd pid %d did not exit after %s", record.pid, sig.name)
    else:
        raise PeerError(f"etcd pid {record.pid} survived SIGKILL")
    if popen is not None:
        try:
            popen.wait(timeout=_KILL_WAIT)
        except subprocess.TimeoutExpired as exc:  # pragma: no cover - kernel trouble
            raise PeerError(f"etcd pid {record.pid} could not be reaped") from exc


# --------------------------------------------------------------------------- #
# Command lines (pure)
# --------------------------------------------------------------------------- #


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def etcd_command(
    *,
    name: str,
    data_dir: str,
    client_url: str,
    peer_url: str,
    initial_cluster: str,
    cluster_token: str,
    netns: str | None = None,
    etcd_bin: str = ETCD_BIN,
    extra_args: Sequence[str] = (),
    rt_priority: int = 0,
) -> list[str]:
    """The argv that starts one member (``ip netns exec NS`` prefixed if asked; with
    ``rt_priority`` > 0, under ``chrt --rr``: every etcd thread in the round-robin
    real-time class, ahead of all normal processes for the CPU)."""
    if not 0 <= rt_priority <= 99:
        raise ConfigError(f"etcd real-time priority must be 0 (off) to 99, got {rt_priority}")
    argv = [
        etcd_bin,
        f"--name={name}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster={initial_cluster}",
        "--initial-cluster-state=new",
        f"--initial-cluster-token={cluster_token}",
        "--logger=zap",
        "--log-outputs=stderr",
        *extra_args,
    ]
    if rt_priority:
        argv = [CHRT_BIN, "--rr", str(rt_priority), *argv]
    if netns:
        argv = [IP_BIN, "netns", "exec", netns, *argv]
    return argv


def _child_env() -> dict[str, str]:
    # etcd reads ETCD_* from the environment: never let the caller's leak in.
    return {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "ETCDCTL_"))}


# --------------------------------------------------------------------------- #
# One member
# --------------------------------------------------------------------------- #


class EtcdMember:
    """One etcd process. Use through :class:`EtcdCluster`."""

    def __init__(
        self,
        *,
        name: str,
        data_dir: Path,
        log_file: Path,
        client_host: str,
        client_port: int,
        peer_port: int,
        initial_cluster: str,
        cluster_token: str,
        netns: str | None = None,
        etcd_bin: str = ETCD_BIN,
        extra_args: Sequence[str] = (),
        rt_priority: int = 0,
    ) -> None:
        self.name = name
        self.data_dir = Path(data_dir)
        self.log_file = Path(log_file)
        self.client_host = client_host
        self.client_port = client_port
        self.peer_port = peer_port
        self.initial_cluster = initial_cluster
        self.cluster_token = cluster_token
        self.netns = netns
        self.etcd_bin = etcd_bin
        self.extra_args = tuple(extra_args)
        self.rt_priority = rt_priority
        self._popen: subprocess.Popen[bytes] | None = None
        self._record: ProcessRecord | None = None

    # -- addresses --------------------------------------------------------- #
    @property
    def client_url(self) -> str:
        return _url(self.client_host, self.client_port)

    @property
    def peer_url(self) -> str:
        return _url(self.client_host, self.peer_port)

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client listener (what :class:`protego.store.etcd.Etcd` takes)."""
        return _hostport(self.client_host, self.client_port)

    # -- process ----------------------------------------------------------- #
    @property
    def pid(self) -> int | None:
        return self._record.pid if self._record and self.running else None

    @property
    def running(self) -> bool:
        if self._record is None:
            return False
        if self._popen is not None:
            return self._popen.poll() is None
        return self._record.is_ours()

    def command(self) -> list[str]:
        return etcd_command(
            name=self.name,
            data_dir=str(self.data_dir),
            client_url=self.client_url,
            peer_url=self.peer_url,
            initial_cluster=self.initial_cluster,
            cluster_token=self.cluster_token,
            netns=self.netns,
            etcd_bin=self.etcd_bin,
            extra_args=self.extra_args,
            rt_priority=self.rt_priority,
        )

    def start(self) -> None:
        """Spawn the process (returns at once; see :meth:`wait_healthy`)."""
        if self.running:
            raise PeerError(f"etcd member {self.name} already running (pid {self.pid})")
        if not (os.path.isfile(self.etcd_bin) and os.access(self.etcd_bin, os.X_OK)):
            raise ConfigError(f"etcd binary not found: {self.etcd_bin}")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        argv = self.command()
        with open(self.log_file, "ab") as logf:
            logf.write(f"--- protego: starting {' '.join(argv)}\n".encode())
            logf.flush()
            popen = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # setsid(): own session, no terminal signals
                close_fds=True,
                env=_child_env(),
            )
        start_time = proc_start_time(popen.pid)
        if start_time is None:  # exited already; keep the popen to report it
            start_time = -1
        self._popen = popen
        self._record = ProcessRecord(popen.pid, start_time, f"--data-dir={self.data_dir}")
        log.info("etcd member %s started pid=%d client=%s netns=%s log=%s",
                 self.name, popen.pid, self.client_url, self.netns or "-", self.log_file)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after *timeout*; reap. Idempotent."""
        if self._record is None:
            return
        terminate_process(self._record, self._popen, timeout)
        log.info("etcd member %s stopped (pid %d)", self.name, self._record.pid)
        self._popen = None
        self._record = None

    def kill(self) -> None:
        """SIGKILL at once (crash simulation); reap."""
        if self._record is None:
            return
        terminate_process(self._record, self._popen, hard=True)
        log.info("etcd member %s killed (pid %d)", self.name, self._record.pid)
        self._popen = None
        self._record = None

    def exit_code(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- health ------------------------------------------------------------ #
    def healthy(self, timeout: float = 1.0) -> bool:
        """True when this member answers ``/health`` with a leader elected."""
        if not self.running:
            return False
        if self.netns:
            argv = [IP_BIN, "netns", "exec", self.netns, ETCDCTL_BIN,
                    f"--endpoints={self.client_url}", f"--dial-timeout={timeout}s",
                    f"--command-timeout={timeout}s", "endpoint", "health"]
            try:
                res = subprocess.run(argv, capture_output=True, timeout=timeout + 2,  # noqa: S603
                                     env=_child_env(), check=False)
            except subprocess.TimeoutExpired:
                return False
            return res.returncode == 0
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=timeout) as resp:  # noqa: S310
                body = json.loads(resp.read() or b"{}")
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return str(body.get("health")).lower() == "true"

    def wait_healthy(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise PeerError(
                    f"etcd member {self.name} exited (code {self.exit_code()}); "
                    f"log {self.log_file}:\n{self.log_tail()}")
            if self.healthy():
                return
            if time.monotonic() >= deadline:
                raise PeerError(f"etcd member {self.name} not healthy after {timeout:.0f}s; "
                                f"log {self.log_file}:\n{self.log_tail()}")
            time.sleep(0.1)

    # -- persistence ------------------------------------------------------- #
    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "data_dir": str(self.data_dir),
            "log_file": str(self.log_file),
            "client_host": self.client_host,
            "client_port": self.client_port,
            "peer_port": self.peer_port,
            "initial_cluster": self.initial_cluster,
            "cluster_token": self.cluster_token,
            "netns": self.netns,
            "etcd_bin": self.etcd_bin,
            "extra_args": list(self.extra_args),
            "rt_priority": self.rt_priority,
            "process": self._record.to_dict() if self._record else None,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> EtcdMember:
        m = cls(
            name=d["name"], data_dir=Path(d["data_dir"]), log_file=Path(d["log_file"]),
            client_host=d["client_host"], client_port=int(d["client_port"]),
            peer_port=int(d["peer_port"]), initial_cluster=d["initial_cluster"],
            cluster_token=d["cluster_token"], netns=d.get("netns"),
            etcd_bin=d.get("etcd_bin", ETCD_BIN), extra_args=d.get("extra_args", ()),
            rt_priority=int(d.get("rt_priority", 0)),
        )
        if d.get("process"):
            m._record = ProcessRecord.from_dict(d["process"])
        return m

    def __repr__(self) -> str:
        return f"EtcdMember({self.name!r}, {self.client_url}, pid={self.pid})"


# --------------------------------------------------------------------------- #
# A cluster of 1..N members
# --------------------------------------------------------------------------- #


class EtcdCluster:
    """An embedded etcd cluster of *members* processes.

    Member ``i`` is named ``{name}-{i}``, keeps its data in ``{data_dir}/{name}-{i}``
    and logs to ``{log_dir}/etcd-{name}-{i}.log``. Without explicit ports, free
    loopback ports are picked (outside a netns) or 2379+2i / 2380+2i (inside one).
    ``with EtcdCluster(...) as c:`` starts it and destroys it on exit.
    """

    def __init__(
        self,
        name: str,
        data_dir: str | os.PathLike[str],
        log_dir: str | os.PathLike[str],
        members: int = 1,
        *,
        client_hosts: Sequence[str] | None = None,
        client_ports: Sequence[int] | None = None,
        peer_ports: Sequence[int] | None = None,
        netns: str | None = None,
        etcd_bin: str = ETCD_BIN,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        extra_args: Sequence[str] = (),
        rt_priority: int = 0,
        on_state: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if not name or "/" in name or "," in name or "=" in name:
            raise ConfigError(f"bad etcd cluster name {name!r}")
        if members < 1:
            raise ConfigError(f"etcd cluster {name}: members must be >= 1, got {members}")
        hosts = list(client_hosts) if client_hosts else ["127.0.0.1"] * members
        if len(hosts) == 1 and members > 1:
            hosts = hosts * members
        for label, seq in (("client_hosts", hosts), ("client_ports", client_ports),
                           ("peer_ports", peer_ports)):
            if seq is not None and len(seq) != members:
                raise ConfigError(f"etcd cluster {name}: {label} needs {members} entries")
        self.name = name
        self.data_dir = Path(data_dir)
        self.log_dir = Path(log_dir)
        self.netns = netns
        self.etcd_bin = etcd_bin
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = tuple(extra_args)
        self.rt_priority = rt_priority
        self.on_state = on_state
        self._hosts = hosts
        self._auto_ports = client_ports is None and peer_ports is None and netns is None
        if client_ports is None:
            client_ports = ([2379 + 2 * i for i in range(members)] if netns
                            else None)
        if peer_ports is None:
            peer_ports = ([2380 + 2 * i for i in range(members)] if netns else None)
        self.members: list[EtcdMember] = []
        self._build(list(client_ports) if client_ports else None,
                    list(peer_ports) if peer_ports else None)

    def _build(self, client_ports: list[int] | None, peer_ports: list[int] | None) -> None:
        n = len(self._hosts)
        if client_ports is None or peer_ports is None:
            picked = free_ports(2 * n, self._hosts[0])
            client_ports = client_ports or picked[:n]
            peer_ports = peer_ports or picked[n:]
        names = [f"{self.name}-{i}" for i in range(n)]
        initial = ",".join(f"{nm}={_url(h, p)}"
                           for nm, h, p in zip(names, self._hosts, peer_ports, strict=True))
        token = f"protego-{self.name}"
        self.members = [
            EtcdMember(
                name=nm, data_dir=self.data_dir / nm, log_file=self.log_dir / f"etcd-{nm}.log",
                client_host=h, client_port=cp, peer_port=pp, initial_cluster=initial,
                cluster_token=token, netns=self.netns, etcd_bin=self.etcd_bin,
                extra_args=self.extra_args, rt_priority=self.rt_priority,
            )
            for nm, h, cp, pp in zip(names, self._hosts, client_ports, peer_ports, strict=True)
        ]

    # -- views ------------------------------------------------------------- #
    @property
    def endpoints(self) -> list[str]:
        """``host:port`` per member, in member order."""
        return [m.endpoint for m in self.members]

    @property
    def client_urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def pids(self) -> list[int | None]:
        return [m.pid for m in self.members]

    # -- lifecycle --------------------------------------------------------- #
    def start(self, wait: bool = True) -> EtcdCluster:
        """Start every member and (by default) wait until all are healthy.

        With auto-picked ports and fresh data dirs, a start that fails (e.g. a port
        grabbed by someone else meanwhile) is rolled back and retried on new ports.
        On final failure everything started here is stopped before raising.
        """
        attempts = _START_ATTEMPTS if self._auto_ports else 1
        for attempt in range(1, attempts + 1):
            fresh = not any(m.data_dir.exists() for m in self.members)
            try:
                for m in self.members:
                    if not m.running:
                        m.start()
                        self._notify()
                if wait:
                    self.wait_healthy()
                return self
            except PeerError:
                self.stop()
                if attempt == attempts or not fresh:
                    raise
            except BaseException:  # on_state failed, Ctrl-C...: leave nothing running
                self.stop()
                raise
            log.warning("etcd cluster %s failed to start (attempt %d); new ports",
                        self.name, attempt)
            for m in self.members:
                shutil.rmtree(m.data_dir, ignore_errors=True)
            self._build(None, None)
        raise AssertionError("unreachable")  # pragma: no cover

    def wait_healthy(self, timeout: float | None = None,
                     members: Sequence[int] | None = None) -> None:
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        for i in members if members is not None else range(len(self.members)):
            self.members[i].wait_healthy(max(0.1, deadline - time.monotonic()))
        log.info("etcd cluster %s healthy: %s", self.name, ",".join(self.endpoints))

    def stop(self) -> None:
        """Stop every member we started (SIGTERM, SIGKILL after a bound). Idempotent."""
        errors: list[str] = []
        for m in self.members:
            try:
                was = m.pid
                m.stop(self.stop_timeout)
                if was is not None:
                    self._notify()
            except PeerError as exc:
                errors.append(str(exc))
        if errors:
            raise PeerError("; ".join(errors))

    def destroy(self) -> None:
        """Stop, then remove the members' data directories (and data_dir if empty)."""
        self.stop()
        for m in self.members:
            shutil.rmtree(m.data_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.data_dir.rmdir()

    # -- failure injection -------------------------------------------------- #
    def kill_member(self, i: int) -> None:
        """SIGKILL member *i* (crash)."""
        self.members[i].kill()
        self._notify()

    def stop_member(self, i: int) -> None:
        self.members[i].stop(self.stop_timeout)
        self._notify()

    def start_member(self, i: int, wait: bool = True) -> None:
        self.members[i].start()
        self._notify()
        if wait:
            self.members[i].wait_healthy(self.start_timeout)

    def restart_member(self, i: int, wait: bool = True, kill: bool = False) -> None:
        """Stop (or SIGKILL with *kill*) member *i* and start it on the same data dir."""
        if kill:
            self.kill_member(i)
        else:
            self.stop_member(i)
        self.start_member(i, wait)

    def _notify(self) -> None:
        """Hand the current state (PIDs included) to ``on_state`` so the caller can
        persist it the moment a process exists, not only after start() returned."""
        if self.on_state is not None:
            self.on_state(self.state())

    # -- persistence (testbed survives its own crash) ------------------------ #
    def state(self) -> dict[str, Any]:
        return {
            "name": self.name, "data_dir": str(self.data_dir), "log_dir": str(self.log_dir),
            "netns": self.netns, "etcd_bin": self.etcd_bin, "extra_args": list(self.extra_args),
            "rt_priority": self.rt_priority,
            "start_timeout": self.start_timeout, "stop_timeout": self.stop_timeout,
            "members": [m.state() for m in self.members],
        }

    @classmethod
    def from_state(cls, d: dict[str, Any],
                   on_state: Callable[[dict[str, Any]], None] | None = None) -> EtcdCluster:
        """Rebuild from :meth:`state`; ``stop()``/``destroy()`` then act on the recorded
        PIDs only if they still designate the processes started (start time + marker)."""
        members = [EtcdMember.from_state(m) for m in d["members"]]
        c = cls(
            d["name"], d["data_dir"], d["log_dir"], len(members),
            client_hosts=[m.client_host for m in members],
            client_ports=[m.client_port for m in members],
            peer_ports=[m.peer_port for m in members],
            netns=d.get("netns"), etcd_bin=d.get("etcd_bin", ETCD_BIN),
            start_timeout=float(d.get("start_timeout", DEFAULT_START_TIMEOUT)),
            stop_timeout=float(d.get("stop_timeout", DEFAULT_STOP_TIMEOUT)),
            extra_args=d.get("extra_args", ()),
            rt_priority=int(d.get("rt_priority", 0)),
            on_state=on_state,
        )
        c.members = members
        return c

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"EtcdCluster({self.name!r}, endpoints={self.endpoints}, pids={self.pids})"
