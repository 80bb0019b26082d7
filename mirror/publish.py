"""Publish a model directory to the mirror: scan, hash, upload, confirm, manifest last.

The order is what makes a publish safe to interrupt and re-run:

1. scan: every entry of DIR must be a regular file (or a symlink to one inside DIR)
   with a path the manifest accepts - refused before anything is uploaded;
2. hash every file (sha256, streamed, several files at once) and, as soon as a file's
   hash is known, HEAD its object: an object with the same size and `sha256` user
   metadata is already there (a previous run uploaded it), anything else is uploaded
   through boto3's transfer manager - so hashing overlaps uploading;
3. HEAD every object again and check size + sha256 metadata, and that no local file
   changed while it was read;
4. only then write `manifest.json`, then `manifest.json.sig`, then (if asked) the
   channel pointer.

With torrents on (the default) the same read of each file also yields its BitTorrent
piece hashes; its torrent (`torrents/<sha256>.torrent`, see torrents.py) is uploaded
before the manifest, and the manifest records each file's info-hash (schema 2).

A version whose manifest exists is immutable: different content is refused, identical
content is a no-op (missing objects are restored, a missing signature is written).
"""

from __future__ import annotations

import os
import stat
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.exceptions import BotoCoreError, ClientError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from s3transfer.subscribers import BaseSubscriber

from . import layout
from . import torrents as bt
from .hashing import hash_file
from .manifest import FileEntry, Manifest, ManifestError, channel_bytes, parse_channel, validate_name, validate_path
from .remote import Mirror, MirrorError, describe
from .signing import key_id, load_private_key, sign
from . import trust_ops
from securesystemslib.signer import CryptoSigner

log = structlog.get_logger(__name__)

MiB = 1024 * 1024
# hashlib releases the GIL on large buffers, so threads hash files truly in parallel.
HASH_WORKERS = max(2, min(4, os.cpu_count() or 1))
SHA256_META = "sha256"  # sent as x-amz-meta-sha256


def default_transfer_config(max_concurrency: int = 8, chunk_mib: int = 16) -> TransferConfig:
    """Parallel multipart uploads; the classic (threaded) transfer client on purpose -
    the CRT client has its own checksum defaults that not every S3 server accepts."""
    return TransferConfig(
        multipart_threshold=chunk_mib * MiB,
        multipart_chunksize=chunk_mib * MiB,
        max_concurrency=max_concurrency,
        use_threads=True,
        preferred_transfer_client="classic",
    )


@dataclass(frozen=True)
class LocalFile:
    path: str  # manifest path: relative POSIX
    source: Path  # what is read (the target for a symlink)
    size: int
    mtime_ns: int


@dataclass
class PublishReport:
    name: str
    version: str
    files: int = 0
    total_bytes: int = 0
    uploaded: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    unchanged: bool = False  # the version was already published with this content
    signature_written: bool = False
    channel: str | None = None
    previous_channel_version: str | None = None
    created_bucket: bool = False
    key_id: str = ""
    hash_seconds: float = 0.0
    seconds: float = 0.0
    uploaded_bytes: int = 0
    torrents_written: int = 0
    signed: "trust_ops.SignedPublish | None" = None  # what the signed channel metadata got


class PublishEvents:
    """Progress hooks (no-ops). Called from worker threads: implementations must be thread-safe."""

    def start(self, files: int, total_bytes: int) -> None: ...
    def hashed(self, path: str, size: int) -> None: ...
    def transferred(self, nbytes: int) -> None: ...
    def file_done(self, path: str, size: int, action: str) -> None: ...  # "uploaded" | "present"
    def finish(self) -> None: ...


class LogEvents(PublishEvents):
    """Plain log lines, for pipes and the journal."""

    def start(self, files: int, total_bytes: int) -> None:
        log.info("publish.start", files=files, bytes=total_bytes)

    def file_done(self, path: str, size: int, action: str) -> None:
        log.info(f"publish.{action}", path=path, bytes=size)


# --------------------------------------------------------------------------- scan


