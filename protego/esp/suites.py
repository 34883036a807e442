"""ESP cipher suites and their per-SA transforms.

A *suite* is the static description (key sizes, ICV length, alignment, the names
the kernel and strongSwan use). A *transform* holds the keyed cipher objects of
one SA and does the cryptographic part of ESP: it turns a plaintext payload
(inner packet + ESP trailer) into ``IV || ciphertext || ICV`` and back.

Suites (RFC 8221 "MUST"/"SHOULD" set that the GPN supports):

* ``aes128gcm16`` / ``aes256gcm16`` -- AES-GCM with a 16-byte ICV (RFC 4106). The
  key material is ``key || 4-byte salt``; the nonce is ``salt || 8-byte explicit
  IV``; the AAD is ``SPI || seq`` (8 bytes) or ``SPI || seq_hi || seq_lo``
  (12 bytes) with ESN (RFC 4106 section 5). The explicit IV is the 64-bit sequence
  number, which is unique per SA because sequence numbers are never reused
  (RFC 4106 section 3.1 allows any scheme that never repeats an IV under a key).
* ``aes128-sha1`` / ``aes256-sha1`` -- AES-CBC (RFC 3602) with HMAC-SHA1-96
  (RFC 2404).
* ``aes128-sha256`` / ``aes256-sha256`` -- AES-CBC with HMAC-SHA-256-128
  (RFC 4868). With ESN the high-order 32 sequence bits are appended to the ICV
  input but not transmitted (RFC 4303 section 3.3.2.1 / 2.2.1).

Performance notes (PLATFORM.md): one ``AESGCM`` object per SA is reused for every
packet. For CBC we keep *one long-lived* CBC encryptor and decryptor per SA
instead of creating a context per packet (the context set-up dominates):

* Encryption: the encryptor's chaining state is the last ciphertext block ``C``.
  We feed a fresh random block ``R`` in front of the padded payload; its output
  ``E(R xor C)`` is an unpredictable block that we transmit as the packet's IV,
  and every following block is then exactly CBC under that IV. The IV is
  therefore random and unpredictable, as RFC 3602 requires.
* Decryption: CBC decryption of block ``i`` only needs ``C[i-1]``. Feeding
  ``IV || ciphertext`` to a long-lived decryptor yields one junk block (the IV
  decrypted against the previous packet) followed by the exact plaintext. The
  caller guarantees the ciphertext is a whole number of blocks, so the decryptor
  never keeps a partial block between packets.

Transforms are not thread-safe: every worker owns its own transform objects.
Nothing here logs, and no key byte ever appears in a repr or an exception.
"""

from __future__ import annotations

import enum
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "CbcHmacTransform",
    "GcmTransform",
    "Suite",
    "SuiteSpec",
    "Transform",
    "make_transform",
]

_U32 = struct.Struct("!I")


@dataclass(frozen=True)
class SuiteSpec:
    """Static properties of one ESP cipher suite."""

    name: str
    aead: bool
    enc_key_len: int  # bytes, without salt
    salt_len: int  # bytes (GCM: 4)
    auth_key_len: int  # bytes (0 for AEAD)
    iv_len: int  # explicit IV bytes on the wire
    icv_len: int  # bytes on the wire
    align: int  # the padded plaintext length is a multiple of this
    hash_name: str | None  # hashlib name of the HMAC hash
    xfrm_enc_name: str  # kernel crypto API name
    xfrm_auth_name: str | None
    xfrm_trunc_bits: int  # ICV bits (AEAD icv_len or auth trunc_len)

    @property
    def keymat_len(self) -> int:
        """Length of the key material a KDF must produce for this suite."""
        return self.enc_key_len + self.salt_len + self.auth_key_len

    @property
    def min_esp_len(self) -> int:
        """Smallest well-formed ESP packet: header, IV, one aligned unit, ICV."""
        return 8 + self.iv_len + self.align + self.icv_len


class Suite(enum.Enum):
    """The cipher suites Protego's ESP engine supports (strongSwan proposal names)."""

    AES128GCM16 = "aes128gcm16"
    AES256GCM16 = "aes256gcm16"
    AES128_SHA1 = "aes128-sha1"
    AES256_SHA1 = "aes256-sha1"
    AES128_SHA256 = "aes128-sha256"
    AES256_SHA256 = "aes256-sha256"

    @property
    def spec(self) -> SuiteSpec:
        return _SPECS[self]

    @classmethod
    def parse(cls, name: str) -> Suite:
        """Accept the strongSwan proposal name (case-insensitive)."""
        try:
            return cls(name.strip().lower())
        except ValueError:
            raise ValueError(f"unknown ESP suite {name!r}") from None


def _gcm(bits: int) -> SuiteSpec:
    return SuiteSpec(
        name=f"aes{bits}gcm16", aead=True, enc_key_len=bits // 8, salt_len=4,
        auth_key_len=0, iv_len=8, icv_len=16, align=4, hash_name=None,
        xfrm_enc_name="rfc4106(gcm(aes))", xfrm_auth_name=None, xfrm_trunc_bits=128,
    )


