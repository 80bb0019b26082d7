"""The runtime's listening sockets, and the uvicorn server that serves them with the Wyoming
front end beside it.

Three kinds of listener:

* HTTP on a Unix socket: `socket_path`, or from systemd an AF_UNIX socket not named `wyoming*`;
  no token (the socket file's mode is its access control).
* HTTP over TCP: `tcp_listen`, or from systemd an AF_INET/AF_INET6 socket not named `wyoming*`;
  a bearer token required, HTTPS with `tls_cert_file`.
* Wyoming: `wyoming_listen` (`tcp://`, `unix://`), or from systemd a socket whose
  FileDescriptorName= starts with `wyoming`; TCP clients admitted by `wyoming_allow`.

A kind that systemd hands in replaces the configured listeners of that kind (LISTEN_FDNAMES
tells the sockets apart; a socket unit without FileDescriptorName= is named after the unit,
so `tts-runtime.socket` is HTTP).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path

from tts_common.errors import TtsError

from .config import RuntimeConfig
from .network_config import parse_listen_uri

SD_LISTEN_FDS_START = 3
WYOMING_FDNAME = "wyoming"


class ServeError(TtsError):
    pass


def systemd_sockets() -> list[tuple[str, socket.socket]]:
    """Listening sockets passed by systemd (sd_listen_fds) with their names (LISTEN_FDNAMES;
    "" when unnamed), or [] when not activated."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    socks = []
    for i, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)):
        os.set_inheritable(fd, False)
        socks.append((names[i] if i < len(names) else "", socket.socket(fileno=fd)))
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


def is_tcp(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


@dataclass
class Listeners:
    http_unix: list[socket.socket] = field(default_factory=list)
    http_tcp: list[socket.socket] = field(default_factory=list)
    wyoming: list[socket.socket] = field(default_factory=list)
    created: list[Path] = field(default_factory=list)  # socket files made here: removed at exit
    activated: int = 0

    def all(self) -> list[socket.socket]:
        return self.http_unix + self.http_tcp + self.wyoming

    def close(self) -> None:
        for sock in self.all():
            sock.close()
        for path in self.created:
            path.unlink(missing_ok=True)

    def describe(self) -> dict[str, list[str]]:
        return {kind: [_name(s) for s in socks] for kind, socks in
                (("http", self.http_unix + self.http_tcp), ("wyoming", self.wyoming)) if socks}


def _name(sock: socket.socket) -> str:
    name = sock.getsockname()
    return f"tcp://{name[0]}:{name[1]}" if isinstance(name, tuple) else f"unix://{name}"


def open_listeners(config: RuntimeConfig) -> Listeners:
    """Every listener the runtime serves: systemd's, else the configured ones (per kind)."""
    out = Listeners()
    activated = systemd_sockets()
    out.activated = len(activated)
    for name, sock in activated:
        kind = out.wyoming if name.startswith(WYOMING_FDNAME) else out.http_tcp if is_tcp(sock) else out.http_unix
        kind.append(sock)
    try:
        if not out.http_unix:
            out.http_unix.append(unix_socket(config.socket_path))
            out.created.append(config.socket_path)
        tcp = config.tcp_address()
        if tcp and not out.http_tcp:
            out.http_tcp.append(tcp_socket(*tcp))
        if not out.wyoming:
            for uri in config.wyoming_listen:
                scheme, where, port = parse_listen_uri(uri)
                if scheme == "tcp":
                    out.wyoming.append(tcp_socket(str(where), port))
                else:
                    out.wyoming.append(unix_socket(Path(where)))
                    out.created.append(Path(where))
    except (OSError, ServeError) as exc:
        out.close()
        raise exc if isinstance(exc, ServeError) else ServeError(f"cannot listen: {exc}") from None
    return out


def tls_context(config: RuntimeConfig) -> ssl.SSLContext | None:
    if not config.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ServeError(f"cannot load the TLS certificate {config.tls_cert_file} with key "
                         f"{config.tls_key_file}: {exc}") from None
    return context


def runtime_server(uv_config, *, https: list[socket.socket], ssl_context: ssl.SSLContext | None, wyoming):
    """A uvicorn server that also serves `https` sockets with TLS (uvicorn's own `ssl` would
    apply to the Unix socket too) and runs the Wyoming front end: started after the app's
    startup (the Runtime), stopped before its shutdown."""
    import uvicorn

    class RuntimeServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            loop = asyncio.get_running_loop()
            for sock in https:
                self.servers.append(await loop.create_server(self._protocol, sock=sock, ssl=ssl_context,
                                                             backlog=self.config.backlog))
            await wyoming.start()

        async def shutdown(self, sockets=None):
            await wyoming.stop()
            await super().shutdown(sockets=sockets)

        def _protocol(self):
            return self.config.http_protocol_class(config=self.config, server_state=self.server_state,
                                                   app_state=self.lifespan.state)

    return RuntimeServer(uv_config)
