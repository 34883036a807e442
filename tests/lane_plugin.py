"""Pytest plugin: tests marked ``kernel`` need kernel ESP/XFRM; run them where it exists.

Decided once per session, when the collected tests include any ``kernel`` test
(:func:`decide`):

* **native** -- inside a kernel-lane guest (``PROTEGO_LANE_GUEST=1``), or the host
  kernel has ESP (:func:`protego.xfrm.probe_kernel_esp`): they run like any test;
* **lane** -- the host kernel has none but :func:`protego.lane.status` is empty:
  the kernel tests are moved to the end of the run; at the first of them ONE guest
  boots (:mod:`protego.lane`) and runs all of them with ``pytest --lane-report FILE``,
  which writes every test report as one JSON line as it happens
  (:class:`ReportWriter`). Back on the host each kernel test is replayed from that
  file through the host's own report hooks (terminal, ``-ra``, junitxml, exit
  status), and its fixtures never run on the host. A test the guest never finished
  (crash, timeout) gets a failed report carrying the guest's exit status and the
  tail of its console log;
* **skip** -- neither: each kernel test is skipped with a reason that names what
  is missing. Without root the root skip of ``tests/conftest.py`` applies.

Only the kernel tests this session selected go to the guest (``-k``, ``-m``,
node ids, ``--deselect`` are honoured: the guest gets explicit node ids).
The guest's console log and reports stay in ``/var/lib/protego/lane/logs/<run>/``
(``$PROTEGO_LANE_ROOT``); the terminal summary names it.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import pytest

from protego import lane

KERNEL_MARK = "kernel"
MARKER_HELP = ("kernel: needs kernel ESP/XFRM: runs natively, in the kernel lane (a QEMU "
               "guest), or skips saying what is missing")
REPORTS = "reports.jsonl"
CONSOLE = "console.log"
TESTBED_LOGS = "testbeds"  # <run>/testbeds/<testbed>/: each lane testbed's logs (PROTEGO_TEST_KEEP_LOGS)
TAIL_LINES = 60
GUEST_TEST_TIMEOUT = 1800  # pytest-timeout's per-test limit inside the (slow) guest

Mode = Literal["native", "lane", "skip"]


# ----------------------------------------------------------------------------- decision

@dataclass(frozen=True)
class Decision:
    """Where this session's kernel tests run, and why."""

    mode: Mode
    reason: str
    root_skip_applies: bool = False  # not root: root-marked tests keep conftest's skip


def _probe_detail(message: str) -> str:
    """The probe's finding without its choice of backend (irrelevant to a test)."""
    return message.split(": using the ", 1)[0]


def decide(*, guest: bool, is_root: bool, probe: Callable[[], Any],
           lane_status: Callable[[], list[str]]) -> Decision:
    """The session's mode; ``probe`` and ``lane_status`` are only called when needed.

    ``probe`` returns an object with ``kernel_esp`` and ``message``
    (:class:`protego.xfrm.EspProbeResult`).
    """
    if guest:
        return Decision("native", "inside the kernel lane's guest")
    if not is_root:
        return Decision("skip", "needs kernel ESP: not running as root (cannot probe the "
                                "kernel or boot the kernel lane)", root_skip_applies=True)
    result = probe()
    if result.kernel_esp:
        return Decision("native", _probe_detail(result.message))
    reasons = lane_status()
    if not reasons:
        return Decision("lane", _probe_detail(result.message))
    return Decision("skip", f"needs kernel ESP: this kernel has none "
                            f"({_probe_detail(result.message)}) and the kernel lane cannot "
                            f"run: {'; '.join(reasons)}")


def host_decision() -> Decision:
    """:func:`decide` for this process."""
    from protego.xfrm import probe_kernel_esp

    return decide(guest=lane.in_guest(), is_root=os.geteuid() == 0, probe=probe_kernel_esp,
                  lane_status=lane.status)


# ----------------------------------------------------------------------------- reports (pure)

