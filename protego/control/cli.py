"""``protego tenant``, ``protego tunnel`` and ``protego sa``: the operator's objects.

Tunnels are described in swanctl.conf terms. Every list command has ``--json``.
Invalid input gets one clear error and changes nothing.  PSKs are read from a
file or standard input (never from the command line, where ``ps`` shows them)
and are never printed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from protego.context import CliContext
from protego.control.model import (
    Tenant,
    Tunnel,
    check_new_tunnel,
    check_psk,
    check_rate,
    parse_duration,
    parse_unicast_v4,
)
from protego.control.store import ControlStore
from protego.errors import ConfigError, ProtegoError

F = TypeVar("F", bound=Callable[..., Any])


def _store(ctx: click.Context) -> ControlStore:
    obj = ctx.find_object(CliContext)
    if obj is None:
        obj = ctx.ensure_object(CliContext)
    ctx.call_on_close(obj.close)
    return ControlStore(obj.etcd())


def _errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except ProtegoError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


# =========================================================================== tenant


@click.group()
def tenant() -> None:
    """Tenants: a VIP, a virtual network (VNI) and its tunnels."""


@tenant.command("add")
@click.argument("name")
@click.option("--vni", type=int, required=True, help="The tenant network's VXLAN network identifier.")
@click.option("--network", required=True, help="The tenant's virtual network prefix, e.g. 10.1.0.0/24.")
@click.option("--vip", required=True, help="The public VIP of the tenant's gateway service.")
@click.pass_context
@_errors
def tenant_add(ctx: click.Context, name: str, vni: int, network: str, vip: str) -> None:
    """Add tenant NAME."""
    stored = _store(ctx).add_tenant(Tenant(name=name, vni=vni, network=network, vip=vip))
    click.echo(f"tenant {name} added (vip {stored.vip})")


@tenant.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_errors
def tenant_list(ctx: click.Context, as_json: bool) -> None:
    """List tenants."""
    store = _store(ctx)
    tenants = store.list_tenants()
    counts: dict[str, int] = {}
    for t in store.list_tunnels():
        counts[t.tenant] = counts.get(t.tenant, 0) + 1
    if as_json:
        click.echo(json.dumps([{**t.to_json(), "tunnels": counts.get(t.name, 0)} for t in tenants], indent=2))
        return
    _table([[t.name, str(t.vni), t.network, t.vip, str(counts.get(t.name, 0))] for t in tenants],
           ["TENANT", "VNI", "NETWORK", "VIP", "TUNNELS"])


@tenant.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_errors
def tenant_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show tenant NAME and its tunnels."""
    store = _store(ctx)
    t = store.get_tenant(name)
    tunnels = store.list_tunnels(name)
    if as_json:
        click.echo(json.dumps({**t.to_json(), "tunnels": [x.to_json() for x in tunnels]}, indent=2))
        return
    click.echo(f"tenant {t.name}: vni {t.vni}, network {t.network}, vip {t.vip}")
    for x in tunnels:
        click.echo(f"  tunnel {x.name}: remote {x.remote_addrs}, remote_ts {','.join(x.remote_ts)}")


@tenant.command("remove")
@click.argument("name")
@click.option("--with-tunnels", is_flag=True, help="Also remove the tenant's tunnels.")
@click.pass_context
@_errors
def tenant_remove(ctx: click.Context, name: str, with_tunnels: bool) -> None:
    """Remove tenant NAME."""
    removed = _store(ctx).remove_tenant(name, with_tunnels=with_tunnels)
    click.echo(f"tenant {name} removed" + (f" with tunnels {', '.join(removed)}" if removed else ""))


# =========================================================================== tunnel


def _split_ref(ref: str) -> tuple[str, str]:
    if ref.count("/") != 1:
        raise click.BadParameter(f"{ref!r}: expected TENANT/TUNNEL")
    a, b = ref.split("/")
    return a, b


