"""Fuzzing in CI with a fixed budget (issue #19): the kernel-protego plugin's C wire codec
under AddressSanitizer and UndefinedBehaviorSanitizer, the Python plugin-protocol
decoder, and the parsers of what operators hand Protego (topologies, traces) and of the
SA records the GPN reads. Each fuzzer is seeded: a failure reproduces."""

from __future__ import annotations

import glob
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from protego.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "charon-plugins"
C_ITERATIONS = 300_000  # about 8 s here
SEED = 20261207


def _strongswan_source() -> Path | None:
    hits = sorted(glob.glob(str(PLUGIN / ".strongswan-src" / "strongswan-*" / "src" / "libstrongswan")))
    return Path(hits[-1]).parents[1] if hits else None


def test_the_c_codec_survives_300k_damaged_frames_under_asan_and_ubsan(tmp_path: Path) -> None:
    src = _strongswan_source()
    if src is None:
        pytest.skip("strongSwan's source is not unpacked in charon-plugins/.strongswan-src "
                    "(charon-plugins/build.sh fetches it; bootstrap.sh runs it)")
    if shutil.which("gcc") is None or not Path("/usr/lib/ipsec/libstrongswan.so.0").exists():
        pytest.skip("gcc or /usr/lib/ipsec/libstrongswan.so.0 is missing (bootstrap.sh installs both)")
    exe = tmp_path / "fuzz_msg"
    version = src.name.split("-", 1)[1]
    build = subprocess.run(
        ["gcc", "-std=gnu11", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-fno-omit-frame-pointer", "-Wall", "-Wno-format", "-Wno-pointer-sign", "-Wno-unused-parameter",
         "-include", str(PLUGIN / "strongswan-config.h"), f'-DVERSION="{version}"',
         f"-I{src}/src/libstrongswan", f"-I{src}/src/libcharon", f"-I{PLUGIN}/kernel-protego",
         "-o", str(exe), str(PLUGIN / "kernel-protego" / "fuzz_msg.c"),
         str(PLUGIN / "kernel-protego" / "kernel_protego_msg.c"), "/usr/lib/ipsec/libstrongswan.so.0",
         "-Wl,-rpath,/usr/lib/ipsec"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    conf = tmp_path / "strongswan.conf"
    conf.write_text("")
    env = {**os.environ, "STRONGSWAN_CONF": str(conf),
           "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=86",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=87"}
    run = subprocess.run([str(exe), str(C_ITERATIONS), str(SEED)], capture_output=True, text=True, env=env,
                         timeout=600)
    # strongSwan's reader logs every short read on stderr: keep what is not that
    report = "\n".join(line for line in run.stderr.splitlines() if "insufficient to parse" not in line)
    assert run.returncode == 0, f"exit {run.returncode}:\n{report[-4000:]}"
    counts = dict(zip(run.stdout.split()[::2], map(int, run.stdout.split()[1::2])))
    assert counts["iterations"] == C_ITERATIONS
    # not vacuous: a good share of the frames parsed and had attributes read back
    assert counts["parsed"] > C_ITERATIONS // 5 and counts["attributes"] > counts["parsed"]


def test_the_python_plugin_decoder_raises_only_protocol_errors() -> None:
    from protego.gmn import plugin_protocol as pp

    rng = random.Random(SEED)
    seeds = [pp.encode(pp.Hello(software="charon", pid=7), 1)[4:],
             pp.encode(pp.AddSa(src=pp.Host.parse("198.18.1.1", 4500), dst=pp.Host.parse("203.0.113.11", 4500),
                                spi=0xC0000001, reqid=1, enc_alg=20, enc_key=pp.Secret(bytes(20)),
                                src_ts=(pp.TrafficSelector.from_network("10.201.0.0/24"),),
                                dst_ts=(pp.TrafficSelector.from_network("10.1.0.0/24"),),
                                flags=pp.SaFlag.INBOUND), 2)[4:],
             pp.encode(pp.DelSa(src=pp.Host.parse("198.18.1.1"), dst=pp.Host.parse("203.0.113.11"), spi=5), 3)[4:],
             pp.encode(pp.GetSpi(src=pp.Host.parse("198.18.1.1"), dst=pp.Host.parse("203.0.113.11")), 4)[4:]]
    decoded = 0
    for _ in range(50_000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            if op == 0 and data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif op == 1:
                del data[rng.randrange(len(data) + 1):]
            elif op == 2:
                data += rng.randbytes(rng.randint(1, 32))
            elif len(data) > 2:
                i = rng.randrange(len(data) - 1)
                data[i:i + 2] = rng.randbytes(2)
        try:
            pp.decode(bytes(data))
            decoded += 1
        except pp.ProtocolError:
            pass
    assert 0 < decoded < 50_000


def test_the_sa_record_parser_raises_only_config_errors() -> None:
    """What a GPN reads from etcd: any value of any field is a refusal, never a crash."""
    from protego.gpn.records import parse_sa_record
    from tests.unit.test_gpn_agent import rec

    rng = random.Random(SEED)
    junk = [None, True, -1, 0, 2**70, 1.5, float("nan"), "", "abc", "ffffffff", [], [1], {}, {"a": 1},
            "10.0.0.0/8", ["10.0.0.0/33"], "AAAA", "s1.AAAA"]
    ok = 0
    for i in range(20_000):
        r = rec(0x1000 + i % 7, rng.choice(["in", "out"]))
        for _ in range(rng.randint(1, 3)):
            field = rng.choice(list(r) + ["extra"])
            if rng.random() < 0.2:
                r.pop(field, None)
            else:
                r[field] = rng.choice(junk)
        try:
            parse_sa_record(r, f"sas/203.0.113.11/{i:08x}")
            ok += 1
        except ConfigError:
            pass
    assert ok < 20_000


def test_the_topology_and_trace_parsers_raise_only_config_errors(tmp_path: Path) -> None:
    from protego.sim.trace import parse_trace
    from protego.testbed.topology import load_topology

    rng = random.Random(SEED)
    topo_text = (REPO / "protego" / "data" / "topology-default.toml").read_text()
    alphabet = "[]=\"'.,#\n 0123456789abcdefxyz-_/:"
    path = tmp_path / "t.toml"
    for _ in range(300):
        text = list(topo_text)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(text))
            op = rng.randrange(3)
            if op == 0:
                text[i] = rng.choice(alphabet)
            elif op == 1:
                del text[i:i + rng.randint(1, 40)]
            else:
                text.insert(i, rng.choice(alphabet))
        path.write_text("".join(text))
        try:
            load_topology(path)
        except ConfigError:
            pass
    parsed = 0
    for _ in range(3000):
        lines = ["minute,tunnel,throughput_gbps"] + [
            f"{rng.choice(['0', '1', '-5', 'x', '999999999999', '2', ''])},"
            f"{rng.choice(['t1', '', 't2', 'a/b'])},"
            f"{rng.choice(['', '1', '-5', 'x', 'inf', 'nan', '0.5', '1e400'])}"
            + rng.choice(["", ",", ",x"])
            for _ in range(rng.randint(0, 6))]
        try:
            parse_trace(lines, max_tunnel_gbps=rng.choice([None, 1.0]))
            parsed += 1
        except ConfigError:
            pass
    assert parsed > 0  # some traces were well formed
