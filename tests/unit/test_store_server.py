"""Pure and process-bookkeeping parts of protego.store.server (no etcd, no root).

Processes spawned here are our own ``sleep``/``python`` children, stopped by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protego.errors import ConfigError, PeerError
from protego.store import server as S
from tests.conftest import unique_name


@pytest.fixture
def child():
    """A child process we own; always reaped."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*argv: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(list(argv), start_new_session=True)
        procs.append(p)
        # wait until the exec happened, so cmdline shows argv
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and argv[-1] not in " ".join(S.proc_cmdline(p.pid)):
            time.sleep(0.01)
        return p

    yield spawn
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(5)


def test_etcd_command_plain_and_in_netns() -> None:
    argv = S.etcd_command(name="tb-0", data_dir="/d/tb-0", client_url="http://127.0.0.1:1",
                          peer_url="http://127.0.0.1:2", initial_cluster="tb-0=http://127.0.0.1:2",
                          cluster_token="protego-tb")
    assert argv[0] == S.ETCD_BIN
    for flag in ("--name=tb-0", "--data-dir=/d/tb-0", "--listen-client-urls=http://127.0.0.1:1",
                 "--advertise-client-urls=http://127.0.0.1:1", "--listen-peer-urls=http://127.0.0.1:2",
                 "--initial-cluster=tb-0=http://127.0.0.1:2", "--initial-cluster-state=new",
                 "--initial-cluster-token=protego-tb", "--logger=zap"):
        assert flag in argv
    ns = S.etcd_command(name="tb-0", data_dir="/d", client_url="u", peer_url="p",
                        initial_cluster="c", cluster_token="t", netns="tb-etcd",
                        extra_args=["--snapshot-count=100"])
    assert ns[:4] == ["ip", "netns", "exec", "tb-etcd"] and ns[4] == S.ETCD_BIN
    assert ns[-1] == "--snapshot-count=100"


def test_child_env_drops_etcd_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETCD_DATA_DIR", "/elsewhere")
    monkeypatch.setenv("ETCDCTL_API", "2")
    env = S._child_env()
    assert "ETCD_DATA_DIR" not in env and "ETCDCTL_API" not in env and "PATH" in env


def test_free_ports_distinct() -> None:
    ports = S.free_ports(6)
    assert len(set(ports)) == 6 and all(1024 <= p < 65536 for p in ports)


def test_process_record_identity(child) -> None:
    p = child("sleep", "30")
    st = S.proc_start_time(p.pid)
    assert st is not None
    assert S.ProcessRecord(p.pid, st, "30").is_ours()
    assert not S.ProcessRecord(p.pid, st + 1, "30").is_ours()  # PID reused
    assert not S.ProcessRecord(p.pid, st, "--data-dir=/x").is_ours()  # someone else
    rec = S.ProcessRecord(p.pid, st, "30")
    assert S.ProcessRecord.from_dict(rec.to_dict()) == rec


def test_terminate_never_touches_a_foreign_process(child) -> None:
    p = child("sleep", "30")
    st = S.proc_start_time(p.pid)
    assert st is not None
    S.terminate_process(S.ProcessRecord(p.pid, st + 1, "30"), timeout=0.2)
    S.terminate_process(S.ProcessRecord(p.pid, st, "etcd"), timeout=0.2)
    assert p.poll() is None and S.proc_alive(p.pid)


def test_terminate_sigterm_then_reap(child) -> None:
    p = child("sleep", "30")
    rec = S.ProcessRecord(p.pid, S.proc_start_time(p.pid) or 0, "30")
    S.terminate_process(rec, p, timeout=2)
    assert p.returncode == -signal.SIGTERM
    S.terminate_process(rec, p, timeout=2)  # idempotent


def test_terminate_escalates_to_sigkill(child) -> None:
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "time.sleep(30)  # ignores SIGTERM")
    p = child(sys.executable, "-c", code)
    time.sleep(0.3)  # let it install the handler
    rec = S.ProcessRecord(p.pid, S.proc_start_time(p.pid) or 0, "SIGTERM")
    t0 = time.monotonic()
    S.terminate_process(rec, p, timeout=0.3)
    assert p.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 3


def test_terminate_without_popen_waits_for_exit(child) -> None:
    """After a crash of the launcher only the record is left (no Popen to reap)."""
    p = child("sleep", "30")
    rec = S.ProcessRecord(p.pid, S.proc_start_time(p.pid) or 0, "30")
    S.terminate_process(rec, None, timeout=2)  # zombie (our child, unreaped) counts as gone
    assert not rec.is_ours()


def test_cluster_config_validation(tmp_path: Path) -> None:
    for bad in ("", "a/b", "a,b", "a=b"):
        with pytest.raises(ConfigError):
            S.EtcdCluster(bad, tmp_path / "d", tmp_path / "l")
    with pytest.raises(ConfigError):
        S.EtcdCluster("tb", tmp_path / "d", tmp_path / "l", members=0)
    with pytest.raises(ConfigError):
        S.EtcdCluster("tb", tmp_path / "d", tmp_path / "l", members=3, client_ports=[1, 2])


