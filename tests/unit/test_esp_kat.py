"""Known-answer tests for the ESP cipher suites.

RFC 4106 publishes no test vectors of its own, so:

* the AES-GCM primitive is checked against the GCM specification's test cases
  (McGrew & Viega, "The Galois/Counter Mode of Operation", test cases 3, 4, 15, 16,
  also in NIST's GCM validation set);
* the ESP-level AES-GCM packet is checked against a layout built by hand from
  RFC 4106/4303: the explicit IV is the 64-bit sequence number, so an ESN SA at
  sequence number 0xfacedbaddecaf888 with salt 0xcafebabe uses exactly the GCM
  spec's 96-bit IV, and the ciphertext of the inner packet must equal the spec's
  ciphertext (GCM ciphertext does not depend on the AAD);
* AES-CBC is checked against NIST SP 800-38A F.2.1/F.2.5, HMAC-SHA1 against
  RFC 2202 and HMAC-SHA-256 against RFC 4231 (truncated to 96/128 bits as
  RFC 2404/RFC 4868 prescribe), and the ESP-level CBC packet against a layout
  built by hand from RFC 4303/3602.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protego.esp import Direction, OutboundSa, SaKeys, SecurityAssociation, Suite
from protego.esp.suites import CbcHmacTransform, GcmTransform

# --- GCM specification test vectors -------------------------------------------
GCM_K128 = bytes.fromhex("feffe9928665731c6d6a8f9467308308")
GCM_K256 = GCM_K128 + GCM_K128
GCM_IV = bytes.fromhex("cafebabefacedbaddecaf888")
GCM_P = bytes.fromhex(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255")
GCM_A = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
GCM_C128 = bytes.fromhex(
    "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
    "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985")
GCM_C256 = bytes.fromhex(
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad")
GCM_CASES = [
    # (name, key, plaintext, aad, ciphertext, tag)
    ("tc3", GCM_K128, GCM_P, b"", GCM_C128, "4d5c2af327cd64a62cf35abd2ba6fab4"),
    ("tc4", GCM_K128, GCM_P[:60], GCM_A, GCM_C128[:60], "5bc94fbc3221a5db94fae95ae7121a47"),
    ("tc15", GCM_K256, GCM_P, b"", GCM_C256, "b094dac5d93471bdec1a502270e3cc6c"),
    ("tc16", GCM_K256, GCM_P[:60], GCM_A, GCM_C256[:60], "76fc6ece0f4e1768cddf8853bb2d551b"),
]


@pytest.mark.parametrize("name,key,pt,aad,ct,tag", GCM_CASES, ids=[c[0] for c in GCM_CASES])
def test_gcm_primitive_known_answers(name: str, key: bytes, pt: bytes, aad: bytes, ct: bytes,
                                     tag: str) -> None:
    out = AESGCM(key).encrypt(GCM_IV, pt, aad or None)
    assert out == ct + bytes.fromhex(tag)
    assert AESGCM(key).decrypt(GCM_IV, out, aad or None) == pt


@pytest.mark.parametrize("suite,key,spec_ct", [
    (Suite.AES128GCM16, GCM_K128, GCM_C128), (Suite.AES256GCM16, GCM_K256, GCM_C256)])
def test_gcm_esp_packet_by_hand(suite: Suite, key: bytes, spec_ct: bytes) -> None:
    salt, explicit_iv = GCM_IV[:4], GCM_IV[4:]
    seq = int.from_bytes(explicit_iv, "big")  # 0xfacedbaddecaf888: ESN SA
    spi = 0x12345678
    sa = SecurityAssociation(spi, Direction.OUTBOUND, suite, SaKeys(key, salt=salt),
                             "198.18.0.1", "198.18.0.2", esn=True)
    out = OutboundSa(sa)
    out.sequence._next = seq  # test hook: jump to the spec's IV
    inner = GCM_P[:60]
    esp = out.encapsulate(inner, next_header=4)
    # RFC 4303 2.4: 60 + 2 trailer bytes -> pad to 64 (4-byte alignment): pad 1, 2
    plaintext = inner + b"\x01\x02" + b"\x02\x04"
    seq_hi, seq_lo = seq >> 32, seq & 0xFFFFFFFF
    aad = struct.pack("!III", spi, seq_hi, seq_lo)  # RFC 4106 5: SPI || seq_hi || seq_lo
    expected_tail = AESGCM(key).encrypt(GCM_IV, plaintext, aad)
    assert esp == struct.pack("!II", spi, seq_lo) + explicit_iv + expected_tail
    # the ciphertext of the inner packet is the GCM spec's ciphertext
    assert esp[16:76] == spec_ct[:60]
    assert len(esp) == 8 + 8 + 64 + 16


def test_gcm_esp_non_esn_aad_by_hand() -> None:
    key, salt = GCM_K128, GCM_IV[:4]
    t = GcmTransform(Suite.AES128GCM16.spec, key, salt)
    header = struct.pack("!II", 0x1001, 7)
    body = t.protect(header, 7, False, b"\x45" + bytes(18) + b"\x01\x02\x02\x04")
    iv = (7).to_bytes(8, "big")
    assert body[:8] == iv
    assert body[8:] == AESGCM(key).encrypt(salt + iv, b"\x45" + bytes(18) + b"\x01\x02\x02\x04",
                                           header)
    assert t.unprotect(header + body, 0, False) is not None
    assert t.unprotect(header + body, 1, True) is None  # ESN AAD differs


# --- AES-CBC: NIST SP 800-38A -------------------------------------------------
SP800_IV = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
SP800_P = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
SP800_CASES = [
    ("F.2.1", "2b7e151628aed2a6abf7158809cf4f3c",
     "7649abac8119b246cee98e9b12e9197d5086cb9b507219ee95db113a917678b2"),
    ("F.2.5", "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
     "f58c4c04d6e5f1ba779eabfb5f7bfbd69cfc4e967edb808d679f777bc6702c7d"),
]


@pytest.mark.parametrize("name,key,ct", SP800_CASES, ids=[c[0] for c in SP800_CASES])
def test_cbc_long_lived_decryptor_known_answers(name: str, key: str, ct: str) -> None:
    spec = (Suite.AES128_SHA256 if len(key) == 32 else Suite.AES256_SHA256).spec
    t = CbcHmacTransform(spec, bytes.fromhex(key), bytes(32))
    # Twice and interleaved with other data: no chaining state leaks between packets.
    assert t.decrypt_blocks(SP800_IV, bytes.fromhex(ct)) == SP800_P
    assert t.decrypt_blocks(bytes(16), bytes(48)) != SP800_P
    assert t.decrypt_blocks(SP800_IV, bytes.fromhex(ct)) == SP800_P


# --- HMAC: RFC 2202 (SHA-1) and RFC 4231 (SHA-256) -----------------------------
HMAC_CASES = [
    ("rfc2202-1", Suite.AES128_SHA1, b"\x0b" * 20, b"Hi There",
     "b617318655057264e28bc0b6fb378c8ef146be00"),
    ("rfc2202-2", Suite.AES128_SHA1, b"Jefe", b"what do ya want for nothing?",
     "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"),
    ("rfc4231-1", Suite.AES128_SHA256, b"\x0b" * 20, b"Hi There",
     "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    ("rfc4231-2", Suite.AES128_SHA256, b"Jefe", b"what do ya want for nothing?",
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
]


@pytest.mark.parametrize("name,suite,key,data,digest", HMAC_CASES,
                         ids=[c[0] for c in HMAC_CASES])
def test_hmac_known_answers_truncated(name: str, suite: Suite, key: bytes, data: bytes,
                                      digest: str) -> None:
    t = CbcHmacTransform(suite.spec, bytes(16), key)
    want = bytes.fromhex(digest)[: suite.spec.icv_len]
    assert t.icv(data) == want
    assert t.icv(data) == want  # the keyed template is reusable
    # ESN: the high-order bits are appended to the ICV input (RFC 4303 2.2.1)
    assert t.icv(data[:-4], data[-4:]) == want


# --- ESP-level CBC packet by hand ---------------------------------------------
class FixedRandom:
    def __init__(self, blocks: list[bytes]) -> None:
        self.blocks = list(blocks)

    def __call__(self, n: int) -> bytes:
        assert n == 16
        return self.blocks.pop(0)


@pytest.mark.parametrize("suite", [Suite.AES128_SHA1, Suite.AES256_SHA1,
                                   Suite.AES128_SHA256, Suite.AES256_SHA256])
@pytest.mark.parametrize("esn", [False, True])
def test_cbc_esp_packets_by_hand(suite: Suite, esn: bool) -> None:
    spec = suite.spec
    enc_key = bytes(range(spec.enc_key_len))
    auth_key = bytes(range(100, 100 + spec.auth_key_len))
    spi = 0xC0FFEE01
    r1, r2 = bytes([0xA5] * 16), bytes(range(16))
    sa = SecurityAssociation(spi, Direction.OUTBOUND, suite,
                             SaKeys(enc_key, auth_key=auth_key), "198.18.0.1", "198.18.0.2",
                             esn=esn)
    out = OutboundSa(sa, random_source=FixedRandom([r1, r2]))
    start = (3 << 32) + 0xFFFFFFFF if esn else 41  # ESN: crosses the low-32-bit wrap
    out.sequence._next = start
    inner = bytes([0x45]) + bytes(range(1, 37))  # 37 bytes
    ecb = Cipher(algorithms.AES(enc_key), modes.ECB()).encryptor()
    prev_block = bytes(16)  # the long-lived encryptor starts with a zero chain
    for seq, r in ((start, r1), (start + 1, r2)):
        esp = out.encapsulate(inner)
        # RFC 4303: 37 + 2 trailer bytes -> pad to 48: 9 pad bytes 1..9
        plaintext = inner + bytes(range(1, 10)) + bytes([9, 4])
        iv = ecb.update(bytes(a ^ b for a, b in zip(r, prev_block)))  # E(R xor C_prev)
        enc = Cipher(algorithms.AES(enc_key), modes.CBC(iv)).encryptor()
        ct = enc.update(plaintext) + enc.finalize()
        header = struct.pack("!II", spi, seq & 0xFFFFFFFF)
        icv_input = header + iv + ct + (struct.pack("!I", seq >> 32) if esn else b"")
        icv = hmac.new(auth_key, icv_input, getattr(hashlib, spec.hash_name or ""))
        assert esp == header + iv + ct + icv.digest()[: spec.icv_len]
        prev_block = ct[-16:]
