"""Signed channel metadata (python-tuf) end to end: one test per attack of issue 27.

Real S3 servers (both), real python-tuf metadata signed with key files, real aria2c in
`tts-provisioner sync`. The adversary holds the bucket's write credentials (and, where
a test says so, the CI's key or the online snapshot/timestamp keys), never the release
or root keys. Expiry is made with metadata whose expiry is already past, never by
waiting; slow mirrors are a proxy that trickles bytes (the verdict is arithmetic: one
byte per 0.5 s against a 2 s deadline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, TargetFile, Timestamp

from mirror import layout, trust_ops
from mirror.catalog import info_hashes, promote
from mirror.publish import publish_dir
from mirror.remote import Mirror
from mirror.trust import channel_target, now
from mirror.trust_repo import Keyring, RepoState, Staged, serialize
from provisioner.cache import CacheReader
from tests.provisioner_helpers import read_json, run_cli
from tts_testkit.provisioner_setup import model_files, set_channel, write_config
from tts_testkit.trust_keys import KEY_NAMES, TrickleProxy, TrustKeys

pytestmark = pytest.mark.integration

SIZES = {"model.safetensors": 300_000, "voice.json": 2_000}


@dataclass
class Signed:
    """A bucket with signed channel metadata and one node following `stable`."""
    tmp: Path
    s3: object
    bucket: str
    mirror: Mirror
    keys: TrustKeys
    root: Path
    config: Path

    @property
    def client(self):
        return self.mirror.client

    def publish(self, version: str, seed: int, channel: str | None = "canary",
                extra_keys: tuple[str, ...] = ("snapshot", "timestamp")):
        src = self.tmp / f"src-{version}"
        for path, data in model_files(seed, SIZES).items():
            (src / path).parent.mkdir(parents=True, exist_ok=True)
            (src / path).write_bytes(data)
        return publish_dir(src, name="joe", version=version, mirror=self.mirror, signing_key=self.keys.key("ci"),
                           channel=channel, trust_root=self.root.read_bytes(),
                           trust_keys=self.keys.keys(*extra_keys), torrents=False)

    def promote(self, version: str, channel: str = "stable", keys: tuple[str, ...] = ("release1", "snapshot",
                                                                                      "timestamp")):
        return promote(self.mirror, "joe", version, channel, trust_root=self.root.read_bytes(),
                       keyring=Keyring(self.keys.keys(*keys)))

    def state(self) -> RepoState:
        return RepoState.load(self.mirror, self.root.read_bytes())

    def sync(self, config: Path | None = None):
        return run_cli("sync", config=config or self.config)

    def status(self) -> dict:
        return read_json(self.tmp / "run" / "status.json")

    def current(self) -> str | None:
        snap = CacheReader(self.tmp / "cache").current("joe")
        return snap.version if snap else None

    def read(self, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=layout.tuf_key(name))["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)


def node_config(tmp: Path, mirrors: list[dict], root: Path, deadline: float = 20, name: str = "provisioner.toml",
                models: str = 'name = "joe"\nchannel = "stable"') -> Path:
    path = write_config(tmp, mirrors, None, models=models,
                        extra=f'[trust]\nroot = "{root}"\nmetadata_deadline = {deadline}\n')
    return path.rename(tmp / name) if name != "provisioner.toml" else path


def make_signed(tmp: Path, s3_server, bucket: str, release_keys=("release1", "release2"), release_threshold=1,
                extra_ci_in_release: bool = False) -> Signed:
    keys = TrustKeys.make(tmp / "keys")
    mirror = Mirror.connect(s3_server.endpoint, bucket, s3_server.credentials)
    layout_keys = keys.layout()
    layout_keys["release"] = ([keys.public("ci")] if extra_ci_in_release else []) + \
        [keys.public(k) for k in release_keys]
    signers = ("root1", "root2", "targets", "snapshot", "timestamp", "ci") + tuple(release_keys)
    root = trust_ops.init(mirror, layout_keys, {"root": 2, "release": release_threshold},
                          Keyring(keys.keys(*signers)))
    (tmp / "root.json").write_bytes(root)
    creds = s3_server.write_credentials(tmp / "creds.toml")
    mirrors = [dict(name="primary", endpoint=s3_server.endpoint, bucket=bucket, credentials_file=creds)]
    return Signed(tmp, s3_server, bucket, mirror, keys, tmp / "root.json", node_config(tmp, mirrors, tmp / "root.json"))


@pytest.fixture
def signed(tmp_path, s3_server, bucket) -> Signed:
    return make_signed(tmp_path, s3_server, bucket)


def on_stable(env: Signed, version: str, seed: int) -> None:
    env.publish(version, seed)
    env.promote(version)


# --------------------------------------------------------------------------- the happy path


def test_node_follows_signed_stable_and_reports_trust(signed):
    on_stable(signed, "1.0.0", 1)
    result = signed.sync()
    assert result.returncode == 0, result.stderr
    assert signed.current() == "1.0.0"
    trust = signed.status()["trust"]
    assert trust["error"] is None and trust["mirrors"] == {"primary": "ok"}
    assert trust["root_version"] == 1 and trust["timestamp_version"] >= 1
    assert set(trust["expires"]) == {"root", "timestamp", "snapshot", "targets"}
    # Defended: no secret in logs or status (presigned metadata URLs included).
    text = result.stdout + result.stderr + (signed.tmp / "run" / "status.json").read_text()
    assert signed.s3.credentials.secret_key not in text and "X-Amz-Signature" not in text


def test_unsigned_channel_is_refused_once_a_root_is_set(tmp_path, s3_server, bucket):
    env = make_signed(tmp_path, s3_server, bucket)
    env.publish("1.0.0", 1, channel=None)
    set_channel(env.client, bucket, "joe", "stable", "1.0.0")  # the old, unsigned pointer only
    result = env.sync()
    assert result.returncode == 1
    error = env.status()["models"]["joe"]["error"]
    assert "channel joe/stable is not in the signed metadata" in error and "tts-mirror promote" in error
    assert env.current() is None

    # A bucket without any signed metadata: the message names the command to run.
    other = s3_server.new_bucket()
    cfg = node_config(tmp_path, [dict(name="primary", endpoint=s3_server.endpoint, bucket=other,
                                      credentials_file=s3_server.write_credentials(tmp_path / "c2.toml"))],
                      env.root, name="other.toml")
    result = env.sync(cfg)
    assert result.returncode == 1
    assert "tts-mirror trust init" in env.status()["models"]["joe"]["error"]


# --------------------------------------------------------------------------- attacks


def test_rollback_to_an_older_signed_channel_is_refused(signed):
    on_stable(signed, "1.0.0", 1)
    assert signed.sync().returncode == 0
    old_timestamp = signed.read("timestamp.json")  # a genuine, signed, older state
    on_stable(signed, "2.0.0", 2)
    assert signed.sync().returncode == 0 and signed.current() == "2.0.0"

    # The adversary (bucket write) replays the old signed metadata and the old pointer.
    signed.put(layout.tuf_key("timestamp.json"), old_timestamp)
    set_channel(signed.client, signed.bucket, "joe", "stable", "1.0.0")
    result = signed.sync()
    assert result.returncode == 1
    assert signed.current() == "2.0.0"
    trust = signed.status()["trust"]
    assert "BadVersionNumberError" in trust["error"] and "older" in trust["mirrors"]["primary"]


def test_ci_key_or_bucket_write_cannot_move_stable(signed):
    on_stable(signed, "1.0.0", 1)
    signed.publish("2.0.0", 2)  # canary only
    assert signed.sync().returncode == 0 and signed.current() == "1.0.0"

    # With only the CI's key (and even the online snapshot/timestamp keys), promote is refused...
    with pytest.raises(Exception, match="none of the given keys .* is a key of role release"):
        signed.promote("2.0.0", keys=("ci", "snapshot", "timestamp"))
    # ...and a stable target the CI signs into its own role is never consulted by nodes.
    state = signed.state()
    manifest = signed.mirror.read(layout.manifest_key("joe", "2.0.0"))
    forged = Metadata.from_bytes(serialize(state.delegated["ci"]))
    forged.signatures.clear()
    forged.signed.version += 1
    target = TargetFile.from_data(channel_target("joe", "stable"), manifest, ["sha256"])
    target.unrecognized_fields["custom"] = {"version": "2.0.0"}
    forged.signed.targets[target.path] = target
    state.store("ci", forged, Keyring(signed.keys.keys("ci")))
    trust_ops.refresh(state, Keyring(signed.keys.keys("snapshot", "timestamp")))
    # Bucket write: the unsigned pointer moved too.
    set_channel(signed.client, signed.bucket, "joe", "stable", "2.0.0")

    result = signed.sync()
    assert result.returncode == 0, result.stderr
    assert signed.current() == "1.0.0"
    assert signed.status()["models"]["joe"]["wanted_version"] == "1.0.0"


def test_one_ci_signature_cannot_move_stable_at_threshold_two(tmp_path, s3_server, bucket):
    # release = {ci, release1}, threshold 2: the CI's signature alone is never enough.
    env = make_signed(tmp_path, s3_server, bucket, release_keys=("release1",), release_threshold=2,
                      extra_ci_in_release=True)
    env.publish("1.0.0", 1)
    with pytest.raises(Staged, match=r"release v2 has 1 signature\(s\), needs 1 more of threshold 2"):
        env.promote("1.0.0", keys=("ci", "snapshot", "timestamp"))
    assert env.sync().returncode == 1 and env.current() is None  # stable is not signed yet

    # The second holder signs the staged change: now it is published.
    result = run_cli("trust", "sign", "release", "--endpoint", s3_server.endpoint, "--bucket", bucket,
                     "--credentials", str(s3_server.write_credentials(tmp_path / "pub.toml")),
                     "--trust-root", str(env.root), "--key", str(env.keys.key("release1")),
                     "--key", str(env.keys.key("snapshot")), "--key", str(env.keys.key("timestamp")),
                     tool="tts-mirror")
    assert result.returncode == 0, result.stderr
    assert "signed: channels/joe/stable -> 1.0.0" in result.stdout
    assert env.sync().returncode == 0 and env.current() == "1.0.0"


def test_hold_is_not_undone_by_anything_written_to_the_bucket(signed):
    on_stable(signed, "1.0.0", 1)
    assert signed.sync().returncode == 0
    replay = signed.read("timestamp.json")
    on_stable(signed, "2.0.0", 2)
    assert signed.sync().returncode == 0 and signed.current() == "2.0.0"
    result = run_cli("rollback", "joe", "1.0.0", config=signed.config)
    assert result.returncode == 0, result.stderr

    # Two pointer writes (away and back) and a replayed older timestamp.
    set_channel(signed.client, signed.bucket, "joe", "stable", "3.0.0")
    signed.sync()
    set_channel(signed.client, signed.bucket, "joe", "stable", "2.0.0")
    signed.sync()
    signed.put(layout.tuf_key("timestamp.json"), replay)
    signed.sync()
    assert signed.current() == "1.0.0"
    assert (signed.tmp / "cache" / "holds" / "joe.json").exists()


def test_expired_timestamp_freezes_nothing_and_is_reported(signed):
    on_stable(signed, "1.0.0", 1)
    assert signed.sync().returncode == 0
    signed.publish("2.0.0", 2)
    signed.promote("2.0.0", keys=("release1",))  # no snapshot/timestamp keys: nothing published yet
    # A genuine timestamp (the real key) whose expiry is already past, pointing at the new snapshot:
    state = signed.state()
    trust_ops.refresh(state, Keyring(signed.keys.keys("snapshot")))  # new snapshot only
    state = signed.state() if False else state
    stale = Metadata(Timestamp(version=state.timestamp.signed.version + 1, expires=now() - timedelta(hours=1),
                               snapshot_meta=trust_ops.snapshot_meta(state.snapshot)))
    stale.sign(Keyring(signed.keys.keys("timestamp")).for_keyids(state.role_keys("timestamp")[0])[0])
    signed.put(layout.tuf_key("timestamp.json"), serialize(stale))

    result = signed.sync()
    assert result.returncode == 1
    assert signed.current() == "1.0.0"  # keeps serving, never moves on unverified data
    status = signed.status()
    assert "expired" in status["trust"]["error"] and "tts-mirror trust refresh" in status["trust"]["error"]
    assert status["trust"]["mirrors"]["primary"].startswith("expired")
    assert status["ready"] is True and status["models"]["joe"]["current_version"] == "1.0.0"
    assert "expired" in result.stderr  # the log line

    # The timer's refresh heals it.
    trust_ops.refresh(signed.state(), Keyring(signed.keys.online()), force=True)
    assert signed.sync().returncode == 0 and signed.current() == "2.0.0"


def _second_mirror(env: Signed, s3_server, name: str = "secondary", endpoint: str | None = None,
                   bucket: str | None = None, priority: int = 10) -> dict:
    return dict(name=name, endpoint=endpoint or s3_server.endpoint, bucket=bucket or env.bucket,
                credentials_file=s3_server.write_credentials(env.tmp / f"creds-{name}.toml"), priority=priority)


def _copy_bucket(client, src: str, dst: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=src):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=src, Key=obj["Key"])["Body"].read()
            client.put_object(Bucket=dst, Key=obj["Key"], Body=body)


def test_stale_mirror_cannot_hold_the_node_back(signed, s3_server):
    on_stable(signed, "1.0.0", 1)
    stale_bucket = s3_server.new_bucket()
    _copy_bucket(signed.client, signed.bucket, stale_bucket)  # primary stays at 1.0.0
    on_stable(signed, "2.0.0", 2)
    mirrors = [_second_mirror(signed, s3_server, "stale", bucket=stale_bucket, priority=1),
               _second_mirror(signed, s3_server, "fresh", priority=2)]
    cfg = node_config(signed.tmp, mirrors, signed.root, name="two.toml")
    result = signed.sync(cfg)
    assert result.returncode == 0, result.stderr
    assert signed.current() == "2.0.0"
    mirrors_state = signed.status()["trust"]["mirrors"]
    assert mirrors_state["fresh"] == "ok" and mirrors_state["stale"].startswith("older")
    assert any('"mirror": "stale"' in line and "older" in line for line in result.stderr.splitlines())


def test_endless_metadata_is_refused_before_its_body(signed, s3_server):
    on_stable(signed, "1.0.0", 1)
    hostile = s3_server.new_bucket()
    _copy_bucket(signed.client, signed.bucket, hostile)
    # Valid JSON, 20 MiB: read whole it would cost the node that much memory.
    signed.client.put_object(Bucket=hostile, Key=layout.tuf_key("timestamp.json"),
                             Body=b'{"signed": "' + b"a" * (20 * 1024 * 1024) + b'"}')
    mirrors = [_second_mirror(signed, s3_server, "hostile", bucket=hostile, priority=1),
               _second_mirror(signed, s3_server, "good", priority=2)]
    result = signed.sync(node_config(signed.tmp, mirrors, signed.root, name="two.toml"))
    assert result.returncode == 0, result.stderr
    assert signed.current() == "1.0.0"
    state = signed.status()["trust"]["mirrors"]["hostile"]
    assert "over its 16384 byte limit" in state  # refused by its Content-Length, unread


def test_slow_metadata_mirror_is_cut_off_at_its_deadline(signed, s3_server):
    on_stable(signed, "1.0.0", 1)
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    with TrickleProxy(port, interval=0.5) as proxy:
        mirrors = [_second_mirror(signed, s3_server, "slow", endpoint=f"http://127.0.0.1:{proxy.port}", priority=1),
                   _second_mirror(signed, s3_server, "quick", priority=2)]
        cfg = node_config(signed.tmp, mirrors, signed.root, deadline=2, name="slow.toml")
        result = signed.sync(cfg)
    assert result.returncode == 0, result.stderr
    assert signed.current() == "1.0.0"
    assert proxy.trickled >= 1, (signed.status()["trust"], proxy.connections)
    assert "2 s deadline" in signed.status()["trust"]["mirrors"]["slow"]


def test_manifest_moved_to_another_version_is_refused(signed):
    on_stable(signed, "1.0.0", 1)
    signed.publish("2.0.0", 2)
    signed.promote("2.0.0")
    # The adversary swaps 2.0.0's manifest for 1.0.0's (signed, but for another version).
    signed.put(layout.manifest_key("joe", "2.0.0"), signed.mirror.read(layout.manifest_key("joe", "1.0.0")))
    result = signed.sync()
    assert result.returncode == 1 and signed.current() is None
    assert "does not match its signed target" in signed.status()["models"]["joe"]["error"]


# --------------------------------------------------------------------------- keys


def _cli(env: Signed, *args: str):
    return run_cli(*args, "--endpoint", env.s3.endpoint, "--bucket", env.bucket, "--credentials",
                   str(env.s3.write_credentials(env.tmp / "pub.toml")), "--trust-root", str(env.root),
                   tool="tts-mirror")


def test_rotated_timestamp_key_old_key_refused_and_a_down_node_catches_up(signed):
    on_stable(signed, "1.0.0", 1)
    assert signed.sync().returncode == 0
    behind = signed.tmp / "behind"  # a node that was down during the rotations: root v1 only
    behind.mkdir()
    (behind / "run").mkdir()
    import shutil
    shutil.copytree(signed.tmp / "cache" / "trust", behind / "trust-v1")

    new_ts = TrustKeys.make(signed.tmp / "newkeys", ("timestamp", "root3"))
    old_ts = signed.keys.public("timestamp").keyid
    result = _cli(signed, "trust", "rotate", "timestamp", "--add", str(new_ts.pub("timestamp")), "--remove", old_ts,
                  "--key", str(signed.keys.key("root1")), "--key", str(signed.keys.key("root2")),
                  "--key", str(new_ts.key("timestamp")), "--key", str(signed.keys.key("snapshot")))
    assert result.returncode == 0, result.stderr
    # And the root keys too (root v3): root2 replaced by root3, signed by old and new thresholds.
    result = _cli(signed, "trust", "rotate", "root", "--add", str(new_ts.pub("root3")),
                  "--remove", signed.keys.public("root2").keyid, "--key", str(signed.keys.key("root1")),
                  "--key", str(signed.keys.key("root2")), "--key", str(new_ts.key("root3")),
                  "--key", str(new_ts.key("timestamp")), "--key", str(signed.keys.key("snapshot")))
    assert result.returncode == 0, result.stderr
    signed.publish("2.0.0", 2, extra_keys=())
    signed.promote("2.0.0", keys=("release1",))

    # The old timestamp key signs a newer timestamp: refused after the rotation.
    state = signed.state()
    trust_ops.refresh(state, Keyring(signed.keys.keys("snapshot")))
    forged = Metadata(Timestamp(version=state.timestamp.signed.version + 1, expires=now() + timedelta(hours=1),
                                snapshot_meta=trust_ops.snapshot_meta(state.snapshot)))
    forged.sign(Keyring(signed.keys.keys("timestamp")).signers[old_ts][1])
    signed.put(layout.tuf_key("timestamp.json"), serialize(forged))
    assert signed.sync().returncode == 1 and signed.current() == "1.0.0"
    assert "UnsignedMetadataError" in signed.status()["trust"]["error"]

    # The new key's refresh: published; the node that was down follows the root chain v1 -> v3.
    trust_ops.refresh(signed.state(), Keyring([new_ts.key("timestamp"), signed.keys.key("snapshot")]), force=True)
    shutil.rmtree(signed.tmp / "cache" / "trust")
    shutil.copytree(behind / "trust-v1", signed.tmp / "cache" / "trust")
    assert json.loads((signed.tmp / "cache" / "trust" / "root.json").read_text())["signed"]["version"] == 1
    result = signed.sync()
    assert result.returncode == 0, result.stderr
    assert signed.current() == "2.0.0" and signed.status()["trust"]["root_version"] == 3


def test_trust_commands_refuse_bad_input(signed, tmp_path):
    on_stable(signed, "1.0.0", 1)
    # A key of no role refresh signs.
    result = _cli(signed, "trust", "refresh", "--key", str(signed.keys.key("ci")),
                  "--key", str(signed.keys.key("snapshot")), "--key", str(signed.keys.key("timestamp")), "--force")
    assert result.returncode == 1 and "not a key of any role refresh signs" in result.stderr
    # Threshold not met: one root key for a root change.
    result = _cli(signed, "trust", "resign", "root", "--key", str(signed.keys.key("root1")))
    assert result.returncode == 1 and "staged" in result.stderr and "root" in result.stderr
    # A rotation that leaves a role below its threshold.
    result = _cli(signed, "trust", "rotate", "root", "--remove", signed.keys.public("root2").keyid,
                  "--key", str(signed.keys.key("root1")), "--key", str(signed.keys.key("root2")))
    assert result.returncode == 1 and "would have 1 key(s) for threshold 2" in result.stderr
    # init twice.
    result = run_cli("trust", "init", "--endpoint", signed.s3.endpoint, "--bucket", signed.bucket, "--credentials",
                     str(signed.s3.write_credentials(tmp_path / "init.toml")), *signed.keys.init_args(),
                     "--out", str(tmp_path / "again.json"), tool="tts-mirror")
    assert result.returncode == 1 and "already has signed channel metadata" in result.stderr
    # An expired root: every change is refused with what to do.
    expired = Metadata.from_bytes(signed.root.read_bytes())
    state = signed.state()
    new = Metadata.from_bytes(serialize(state.root))
    new.signatures.clear()
    new.signed.version += 1
    new.signed.expires = now() - timedelta(days=1)
    state.store("root", new, Keyring(signed.keys.keys("root1", "root2")))
    assert expired.signed.version == 1
    with pytest.raises(Exception, match="root v2 expired at .* `tts-mirror trust resign root"):
        signed.promote("1.0.0")
    for command in ("init", "status", "refresh", "sign", "rotate", "revoke", "resign"):
        result = run_cli("trust", command, "--help", tool="tts-mirror")
        assert result.returncode == 0 and "Usage:" in result.stdout


def test_tracker_whitelist_comes_from_verified_metadata_only(signed, tmp_path):
    src = tmp_path / "torrent-src"
    for path, data in model_files(5, SIZES).items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(data)
    publish_dir(src, name="joe", version="1.0.0", mirror=signed.mirror, signing_key=signed.keys.key("ci"),
                channel="canary", trust_root=signed.root.read_bytes(), trust_keys=signed.keys.online())
    good = json.loads(signed.mirror.read(layout.manifest_key("joe", "1.0.0")))
    # The adversary writes a manifest naming a torrent of its own under a new version.
    fake = dict(good, version="6.6.6")
    fake["files"] = [dict(f, btih="ab" * 20) for f in good["files"]]
    signed.put(layout.manifest_key("joe", "6.6.6"), (json.dumps(fake) + "\n").encode())
    with pytest.raises(Exception, match="pass --trust-root"):
        info_hashes(signed.mirror)
    hashes = info_hashes(signed.mirror, signed.root.read_bytes())
    assert hashes == sorted(f["btih"] for f in good["files"] if f.get("btih"))
    assert "ab" * 20 not in hashes


def test_upgrade_from_unsigned_channels_keeps_the_installed_version(tmp_path, s3_server, bucket):
    """A fleet on unsigned channels (schema 1 manifest, channels/joe/stable.json) moves to
    signed metadata: trust init, the same version re-published (nothing uploaded, its
    manifest signed into ci) and promoted; the node, given the root, stays on it without a
    download and then follows only signed moves."""
    from tts_testkit.provisioner_setup import Keys

    keys = TrustKeys.make(tmp_path / "keys")
    mirror = Mirror.connect(s3_server.endpoint, bucket, s3_server.credentials)
    src = tmp_path / "src"
    for path, data in model_files(9, SIZES).items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(data)
    publish_dir(src, name="joe", version="1.0.0", mirror=mirror, signing_key=keys.key("ci"), channel="stable",
                torrents=False)
    creds = s3_server.write_credentials(tmp_path / "creds.toml")
    mirrors = [dict(name="primary", endpoint=s3_server.endpoint, bucket=bucket, credentials_file=creds)]
    legacy = write_config(tmp_path, mirrors, Keys(keys.key("ci"), keys.pub("ci")))
    assert run_cli("sync", config=legacy).returncode == 0

    root = trust_ops.init(mirror, keys.layout(), {"root": 2, "release": 1}, Keyring(keys.keys(*KEY_NAMES)))
    (tmp_path / "root.json").write_bytes(root)
    report = publish_dir(src, name="joe", version="1.0.0", mirror=mirror, signing_key=keys.key("ci"),
                         trust_root=root, trust_keys=keys.online(), torrents=False)
    assert report.unchanged and report.uploaded == [] and report.signed.version_signed
    promote(mirror, "joe", "1.0.0", "stable", trust_root=root, keyring=Keyring(keys.keys("release1", *("snapshot",
                                                                                                        "timestamp"))))
    signed_config = node_config(tmp_path, mirrors, tmp_path / "root.json", name="signed.toml")
    result = run_cli("sync", config=signed_config)
    assert result.returncode == 0, result.stderr
    assert "already at 1.0.0" in result.stdout
    # From now on the unsigned pointer moves nothing.
    set_channel(mirror.client, bucket, "joe", "stable", "2.0.0")
    assert run_cli("sync", config=signed_config).returncode == 0
    assert CacheReader(tmp_path / "cache").current("joe").version == "1.0.0"
