"""ed25519 signatures over manifest bytes.

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public) so that openssl and
other tools can read them. The signature file holds the raw 64-byte signature.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tts_common.errors import TtsError


class SignatureError(TtsError):
    """A manifest signature is missing, malformed or made by no trusted key."""


class KeyFileError(TtsError):
    """A key file cannot be read or is not an ed25519 key."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key (for logs and status: never secret)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path, overwrite: bool = False) -> str:
    """Write a new key pair; the private key file is created with mode 0600."""
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise KeyFileError(f"{path} already exists (refusing to overwrite a key)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and private_path.exists():
        private_path.unlink()
    # O_EXCL + mode 0600 at creation: the key is never readable by others, not even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(public_pem)
    return key_id(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"cannot load private key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"cannot load public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an ed25519 public key")
    return key


def sign(data: bytes, private_key: Ed25519PrivateKey) -> bytes:
    return private_key.sign(data)


def verify(data: bytes, signature: bytes | None, trusted: list[Ed25519PublicKey]) -> str:
    """Return the id of the trusted key that signed `data`, or raise SignatureError."""
    if signature is None:
        raise SignatureError("manifest signature is missing")
    if len(signature) != 64:
        raise SignatureError(f"manifest signature is {len(signature)} bytes, expected 64")
    if not trusted:
        raise SignatureError("no trusted public keys are configured")
    for key in trusted:
        try:
            key.verify(signature, data)
            return key_id(key)
        except InvalidSignature:
            continue
    raise SignatureError("manifest signature does not verify against any trusted key")
