"""ed25519 manifest signatures: only an untouched manifest signed by a trusted key passes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from mirror.manifest import FileEntry, Manifest
from mirror.signing import (
    KeyFileError,
    SignatureError,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign,
    verify,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def keypair(tmp_path: Path):
    kid = generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    return load_private_key(tmp_path / "k.key"), load_public_key(tmp_path / "k.pub"), kid


@pytest.fixture
def manifest_bytes() -> bytes:
    return Manifest.build("joe", "1.0", [FileEntry("model.safetensors", 10, "ab" * 32)]).to_bytes()


def test_valid_signature_names_the_key(keypair, manifest_bytes) -> None:
    private, public, kid = keypair
    assert verify(manifest_bytes, sign(manifest_bytes, private), [public]) == kid == key_id(public)


def test_tampered_manifest_is_rejected(keypair, manifest_bytes) -> None:
    private, public, _ = keypair
    signature = sign(manifest_bytes, private)
    tampered = manifest_bytes.replace(b'"size": 10', b'"size": 11')
    assert tampered != manifest_bytes
    with pytest.raises(SignatureError, match="does not verify"):
        verify(tampered, signature, [public])


def test_missing_signature_is_rejected(keypair, manifest_bytes) -> None:
    with pytest.raises(SignatureError, match="missing"):
        verify(manifest_bytes, None, [keypair[1]])


def test_signature_by_unknown_key_is_rejected(tmp_path, keypair, manifest_bytes) -> None:
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    other = load_private_key(tmp_path / "other.key")
    with pytest.raises(SignatureError, match="does not verify"):
        verify(manifest_bytes, sign(manifest_bytes, other), [keypair[1]])


def test_any_trusted_key_may_sign(tmp_path, keypair, manifest_bytes) -> None:
    generate_keypair(tmp_path / "new.key", tmp_path / "new.pub")
    new_private, new_public = load_private_key(tmp_path / "new.key"), load_public_key(tmp_path / "new.pub")
    assert verify(manifest_bytes, sign(manifest_bytes, new_private), [keypair[1], new_public]) == key_id(new_public)


@pytest.mark.parametrize("signature", [b"", b"\x00" * 63, b"\x00" * 65])
def test_malformed_signature_is_rejected(keypair, manifest_bytes, signature) -> None:
    with pytest.raises(SignatureError, match="bytes"):
        verify(manifest_bytes, signature, [keypair[1]])


def test_no_trusted_keys_is_rejected(keypair, manifest_bytes) -> None:
    with pytest.raises(SignatureError, match="no trusted"):
        verify(manifest_bytes, sign(manifest_bytes, keypair[0]), [])


def test_private_key_file_is_0600_and_not_overwritten(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")


def test_wrong_key_files_are_rejected(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    with pytest.raises(KeyFileError):
        load_public_key(tmp_path / "k.key")
    with pytest.raises(KeyFileError):
        load_private_key(tmp_path / "k.pub")
    with pytest.raises(KeyFileError):
        load_private_key(tmp_path / "missing.key")
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(KeyFileError):
        load_public_key(tmp_path / "junk.pub")
