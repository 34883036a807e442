"""The kernel lane (protego.lane, tests/lane_plugin.py).

* For real: :func:`test_kernel_esp_sas_in_a_fresh_namespace` is marked ``kernel``.
  On a host without kernel ESP it passes only through the lane: one QEMU guest
  runs it and its reports are replayed here.
* Without a guest: the replay of a hand-made ``reports.jsonl`` in a separate
  pytest session whose guest runner is a fake (a passed, a failed, a crashed and a
  never-reported test), the session's decision, and the lane's pure parts.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import NoReturn

import pytest

from protego import lane
from protego.esp import Direction, SaKeys, SecurityAssociation, Suite, UdpEncap
from protego.xfrm import open_xfrm_socket, probe_kernel_esp, state_from_sa
from tests import lane_plugin
from tests.conftest import wait_until
from tests.lane_plugin import Decision, decide, missing_phase, read_reports

ROOT = Path(__file__).resolve().parents[2]

# Fixed, obviously fake test keys (not secrets).
KEY16 = bytes(range(16))
SALT = bytes.fromhex("a0a1a2a3")
AUTH32 = bytes(range(0x40, 0x60))
HERE, THERE = ipaddress.ip_address("198.18.0.1"), ipaddress.ip_address("198.18.0.2")


# ----------------------------------------------------------------------------- for real

@pytest.mark.kernel
@pytest.mark.root
def test_kernel_esp_sas_in_a_fresh_namespace() -> None:
    """The kernel takes ESP SAs (AES-GCM, AES-CBC + HMAC-SHA-256, ESP-in-UDP) that
    protego.xfrm encodes, returns them on a dump and deletes them."""
    probe = probe_kernel_esp()
    assert probe.kernel_esp, probe.message
    sas = [
        SecurityAssociation(0x2001, Direction.OUTBOUND, Suite.AES128GCM16,
                            SaKeys(KEY16, salt=SALT), HERE, THERE, reqid=1),
        SecurityAssociation(0x2002, Direction.OUTBOUND, Suite.AES128_SHA256,
                            SaKeys(KEY16, auth_key=AUTH32), HERE, THERE, reqid=2),
        SecurityAssociation(0x2003, Direction.INBOUND, Suite.AES128GCM16,
                            SaKeys(KEY16, salt=SALT), THERE, HERE, encap=UdpEncap(),
                            reqid=3),
    ]
    with open_xfrm_socket(new_netns=True) as xs:
        assert xs.dump_states() == []
        for sa in sas:
            xs.add_state(state_from_sa(sa))
        got = {state.spi: state for state in xs.dump_states()}
        assert sorted(got) == [0x2001, 0x2002, 0x2003]
        assert [a.name for a in got[0x2001].algorithms] == ["rfc4106(gcm(aes))"]
        assert sorted(a.name for a in got[0x2002].algorithms) == ["cbc(aes)", "hmac(sha256)"]
        assert got[0x2003].encap is not None and got[0x2003].encap.dport == 4500
        one = xs.get_state("198.18.0.2", 0x2001, "198.18.0.1")
        assert one.reqid == 1
        for sa in sas:
            xs.delete_state(str(sa.dst), sa.spi, str(sa.src))
        assert xs.dump_states() == []


# ----------------------------------------------------------------------------- replay

INNER_TESTS = '''
import pytest

def test_host_first():
    pass

@pytest.mark.kernel
def test_k_pass():
    raise AssertionError("a kernel test ran on the host")

@pytest.mark.kernel
def test_k_fail():
    raise AssertionError("a kernel test ran on the host")

@pytest.mark.kernel
def test_k_crashed():
    raise AssertionError("a kernel test ran on the host")

@pytest.mark.kernel
def test_k_missing():
    raise AssertionError("a kernel test ran on the host")

def test_host_last():
    pass
'''

# A session whose guest is a fake: it records the node ids it was sent and
# "reports" reports.jsonl, the hand-made file the test wrote next to it.
INNER_CONFTEST = '''
import json
from pathlib import Path

from tests.lane_plugin import CONSOLE, REPORTS, Decision, GuestOutcome, KernelLane

HERE = Path(__file__).parent


def fake_guest(config, nodeids, folder):
    (HERE / "sent.json").write_text(json.dumps(nodeids))
    (folder / REPORTS).write_text((HERE / "hand-made.jsonl").read_text())
    console = folder / CONSOLE
    console.write_text("".join(f"console line {n}\\n" for n in range(100)))
    return GuestOutcome("pytest exit status 1 (TESTS_FAILED)", 12.5, 4.0, console, "6.1.0-t")


def pytest_configure(config):
    lane = KernelLane(decide=lambda: Decision("lane", "a fake lane"), guest=fake_guest)
    config.pluginmanager.register(lane, KernelLane.PLUGIN_NAME)
'''


def _report(name: str, when: str, outcome: str, longrepr: str | None = None,
            sections: list[list[str]] | None = None) -> dict[str, object]:
    """One serialized TestReport as the guest writes it."""
    return {"$report_type": "TestReport", "nodeid": f"test_inner.py::{name}",
            "location": ["test_inner.py", 1, name], "keywords": {name: 1, "kernel": 1},
            "outcome": outcome, "longrepr": longrepr, "when": when,
            "sections": sections or [], "duration": 0.25, "start": 1.0, "stop": 1.25,
            "user_properties": []}


def _hand_made_reports() -> str:
    lines = [
        _report("test_k_pass", "setup", "passed"),
        _report("test_k_pass", "call", "passed",
                sections=[["Captured stdout call", "printed in the guest\n"]]),
        _report("test_k_pass", "teardown", "passed"),
        _report("test_k_fail", "setup", "passed"),
        _report("test_k_fail", "call", "failed", "AssertionError: hand-made failure in the guest"),
        _report("test_k_fail", "teardown", "passed"),
        _report("test_k_crashed", "setup", "passed"),  # the guest died during its call
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    return text + '{"$report_type": "TestReport", "nodeid": "test_inner.py::test_k_mis'  # cut


def _inner_session(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str],
                                                        dict[str, ET.Element], list[str]]:
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "hand-made.jsonl").write_text(_hand_made_reports())
    env = dict(os.environ, PYTHONPATH=str(ROOT), PROTEGO_LANE_ROOT=str(tmp_path / "lane"))
    env.pop("PROTEGO_LANE_GUEST", None)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-o", "addopts=",
         "--junitxml", str(tmp_path / "junit.xml"), *args, str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    cases = {case.get("name", ""): case
             for case in ET.parse(tmp_path / "junit.xml").getroot().iter("testcase")}
    sent = json.loads((tmp_path / "sent.json").read_text())
    return res, cases, sent


def test_the_host_replays_the_guests_reports(tmp_path: Path) -> None:
    res, cases, sent = _inner_session(tmp_path)
    out = res.stdout
    assert res.returncode == 1, out + res.stderr
    # The kernel tests, and only they, went to the guest, after the host's own tests.
    assert sent == [f"test_inner.py::{n}"
                    for n in ("test_k_pass", "test_k_fail", "test_k_crashed", "test_k_missing")]
    assert list(cases) == ["test_host_first", "test_host_last", "test_k_pass", "test_k_fail",
                           "test_k_crashed", "test_k_missing"]
    assert "a kernel test ran on the host" not in out
    assert cases["test_k_pass"].find("failure") is None
    assert "printed in the guest" in out  # the guest's captured output, in -rA's PASSES
    fail = cases["test_k_fail"].find("failure")
    assert fail is not None and "hand-made failure in the guest" in fail.get("message", "") + (
        fail.text or "")
    for name, phase in (("test_k_crashed", "call"), ("test_k_missing", "call")):
        failure = cases[name].find("failure")
        assert failure is not None, name
        text = failure.text or ""
        assert f"never reported this test's {phase}" in text
        assert "pytest exit status 1 (TESTS_FAILED)" in text
        assert "console line 99" in text and "console line 40" in text
        assert "console line 39\n" not in text  # the last 60 lines only
        assert str(tmp_path / "lane" / "logs") in text
    assert "3 failed, 3 passed" in out
    assert "4 kernel test(s) sent to one QEMU guest, 3 reported back" in out
    assert "booted in 4.0 s; wall time 12.5 s" in out
    assert "guest console log: " + str(tmp_path / "lane" / "logs") in out


def test_only_the_selected_kernel_tests_go_to_the_guest(tmp_path: Path) -> None:
    res, cases, sent = _inner_session(tmp_path, "-k", "not k_fail and not host_first")
    assert res.returncode == 1, res.stdout + res.stderr  # k_crashed, k_missing
    assert sent == [f"test_inner.py::{n}" for n in ("test_k_pass", "test_k_crashed",
                                                    "test_k_missing")]
    assert set(cases) == {"test_host_last", "test_k_pass", "test_k_crashed", "test_k_missing"}


# ----------------------------------------------------------------------------- decision

def _probe(esp: bool) -> SimpleNamespace:
    message = ("kernel ESP available (aes128gcm16): using the xfrm backend" if esp else
               "kernel has no ESP (aes128gcm16: ENOSYS): using the userspace backend")
    return SimpleNamespace(kernel_esp=esp, message=message)


def _never() -> NoReturn:
    raise AssertionError("called although the decision did not need it")


def test_the_session_decides_native_lane_or_skip() -> None:
    assert decide(guest=True, is_root=True, probe=_never, lane_status=_never).mode == "native"
    assert decide(guest=False, is_root=True, probe=lambda: _probe(True),
                  lane_status=_never).mode == "native"
    assert decide(guest=False, is_root=True, probe=lambda: _probe(False),
                  lane_status=list).mode == "lane"
    skip = decide(guest=False, is_root=True, probe=lambda: _probe(False),
                  lane_status=lambda: ["no qemu-system-x86_64 on PATH", "no kernel"])
    assert skip == Decision("skip", "needs kernel ESP: this kernel has none (kernel has no ESP "
                                    "(aes128gcm16: ENOSYS)) and the kernel lane cannot run: "
                                    "no qemu-system-x86_64 on PATH; no kernel")
    not_root = decide(guest=False, is_root=False, probe=_never, lane_status=_never)
    assert not_root.mode == "skip" and not_root.root_skip_applies


def test_missing_phase_and_a_truncated_reports_file() -> None:
    assert missing_phase([]) == "call"
    assert missing_phase([{"when": "setup", "outcome": "passed"}]) == "call"
    assert missing_phase([{"when": "setup", "outcome": "failed"}]) == "teardown"
    assert missing_phase([{"when": "setup", "outcome": "passed"},
                          {"when": "call", "outcome": "failed"}]) == "teardown"
    assert missing_phase([{"when": "setup", "outcome": "skipped"},
                          {"when": "teardown", "outcome": "passed"}]) is None
    reports = read_reports(_hand_made_reports())
    assert sorted(reports) == ["test_inner.py::test_k_crashed", "test_inner.py::test_k_fail",
                               "test_inner.py::test_k_pass"]
    assert [r["when"] for r in reports["test_inner.py::test_k_pass"]] == [
        "setup", "call", "teardown"]


def test_the_guest_runs_the_repositorys_python_without_a_lane_of_its_own(tmp_path: Path) -> None:
    venv_python = str(tmp_path / ".venv" / "bin" / "python")
    assert lane_plugin.guest_python(tmp_path, venv_python) == venv_python
    assert lane_plugin.guest_python(tmp_path, "/usr/bin/python3") == "/usr/bin/python3"
    argv = lane_plugin.guest_pytest_argv("py", ["a.py::t[x y]"], tmp_path / "r.jsonl")
    assert argv[:3] == ["py", "-m", "pytest"] and argv[-1] == "a.py::t[x y]"
    assert argv[argv.index("--lane-report") + 1] == str(tmp_path / "r.jsonl")


# ----------------------------------------------------------------------------- protego.lane

def test_the_kernel_package_comes_from_apt_cache_depends() -> None:
    text = ("linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n"
            "  Recommends: firmware-linux-free\n")
    assert lane.parse_depends(text) == "linux-image-6.1.0-57-amd64"
    assert lane.kernel_version("linux-image-6.1.0-57-amd64") == "6.1.0-57-amd64"
    with pytest.raises(lane.LaneError, match="names no linux-image package"):
        lane.parse_depends("linux-image-amd64\n")
    with pytest.raises(lane.LaneError, match="not a versioned"):
        lane.kernel_version("linux-image-amd64")


def test_the_guest_script_loads_modules_exports_and_runs_the_command() -> None:
    script = lane.guest_script("pytest -x 'a b'", cwd=Path("/work/main"),
                               env={"LANG": "C.UTF-8", "X": "it's"})
    lines = script.splitlines()
    assert lines[-1] == "pytest -x 'a b'"  # last: the script's status is the command's
    assert "set -e" not in script and "modprobe -a -q esp4 xfrm_user" in script
    assert "nft_limit" in script and "ip link set lo up" in lines
    assert "export PROTEGO_LANE_GUEST=1" in lines and "export X='it'\"'\"'s'" in lines
    assert "cd /work/main || exit 125" in lines
    with pytest.raises(lane.LaneError, match="not an environment variable name"):
        lane.guest_script("true", cwd=Path("/"), env={"A B": "x"})


def test_vng_boots_tcg_with_a_small_translation_cache() -> None:
    argv = lane.vng_argv(Path("/v/bin/vng"), Path("/k/boot/vmlinuz-6.1.0-57-amd64"),
                         script=Path("/r/lane-guest.sh"), rwdir=Path("/r"), overlay=Path("/repo"),
                         cpus=2, memory="3G")
    assert argv[:3] == ["/v/bin/vng", "--run", "/k/boot/vmlinuz-6.1.0-57-amd64"]
    assert "--disable-kvm" in argv and "--qemu-opts=-accel tcg,tb-size=256" in argv
    assert "--force-9p" in argv and argv[argv.index("--append") + 1] == "loglevel=4"
    assert argv[argv.index("--memory") + 1] == "3G" and argv[argv.index("--rwdir") + 1] == "/r"
    assert argv[-2:] == ["--exec", "sh /r/lane-guest.sh"]


def test_status_names_everything_the_lane_lacks(tmp_path: Path) -> None:
    none = lane.missing_reasons(is_root=False, qemu=None, vng=None, busybox=None, modprobe=None,
                                kernel=None, root=tmp_path)
    assert len(none) == 6
    assert none[0].startswith("not running as root")
    assert any("qemu-system-x86" in r for r in none) and any("virtme-ng" in r for r in none)
    assert none[-1] == (f"no guest kernel fetched into {tmp_path} "
                        "(run ./bootstrap.sh or `protego lane setup`)")
    assert lane.missing_reasons(is_root=True, qemu="q", vng=Path("v"), busybox="b",
                                modprobe="m", kernel=Path("k"), root=tmp_path) == []
    # an unstamped (half-unpacked) kernel folder does not count
    (tmp_path / "6.1.0-1-amd64" / "boot").mkdir(parents=True)
    (tmp_path / "6.1.0-1-amd64" / "boot" / "vmlinuz-6.1.0-1-amd64").write_bytes(b"")
    assert lane.installed_kernel(tmp_path) is None
    (tmp_path / "6.1.0-1-amd64" / lane.STAMP).write_text("{}")
    assert lane.installed_kernel(tmp_path) == tmp_path / "6.1.0-1-amd64/boot/vmlinuz-6.1.0-1-amd64"


FAKE_APT_GET = """#!/bin/sh
# apt-get as the lane uses it, offline: "download" copies $FAKE_DEB here.
if [ -e "$FAKE_APT_OFFLINE" ]; then
    echo "E: Failed to fetch http://deb.debian.org/x.deb  Temporary failure resolving" >&2
    exit 100
