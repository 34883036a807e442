"""The trace CSV format: round trip and one clear error per kind of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protego.errors import ConfigError
from protego.sim.trace import Trace, format_trace, parse_trace, read_trace, write_trace

GOOD = """# a comment
minute,tunnel,throughput_gbps
0,a,0.5
0,b,1.0
1,b,1.5
1,a,0
"""


def test_parse_a_good_trace_in_any_row_order() -> None:
    trace = parse_trace(GOOD.splitlines())
    assert trace.tunnels == ("a", "b")
    np.testing.assert_array_equal(trace.throughput_gbps, [[0.5, 1.0], [0.0, 1.5]])
    assert trace.minutes == 2


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    trace = Trace(("x", "y/z"), np.array([[0.123456, 1.5], [0.0, 0.75]]))
    path = tmp_path / "t.csv"
    write_trace(trace, path)
    again = read_trace(path, max_tunnel_gbps=1.5)
    assert again.tunnels == trace.tunnels
    np.testing.assert_array_equal(again.throughput_gbps, trace.throughput_gbps)
    assert next(iter(format_trace(trace))) == "minute,tunnel,throughput_gbps\n"


@pytest.mark.parametrize("body, message", [
    ("0,a,0.5\n0,b,1\n1,a,0.5\n1,b,1\n3,a,1\n3,b,1\n",
     r"tunnel 'a' has no row for minute 2 \(after line 4\)"),
    ("0,a,0.5\n1,a,0.5\n0,b,0.1\n",
     r"tunnel 'b' has no row for minute 1 \(after line 4\)"),
    ("0,a,0.5\n1,a,-0.2\n", r"line 3: throughput -0.2 Gbit/s is negative"),
    ("0,a,0.5\n1,a,fast\n", r"line 3: throughput 'fast' is not a number"),
    ("0,a,0.5\n1,a,nan\n", r"line 3: throughput 'nan' is not finite"),
    ("0,a,0.5\n1,a,1.6\n", (r"line 3: tunnel 'a' throughput 1.6 Gbit/s exceeds the maximum "
                            r"tunnel throughput 1.5 Gbit/s \(--max-tunnel-gbps\)")),
    ("0,a,0.5\n0,a,0.6\n", r"line 3: duplicate row for tunnel 'a' minute 0 \(first on line 2\)"),
    ("x,a,0.5\n", r"line 2: minute 'x' is not an integer"),
    ("-1,a,0.5\n", r"line 2: minute -1 is negative"),
    ("0,a\n", r"line 2: expected 3 fields"),
    ("0,,0.5\n", r"line 2: empty tunnel id"),
])
def test_bad_rows_name_the_line(body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_trace(("minute,tunnel,throughput_gbps\n" + body).splitlines(),
                    source="t.csv", max_tunnel_gbps=1.5)


def test_bad_header_and_empty_file() -> None:
    with pytest.raises(ConfigError, match="line 1: expected header"):
        parse_trace(["min,tun,tp", "0,a,1"])
    with pytest.raises(ConfigError, match="empty trace"):
        parse_trace([])
    with pytest.raises(ConfigError, match="no rows"):
        parse_trace(["minute,tunnel,throughput_gbps"])


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read trace"):
        read_trace(tmp_path / "nope.csv")
