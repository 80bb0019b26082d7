"""The daemon: SIGHUP syncs, the cache watcher notices and repairs damage, config errors exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from provisioner.cache import CacheReader
from tests.provisioner_helpers import BIN, run_cli, stop, wait_status
from tts_testkit.provisioner_setup import make_keys, model_files, publish_raw, write_config

pytestmark = pytest.mark.integration

SIZES = {"model.safetensors": 2_000_000, "voice.json": 1_000, "card.md": 300}


@pytest.fixture
def daemon(tmp_path, s3_server, bucket):
    keys = make_keys(tmp_path)
    creds = s3_server.write_credentials(tmp_path / "creds.toml")
    mirror = dict(name="primary", endpoint=s3_server.endpoint, bucket=bucket, credentials_file=creds)
    config = write_config(tmp_path, [mirror], keys, extra="", )
    config.write_text(config.read_text().replace("poll_interval = 1", "poll_interval = 3600"))
    client = s3_server.client()
    files = model_files(1, SIZES)
    publish_raw(client, bucket, "joe", "1.0.0", files, keys)
    proc = subprocess.Popen([str(BIN / "tts-provisioner"), "--config", str(config), "run"],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, TTS_LOG_FORMAT="json"))
    status = tmp_path / "run" / "status.json"
    ctx = dict(proc=proc, status=status, files=files, client=client, bucket=bucket, keys=keys,
               cache=CacheReader(tmp_path / "cache"), config=config)
    try:
        wait_status(status, lambda s: s.get("pid") == proc.pid and s.get("ready"))
        yield ctx
    finally:
        stop(proc)


def test_sighup_and_sync_command_trigger_a_pass(daemon):
    publish_raw(daemon["client"], daemon["bucket"], "joe", "2.0.0", model_files(2, SIZES), daemon["keys"])
    # `tts-provisioner sync` finds the daemon holding the cache, signals it and follows.
    result = run_cli("sync", config=daemon["config"], timeout=60)
    assert result.returncode == 0, result.stderr
    assert "asked the running daemon" in result.stderr
    assert daemon["cache"].current("joe").version == "2.0.0"


def test_deleted_blob_is_restored(daemon):
    cache = daemon["cache"]
    snap = cache.current("joe")
    sha = snap.manifest().file("voice.json").sha256
    cache.blob_path(sha).unlink()
    deadline = time.monotonic() + 20
    while not cache.blob_path(sha).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cache.blob_path(sha).read_bytes() == daemon["files"]["voice.json"]
    assert daemon["proc"].poll() is None


def test_edited_blob_marks_snapshot_damaged_then_repairs_from_mirror(daemon):
    cache = daemon["cache"]
    snap = cache.current("joe")
    sha = snap.manifest().file("model.safetensors").sha256
    blob = cache.blob_path(sha)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:  # flip bytes in place: snapshot and blob share the inode
        f.seek(1000)
        f.write(b"\xff" * 64)
    seen_damaged = wait_status(daemon["status"], lambda s: s["models"]["joe"]["state"] == "damaged"
                               or "DAMAGED" in s.get("message", ""), timeout=20)
    assert seen_damaged
    wait_status(daemon["status"], lambda s: s["models"]["joe"]["state"] == "ok", timeout=30)
    assert cache.check_snapshot(cache.current("joe"), full_hash=True) == []
    assert (cache.current("joe").path / "model.safetensors").read_bytes() == daemon["files"]["model.safetensors"]


def test_sigterm_stops_daemon_and_aria2c(daemon):
    proc = daemon["proc"]
    aria2_pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                  and _ppid(p) == proc.pid and "aria2c" in _cmd(p)]
    assert len(aria2_pids) == 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "provisioner stopped" in err
    assert not Path(f"/proc/{aria2_pids[0]}").exists() or _state(aria2_pids[0]) == "Z"
    assert json.loads(daemon["status"].read_text())["state"] == "stopped"


def _ppid(proc_dir: Path) -> int:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _cmd(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


@pytest.mark.parametrize("snippet,expected", [
    ("bogus_key = 1", "bogus_key: unknown key"),
    ('keep_snapshots = "three"', "keep_snapshots: Input should be a valid integer"),
    ("log_level = 3", "log_level: Input should be a valid string"),
])
def test_config_errors_name_the_key_and_exit_2(tmp_path, snippet, expected):
    creds = tmp_path / "c.toml"
    config = write_config(tmp_path, [dict(name="m", endpoint="http://127.0.0.1:1", bucket="b",
                                          credentials_file=creds)], None, extra=snippet)
    for command in ("status", "sync", "run"):
        result = run_cli(command, config=config)
        assert result.returncode == 2, (command, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr


def test_missing_config_file_is_a_clear_error(tmp_path):
    result = run_cli("status", config=tmp_path / "nope.toml")
    assert result.returncode == 2 and "cannot read config" in result.stderr


def test_world_readable_credentials_are_refused(tmp_path, s3_server, bucket):
    creds = s3_server.write_credentials(tmp_path / "creds.toml")
    os.chmod(creds, 0o644)
    config = write_config(tmp_path, [dict(name="m", endpoint=s3_server.endpoint, bucket=bucket,
                                          credentials_file=creds)], None)
    result = run_cli("sync", config=config)
    assert result.returncode == 1 and "chmod 600" in result.stderr
    assert s3_server.credentials.secret_key not in result.stderr


def test_wrong_credentials_are_named_as_such(tmp_path, s3_server, bucket):
    from mirror.s3 import Credentials

    creds = tmp_path / "creds.toml"
    Credentials(s3_server.credentials.access_key, "not-the-secret").write(creds)
    config = write_config(tmp_path, [dict(name="m", endpoint=s3_server.endpoint, bucket=bucket,
                                          credentials_file=creds)], None)
    result = run_cli("sync", config=config)
    assert result.returncode == 1
    assert "rejected the credentials" in result.stderr
    assert "not-the-secret" not in result.stderr


def test_a_one_shot_command_holding_the_cache_is_not_signalled(tmp_path):
    """`sync` and `rollback` ask a running daemon (SIGHUP) when it holds the cache lock. When a
    one-shot command holds it instead (another `sync`, `gc`, `rollback`), a SIGHUP would end
    that command: they refuse with one line, signal nothing, and leave no hold behind. The
    lock holder here is a child process that takes the cache lock and waits."""
    from provisioner.cache import CacheWriter
    from tts_testkit.runtime_server import publish_to_cache

    config = write_config(tmp_path, [dict(name="m", endpoint="http://127.0.0.1:9", bucket="b",
                                          credentials_file=tmp_path / "none.toml")], None)
    cache = tmp_path / "cache"
    bundle = tmp_path / "files"
    bundle.mkdir()
    (bundle / "weights.bin").write_bytes(b"w" * 1000)
    publish_to_cache(cache, "joe", "1.0.0", bundle)
    publish_to_cache(cache, "joe", "2.0.0", bundle)
    holder = subprocess.Popen(
        [str(BIN / "python"), "-c",
         "import sys, time; from provisioner.daemon import CacheLock; CacheLock(sys.argv[1]).acquire(); "
         "print('locked', flush=True); time.sleep(600)", str(cache)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (("sync",), ("rollback", "joe", "1.0.0")):
            result = run_cli(*args, config=config)
            assert result.returncode == 1, (args, result.stderr)
            assert f"another tts-provisioner command (pid {holder.pid}) holds the cache lock" in result.stderr
            assert holder.poll() is None, f"{args} signalled the lock holder"
        assert not (cache / "holds" / "joe.json").exists()  # the refused rollback left no hold
        assert CacheWriter(cache).current("joe").version == "2.0.0"
    finally:
        holder.kill()
        holder.wait()
