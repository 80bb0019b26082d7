"""The daemons' systemd protocol, end to end, without systemd as PID 1.

The provisioner runs against a real S3 server (nanio) with a NOTIFY_SOCKET listener;
the runtime is started by `systemd-socket-activate` exactly as tts-runtime.socket would
start it (the first connection spawns it, the listening socket arrives as fd 3). The
listener checks the world at the instant each datagram arrives, so "READY only after
the cache is complete" is checked at READY time, not afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from provisioner.cache import CacheReader
from tests.ops_helpers import NotifyListener
from tests.provisioner_helpers import stop
from tts_testkit.paths import VENV_BIN
from tts_testkit.provisioner_setup import make_keys, model_files, publish_raw, write_config
from tts_testkit.waits import wait_until

pytestmark = pytest.mark.integration

ACTIVATE = shutil.which("systemd-socket-activate")


def _complete(cache: Path, name: str) -> str | None:
    """The version `current/<name>` points at if that snapshot is COMPLETE, else None."""
    snap = CacheReader(cache).current(name)
    return snap.version if snap is not None and snap.complete else None


def _mirror_config(tmp: Path, s3_server, bucket: str, keys, **kw) -> Path:
    creds = s3_server.write_credentials(tmp / "mirror-primary.toml")
    return write_config(tmp, [{"name": "primary", "endpoint": s3_server.endpoint, "bucket": bucket,
                               "credentials_file": str(creds)}], keys, **kw)


def _start_provisioner(config: Path, notify_path: Path, log: Path, watchdog_usec: int) -> subprocess.Popen:
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC=str(watchdog_usec),
               TTS_LOG_FORMAT="json")
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen([str(VENV_BIN / "tts-provisioner"), "--config", str(config), "run"],
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def test_provisioner_ready_only_after_cache_complete(tmp_path, s3_server, bucket):
    keys = make_keys(tmp_path)
    config = _mirror_config(tmp_path, s3_server, bucket, keys)
    cache = tmp_path / "cache"
    notify = NotifyListener(tmp_path / "notify.sock", on_message=lambda f: _complete(cache, "joe"))
    log = tmp_path / "provisioner.log"
    proc = _start_provisioner(config, notify.path, log, watchdog_usec=1_000_000)
    try:
        # Nothing is published yet: the daemon must say why and must not claim READY.
        notify.wait_for("STATUS", timeout=30)
        wait_until(lambda: any("not ready" in s for s in notify.statuses()), 30, what="a 'not ready' STATUS")
        assert not notify.find("READY"), "READY=1 before any model was published"
        assert proc.poll() is None, log.read_text()[-2000:]

        files = model_files(7, {"model.safetensors": 3 * 1024 * 1024, "config.json": 2048, "voice/extra.bin": 700_000})
        publish_raw(s3_server.client(), bucket, "joe", "1.0.0", files, keys)
        # The failed first pass backs off for about a second (poll_interval = 1); SIGHUP
        # asks for a pass now, which is what `systemctl reload` sends.
        proc.send_signal(signal.SIGHUP)
        ready = notify.wait_for("READY", "1", timeout=60)[0]
        assert ready.observed == "1.0.0", "READY=1 arrived before current/joe was a COMPLETE snapshot"
        assert ready.fields.get("STATUS", "").startswith("ready"), ready.fields
        assert len(notify.find("READY")) == 1
        # Every file really is there and verified.
        snap = CacheReader(cache).current("joe")
        assert snap is not None and not CacheReader(cache).check_snapshot(snap, full_hash=True)

        # WatchdogSec=1s -> WATCHDOG=1 every 0.5 s (watchdog_interval, unit-tested). Here: the
        # pings keep coming while the daemon idles, paced by that interval. Only the lower
        # bound on a gap is causal; how late a loaded machine wakes a thread is not ours to
        # assert, so the 30 s is a safety net.
        before = len(notify.find("WATCHDOG", "1"))
        pings = notify.wait_for("WATCHDOG", "1", timeout=30, count=before + 4)[before:]
        gaps = [b.at - a.at for a, b in zip(pings, pings[1:])]
        assert min(gaps) >= 0.45, f"watchdog pings {gaps} come faster than half of WatchdogSec"

        # STATUS lines are progress, not noise: one names the version it serves.
        assert any("joe 1.0.0" in s for s in notify.statuses()), notify.statuses()

        proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING", "1", timeout=30)
        assert stopping
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
    finally:
        stop(proc)
        notify.close()


@pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate missing (Debian package systemd)")
def test_socket_activated_runtime_waits_for_provisioner(tmp_path, s3_server, bucket, bundle_dir):
    """The whole chain as the units wire it: runtime socket-activated on first connect,
    waiting (not crash-looping) until the provisioner has downloaded the real voice,
    READY only when it can synthesize, synthesis through the activated socket."""
    from tts_testkit.runtime_server import write_config as write_runtime_config

    bundle = bundle_dir
    keys = make_keys(tmp_path)
    config = _mirror_config(tmp_path, s3_server, bucket, keys)
    cache, prov_run = tmp_path / "cache", tmp_path / "run"
    sock = tmp_path / "tts" / "runtime.sock"
    sock.parent.mkdir()
    rt_config = write_runtime_config(tmp_path / "runtime.toml", socket_path=str(tmp_path / "unused.sock"),
                                     cache_dir=str(cache), provisioner_runtime_dir=str(prov_run),
                                     models=["joe"], device="cpu", threads=1)
    rt_notify = NotifyListener(tmp_path / "rt-notify.sock", on_message=lambda f: _complete(cache, "joe"))
    prov_notify = NotifyListener(tmp_path / "prov-notify.sock")
    rt_log = (tmp_path / "runtime.log").open("wb")
    env = {"NOTIFY_SOCKET": str(rt_notify.path), "WATCHDOG_USEC": "2000000", "TTS_LOG_FORMAT": "json",
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    activate = subprocess.Popen(
        [ACTIVATE, "-l", str(sock), *[f"-E{k}={v}" for k, v in env.items()],
         str(VENV_BIN / "tts-runtime"), "serve", "--config", str(rt_config)],
        stdout=rt_log, stderr=subprocess.STDOUT)
    prov = None
    try:
        wait_until(sock.exists, 10, what="the activation socket")
        client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://tts", timeout=30)
        # First connection spawns the runtime (socket activation); it answers on fd 3.
        wait_until(lambda: _readyz(client) is not None, 60, interval=0.3, what="runtime answering on fd 3")
        assert _readyz(client) == 503
        rt_notify.wait_for("STATUS", timeout=30)
        assert not rt_notify.find("READY"), "runtime claimed READY with an empty cache"
        assert activate.poll() is None, "runtime exited instead of waiting for the cache"

        # Publish the real voice and start the provisioner: it downloads, verifies, READY.
        files = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
        publish_raw(s3_server.client(), bucket, "joe", "1.0.0", files, keys)
        prov = _start_provisioner(config, prov_notify.path, tmp_path / "provisioner.log", 10_000_000)
        prov_ready = prov_notify.wait_for("READY", "1", timeout=120)[0]

        ready = rt_notify.wait_for("READY", "1", timeout=180)[0]
        assert ready.observed == "1.0.0", "runtime READY before the cache was complete"
        assert ready.at >= prov_ready.at, "runtime READY before the provisioner's READY"
        assert _readyz(client) == 200
        pings = rt_notify.wait_for("WATCHDOG", "1", timeout=30, count=2)
        assert pings

        r = client.post("/v1/audio/speech", json={"model": "tts-1", "input": "Socket activation works.",
                                                  "voice": "joe", "response_format": "wav"}, timeout=120)
        assert r.status_code == 200 and r.content[:4] == b"RIFF", r.text[:300]
        client.close()

        activate.send_signal(signal.SIGTERM)  # systemd-socket-activate exec()s the daemon: same pid
        rt_notify.wait_for("STOPPING", "1", timeout=30)
        assert activate.wait(timeout=30) == 0
    finally:
        for proc in (activate, prov):
            if proc is not None:
                stop(proc)
        rt_notify.close()
        prov_notify.close()
        rt_log.close()


def _readyz(client: httpx.Client) -> int | None:
    try:
        return client.get("/readyz", timeout=30).status_code
    except httpx.HTTPError:
        return None


# -- a restart behind a socket that systemd holds ------------------------------------------

# Puts the held listening socket at fd 3 with LISTEN_FDS/LISTEN_PID for this pid, as systemd
# does, then exec()s systemd-socket-activate, which passes it on to the runtime once a
# connection waits on it (sd_listen_fds: "file descriptors ... will be passed through").
_AS_SYSTEMD = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
               "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); os.execv(sys.argv[2], sys.argv[2:])")


def _raw_request(sock_path: Path, body: bytes) -> socket.socket:
    """Connect and send a whole synthesis request without waiting for any answer."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(180)
    conn.connect(str(sock_path))  # completes at once: the kernel queues it in the backlog
    conn.sendall(b"POST /v1/synthesize HTTP/1.1\r\nHost: tts\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    return conn


def _read_answer(conn: socket.socket) -> tuple[int, bytes, float]:
    """(status, body, monotonic time the first byte of the answer arrived)."""
    data, first = b"", None
    with conn:
        while True:
            chunk = conn.recv(65536)
            if first is None:
                first = time.monotonic()
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, body, first or time.monotonic()


@pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate missing (Debian package systemd)")
def test_restart_behind_a_held_socket_is_invisible_to_clients(tmp_path, voice_cache):
    """What `systemctl restart tts-runtime` does to a client: the socket stays open (this
    test holds it, as systemd does), the runtime stops, a client connects and sends its
    request, a new runtime is activated by that waiting connection. The client must get
    audio, not 503 "loading": the new runtime accepts only after its first look at the cache
    (READY=1 comes first). A `tts-ctl synth` started in the same window succeeds too."""
    from tts_testkit.runtime_server import write_config as write_runtime_config

    sock_path = tmp_path / "runtime.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(256)  # tts-runtime.socket's Backlog=
    rt_config = write_runtime_config(tmp_path / "runtime.toml", socket_path=str(tmp_path / "unused.sock"),
                                     cache_dir=str(voice_cache), provisioner_runtime_dir=str(tmp_path / "prov"),
                                     models=["joe"], device="cpu", threads=1)
    notify = NotifyListener(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(notify.path), "TTS_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1"}
    logs = []

    def activate() -> subprocess.Popen:
        log = (tmp_path / f"runtime-{len(logs)}.log").open("wb")
        logs.append(log)
        return subprocess.Popen([sys.executable, "-c", _AS_SYSTEMD, str(listener.fileno()), ACTIVATE,
                                 *[f"-E{k}={v}" for k, v in env.items()],
                                 str(VENV_BIN / "tts-runtime"), "serve", "--config", str(rt_config)],
                                pass_fds=(listener.fileno(),), stdout=log, stderr=subprocess.STDOUT)

    body = json.dumps({"text": "Restarted without an error.", "voice": "joe", "format": "wav"}).encode()
    first = second = ctl = None
    try:
        first = activate()
        status, audio, _ = _read_answer(_raw_request(sock_path, body))  # activates the first runtime
        assert status == 200 and audio[:4] == b"RIFF", audio[:300]
        assert len(notify.find("READY", "1")) == 1

        # The stop half of a restart: SIGTERM, a clean exit. The socket stays open.
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
        # Clients arrive while nothing serves the socket.
        waiting = _raw_request(sock_path, body)
        ctl = subprocess.Popen([str(VENV_BIN / "tts-ctl"), "--socket", str(sock_path), "synth",
                                "Also restarted.", "-o", str(tmp_path / "ctl.wav"), "--timeout", "180"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The start half: the waiting connection activates the new runtime.
        second = activate()
        status, audio, answered = _read_answer(waiting)
        assert status == 200 and audio[:4] == b"RIFF", (status, audio[:300], (tmp_path / "runtime-1.log").read_text()[-2000:])
        ready = notify.wait_for("READY", "1", timeout=60, count=2)[1]
        assert ready.at <= answered, "the new runtime answered before it was READY"
        out, err = ctl.communicate(timeout=180)
        assert ctl.returncode == 0, err
        assert (tmp_path / "ctl.wav").read_bytes()[:4] == b"RIFF"
        # Not a 503 anywhere: the new runtime refused nothing.
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock_path)), base_url="http://tts", timeout=60) as c:
            metrics = c.get("/metrics").text
        assert 'tts_requests_total{endpoint="/v1/synthesize",status="503"}' not in metrics, metrics
    finally:
        for proc in (first, second, ctl):
            if proc is not None:
                stop(proc)
        listener.close()
        notify.close()
        for log in logs:
            log.close()
