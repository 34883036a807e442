"""``protego status``: the system at a glance, computed from one etcd snapshot (pure
apart from the single ``get_prefix``)."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from protego.context import CliContext
from protego.control.model import PREFIX
from protego.errors import ProtegoError
from protego.store.etcd import KV


def summarize(kvs: list[KV], now: float | None = None, events: int = 15) -> dict[str, Any]:
    now = time.time() if now is None else now
    by: dict[str, Any] = {}
    for kv in kvs:
        try:
            by[kv.key[len(PREFIX):]] = json.loads(kv.value)
        except ValueError:
            continue  # secrets and foreign values

    def under(prefix: str) -> dict[str, Any]:
        return {k[len(prefix):]: v for k, v in by.items() if k.startswith(prefix)}

    leader = by.get("gmn/leader")
    ha = under("gmn/ha/")
    gmns = [{"node": n, "active": bool(leader and leader.get("node") == n), **v,
             "ha": {k: ha[n].get(k) for k in ("active", "fed_ok", "entries", "mirrored", "fenced")} if n in ha else None}
            for n, v in sorted(under("gmn/members/").items())]
    sas = list(under("sas/").values())
    stats = under("sastats/")
    placements = under("placement/")
    health = under("gpn/health/")
    loads = under("gpn/load/")
    gpn_names = sorted(set(under("gpn/nodes/")) | set(health))
    gpns = []
    for g in gpn_names:
        node = by.get(f"gpn/nodes/{g}")
        h = health.get(g, {})
        gpns.append({
            "node": g, "registered": node is not None, "health": h.get("state", "unknown"),
            "health_since": h.get("since"), "cpu": (loads.get(g) or {}).get("cpu"),
            "draining": (by.get(f"gpn/admin/{g}") or {}).get("state") == "draining",
            "tunnels": sum(1 for p in placements.values() if p.get("gpn") == g),
            "fabric_addr": (node or {}).get("fabric_addr"),
        })
    tunnels = []
    for key, t in sorted(under("tunnels/").items()):
        tenant, name = key.split("/", 1)
        mine = [s for s in sas if s.get("tenant") == tenant and s.get("tunnel") == name]
        ins = [s for s in mine if s.get("direction") == "in"]
        outs = [s for s in mine if s.get("direction") == "out"]
        newest_in = max(ins, key=lambda s: s.get("created", 0), default=None)
        newest_out = max(outs, key=lambda s: s.get("created", 0), default=None)

        def counters(sa: dict[str, Any] | None) -> dict[str, Any]:
            return stats.get(f"{sa['vip']}/{sa['spi']}", {}) if sa else {}

        cin, cout = counters(newest_in), counters(newest_out)
        tunnels.append({
            "tenant": tenant, "tunnel": name, "remote": t.get("remote_addrs"),
            "state": "up" if ins and outs else ("negotiating" if mine else "down"),
            "gpn": (placements.get(f"{tenant}/{name}") or {}).get("gpn"),
            "spi_in": newest_in["spi"] if newest_in else None, "spi_out": newest_out["spi"] if newest_out else None,
            "sas": len(mine), "rate_limit_mbps": t.get("rate_mbps") or None,
            "bytes_in": cin.get("bytes"), "bytes_out": cout.get("bytes"),
        })
    evs = sorted(under("events/").values(), key=lambda e: e.get("ts", 0))[-events:]
    # what each agent skipped (protego/store/refused.py): agent -> its refused records
    refused = [{"agent": who, "count": r.get("count", 0), "records": r.get("records", [])}
               for who, r in sorted(under("refused/").items()) if isinstance(r, dict) and r.get("count")]
    return {"time": now, "gmn_leader": leader.get("node") if leader else None, "gmns": gmns, "gpns": gpns,
            "tenants": len(under("tenants/")), "tunnels": tunnels, "events": evs, "refused": refused}


def _gmn_line(g: dict[str, Any]) -> str:
    """``gmn1* (mirroring 3 IKE SAs)`` / ``gmn2 (standby, caught up)``."""
    name = g["node"] + ("*" if g["active"] else "")
    h = g.get("ha")
    if not h:
        return name
    if h.get("active"):
        return f"{name} (mirroring {h.get('entries', 0)} IKE SAs)"
    return f"{name} (standby, {'caught up' if h.get('fed_ok') else 'NOT caught up'})"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("--events", "n_events", type=click.IntRange(0, 500), default=15, show_default=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool, n_events: int) -> None:
    """The system at a glance: GMN leader, GPNs, tunnels, recent events."""
    obj = ctx.find_object(CliContext) or CliContext()
    try:
        _rev, kvs = obj.etcd().get_prefix(PREFIX)
    except ProtegoError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        obj.close()
    st = summarize(kvs, events=n_events)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"GMN leader: {st['gmn_leader'] or 'NONE'}   "
               f"GMNs: {', '.join(_gmn_line(g) for g in st['gmns']) or '-'}")
    click.echo(f"\nGPNs ({len(st['gpns'])})")
    click.echo(f"  {'NODE':<10} {'REGISTERED':<10} {'HEALTH':<8} {'CPU':>5} {'TUNNELS':>7}  ADMIN")
    for g in st["gpns"]:
        cpu = f"{g['cpu'] * 100:.0f}%" if isinstance(g["cpu"], (int, float)) else "-"
        click.echo(f"  {g['node']:<10} {'yes' if g['registered'] else 'NO':<10} {g['health']:<8} {cpu:>5} "
                   f"{g['tunnels']:>7}  {'draining' if g.get('draining') else '-'}")
    click.echo(f"\nTunnels ({len(st['tunnels'])} of {st['tenants']} tenants)")
    click.echo(f"  {'TUNNEL':<26} {'STATE':<11} {'GPN':<6} {'SPI IN':<9} {'SPI OUT':<9} {'LIMIT':>7} "
               f"{'BYTES IN':>12} {'BYTES OUT':>12}")
    for t in st["tunnels"]:
        limit = f"{t['rate_limit_mbps']:g}M" if t["rate_limit_mbps"] else "-"
        click.echo(f"  {t['tenant'] + '/' + t['tunnel']:<26} {t['state']:<11} {t['gpn'] or '-':<6} "
                   f"{t['spi_in'] or '-':<9} {t['spi_out'] or '-':<9} {limit:>7} "
                   f"{t['bytes_in'] if t['bytes_in'] is not None else '-':>12} "
                   f"{t['bytes_out'] if t['bytes_out'] is not None else '-':>12}")
    if st["refused"]:
        click.echo(f"\nRefused records ({sum(r['count'] for r in st['refused'])}: skipped by the agents named; "
                   f"fix or delete them)")
        for r in st["refused"]:
            for rec in r["records"]:
                click.echo(f"  {r['agent']:<12} {rec.get('key', '?'):<40} {rec.get('reason', '')}")
            if r["count"] > len(r["records"]):
                click.echo(f"  {r['agent']:<12} ... and {r['count'] - len(r['records'])} more")
    if st["events"]:
        click.echo("\nRecent events")
        for e in st["events"]:
            ts = time.strftime("%H:%M:%S", time.localtime(e.get("ts", 0)))
            who = f"{e.get('tenant')}/{e.get('tunnel')}" if e.get("tunnel") else (e.get("node") or "")
            click.echo(f"  {ts} {e.get('kind', '?'):<20} {who:<26} {e.get('detail', '')}")
