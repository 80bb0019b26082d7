"""Where things live in a mirror bucket. The one place that spells the keys.

    models/<name>/<version>/<file ...>          immutable once published
    models/<name>/<version>/manifest.json       written last
    models/<name>/<version>/manifest.json.sig   ed25519 signature of the manifest bytes
    channels/<name>/<channel>.json              {"version": "..."}
    torrents/<sha256>.torrent                   a file's BitTorrent metadata, by content
    tuf/<N>.root.json, tuf/timestamp.json,      signed channel metadata (python-tuf, consistent
    tuf/<N>.<role>.json                         snapshots): see mirror/trust.py
    tuf-staged/<role>.json                      a role's next version waiting for more signatures
"""

from __future__ import annotations

from .manifest import _SHA256_RE, MANIFEST_NAME, SIGNATURE_NAME, ManifestError, validate_name, validate_path

MODELS_PREFIX = "models/"
CHANNELS_PREFIX = "channels/"
TORRENTS_PREFIX = "torrents/"
TUF_PREFIX = "tuf/"
TUF_STAGED_PREFIX = "tuf-staged/"


def version_prefix(name: str, version: str) -> str:
    return f"{MODELS_PREFIX}{validate_name(name, 'model name')}/{validate_name(version, 'version')}/"


def object_key(name: str, version: str, path: str) -> str:
    return version_prefix(name, version) + validate_path(path)


def manifest_key(name: str, version: str) -> str:
    return version_prefix(name, version) + MANIFEST_NAME


def signature_key(name: str, version: str) -> str:
    return version_prefix(name, version) + SIGNATURE_NAME


def channel_key(name: str, channel: str) -> str:
    return f"{CHANNELS_PREFIX}{validate_name(name, 'model name')}/{validate_name(channel, 'channel')}.json"


def torrent_key(sha256: str) -> str:
    if not _SHA256_RE.match(sha256):
        raise ManifestError(f"not a sha256 hex digest: {sha256!r}")
    return f"{TORRENTS_PREFIX}{sha256}.torrent"


def tuf_key(filename: str) -> str:
    """A TUF metadata file as python-tuf names it (`timestamp.json`, `3.snapshot.json`)."""
    if "/" in filename or not filename.endswith(".json"):
        raise ManifestError(f"not a metadata file name: {filename!r}")
    return TUF_PREFIX + filename


def tuf_staged_key(role: str) -> str:
    return f"{TUF_STAGED_PREFIX}{validate_name(role, 'role')}.json"
