"""Talking to one mirror bucket: S3 failures as one-line messages, and small reads.

Publishing, promoting, listing and verifying all need the same things: a client that
fails with a sentence an operator can act on (wrong credentials, missing bucket,
unreachable endpoint) instead of a botocore traceback, and the few reads of a
published version (manifest, signature, object heads).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from tts_common.errors import TtsError

from . import layout
from .manifest import MAX_MANIFEST_BYTES, Manifest, ManifestError
from .s3 import Credentials, CredentialsError, client_config, make_client


class MirrorError(TtsError):
    """A request to a mirror failed (unreachable, refused, malformed answer); the
    message says which mirror and why, in one line."""


_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def describe(exc: Exception, endpoint: str, bucket: str | None = None) -> str:
    """A one-line explanation of an S3 failure; never includes credentials or URLs with queries."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _CREDENTIAL_CODES:
            return f"the mirror at {endpoint} rejected the credentials ({code}): check access_key and secret_key"
        if code == "NoSuchBucket":
            return f"bucket {bucket!r} does not exist at {endpoint} (pass --create-bucket to create it)"
        if code in {"AccessDenied", "403", "Forbidden"}:
            return f"access denied to bucket {bucket!r} at {endpoint} ({code}): check the credentials' permissions"
        message = exc.response.get("Error", {}).get("Message", "")
        return f"S3 error from {endpoint} (HTTP {status} {code}): {message}".rstrip(": ")
    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach the mirror at {endpoint}: is the endpoint right and the server up?"
    return f"S3 request to {endpoint} failed: {exc}"


@contextmanager
def s3_errors(endpoint: str, bucket: str | None = None, doing: str = "") -> Iterator[None]:
    """Turn botocore failures inside the block into MirrorError."""
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        prefix = f"{doing}: " if doing else ""
        raise MirrorError(prefix + describe(exc, endpoint, bucket)) from None


def resolve_credentials(path: Path | None) -> Credentials:
    """A credentials file if given, else TTS_S3_ACCESS_KEY/TTS_S3_SECRET_KEY."""
    if path is not None:
        try:
            return Credentials.from_file(path)
        except CredentialsError as exc:
            raise MirrorError(str(exc)) from None
    creds = Credentials.from_env()
    if creds is None:
        raise MirrorError(
            "no S3 credentials: pass --credentials FILE (or TTS_MIRROR_CREDENTIALS), "
            "or set TTS_S3_ACCESS_KEY and TTS_S3_SECRET_KEY"
        )
    return creds


@dataclass
class Mirror:
    """One bucket on one endpoint, and the client that talks to it."""

    endpoint: str
    bucket: str
    client: object
    credentials: Credentials = field(repr=False)
    max_pool_connections: int = 32

    @classmethod
    def connect(cls, endpoint: str, bucket: str, credentials: Credentials, max_pool_connections: int = 32) -> "Mirror":
        if not endpoint.startswith(("http://", "https://")):
            raise MirrorError(f"endpoint {endpoint!r} must start with http:// or https://")
        client = make_client(endpoint, credentials, max_pool_connections=max_pool_connections)
        return cls(endpoint, bucket, client, credentials, max_pool_connections)

    def unsigned_payload_client(self):
        """A client that does not sha256 the request body for SigV4 (UNSIGNED-PAYLOAD).

        Only for uploads that carry an S3 `x-amz-checksum-sha256` header: that header is
        itself signed and the server checks the body against it, which is what botocore
        already does over https. Over http botocore would otherwise hash every byte
        once more for the signature - a full extra sha256 pass per upload.
        """
        config = client_config(max_pool_connections=self.max_pool_connections)
        config = config.merge(Config(s3=dict(config.s3 or {}, payload_signing_enabled=False)))
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.credentials.access_key,
            aws_secret_access_key=self.credentials.secret_key,
            region_name=self.client.meta.region_name,
            config=config,
        )

    def errors(self, doing: str = ""):
        return s3_errors(self.endpoint, self.bucket, doing)

    def check_bucket(self, create: bool = False) -> bool:
        """Fail clearly on bad credentials or a missing bucket; return True if it was created.

        ListObjectsV2 rather than HeadBucket: a HEAD reply has no body, so a 403 could not
        tell wrong credentials from missing permissions.
        """
        try:
            self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
            return False
        except ClientError as exc:
            if error_code(exc) != "NoSuchBucket" or not create:
                raise MirrorError(describe(exc, self.endpoint, self.bucket)) from None
        except BotoCoreError as exc:
            raise MirrorError(describe(exc, self.endpoint, self.bucket)) from None
        with self.errors(f"creating bucket {self.bucket!r}"):
            self.client.create_bucket(Bucket=self.bucket)
        return True

    def _none_if_missing(self, call):
        """Run an S3 call; None when the key does not exist, MirrorError on any other failure."""
        try:
            return call()
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                return None
            raise MirrorError(describe(exc, self.endpoint, self.bucket)) from None
        except BotoCoreError as exc:
            raise MirrorError(describe(exc, self.endpoint, self.bucket)) from None

    def head(self, key: str) -> dict | None:
        """HeadObject, or None when the key does not exist."""
        return self._none_if_missing(lambda: self.client.head_object(Bucket=self.bucket, Key=key))

    def read(self, key: str, limit: int | None = None) -> bytes | None:
        """A small object's bytes, or None when it does not exist."""
        def get() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            return body.read(limit) if limit is not None else body.read()
        return self._none_if_missing(get)

    def put(self, key: str, data: bytes, content_type: str = "application/json") -> None:
        with self.errors(f"writing {key}"):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def list_prefixes(self, prefix: str) -> list[str]:
        """The next path component under `prefix` (like `ls`), via delimiter listing."""
        names: list[str] = []
        with self.errors(f"listing {prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    names.append(common["Prefix"][len(prefix):].rstrip("/"))
        return names

    def list_keys(self, prefix: str) -> list[dict]:
        objects: list[dict] = []
        with self.errors(f"listing {prefix}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                objects.extend(page.get("Contents", []))
        return objects

    def manifest(self, name: str, version: str) -> tuple[Manifest, bytes] | None:
        """The published manifest of a version (parsed, and its exact bytes), or None."""
        raw = self.read(layout.manifest_key(name, version), limit=MAX_MANIFEST_BYTES + 1)
        if raw is None:
            return None
        try:
            manifest = Manifest.parse_for(raw, name, version)
        except ManifestError as exc:
            raise MirrorError(f"published manifest of {name} {version} is invalid: {exc}") from None
        return manifest, raw

    def signature(self, name: str, version: str) -> bytes | None:
        return self.read(layout.signature_key(name, version), limit=1024)