def test_cluster_layout_without_starting(tmp_path: Path) -> None:
    c = S.EtcdCluster("tb1", tmp_path / "d", tmp_path / "l", members=3,
                      client_ports=[2001, 2003, 2005], peer_ports=[2002, 2004, 2006])
    assert c.endpoints == ["127.0.0.1:2001", "127.0.0.1:2003", "127.0.0.1:2005"]
    assert c.pids == [None, None, None]
    m = c.members[1]
    assert m.name == "tb1-1" and m.data_dir == tmp_path / "d" / "tb1-1"
    assert m.log_file == tmp_path / "l" / "etcd-tb1-1.log"
    assert m.initial_cluster == ("tb1-0=http://127.0.0.1:2002,tb1-1=http://127.0.0.1:2004,"
                                 "tb1-2=http://127.0.0.1:2006")
    c2 = S.EtcdCluster.from_state(c.state())
    assert c2.endpoints == c.endpoints and c2.members[2].command() == c.members[2].command()
    c2.stop()  # nothing started: no-op
    ns = S.EtcdCluster("tb2", tmp_path / "d", tmp_path / "l", members=3, netns="tb2-etcd",
                       client_hosts=["10.9.0.1", "10.9.0.2", "10.9.0.3"])
    assert ns.endpoints == ["10.9.0.1:2379", "10.9.0.2:2381", "10.9.0.3:2383"]
    assert ns.members[0].command()[:4] == ["ip", "netns", "exec", "tb2-etcd"]
    v6 = S.EtcdCluster("tb3", tmp_path / "d", tmp_path / "l", client_hosts=["::1"],
                       client_ports=[2379], peer_ports=[2380])
    assert v6.endpoints == ["[::1]:2379"] and v6.client_urls == ["http://[::1]:2379"]


def test_missing_binary_is_a_config_error(tmp_path: Path) -> None:
    c = S.EtcdCluster("tb", tmp_path / "d", tmp_path / "l", etcd_bin=str(tmp_path / "no-etcd"))
    with pytest.raises(ConfigError):
        c.start()


def test_member_that_exits_fails_fast_with_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "fake-etcd"
    fake.write_text("#!/bin/sh\necho 'fake etcd: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    c = S.EtcdCluster("tbx", tmp_path / "d", tmp_path / "l", etcd_bin=str(fake), start_timeout=5)
    t0 = time.monotonic()
    with pytest.raises(PeerError) as ei:
        c.start()
    assert time.monotonic() - t0 < 5
    assert "cannot start" in str(ei.value) and "code 3" in str(ei.value)
    assert c.pids == [None]


def test_on_state_sees_pids_as_soon_as_spawned_and_rollback(tmp_path: Path) -> None:
    """The testbed persists state from on_state: a crash right after the spawn still
    leaves the PID on disk. A failing on_state rolls the start back."""
    fake = tmp_path / "fake-etcd"
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(30)\n")  # never healthy
    fake.chmod(0o755)
    seen: list[list[int | None]] = []

    def persist(state: dict) -> None:
        seen.append([m["process"]["pid"] if m["process"] else None for m in state["members"]])
        if len(seen) == 1:
            raise OSError("disk full")

    c = S.EtcdCluster("tbs", tmp_path / "d", tmp_path / "l", etcd_bin=str(fake),
                      start_timeout=1, on_state=persist)
    with pytest.raises(OSError):
        c.start()
    assert seen[0][0] is not None  # the PID was handed over right after spawn
    assert c.pids == [None] and not S.proc_alive(seen[0][0])


def test_etcd_command_in_the_real_time_class() -> None:
    argv = S.etcd_command(name="tb-0", data_dir="/d", client_url="u", peer_url="p", initial_cluster="c",
                          cluster_token="t", netns="tb-etcd", rt_priority=5)
    # chrt and ip both exec: the PID recorded is etcd's
    assert argv[:8] == ["ip", "netns", "exec", "tb-etcd", "chrt", "--rr", "5", S.ETCD_BIN]
    for bad in (-1, 100):
        with pytest.raises(ConfigError, match="real-time priority"):
            S.etcd_command(name="tb-0", data_dir="/d", client_url="u", peer_url="p", initial_cluster="c",
                           cluster_token="t", rt_priority=bad)


def test_real_time_member_runs_every_thread_sched_rr(tmp_path: Path) -> None:
    from protego.testbed.testbed import rt_permitted

    if not rt_permitted():
        pytest.skip("this host does not permit the real-time class (chrt --rr fails): nothing to check")
    c = S.EtcdCluster(unique_name("rt"), tmp_path / "d", tmp_path / "l", rt_priority=3)
    assert S.EtcdCluster.from_state(c.state()).members[0].command() == c.members[0].command()
    c.start(wait=True)
    try:
        pid = c.pids[0]
        assert pid is not None
        assert "--data-dir=" in Path(f"/proc/{pid}/cmdline").read_text()
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        assert len(tids) > 1  # the Go runtime's threads too, not only the first
        for tid in tids:
            assert os.sched_getscheduler(tid) == os.SCHED_RR, tid
            assert os.sched_getparam(tid).sched_priority == 3
    finally:
        c.destroy()