def scan_dir(directory: Path) -> list[LocalFile]:
    """Every file under `directory`, refusing anything that cannot be published safely."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MirrorError(f"{directory} is not a directory")
    root = directory.resolve(strict=True)
    files: list[LocalFile] = []
    _walk(root, root, "", files)
    if not files:
        raise MirrorError(f"{directory} contains no files: nothing to publish")
    return files


def _walk(root: Path, current: Path, prefix: str, out: list[LocalFile]) -> None:
    try:
        entries = sorted(os.scandir(current), key=lambda e: e.name)
    except OSError as exc:
        raise MirrorError(f"cannot list {current}: {exc.strerror}") from None
    for entry in entries:
        rel = prefix + entry.name
        try:
            entry.name.encode("utf-8")
        except UnicodeEncodeError:
            raise MirrorError(f"file name {rel!r} is not valid UTF-8") from None
        if entry.is_dir(follow_symlinks=False):
            _walk(root, Path(entry.path), rel + "/", out)
            continue
        try:
            validate_path(rel)
        except ManifestError as exc:
            raise MirrorError(f"cannot publish {rel!r}: {exc}") from None
        source = Path(entry.path)
        if entry.is_symlink():
            target = source.resolve()
            if not target.is_relative_to(root):
                raise MirrorError(f"{rel} is a symlink pointing outside the directory (to {target})")
            if not target.exists():
                raise MirrorError(f"cannot read {rel}: dangling symlink to {target}")
            source = target
        try:
            st = source.stat()
        except OSError as exc:
            raise MirrorError(f"cannot read {rel}: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            # A symlinked directory could loop or alias another subtree: copy it instead.
            raise MirrorError(f"{rel} is a symlink to a directory: only files can be linked")
        if not stat.S_ISREG(st.st_mode):
            raise MirrorError(f"{rel} is not a regular file (fifo, socket or device): refusing to publish it")
        try:  # fail now, not halfway through the upload
            os.close(os.open(source, os.O_RDONLY))
        except OSError as exc:
            raise MirrorError(f"cannot read {rel}: {exc.strerror}") from None
        out.append(LocalFile(path=rel, source=source, size=st.st_size, mtime_ns=st.st_mtime_ns))


@dataclass(frozen=True)
class Hashes:
    sha256: str
    pieces: bytes  # BitTorrent v1 piece hashes (SHA-1 per torrents.PIECE_SIZE)


def hash_files(files: list[LocalFile], workers: int = HASH_WORKERS) -> dict[str, Hashes]:
    """Hashes of every file, several at once (what `publish` does before uploading)."""
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip((f.path for f in files), pool.map(_hash_one, files)))


def _hash_one(f: LocalFile) -> Hashes:
    try:
        return Hashes(*hash_file(f.source))
    except OSError as exc:
        raise MirrorError(f"cannot read {f.path}: {exc.strerror}") from None


# --------------------------------------------------------------------------- publish


class _Progress(BaseSubscriber):
    def __init__(self, events: PublishEvents, path: str, size: int) -> None:
        self._events, self._path, self._size = events, path, size

    def on_progress(self, future, bytes_transferred, **kwargs) -> None:
        self._events.transferred(bytes_transferred)

    def on_done(self, future, **kwargs) -> None:
        try:
            future.result()
        except Exception:
            return  # reported by publish_dir
        self._events.file_done(self._path, self._size, "uploaded")


def publish_dir(
    directory: Path,
    *,
    name: str,
    version: str,
    mirror: Mirror,
    signing_key: Ed25519PrivateKey | Path,
    channel: str | None = None,
    create_bucket: bool = False,
    transfer_config: TransferConfig | None = None,
    s3_checksum: bool = True,
    events: PublishEvents | None = None,
    torrents: bool = True,
    trust_root: bytes | None = None,
    trust_keys: list[Path] | tuple[Path, ...] = (),
) -> PublishReport:
    """Publish `directory` as `name`/`version` (order: module docstring). With signed channels the
    manifest is signed into role ci (trust_ops.publish_signed; `trust_keys`: snapshot/timestamp)."""
    started = time.monotonic()
    events = events or PublishEvents()
    for value, what in ((name, "model name"), (version, "version"), (channel, "channel")):
        if value is not None:
            validate_name(value, what)
    if not isinstance(signing_key, Ed25519PrivateKey):
        signing_key = load_private_key(Path(signing_key))
    files = scan_dir(directory)
    report = PublishReport(
        name=name, version=version, files=len(files), total_bytes=sum(f.size for f in files),
        key_id=key_id(signing_key.public_key()),
    )
    report.created_bucket = mirror.check_bucket(create=create_bucket)
    if (signed_channels := not report.created_bucket and trust_ops.has_metadata(mirror)) and trust_root is None:
        raise MirrorError(f"bucket {mirror.bucket} has signed channel metadata: pass --trust-root "
                          "(the fleet's root.json) to publish there")

    known: dict[str, Hashes] = {}
    existing = mirror.manifest(name, version)
    if existing is not None:
        # Immutable: compare everything before a single byte is uploaded.
        hash_started = time.monotonic()
        known = hash_files(files)
        report.hash_seconds = time.monotonic() - hash_started
        _refuse_if_different(existing[0], files, known)
        report.unchanged = True

    events.start(len(files), report.total_bytes)
    hashes = _hash_and_upload(files, known, name, version, mirror, transfer_config, s3_checksum, events, report)
    _confirm(files, hashes, name, version, mirror)
    # An existing version keeps the info-hashes it was signed with (none, if it was
    # published without torrents): only the torrents it names are restored.
    wanted = {f.sha256 for f in existing[0].files if f.btih} if existing else None
    btih = _put_torrents(files, hashes, mirror, report, only=wanted) if torrents or wanted else {}

    if existing is None:
        if mirror.head(layout.manifest_key(name, version)) is not None:
            raise MirrorError(f"{name} {version} was published by someone else meanwhile: not overwriting it")
        manifest = Manifest.build(name, version, [
            FileEntry(f.path, f.size, hashes[f.path].sha256, btih.get(f.path)) for f in files])
        manifest_bytes = manifest.to_bytes()
        mirror.put(layout.manifest_key(name, version), manifest_bytes)
        mirror.put(layout.signature_key(name, version), sign(manifest_bytes, signing_key), "application/octet-stream")
        report.signature_written = True
    elif mirror.signature(name, version) is None:
        # A run that died between manifest and signature: sign the published bytes.
        mirror.put(layout.signature_key(name, version), sign(existing[1], signing_key), "application/octet-stream")
        report.signature_written = True

    if signed_channels:
        keyring = trust_ops.Keyring(trust_keys, [CryptoSigner(signing_key)])
        report.signed = trust_ops.publish_signed(mirror, trust_root, keyring, name, version,
                                                 existing[1] if existing else manifest_bytes, channel)
    _move_unsigned_channel(mirror, report, channel)
    events.finish()
    report.seconds = time.monotonic() - started
    log.info(
        "publish.done", model=name, version=version, uploaded=len(report.uploaded), present=len(report.present),
        unchanged=report.unchanged, seconds=round(report.seconds, 3),
    )
    return report


def _move_unsigned_channel(mirror: Mirror, report: PublishReport, channel: str | None) -> None:
    """The unsigned pointer, for provisioners without [trust] root (the upgrade period);
    not while a signed move waits for more signatures."""
    if channel is None or (report.signed is not None and report.signed.staged is not None):
        return
    report.channel = channel
    previous = set_channel(mirror, report.name, channel, report.version)
    report.previous_channel_version = report.signed.previous if report.signed else previous


def set_channel(mirror: Mirror, name: str, channel: str, version: str) -> str | None:
    """Point `channel` at `version`; return the version it pointed at before (if any)."""
    key = layout.channel_key(name, channel)
    old_raw = mirror.read(key, limit=4096)
    previous = None
    if old_raw is not None:
        try:
            previous = parse_channel(old_raw)
        except ManifestError:
            previous = None  # a broken pointer is simply replaced
    mirror.put(key, channel_bytes(version))
    return previous


def _put_torrents(files: list[LocalFile], hashes: dict[str, Hashes], mirror: Mirror, report: PublishReport,
                  only: set[str] | None = None) -> dict[str, str]:
    """Upload each non-empty file's torrent unless the mirror has it; return path -> info-hash.
    Torrents are content-addressed, so one already there is the same bytes."""
    btih: dict[str, str] = {}

    def one(f: LocalFile) -> bool:
        digest = hashes[f.path]
        data, btih[f.path] = bt.torrent_bytes(digest.sha256, f.size, digest.pieces)
        key = layout.torrent_key(digest.sha256)
        head = mirror.head(key)
        if head is not None and head.get("ContentLength") == len(data):
            return False
        mirror.put(key, data, "application/x-bittorrent")
        return True

    chosen = [f for f in files if f.size > 0 and (only is None or hashes[f.path].sha256 in only)]
    with ThreadPoolExecutor(HASH_WORKERS * 2) as pool:
        report.torrents_written += sum(pool.map(one, chosen))
    return btih


def _refuse_if_different(manifest: Manifest, files: list[LocalFile], hashes: dict[str, Hashes]) -> None:
    published = {f.path: (f.size, f.sha256) for f in manifest.files}
    local = {f.path: (f.size, hashes[f.path].sha256) for f in files}
    if published == local:
        return
    differing = sorted(p for p in published.keys() | local.keys() if published.get(p) != local.get(p))
    raise MirrorError(
        f"{manifest.name} {manifest.version} is already published with different content "
        f"({len(differing)} file(s) differ, e.g. {differing[0]}); versions are immutable: publish a new version"
    )


def _hash_and_upload(files, known, name, version, mirror, transfer_config, s3_checksum, events, report) -> dict[str, Hashes]:
    """Hash files in parallel; upload each one that is missing as soon as its hash is known."""
    config = transfer_config or default_transfer_config()
    hashes: dict[str, Hashes] = {}
    failures: list[str] = []
    hash_started = time.monotonic()
    # Smallest first: the first uploads start after the shortest possible hashing time.
    ordered = sorted(files, key=lambda f: f.size)
    # With the S3 sha256 checksum header (signed, checked by the server) the SigV4
    # payload hash would be a third sha256 pass over every byte: skip it then.
    client = mirror.unsigned_payload_client() if s3_checksum else mirror.client
    with ThreadPoolExecutor(HASH_WORKERS) as hashers, create_transfer_manager(client, config) as tm:
        pending: dict[Future, LocalFile] = {
            hashers.submit(lambda f=f: known.get(f.path) or _hash_one(f)): f for f in ordered
        }
        uploads: list[tuple[LocalFile, object]] = []
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                f = pending.pop(fut)
                hashes[f.path] = fut.result()  # MirrorError on an unreadable file: aborts (and cancels uploads)
                digest = hashes[f.path].sha256
                events.hashed(f.path, f.size)
                key = layout.object_key(name, version, f.path)
                head = mirror.head(key)
                if head is not None and _matches(head, f.size, digest):
                    report.present.append(f.path)
                    events.transferred(f.size)
                    events.file_done(f.path, f.size, "present")
                    continue
                extra = {"Metadata": {SHA256_META: digest}, "ContentType": "application/octet-stream"}
                if s3_checksum:
                    # Explicit, not boto3's default CRC: the server checks each part's sha256.
                    extra["ChecksumAlgorithm"] = "SHA256"
                future = tm.upload(str(f.source), mirror.bucket, key, extra_args=extra,
                                   subscribers=[_Progress(events, f.path, f.size)])
                uploads.append((f, future))
        report.hash_seconds = report.hash_seconds or time.monotonic() - hash_started
        for f, future in uploads:
            try:
                future.result()
                report.uploaded.append(f.path)
                report.uploaded_bytes += f.size
            except (ClientError, BotoCoreError) as exc:
                failures.append(f"{f.path}: {describe(exc, mirror.endpoint, mirror.bucket)}")
            except OSError as exc:
                failures.append(f"{f.path}: {exc.strerror or exc}")
            except Exception as exc:  # anything else a transfer can raise: still one line
                failures.append(f"{f.path}: {type(exc).__name__}: {exc}")
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise MirrorError(
            f"upload failed for {failures[0]}{more}; {len(report.uploaded)} file(s) uploaded, "
            "no manifest written: re-run the same command to finish"
        )
    return hashes


def _matches(head: dict, size: int, digest: str) -> bool:
    # Metadata keys are HTTP header names, so their case is the server's choice: MinIO and
    # nanio answer `sha256`, rclone `Sha256`.
    meta = {key.lower(): value for key, value in head.get("Metadata", {}).items()}
    return head.get("ContentLength") == size and meta.get(SHA256_META) == digest


def _confirm(files: list[LocalFile], hashes: dict[str, Hashes], name: str, version: str, mirror: Mirror) -> None:
    """Every object is on the mirror with the right size and sha256, and no local file moved."""
    def check(f: LocalFile) -> str | None:
        head = mirror.head(layout.object_key(name, version, f.path))
        if head is None:
            return f"{f.path} is missing on the mirror after upload"
        if not _matches(head, f.size, hashes[f.path].sha256):
            return f"{f.path} on the mirror does not match (size {head.get('ContentLength')}, expected {f.size})"
        try:
            st = f.source.stat()
        except OSError as exc:
            return f"{f.path} vanished during publish: {exc.strerror}"
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            return f"{f.path} changed while it was being published"
        return None

    with ThreadPoolExecutor(HASH_WORKERS * 2) as pool:
        problems = [p for p in pool.map(check, files) if p]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MirrorError(f"not writing the manifest: {problems[0]}{more}; re-run to finish")
