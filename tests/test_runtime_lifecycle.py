"""Runtime lifecycle: readiness gate on the cache, sd_notify, hot swap, failed loads,
reload/SIGHUP, deadlines, socket activation and config errors - real process, real voice."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from provisioner.status import ModelStatus, ProvisionerStatus
from tts_testkit.paths import VENV_BIN
from tts_testkit.runtime_server import publish_to_cache, start_server, write_config

pytestmark = pytest.mark.integration


class NotifyListener:
    """A NOTIFY_SOCKET datagram socket, read continuously as systemd does (a sender
    blocks once a unix datagram queue is full)."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def drain(self) -> list[str]:
        time.sleep(0.05)
        return list(self.messages)

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in m for m in self.drain()):
                return True
        return False


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_gate_waits_for_cache_then_serves_and_hot_swaps(tmp_path, bundle_dir):
    bundle = bundle_dir
    cache = tmp_path / "cache"
    prov = tmp_path / "srv" / "prov"
    status = ProvisionerStatus(state="syncing")
    status.models["joe"] = ModelStatus(wanted_version="1.0.0", state="downloading", files_done=2, files_total=3)
    status.write(prov)
    notify = NotifyListener(tmp_path / "notify.sock")
    # deadline_s stays at its default (60 s): every request here must succeed on any machine;
    # the deadline itself is tested by mechanism in test_deadline_is_504_and_the_job_is_dropped.
    srv = start_server(tmp_path / "srv", cache, extra_env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"},
                       max_batch_size=4, queue_size=16)
    try:
        srv.wait_socket()
        assert stat.S_IMODE(srv.socket.stat().st_mode) == 0o660
        with srv.client() as c:
            r = c.get("/readyz")
            assert r.status_code == 503
            assert r.json()["reason"] == "waiting for model cache: joe 1.0.0 2 of 3 files"
            busy = c.post("/v1/synthesize", json={"text": "Too early."})
            assert busy.status_code == 503 and "Retry-After" in busy.headers
            assert c.get("/healthz").status_code == 200
            assert not any("READY=1" in m for m in notify.drain())
            # the watchdog pings while the worker is alive, ready or not
            assert notify.wait_for("WATCHDOG=1", 30)

            # the provisioner finishes: the runtime notices by filesystem event, loads, says READY
            publish_to_cache(cache, "joe", "1.0.0", bundle)
            srv.wait_ready(90)
            assert notify.wait_for("READY=1", 30)
            assert c.post("/v1/synthesize", json={"text": "Now it works."}).status_code == 200

            # hot swap while requests keep flowing: none fails
            results: list[int] = []
            stop = threading.Event()

            def hammer():
                with srv.client() as hc:
                    while not stop.is_set() and len(results) < 200:
                        results.append(hc.post("/v1/synthesize", json={"text": "Swap test."}).status_code)

            t = threading.Thread(target=hammer)
            t.start()
            try:
                # requests flow before, during and after the swap, counted rather than timed
                _wait(lambda: len(results) >= 1, 60, "a first request before the swap")
                publish_to_cache(cache, "joe", "1.1.0", bundle)
                _wait(lambda: c.get("/v1/status").json()["models"]["joe"]["version"] == "1.1.0", 60, "swap to 1.1.0")
                after_swap = len(results)
                _wait(lambda: len(results) >= min(after_swap + 3, 200), 60, "requests after the swap")
            finally:
                stop.set()
                t.join(timeout=60)
            assert results and set(results) == {200}, results

            # a version that fails to load keeps the old one serving, and says so
            broken = tmp_path / "broken"
            shutil.copytree(bundle, broken)
            (broken / "model.safetensors").write_bytes(b"not a safetensors file" * 100)
            publish_to_cache(cache, "joe", "2.0.0", broken)
            st = _wait(lambda: (s := c.get("/v1/status").json())["models"]["joe"]["last_error"] and s, 30, "failed load")
            assert st["models"]["joe"]["version"] == "1.1.0"
            assert "2.0.0" in st["models"]["joe"]["last_error"]
            assert st["ready"] is True
            assert c.post("/v1/synthesize", json={"text": "Old model still serving."}).status_code == 200

            # rollback + POST /v1/reload: back to 1.0.0
            from provisioner.cache import CacheWriter

            CacheWriter(cache).set_current("joe", "1.0.0")
            reload = c.post("/v1/reload", timeout=60).json()
            assert reload["finished"] is True
            _wait(lambda: c.get("/v1/status").json()["models"]["joe"]["version"] == "1.0.0", 30, "rollback")
            assert c.get("/v1/status").json()["models"]["joe"]["last_error"] is None

            # SIGHUP triggers the same re-check
            srv.process.send_signal(signal.SIGHUP)
            _wait(lambda: "SIGHUP" in srv.log(), 10, "SIGHUP log line")
            assert c.get("/readyz").status_code == 200
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-2000:]
    assert not srv.socket.exists()  # removed on a clean stop
    assert "Traceback" not in srv.log()
    assert notify.wait_for("STOPPING=1", 2)
    notify.close()


