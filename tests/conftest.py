"""Shared test harness: a real S3 server and real aria2c.

The S3 server is nanio (a small S3-compatible server from PyPI) started as a
subprocess on 127.0.0.1 in a temp dir - MinIO's server binary does not install on
these machines. With TTS_TEST_S3_ENDPOINT, TTS_TEST_S3_ACCESS_KEY and
TTS_TEST_S3_SECRET_KEY set, the same tests run against that real MinIO instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mirror.s3 import Credentials, make_client

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
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


def start_nanio(data_dir: Path, port: int | None = None) -> S3Server:
    port = port or free_port()
    creds = Credentials(access_key="tts" + secrets.token_hex(4), secret_key=secrets.token_hex(16))
    env = dict(os.environ, NANIO_ACCESS_KEY=creds.access_key, NANIO_SECRET_KEY=creds.secret_key)
    nanio = shutil.which("nanio", path=str(VENV_BIN)) or shutil.which("nanio")
    if not nanio:
        raise RuntimeError("nanio is not installed: run scripts/setup.sh")
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir.parent / f"nanio-{port}.log", "wb")
    proc = subprocess.Popen(
        [nanio, "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
         "--no-access-log", "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port)
    except TimeoutError:
        proc.kill()
        raise
    return S3Server(endpoint=f"http://127.0.0.1:{port}", credentials=creds, process=proc, data_dir=data_dir)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    endpoint = os.environ.get("TTS_TEST_S3_ENDPOINT")
    if endpoint:
        creds = Credentials(os.environ["TTS_TEST_S3_ACCESS_KEY"], os.environ["TTS_TEST_S3_SECRET_KEY"])
        yield S3Server(endpoint=endpoint, credentials=creds)
        return
    server = start_nanio(tmp_path_factory.mktemp("s3") / "data")
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.new_bucket()


@pytest.fixture(scope="session")
def aria2c_path() -> str:
    path = shutil.which("aria2c")
    if not path:
        pytest.fail("aria2c is not installed: run scripts/setup.sh (apt-get install aria2)")
    return path
