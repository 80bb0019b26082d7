"""The daemons' systemd protocol, end to end, without systemd as PID 1.

The provisioner runs against a real S3 server (nanio) with a NOTIFY_SOCKET listener;
the runtime is started by `systemd-socket-activate` exactly as tts-runtime.socket would
start it (the first connection spawns it, the listening socket arrives as fd 3). The
listener checks the world at the instant each datagram arrives, so "READY only after
the cache is complete" is checked at READY time, not afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from provisioner.cache import CacheReader
from tests.ops_helpers import NotifyListener
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


def _stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


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
        _stop(proc)
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
                _stop(proc)
        rt_notify.close()
        prov_notify.close()
        rt_log.close()


def _readyz(client: httpx.Client) -> int | None:
    try:
        return client.get("/readyz", timeout=30).status_code
    except httpx.HTTPError:
        return None
