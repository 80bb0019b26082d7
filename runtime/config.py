"""The runtime's TOML configuration: schema, defaults and strict validation.

    socket_path = "/run/tts/runtime.sock"    # mode 0660; ignored under socket activation
    cache_dir = "/var/cache/tts-fleet"       # the provisioner's cache (read-only here)
    provisioner_runtime_dir = "/run/tts-provisioner"   # its status.json, for progress
    models = ["joe"]                         # voices to serve; the first is the default
    device = "auto"                          # auto | cpu | cuda | cuda:N
    cpu_fallback = true                      # CUDA unusable -> run on the CPU
    threads = 0                              # CPU cores per synthesis (engine lanes), 0 = one per core
    max_batch_size = 8
    max_batch_ids = 800                      # a batch's padded size: longest utterance x batch size
    max_utterance_ids = 400                  # longer sentences are cut (clause, word, anywhere)
    max_request_ids = 15000                  # per request (all utterances), 413 past it; default 3 x max_chars
    express_max_ids = 240                    # requests up to this many ids overtake a long batch (CPU); 0 = off
    max_wait_ms = 10                         # how long the worker waits to fill a batch
    queue_size = 64                          # queued requests; beyond it 503
    queue_ids = 30000                        # queued work in phoneme ids; beyond it 503; default 2 x max_request_ids
    deadline_s = 60                          # per request, 504 past it
    max_chars = 5000                         # per request, 413 past it
    normalize_text = true                    # read numbers, dates, abbreviations out; or per voice:
                                             # [normalize_text] joe = false (others: true)
    request_timeout_s = 10                   # a client must send its whole request within it
    verify_full_hash = false                 # re-hash every file before loading (slow)
    tcp_listen = ""                          # e.g. "0.0.0.0:8088"; off when empty; needs tokens
    metrics_socket = ""                      # GET /metrics alone on this Unix socket, for the
                                             # metrics socket unit; "" = off (the API socket
                                             # serves /metrics either way)
    log_level = "info"
    # From the network (runtime/network_config.py, docs/runtime.md "From the network"):
    tcp_tokens_file = ""                     # bearer tokens for HTTP over TCP, one per line
    tcp_tokens_credential = ""               # ... or a systemd credential of that name
    tls_cert_file = ""                       # HTTPS on tcp_listen (both or neither)
    tls_key_file = ""
    wyoming_listen = []                      # ["tcp://0.0.0.0:10200", "unix:///run/tts/wyoming.sock"]
    wyoming_allow = ["127.0.0.0/8", "::1/128"]   # networks Wyoming TCP clients may come from
    wyoming_idle_timeout_s = 60              # a Wyoming connection silent this long is closed

Unknown keys and wrong types are errors that name the key (exit code 2 in the CLI).
The error formatting is the provisioner's, so both daemons talk alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mirror.manifest import ManifestError, validate_name
from tts_common.config import ConfigError, LogLevel, SocketPath, load_toml

from .network_config import NetworkSettings
from .normalize import DEFAULT_NORMALIZE_TEXT

# max_request_ids, when not set: phoneme ids per character of max_chars. Plain English takes
# 2.2-2.7 (short sentences the most: each adds its begin/end ids, "Yes. " x 1000 is 13000 ids
# for 5000 characters), so max_chars of it is always admitted; what is over it costs more than
# English of that length (e.g. CJK read letter by letter by an English voice).
IDS_PER_CHAR = 3
# queue_ids, when not set: this many of the largest requests.
QUEUE_REQUESTS_OF_WORK = 2

DEFAULT_CONFIG_PATH = Path(os.environ.get("TTS_RUNTIME_CONFIG", "/etc/tts-fleet/runtime.toml"))
DEFAULT_SOCKET_PATH = Path("/run/tts/runtime.sock")

__all__ = ["ConfigError", "RuntimeConfig", "load_config", "DEFAULT_CONFIG_PATH", "DEFAULT_SOCKET_PATH"]


def _path(v):
    if not isinstance(v, str) or not v:
        raise ValueError("must be a path string")
    return Path(v)


class RuntimeConfig(NetworkSettings, BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    socket_path: Path = DEFAULT_SOCKET_PATH
    cache_dir: Path = Path("/var/cache/tts-fleet")
    provisioner_runtime_dir: Path = Path("/run/tts-provisioner")
    models: Annotated[list[str], Field(min_length=1)] = ["joe"]
    device: str = "auto"
    cpu_fallback: bool = True
    threads: Annotated[int, Field(ge=0, le=256)] = 0
    max_batch_size: Annotated[int, Field(ge=1, le=256)] = 8
    # Cost bounds, measured in bench/results/bounds.md (docs/runtime.md "Bounds").
    max_batch_ids: Annotated[int, Field(ge=32, le=1_000_000)] = 800
    max_utterance_ids: Annotated[int, Field(ge=32, le=100_000)] = 400
    max_request_ids: Annotated[int, Field(ge=32, le=10_000_000)] = IDS_PER_CHAR * 5000
    # Short requests overtake a long batch in progress (runtime/scheduler.py, docs/runtime.md).
    express_max_ids: Annotated[int, Field(ge=0, le=100_000)] = 240
    max_wait_ms: Annotated[float, Field(ge=0, le=10_000)] = 10.0
    queue_size: Annotated[int, Field(ge=1, le=100_000)] = 64  # queued requests
    # queued work, in phoneme ids: one request cannot fill it (see _batch_vs_queue)
    queue_ids: Annotated[int, Field(ge=32, le=100_000_000)] = QUEUE_REQUESTS_OF_WORK * IDS_PER_CHAR * 5000
    deadline_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    max_chars: Annotated[int, Field(ge=1, le=1_000_000)] = 5000
    # runtime/normalize.py; a language without rules passes through whatever this says
    normalize_text: bool | dict[str, bool] = DEFAULT_NORMALIZE_TEXT
    request_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    verify_full_hash: bool = False
    tcp_listen: str = ""
    metrics_socket: SocketPath = ""
    log_level: LogLevel = "info"

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, data):
        """max_request_ids and queue_ids follow max_chars unless set (see IDS_PER_CHAR)."""
        if isinstance(data, dict):
            data = dict(data)
            chars, utterance = data.get("max_chars", 5000), data.get("max_utterance_ids", 400)
            if "max_request_ids" not in data and all(type(v) is int for v in (chars, utterance)):
                data["max_request_ids"] = max(IDS_PER_CHAR * chars, utterance)  # one utterance always fits
            request_ids = data.get("max_request_ids")
            if "queue_ids" not in data and type(request_ids) is int:
                data["queue_ids"] = QUEUE_REQUESTS_OF_WORK * request_ids
        return data

    @field_validator("socket_path", "cache_dir", "provisioner_runtime_dir", mode="before")
    @classmethod
    def _paths(cls, v):
        return _path(v)

    @field_validator("max_wait_ms", "deadline_s", "request_timeout_s", mode="before")
    @classmethod
    def _number(cls, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("must be a number")
        return float(v)

    @field_validator("models")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            try:
                validate_name(name, "model name")
            except ManifestError as exc:
                raise ValueError(str(exc)) from None
        if len(set(v)) != len(v):
            raise ValueError("model names must be unique")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in {"auto", "cpu", "cuda"} or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be auto, cpu, cuda or cuda:N")

    @field_validator("tcp_listen")
    @classmethod
    def _tcp(cls, v: str) -> str:
        if v:
            host, sep, port = v.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8088, or empty")
        return v

    @model_validator(mode="after")
    def _batch_vs_queue(self) -> "RuntimeConfig":
        if self.queue_size < self.max_batch_size:
            raise ValueError("queue_size must be at least max_batch_size")
        if self.max_batch_ids < self.max_utterance_ids:
            raise ValueError("max_batch_ids must be at least max_utterance_ids (one utterance must fit a batch)")
        if self.max_request_ids < self.max_utterance_ids:
            raise ValueError("max_request_ids must be at least max_utterance_ids")
        if self.queue_ids < self.max_request_ids + self.express_max_ids:
            # the largest request alone must leave room for a short one (it overtakes)
            raise ValueError("queue_ids must be at least max_request_ids + express_max_ids")
        if isinstance(self.normalize_text, dict):
            unknown = sorted(set(self.normalize_text) - set(self.models))
            if unknown:
                raise ValueError(f"normalize_text names voices not in models: {', '.join(unknown)}")
        return self

    def normalizes(self, voice: str) -> bool:
        """Whether `voice` reads numbers, dates and abbreviations out (normalize_text)."""
        if isinstance(self.normalize_text, bool):
            return self.normalize_text
        return self.normalize_text.get(voice, DEFAULT_NORMALIZE_TEXT)

    @property
    def default_voice(self) -> str:
        return self.models[0]

    def tcp_address(self) -> tuple[str, int] | None:
        if not self.tcp_listen:
            return None
        host, _, port = self.tcp_listen.rpartition(":")
        return host.strip("[]"), int(port)


def load_config(path: Path | None) -> RuntimeConfig:
    """Read and validate a config file; None means all defaults."""
    if path is None:
        return RuntimeConfig()
    return load_toml(path, RuntimeConfig)
