"""S3 access shared by the publisher and the provisioner: credentials and clients.

Credentials live in a small TOML file readable only by its owner:

    access_key = "..."
    secret_key = "..."

They are never logged; `Credentials.__repr__` hides the secret so an accidental
log of the object shows nothing useful.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import tomli_w
from botocore.config import Config

from tts_common.atomic import write_atomic
from tts_common.errors import TtsError


class CredentialsError(TtsError):
    """The credentials file is missing, unreadable, too open or malformed."""


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(access_key={self.access_key[:4]}…)"

    @classmethod
    def from_file(cls, path: Path, require_private: bool = True) -> "Credentials":
        path = Path(path)
        try:
            st = path.stat()
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CredentialsError(f"cannot read credentials file {path}: {exc.strerror}") from None
        if require_private and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CredentialsError(
                f"credentials file {path} is readable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise CredentialsError(f"credentials file {path} is not valid TOML: {exc}") from None
        unknown = set(raw) - {"access_key", "secret_key"}
        if unknown:
            raise CredentialsError(f"credentials file {path} has unknown keys: {sorted(unknown)}")
        for key in ("access_key", "secret_key"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise CredentialsError(f"credentials file {path} needs a non-empty string '{key}'")
        return cls(access_key=raw["access_key"], secret_key=raw["secret_key"])

    @classmethod
    def from_env(cls, prefix: str = "TTS_S3_") -> "Credentials | None":
        access, secret = os.environ.get(prefix + "ACCESS_KEY"), os.environ.get(prefix + "SECRET_KEY")
        if access and secret:
            return cls(access_key=access, secret_key=secret)
        return None

    def write(self, path: Path) -> None:
        """Write a credentials file with mode 0600 from creation on."""
        doc = {"access_key": self.access_key, "secret_key": self.secret_key}
        write_atomic(path, tomli_w.dumps(doc), mode=0o600)


def client_config(max_pool_connections: int = 32, connect_timeout: float = 5, read_timeout: float = 60) -> Config:
    # Request/response checksums only when the operation requires them: boto3's
    # default (always) sends trailing CRC checksums that some S3-compatible servers
    # reject. Path-style addressing because MinIO endpoints are usually bare hosts.
    return Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
    )


def make_client(endpoint: str, credentials: Credentials, region: str = "us-east-1", **config_kwargs):
    """A boto3 S3 client for one mirror endpoint (http(s)://host:port)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=credentials.access_key,
        aws_secret_access_key=credentials.secret_key,
        region_name=region,
        config=client_config(**config_kwargs),
    )
