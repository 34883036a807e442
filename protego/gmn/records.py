"""SA records and steering entries as the GMN agent writes them to etcd (pure).

Maps what charon hands the kernel-protego plugin (``AddSa``) to Protego's
schema (``docs/etcd-schema.md``): which tenant and tunnel an SA belongs to, its
suite in the data plane's terms, and the record the GPN installs.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import time
from dataclasses import dataclass
from typing import Any

from protego.control.model import PREFIX, Tenant, Tunnel
from protego.errors import ConfigError
from protego.gmn import plugin_protocol as pp
from protego.sealing import seal

# strongSwan's encryption_algorithm_t / integrity_algorithm_t (IKEv2 transform IDs)
ENCR_AES_CBC = 12
ENCR_AES_GCM_ICV16 = 20
AUTH_UNDEFINED = 0
AUTH_HMAC_SHA1_96 = 2
AUTH_HMAC_SHA2_256_128 = 12

GCM_SALT = 4


def suite_name(enc_alg: int, int_alg: int, enc_key_len: int) -> str:
    """The data plane's suite name (as in ``protego.esp.suites.Suite``) for an SA."""
    if enc_alg == ENCR_AES_GCM_ICV16:
        bits = (enc_key_len - GCM_SALT) * 8
        if bits not in (128, 256):
            raise ConfigError(f"AES-GCM key of {bits} bits is not supported")
        return f"aes{bits}gcm16"
    if enc_alg == ENCR_AES_CBC:
        bits = enc_key_len * 8
        integ = {AUTH_HMAC_SHA1_96: "sha1", AUTH_HMAC_SHA2_256_128: "sha256"}.get(int_alg)
        if bits not in (128, 256) or integ is None:
            raise ConfigError(f"AES-CBC-{bits} with integrity {int_alg} is not supported")
        return f"aes{bits}-{integ}"
    raise ConfigError(f"encryption algorithm {enc_alg} is not supported by Protego's data plane")


def spi_hex(spi: int) -> str:
    return f"{spi:08x}"


def sa_key(vip: str, spi: int) -> str:
    return f"{PREFIX}sas/{vip}/{spi_hex(spi)}"


def sastats_key(vip: str, spi: int) -> str:
    return f"{PREFIX}sastats/{vip}/{spi_hex(spi)}"


def spi_reservation_key(vip: str, spi: int) -> str:
    return f"{PREFIX}spi/{vip}/{spi_hex(spi)}"


def steer_in_key(vip: str, spi: int) -> str:
    return f"{PREFIX}steer/in/{vip}/{spi_hex(spi)}"


def steer_out_key(tenant: str, tunnel: str) -> str:
    return f"{PREFIX}steer/out/{tenant}/{tunnel}"


def placement_key(tenant: str, tunnel: str) -> str:
    return f"{PREFIX}placement/{tenant}/{tunnel}"


@dataclass(frozen=True)
class Owner:
    tenant: Tenant
    tunnel: Tunnel

    @property
    def vip(self) -> str:
        return self.tenant.vip


def find_owner(sa: pp.AddSa, tenants: list[Tenant], tunnels: list[Tunnel]) -> Owner | None:
    """Which tunnel an SA belongs to: the VIP names the tenant (inbound: destination,
    outbound: source), the peer's address and traffic selectors name the tunnel."""
    assert sa.src is not None and sa.dst is not None
    vip, peer = (sa.dst, sa.src) if sa.inbound else (sa.src, sa.dst)
    tenant = next((t for t in tenants if ipaddress.ip_address(t.vip) == vip.address), None)
    if tenant is None:
        return None
    remote_ts = sa.src_ts if sa.inbound else sa.dst_ts
    remote_nets = {ts.cidr() for ts in remote_ts}
    cands = [t for t in tunnels if t.tenant == tenant.name
             and ipaddress.ip_address(t.remote_addrs) == peer.address]
    if len(cands) > 1 and remote_nets:
        exact = [t for t in cands if set(t.remote_ts) & remote_nets]
        cands = exact or cands
    return Owner(tenant, cands[0]) if cands else None


