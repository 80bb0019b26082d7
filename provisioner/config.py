"""The provisioner's TOML configuration: schema, defaults and strict validation.

    cache_dir = "/var/cache/tts-fleet"
    runtime_dir = "/run/tts-provisioner"     # status.json and the pid file
    metrics_socket = ""                      # Prometheus metrics on this Unix socket (daemon);
                                             # "" = off. The role: /run/tts-provisioner/metrics.sock
    keep_snapshots = 3
    poll_interval = 300                      # seconds between channel checks
    require_signature = true
    public_keys = ["/etc/tts-fleet/keys/mirror.pub"]
    disk_margin_mb = 256
    max_file_size = "256G"                   # manifests over these are refused at parse time
    max_model_size = "1T"                    # (bytes, or a number with K/M/G/T, powers of 1024)
    quarantine_max_bytes = "1G"              # quarantine/ in all (one copy per file, oldest go first)
    quarantine_max_age = 604800              # seconds a quarantined copy is kept

    [trust]                                  # signed channel metadata (docs/mirror.md, "Trust")
    root = "/etc/tts-fleet/trust/root.json"  # set: channels and pinned versions must be signed TUF
                                             # metadata; unset: unsigned channels (legacy)
    metadata_deadline = 20                   # seconds for one metadata request, then the next mirror

    [aria2]                                  # all optional
    connections = 8                          # per server (-x) and split (-s)
    min_split_size = "8M"
    max_concurrent_downloads = 4
    max_download_limit = "0"                 # per download, aria2 syntax (0 = unlimited)
    socket_recv_buffer = "1M"                # per connection; caps bytes lost to a crash
    piece_selector = "geom"                  # fresh files: prefix first, hashed while downloading
    resume_piece_selector = "geom"           # resumed files (bench/sync.py compares the selectors)
    lowest_speed_limit = "1K"                # a connection slower than this is dropped (aria2's
                                             # --lowest-speed-limit, after 10 s); "0" = off
    file_deadline = 600                      # seconds every try of a file gets, plus its size at
    file_deadline_speed = "256K"             # this many bytes/s; then the next mirror. 0 = no deadline

    [p2p]                                    # off by default: docs/p2p.md
    enabled = false
    trackers = ["http://tracker.internal:6969/announce"]
    listen_port = 6881
    upload_limit = "50M"                     # all seeds together, aria2 syntax
    node_id = ""                             # default: the host name
    fleet = []                               # node ids of the fleet (ranking, see below)
    web_seed_nodes = 1                       # nodes per file that start on the mirror
    stall_seconds = 5.0                      # others add the mirror after this without progress

    [[mirrors]]
    name = "primary"
    endpoint = "http://minio-a.internal:9000"
    bucket = "tts-models"
    credentials_file = "/etc/tts-fleet/mirror-primary.toml"
    priority = 10                            # lower is tried first

    [[models]]
    name = "joe"
    channel = "stable"                       # or: version = "1.0.0" (pinned)

Unknown keys and wrong types are errors that name the key (exit code 2 in the CLI).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mirror.manifest import DEFAULT_MAX_FILE_SIZE, DEFAULT_MAX_MODEL_SIZE, ManifestError, SizeLimits, validate_name
from tts_common.config import ByteSize, ConfigError, LogLevel, SocketPath, load_toml

DEFAULT_CONFIG_PATH = Path(os.environ.get("TTS_PROVISIONER_CONFIG", "/etc/tts-fleet/provisioner.toml"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _plain_name(value: str, what: str) -> str:
    try:
        return validate_name(value, what)
    except ManifestError as exc:
        raise ValueError(str(exc)) from None


class MirrorConfig(_Strict):
    name: str
    endpoint: str
    bucket: str
    credentials_file: Path
    priority: int = 100
    region: str = "us-east-1"

    @field_validator("credentials_file", mode="before")
    @classmethod
    def _path(cls, v):
        if not isinstance(v, str):
            raise ValueError("must be a path string")
        return Path(v)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _plain_name(v, "mirror name")


class ModelConfig(_Strict):
    name: str
    channel: str | None = None
    version: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _plain_name(v, "model name")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.channel is None) == (self.version is None):
            raise ValueError("set exactly one of 'channel' or 'version'")
        if self.channel is not None:
            _plain_name(self.channel, "channel")
        if self.version is not None:
            _plain_name(self.version, "version")
        return self


class Aria2Config(_Strict):
    executable: str = "aria2c"
    connections: Annotated[int, Field(ge=1, le=16)] = 8
    min_split_size: str = "8M"
    max_concurrent_downloads: Annotated[int, Field(ge=1, le=64)] = 4
    max_download_limit: str = "0"
    # Per-connection socket receive buffer. Bounds the bytes in flight that a killed
    # download loses (loopback autotuning grows it to several MiB per connection);
    # throughput per connection is at most this / round-trip time. "0" = kernel default.
    socket_recv_buffer: str = "1M"
    # aria2's --stream-piece-selector for a file started fresh, and for one resumed from
    # its .aria2 control file (see provisioner/aria2.py for why they differ).
    piece_selector: Literal["default", "inorder", "random", "geom"] = "geom"
    resume_piece_selector: Literal["default", "inorder", "random", "geom"] = "geom"
    max_tries: Annotated[int, Field(ge=1, le=100)] = 5
    # Seconds a presigned URL stays valid; expired URLs are re-presigned and resumed.
    presign_expiry: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] = 3600
    # Slow mirrors (docs/provisioner.md, "The download loop"): aria2 drops a connection
    # under this speed (per connection, checked after its first 10 s; 0 = off), and each try
    # of a file is stopped after file_deadline s + its size at file_deadline_speed (0 = off);
    # both fail over to the next mirror.
    lowest_speed_limit: ByteSize = 1024
    file_deadline: Annotated[float, Field(ge=0, le=7 * 24 * 3600)] = 600.0
    file_deadline_speed: Annotated[ByteSize, Field(ge=1)] = 256 * 1024

    @field_validator("file_deadline", mode="before")
    @classmethod
    def _deadline(cls, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("must be a number of seconds")
        return float(v)


class TrustConfig(_Strict):
    """Signed channel metadata (python-tuf). `root` is the initial root.json the fleet
    trusts; the node keeps what it verified under `<cache_dir>/trust/`."""
    root: Path | None = None
    metadata_deadline: Annotated[float, Field(gt=0, le=600)] = 20.0

    @field_validator("root", mode="before")
    @classmethod
    def _path(cls, v):
        if v is not None and not isinstance(v, str):
            raise ValueError("must be a path string")
        return Path(v) if v is not None else None

    @field_validator("metadata_deadline", mode="before")
    @classmethod
    def _seconds(cls, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("must be a number of seconds")
        return float(v)


class P2PConfig(_Strict):
    """Peer-to-peer distribution (docs/p2p.md). Off: every file comes from the mirrors."""
    enabled: bool = False
    trackers: list[str] = []
    listen_port: Annotated[int, Field(ge=1024, le=65535)] = 6881
    upload_limit: str = "50M"
    seed: bool = True
    node_id: str = ""
    fleet: list[str] = []
    web_seed_nodes: Annotated[int, Field(ge=0, le=1000)] = 1
    stall_seconds: Annotated[float, Field(gt=0, le=3600)] = 5.0

    @field_validator("trackers")
    @classmethod
    def _trackers(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("http://", "https://", "udp://")):
                raise ValueError(f"tracker {url!r} must be an http://, https:// or udp:// announce URL")
            if "," in url:
                raise ValueError(f"tracker {url!r} contains a comma")
        return v

    @field_validator("stall_seconds", mode="before")
    @classmethod
    def _seconds(cls, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("must be a number of seconds")
        return float(v)

    @model_validator(mode="after")
    def _needs_a_tracker(self) -> "P2PConfig":
        if self.enabled and not self.trackers:
            raise ValueError("p2p is enabled but no trackers are configured")
        return self


class ProvisionerConfig(_Strict):
    cache_dir: Path = Path("/var/cache/tts-fleet")
    runtime_dir: Path = Path("/run/tts-provisioner")
    keep_snapshots: Annotated[int, Field(ge=1, le=100)] = 3
    poll_interval: Annotated[float, Field(gt=0)] = 300.0
    require_signature: bool = True
    public_keys: list[Path] = []
    disk_margin_mb: Annotated[int, Field(ge=0)] = 256
    log_level: LogLevel = "info"
    metrics_socket: SocketPath = ""
    max_file_size: Annotated[ByteSize, Field(ge=1)] = DEFAULT_MAX_FILE_SIZE
    max_model_size: Annotated[ByteSize, Field(ge=1)] = DEFAULT_MAX_MODEL_SIZE
    # quarantine/ (bytes that failed verification, kept for inspection) is bounded: one
    # copy per file, this many bytes in all (a copy larger than this is not kept), each
    # copy at most quarantine_max_age seconds.
    quarantine_max_bytes: ByteSize = 1024**3
    quarantine_max_age: Annotated[float, Field(gt=0)] = 7 * 24 * 3600.0
    aria2: Aria2Config = Aria2Config()
    p2p: P2PConfig = P2PConfig()
    trust: TrustConfig = TrustConfig()
    mirrors: Annotated[list[MirrorConfig], Field(min_length=1)]
    models: Annotated[list[ModelConfig], Field(min_length=1)]

    @field_validator("cache_dir", "runtime_dir", mode="before")
    @classmethod
    def _dir(cls, v):
        if not isinstance(v, str):
            raise ValueError("must be a path string")
        return Path(v)

    @field_validator("public_keys", mode="before")
    @classmethod
    def _keys(cls, v):
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError("must be a list of path strings")
        return [Path(x) for x in v]

    @property
    def size_limits(self) -> SizeLimits:
        return SizeLimits(self.max_file_size, self.max_model_size)

    @field_validator("poll_interval", "quarantine_max_age", mode="before")
    @classmethod
    def _number(cls, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("must be a number of seconds")
        return float(v)

    @model_validator(mode="after")
    def _unique(self) -> "ProvisionerConfig":
        for what, names in (("mirror", [m.name for m in self.mirrors]), ("model", [m.name for m in self.models])):
            dupes = {n for n in names if names.count(n) > 1}
            if dupes:
                raise ValueError(f"duplicate {what} names: {sorted(dupes)}")
        # With a trust root the signed metadata pins each manifest's bytes: the manifest's
        # own signature is then not needed (public_keys are for unsigned channels).
        if self.require_signature and not self.public_keys and self.trust.root is None:
            raise ValueError("require_signature is true but no public_keys are configured "
                             "(or set [trust] root for signed channel metadata)")
        return self


def load_config(path: Path) -> ProvisionerConfig:
    return load_toml(path, ProvisionerConfig)
