"""The manifest contract: what a published model version contains.

One definition, used by the publisher (`tts-mirror`) and the provisioner alike. A
manifest lists every file of a version with its size and whole-file sha256; MinIO's
own multipart checksums are not whole-file hashes, so this is the source of truth.

Parsing is strict: anything a hostile or broken mirror could use to write outside the
snapshot (absolute paths, `..`, odd separators), duplicate or clashing paths, bad
hashes, negative sizes and sizes over the limits (`SizeLimits`: 256 GiB per file, 1 TiB
per model by default) are rejected with a message naming the offending entry.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

from tts_common.errors import TtsError

# Schema 2 adds each file's BitTorrent info-hash (`btih`); a manifest without any is
# written as schema 1, so provisioners that predate peer-to-peer keep reading it.
SCHEMA_VERSION = 2
SCHEMAS = (1, 2)
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.json.sig"
# Files the provisioner adds to a snapshot itself; a model may not ship its own.
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME, "COMPLETE"})

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_BTIH_RE = re.compile(r"^[0-9a-f]{40}$")
# Upper bound on one manifest's size: a manifest is a small JSON document.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# Sizes no real model has: refused at parse time so the outcome never depends on the
# disk a server happens to have (the provisioner's config can change both).
DEFAULT_MAX_FILE_SIZE = 256 * 1024**3
DEFAULT_MAX_MODEL_SIZE = 1024**4


@dataclass(frozen=True)
class SizeLimits:
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    max_model_size: int = DEFAULT_MAX_MODEL_SIZE


DEFAULT_LIMITS = SizeLimits()


class ManifestError(TtsError, ValueError):
    """A manifest (or a name/version/path inside one) is malformed or unsafe."""


def validate_name(value: Any, what: str) -> str:
    """Model names, versions and channels become path components: keep them plain."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or value in {".", ".."}:
        raise ManifestError(
            f"invalid {what} {value!r}: use 1-128 of A-Z a-z 0-9 . _ - , starting with a letter or digit"
        )
    return value