def sa_record(sa: pp.AddSa, owner: Owner, gpn: str, gmn: str, seal_to: bytes | None = None) -> dict[str, Any]:
    """The etcd record of one SA. ``seal_to``: the GPN's public key, which its keys are
    sealed to (protego/sealing.py; what the GMN agent always does); without it, base64."""
    assert sa.src is not None and sa.dst is not None
    enc = sa.enc_key.reveal()

    def key_field(name: str, value: bytes) -> str:
        if seal_to is None:
            return base64.b64encode(value).decode()
        return seal(seal_to, value, f"{sa_key(owner.vip, sa.spi)[len(PREFIX):]}/{name}")

    suite = suite_name(sa.enc_alg, sa.int_alg, len(enc))
    lt = sa.lifetime or pp.Lifetime()
    return {
        "spi": spi_hex(sa.spi), "vip": owner.vip, "direction": "in" if sa.inbound else "out",
        "tenant": owner.tenant.name, "tunnel": owner.tunnel.name, "vni": owner.tenant.vni,
        "reqid": sa.reqid, "gpn": gpn, "gmn": gmn, "mode": "tunnel" if sa.mode == pp.Mode.TUNNEL else "transport",
        "encap": sa.encap, "src": str(sa.src.address), "dst": str(sa.dst.address),
        "sport": sa.src.port, "dport": sa.dst.port, "suite": suite,
        "enc_key": key_field("enc_key", enc),
        "integ_key": key_field("integ_key", sa.int_key.reveal()),
        "esn": sa.esn, "replay_window": sa.replay_window,
        "local_ts": [str(ts) for ts in (sa.dst_ts if sa.inbound else sa.src_ts)],
        "remote_ts": [str(ts) for ts in (sa.src_ts if sa.inbound else sa.dst_ts)],
        "lifetimes": {"time_rekey": lt.time_rekey, "time_life": lt.time_life,
                      "bytes_rekey": lt.bytes_rekey, "bytes_life": lt.bytes_life},
        "created": time.time(),
    }


def steer_in_record(owner: Owner, gpn: str) -> dict[str, Any]:
    return {"gpn": gpn, "tenant": owner.tenant.name, "tunnel": owner.tunnel.name}


def steer_out_record(owner: Owner, gpn: str, spi: int, local_ts: list[str]) -> dict[str, Any]:
    return {
        "gpn": gpn, "spi": spi_hex(spi), "vni": owner.tenant.vni, "vip": owner.vip,
        "local_ts": local_ts, "remote_ts": list(owner.tunnel.remote_ts),
        "rate_mbps": owner.tunnel.rate_mbps,
    }


def sa_record_problem(key: str, rec: dict[str, Any]) -> str | None:
    """Why an ``sas/<vip>/<spi>`` record cannot be used by the GMN (None: it can): the
    fields its flows read, with their types. The reason never carries a key."""
    parts = key[len(PREFIX) + len("sas/"):].split("/")
    if len(parts) != 2:
        return "key is not sas/<vip>/<spi>"
    for f, typ in (("spi", str), ("vip", str), ("direction", str), ("tenant", str), ("tunnel", str),
                   ("gpn", str), ("src", str), ("dst", str)):
        if not isinstance(rec.get(f), typ):
            return f"{f} is missing or not a {typ.__name__}"
    if rec["direction"] not in ("in", "out"):
        return "direction is not in/out"
    if not re.fullmatch(r"[0-9a-f]{8}", rec["spi"]) or rec["spi"] != parts[1]:
        return "spi is not the key's 8 hex digits"
    if rec["vip"] != parts[0]:
        return "vip is not the key's"
    created = rec.get("created", 0)
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        return "created is not a number"
    lts = rec.get("local_ts", [])
    if not isinstance(lts, list) or not all(isinstance(x, str) for x in lts):
        return "local_ts is not a list of prefixes"
    for f in ("sport", "dport"):
        v = rec.get(f, 4500)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535):
            return f"{f} is not a port number"
    return None
