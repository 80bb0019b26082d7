"""Bearer tokens for HTTP over TCP: who may use a runtime that the network can reach.

OpenAI clients send `Authorization: Bearer <key>`; the runtime accepts any of the tokens in its
tokens file (or systemd credential), one per line as `TOKEN` or `LABEL TOKEN` (the label, never
the token, goes to the access log as `client`). Only digests are kept, and a presented token is
compared with every one of them in constant time, so neither timing nor an early exit says how
close a guess was or which token it matched.

`AuthLayer` sits inside the access layer (so a refusal is logged and counted like any answer)
and checks only connections that did not come in on a Unix socket: those sockets' file
permissions are their access control, as before. Probes (/healthz, /readyz) stay open so a load
balancer can check a node without a key.
"""

from __future__ import annotations

import hashlib
import hmac
import stat
from dataclasses import dataclass
from pathlib import Path

from tts_common.errors import TtsError

from .errors import HttpError
from .record import SCOPE_KEY

MIN_TOKEN_CHARS = 16
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_CHALLENGE = 'Bearer realm="tts-runtime"'  # RFC 6750


class TokenFileError(TtsError):
    """The tokens file is missing, unreadable, open to others, or holds no usable token."""


@dataclass(frozen=True)
class Token:
    label: str
    digest: bytes  # sha256 of the token


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token).digest()


def load_tokens(path: Path) -> list[Token]:
    """The tokens in `path`. Errors name the file and the line, never a token."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read bearer tokens from {path}: {exc}") from None
    if mode & stat.S_IRWXO:
        raise TokenFileError(f"{path} is open to other users (mode {stat.S_IMODE(mode):04o}); "
                             "make it 0600 or 0640 (owner root or the service user)")
    tokens: list[Token] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            raise TokenFileError(f"{path} line {number}: expected 'TOKEN' or 'LABEL TOKEN'")
        label, token = (fields[0], fields[1]) if len(fields) == 2 else (f"line-{number}", fields[0])
        if len(token) < MIN_TOKEN_CHARS:
            raise TokenFileError(f"{path} line {number}: a token must have at least {MIN_TOKEN_CHARS} characters "
                                 "(e.g. `openssl rand -hex 32`)")
        tokens.append(Token(label, _digest(token)))
    if not tokens:
        raise TokenFileError(f"{path} holds no token: HTTP over TCP would admit nobody")
    return tokens


class BearerTokens:
    def __init__(self, tokens: list[Token]):
        self.tokens = tokens

    def match(self, presented: bytes) -> str | None:
        """The label of the token presented, or None. Every digest is compared, match or not."""
        digest = _digest(presented)
        found = None
        for token in self.tokens:
            if hmac.compare_digest(digest, token.digest):
                found = token.label
        return found


def bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    for key, value in headers:
        if key == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


def over_unix_socket(scope) -> bool:
    """uvicorn names a Unix socket's server as (path, None); a TCP one has a port. Anything
    else is treated as the network (fail closed)."""
    server = scope.get("server")
    return isinstance(server, (tuple, list)) and len(server) == 2 and server[1] is None


class AuthLayer:
    """ASGI: a request over TCP without a valid bearer token is answered 401 in the API's error
    shape (OpenAI clients raise AuthenticationError on it) and never reaches the routes."""

    def __init__(self, app, tokens: BearerTokens | None):
        self.app, self.tokens = app, tokens

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or over_unix_socket(scope) or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        presented = bearer(scope.get("headers", []))
        label = self.tokens.match(presented) if presented is not None and self.tokens is not None else None
        record = scope.get(SCOPE_KEY)
        if label is None:
            message = ("missing bearer token: send 'Authorization: Bearer <token>'" if presented is None
                       else "invalid bearer token")
            challenge = _CHALLENGE if presented is None else _CHALLENGE + ', error="invalid_token"'
            refusal = HttpError(401, message, "invalid_api_key", headers={"WWW-Authenticate": challenge})
            if record is not None:
                record.fail(refusal.message, refusal.kind)
            return await refusal.response()(scope, receive, send)
        if record is not None:
            record.client = label
        return await self.app(scope, receive, send)
