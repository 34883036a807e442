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
