"""Reading the mirrors: channels, manifests, signatures and presigned URLs.

With a trust root (`[trust] root`), what a node runs is decided by signed TUF metadata
(mirror/trust.py): every pass refreshes it from *every* mirror (the newest valid
metadata wins, a mirror serving older metadata is logged by name), the model's channel
or pinned version is looked up as a signed target, and the manifest fetched from any
mirror must match that target's length and sha256. Without one (legacy, unsigned
channels) the first mirror that answers the channel file wins, with a conditional GET
(If-None-Match with the last ETag) so an unchanged channel costs one small request.

Manifests are read with a size cap checked before the body and one deadline per
request. Every mirror contributes a presigned URL per file so aria2 can fail over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import botocore.exceptions
import structlog

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile

from mirror import layout
from mirror.manifest import DEFAULT_LIMITS, MAX_MANIFEST_BYTES, Manifest, ManifestError, SizeLimits, parse_channel
from mirror.remote import NOT_FOUND_CODES, MirrorError, describe, error_code
from mirror.s3 import Credentials, CredentialsError, make_client
from mirror.signing import SignatureError, verify
from mirror.trust import TrustError, channel_target, channel_version, manifest_target
from mirror.trust_client import Source, TrustedView
from mirror.trust_fetch import DEFAULT_DEADLINE, read_bounded
from mirror.torrents import max_torrent_bytes

from .config import MirrorConfig, ModelConfig

log = structlog.get_logger(__name__)

_NETWORK_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ProxyConnectionError,
)


# An unsigned channel file is {"version": "..."}: anything bigger is not one.
CHANNEL_MAX_BYTES = 4096


class NotFoundOnMirror(MirrorError):
    """The mirrors answered, but the object does not exist (missing version/manifest)."""


class ManifestRejected(MirrorError):
    """The manifest was found but is malformed, unsigned, or signed by no trusted key."""


@dataclass
class MirrorSource:
    config: MirrorConfig
    _client: object | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    def client(self):
        if self._client is None:
            creds = Credentials.from_file(self.config.credentials_file)
            self._client = make_client(self.config.endpoint, creds, region=self.config.region, read_timeout=30)
        return self._client

    def get(self, key: str, etag: str | None = None, limit: int | None = None) -> tuple[bytes | None, str | None]:
        """(body, etag); body is None when the object is unchanged since `etag`. With
        `limit`, a body over it is refused unread (by its length) or cut at limit + 1."""
        kwargs = {"Bucket": self.config.bucket, "Key": key}
        if etag:
            kwargs["IfNoneMatch"] = etag
        try:
            resp = self.client().get_object(**kwargs)
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            if code in {"304", "NotModified"}:
                return None, etag
            if code in NOT_FOUND_CODES:
                raise NotFoundOnMirror(f"{key} not found on mirror {self.name}") from None
            raise MirrorError(f"mirror {self.name}: reading {key}: "
                              f"{describe(exc, self.config.endpoint, self.config.bucket)}") from None
        except _NETWORK_ERRORS as exc:
            raise MirrorError(f"mirror {self.name} is unreachable: {type(exc).__name__}") from None
        except CredentialsError as exc:
            raise MirrorError(f"mirror {self.name}: {exc}") from None
        if limit is not None and (resp.get("ContentLength") or 0) > limit:
            resp["Body"].close()
            raise MirrorError(f"mirror {self.name}: {key} is {resp['ContentLength']} bytes, over its {limit} byte limit")
        return resp["Body"].read(limit + 1 if limit is not None else None), resp.get("ETag")

    def get_bounded(self, key: str, limit: int, deadline: float) -> bytes:
        """A metadata object: refused over `limit` bytes (before the body when the
        server says its length) and cut off at `deadline` seconds."""
        try:
            return read_bounded(self.client(), self.config.bucket, key, limit, deadline, self.name)
        except tuf_errors.DownloadHTTPError as exc:
            if exc.status_code == 404:
                raise NotFoundOnMirror(f"{key} not found on mirror {self.name}") from None
            raise MirrorError(str(exc)) from None
        except tuf_errors.DownloadError as exc:
            raise MirrorError(str(exc)) from None
        except CredentialsError as exc:
            raise MirrorError(f"mirror {self.name}: {exc}") from None

    def identity(self, key: str) -> dict | None:
        """The object's identity (etag, size, last_modified) from a HEAD; {"missing": True}
        if the mirror says it does not exist; None if it cannot be told."""
        try:
            resp = self.client().head_object(Bucket=self.config.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                return {"missing": True}
            log.warning("cannot read object identity", mirror=self.name, key=key, error=error_code(exc))
            return None
        except (botocore.exceptions.BotoCoreError, CredentialsError) as exc:
            log.warning("cannot read object identity", mirror=self.name, key=key, error=type(exc).__name__)
            return None
        modified = resp.get("LastModified")
        return {"etag": resp.get("ETag"), "size": resp.get("ContentLength"),
                "last_modified": modified.isoformat() if modified else None}

    def presign(self, key: str, expires: int) -> str:
        return self.client().generate_presigned_url(
            "get_object", Params={"Bucket": self.config.bucket, "Key": key}, ExpiresIn=expires
        )


class MirrorSet:
    def __init__(self, configs: list[MirrorConfig], trusted_keys: list, require_signature: bool,
                 limits: SizeLimits = DEFAULT_LIMITS, trust_root: bytes | None = None,
                 trust_dir: Path | None = None, deadline: float = DEFAULT_DEADLINE):
        self.limits = limits
        self.sources = [MirrorSource(c) for c in sorted(configs, key=lambda m: (m.priority, m.name))]
        self.trusted_keys = trusted_keys
        self.require_signature = require_signature
        self.deadline = deadline
        # (mirror, channel key) -> (etag, version): makes unchanged channels one 304.
        self._channel_cache: dict[tuple[str, str], tuple[str | None, str]] = {}
        self.trust: TrustedView | None = None
        if trust_root is not None:
            self.trust = TrustedView(trust_root, trust_dir, [Source(s.name, s.client, s.config.bucket)
                                                             for s in self.sources], deadline)
        self._trust_error: TrustError | None = None
        # (name, version) -> the signed target its manifest must match (this pass).
        self._expected: dict[tuple[str, str], TargetFile] = {}

    def begin_pass(self) -> None:
        """Refresh the signed metadata once per sync pass (every mirror is asked)."""
        self._expected.clear()
        if self.trust is None:
            return
        try:
            self.trust.refresh()
            self._trust_error = None
        except TrustError as exc:
            self._trust_error = exc
            log.error("trust.refresh failed", error=str(exc))

    def trust_status(self) -> dict | None:
        if self.trust is None:
            return None
        doc = self.trust.status()
        doc["error"] = str(self._trust_error) if self._trust_error else None
        return doc

    def _signed_target(self, name: str, channel: str | None, version: str | None) -> tuple[TargetFile, str]:
        if self._trust_error is not None:
            raise self._trust_error
        path = channel_target(name, channel) if channel else manifest_target(name, version)
        target, mirror = self.trust.target(path)
        if target is None:
            if channel:
                raise TrustError(f"channel {name}/{channel} is not in the signed metadata (unsigned channels are "
                                 f"refused once [trust] root is set): move it with `tts-mirror promote {name} "
                                 f"VERSION --channel {channel} --key KEY`")
            raise TrustError(f"{name} {version} has no signed manifest target: publish it with `tts-mirror publish`")
        return target, mirror

    def resolve_version(self, model: ModelConfig) -> tuple[str, str]:
        """(version, mirror name) for a model: pinned, or read from its channel."""
        if self.trust is not None:
            target, mirror = self._signed_target(model.name, model.channel, model.version)
            version = model.version or channel_version(target)
            self._expected[(model.name, version)] = target
            return version, mirror
        if model.version:
            return model.version, ""
        key = layout.channel_key(model.name, model.channel)
        errors = []
        for source in self.sources:
            cached = self._channel_cache.get((source.name, key))
            try:
                body, etag = source.get(key, etag=cached[0] if cached else None, limit=CHANNEL_MAX_BYTES)
            except NotFoundOnMirror as exc:
                errors.append(str(exc))
                continue
            except MirrorError as exc:
                log.warning("mirror unavailable", mirror=source.name, error=str(exc))
                errors.append(str(exc))
                continue
            if body is None and cached:
                return cached[1], source.name
            try:
                version = parse_channel(body)
            except ManifestError as exc:
                errors.append(f"mirror {source.name}: channel {model.channel}: {exc}")
                continue
            self._channel_cache[(source.name, key)] = (etag, version)
            return version, source.name
        raise MirrorError(f"cannot resolve channel {model.name}/{model.channel}: " + "; ".join(errors))

    def fetch_manifest(self, name: str, version: str) -> tuple[Manifest, bytes, bytes | None, str]:
        """(manifest, its bytes, signature, mirror) from the first mirror holding a valid one."""
        if self.trust is not None:
            return self._fetch_signed_manifest(name, version)
        errors = []
        for source in self.sources:
            try:
                data = source.get_bounded(layout.manifest_key(name, version), MAX_MANIFEST_BYTES, self.deadline)
            except MirrorError as exc:
                errors.append(str(exc))
                continue
            try:
                signature, _ = source.get(layout.signature_key(name, version), limit=1024)
            except NotFoundOnMirror:
                signature = None
            except MirrorError as exc:
                errors.append(str(exc))
                continue
            try:
                manifest = self._check(name, version, data, signature)
            except ManifestRejected as exc:
                log.error("manifest rejected", mirror=source.name, model=name, version=version, error=str(exc))
                errors.append(f"mirror {source.name}: {exc}")
                continue
            return manifest, data, signature, source.name
        if errors and all("not found" in e for e in errors):
            raise NotFoundOnMirror(f"version {name}/{version} has no manifest on any mirror")
        raise MirrorError(f"no valid manifest for {name}/{version}: " + "; ".join(errors))

    def _fetch_signed_manifest(self, name: str, version: str) -> tuple[Manifest, bytes, None, str]:
        """The manifest whose bytes match the signed target (length and sha256)."""
        target = self._expected.get((name, version)) or self._signed_target(name, None, version)[0]
        errors = []
        for source in self.sources:
            try:
                data = source.get_bounded(layout.manifest_key(name, version), target.length, self.deadline)
                target.verify_length_and_hashes(data)
            except MirrorError as exc:
                errors.append(str(exc))
                continue
            except tuf_errors.LengthOrHashMismatchError:
                log.error("manifest rejected", mirror=source.name, model=name, version=version,
                          error="does not match its signed target")
                errors.append(f"mirror {source.name}: the manifest of {name} {version} does not match its "
                              "signed target (length or sha256)")
                continue
            try:
                return Manifest.parse_for(data, name, version, self.limits), data, None, source.name
            except ManifestError as exc:
                errors.append(f"mirror {source.name}: malformed manifest: {exc}")
        if errors and all("not found" in e for e in errors):
            raise NotFoundOnMirror(f"version {name}/{version} has no manifest on any mirror")
        raise MirrorError(f"no valid manifest for {name}/{version}: " + "; ".join(errors))

    def _check(self, name: str, version: str, data: bytes, signature: bytes | None) -> Manifest:
        if self.require_signature:
            try:
                verify(data, signature, self.trusted_keys)
            except SignatureError as exc:
                raise ManifestRejected(str(exc)) from None
        elif signature is not None and self.trusted_keys:
            try:
                verify(data, signature, self.trusted_keys)
            except SignatureError as exc:
                log.warning("manifest signature does not verify (require_signature=false)", error=str(exc))
        try:
            return Manifest.parse_for(data, name, version, self.limits)
        except ManifestError as exc:
            raise ManifestRejected(f"malformed manifest: {exc}") from None

    def fetch_torrent(self, sha256: str, size: int) -> bytes:
        """A file's torrent from the first mirror that has it (checked by the caller): refused
        unread over the largest torrent a file of `size` bytes can have, cut off at the
        metadata deadline."""
        errors = []
        for source in self.sources:
            try:
                return source.get_bounded(layout.torrent_key(sha256), max_torrent_bytes(size), self.deadline)
            except MirrorError as exc:
                errors.append(str(exc))
        raise MirrorError(f"no mirror has the torrent of {sha256}: " + "; ".join(errors))

    @staticmethod
    def object_key(name: str, version: str, path: str) -> str:
        return layout.object_key(name, version, path)

    def identities(self, name: str, version: str, path: str, mirrors: list[str]) -> dict[str, dict | None]:
        key = layout.object_key(name, version, path)
        return {s.name: s.identity(key) for s in self.sources if s.name in mirrors}

    def presigned_urls(self, name: str, version: str, path: str, expires: int,
                       exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
        """[(mirror name, presigned URL)] for one file, in priority order."""
        key = layout.object_key(name, version, path)
        urls = []
        for source in self.sources:
            if source.name in exclude:
                continue
            try:
                urls.append((source.name, source.presign(key, expires)))
            except CredentialsError as exc:
                log.warning("cannot presign on mirror", mirror=source.name, error=str(exc))
        return urls
