"""The fleet's tracker: Debian's opentracker run with the role's configuration, fed the
whitelist `tts-mirror tracker-whitelist` writes from a real mirror.

The configuration is the role's template as shipped, rendered with jinja2; only its
`tracker.rootdir` line is pointed at the test's directory (the unit's is
/var/lib/tts-tracker). Announces are plain HTTP GETs, as aria2 sends them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import jinja2
import pytest

from mirror.publish import publish_dir
from mirror.remote import Mirror
from mirror.signing import generate_keypair
from tests.s3servers import free_port

OPENTRACKER = shutil.which("opentracker")
ROLE = Path(__file__).resolve().parent.parent / "ansible/roles/tts_tracker"
pytestmark = pytest.mark.skipif(OPENTRACKER is None, reason="opentracker missing: run scripts/setup.sh (Debian package opentracker)")
NOT_AUTHORIZED = b"not authorized"


def render_config(rootdir: Path, port: int) -> str:
    template = jinja2.Template((ROLE / "templates/tracker.conf.j2").read_text())
    text = template.render(ansible_managed="test", tts_tracker_listen=[f"127.0.0.1:{port}"])
    assert "tracker.rootdir /var/lib/tts-tracker" in text and "access.whitelist whitelist.txt" in text
    return text.replace("tracker.rootdir /var/lib/tts-tracker", f"tracker.rootdir {rootdir}")


def announce(port: int, btih: str) -> bytes:
    query = urllib.parse.urlencode({"info_hash": bytes.fromhex(btih), "peer_id": b"-AR1360-tts-fleet-01",
                                    "port": 6881, "uploaded": 0, "downloaded": 0, "left": 1, "compact": 1})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/announce?{query}", timeout=10) as response:
        return response.read()


@pytest.fixture
def tracker():
    # Its own directory under /tmp: pytest's tmp_path sits below 0700 directories the
    # tracker's unprivileged user cannot enter.
    rootdir = Path(tempfile.mkdtemp(prefix="tts-tracker-", dir="/tmp"))
    os.chmod(rootdir, 0o755)
    (rootdir / "whitelist.txt").write_text("")
    port = free_port()
    conf = rootdir / "tracker.conf"
    conf.write_text(render_config(rootdir, port))
    command = [OPENTRACKER, "-f", str(conf)]
    if os.geteuid() == 0:
        try:  # as the unit runs it: the package's unprivileged user
            pwd.getpwnam("_opentracker")
            shutil.chown(rootdir, "_opentracker")
            command = ["setpriv", "--reuid=_opentracker", "--regid=_opentracker", "--clear-groups", *command]
        except KeyError:
            pass
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        for _ in range(300):  # bounded: until it listens, exits or 30 s pass
            assert proc.poll() is None, f"opentracker exited: {proc.stderr.read().decode(errors='replace')}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "opentracker did not listen within 30 s"
                time.sleep(0.1)
        yield proc, rootdir, port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(rootdir, ignore_errors=True)


def test_tracker_serves_published_info_hashes_only(tracker, s3_server, bucket, tmp_path) -> None:
    proc, rootdir, port = tracker
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    generate_keypair(tmp_path / "sign.key", tmp_path / "sign.pub")
    mirror = Mirror.connect(s3_server.endpoint, bucket, s3_server.credentials)
    publish_dir(model, name="joe", version="1.0", mirror=mirror, signing_key=tmp_path / "sign.key")
    btih = mirror.manifest("joe", "1.0")[0].file("weights.bin").btih
    assert btih

    # Not on the whitelist yet: refused.
    assert NOT_AUTHORIZED in announce(port, btih)

    env = {**os.environ, "TTS_MIRROR_ENDPOINT": s3_server.endpoint, "TTS_MIRROR_BUCKET": bucket,
           "TTS_MIRROR_CREDENTIALS": str(s3_server.write_credentials(tmp_path / "creds.toml"))}
    out = subprocess.run([str(Path(sys.executable).parent / "tts-mirror"), "tracker-whitelist", "--out",
                          str(rootdir / "whitelist.txt")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (rootdir / "whitelist.txt").read_text() == btih + "\n"
    proc.send_signal(signal.SIGHUP)  # what `systemctl reload tts-tracker` sends

    # The reload is asynchronous: poll (bounded) until the tracker answers with peers.
    deadline, answer = time.monotonic() + 30, b""
    for _ in range(300):
        answer = announce(port, btih)
        if NOT_AUTHORIZED not in answer or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert NOT_AUTHORIZED not in answer and b"peers" in answer, answer
    # Anything else stays refused.
    assert NOT_AUTHORIZED in announce(port, "f" * 40)