def read_reports(text: str) -> dict[str, list[dict[str, Any]]]:
    """Serialized test reports per node id, in order, from a ``reports.jsonl``.

    A line that is not complete JSON (the guest died while writing it) ends the
    file: what came before it counts.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            break
        if isinstance(data, dict) and isinstance(data.get("nodeid"), str):
            out.setdefault(data["nodeid"], []).append(data)
    return out


def missing_phase(reports: Sequence[Mapping[str, Any]]) -> Literal["setup", "call",
                                                                    "teardown"] | None:
    """The phase a test's guest reports stop short of (None: complete).

    A finished test always has a teardown report. Never started, or set up but
    never called: the call is what failed; otherwise the teardown.
    """
    whens = {r.get("when"): r.get("outcome") for r in reports}
    if "teardown" in whens:
        return None
    if not whens or (whens.get("setup") == "passed" and "call" not in whens):
        return "call"
    return "teardown"


def never_reported_text(phase: str, status: str, log: Path, tail: str) -> str:
    """The failure text of a test whose ``phase`` the guest never reported."""
    return (f"the kernel lane's guest never reported this test's {phase} "
            f"(guest: {status}).\nguest console log: {log}\n"
            f"--- its last {TAIL_LINES} lines ---\n{tail}")


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a file ('(empty)' or '(missing)' otherwise)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(missing)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def guest_python(repo: Path, executable: str = sys.executable) -> str:
    """The Python the guest runs pytest with: this one if it is the repository's venv."""
    venv = repo / ".venv"
    if Path(executable).is_relative_to(venv):
        return executable
    candidate = venv / "bin" / "python"
    return str(candidate) if candidate.exists() else executable


def guest_pytest_argv(python: str, nodeids: Iterable[str], report: Path) -> list[str]:
    """The pytest command the guest runs (it must not go into lane mode itself)."""
    return [python, "-m", "pytest", "-p", "tests.lane_plugin", "-p", "no:cacheprovider",
            "-v", "-o", "addopts=-ra", "-o", f"timeout={GUEST_TEST_TIMEOUT}",
            "--lane-report", str(report), *nodeids]


# ----------------------------------------------------------------------------- the guest

@dataclass(frozen=True)
class GuestOutcome:
    """How the session's guest went, for the failure texts and the summary."""

    status: str  # "pytest exit status 0 (OK)", "timed out ...", "could not run: ..."
    seconds: float
    boot_seconds: float | None
    log: Path
    kernel: str = ""


# (config, kernel node ids, run folder) -> outcome; writes <folder>/reports.jsonl
GuestRunner = Callable[[pytest.Config, list[str], Path], GuestOutcome]


def _exit_status(code: int) -> str:
    try:
        return f"pytest exit status {code} ({pytest.ExitCode(code).name})"
    except ValueError:
        return f"exit status {code}"


def run_in_guest(config: pytest.Config, nodeids: list[str], folder: Path) -> GuestOutcome:
    """Boot one lane guest that runs ``nodeids`` with pytest (the real runner)."""
    console = folder / CONSOLE
    argv = guest_pytest_argv(guest_python(config.rootpath), nodeids, folder / REPORTS)
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    stream = terminal is not None and config.get_verbosity() > 0

    def on_line(line: str) -> None:
        if stream and terminal is not None:
            terminal.write_line(f"lane| {line}")

    start = time.monotonic()
    try:
        run = lane.run_guest(shlex.join(argv), rwdir=folder, log=console,
                             timeout=lane.lane_timeout(),
                             # the testbeds' logs (charons, agents, etcd) outlive the guest
                             env={"LANG": "C.UTF-8", "PROTEGO_TEST_KEEP_LOGS": str(folder / TESTBED_LOGS)},
                             cwd=config.rootpath, on_line=on_line)
    except lane.LaneTimeout as exc:
        return GuestOutcome(f"timed out: {exc}", time.monotonic() - start, None, console)
    except lane.LaneError as exc:
        return GuestOutcome(f"could not run: {exc}", time.monotonic() - start, None, console)
    return GuestOutcome(_exit_status(run.returncode), run.seconds, run.boot_seconds, console,
                        run.kernel)


# ----------------------------------------------------------------------------- plugins

def _is_kernel(item: pytest.Item) -> bool:
    return item.get_closest_marker(KERNEL_MARK) is not None


