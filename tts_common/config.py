"""Reading a daemon's TOML configuration: one loader, one way to word its errors.

Every config schema (provisioner, runtime) is a strict pydantic model; this module
reads the file, validates it, and turns every failure into a `ConfigError` naming
the file and each offending key (`models[0].name: required key is missing`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ValidationError

from .errors import UsageError

Schema = TypeVar("Schema", bound=BaseModel)


class ConfigError(UsageError):
    """The configuration file is missing, not TOML, or does not match the schema."""


def _log_level(v: str) -> str:
    if v.lower() not in {"debug", "info", "warning", "error"}:
        raise ValueError("must be one of debug, info, warning, error")
    return v.lower()


# Shared by every daemon's config.
LogLevel = Annotated[str, AfterValidator(_log_level)]

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_byte_size(v) -> int:
    """An int (bytes) or a string like "256G" (binary units) -> bytes."""
    if isinstance(v, bool):
        raise ValueError("must be a byte count or a string like \"256G\"")
    if isinstance(v, int):
        if v < 0:
            raise ValueError("must not be negative")
        return v
    if isinstance(v, str):
        text = v.strip().upper().removesuffix("IB").removesuffix("B")
        unit = text[-1:] if text[-1:] in _UNITS else ""
        number = text[:-1] if unit else text
        if number.isdigit():
            return int(number) * _UNITS[unit]
    raise ValueError(f"must be a byte count or a string like \"256G\", got {v!r}")


ByteSize = Annotated[int, BeforeValidator(parse_byte_size)]


def _socket_path(v: str) -> str:
    if v and not v.startswith("/"):
        raise ValueError(f"must be an absolute path (or \"\" for off), not {v!r}")
    return v


# A Unix socket's path, or "" for off (the daemons' metrics_socket).
SocketPath = Annotated[str, AfterValidator(_socket_path)]


def format_validation_errors(exc: ValidationError) -> str:
    """pydantic errors as `key.path: message; ...`, naming each offending key."""
    lines = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{loc or '(top level)'}: {msg}")
    return "; ".join(lines)


def load_toml(path: Path, schema: type[Schema]) -> Schema:
    """Read a TOML file and validate it against a config schema; every daemon's loader."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"config {path}: {format_validation_errors(exc)}") from None
