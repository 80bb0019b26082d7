"""The runtime's settings for clients on the network: HTTP over TCP (bearer tokens, TLS) and
the Wyoming protocol (Home Assistant). Part of RuntimeConfig (config.py), kept apart so the
network's rules live in one place.

    tcp_listen = "0.0.0.0:8088"              # (config.py) HTTP over TCP: needs tokens
    tcp_tokens_file = "/etc/tts-fleet/private/runtime-tokens"   # one token per line
    tcp_tokens_credential = "runtime-tokens" # or: $CREDENTIALS_DIRECTORY/<name> (LoadCredential=)
    tls_cert_file = ""                       # HTTPS on tcp_listen: both or neither
    tls_key_file = ""
    wyoming_listen = ["tcp://0.0.0.0:10200"] # and/or "unix:///run/tts/wyoming.sock"
    wyoming_allow = ["127.0.0.0/8", "::1/128"]   # networks Wyoming TCP clients may come from
    wyoming_idle_timeout_s = 60              # a Wyoming connection silent this long is closed

The Unix sockets need neither tokens nor an allow list: their file mode is their access control.
Wyoming has no authentication of its own (Home Assistant sends none), so a Wyoming TCP client is
admitted by its address: `wyoming_allow` here, and the unit's IPAddressAllow= (the role writes
both from one list).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

from pydantic import BaseModel, Field, field_validator, model_validator

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"


def parse_listen_uri(uri: str) -> tuple[str, str | Path, int | None]:
    """`tcp://HOST:PORT` -> ("tcp", host, port); `unix:///path` -> ("unix", Path, None).
    ValueError naming what is wrong otherwise."""
    parsed = urlparse(uri)
    if parsed.scheme == "tcp":
        try:
            port = parsed.port
        except ValueError:
            port = None
        if not parsed.hostname or port is None or not 0 < port < 65536 or parsed.path not in ("", "/"):
            raise ValueError(f"{uri!r}: a tcp:// address needs a host and a port, e.g. tcp://0.0.0.0:10200")
        return "tcp", parsed.hostname, port
    if parsed.scheme == "unix":
        if not parsed.path.startswith("/") or parsed.netloc:
            raise ValueError(f"{uri!r}: a unix:// address needs an absolute path, e.g. unix:///run/tts/wyoming.sock")
        return "unix", Path(parsed.path), None
    raise ValueError(f"{uri!r}: only tcp://HOST:PORT and unix:///PATH are supported")


class NetworkSettings(BaseModel):
    """Mixed into RuntimeConfig (which sets strict, frozen, extra=forbid)."""

    tcp_tokens_file: str = ""
    tcp_tokens_credential: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    wyoming_listen: list[str] = []
    wyoming_allow: list[str] = ["127.0.0.0/8", "::1/128"]
    wyoming_idle_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0

    @field_validator("tcp_tokens_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if v and not v.startswith("/"):
            raise ValueError("must be an absolute path, or empty")
        return v

    @field_validator("tcp_tokens_credential")
    @classmethod
    def _credential_name(cls, v: str) -> str:
        if v and ("/" in v or v in (".", "..")):
            raise ValueError("must be a credential name (LoadCredential=NAME:...), not a path")
        return v

    @field_validator("wyoming_listen")
    @classmethod
    def _uris(cls, v: list[str]) -> list[str]:
        for uri in v:
            parse_listen_uri(uri)
        return v

    @field_validator("wyoming_allow")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an IP network (e.g. 192.168.1.0/24, fd00::/8)") from None
        return v

    @field_validator("wyoming_idle_timeout_s", mode="before")
    @classmethod
    def _seconds(cls, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("must be a number")
        return float(v)

    @model_validator(mode="after")
    def _tokens_and_tls(self):
        if getattr(self, "tcp_listen", "") and not self.token_source():
            raise ValueError("tcp_listen needs bearer tokens: set tcp_tokens_file or tcp_tokens_credential "
                             "(nobody without a token may use a runtime reachable from the network)")
        if self.tcp_tokens_file and self.tcp_tokens_credential:
            raise ValueError("set tcp_tokens_file or tcp_tokens_credential, not both")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        return self

    def token_source(self) -> Path | None:
        """Where the tokens are read from: the file, or the credential in $CREDENTIALS_DIRECTORY
        (None when neither is set, or the credential is set but systemd passed no directory)."""
        if self.tcp_tokens_file:
            return Path(self.tcp_tokens_file)
        if self.tcp_tokens_credential:
            directory = os.environ.get(CREDENTIALS_ENV)
            return Path(directory) / self.tcp_tokens_credential if directory else Path(
                f"${CREDENTIALS_ENV}/{self.tcp_tokens_credential}")
        return None

    def wyoming_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.wyoming_allow]
