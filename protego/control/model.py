"""Tenants and tunnels: definitions, validation and their etcd encoding (pure).

A tunnel is defined in the terms operators know from ``swanctl.conf``: remote
address, identities, PSK, IKE and ESP proposals, local and remote traffic
selectors, lifetimes, plus Protego's per-tunnel rate limit.  Validation rejects
bad input with one message naming the field; nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from protego.errors import ConfigError, ConflictError

PREFIX = "/protego/v1/"
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
PSK_MIN, PSK_MAX = 16, 1024  # bytes (VICI carries at most 65535; a PSK has no use for more than 1 KiB)
ID_MAX = 255  # bytes of an IKE identity (an FQDN's limit; swanctl's identities are far shorter)
RATE_MAX_MBPS = 400_000


# --------------------------------------------------------------------------- keys


def tenant_key(tenant: str) -> str:
    return f"{PREFIX}tenants/{tenant}"


def steer_out_tunnel(key: str) -> tuple[str, str] | None:
    """``<PREFIX>steer/out/<tenant>/<tunnel>`` -> (tenant, tunnel); None for any other key
    (the GMN writes these; the GPNs and the GMN itself read them back)."""
    head = f"{PREFIX}steer/out/"
    if not key.startswith(head):
        return None
    parts = key[len(head):].split("/")
    return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else None


def tunnel_key(tenant: str, tunnel: str) -> str:
    return f"{PREFIX}tunnels/{tenant}/{tunnel}"


def tunnels_prefix(tenant: str | None = None) -> str:
    return f"{PREFIX}tunnels/{tenant}/" if tenant else f"{PREFIX}tunnels/"


def secret_key(tenant: str, tunnel: str) -> str:
    return f"{PREFIX}secrets/{tenant}/{tunnel}"


# the GMNs' public key, which PSKs are sealed to (protego/sealing.py): {"key": hex}
GMN_SEAL_KEY = f"{PREFIX}gmn/seal-key"


def vni_index_key(vni: int) -> str:
    return f"{PREFIX}index/vni/{vni}"


def vip_index_key(vip: str) -> str:
    return f"{PREFIX}index/vip/{vip}"


def tunnel_guard_key(tenant: str) -> str:
    """Bumped by every tunnel change of a tenant: serialises the overlap check."""
    return f"{PREFIX}guard/tunnels/{tenant}"


# --------------------------------------------------------------------------- proposals

# What strongSwan's proposal keywords mean, restricted to what Protego supports.
IKE_ENCR = {
    "aes128", "aes192", "aes256", "aes128gcm16", "aes256gcm16", "aes128gcm12", "aes256gcm12",
    "chacha20poly1305",
}
IKE_INTEG = {"sha1", "sha256", "sha384", "sha512"}
IKE_PRF = {"prfsha1", "prfsha256", "prfsha384", "prfsha512"}
DH = {"modp2048", "modp3072", "modp4096", "ecp256", "ecp384", "ecp521", "curve25519", "x25519"}
# the ESP suites Protego's data plane implements (userspace engine and XFRM backend)
ESP_AEAD = {"aes128gcm16", "aes256gcm16"}
ESP_ENCR = {"aes128", "aes256"}
ESP_INTEG = {"sha1", "sha256"}
ESP_FLAGS = {"esn", "noesn"}


def validate_ike_proposal(text: str, where: str = "ike proposal") -> str:
    toks = _tokens(text, where)
    encr = [t for t in toks if t in IKE_ENCR]
    aead = [t for t in encr if "gcm" in t or "poly" in t]
    unknown = [t for t in toks if t not in IKE_ENCR | IKE_INTEG | IKE_PRF | DH]
    if unknown:
        raise ConfigError(f"{where} {text!r}: unknown or unsupported algorithm '{unknown[0]}'")
    if not encr:
        raise ConfigError(f"{where} {text!r}: no encryption algorithm")
    if not any(t in DH for t in toks):
        raise ConfigError(f"{where} {text!r}: no key exchange (DH) group")
    if aead and not any(t in IKE_PRF for t in toks):
        raise ConfigError(f"{where} {text!r}: an AEAD proposal needs a PRF (e.g. prfsha256)")
    if not aead and not any(t in IKE_INTEG for t in toks):
        raise ConfigError(f"{where} {text!r}: no integrity algorithm")
    return text


def validate_esp_proposal(text: str, where: str = "esp proposal") -> str:
    toks = _tokens(text, where)
    unknown = [t for t in toks if t not in ESP_AEAD | ESP_ENCR | ESP_INTEG | ESP_FLAGS | DH]
    if unknown:
        raise ConfigError(
            f"{where} {text!r}: '{unknown[0]}' is not supported by Protego's data plane "
            f"(supported: aes128gcm16, aes256gcm16, aes128/aes256 with sha1/sha256, esn, a DH group for PFS)"
        )
    aead = [t for t in toks if t in ESP_AEAD]
    encr = [t for t in toks if t in ESP_ENCR]
    integ = [t for t in toks if t in ESP_INTEG]
    if not aead and not encr:
        raise ConfigError(f"{where} {text!r}: no encryption algorithm")
    if aead and integ:
        raise ConfigError(f"{where} {text!r}: an AEAD algorithm takes no integrity algorithm")
    if encr and not integ:
        raise ConfigError(f"{where} {text!r}: {encr[0]} needs an integrity algorithm (sha1 or sha256)")
    return text


def _tokens(text: str, where: str) -> list[str]:
    if not isinstance(text, str) or not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", text):
        raise ConfigError(f"{where} {text!r}: malformed proposal (algorithms joined by '-')")
    return text.split("-")


# --------------------------------------------------------------------------- values


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{kind} name {name!r}: 1-32 characters a-z, 0-9 and '-', starting with a letter")
    return name


def _shown(value: Any) -> str:
    """A value in an error message: short (a 70 kB identity is not echoed back)."""
    text = repr(value)
    return text if len(text) <= 64 else f"{text[:40]}... ({len(text)} characters)"


def parse_addr(where: str, value: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: an address must be a string, not {type(value).__name__}")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"{where}: malformed address {_shown(value)}") from None


def parse_unicast_v4(where: str, value: str) -> str:
    """An IPv4 unicast address a host can own and a peer can reach, in canonical form
    (IPv6 is refused until Protego carries it end to end)."""
    addr = ipaddress.ip_address(parse_addr(where, value))
    if addr.version != 4:
        raise ConfigError(f"{where}: {addr} is IPv6; Protego supports IPv4 addresses only")
    for bad, what in ((addr.is_unspecified, "unspecified"), (addr.is_loopback, "a loopback address"),
                      (addr.is_multicast, "a multicast address"), (addr.is_link_local, "a link-local address"),
                      (addr == ipaddress.IPv4Address("255.255.255.255"), "the broadcast address"),
                      (addr.is_reserved, "a reserved address (240.0.0.0/4)")):
        if bad:
            raise ConfigError(f"{where}: {addr} is {what}, not a unicast address")
    return str(addr)


def check_identity(where: str, value: str) -> str:
    """An IKE identity as swanctl takes it ('' = the default): a string of at most
    ID_MAX bytes, printable, without NUL or line breaks."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string, not {type(value).__name__}")
    size = len(value.encode())
    if size > ID_MAX:
        raise ConfigError(f"{where}: {size} bytes long; at most {ID_MAX}")
    if not value.isprintable():
        raise ConfigError(f"{where}: holds control characters")
    return value


