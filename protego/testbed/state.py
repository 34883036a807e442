"""On-disk record of what a testbed created, so ``down`` removes exactly that.

The record is a JSON file rewritten atomically (write + rename) *before* each
resource is created, so after a crash of ``up`` it names everything that may
exist.  Processes are recorded with their start time (``/proc/PID/stat`` field
22), so a recycled PID is never mistaken for ours.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from protego.errors import TestbedError

STATE_ROOT = Path(os.environ.get("PROTEGO_TESTBED_ROOT", "/var/lib/protego/testbeds"))
# the logs of a testbed whose ``up`` failed and was rolled back: <name>-<time>/
FAILED_ROOT = STATE_ROOT.parent / "failed"


@dataclass
class ProcRecord:
    node: str
    kind: str  # etcd | charon | agent | iperf3 ...
    pid: int
    start_time: int
    cmd: list[str]
    log: str


@dataclass
class TestbedState:
    __test__ = False  # not a pytest class

    name: str
    mode: str
    topology_source: str
    mgmt_index: int
    phase: str = "creating"  # creating | up | failed | removing
    namespaces: list[str] = field(default_factory=list)
    host_links: list[str] = field(default_factory=list)
    procs: list[ProcRecord] = field(default_factory=list)
    etcd_endpoints: list[str] = field(default_factory=list)
    created: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    # -- paths
    @property
    def root(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def node_dir(self, node: str) -> Path:
        return self.root / "nodes" / node

    # -- persistence
    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, self.root / "state.json")

    @classmethod
    def load(cls, name: str) -> "TestbedState":
        path = STATE_ROOT / name / "state.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise TestbedError(f"no testbed named '{name}' (no {path})") from None
        except (OSError, ValueError) as exc:
            raise TestbedError(f"{path}: unreadable testbed state: {exc}") from None
        procs = [ProcRecord(**p) for p in raw.pop("procs", [])]
        return cls(procs=procs, **raw)


def list_testbeds() -> list[str]:
    if not STATE_ROOT.is_dir():
        return []
    return sorted(p.name for p in STATE_ROOT.iterdir() if (p / "state.json").is_file())


def used_mgmt_indices() -> set[int]:
    used = set()
    for name in list_testbeds():
        try:
            used.add(TestbedState.load(name).mgmt_index)
        except TestbedError:
            continue
    return used