def validate_path(value: Any) -> str:
    """A file path inside a version: relative, normalized POSIX, no `..`, not reserved."""
    if not isinstance(value, str) or not value:
        raise ManifestError(f"file path must be a non-empty string, got {value!r}")
    if "\x00" in value or "\\" in value:
        raise ManifestError(f"file path {value!r} contains a NUL or backslash")
    if value.startswith("/"):
        raise ManifestError(f"file path {value!r} is absolute")
    parts = value.split("/")
    if ".." in parts:
        raise ManifestError(f"file path {value!r} contains '..'")
    if posixpath.normpath(value) != value or "." in parts or "" in parts:
        raise ManifestError(f"file path {value!r} is not normalized")
    if value in RESERVED_NAMES:
        raise ManifestError(f"file path {value!r} is reserved for the manifest and snapshot markers")
    return value


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    btih: str | None = None  # info-hash (hex) of the file's torrent, see mirror/torrents.py

    @classmethod
    def parse(cls, raw: Any, index: int, max_size: int | None = None, schema: int = SCHEMA_VERSION) -> "FileEntry":
        if not isinstance(raw, dict):
            raise ManifestError(f"files[{index}] must be an object")
        allowed = {"path", "size", "sha256"} | ({"btih"} if schema >= 2 else set())
        unknown = set(raw) - allowed
        if unknown:
            raise ManifestError(f"files[{index}] has unknown keys: {sorted(unknown)}")
        try:
            path = validate_path(raw.get("path"))
        except ManifestError as exc:
            raise ManifestError(f"files[{index}]: {exc}") from None
        size = raw.get("size")
        # bool is an int subclass in Python; a size of `true` is not a size.
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"files[{index}] ({path}): size must be a non-negative integer, got {size!r}")
        if max_size is not None and size > max_size:
            raise ManifestError(f"files[{index}] ({path}): size {size} is over the {max_size} byte limit "
                                "for one file (max_file_size)")
        digest = raw.get("sha256")
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise ManifestError(f"files[{index}] ({path}): sha256 must be 64 lowercase hex digits, got {digest!r}")
        btih = raw.get("btih")
        if btih is not None and (not isinstance(btih, str) or not _BTIH_RE.match(btih)):
            raise ManifestError(f"files[{index}] ({path}): btih must be 40 lowercase hex digits, got {btih!r}")
        if btih is not None and size == 0:
            raise ManifestError(f"files[{index}] ({path}): an empty file cannot have a torrent (btih)")
        return cls(path=path, size=size, sha256=digest, btih=btih)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.btih is not None:
            doc["btih"] = self.btih
        return doc


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    files: tuple[FileEntry, ...]
    created: str = field(default="")

    def __post_init__(self) -> None:
        validate_name(self.name, "model name")
        validate_name(self.version, "version")
        _check_unique_paths(self.files)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> "FileEntry":
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    @classmethod
    def build(cls, name: str, version: str, files: Iterable[FileEntry]) -> "Manifest":
        ordered = tuple(sorted(files, key=lambda f: f.path))
        created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
        return cls(name=name, version=version, files=ordered, created=created)

    @classmethod
    def parse(cls, data: bytes | str, limits: SizeLimits | None = DEFAULT_LIMITS) -> "Manifest":
        """Strict parse. `limits=None` only for manifests accepted before (a kept snapshot's)."""
        if isinstance(data, bytes):
            if len(data) > MAX_MANIFEST_BYTES:
                raise ManifestError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} byte limit")
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ManifestError(f"manifest is not UTF-8: {exc}") from None
        try:
            raw = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ManifestError("manifest must be a JSON object")
        unknown = set(raw) - {"schema", "name", "version", "created", "files"}
        if unknown:
            raise ManifestError(f"manifest has unknown keys: {sorted(unknown)}")
        schema = raw.get("schema")
        if isinstance(schema, bool) or schema not in SCHEMAS:
            raise ManifestError(f"unsupported manifest schema {schema!r} (this version reads {list(SCHEMAS)})")
        files_raw = raw.get("files")
        if not isinstance(files_raw, list) or not files_raw:
            raise ManifestError("manifest 'files' must be a non-empty list")
        max_file = limits.max_file_size if limits else None
        files = tuple(FileEntry.parse(item, i, max_file, schema) for i, item in enumerate(files_raw))
        if limits is not None:
            total = 0
            for i, entry in enumerate(files):
                total += entry.size
                if total > limits.max_model_size:
                    raise ManifestError(f"files[{i}] ({entry.path}): the files up to here add up to {total} bytes, "
                                        f"over the {limits.max_model_size} byte limit for one model (max_model_size)")
        created = raw.get("created", "")
        if not isinstance(created, str):
            raise ManifestError("manifest 'created' must be a string")
        return cls(name=raw.get("name"), version=raw.get("version"), files=files, created=created)

    @classmethod
    def parse_for(cls, data: bytes, name: str, version: str,
                  limits: SizeLimits = DEFAULT_LIMITS) -> "Manifest":
        """Parse a manifest fetched as NAME/VERSION and check it says so (a manifest
        copied to another version's key must not be accepted there)."""
        manifest = cls.parse(data, limits)
        if (manifest.name, manifest.version) != (name, version):
            raise ManifestError(f"manifest is for {manifest.name}/{manifest.version}, expected {name}/{version}")
        return manifest

    def to_bytes(self) -> bytes:
        """Canonical serialization: the exact bytes that get signed and published."""
        doc = {
            "schema": SCHEMA_VERSION if any(f.btih for f in self.files) else 1,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "files": [f.to_json() for f in self.files],
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _check_unique_paths(files: Iterable[FileEntry]) -> None:
    seen: set[str] = set()
    for entry in files:
        if entry.path in seen:
            raise ManifestError(f"duplicate file path {entry.path!r}")
        seen.add(entry.path)
    # "a" as a file and "a/b" as a file cannot both exist on disk.
    for path in seen:
        parent = posixpath.dirname(path)
        while parent:
            if parent in seen:
                raise ManifestError(f"file path {path!r} is inside {parent!r}, which is itself a file")
            parent = posixpath.dirname(parent)


def parse_channel(data: bytes) -> str:
    """`channels/<name>/<channel>.json` holds {"version": "..."}."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"channel file is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or "version" not in raw:
        raise ManifestError('channel file must be an object like {"version": "..."}')
    return validate_name(raw["version"], "channel version")


def channel_bytes(version: str) -> bytes:
    return (json.dumps({"version": validate_name(version, "version")}) + "\n").encode("utf-8")