def check_psk(where: str, psk: Any) -> bytes:
    """A PSK as the store keeps it: bytes, PSK_MIN..PSK_MAX long (never echoed)."""
    if not isinstance(psk, (bytes, bytearray)):
        raise ConfigError(f"{where}: the PSK must be a string, not {type(psk).__name__}")
    if not PSK_MIN <= len(psk) <= PSK_MAX:
        raise ConfigError(f"{where}: the PSK must be {PSK_MIN} to {PSK_MAX} bytes long (it is {len(psk)})")
    return bytes(psk)


def check_rate(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= RATE_MAX_MBPS:
        raise ConfigError(f"{where}: rate {_shown(value)} Mbit/s is not a number in range 0..{RATE_MAX_MBPS} "
                          f"(0 = unlimited)")
    return float(value)


def parse_prefix(where: str, value: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: a prefix must be a string, not {type(value).__name__}")
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise ConfigError(f"{where}: malformed prefix {value!r} ({exc})") from None


def parse_duration(where: str, value: str | int) -> int:
    """swanctl style durations: 3600, 60s, 30m, 4h, 1d → seconds."""
    if isinstance(value, int) and not isinstance(value, bool):
        secs = value
    else:
        m = re.fullmatch(r"(\d+)([smhd]?)", str(value).strip())
        if not m:
            raise ConfigError(f"{where}: malformed duration {value!r} (e.g. 3600, 60s, 30m, 4h, 1d)")
        secs = int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if secs <= 0:
        raise ConfigError(f"{where}: duration must be positive")
    return secs


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class Tenant:
    name: str
    vni: int
    network: str
    vip: str

    def validate(self) -> "Tenant":
        check_name("tenant", self.name)
        if isinstance(self.vni, bool) or not isinstance(self.vni, int) or not 1 <= self.vni < 2**24:
            raise ConfigError(f"tenant {self.name}: VNI {self.vni!r} out of range 1..16777215")
        parse_prefix(f"tenant {self.name}: network", self.network)
        vip = parse_unicast_v4(f"tenant {self.name}: vip", self.vip)
        if vip != self.vip:
            raise ConfigError(f"tenant {self.name}: VIP {self.vip!r} is not in canonical form ({vip})")
        if ipaddress.ip_address(vip) in ipaddress.ip_network(self.network):
            raise ConfigError(f"tenant {self.name}: VIP {vip} lies inside the tenant's own network")
        return self

    def canonical(self) -> "Tenant":
        """The same tenant with its VIP and network in canonical form (what is stored and
        indexed: ``10.0.0.01``-like spellings cannot make two VIPs of one)."""
        vip = parse_unicast_v4(f"tenant {self.name}: vip", self.vip)
        net = parse_prefix(f"tenant {self.name}: network", self.network)
        return Tenant(self.name, self.vni, net, vip)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Tenant":
        if not isinstance(d, dict):
            raise ConfigError("tenant record: not a JSON object")
        missing = [f for f in ("name", "vni", "network", "vip") if f not in d]
        if missing:
            raise ConfigError(f"tenant record: {', '.join(missing)} missing")
        vni = d["vni"]
        if isinstance(vni, bool) or not isinstance(vni, int):
            raise ConfigError(f"tenant record: vni {_shown(vni)} is not an integer")
        return cls(name=d["name"], vni=vni, network=d["network"], vip=d["vip"])


@dataclass(frozen=True)
class Tunnel:
    """One site-to-site tunnel of a tenant (one swanctl connection with one child)."""

    tenant: str
    name: str
    remote_addrs: str
    remote_ts: tuple[str, ...]
    local_ts: tuple[str, ...] = ()  # default: the tenant's network
    local_id: str = ""  # default: the tenant's VIP
    remote_id: str = ""  # default: the remote address
    ike_proposals: str = "aes128gcm16-prfsha256-ecp256"
    esp_proposals: str = "aes128gcm16"
    ike_rekey_time: int = 14400
    rekey_time: int = 3600  # CHILD_SA
    life_time: int = 0  # CHILD_SA hard lifetime; 0 = rekey_time * 1.1
    dpd_delay: int = 10
    rate_mbps: float = 0.0  # 0 = unlimited
    auth: str = "psk"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def validate(self, tenant: Tenant) -> "Tunnel":
        w = f"tunnel {self.tenant}/{self.name}"
        check_name("tunnel", self.name)
        if self.tenant != tenant.name:
            raise ConfigError(f"{w}: belongs to tenant {self.tenant}, not {tenant.name}")
        remote = parse_unicast_v4(f"{w}: remote address", self.remote_addrs)
        if remote != self.remote_addrs:
            raise ConfigError(f"{w}: remote address {self.remote_addrs!r} is not in canonical form ({remote})")
        check_identity(f"{w}: local_id", self.local_id)
        check_identity(f"{w}: remote_id", self.remote_id)
        for f_ in ("remote_ts", "local_ts"):
            v = getattr(self, f_)
            if not isinstance(v, tuple) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{w}: {f_} must be a list of prefixes")
        if self.auth != "psk":
            raise ConfigError(f"{w}: auth {self.auth!r} not supported (psk)")
        if not self.remote_ts:
            raise ConfigError(f"{w}: at least one remote traffic selector is required")
        tenant_net = ipaddress.ip_network(tenant.network)
        for ts in self.remote_ts:
            net = ipaddress.ip_network(parse_prefix(f"{w}: remote_ts", ts))
            if net.version == tenant_net.version and net.overlaps(tenant_net):
                raise ConfigError(f"{w}: remote_ts {ts} overlaps the tenant's network {tenant.network}")
        for ts in self.local_ts:
            net = ipaddress.ip_network(parse_prefix(f"{w}: local_ts", ts))
            if net.version != tenant_net.version or not net.subnet_of(tenant_net):  # type: ignore[arg-type]
                raise ConfigError(f"{w}: local_ts {ts} is not inside the tenant's network {tenant.network}")
        validate_ike_proposal(self.ike_proposals, f"{w}: ike proposal")
        validate_esp_proposal(self.esp_proposals, f"{w}: esp proposal")
        for f_ in ("ike_rekey_time", "rekey_time", "dpd_delay"):
            v = getattr(self, f_)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{w}: {f_} must be a positive number of seconds")
        if isinstance(self.life_time, bool) or not isinstance(self.life_time, int) or self.life_time < 0:
            raise ConfigError(f"{w}: life_time must be a number of seconds (0: rekey_time + 10%)")
        if self.life_time and self.life_time <= self.rekey_time:
            raise ConfigError(f"{w}: life_time ({self.life_time}s) must exceed rekey_time ({self.rekey_time}s)")
        check_rate(w, self.rate_mbps)
        return self

    def effective_local_ts(self, tenant: Tenant) -> tuple[str, ...]:
        return self.local_ts or (tenant.network,)

    def effective_local_id(self, tenant: Tenant) -> str:
        return self.local_id or tenant.vip

    def effective_remote_id(self) -> str:
        return self.remote_id or self.remote_addrs

    def effective_life_time(self) -> int:
        return self.life_time or max(int(self.rekey_time * 1.1), self.rekey_time + 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["remote_ts"] = list(self.remote_ts)
        d["local_ts"] = list(self.local_ts)
        d.pop("extra")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Tunnel":
        if not isinstance(d, dict):
            raise ConfigError("tunnel record: not a JSON object")
        missing = [f for f in ("tenant", "name", "remote_addrs", "remote_ts") if f not in d]
        if missing:
            raise ConfigError(f"tunnel record: {', '.join(missing)} missing")
        d = dict(d)
        for f_ in ("remote_ts", "local_ts"):
            v = d.get(f_, ())
            if not isinstance(v, (list, tuple)):
                raise ConfigError(f"tunnel record: {f_} is not a list")
            d[f_] = tuple(v)
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**{k: v for k, v in d.items() if k in known}, extra=extra)


def overlapping_selectors(new: Tunnel, existing: list[Tunnel]) -> tuple[str, str, str] | None:
    """Within one tenant no two tunnels may claim overlapping remote traffic selectors
    (egress steering picks the tunnel by tenant and destination).  Returns
    (other tunnel, its selector, the new selector) of the first clash."""
    for other in existing:
        if other.name == new.name:
            continue
        for a in new.remote_ts:
            for b in other.remote_ts:
                na, nb = ipaddress.ip_network(a), ipaddress.ip_network(b)
                if na.version == nb.version and na.overlaps(nb):
                    return other.name, b, a
    return None


def check_new_tunnel(new: Tunnel, tenant: Tenant, existing: list[Tunnel], where: str = "") -> None:
    """What adding ``new`` to ``tenant`` beside its ``existing`` tunnels needs: a valid
    tunnel, a name not taken, no remote traffic selector overlapping another tunnel's.
    ``where`` prefixes the messages (e.g. ``"line 3: "``)."""
    new.validate(tenant)
    if any(t.name == new.name for t in existing):
        raise ConflictError(f"{where}tunnel {new.tenant}/{new.name} already exists")
    clash = overlapping_selectors(new, existing)
    if clash:
        other, theirs, ours = clash
        raise ConfigError(f"{where}tunnel {new.tenant}/{new.name}: remote_ts {ours} overlaps {theirs} "
                          f"of tunnel {other} in the same tenant")