fi
case "$1" in
    download) cp "$FAKE_DEB" . ;;
    update) ;;
esac
"""
FAKE_APT_CACHE = """#!/bin/sh
printf 'linux-image-amd64\\n  Depends: linux-image-%s\\n' "$FAKE_KVER"
"""


def _fake_kernel_deb(tmp_path: Path, kver: str) -> Path:
    """A tiny linux-image .deb: a vmlinuz and an (empty) modules tree."""
    tree = tmp_path / f"deb-{kver}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: linux-image-{kver}\nVersion: 1.0-1\nArchitecture: amd64\n"
        "Maintainer: Protego tests <tests@example.invalid>\nDescription: fake kernel\n")
    (tree / "boot").mkdir()
    (tree / "boot" / f"vmlinuz-{kver}").write_bytes(b"not a kernel")
    (tree / "lib" / "modules" / kver).mkdir(parents=True)
    (tree / "lib" / "modules" / kver / "modules.order").write_text("")
    deb = tmp_path / f"linux-image-{kver}_1.0-1_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)], check=True,
                   capture_output=True)
    return deb


def test_fetch_kernel_unpacks_stamps_and_replaces_older_kernels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline: apt-get and apt-cache are stand-ins on PATH; dpkg-deb and depmod are real."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("apt-get", FAKE_APT_GET), ("apt-cache", FAKE_APT_CACHE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    kver = "6.1.0-99-amd64"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_KVER", kver)
    monkeypatch.setenv("FAKE_DEB", str(_fake_kernel_deb(tmp_path, kver)))
    monkeypatch.setenv("FAKE_APT_OFFLINE", str(tmp_path / "offline"))
    root = tmp_path / "lane"
    (root / "6.1.0-1-amd64" / "boot").mkdir(parents=True)  # an older kernel
    (root / ".fetch-6.1.0-1-amd64-1").mkdir()  # an interrupted fetch
    (root / "logs" / "run").mkdir(parents=True)
    said: list[str] = []

    vmlinuz = lane.fetch_kernel(root, report=said.append)
    assert vmlinuz == root / kver / "boot" / f"vmlinuz-{kver}" and vmlinuz.is_file()
    assert (root / kver / "lib" / "modules" / kver / "modules.dep").is_file()  # depmod ran
    stamp = json.loads((root / kver / lane.STAMP).read_text())
    assert stamp["package"] == f"linux-image-{kver}" and stamp["version"] == "1.0-1"
    assert sorted(p.name for p in root.iterdir()) == [kver, "logs"]
    assert said[0].startswith(f"downloaded linux-image-{kver}_1.0-1_amd64.deb")
    assert said[1] == f"unpacked kernel {kver} (linux-image-{kver} 1.0-1) into {root / kver}"
    assert lane.installed_kernel(root) == vmlinuz

    (tmp_path / "offline").touch()  # cached: no download needed, none tried
    said.clear()
    assert lane.fetch_kernel(root, report=said.append) == vmlinuz
    assert said == [f"kernel {kver} already fetched: {vmlinuz}"]

    monkeypatch.setenv("FAKE_KVER", "6.1.0-100-amd64")  # a newer kernel, but no network
    with pytest.raises(lane.LaneError, match=r"cannot download linux-image-6\.1\.0-100-amd64: "
                                             r".*Temporary failure resolving.*no network\?"):
        lane.fetch_kernel(root)
    assert sorted(p.name for p in root.iterdir()) == [kver, "logs"]  # nothing half-done left


def _fake_vng(tmp_path: Path, body: str) -> Path:
    """A stand-in for ``vng`` (no QEMU): a shell script that ignores its arguments."""
    vng = tmp_path / "vng"
    vng.write_text("#!/bin/sh\n" + body)
    vng.chmod(0o755)
    return vng


def test_a_guest_hands_back_its_console_and_exit_code(tmp_path: Path) -> None:
    vng = _fake_vng(tmp_path, 'echo "protego-lane: guest ready: fake"\n'
                              'printf "one\\ntwo, unterminated"\nexit 3\n')
    lines: list[str] = []
    run = lane.run_guest("pytest -k 'a b'", rwdir=tmp_path / "rw", log=tmp_path / "console.log",
                         timeout=30, kernel=tmp_path / "vmlinuz-6.1.0-1-amd64", vng=vng,
                         on_line=lines.append)
    assert run.returncode == 3 and run.kernel == "6.1.0-1-amd64"
    assert run.boot_seconds is not None and run.boot_seconds <= run.seconds
    assert lines[0].startswith("protego-lane: guest ready: fake (host: ")
    assert lines[1:] == ["one", "two, unterminated"]
    assert (tmp_path / "rw" / lane.GUEST_SCRIPT).read_text().endswith("\npytest -k 'a b'\n")
    console = (tmp_path / "console.log").read_text()
    assert "one\ntwo, unterminated\n" in console
    assert "protego-lane: host: guest exited with status 3" in console


def test_a_guest_that_hangs_is_killed_with_its_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    vng = _fake_vng(tmp_path, f"sleep 300 &\necho $! > {pidfile}\necho started\nsleep 300\n")
    with pytest.raises(lane.LaneTimeout, match="did not finish within 2 s and was killed"):
        lane.run_guest("true", rwdir=tmp_path / "rw", log=tmp_path / "console.log", timeout=2,
                       kernel=tmp_path / "vmlinuz-6.1.0-1-amd64", vng=vng)
    child = int(pidfile.read_text())

    def gone() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().split(")")[1].split()[0] == "Z"
        except OSError:
            return True

    wait_until(gone, 10, f"the guest's child process {child} to die with its group")
    console = (tmp_path / "console.log").read_text()
    assert "started" in console and "no exit after 2 s: killed the guest's process group" in console


def test_old_run_folders_are_pruned() -> None:
    names = [f"20261207-1000{n:02d}-1" for n in range(12)]
    assert lane.runs_to_prune(names, keep=10) == names[:2]
    assert lane.runs_to_prune(names[:3], keep=10) == []
