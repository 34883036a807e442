"""``protego lb`` command line (no root: only parsing and refusals)."""

from __future__ import annotations

from click.testing import CliRunner

from protego.lb.cli import lb


def test_help_lists_commands() -> None:
    res = CliRunner().invoke(lb, ["--help"])
    assert res.exit_code == 0
    for cmd in ("run", "cleanup", "status", "validate", "bench"):
        assert cmd in res.output


def test_run_help_shows_defaults() -> None:
    res = CliRunner().invoke(lb, ["run", "--help"])
    assert res.exit_code == 0
    for opt in ("--role", "--etcd", "--sample", "--hb-interval-ms", "--hb-misses", "--tag-dscp"):
        assert opt in res.output


def test_bad_options_are_refused_before_anything_starts() -> None:
    r = CliRunner()
    assert r.invoke(lb, ["run", "--role", "middle"]).exit_code == 2
    assert r.invoke(lb, ["run", "--tag-dscp", "zz"]).exit_code == 2
    res = r.invoke(lb, ["run", "--tag-dscp", "0"])
    assert res.exit_code == 1 and "tag_dscp" in str(res.exception)
    res = r.invoke(lb, ["run", "--hb-interval-ms", "0"])
    assert res.exit_code == 1 and "interval" in str(res.exception)


def test_validate_command() -> None:
    r = CliRunner()
    ok = r.invoke(lb, ["validate", "steer/in/203.0.113.11/00001234",
                       '{"gpn": "gpn1", "tenant": "acme", "tunnel": "hq"}', "--gpn", "gpn1"])
    assert ok.exit_code == 0 and "SteerIn" in ok.output
    bad = r.invoke(lb, ["validate", "/protego/v1/steer/in/203.0.113.11/00001234",
                        '{"gpn": "gpn9", "tenant": "acme", "tunnel": "hq"}', "--gpn", "gpn1"])
    assert bad.exit_code == 1 and "unknown GPN 'gpn9'" in str(bad.exception)
    zero = r.invoke(lb, ["validate", "steer/out/acme/hq", ('{"gpn": "gpn1", "vni": 1001, "local_ts": '
                         '["10.1.0.0/24"], "remote_ts": ["10.201.0.0/24"], "rate_mbps": -2}')])
    assert zero.exit_code == 1 and "rate_mbps -2" in str(zero.exception)
    assert r.invoke(lb, ["validate", "gmn/leader", "{}"]).exit_code == 1
    assert r.invoke(lb, ["validate", "steer/out/a/b", "nope"]).exit_code == 1
