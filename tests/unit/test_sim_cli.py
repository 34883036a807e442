"""``protego sim``: the default synthetic run (Table 2), JSON, plot, and bad input."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from protego.cli import cli
from protego.errors import ConfigError

JSON_KEYS = {"tunnels", "minutes", "reserved_nodes", "mean_throughput_gbps", "intervals"}
INTERVAL_KEYS = {"consolidation_min", "active_capacity_gbps", "guarantee_p99_pct",
                 "saving_pct", "migrations"}


def _run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["sim", *args])


def _json(*args: str) -> dict[str, Any]:
    result = _run(*args, "--json")
    assert result.exit_code == 0, result.output
    out: dict[str, Any] = json.loads(result.output)
    return out


@pytest.fixture(scope="module")
def default_run() -> dict[str, Any]:
    return _json("--synthetic")


def test_default_synthetic_json_has_the_issue_keys(default_run: dict[str, Any]) -> None:
    assert set(default_run) == JSON_KEYS
    assert default_run["tunnels"] == 170 and default_run["minutes"] == 1440
    assert default_run["mean_throughput_gbps"] == pytest.approx(57.49, rel=1e-3)
    assert [r["consolidation_min"] for r in default_run["intervals"]] == [3, 5, 10, 30, 60]
    for r in default_run["intervals"]:
        assert set(r) == INTERVAL_KEYS


def test_default_synthetic_saves_over_80_percent_at_every_interval(
        default_run: dict[str, Any]) -> None:
    assert all(r["saving_pct"] > 80.0 for r in default_run["intervals"])


def test_default_synthetic_guarantee_rises_with_the_interval(
        default_run: dict[str, Any]) -> None:
    g = [r["guarantee_p99_pct"] for r in default_run["intervals"]]
    assert all(a < b for a, b in itertools.pairwise(g)), g
    active = [r["active_capacity_gbps"] for r in default_run["intervals"]]
    assert all(a < b for a, b in itertools.pairwise(active)), active  # the price paid
    assert active[0] > default_run["mean_throughput_gbps"]


def test_time_of_day_model_beats_the_independence_assumption(
        default_run: dict[str, Any]) -> None:
    # Beyond the paper: on the default trace, hour-conditioned distributions give at
    # least the same guarantee at every interval while reserving more only at peak.
    tod = _json("--synthetic", "--demand-model", "time-of-day")
    for ind, hour in zip(default_run["intervals"], tod["intervals"]):
        assert hour["guarantee_p99_pct"] >= ind["guarantee_p99_pct"]
        assert hour["saving_pct"] > 80.0
    assert tod["reserved_nodes"] > default_run["reserved_nodes"]  # the peak hour


def test_table_shows_ours_next_to_the_paper() -> None:
    result = _run("--synthetic", "--intervals", "10,60,7")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.split()[:2] == ["Consolidation", "interval"] for line in lines)
    paper_rows = [line for line in lines if line.strip().startswith("paper")]
    assert paper_rows[0].split()[1:] == ["73.97", "93.22", "-"]
    assert paper_rows[1].split()[1:] == ["96.84", "98.63", "-"]
    assert paper_rows[2].split()[1:] == ["85.50", "81.72", "-"]


def test_trace_file_round_trip_gives_the_same_result(tmp_path: Path) -> None:
    csv = tmp_path / "small.csv"
    args = ("--tunnels", "12", "--seed", "4", "--intervals", "5,30")
    first = _json("--synthetic", *args, "--write-trace", str(csv))
    assert csv.read_text().startswith("minute,tunnel,throughput_gbps\n")
    assert _json("--trace", str(csv), "--intervals", "5,30") == first


def test_plot_writes_a_png(tmp_path: Path) -> None:
    png = tmp_path / "fig11.png"
    result = _run("--synthetic", "--tunnels", "20", "--intervals", "10,30", "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "--th", "1.5"], "--th"),
    (["--synthetic", "--th", "0.2"], "--th"),
    (["--synthetic", "--eps", "0"], "--eps"),
    (["--synthetic", "--gpn-gbps", "0"], "--gpn-gbps"),
    (["--synthetic", "--max-tunnel-gbps", "0"], "--max-tunnel-gbps"),
    (["--synthetic", "--intervals", "3,x"], "--intervals: 'x'"),
    (["--synthetic", "--intervals", "0"], "--intervals"),
    (["--synthetic", "--tunnels", "0"], "--tunnels"),
    (["--synthetic", "--boot-min", "-1"], "--boot-min"),
    ([], "exactly one of --trace FILE or --synthetic"),
    (["--synthetic", "--trace", "x.csv"], "exactly one of --trace FILE or --synthetic"),
])
def test_bad_parameters_are_named(args: list[str], message: str) -> None:
    result = _run(*args)
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)
    assert message in str(result.exception)


def test_bad_trace_names_the_line(tmp_path: Path) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text("minute,tunnel,throughput_gbps\n0,a,0.5\n1,a,2.0\n")
    result = _run("--trace", str(csv))
    assert isinstance(result.exception, ConfigError)
    assert f"{csv}: line 3: tunnel 'a' throughput 2 Gbit/s exceeds" in str(result.exception)


def test_the_real_command_prints_one_error_line_and_exits_1(tmp_path: Path) -> None:
    csv = tmp_path / "gap.csv"
    csv.write_text("minute,tunnel,throughput_gbps\n0,a,0.5\n2,a,0.5\n")
    proc = subprocess.run([sys.executable, "-m", "protego", "sim", "--trace", str(csv)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert proc.stderr == (f"protego: error: {csv}: tunnel 'a' has no row for minute 1 "
                           f"(after line 2); every tunnel needs minutes 0..2\n")
