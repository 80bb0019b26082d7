"""End-to-end provisioner syncs through the CLI: real nanio S3 server, real aria2c."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from mirror.manifest import Manifest
from provisioner.cache import CacheReader
from tests.provisioner_helpers import provisioner_env, read_json, run_cli
from tts_testkit.provisioner_setup import model_files, publish_raw, set_channel, write_config

pytestmark = pytest.mark.integration

SIZES = {"model.safetensors": 6_000_000, "voice.json": 3_000, "docs/card.md": 700}


@pytest.fixture
def env(tmp_path, s3_server, bucket):
    return dict(provisioner_env(tmp_path, s3_server, bucket), cache=CacheReader(tmp_path / "cache"))


def test_sync_builds_verified_snapshot_and_switches_current(env):
    files = model_files(1, SIZES)
    publish_raw(env["client"], env["bucket"], "joe", "1.0.0", files, env["keys"])
    result = run_cli("sync", config=env["config"])
    assert result.returncode == 0, result.stderr
    assert "joe: updated to 1.0.0" in result.stdout

    cache = env["cache"]
    snap = cache.current("joe")
    assert snap is not None and snap.version == "1.0.0" and snap.complete
    for path, data in files.items():
        assert (snap.path / path).read_bytes() == data
        # Snapshot files are hardlinks to read-only blobs.
        st = (snap.path / path).stat()
        assert st.st_nlink == 2 and not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert os.readlink(env["tmp"] / "cache" / "current" / "joe") == "../snapshots/joe/1.0.0"
    assert Manifest.parse((snap.path / "manifest.json").read_bytes()).version == "1.0.0"
    assert cache.check_snapshot(snap, full_hash=True) == []
    assert not any((env["tmp"] / "cache" / "partial").iterdir())

    status = read_json(env["tmp"] / "run" / "status.json")
    assert status["ready"] is True and status["state"] == "idle"
    assert status["models"]["joe"]["current_version"] == "1.0.0"


def test_no_secrets_in_logs_or_status(env):
    publish_raw(env["client"], env["bucket"], "joe", "1.0.0", model_files(2, SIZES), env["keys"])
    result = run_cli("--log-level", "debug", "sync", config=env["config"])
    assert result.returncode == 0, result.stderr
    status_text = (env["tmp"] / "run" / "status.json").read_text()
    for text in (result.stdout, result.stderr, status_text):
        assert env["s3"].credentials.secret_key not in text
        assert "X-Amz-Signature" not in text
        assert "X-Amz-Credential" not in text


def test_incremental_version_downloads_only_changed_file_and_rollback(env):
    v1 = model_files(3, SIZES)
    publish_raw(env["client"], env["bucket"], "joe", "1.0.0", v1, env["keys"])
    assert run_cli("sync", config=env["config"]).returncode == 0

    v2 = dict(v1, **{"model.safetensors": model_files(4, {"m": 5_000_000})["m"]})
    publish_raw(env["client"], env["bucket"], "joe", "1.1.0", v2, env["keys"])
    result = run_cli("sync", config=env["config"])
    assert result.returncode == 0, result.stderr
    planned = [json.loads(line) for line in result.stderr.splitlines() if '"sync planned"' in line]
    assert planned and planned[0]["reuse"] == 2 and planned[0]["fetch"] == 1
    assert planned[0]["fetch_bytes"] == 5_000_000
    assert env["cache"].current("joe").version == "1.1.0"
    # Shared files are the same inode in both snapshots.
    s1, s2 = env["cache"].snapshot("joe", "1.0.0"), env["cache"].snapshot("joe", "1.1.0")
    assert (s1.path / "voice.json").stat().st_ino == (s2.path / "voice.json").stat().st_ino

    listing = run_cli("snapshots", config=env["config"])
    assert "1.0.0" in listing.stdout and "* joe 1.1.0" in listing.stdout

    rb = run_cli("rollback", "joe", "1.0.0", config=env["config"])
    assert rb.returncode == 0, rb.stderr
    assert env["cache"].current("joe").version == "1.0.0"
    # The hold keeps the rollback in place while the channel still says 1.1.0 ...
    assert run_cli("sync", config=env["config"]).returncode == 0
    assert env["cache"].current("joe").version == "1.0.0"
    # ... also when the rollback is run again (rollback.yml re-run): the status then says the
    # held version is wanted, which must not be recorded as the channel's ...
    assert run_cli("rollback", "joe", "1.0.0", config=env["config"]).returncode == 0
    assert run_cli("sync", config=env["config"]).returncode == 0
    assert env["cache"].current("joe").version == "1.0.0"
    # ... and lapses once the channel moves on.
    v3 = dict(v1, **{"voice.json": b'{"v": 3}'})
    publish_raw(env["client"], env["bucket"], "joe", "1.2.0", v3, env["keys"])
    assert run_cli("sync", config=env["config"]).returncode == 0
    assert env["cache"].current("joe").version == "1.2.0"

    bad = run_cli("rollback", "joe", "9.9.9", config=env["config"])
    assert bad.returncode == 1 and "no complete snapshot joe/9.9.9" in bad.stderr


def test_keep_snapshots_and_gc_remove_unreferenced_blobs(env, tmp_path):
    config = write_config(tmp_path, [env["mirror"]], env["keys"], extra="keep_snapshots = 1")
    for i, version in enumerate(["1.0.0", "2.0.0"]):
        publish_raw(env["client"], env["bucket"], "joe", version, model_files(10 + i, SIZES), env["keys"])
        assert run_cli("sync", config=config).returncode == 0
    cache = env["cache"]
    assert [s.version for s in cache.snapshots("joe")] == ["2.0.0"]
    blobs = sorted(p.name for p in cache.blobs_dir.iterdir())
    assert blobs == sorted(f.sha256 for f in cache.current("joe").manifest().files)
    (cache.partial_dir / "stale.aria2").write_text("x")
    result = run_cli("gc", config=config)
    assert result.returncode == 0 and "1 partial files" in result.stdout
    assert not (cache.partial_dir / "stale.aria2").exists()


def test_pinned_version_and_status_command(env, tmp_path):
    publish_raw(env["client"], env["bucket"], "joe", "1.0.0", model_files(5, SIZES), env["keys"])
    publish_raw(env["client"], env["bucket"], "joe", "2.0.0", model_files(6, SIZES), env["keys"])
    config = write_config(tmp_path, [env["mirror"]], env["keys"], models='name = "joe"\nversion = "1.0.0"')
    assert run_cli("sync", config=config).returncode == 0
    assert env["cache"].current("joe").version == "1.0.0"
    status = run_cli("status", "--json", config=config)
    doc = json.loads(status.stdout)
    assert doc["models"]["joe"]["current_version"] == "1.0.0"
    assert doc["models"]["joe"]["tracks"] == "version 1.0.0"


def test_verify_reports_and_repairs_damage(env):
    files = model_files(7, SIZES)
    publish_raw(env["client"], env["bucket"], "joe", "1.0.0", files, env["keys"])
    assert run_cli("sync", config=env["config"]).returncode == 0
    snap = env["cache"].current("joe")
    target = snap.path / "voice.json"
    os.chmod(target, 0o644)
    target.write_bytes(b"X" * len(files["voice.json"]))  # same size, wrong bytes
    result = run_cli("verify", config=env["config"])
    assert result.returncode == 1 and "DAMAGED voice.json: sha256" in result.stdout
    result = run_cli("verify", "--repair", config=env["config"])
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == files["voice.json"]
    assert run_cli("verify", config=env["config"]).returncode == 0
    assert any(Path(env["tmp"] / "cache" / "quarantine").iterdir())


def test_unchanged_channel_costs_one_conditional_request(env):
    from provisioner.config import load_config
    from provisioner.sync import make_mirror_set

    publish_raw(env["client"], env["bucket"], "joe", "1.0.0", model_files(8, {"a": 10}), env["keys"])
    config = load_config(env["config"])
    mirrors = make_mirror_set(config)
    assert mirrors.resolve_version(config.models[0]) == ("1.0.0", "primary")
    sent = []
    client = mirrors.sources[0].client()
    client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request))
    assert mirrors.resolve_version(config.models[0]) == ("1.0.0", "primary")
    assert len(sent) == 1 and sent[0].method == "GET" and "If-None-Match" in sent[0].headers
    set_channel(env["client"], env["bucket"], "joe", "stable", "2.0.0")
    assert mirrors.resolve_version(config.models[0])[0] == "2.0.0"
