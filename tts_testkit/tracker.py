"""A real opentracker for tests, configured by the tts_tracker role's template."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import jinja2

from tts_testkit.paths import REPO
from tts_testkit.s3servers import free_port

OPENTRACKER = shutil.which("opentracker")
ROLE = REPO / "ansible/roles/tts_tracker"
NOT_AUTHORIZED = b"not authorized"


def render_config(rootdir: Path, port: int) -> str:
    """The role's template as shipped; only tracker.rootdir points at the test's dir."""
    template = jinja2.Template((ROLE / "templates/tracker.conf.j2").read_text())
    text = template.render(ansible_managed="test", tts_tracker_listen=[f"127.0.0.1:{port}"])
    assert "tracker.rootdir /var/lib/tts-tracker" in text and "access.whitelist whitelist.txt" in text
    return text.replace("tracker.rootdir /var/lib/tts-tracker", f"tracker.rootdir {rootdir}")


def announce(port: int, btih: str) -> bytes:
    # Percent-encode every byte, as BitTorrent clients do: urlencode's quote_plus would
    # send a 0x20 byte of the info-hash as "+", which the tracker takes literally.
    query = urllib.parse.urlencode({"info_hash": bytes.fromhex(btih), "peer_id": b"-AR1360-tts-fleet-01",
                                    "port": 6881, "uploaded": 0, "downloaded": 0, "left": 1, "compact": 1},
                                   quote_via=urllib.parse.quote, safe="")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/announce?{query}", timeout=10) as response:
        return response.read()


@dataclass
class Tracker:
    proc: subprocess.Popen
    rootdir: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/announce"

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)  # what `systemctl reload tts-tracker` sends

    def allow(self, hashes: list[str], timeout: float = 30) -> None:
        """Whitelist these info-hashes and wait (bounded) until the tracker serves them."""
        (self.rootdir / "whitelist.txt").write_text("".join(h + "\n" for h in hashes))
        self.reload()
        self.wait_served(hashes, timeout)

    def wait_served(self, hashes: list[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout * 10)):  # the reload is asynchronous
            if all(NOT_AUTHORIZED not in announce(self.port, h) for h in hashes):
                return
            assert time.monotonic() < deadline, f"tracker did not serve {hashes} within {timeout} s"
            time.sleep(0.1)
        raise AssertionError(f"tracker did not serve {hashes}")


@contextlib.contextmanager
def run_tracker():
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
        yield Tracker(proc, rootdir, port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(rootdir, ignore_errors=True)