class KernelLane:
    """Runs, sends to the lane, or skips this session's kernel tests (see the module)."""

    PLUGIN_NAME = "protego-kernel-lane"

    def __init__(self, decide: Callable[[], Decision] = host_decision,
                 guest: GuestRunner = run_in_guest) -> None:
        self._decide = decide
        self._guest = guest
        self.decision: Decision | None = None
        self.outcome: GuestOutcome | None = None
        self._reports: dict[str, list[dict[str, Any]]] = {}
        self._sent: list[str] = []

    def pytest_configure(self, config: pytest.Config) -> None:
        if not any(line.startswith(f"{KERNEL_MARK}:") for line in config.getini("markers")):
            config.addinivalue_line("markers", MARKER_HELP)  # a project without it in its ini

    @pytest.hookimpl(trylast=True)  # after -k/-m/--deselect and the root skip
    def pytest_collection_modifyitems(self, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        kernel = [item for item in items if _is_kernel(item)]
        if not kernel:
            return
        self.decision = decision = self._decide()
        if decision.mode == "skip":
            skip = pytest.mark.skip(reason=decision.reason)
            for item in kernel:
                if not (decision.root_skip_applies and "root" in item.keywords):
                    item.add_marker(skip)
        elif decision.mode == "lane":
            items[:] = [item for item in items if not _is_kernel(item)] + kernel
            if config.pluginmanager.hasplugin("timeout"):
                # The first kernel test waits for the whole guest: the lane has its own limit.
                for item in kernel:
                    item.add_marker(pytest.mark.timeout(0), append=False)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item,
                                nextitem: pytest.Item | None) -> bool | None:
        if self.decision is None or self.decision.mode != "lane" or not _is_kernel(item):
            return None
        if self.outcome is None:
            self._run_guest(item)
        replay(item, self._reports.get(item.nodeid, []), self._missing_text)
        return True

    def _run_guest(self, item: pytest.Item) -> None:
        config = item.config
        self._sent = [i.nodeid for i in item.session.items if _is_kernel(i)]
        try:
            folder = lane.new_run_dir()
        except lane.LaneError:
            folder = Path(tempfile.mkdtemp(prefix="protego-lane-"))
        terminal = config.pluginmanager.get_plugin("terminalreporter")
        if terminal is not None:
            terminal.write_line(f"kernel lane: one QEMU guest for {len(self._sent)} kernel "
                                f"test(s); console log {folder / CONSOLE}")
        self.outcome = self._guest(config, self._sent, folder)
        try:
            self._reports = read_reports((folder / REPORTS).read_text(errors="replace"))
        except OSError:
            self._reports = {}
        if terminal is not None:
            terminal.write_line(f"kernel lane: guest done: {self._summary_line()}")

    def _missing_text(self, phase: str) -> str:
        assert self.outcome is not None
        return never_reported_text(phase, self.outcome.status, self.outcome.log,
                                   log_tail(self.outcome.log))

    def _summary_line(self) -> str:
        out = self.outcome
        assert out is not None
        boot = "never booted" if out.boot_seconds is None else \
            f"booted in {out.boot_seconds:.1f} s"
        kernel = f"kernel {out.kernel}, " if out.kernel else ""
        return f"{out.status}; {kernel}{boot}; wall time {out.seconds:.1f} s"

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.outcome is None:
            return
        reported = sum(1 for n in self._sent if n in self._reports)
        terminalreporter.write_sep("-", "kernel lane")
        terminalreporter.write_line(
            f"{len(self._sent)} kernel test(s) sent to one QEMU guest, {reported} reported "
            f"back: {self._summary_line()}")
        terminalreporter.write_line(f"guest console log: {self.outcome.log}")
        beds = self.outcome.log.parent / TESTBED_LOGS
        if beds.is_dir():
            terminalreporter.write_line(f"testbed logs: {beds}")


def replay(item: pytest.Item, reports: Sequence[Mapping[str, Any]],
           missing_text: Callable[[str], str]) -> None:
    """Report ``item`` on the host from the guest's serialized ``reports``.

    The same hooks as a local run, in order (logstart, each report, logfinish); a
    phase the guest never reported becomes a failed report with ``missing_text``.
    """
    config = item.config
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for data in reports:
        report = config.hook.pytest_report_from_serializable(config=config, data=dict(data))
        if report is not None:
            ihook.pytest_runtest_logreport(report=report)
    phase = missing_phase(reports)
    if phase is not None:
        ihook.pytest_runtest_logreport(report=pytest.TestReport(
            item.nodeid, item.location, {k: 1 for k in item.keywords}, "failed",
            missing_text(phase), phase))
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


class ReportWriter:
    """Inside the guest: every test report as one JSON line, flushed as it happens."""

    def __init__(self, config: pytest.Config, path: Path) -> None:
        self._config = config
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self._config.hook.pytest_report_to_serializable(config=self._config,
                                                                report=report)
        self._file.write(json.dumps(data, default=repr) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())  # a guest that dies next keeps this line

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self._file.close()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("protego kernel lane").addoption(
        "--lane-report", metavar="FILE", default=None,
        help="(the kernel lane's guest) append every test report to FILE as a JSON line; "
             "kernel tests run natively")


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.has_plugin(KernelLane.PLUGIN_NAME):
        return
    report = config.getoption("--lane-report")
    if report is None:
        config.pluginmanager.register(KernelLane(), KernelLane.PLUGIN_NAME)
        return
    # The guest's own session: never a lane inside the lane.
    native = Decision("native", "running for the kernel lane (--lane-report)")
    config.pluginmanager.register(KernelLane(decide=lambda: native), KernelLane.PLUGIN_NAME)
    config.pluginmanager.register(ReportWriter(config, Path(report)), "protego-lane-report")