def _cbc(bits: int, hash_name: str) -> SuiteSpec:
    sha1 = hash_name == "sha1"
    return SuiteSpec(
        name=f"aes{bits}-{hash_name}", aead=False, enc_key_len=bits // 8, salt_len=0,
        auth_key_len=20 if sha1 else 32, iv_len=16, icv_len=12 if sha1 else 16, align=16,
        hash_name=hash_name, xfrm_enc_name="cbc(aes)",
        xfrm_auth_name="hmac(sha1)" if sha1 else "hmac(sha256)",
        xfrm_trunc_bits=96 if sha1 else 128,
    )


_SPECS: dict[Suite, SuiteSpec] = {
    Suite.AES128GCM16: _gcm(128),
    Suite.AES256GCM16: _gcm(256),
    Suite.AES128_SHA1: _cbc(128, "sha1"),
    Suite.AES256_SHA1: _cbc(256, "sha1"),
    Suite.AES128_SHA256: _cbc(128, "sha256"),
    Suite.AES256_SHA256: _cbc(256, "sha256"),
}


class Transform(Protocol):
    """The cryptographic part of ESP for one SA (see module docstring)."""

    spec: SuiteSpec

    def protect(self, header: bytes, seq: int, esn: bool, plaintext: bytes) -> bytes:
        """Return ``IV || ciphertext || ICV`` for an already padded plaintext.

        ``header`` is the 8-byte ``SPI || seq_lo``; ``seq`` the full sequence number.
        """
        ...

    def unprotect(self, packet: bytes, seq_hi: int, esn: bool) -> bytes | None:
        """Verify and decrypt a whole ESP packet (header included).

        Returns the plaintext (payload + trailer) or ``None`` when the ICV does not
        verify. The caller has checked the length and alignment already.
        """
        ...


class GcmTransform:
    """AES-GCM-16 (RFC 4106) with one reused ``AESGCM`` object."""

    __slots__ = ("_aead", "_salt", "spec")

    def __init__(self, spec: SuiteSpec, enc_key: bytes, salt: bytes) -> None:
        self.spec = spec
        self._aead = AESGCM(enc_key)
        self._salt = bytes(salt)

    def __repr__(self) -> str:
        return f"<GcmTransform {self.spec.name}>"

    def protect(self, header: bytes, seq: int, esn: bool, plaintext: bytes) -> bytes:
        iv = seq.to_bytes(8, "big")
        if esn:
            aad = header[:4] + iv  # SPI || seq_hi || seq_lo; iv is the 64-bit seq
        else:
            aad = header
        return iv + self._aead.encrypt(self._salt + iv, plaintext, aad)

    def unprotect(self, packet: bytes, seq_hi: int, esn: bool) -> bytes | None:
        if esn:
            aad = packet[:4] + _U32.pack(seq_hi) + packet[4:8]
        else:
            aad = packet[:8]
        try:
            return self._aead.decrypt(self._salt + packet[8:16], packet[16:], aad)
        except InvalidTag:
            return None


class CbcHmacTransform:
    """AES-CBC with HMAC-SHA1-96 or HMAC-SHA-256-128, long-lived contexts."""

    __slots__ = ("_dec", "_enc", "_icv_len", "_mac", "_random", "spec")

    def __init__(
        self,
        spec: SuiteSpec,
        enc_key: bytes,
        auth_key: bytes,
        random_source: Callable[[int], bytes] = os.urandom,
    ) -> None:
        assert spec.hash_name is not None
        self.spec = spec
        cipher = Cipher(algorithms.AES(enc_key), modes.CBC(bytes(16)))
        self._enc = cipher.encryptor()
        self._dec = cipher.decryptor()
        self._mac = hmac.new(auth_key, digestmod=spec.hash_name)
        self._icv_len = spec.icv_len
        self._random = random_source

    def __repr__(self) -> str:
        return f"<CbcHmacTransform {self.spec.name}>"

    def icv(self, data: bytes, seq_hi: bytes = b"") -> bytes:
        """Truncated HMAC over ``data`` (and the implicit ESN high bits)."""
        h = self._mac.copy()
        h.update(data)
        if seq_hi:
            h.update(seq_hi)
        return h.digest()[: self._icv_len]

    def decrypt_blocks(self, iv: bytes, ciphertext: bytes) -> bytes:
        """CBC-decrypt whole blocks with the long-lived decryptor."""
        return self._dec.update(iv + ciphertext)[16:]

    def protect(self, header: bytes, seq: int, esn: bool, plaintext: bytes) -> bytes:
        body = self._enc.update(self._random(16) + plaintext)  # IV || ciphertext
        icv = self.icv(header + body, _U32.pack(seq >> 32) if esn else b"")
        return body + icv

    def unprotect(self, packet: bytes, seq_hi: int, esn: bool) -> bytes | None:
        cut = len(packet) - self._icv_len
        expected = self.icv(packet[:cut], _U32.pack(seq_hi) if esn else b"")
        if not hmac.compare_digest(expected, packet[cut:]):
            return None
        return self._dec.update(packet[8:cut])[16:]


def make_transform(
    suite: Suite,
    enc_key: bytes,
    salt: bytes = b"",
    auth_key: bytes = b"",
    random_source: Callable[[int], bytes] = os.urandom,
) -> Transform:
    """Build the transform for ``suite``; key lengths are checked by the SA model."""
    spec = suite.spec
    if spec.aead:
        return GcmTransform(spec, enc_key, salt)
    return CbcHmacTransform(spec, enc_key, auth_key, random_source)
