"""`tts-runtime serve`: the resident TTS service on a Unix socket.

Sockets: an already-open listening socket from systemd socket activation (LISTEN_FDS)
is used as is; otherwise the configured path is created with mode 0660 (a stale
socket file left by a crash is replaced; a live one is an error). An optional TCP
listener is added only when `tcp_listen` is set. uvicorn has no timeout for a client
that sends half a request and stops, so the HTTP protocol here closes a connection
whose request is not complete within `request_timeout_s`. SIGHUP re-checks the cache
(hot swap), like POST /v1/reload.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
from pathlib import Path

import click
import h11
import structlog

from tts_common.cli import CliGroup
from tts_common.logs import configure_logging

from tts_common.errors import TtsError

from .config import DEFAULT_CONFIG_PATH, RuntimeConfig, load_config
from .omp import prefer_passive_wait

log = structlog.get_logger(__name__)
SD_LISTEN_FDS_START = 3


class ServeError(TtsError):
    pass


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


def systemd_sockets() -> list[socket.socket]:
    """Listening sockets passed by systemd (sd_listen_fds), or [] when not activated."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def unix_socket(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise ServeError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise ServeError(f"another process is already listening on {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # stale socket from a crash
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # never world-accessible, not even between bind and chmod
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    sock.listen(2048)
    return sock


def tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


KEEP_ALIVE_S = 65


def serve_runtime(config: RuntimeConfig, loader=None) -> None:
    import uvicorn

    from .api.app import create_app
    from .api.service import Runtime

    activated = systemd_sockets()
    created: Path | None = None
    try:
        if activated:
            sockets = activated
            log.info("using sockets from systemd", count=len(activated))
        else:
            sockets = [unix_socket(config.socket_path)]
            created = config.socket_path
        tcp = config.tcp_address()
        if tcp:
            sockets.append(tcp_socket(*tcp))
    except OSError as exc:
        raise ServeError(f"cannot listen: {exc}") from None
    log.info(
        "runtime starting",
        socket=str(config.socket_path) if created else "systemd",
        tcp=config.tcp_listen or None,
        models=config.models,
        device=config.device,
    )
    runtime = Runtime(config, loader)
    uv_config = uvicorn.Config(
        create_app(runtime),
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
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; turn that into a
    # normal exit so the socket file is removed below.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        uvicorn.Server(uv_config).run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
        if created is not None:
            created.unlink(missing_ok=True)


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