def test_deadline_is_504_and_the_job_is_dropped(voice_cache, tmp_path):
    """A request still queued at its deadline is answered 504 and never synthesized. The
    worker is held (no batch starts), so no machine is fast enough to beat the deadline."""
    srv = start_server(tmp_path / "srv", voice_cache, deadline_s=1, max_batch_size=4, queue_size=16)
    try:
        srv.wait_ready()
        with srv.client() as c:
            served = c.get("/v1/status").json()["sentences_served"]
            with srv.held():
                started = time.monotonic()
                late = c.post("/v1/synthesize", json={"text": "This one is late. So is this."})
                waited = time.monotonic() - started
                assert late.status_code == 504, late.text
                assert late.json()["detail"] == "synthesis did not finish within the deadline"
                assert waited >= 1.0  # the deadline, not an early refusal
                # a stream whose first audio cannot come in time is a 504 too, never a 200 (native
                # and OpenAI, streamed and whole): the status line waits for the first audio
                for path, body in (("/v1/synthesize", {"text": "Streamed and late.", "stream": True}),
                                   ("/v1/audio/speech", {"input": "Late mp3.", "voice": "alloy"}),
                                   ("/v1/audio/speech", {"input": "Late flac.", "voice": "alloy",
                                                         "response_format": "flac"})):
                    r = c.post(path, json=body)
                    assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded", (path, r.text)
            # released: the worker drops the dead jobs instead of synthesizing them
            st = _wait(lambda: (s := c.get("/v1/status").json())["queue"]["depth"] == 0 and s, 30, "queue drained")
            assert st["sentences_served"] == served and st["worker_alive"] and st["queue"]["held"] is False
            assert c.get("/readyz").status_code == 200
    finally:
        assert srv.stop() == 0, srv.log()[-2000:]
    assert "Traceback" not in srv.log()


