"""protego.testbed.procs helpers that need no namespace."""

from __future__ import annotations

import os
import subprocess

from protego.testbed import procs


def test_children_lists_live_children_only() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert p.pid in procs.children(os.getpid())
        assert procs.children(p.pid) == []
    finally:
        p.kill()
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # a zombie now: not listed
    assert p.pid not in procs.children(os.getpid())
    p.wait()


def test_cpu_split_halves_the_cpus_only_when_asked(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from protego.errors import TestbedError
    from protego.testbed import testbed as tbmod

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 5})
    monkeypatch.delenv("PROTEGO_TESTBED_CPUS", raising=False)
    assert tbmod.cpu_split() is None  # the default: every role shares every CPU
    monkeypatch.setenv("PROTEGO_TESTBED_CPUS", "split")
    assert tbmod.cpu_split() == {"control": [0, 1], "data": [2, 3, 5]}
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {3})
    assert tbmod.cpu_split() is None  # one CPU: nothing to split
    monkeypatch.setenv("PROTEGO_TESTBED_CPUS", "spilt")
    with pytest.raises(TestbedError, match="expected 'shared' or 'split'"):
        tbmod.cpu_split()


def test_pin_tasks_moves_every_thread_of_a_running_process() -> None:
    from protego.testbed import testbed as tbmod

    cpus = sorted(os.sched_getaffinity(0))
    # a process with a second thread (python's threading), then pinned to one CPU
    p = subprocess.Popen(["python3", "-c", "import threading, time\n"
                          "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
                          "print('up', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        tids = [int(t) for t in os.listdir(f"/proc/{p.pid}/task")]
        assert len(tids) == 2
        tbmod.pin_tasks(p.pid, [cpus[-1]])
        assert all(os.sched_getaffinity(t) == {cpus[-1]} for t in tids)
    finally:
        p.kill()
        p.wait()
    tbmod.pin_tasks(p.pid, [cpus[-1]])  # gone: nothing to do, no error


def test_waits_poll_as_before_on_this_host_and_rarer_for_the_lane() -> None:
    from protego.testbed.testbed import poll_interval
    from protego.testbed.topology import DEFAULT_TIMINGS, load_topology

    assert poll_interval(DEFAULT_TIMINGS.daemon_start_s, 0.1) == 0.1  # GPN registration
    assert poll_interval(DEFAULT_TIMINGS.tunnel_wait_s, 0.2) == 0.2  # every site's tunnel
    lane = load_topology("lane").timings
    assert 0.1 < poll_interval(lane.daemon_start_s, 0.1) <= 1.0
    assert poll_interval(lane.tunnel_wait_s, 0.2) == 1.0
