"""Real S3 servers on 127.0.0.1 for tests, benchmarks and the demo: nanio (Python) and
`rclone serve s3` (Go), each a subprocess over a temp data dir with a fresh key pair.

bench/ and scripts/demo.py start the same servers the tests use (tests/conftest.py's
`s3_server` fixture runs a test once per server).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from mirror.s3 import Credentials, make_client
from tts_testkit.paths import VENV_BIN


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{host}:{port} did not accept connections within {timeout}s")


@dataclass
class S3Server:
    endpoint: str
    credentials: Credentials
    kind: str = "external"  # nanio, rclone or external
    process: subprocess.Popen | None = None
    data_dir: Path | None = None
    _buckets: list[str] = field(default_factory=list)

    def client(self):
        return make_client(self.endpoint, self.credentials)

    def new_bucket(self, prefix: str = "tts") -> str:
        name = f"{prefix}-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        self._buckets.append(name)
        return name

    def write_credentials(self, path: Path) -> Path:
        self.credentials.write(path)
        return path

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    if not path:
        raise RuntimeError(f"{name} is not installed: run scripts/setup.sh")
    return path


def _start(kind: str, cmd: list[str], env: dict, data_dir: Path, port: int, creds: Credentials,
           host: str = "127.0.0.1", wrap: tuple[str, ...] = (), preexec_fn=None) -> S3Server:
    log = open(data_dir.parent / f"{kind}-{port}.log", "wb")
    proc = subprocess.Popen([*wrap, *cmd], env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
    try:
        wait_for_port(host, port)
    except TimeoutError:
        proc.kill()
        raise
    return S3Server(endpoint=f"http://{host}:{port}", credentials=creds, kind=kind, process=proc,
                    data_dir=data_dir)


def _new_credentials() -> Credentials:
    return Credentials(access_key="tts" + secrets.token_hex(4), secret_key=secrets.token_hex(16))


def start_nanio(data_dir: Path, port: int | None = None, host: str = "127.0.0.1", wrap: tuple[str, ...] = (),
                preexec_fn=None) -> S3Server:
    """`host`/`wrap`: the fleet harness runs the server in a network namespace
    (wrap = nsenter ...) on that namespace's address."""
    port = port or free_port()
    creds = _new_credentials()
    env = dict(os.environ, NANIO_ACCESS_KEY=creds.access_key, NANIO_SECRET_KEY=creds.secret_key)
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [_tool("nanio"), "serve", "--host", host, "--port", str(port), "--data-dir", str(data_dir),
           "--no-access-log", "--log-level", "warning"]
    return _start("nanio", cmd, env, data_dir, port, creds, host, wrap, preexec_fn)


def start_rclone(data_dir: Path, port: int | None = None, host: str = "127.0.0.1", wrap: tuple[str, ...] = (),
                 preexec_fn=None) -> S3Server:
    """`rclone serve s3` over a plain directory (each top-level folder is a bucket). The key
    pair goes in through the environment, not argv, so `ps` does not show the secret."""
    port = port or free_port()
    creds = _new_credentials()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RCLONE_AUTH_KEY=f'"{creds.access_key},{creds.secret_key}"', RCLONE_CONFIG="/dev/null")
    cmd = [_tool("rclone"), "serve", "s3", "--addr", f"{host}:{port}", "--log-level", "ERROR",
           str(data_dir)]
    return _start("rclone", cmd, env, data_dir, port, creds, host, wrap, preexec_fn)


STARTERS = {"nanio": start_nanio, "rclone": start_rclone}