def _read_psk(psk_file: str | None) -> bytes:
    if psk_file == "-":
        data = sys.stdin.buffer.read()
    elif psk_file:
        try:
            with open(psk_file, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {psk_file}: {exc.strerror}", param_hint="--psk-file") from None
    else:
        if not sys.stdin.isatty():
            raise click.UsageError("give the PSK with --psk-file FILE (or --psk-file - for standard input)")
        data = click.prompt("PSK", hide_input=True, confirmation_prompt=True).encode()
    return data.rstrip(b"\r\n")


@click.group()
def tunnel() -> None:
    """Site-to-site tunnels, defined as in swanctl.conf."""


@tunnel.command("add")
@click.argument("ref", metavar="TENANT/TUNNEL")
@click.option("--remote-addrs", required=True, help="The remote peer's address.")
@click.option("--remote-ts", required=True, help="Remote traffic selectors (comma-separated prefixes).")
@click.option("--local-ts", default="", help="Local traffic selectors (default: the tenant's network).")
@click.option("--local-id", default="", help="Our IKE identity (default: the tenant's VIP).")
@click.option("--remote-id", default="", help="The peer's IKE identity (default: its address).")
@click.option("--psk-file", default=None, help="File holding the PSK, or - for standard input.")
@click.option("--ike-proposals", default="aes128gcm16-prfsha256-ecp256", show_default=True)
@click.option("--esp-proposals", default="aes128gcm16", show_default=True)
@click.option("--ike-rekey-time", default="4h", show_default=True)
@click.option("--rekey-time", default="1h", show_default=True, help="CHILD_SA rekey time.")
@click.option("--life-time", default="0", show_default=True, help="CHILD_SA hard lifetime (0: rekey time + 10%).")
@click.option("--dpd-delay", default="10s", show_default=True)
@click.option("--rate", "rate_mbps", type=float, default=0.0, show_default=True,
              help="Rate limit in Mbit/s, each direction (0 = unlimited).")
@click.pass_context
@_errors
def tunnel_add(ctx: click.Context, ref: str, remote_addrs: str, remote_ts: str, local_ts: str, local_id: str,
               remote_id: str, psk_file: str | None, ike_proposals: str, esp_proposals: str,
               ike_rekey_time: str, rekey_time: str, life_time: str, dpd_delay: str, rate_mbps: float) -> None:
    """Add tunnel TENANT/TUNNEL."""
    tenant_name, name = _split_ref(ref)
    t = Tunnel(
        tenant=tenant_name, name=name, remote_addrs=parse_unicast_v4("--remote-addrs", remote_addrs),
        remote_ts=tuple(s.strip() for s in remote_ts.split(",") if s.strip()),
        local_ts=tuple(s.strip() for s in local_ts.split(",") if s.strip()),
        local_id=local_id, remote_id=remote_id, ike_proposals=ike_proposals, esp_proposals=esp_proposals,
        ike_rekey_time=parse_duration("--ike-rekey-time", ike_rekey_time),
        rekey_time=parse_duration("--rekey-time", rekey_time),
        life_time=0 if life_time in ("0", "0s") else parse_duration("--life-time", life_time),
        dpd_delay=parse_duration("--dpd-delay", dpd_delay), rate_mbps=check_rate("--rate", rate_mbps),
    )
    store = _store(ctx)
    t.validate(store.get_tenant(tenant_name))  # fail on bad input before asking for the PSK
    store.add_tunnel(t, _read_psk(psk_file))
    click.echo(f"tunnel {tenant_name}/{name} added")


_LOAD_FIELDS = {"tenant", "name", "remote_addrs", "remote_ts", "local_ts", "local_id", "remote_id", "psk",
                "ike_proposals", "esp_proposals", "ike_rekey_time", "rekey_time", "life_time", "dpd_delay",
                "rate_mbps"}


def _tunnel_from_doc(doc: Any, where: str) -> tuple[Tunnel, bytes]:
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    unknown = sorted(set(doc) - _LOAD_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    for req in ("tenant", "name", "remote_addrs", "remote_ts", "psk"):
        if not doc.get(req):
            raise ConfigError(f"{where}: {req} is required")
    for f_ in ("tenant", "name", "remote_addrs", "local_id", "remote_id", "ike_proposals", "esp_proposals", "psk"):
        if f_ in doc and not isinstance(doc[f_], str):
            raise ConfigError(f"{where}: {f_} must be a string, not {type(doc[f_]).__name__}")
    psk = check_psk(where, doc["psk"].encode())

    def sel(v: Any, field_: str) -> tuple[str, ...]:
        if isinstance(v, str):
            v = v.split(",")
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{where}: {field_} must be a list of prefixes or a comma-separated string")
        return tuple(x.strip() for x in v if x.strip())

    def dur(v: Any, field_: str, default: str) -> int:
        if v is None:
            v = default
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if v in ("0", "0s"):
            return 0
        return parse_duration(f"{where}: {field_}", str(v))

    t = Tunnel(
        tenant=doc["tenant"], name=doc["name"], remote_addrs=parse_unicast_v4(f"{where}: remote_addrs",
                                                                             doc["remote_addrs"]),
        remote_ts=sel(doc["remote_ts"], "remote_ts"), local_ts=sel(doc.get("local_ts", ""), "local_ts"),
        local_id=doc.get("local_id", ""), remote_id=doc.get("remote_id", ""),
        ike_proposals=doc.get("ike_proposals", "aes128gcm16-prfsha256-ecp256"),
        esp_proposals=doc.get("esp_proposals", "aes128gcm16"),
        ike_rekey_time=dur(doc.get("ike_rekey_time"), "ike_rekey_time", "4h"),
        rekey_time=dur(doc.get("rekey_time"), "rekey_time", "1h"),
        life_time=dur(doc.get("life_time"), "life_time", "0"),
        dpd_delay=dur(doc.get("dpd_delay"), "dpd_delay", "10s"),
        rate_mbps=check_rate(where, doc.get("rate_mbps", 0.0)),
    )
    return t, psk


@tunnel.command("load")
@click.argument("source", type=click.File("rb"), metavar="FILE")
@click.pass_context
@_errors
def tunnel_load(ctx: click.Context, source: Any) -> None:
    """Add many tunnels at once (what `swanctl --load-conns` is to charon).

    FILE (or - for standard input) holds one JSON object per line, with the fields of
    `tunnel add` in snake case plus "tenant", "name" and "psk", e.g.
    {"tenant": "acme", "name": "branch7", "remote_addrs": "192.0.2.7",
    "remote_ts": ["10.7.0.0/24"], "psk": "..."}. Every line is checked before any
    tunnel is added; a bad line adds nothing. Keep such a file out of version control
    (it holds PSKs): piping it from a secret store is best."""
    store = _store(ctx)
    items: list[tuple[Tunnel, bytes]] = []
    seen: set[tuple[str, str]] = set()
    tenants: dict[str, Any] = {}
    for no, raw in enumerate(source, start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"line {no}: not JSON ({getattr(exc, 'msg', 'not UTF-8')})") from None  # never echo the line: it holds a PSK
        t, psk = _tunnel_from_doc(doc, f"line {no}")
        if (t.tenant, t.name) in seen:
            raise ConfigError(f"line {no}: tunnel {t.tenant}/{t.name} appears twice")
        seen.add((t.tenant, t.name))
        if t.tenant not in tenants:
            tenants[t.tenant] = (store.get_tenant(t.tenant), store.list_tunnels(t.tenant))
        tenant, known = tenants[t.tenant]
        check_new_tunnel(t, tenant, known, f"line {no}: ")
        known.append(t)
        items.append((t, psk))
    if not items:
        raise ConfigError("no tunnel given")
    try:
        store.add_tunnels(items)
    except ProtegoError as exc:
        raise click.ClickException(f"no tunnel added: {exc}") from None
    click.echo(f"{len(items)} tunnel(s) added")


@tunnel.command("list")
@click.option("--tenant", "tenant_name", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_errors
def tunnel_list(ctx: click.Context, tenant_name: str | None, as_json: bool) -> None:
    """List tunnels."""
    tunnels = _store(ctx).list_tunnels(tenant_name)
    if as_json:
        click.echo(json.dumps([t.to_json() for t in tunnels], indent=2))
        return
    _table([[f"{t.tenant}/{t.name}", t.remote_addrs, ",".join(t.remote_ts), t.esp_proposals,
             f"{t.rate_mbps:g}" if t.rate_mbps else "-"] for t in tunnels],
           ["TUNNEL", "REMOTE", "REMOTE TS", "ESP", "RATE Mb/s"])


@tunnel.command("show")
@click.argument("ref", metavar="TENANT/TUNNEL")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_errors
def tunnel_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show tunnel TENANT/TUNNEL (never its PSK)."""
    tenant_name, name = _split_ref(ref)
    t = _store(ctx).get_tunnel(tenant_name, name)
    d = t.to_json()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"tunnel {tenant_name}/{name}")
    for k, v in d.items():
        if k not in ("tenant", "name"):
            click.echo(f"  {k}: {','.join(v) if isinstance(v, list) else v}")


@tunnel.command("remove")
@click.argument("ref", metavar="TENANT/TUNNEL")
@click.pass_context
@_errors
def tunnel_remove(ctx: click.Context, ref: str) -> None:
    """Remove tunnel TENANT/TUNNEL."""
    tenant_name, name = _split_ref(ref)
    _store(ctx).remove_tunnel(tenant_name, name)
    click.echo(f"tunnel {tenant_name}/{name} removed")


@tunnel.command("migrate")
@click.argument("ref", metavar="TENANT/TUNNEL")
@click.option("--to", "target", required=True, help="The GPN to move the tunnel to.")
@click.option("--timeout", type=click.FloatRange(1, 600), default=45.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_errors
def tunnel_migrate(ctx: click.Context, ref: str, target: str, timeout: float, as_json: bool) -> None:
    """Move TENANT/TUNNEL to another GPN by rekeying it (no packet lost)."""
    from protego.control.migrate import migrate

    tenant_name, name = _split_ref(ref)
    _store(ctx)  # resolves etcd
    etcd = ctx.find_object(CliContext).etcd()  # type: ignore[union-attr]
    res = migrate(etcd, tenant_name, name, target, timeout,
                  progress=None if as_json else (lambda m: click.echo(m, err=True)))
    if as_json:
        click.echo(json.dumps(res.__dict__))
    elif res.state == "done" and res.source == res.target:
        click.echo(f"tunnel {ref} is already on {res.target}: nothing to do")
    elif res.state == "done":
        switched = f"switched in {res.switch_ms:.0f} ms, " if res.switch_ms is not None else ""
        click.echo(f"tunnel {ref} moved {res.source} -> {res.target}: {switched}"
                   f"source cleaned after {res.total_ms:.0f} ms")
    if res.state != "done":
        raise click.ClickException(f"migration of {ref} failed: {res.detail}")


# =========================================================================== sa


@click.group()
def sa() -> None:
    """CHILD_SAs as the GMN placed them (keys are never shown)."""


@sa.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_errors
def sa_list(ctx: click.Context, as_json: bool) -> None:
    """List SA records."""
    sas = _store(ctx).list_sas()
    if as_json:
        click.echo(json.dumps(sas, indent=2))
        return
    _table([[f"{s.get('tenant')}/{s.get('tunnel')}", s.get("direction", "?"), str(s.get("spi", "?")),
             str(s.get("suite", "?")), str(s.get("gpn", "-"))] for s in sas],
           ["TUNNEL", "DIR", "SPI", "SUITE", "GPN"])
