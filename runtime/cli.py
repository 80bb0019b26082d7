"""`tts-runtime serve`: the resident TTS service on a Unix socket (and, when configured, HTTP
over TCP with bearer tokens and the Wyoming protocol: listeners.py).

Sockets: already-open listening sockets from systemd socket activation (LISTEN_FDS) are
used as they are; otherwise the configured path is created with mode 0660 (a stale
socket file left by a crash is replaced; a live one is an error). uvicorn has no timeout for a client
that sends half a request and stops, so the HTTP protocol here closes a connection
whose request is not complete within `request_timeout_s`. SIGHUP re-checks the cache
(hot swap), like POST /v1/reload.

Connections are accepted only once the first look at the cache is over: every voice the
cache holds complete is loaded (or failed to load). Until then clients wait in the
listening socket's backlog - which systemd holds across restarts - instead of getting
503 "loading": a restart shorter than a client's timeout is invisible to it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import click
import h11
import structlog

from tts_common.cli import CliGroup
from tts_common.logs import configure_logging

from tts_common.errors import TtsError

from .config import DEFAULT_CONFIG_PATH, RuntimeConfig, load_config
from .listeners import ServeError, open_listeners, runtime_server, tls_context, unix_socket  # noqa: F401 (unix_socket: tests)
from .omp import prefer_passive_wait

log = structlog.get_logger(__name__)


def timed_h11_protocol(request_timeout: float):
    """uvicorn's h11 protocol plus a deadline for receiving each whole request."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _request_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport):  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.SEND_BODY or (
                self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]
            ):
                if self._request_timer is None:
                    self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._request_timer = self.loop.call_later(request_timeout, self._expire)

        def _disarm(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
                self._request_timer = None

        def _expire(self) -> None:
            self._request_timer = None
            state = self.conn.their_state
            if state is h11.SEND_BODY or state is h11.IDLE:
                log.warning("closing connection: request not received in time", timeout_s=request_timeout)
                self.transport.close()

    return TimedH11Protocol


KEEP_ALIVE_S = 65


def accept_after_first_pass(app, runtime, stopping):
    """The ASGI app, with uvicorn's lifespan startup held until the model manager's first
    pass is done: uvicorn starts accepting only after startup completes. `stopping()` true
    (SIGTERM meanwhile) ends the wait, and the server then shuts down."""

    async def first_pass() -> None:
        started = time.monotonic()
        while not stopping():
            if await asyncio.to_thread(runtime.manager.wait_cycle, 0, 0.5):
                break
        manager = runtime.manager
        log.info("accepting connections", after_s=round(time.monotonic() - started, 2), ready=manager.ready,
                 reason=manager.reason or None)

    async def wrapped(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)

        async def send_when_settled(message):
            if message["type"] == "lifespan.startup.complete":
                await first_pass()
            await send(message)

        return await app(scope, receive, send_when_settled)

    return wrapped


def serve_runtime(config: RuntimeConfig, loader=None) -> None:
    import uvicorn

    from .api.app import create_app
    from .api.service import Runtime
    from .api.wyoming_server import WyomingServer

    listeners = open_listeners(config)
    try:
        tokens = _tokens(config, listeners)
        ssl_context = tls_context(config)
    except TtsError:
        listeners.close()
        raise
    if listeners.activated:
        log.info("using sockets from systemd", count=listeners.activated)
    log.info("runtime starting", activated=listeners.activated, tls=ssl_context is not None, models=config.models,
             device=config.device, **listeners.describe())
    runtime = Runtime(config, loader)
    server: uvicorn.Server | None = None
    uv_config = uvicorn.Config(
        accept_after_first_pass(create_app(runtime, tokens), runtime,
                                lambda: server is not None and server.should_exit),
        http=timed_h11_protocol(config.request_timeout_s),
        lifespan="on",
        log_config=None,
        access_log=False,  # our own access log carries the TTS fields
        # Longer than clients keep idle connections (httpx and the OpenAI SDK: 5 s), so a client
        # drops an idle connection before the server does and never reuses one as it closes.
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=10,
        backlog=2048,
    )
    plain = listeners.http_unix + ([] if ssl_context else listeners.http_tcp)
    server = runtime_server(uv_config, https=listeners.http_tcp if ssl_context else [], ssl_context=ssl_context,
                            wyoming=WyomingServer(runtime, listeners.wyoming))
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; turn that into a
    # normal exit so the socket files are removed below.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        server.run(sockets=plain)
    finally:
        listeners.close()


def _tokens(config: RuntimeConfig, listeners):
    """The bearer tokens, when HTTP is served over TCP (and only then: none are read otherwise)."""
    from .api.auth import BearerTokens, load_tokens

    if not listeners.http_tcp:
        return None
    source = config.token_source()
    if source is None:
        raise ServeError("HTTP over TCP (tcp_listen, or a TCP socket from systemd) needs bearer tokens: "
                         "set tcp_tokens_file or tcp_tokens_credential")
    tokens = load_tokens(source)
    log.info("bearer tokens loaded", count=len(tokens), source=str(source))
    return BearerTokens(tokens)


@click.group(cls=CliGroup)
def main() -> None:
    """tts-fleet runtime: the resident TTS service."""


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help=f"runtime TOML config (default {DEFAULT_CONFIG_PATH} if it exists, else built-in defaults)")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), default=None,
              help="override socket_path from the config")
def serve(config_path: Path | None, socket_path: Path | None) -> None:
    """Serve synthesis on the Unix socket once the model cache is complete."""
    prefer_passive_wait()
    if config_path is None and DEFAULT_CONFIG_PATH.exists():
        config_path = DEFAULT_CONFIG_PATH
    config = load_config(config_path)
    if socket_path is not None:
        config = config.model_copy(update={"socket_path": socket_path})
    configure_logging(config.log_level)
    serve_runtime(config)


if __name__ == "__main__":
    main()
