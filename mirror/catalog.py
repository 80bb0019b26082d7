"""Reading a mirror back: list models, verify a version, promote a version to a channel.

Everything here only reads objects, except `promote`, which writes one channel pointer
after checking that the version is complete (manifest, signature, every object's size).
"""

from __future__ import annotations

import hashlib
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import structlog
from botocore.exceptions import BotoCoreError, ClientError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import layout
from . import torrents as bt
from .manifest import ManifestError, parse_channel
from .publish import set_channel
from .remote import Mirror, MirrorError, describe
from .signing import SignatureError, verify
from . import trust_ops
from .manifest import Manifest
from .trust import TrustError, manifest_target
from .trust_client import Source, TrustedView
from tuf.api.exceptions import LengthOrHashMismatchError
from pathlib import Path

log = structlog.get_logger(__name__)

READ_CHUNK = 1024 * 1024


@dataclass
class VersionInfo:
    version: str
    state: str  # "published" | "incomplete" (no manifest yet) | "invalid"
    files: int = 0
    size: int = 0
    created: str = ""
    signed: bool = False


@dataclass
class ModelInfo:
    name: str
    versions: list[VersionInfo] = field(default_factory=list)
    channels: dict[str, str] = field(default_factory=dict)  # channel -> version


def list_models(mirror: Mirror) -> list[ModelInfo]:
    models: dict[str, ModelInfo] = {}
    for name in mirror.list_prefixes(layout.MODELS_PREFIX):
        info = models.setdefault(name, ModelInfo(name))
        for version in mirror.list_prefixes(f"{layout.MODELS_PREFIX}{name}/"):
            info.versions.append(_version_info(mirror, name, version))
    for name in mirror.list_prefixes(layout.CHANNELS_PREFIX):
        info = models.setdefault(name, ModelInfo(name))
        for obj in mirror.list_keys(f"{layout.CHANNELS_PREFIX}{name}/"):
            channel = obj["Key"].rsplit("/", 1)[-1].removesuffix(".json")
            raw = mirror.read(obj["Key"], limit=4096)
            try:
                info.channels[channel] = parse_channel(raw or b"")
            except ManifestError:
                info.channels[channel] = "<invalid>"
    return [models[n] for n in sorted(models)]


def _version_info(mirror: Mirror, name: str, version: str) -> VersionInfo:
    try:
        found = mirror.manifest(name, version)
    except (MirrorError, ManifestError):
        return VersionInfo(version, "invalid")
    if found is None:
        return VersionInfo(version, "incomplete")
    manifest, _ = found
    signed = mirror.head(layout.signature_key(name, version)) is not None
    return VersionInfo(version, "published", len(manifest.files), manifest.total_size, manifest.created, signed)


@dataclass
class VerifyResult:
    name: str
    version: str
    checked: int = 0
    bytes: int = 0
    mismatches: list[str] = field(default_factory=list)
    signer: str | None = None


