"""GIN/GEN benchmark: ``python -m protego.lb.bench [--json]`` (root; builds its own
bare-namespace lab, :mod:`protego.lb.lab`, and removes it).

Prints (with ``--json``: emits one JSON object with):

* ``steer_update_ms`` — median latency of one SPI move, from the etcd write to the
  element in the kernel (measured inside the lb's namespace by polling libnftables);
* ``steer_update_1000_ms`` — 1,000 SPIs moved at once (8 back-to-back etcd transactions
  of 125: etcd's default ``--max-txn-ops`` is 128), from the first write until all of
  them are in the kernel;
* ``detect_ms`` — median time from a GPN's death (``kill -9`` of its heartbeat
  responder) to the ``since`` of its dead declaration, over ``--trials`` trials;
* ``forward_ratio`` — packets/s reaching a GPN through the GIN with Protego's rules
  loaded / packets/s through the same namespace with one plain route (medians of 3
  alternating runs each, same sender: one Python process, ≈ 60–90k packets/s on the
  2-core machine, so the ratio shows the rules' cost at that rate, not a maximum).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from protego.lb import model
from protego.lb.lab import GPN, PY, VIP_A, VIP_C, Lab, chain_suffix, steer_in, wait_state
from protego.testbed import procs

MOVE_SPI = 0x2000
BULK_BASE = 0x30000
TXN_OPS = 125


# --------------------------------------------------------------------------- #
# inside the lb namespace: etcd write -> element in the kernel


def _spi_map(nft: Any) -> dict[int, str]:
    nft.set_json_output(True)
    rc, out, err = nft.cmd("list map ip protego_gin spi_in")
    if rc != 0:
        raise RuntimeError(err)
    res: dict[int, str] = {}
    for item in json.loads(out)["nftables"]:
        m = item.get("map")
        if m:
            for key, val in m.get("elem", []):
                res[int(key["concat"][1])] = val["jump"]["target"]
    return res


def _wait(nft: Any, want: dict[int, str], timeout: float = 10.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        cur = _spi_map(nft)
        if all(cur.get(spi, "").endswith(suffix) for spi, suffix in want.items()):
            return (time.perf_counter() - t0) * 1000
        time.sleep(0.0002)
    raise RuntimeError(f"steering not visible within {timeout}s")


def steer_probe(endpoints: list[str], moves: int, bulk: int, suffix: dict[str, str]) -> dict[str, Any]:
    import nftables  # type: ignore[import-untyped]

    from protego.store.etcd import Etcd, PutOp, encode_json

    nft = nftables.Nftables()
    store = Etcd(endpoints)
    key = f"{model.PREFIX}steer/in/{VIP_C}/{MOVE_SPI:08x}"
    lat = []
    try:
        gpns = ["gpn1", "gpn2"]
        store.put_json(key, {"gpn": "gpn1", "tenant": "bench", "tunnel": "move"})
        _wait(nft, {MOVE_SPI: suffix["gpn1"]})
        for i in range(moves):
            g = gpns[(i + 1) % 2]
            t0 = time.perf_counter()
            store.put_json(key, {"gpn": g, "tenant": "bench", "tunnel": "move"})
            _wait(nft, {MOVE_SPI: suffix[g]})
            lat.append((time.perf_counter() - t0) * 1000)
        spis = [BULK_BASE + i for i in range(bulk)]

        def ops(g: str) -> list[Any]:
            return [PutOp(f"{model.PREFIX}steer/in/{VIP_C}/{s:08x}",
                          encode_json({"gpn": g, "tenant": "bench", "tunnel": f"b{s % 50}"})) for s in spis]

        def write(g: str) -> None:
            all_ops = ops(g)  # etcd refuses transactions of more than 128 operations (default)
            for i in range(0, len(all_ops), TXN_OPS):
                store.txn([], all_ops[i:i + TXN_OPS])

        write("gpn1")
        _wait(nft, dict.fromkeys(spis, suffix["gpn1"]), timeout=30)
        t0 = time.perf_counter()
        write("gpn2")
        _wait(nft, dict.fromkeys(spis, suffix["gpn2"]), timeout=30)
        bulk_ms = (time.perf_counter() - t0) * 1000
        store.delete_prefix(f"{model.PREFIX}steer/in/{VIP_C}/")
    finally:
        store.close()
    return {"steer_update_ms_all": [round(x, 3) for x in lat], "steer_update_1000_ms": round(bulk_ms, 2)}


# --------------------------------------------------------------------------- #
# on the host


def _rx_packets(lab: Lab, node: str) -> int:
    return int(lab.sh(node, "cat", "/sys/class/net/fab0/statistics/rx_packets").stdout)


def _forward_pps(lab: Lab, seconds: float) -> float:
    before = _rx_packets(lab, "gpn1")
    t0 = time.monotonic()
    lab.send("peer", [f"esp:{VIP_A}:0x2101:10000000:100"], duration=seconds)
    elapsed = time.monotonic() - t0
    time.sleep(0.2)
    return (_rx_packets(lab, "gpn1") - before) / elapsed


def run(trials: int = 10, moves: int = 21, bulk: int = 1000, seconds: float = 1.0) -> dict[str, Any]:
    lab = Lab("b" + secrets.token_hex(4)[:7])
    try:
        lab.build()
        lab.start()
        # warm-up: both next hops exist so their slots are known
        steer_in(lab, VIP_A, 0x2101, "gpn1", "bench", "fwd")
        steer_in(lab, VIP_A, 0x2102, "gpn2", "bench", "fwd2")
        suffix = {g: chain_suffix(lab, g) for g in GPN}
        for g in GPN:
            wait_state(lab, g, "alive", 0)
        etcd_args = [arg for e in lab.endpoints for arg in ("--etcd", e)]
        out = lab.sh("lb", PY, "-m", "protego.lb.bench", "_steer", "--moves", str(moves), "--bulk", str(bulk),
                     "--suffix", json.dumps(suffix), *etcd_args)
        steer = json.loads(out.stdout.strip().splitlines()[-1])
        detect = []
        responder = next(r for r in lab.procs if r.node == "gpn2" and r.kind == "responder")
        for _ in range(trials):
            t_kill = time.time()
            os.kill(responder.pid, signal.SIGKILL)
            detect.append((wait_state(lab, "gpn2", "dead", t_kill) - t_kill) * 1000)
            responder = lab.spawn_responder("gpn2")
            wait_state(lab, "gpn2", "alive", time.time())
        # forwarding: the agent and responders stopped (the rules stay loaded), so only the
        # data path differs; with/without alternate (3 each) so load drift hits both alike
        lab.stop_agent()
        for r in lab.procs:
            if r.kind == "responder":
                procs.stop(r)
        saved = lab.dir / "gin.nft"
        saved.write_text(lab.sh("lb", "nft", "list", "table", "ip", "protego_gin").stdout)
        lab.sh("lb", "ip", "route", "replace", f"{VIP_A}/32", "via", GPN["gpn1"])  # the plain path
        runs: dict[str, list[float]] = {"protego": [], "plain": []}
        for _ in range(3):
            runs["protego"].append(_forward_pps(lab, seconds))
            lab.sh("lb", "nft", "delete", "table", "ip", "protego_gin")
            runs["plain"].append(_forward_pps(lab, seconds))
            lab.sh("lb", "nft", "-f", str(saved))
        with_rules = statistics.median(runs["protego"])
        plain = statistics.median(runs["plain"])
        lab.sh("lb", PY, "-m", "protego.lb.cli", "cleanup")
        lat = steer["steer_update_ms_all"]
        return {
            "steer_update_ms": round(statistics.median(lat), 3),
            "steer_update_1000_ms": steer["steer_update_1000_ms"],
            "detect_ms": round(statistics.median(detect), 1),
            "forward_ratio": round(with_rules / plain, 3) if plain else None,
            "detail": {"steer_update_ms_all": lat, "detect_ms_all": [round(x, 1) for x in detect],
                       "forward_pps": {"protego": round(with_rules), "plain": round(plain)}},
        }
    finally:
        lab.close()


def format_text(r: dict[str, Any]) -> str:
    d = r["detail"]
    return "\n".join([
        f"steer_update_ms       {r['steer_update_ms']:>10}  (median of {len(d['steer_update_ms_all'])} SPI moves)",
        f"steer_update_1000_ms  {r['steer_update_1000_ms']:>10}  (1,000 SPIs, 8 etcd transactions)",
        f"detect_ms             {r['detect_ms']:>10}  (median of {len(d['detect_ms_all'])} kill -9 trials)",
        (f"forward_ratio         {r['forward_ratio']:>10}  ({d['forward_pps']['protego']} / "
         f"{d['forward_pps']['plain']} packets/s)"),
    ])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="protego bench lb", description="GIN/GEN benchmark (root)")
    sub = ap.add_subparsers(dest="cmd")
    probe = sub.add_parser("_steer", help=argparse.SUPPRESS)
    probe.add_argument("--etcd", action="append", required=True)
    probe.add_argument("--moves", type=int, default=21)
    probe.add_argument("--bulk", type=int, default=1000)
    probe.add_argument("--suffix", required=True)
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=1.0)
    a = ap.parse_args(argv)
    if a.cmd == "_steer":
        print(json.dumps(steer_probe(a.etcd, a.moves, a.bulk, json.loads(a.suffix))))
        return
    if os.geteuid() != 0:
        sys.exit("protego bench lb: needs root (network namespaces, nftables)")
    try:
        r = run(trials=max(10, a.trials), seconds=a.seconds)
    except subprocess.CalledProcessError as exc:
        sys.exit(f"protego bench lb: {exc}\n{(exc.stderr or '')[-2000:]}")
    except RuntimeError as exc:
        sys.exit(f"protego bench lb: {exc}")
    print(json.dumps(r, sort_keys=True) if a.json else format_text(r))


if __name__ == "__main__":
    main()
