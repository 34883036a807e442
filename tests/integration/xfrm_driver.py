"""Drive the GPN's xfrm backend from a test: runs inside the GPN's namespace
(``ip netns exec NS python -m tests.integration.xfrm_driver --fabric ADDR``) and
answers one JSON line per JSON command on stdin (the test process never enters the
namespace itself).

Commands: ``add``/``remove`` (``rec``: an ``sas/`` record as the GMN writes it),
``egress`` (``routes``: ``[vni, [[first, last]...], [[first, last]...], spi]``),
``hosts`` (``hosts``: ``[vni, ip, mac, vtep]``), ``sync``, ``verify``, ``stats``,
``health``, ``stop``. Every answer is ``{"ok": true, ...}`` or ``{"error": "..."}``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
from typing import Any

from protego.errors import ProtegoError
from protego.gpn.kernel import KernelConfig, KernelDataPath
from protego.gpn.records import parse_sa_record
from protego.gpn.tenant import EgressRoute, mac_bytes


def handle(dp: KernelDataPath, cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd["op"]
    if op == "add":
        dp.add_sa(parse_sa_record(cmd["rec"]), update=bool(cmd.get("update")))
    elif op == "remove":
        dp.remove_sa(parse_sa_record(cmd["rec"]))
    elif op == "egress":
        dp.set_egress([EgressRoute(v, tuple(map(tuple, loc)), tuple(map(tuple, rem)), spi)
                       for v, loc, rem, spi in cmd["routes"]])
    elif op == "hosts":
        dp.set_hosts({(v, int(ipaddress.IPv4Address(ip))): (mac_bytes(mac), vtep) for v, ip, mac, vtep in cmd["hosts"]})
    elif op == "sync":
        dp.sync()
    elif op == "verify":
        dp.verify()
        return {"ok": True, "repairs": dp.repairs}
    elif op == "stats":
        st = dp.stats()
        return {"ok": True, "sas": {f"{d}/{spi:08x}": v for (d, spi), v in st.sas.items()},
                "first": {f"{d}/{spi:08x}": v for (d, spi), v in st.first.items()},
                "rekey": sorted(f"{d}/{spi:08x}" for d, spi in st.rekey),
                "counters": st.counters, "drops": st.drops}
    elif op == "health":
        assert dp._health is not None
        return {"ok": True, "broken": dp._health.broken}
    elif op == "stop":
        dp.stop()
    else:
        return {"error": f"unknown op {op!r}"}
    return {"ok": True}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fabric", required=True)
    ap.add_argument("--canary-interval", type=float, default=0.1)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    dp = KernelDataPath(KernelConfig(a.fabric, canary_interval=a.canary_interval, verify_interval=3600,
                                       tenant_keep_s=0.0)).start()
    print(json.dumps({"ok": True, "started": True}), flush=True)
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            out = handle(dp, cmd)
        except (ProtegoError, OSError, ValueError, KeyError) as exc:
            out = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)
        if cmd.get("op") == "stop":
            return
    dp.stop()


if __name__ == "__main__":
    main()