def verify_version(
    mirror: Mirror,
    name: str,
    version: str,
    public_keys: list[Ed25519PublicKey] | None = None,
    workers: int = 4,
    on_file: Callable[[str, str | None], None] | None = None,
) -> VerifyResult:
    """Re-hash every object against the manifest (streamed); collect every mismatch."""
    found = mirror.manifest(name, version)
    if found is None:
        raise MirrorError(f"{name} {version} has no manifest on the mirror (not published, or incomplete)")
    manifest, raw = found
    result = VerifyResult(name, version)
    signature = mirror.signature(name, version)
    if public_keys:
        try:
            result.signer = verify(raw, signature, public_keys)
        except SignatureError as exc:
            result.mismatches.append(f"{layout.signature_key(name, version)}: {exc}")
    elif signature is None:
        result.mismatches.append(f"{layout.signature_key(name, version)}: signature is missing")

    def check(entry) -> str | None:
        key = layout.object_key(name, version, entry.path)
        digest, size = hashlib.sha256(), 0
        try:
            body = mirror.client.get_object(Bucket=mirror.bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(READ_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                return f"{entry.path}: missing on the mirror"
            return f"{entry.path}: {describe(exc, mirror.endpoint, mirror.bucket)}"
        except BotoCoreError as exc:
            return f"{entry.path}: {describe(exc, mirror.endpoint, mirror.bucket)}"
        if size != entry.size:
            return f"{entry.path}: size {size}, manifest says {entry.size}"
        if digest.hexdigest() != entry.sha256:
            return f"{entry.path}: sha256 {digest.hexdigest()}, manifest says {entry.sha256}"
        if entry.btih:
            key = layout.torrent_key(entry.sha256)
            data = mirror.read(key, limit=bt.MAX_TORRENT_BYTES + 1)
            if data is None:
                return f"{entry.path}: its torrent {key} is missing on the mirror"
            try:
                bt.check(data, btih=entry.btih, sha256=entry.sha256, size=entry.size)
            except bt.TorrentError as exc:
                return f"{entry.path}: {exc}"
        return None

    with ThreadPoolExecutor(workers) as pool:
        for entry, problem in zip(manifest.files, pool.map(check, manifest.files)):
            result.checked += 1
            result.bytes += entry.size
            if problem:
                result.mismatches.append(problem)
            if on_file:
                on_file(entry.path, problem)
    return result


def info_hashes(mirror: Mirror, trust_root: bytes | None = None, trust_dir: Path | None = None) -> list[str]:
    """Every info-hash a published manifest names: the tracker's whitelist.

    With signed channel metadata only manifests whose bytes match a signed target count
    (a bucket writer cannot whitelist a torrent); it then needs the fleet's trust root."""
    if trust_root is None and trust_ops.has_metadata(mirror):
        raise MirrorError(f"bucket {mirror.bucket} has signed channel metadata: pass --trust-root so that the "
                          "whitelist is built from verified metadata only")
    if trust_root is not None and trust_dir is None:
        with tempfile.TemporaryDirectory(prefix="tts-trust-") as tmp:
            return info_hashes(mirror, trust_root, Path(tmp))
    view = None
    if trust_root is not None:
        view = TrustedView(trust_root, trust_dir, [Source(mirror.bucket, lambda: mirror.client, mirror.bucket)])
        view.refresh()
    found: set[str] = set()
    for name in mirror.list_prefixes(layout.MODELS_PREFIX):
        for version in mirror.list_prefixes(f"{layout.MODELS_PREFIX}{name}/"):
            try:
                manifest = _signed_manifest(mirror, view, name, version) if view else mirror.manifest(name, version)
            except (MirrorError, ManifestError, TrustError) as exc:
                log.warning("whitelist.skip", model=name, version=version, error=str(exc))
                continue
            if manifest is not None:
                found.update(f.btih for f in manifest[0].files if f.btih)
    return sorted(found)


def _signed_manifest(mirror: Mirror, view: TrustedView, name: str, version: str):
    target, _ = view.target(manifest_target(name, version))
    if target is None:
        raise TrustError(f"{name} {version} has no signed manifest target: not whitelisted")
    raw = mirror.read(layout.manifest_key(name, version), limit=target.length + 1)
    if raw is None:
        return None
    try:
        target.verify_length_and_hashes(raw)
    except LengthOrHashMismatchError:
        raise TrustError(f"the manifest of {name} {version} does not match its signed target") from None
    return Manifest.parse_for(raw, name, version), raw


def promote(
    mirror: Mirror, name: str, version: str, channel: str, public_keys: list[Ed25519PublicKey] | None = None,
    trust_root: bytes | None = None, keyring: "trust_ops.Keyring | None" = None,
) -> str | None:
    """Point `channel` at a complete version; return the version it pointed at before.

    On a mirror with signed channel metadata the channel's target is signed with the
    keyring's keys of its role (`ci` for the CI's channels, `release` for the others);
    below the role's threshold the change is staged (trust_repo.Staged is raised)."""
    layout.channel_key(name, channel)  # validates name and channel before any request
    found = mirror.manifest(name, version)
    if found is None:
        raise MirrorError(f"cannot promote {name} {version}: it has no manifest on the mirror")
    manifest, raw = found
    signature = mirror.signature(name, version)
    if signature is None:
        raise MirrorError(f"cannot promote {name} {version}: {layout.signature_key(name, version)} is missing")
    if public_keys:
        try:
            verify(raw, signature, public_keys)
        except SignatureError as exc:
            raise MirrorError(f"cannot promote {name} {version}: {exc}") from None

    def size_problem(entry) -> str | None:
        head = mirror.head(layout.object_key(name, version, entry.path))
        if head is None:
            return f"{entry.path} is missing"
        if head.get("ContentLength") != entry.size:
            return f"{entry.path} is {head.get('ContentLength')} bytes, manifest says {entry.size}"
        return None

    with ThreadPoolExecutor(8) as pool:
        problems = [p for p in pool.map(size_problem, manifest.files) if p]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MirrorError(f"cannot promote {name} {version}: {problems[0]}{more}")
    previous = None
    if trust_ops.has_metadata(mirror):
        if trust_root is None:
            raise MirrorError(f"bucket {mirror.bucket} has signed channel metadata: pass --trust-root and the "
                              f"key(s) of the channel's role (--key)")
        state = trust_ops.RepoState.load(mirror, trust_root)
        keyring = keyring or trust_ops.Keyring()
        previous = trust_ops.set_channel(state, name, channel, version, raw, keyring)  # raises Staged below threshold
        trust_ops.refresh(state, keyring)
        set_channel(mirror, name, channel, version)  # the unsigned pointer, for nodes without a trust root
    else:
        previous = set_channel(mirror, name, channel, version)
    log.info("promote.done", model=name, version=version, channel=channel, previous=previous)
    return previous