def test_socket_activation(voice_cache, tmp_path):
    activator = shutil.which("systemd-socket-activate")
    if activator is None:
        pytest.skip("systemd-socket-activate is not installed")
    activated = tmp_path / "activated.sock"
    cfg = write_config(tmp_path / "rt.toml", socket_path=str(tmp_path / "unused.sock"), cache_dir=str(voice_cache),
                       provisioner_runtime_dir=str(tmp_path / "prov"), device="cpu")
    log = open(tmp_path / "log", "wb")
    proc = subprocess.Popen([activator, "-l", str(activated), "-E", "TTS_LOG_FORMAT=json",
                             str(VENV_BIN / "tts-runtime"), "serve", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(activated.exists, 10, "activated socket")
        # the first connection starts the service; it answers on the socket it was handed
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(activated)), base_url="http://t", timeout=60) as c:
            assert c.get("/healthz").status_code == 200
            _wait(lambda: c.get("/readyz").status_code == 200, 60, "ready")
            assert c.post("/v1/synthesize", json={"text": "Activated."}).status_code == 200
        assert not (tmp_path / "unused.sock").exists()
        assert "using sockets from systemd" in (tmp_path / "log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.mark.parametrize("content,needle", [
    ("socket_path = 5\n", "socket_path"),
    ("bogus_key = 1\n", "bogus_key: unknown key"),
    ("max_batch_size = 0\n", "max_batch_size"),
    ("device = \"tpu\"\n", "device"),
    ("models = [\"../x\"]\n", "models"),
    ("this is not toml", "not valid TOML"),
])
def test_config_errors_exit_2_naming_the_key(tmp_path, content, needle):
    cfg = tmp_path / "rt.toml"
    cfg.write_text(content)
    r = subprocess.run([str(VENV_BIN / "tts-runtime"), "serve", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_refuses_a_live_socket_and_replaces_a_stale_one(voice_cache, tmp_path):
    from runtime.cli import ServeError, unix_socket

    path = tmp_path / "x.sock"
    live = unix_socket(path)
    with pytest.raises(ServeError, match="already listening"):
        unix_socket(path)
    live.close()  # the file stays behind, as after a crash
    assert path.exists()
    again = unix_socket(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    again.close()


def test_reload_waits_for_one_pass_not_for_the_safety_net_recheck(tmp_path, bundle_dir, monkeypatch):
    """POST /v1/reload (and so the health gate's `tts-ctl check --reload`) waits for the first
    pass that begins after the request. On an idle manager that is the pass the request
    starts; waiting for one more pass meant waiting for the safety-net re-check (RECHECK_S,
    30 s; an hour here, so only the fix lets wait_cycle return before its safety timeout)."""
    from provisioner.cache import CacheWriter
    from runtime import models
    from runtime.config import load_config

    monkeypatch.setattr(models, "RECHECK_S", 3600.0)
    bundle = bundle_dir
    cache = tmp_path / "cache"
    publish_to_cache(cache, "joe", "1.0.0", bundle, set_current=False)
    publish_to_cache(cache, "joe", "1.1.0", bundle)
    config = load_config(write_config(tmp_path / "runtime.toml", socket_path=str(tmp_path / "rt.sock"),
                                      cache_dir=str(cache), provisioner_runtime_dir=str(tmp_path / "prov"),
                                      device="cpu"))
    manager = models.ModelManager(config)
    manager.start()
    try:
        assert manager.wait_cycle(0, 120) and manager.ready  # the first pass loaded 1.1.0
        for _ in range(3):  # idle each time: nothing changed, one pass answers
            assert manager.wait_cycle(manager.request_reload(), 60)
        CacheWriter(cache).set_current("joe", "1.0.0")  # a rollback: the answer already has it
        assert manager.wait_cycle(manager.request_reload(), 60)
        assert manager.describe()["joe"]["version"] == "1.0.0"
    finally:
        manager.stop()


def test_a_version_that_fails_to_load_is_not_retried_on_every_cache_event(tmp_path, monkeypatch):
    """A broken version named by current/ is loaded once, then again only when the snapshot
    itself changes, when an operator asks (reload), or after a backoff - not on every event in
    the watched directories: the provisioner rewrites its status file about once a second
    during a download, and each rewrite used to load the broken version again. Each step waits
    for the manager's pass count, not for time; the backoff is an hour here so that only the
    events could cause a retry."""
    from provisioner.cache import CacheWriter
    from runtime import models
    from runtime.config import load_config

    monkeypatch.setattr(models, "RECHECK_S", 3600.0)
    monkeypatch.setattr(models, "LOAD_RETRY_BASE_S", 3600.0)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.safetensors").write_bytes(b"not weights" * 100)
    cache = tmp_path / "cache"
    snap = publish_to_cache(cache, "joe", "2.0.0", bundle)
    prov = tmp_path / "prov"
    prov.mkdir()
    config = load_config(write_config(tmp_path / "runtime.toml", socket_path=str(tmp_path / "rt.sock"),
                                      cache_dir=str(cache), provisioner_runtime_dir=str(prov), device="cpu"))
    attempts: list[str] = []

    def broken(snapshot):
        attempts.append(snapshot.version)
        raise RuntimeError("this version does not load")

    manager = models.ModelManager(config, loader=broken)
    manager.start()
    try:
        assert manager.wait_cycle(0, 120) and attempts == ["2.0.0"]
        for i in range(5):  # what the provisioner's status writes look like to the watcher
            passes = manager._cycles
            (prov / "status.json").write_text(f'{{"syncs_completed": {i}}}\n')
            assert manager.wait_cycle(passes, 60)  # a pass ran for that event
        assert attempts == ["2.0.0"], attempts
        assert manager.failed_version("joe") == "2.0.0"

        # The provisioner repairs the snapshot (a file re-linked) and says so in its status.
        writer = CacheWriter(cache)
        repaired = tmp_path / "repaired"
        shutil.copyfile(bundle / "model.safetensors", repaired)
        writer.add_blob(repaired, "f" * 64)
        writer.replace_snapshot_file(snap, "model.safetensors", "f" * 64)
        passes = manager._cycles
        (prov / "status.json").write_text('{"syncs_completed": 9}\n')
        assert manager.wait_cycle(passes, 60) and attempts == ["2.0.0", "2.0.0"], attempts

        assert manager.wait_cycle(manager.request_reload(), 60)  # an operator's reload retries at once
        assert attempts == ["2.0.0"] * 3, attempts
    finally:
        manager.stop()

