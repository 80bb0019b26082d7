"""Reading the mirrors: channels, manifests, signatures and presigned URLs.

Mirrors are tried in priority order; the first that answers wins for metadata, and
every mirror contributes a presigned URL per file so aria2 can fail over between them.
Channel checks use a conditional GET (If-None-Match with the last ETag), so an
unchanged channel costs one small request answered with 304.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import botocore.exceptions
import structlog

from mirror import layout
from mirror.manifest import DEFAULT_LIMITS, Manifest, ManifestError, SizeLimits, parse_channel
from mirror.remote import NOT_FOUND_CODES, MirrorError, describe, error_code
from mirror.s3 import Credentials, CredentialsError, make_client
from mirror.signing import SignatureError, verify

from .config import MirrorConfig, ModelConfig

log = structlog.get_logger(__name__)

_NETWORK_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ProxyConnectionError,
)


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

    def get(self, key: str, etag: str | None = None) -> tuple[bytes | None, str | None]:
        """(body, etag); body is None when the object is unchanged since `etag`."""
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
        return resp["Body"].read(), resp.get("ETag")

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
                 limits: SizeLimits = DEFAULT_LIMITS):
        self.limits = limits
        self.sources = [MirrorSource(c) for c in sorted(configs, key=lambda m: (m.priority, m.name))]
        self.trusted_keys = trusted_keys
        self.require_signature = require_signature
        # (mirror, channel key) -> (etag, version): makes unchanged channels one 304.
        self._channel_cache: dict[tuple[str, str], tuple[str | None, str]] = {}

    def resolve_version(self, model: ModelConfig) -> tuple[str, str]:
        """(version, mirror name) for a model: pinned, or read from its channel."""
        if model.version:
            return model.version, ""
        key = layout.channel_key(model.name, model.channel)
        errors = []
        for source in self.sources:
            cached = self._channel_cache.get((source.name, key))
            try:
                body, etag = source.get(key, etag=cached[0] if cached else None)
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
        errors = []
        for source in self.sources:
            try:
                data, _ = source.get(layout.manifest_key(name, version))
            except MirrorError as exc:
                errors.append(str(exc))
                continue
            try:
                signature, _ = source.get(layout.signature_key(name, version))
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

    def fetch_torrent(self, sha256: str) -> bytes:
        """A file's torrent from the first mirror that has it (checked by the caller)."""
        errors = []
        for source in self.sources:
            try:
                data, _ = source.get(layout.torrent_key(sha256))
                return data
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
