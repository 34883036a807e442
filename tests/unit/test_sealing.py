"""SA keys sealed at rest (issue #19, item 3): what etcd holds opens only with the
receiving GPN's private key, for the very record and field it was sealed for."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protego import sealing
from protego.control.model import PREFIX, Tenant, Tunnel
from protego.errors import ConfigError
from protego.gmn import plugin_protocol as pp
from protego.gmn.records import Owner, sa_key, sa_record
from protego.gpn.agent import desired_sas
from protego.gpn.records import parse_sa_record

KEY = bytes(range(20))  # AES-128-GCM key + salt
ACME = Tenant("acme", 1001, "10.1.0.0/24", "203.0.113.11")
HQ = Tunnel(tenant="acme", name="hq", remote_addrs="198.18.1.1", remote_ts=("10.201.0.0/24",))


def test_a_sealed_value_opens_with_its_key_for_its_context_only() -> None:
    gpn = X25519PrivateKey.generate()
    other = X25519PrivateKey.generate()
    pub = sealing.public_bytes(gpn)
    s = sealing.seal(pub, KEY, "sas/203.0.113.11/c0000001/enc_key")
    assert sealing.is_sealed(s) and KEY.hex() not in s and base64.b64encode(KEY).decode() not in s
    assert sealing.unseal(gpn, s, "sas/203.0.113.11/c0000001/enc_key") == KEY
    assert sealing.seal(pub, KEY, "x") != sealing.seal(pub, KEY, "x")  # a fresh ephemeral key each time
    with pytest.raises(sealing.SealError):
        sealing.unseal(other, s, "sas/203.0.113.11/c0000001/enc_key")  # another GPN
    with pytest.raises(sealing.SealError):
        sealing.unseal(gpn, s, "sas/203.0.113.11/c0000002/enc_key")  # copied into another record
    with pytest.raises(sealing.SealError):
        sealing.unseal(gpn, s, "sas/203.0.113.11/c0000001/integ_key")  # another field
    raw = bytearray(base64.urlsafe_b64decode(s[3:]))
    raw[-1] ^= 1
    with pytest.raises(sealing.SealError) as err:
        sealing.unseal(gpn, "s1." + base64.urlsafe_b64encode(bytes(raw)).decode(), "sas/203.0.113.11/c0000001/enc_key")
    assert KEY.hex() not in str(err.value)
    for junk in ("s1.", "s1.!!!", "s1." + base64.urlsafe_b64encode(b"short").decode()):
        with pytest.raises(sealing.SealError):
            sealing.unseal(gpn, junk, "c")
    assert sealing.parse_public(pub.hex()) == pub
    assert sealing.parse_public("zz" * 32) is None and sealing.parse_public(None) is None


def test_the_key_file_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "gpn1.key"
    k1 = sealing.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    k2 = sealing.load_or_create(path)
    assert sealing.public_bytes(k1) == sealing.public_bytes(k2)  # a restart keeps its key
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        sealing.load_or_create(path)
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(ConfigError, match="not an X25519 private key"):
        sealing.load_or_create(path)


def _add_sa() -> pp.AddSa:
    return pp.AddSa(src=pp.Host.parse("198.18.1.1", 4500), dst=pp.Host.parse("203.0.113.11", 4500), spi=0xC0000001,
                    reqid=1, mode=pp.Mode.TUNNEL, enc_alg=20, enc_key=pp.Secret(KEY), replay_window=32,
                    flags=pp.SaFlag.INBOUND | pp.SaFlag.ENCAP,
                    src_ts=(pp.TrafficSelector.from_network("10.201.0.0/24"),),
                    dst_ts=(pp.TrafficSelector.from_network("10.1.0.0/24"),))


def test_the_gmn_record_holds_no_usable_key_and_the_gpn_it_names_installs_it() -> None:
    """Was: SA keys sat in etcd in base64 (any reader of etcd, a snapshot, a backup or an
    old revision had them)."""
    gpn1, gpn2 = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    rec = sa_record(_add_sa(), Owner(ACME, HQ), "gpn1", "gmn1", seal_to=sealing.public_bytes(gpn1))
    text = json.dumps(rec)
    assert KEY.hex() not in text and base64.b64encode(KEY).decode() not in text
    assert sealing.is_sealed(rec["enc_key"]) and sealing.is_sealed(rec["integ_key"])
    key = sa_key("203.0.113.11", 0xC0000001)
    ok, bad = desired_sas({key: (5, 5, rec)}, "gpn1", lambda s, c: sealing.unseal(gpn1, s, c))
    assert not bad and ok[key][2].sa.keys.enc_key + ok[key][2].sa.keys.salt == KEY
    # a GPN with another key (a record placed elsewhere, a stolen copy) cannot use it
    ok, bad = desired_sas({key: (5, 5, rec)}, "gpn1", lambda s, c: sealing.unseal(gpn2, s, c))
    assert not ok and "does not open with this node's key" in bad[key] and KEY.hex() not in bad[key]
    # nor a GPN without a key at all
    with pytest.raises(ConfigError, match="sealed and this node holds no key"):
        parse_sa_record(rec, key[len(PREFIX):])
    # the same record under another key: refused (the context binds it to its place)
    other = sa_key("203.0.113.11", 0xC0000002)
    moved = {**rec, "spi": "c0000002"}
    ok, bad = desired_sas({other: (5, 5, moved)}, "gpn1", lambda s, c: sealing.unseal(gpn1, s, c))
    assert not ok and other in bad
