"""SA model validation; key material never appears in repr, str, errors or logs."""

from __future__ import annotations

import logging
import pickle

import pytest

from protego.errors import ConfigError
from protego.esp import (
    Decapsulator,
    Direction,
    InvalidSaError,
    Lifetime,
    OutboundSa,
    SaKeys,
    SecurityAssociation,
    Suite,
    UdpEncap,
)
from protego.esp.suites import make_transform

# A recognisable key so a leak would be visible in any text.
KEY = bytes.fromhex("5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2")


def keys_for(suite: Suite) -> SaKeys:
    return SaKeys.from_keymat(suite, (KEY * 3)[: suite.spec.keymat_len])


def sa(suite: Suite = Suite.AES128GCM16, **kw: object) -> SecurityAssociation:
    args: dict[str, object] = {"spi": 0x1000, "direction": Direction.INBOUND, "suite": suite,
                                   "keys": keys_for(suite), "src": "198.18.0.1", "dst": "198.18.0.2"}
    args.update(kw)
    return SecurityAssociation(**args)  # type: ignore[arg-type]


def leaks(text: str) -> bool:
    return "5ec2e7" in text.lower() or "\\x5e\\xc2" in text.lower()


@pytest.mark.parametrize("suite", list(Suite))
def test_valid_sas_and_keymat_split(suite: Suite) -> None:
    s = sa(suite, esn=True, encap=UdpEncap(4501, 4500), replay_window=4096)
    spec = suite.spec
    assert len(s.keys.enc_key) == spec.enc_key_len
    assert len(s.keys.salt) == spec.salt_len
    assert len(s.keys.auth_key) == spec.auth_key_len
    assert str(s.src) == "198.18.0.1"
    assert Suite.parse(suite.value.upper()) is suite
    for text in (repr(s), str(s), repr(s.keys), str(s.keys), s.label,
                 repr(make_transform(suite, s.keys.enc_key, s.keys.salt, s.keys.auth_key))):
        assert not leaks(text), text


@pytest.mark.parametrize("kw,what", [
    ({"spi": 0}, "SPI"), ({"spi": 255}, "SPI"), ({"spi": 1 << 32}, "SPI"),
    ({"replay_window": 32}, "replay window"), ({"replay_window": 4097}, "replay window"),
    ({"src": "not-an-ip"}, "src"), ({"dst": "2001:db8::1"}, "famil"),
    ({"reqid": -1}, "reqid"), ({"direction": "in"}, "direction"),
])
def test_invalid_sas(kw: dict[str, object], what: str) -> None:
    with pytest.raises(InvalidSaError) as exc:
        sa(**kw)
    assert what in str(exc.value)
    assert isinstance(exc.value, ConfigError)


@pytest.mark.parametrize("suite", list(Suite))
def test_wrong_key_lengths_never_show_keys(suite: Suite, caplog: pytest.LogCaptureFixture) -> None:
    spec = suite.spec
    long_key = KEY * 2
    bad = [SaKeys(long_key[: spec.enc_key_len + 1], salt=KEY[: spec.salt_len],
                  auth_key=KEY[: spec.auth_key_len]),
           SaKeys(KEY[: spec.enc_key_len], salt=KEY[:3] if spec.aead else KEY[:4],
                  auth_key=KEY[: spec.auth_key_len]),
           SaKeys(KEY[: spec.enc_key_len], salt=KEY[: spec.salt_len],
                  auth_key=b"" if not spec.aead else KEY[:4])]
    with caplog.at_level(logging.DEBUG):
        for keys in bad:
            with pytest.raises(InvalidSaError) as exc:
                sa(suite, keys=keys)
            assert "bytes" in str(exc.value) and not leaks(str(exc.value))
            assert not leaks(repr(exc.value))
        with pytest.raises(InvalidSaError) as exc:
            SaKeys.from_keymat(suite, KEY[:5])
        assert not leaks(str(exc.value))
    assert not leaks(caplog.text)


def test_lifetime_and_encap_validation() -> None:
    with pytest.raises(InvalidSaError):
        Lifetime(soft_bytes=10, hard_bytes=5)
    with pytest.raises(InvalidSaError):
        Lifetime(hard_packets=0)
    with pytest.raises(InvalidSaError):
        UdpEncap(0, 4500)
    with pytest.raises(InvalidSaError):
        sa(encap=(4500, 4500))


def test_keys_cannot_be_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(keys_for(Suite.AES128GCM16))


def test_engine_logs_never_show_keys(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        inbound = sa(Suite.AES256_SHA256)
        dec = Decapsulator()
        dec.add(inbound)
        out = OutboundSa(sa(Suite.AES256_SHA256, direction=Direction.OUTBOUND))
        esp = out.encapsulate(b"\x45" + bytes(19))
        dec.decap_esp(esp[:-1] + b"\x00")
        dec.remove(0x1000)
    assert "spi=0x00001000" in caplog.text
    assert not leaks(caplog.text)
    assert not leaks(repr(dec.drops)) and not leaks(repr(out))
