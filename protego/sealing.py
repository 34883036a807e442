"""Keys sealed at rest: what etcd holds of a key is useless without the receiver's
private key.

Every GPN has an X25519 key pair. Its private half lives in a file on the GPN's own host
(mode 0600, created on first start: ``--seal-key-file``); the public half is published
with its registration (``gpn/nodes/<gpn>``: ``seal_key``). The GMN seals each SA's keys
to the public key of the GPN it places the SA on, so ``sas/`` records, etcd's snapshots,
backups and old revisions hold no usable key; only that GPN opens them.

A sealed value is ``s1.`` + base64url(ephemeral public key (32) | ciphertext + tag): an
ephemeral X25519 exchange with the receiver's key, HKDF-SHA256 over the shared secret
(bound to both public keys and the value's context), ChaCha20-Poly1305 with the value's
context as associated data. The context names where the value belongs (the record's key
and field), so a sealed value copied into another record does not open. A fresh
ephemeral key per value makes the AEAD key single-use (the nonce is constant).

Key rotation: stop the GPN's agent after draining it (``protego gpn drain``: every tunnel
moves off by rekey), replace or delete its key file, start it (a new key is made and
published), undrain. Records sealed to the old key are gone by then; one that is not is
refused by the GPN (``refused/gpn/<gpn>``) and its tunnel is rekeyed onto a GPN that can
open it the way any failed GPN's are.
"""

from __future__ import annotations

import base64
import contextlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protego.errors import ConfigError

PREFIX = "s1."
_INFO = b"protego-seal-v1"
_NONCE = bytes(12)
_RAW = serialization.Encoding.Raw


class SealError(ConfigError):
    """A sealed value that does not open (another key, another place, altered)."""


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes(_RAW, serialization.PublicFormat.Raw)


def parse_public(text: object) -> bytes | None:
    """A published public key (64 hex digits) -> 32 bytes; None if it is not one."""
    if not isinstance(text, str) or len(text) != 64:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


def _key(shared: bytes, eph: bytes, receiver: bytes, context: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=_INFO + eph + receiver + context).derive(shared)


def seal(receiver: bytes, plaintext: bytes, context: str) -> str:
    """``plaintext`` sealed to the X25519 public key ``receiver`` for ``context``."""
    eph = X25519PrivateKey.generate()
    eph_pub = public_bytes(eph)
    shared = eph.exchange(X25519PublicKey.from_public_bytes(receiver))
    ct = ChaCha20Poly1305(_key(shared, eph_pub, receiver, context.encode())).encrypt(
        _NONCE, plaintext, context.encode())
    return PREFIX + base64.urlsafe_b64encode(eph_pub + ct).decode()


def is_sealed(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def unseal(private: X25519PrivateKey, sealed: str, context: str) -> bytes:
    """The plaintext of ``sealed``; SealError (which says nothing of the value) if it was
    not sealed to ``private``'s public key for ``context``, or was altered."""
    try:
        raw = base64.urlsafe_b64decode(sealed[len(PREFIX):].encode())
    except (ValueError, TypeError):
        raise SealError("sealed value: malformed") from None
    if not sealed.startswith(PREFIX) or len(raw) < 32 + 16:
        raise SealError("sealed value: malformed")
    eph_pub, ct = raw[:32], raw[32:]
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(eph_pub))
        return ChaCha20Poly1305(_key(shared, eph_pub, public_bytes(private), context.encode())).decrypt(
            _NONCE, ct, context.encode())
    except (InvalidTag, ValueError):
        raise SealError("sealed value: does not open with this node's key (sealed to another key, "
                        "for another record, or altered)") from None


def load_or_create(path: str | os.PathLike[str]) -> X25519PrivateKey:
    """The private key in ``path`` (32 raw bytes or their base64, mode 0600); made there if
    it does not exist (two processes racing to make it end up with the same one)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = X25519PrivateKey.generate()
        raw = key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, p)  # fails if another process made it first: theirs wins
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        data = p.read_bytes()
    if len(data) != 32:  # also taken: the key in base64 (what Ansible writes from a vault)
        try:
            decoded = base64.b64decode(data.strip(), validate=True)
        except ValueError:
            decoded = b""
        if len(decoded) != 32:
            raise ConfigError(f"{path}: not an X25519 private key (32 bytes, or their base64, expected; "
                              f"found {len(data)} bytes)")
        data = decoded
    mode = p.stat().st_mode & 0o077
    if mode:
        raise ConfigError(f"{path}: readable by others (mode {oct(p.stat().st_mode & 0o777)}); chmod 600 it")
    return X25519PrivateKey.from_private_bytes(data)
