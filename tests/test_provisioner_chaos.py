"""What an independent fault-injection run found (issue 12), each made to happen by a
mechanism: a corrupted object on the real S3 server, a stale aria2c on partial/, an
aria2c killed while it starts (a wrapper that kills itself once), a disk that fills
while the snapshot is assembled (a real small tmpfs), sizes no model has, a damaged
rollback target. Verdicts never depend on machine speed (docs/testing.md)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mirror import layout
from mirror.manifest import FileEntry, Manifest
from provisioner.cache import KNOWN_BAD_FILE, CacheReader, CacheWriter
from tests.cut_proxy import CuttingProxy
from tests.provisioner_helpers import BIN, events, provisioner_env, run_cli
from tts_testkit.provisioner_setup import model_files, publish_raw, write_config

pytestmark = pytest.mark.integration

SIZES = {"model.safetensors": 3_000_000, "voice.json": 2_000, "card.md": 500}
NO_CUT = 1 << 40  # the counting proxy never cuts and never slows here
FAST = 1 << 40


@pytest.fixture
def env(tmp_path, s3_server, bucket):
    """A cache already serving joe 1.0.0."""
    env = dict(provisioner_env(tmp_path, s3_server, bucket), cache=CacheReader(tmp_path / "cache"))
    env["v1"] = model_files(1, SIZES)
    publish_raw(env["client"], bucket, "joe", "1.0.0", env["v1"], env["keys"])
    assert run_cli("sync", config=env["config"]).returncode == 0
    return env


def status_doc(env) -> dict:
    return json.loads((env["tmp"] / "run" / "status.json").read_text())


# -- 1 + 2: quarantine bounded, known-bad objects not fetched again, the cause in status --------

def test_corrupt_object_is_quarantined_once_not_refetched_and_cleared_when_fixed(env):
    files = model_files(2, SIZES)
    manifest = publish_raw(env["client"], env["bucket"], "joe", "2.0.0", files, env["keys"])
    good = files["model.safetensors"]
    bad = b"Y" * len(good)
    key = layout.object_key("joe", "2.0.0", "model.safetensors")
    env["client"].put_object(Bucket=env["bucket"], Key=key, Body=bad)
    expected = manifest.file("model.safetensors").sha256
    port = int(env["s3"].endpoint.rsplit(":", 1)[1])
    quarantine = env["tmp"] / "cache" / "quarantine"
    with CuttingProxy(port, cut_after=NO_CUT, rate=FAST) as proxy:
        mirror = dict(env["mirror"], endpoint=f"http://127.0.0.1:{proxy.port}")
        config = write_config(env["tmp"], [mirror], env["keys"])
        fetched = []
        for attempt in range(3):
            before = proxy.bytes_down
            result = run_cli("sync", config=config)
            fetched.append(proxy.bytes_down - before)
            assert result.returncode == 1
            cause = (f"checksum mismatch on mirror primary for file model.safetensors (expected sha256 "
                     f"{expected}, {len(good)} bytes; got sha256 {hashlib.sha256(bad).hexdigest()}, "
                     f"{len(bad)} bytes)")
            # The cause, not "no mirror left to try", in stderr and the status file.
            assert cause in result.stderr, result.stderr
            assert "no mirror left" not in result.stderr
            error = status_doc(env)["models"]["joe"]["error"]
            assert cause in error
            assert [e["error"] for e in events(result.stderr, "sync failed")] == [error]
            copies = sorted(p.name for p in quarantine.iterdir() if p.name != KNOWN_BAD_FILE)
            assert copies == [expected], copies  # one copy per file, however many passes
            if attempt:
                assert "not fetched again" in error
                assert events(result.stderr, "mirror object known bad, not fetched again")
                assert not events(result.stderr, "checksum mismatch: bytes quarantined")
        # The first pass fetched the bad object; the later ones only metadata (manifest,
        # signature, HEAD): far less than the file.
        assert fetched[0] >= len(bad)
        assert fetched[1] < len(bad) // 10 and fetched[2] < len(bad) // 10, fetched
        record = json.loads((quarantine / KNOWN_BAD_FILE).read_text())[f"primary {key}"]
        assert record["object"]["size"] == len(bad) and record["object"]["etag"]
        assert record["expected_sha256"] == expected

        shown = run_cli("status", config=config, env={"COLUMNS": "1000"})
        assert "checksum mismatch on mirror primary for file model.safetensors" in shown.stdout

        # The object is fixed on the mirror: its identity changes, it is fetched and verifies,
        # and the quarantined copy and the record go.
        env["client"].put_object(Bucket=env["bucket"], Key=key, Body=good)
        result = run_cli("sync", config=config)
        assert result.returncode == 0, result.stderr
    assert env["cache"].current("joe").version == "2.0.0"
    assert list(quarantine.iterdir()) == []


def test_quarantine_is_bounded_in_total_and_by_age(tmp_path):
    cache = CacheWriter(tmp_path / "cache")
    cache.quarantine_max_bytes, cache.quarantine_max_age = 250, 3600
    for i, sha in enumerate(["a" * 64, "b" * 64, "c" * 64]):
        src = tmp_path / f"bad{i}"
        src.write_bytes(b"x" * 100)
        assert cache.quarantine(src, sha) == cache.quarantine_dir / sha
        os.utime(cache.quarantine_dir / sha, (time.time() - 10 + i, time.time() - 10 + i))
    # 300 bytes > 250: the oldest copy went when the third arrived.
    assert sorted(p.name for p in cache.quarantine_dir.iterdir()) == ["b" * 64, "c" * 64]
    big = tmp_path / "big"
    big.write_bytes(b"x" * 251)
    assert cache.quarantine(big, "d" * 64) is None and not big.exists()  # larger than the cap: not kept
    old = cache.quarantine_dir / ("b" * 64)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert cache.trim_quarantine() == 1
    assert [p.name for p in cache.quarantine_dir.iterdir()] == ["c" * 64]
    cache.file_verified("c" * 64)
    assert list(cache.quarantine_dir.iterdir()) == []


# -- 3: never two aria2c processes on one partial/ --------------------------------------------

def _aria2c_on(partial: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if os.path.basename(argv[0]).startswith(b"aria2c") and f"--dir={partial}".encode() in argv \
                    and state != "Z":
                pids.append(int(proc.name))
    return pids


def _proc_fields(pid: int) -> dict[str, str] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)


def _alive(pid: int) -> bool:
    fields = _proc_fields(pid)
    return fields is not None and not fields["State"].startswith(("Z", "X"))


def test_no_second_aria2c_while_the_old_one_lives(env):
    files = model_files(3, {"model.safetensors": 8_000_000, "voice.json": 100, "card.md": 100})
    publish_raw(env["client"], env["bucket"], "joe", "2.0.0", files, env["keys"])
    slow = write_config(env["tmp"], [env["mirror"]], env["keys"], aria2='max_download_limit = "1M"\n')
    partial = env["tmp"] / "cache" / "partial"
    big = hashlib.sha256(files["model.safetensors"]).hexdigest()
    proc = subprocess.Popen([str(BIN / "tts-provisioner"), "--config", str(slow), "sync"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    aria2 = None
    try:
        deadline = time.monotonic() + 60
        while not ((partial / big).exists() and (partial / big).stat().st_size > 1_000_000):
            assert time.monotonic() < deadline, "download never got going"
            time.sleep(0.05)
        (aria2,) = _aria2c_on(partial)
        assert json.loads((partial / ".aria2c.pid").read_text())["pid"] == aria2
        # Stopped, aria2c cannot act on any signal: it stays alive with what it was sent
        # pending, however fast or slow the machine - the window the chaos run hit.
        os.kill(aria2, signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while not _proc_fields(aria2)["State"].startswith("T"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # The parent-death signal was sent as the provisioner died (--stop-with-process
        # alone sends nothing: aria2c polls for its parent).
        fields = _proc_fields(aria2)
        pending = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
        assert pending & (1 << (signal.SIGTERM - 1)), fields

        # A new run finds the recorded aria2c alive and stops it before touching partial/.
        result = run_cli("sync", config=env["config"])
        assert result.returncode == 0, result.stderr
        (stopping,) = events(result.stderr, "an aria2c from an earlier run still holds partial/; stopping it first")
        assert stopping["pid"] == aria2
        assert not _alive(aria2)
    finally:
        if proc.poll() is None:
            proc.kill()
        if aria2 and _alive(aria2):
            os.kill(aria2, signal.SIGKILL)
    assert env["cache"].current("joe").version == "2.0.0"
    assert env["cache"].check_snapshot(env["cache"].current("joe"), full_hash=True) == []
    assert not (partial / ".aria2c.pid").exists()


def test_pid_record_of_a_dead_or_reused_pid_is_ignored(env):
    partial = env["tmp"] / "cache" / "partial"
    # Our own pid (alive, not aria2c) with a start time that is not its own: not killed.
    (partial / ".aria2c.pid").write_text(json.dumps({"pid": os.getpid(), "start_time": 1}))
    publish_raw(env["client"], env["bucket"], "joe", "2.0.0", model_files(4, SIZES), env["keys"])
    result = run_cli("sync", config=env["config"])
    assert result.returncode == 0, result.stderr
    assert not events(result.stderr, "an aria2c from an earlier run still holds partial/; stopping it first")


# -- 4: aria2c killed while it starts ----------------------------------------------------------

def test_aria2c_killed_during_its_start_is_started_again(env, aria2c_path):
    wrapper = env["tmp"] / "aria2c-dies-once"
    mark = env["tmp"] / "died-once"
    # The first start kills itself with SIGKILL before aria2c runs (as a kill during
    # start-up would); later starts exec the real aria2c.
    wrapper.write_text(f"#!/bin/sh\nif [ ! -e {mark} ]; then touch {mark}; kill -9 $$; fi\nexec {aria2c_path} \"$@\"\n")
    wrapper.chmod(0o755)
    config = write_config(env["tmp"], [env["mirror"]], env["keys"], aria2=f'executable = "{wrapper}"\n')
    publish_raw(env["client"], env["bucket"], "joe", "2.0.0", model_files(5, SIZES), env["keys"])
    result = run_cli("sync", config=config)
    assert mark.exists()
    assert result.returncode == 0, result.stderr
    (restart,) = events(result.stderr, "aria2c failed while starting; starting it again")
    assert restart["error"] == "aria2c exited at start with code -9"
    assert env["cache"].current("joe").version == "2.0.0"


# -- 5: ENOSPC while the snapshot is assembled --------------------------------------------------

def test_disk_full_while_the_snapshot_is_assembled_leaves_a_true_status_and_no_staging(env, small_disk):
    disk = small_disk("16M")
    state = env["tmp"] / "tmpfs-state"
    state.mkdir()
    config = write_config(state, [env["mirror"]], env["keys"])
    # The cache on the small tmpfs; status and logs elsewhere (they must not be what fails).
    config.write_text(config.read_text().replace(f'cache_dir = "{state / "cache"}"',
                                                 f'cache_dir = "{disk / "cache"}"'))
    cache = CacheReader(disk / "cache")
    assert run_cli("sync", config=config).returncode == 0

    # The disk fills the moment the last blob lands: blobs fit, the snapshot's manifest
    # (padded to 3 MiB through its free-text `created` field) does not. A filler file
    # leaves exactly download + 2 MiB free, and the pre-check wants download + 1 MiB.
    files = model_files(6, {"model.safetensors": 2_000_000, "voice.json": 100, "card.md": 100})
    manifest = Manifest("joe", "2.0.0", tuple(
        FileEntry(p, len(d), hashlib.sha256(d).hexdigest()) for p, d in sorted(files.items())),
        created="x" * (3 * 1024 * 1024))
    publish_raw(env["client"], env["bucket"], "joe", "2.0.0", files, env["keys"], manifest_bytes=manifest.to_bytes())
    # A stale staging directory from a crashed run: cleaned at start, never kept.
    stale = disk / "cache" / "partial" / "staging-joe-9.9.9-12345"
    stale.mkdir()
    (stale / "junk").write_bytes(b"j" * 1000)
    free = os.statvfs(disk)
    filler = disk / "filler"
    stale_bytes = 4096
    leave = sum(len(d) for d in files.values()) + 2 * 1024 * 1024 + stale_bytes
    filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - leave))

    result = run_cli("sync", config=config)
    assert result.returncode == 1, result.stderr
    (failed,) = events(result.stderr, "sync failed")
    assert "cannot assemble snapshot joe/2.0.0" in failed["error"] and "disk full" in failed["error"]
    assert "No space left on device" in failed["error"]
    doc = json.loads((state / "run" / "status.json").read_text())
    assert doc["models"]["joe"]["state"] == "error" and doc["models"]["joe"]["error"] == failed["error"]
    assert doc["models"]["joe"]["current_version"] == "1.0.0" and doc["state"] == "degraded"
    assert [p.name for p in (disk / "cache" / "partial").iterdir() if p.name.startswith("staging-")] == []
    assert cache.current("joe").version == "1.0.0"
    assert cache.check_snapshot(cache.current("joe"), full_hash=True) == []

    filler.unlink()
    result = run_cli("sync", config=config)
    assert result.returncode == 0, result.stderr
    assert cache.current("joe").version == "2.0.0"
    assert list((disk / "cache" / "partial").iterdir()) == []


# -- 6: sizes no model has, refused at parse time by the configured limits ---------------------

def test_configured_size_limits_refuse_the_manifest_before_any_download(env):
    publish_raw(env["client"], env["bucket"], "joe", "2.0.0", model_files(7, SIZES), env["keys"])
    for extra, key in (('max_file_size = "1M"', "max_file_size"), ("max_model_size = 3000000", "max_model_size")):
        config = write_config(env["tmp"], [env["mirror"]], env["keys"], extra=extra)
        result = run_cli("sync", config=config)
        assert result.returncode == 1
        assert "malformed manifest" in result.stderr and key in result.stderr
        assert "model.safetensors" in result.stderr or "voice.json" in result.stderr
        assert not events(result.stderr, "download started")
        assert env["cache"].current("joe").version == "1.0.0"
    bad = write_config(env["tmp"], [env["mirror"]], env["keys"], extra='max_file_size = "lots"')
    result = run_cli("sync", config=bad)
    assert result.returncode == 2 and "max_file_size" in result.stderr


# -- 7: rollback verifies what it switches to ---------------------------------------------------

def _flip(path: Path, offset: int = 4096, length: int = 4096) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_rollback_repairs_a_damaged_target_or_refuses(env):
    publish_raw(env["client"], env["bucket"], "joe", "2.0.0", model_files(8, SIZES), env["keys"])
    assert run_cli("sync", config=env["config"]).returncode == 0
    cache = env["cache"]
    v1 = cache.snapshot("joe", "1.0.0")
    _flip(v1.path / "model.safetensors")  # same size: only a full hash notices
    assert cache.check_snapshot(v1) == []

    # The blob is the same inode (damaged too): the bytes come from the mirror.
    result = run_cli("rollback", "joe", "1.0.0", config=env["config"])
    assert result.returncode == 0, result.stderr
    assert "is damaged: model.safetensors: sha256; repairing it first" in result.stderr
    assert cache.current("joe").version == "1.0.0"
    assert cache.check_snapshot(cache.current("joe"), full_hash=True) == []
    # The documented form (docs/operations.md): no VERSION with --release.
    released = run_cli("rollback", "joe", "--release", config=env["config"])
    assert released.returncode == 0 and "hold released" in released.stdout, released.stderr
    # Neither VERSION nor --release: a usage error naming both, nothing changed.
    missing = run_cli("rollback", "joe", config=env["config"])
    assert missing.returncode == 2 and "Missing argument 'VERSION' (or --release" in missing.stderr, missing.stderr
    assert run_cli("sync", config=env["config"]).returncode == 0
    assert cache.current("joe").version == "2.0.0"

    # Damaged again, and the mirror no longer has the bytes: refused, nothing switched.
    env["client"].delete_object(Bucket=env["bucket"], Key=layout.object_key("joe", "1.0.0", "model.safetensors"))
    _flip(v1.path / "model.safetensors")
    result = run_cli("rollback", "joe", "1.0.0", config=env["config"])
    assert result.returncode == 1
    assert "rollback refused: snapshot joe/1.0.0 is damaged: model.safetensors: sha256" in result.stderr
    assert "model.safetensors is missing on mirror primary" in result.stderr
    assert "current stays at 2.0.0" in result.stderr
    assert cache.current("joe").version == "2.0.0"
    assert not (env["tmp"] / "cache" / "holds" / "joe.json").exists()
