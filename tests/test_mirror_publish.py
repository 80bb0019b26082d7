"""`tts-mirror publish` against a real S3 server (nanio, or MinIO from the environment)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from botocore.exceptions import EndpointConnectionError
from click.testing import CliRunner

from mirror import layout
from mirror.cli import main
from mirror.manifest import Manifest, parse_channel
from mirror.publish import default_transfer_config, publish_dir
from mirror.remote import Mirror, MirrorError
from mirror.s3 import Credentials
from mirror.signing import load_private_key, load_public_key, verify
from tests.mirror_fixtures import MiB, run

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- helpers


def mirror_for(s3_server, bucket: str) -> Mirror:
    return Mirror.connect(s3_server.endpoint, bucket, s3_server.credentials)


def keys_under(s3_server, bucket: str, prefix: str = "") -> list[str]:
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


# --------------------------------------------------------------------------- happy path


def test_publish_uploads_hashes_signs_and_sets_channel(s3_server, bucket, mirror_env, model_dir, keys) -> None:
    result = run(mirror_env, "publish", str(model_dir), "--name", "joe", "--version", "1.0", "--channel", "stable")
    assert result.exit_code == 0, result.output
    assert "published joe 1.0: 3 files" in result.stdout
    assert "channel stable of joe: none -> 1.0" in result.stdout

    client = s3_server.client()
    raw = client.get_object(Bucket=bucket, Key=layout.manifest_key("joe", "1.0"))["Body"].read()
    manifest = Manifest.parse(raw)
    assert [f.path for f in manifest.files] == ["config.json", "empty.txt", "sub/weights.bin"]
    for entry in manifest.files:
        local = (model_dir / entry.path).read_bytes()
        assert entry.sha256 == hashlib.sha256(local).hexdigest()
        head = client.head_object(Bucket=bucket, Key=layout.object_key("joe", "1.0", entry.path))
        assert head["ContentLength"] == entry.size == len(local)
        # metadata keys come back in the server's case (rclone: Sha256); see test_harness.py
        assert {k.lower(): v for k, v in head["Metadata"].items()}["sha256"] == entry.sha256
    signature = client.get_object(Bucket=bucket, Key=layout.signature_key("joe", "1.0"))["Body"].read()
    verify(raw, signature, [load_public_key(keys.public)])
    channel = client.get_object(Bucket=bucket, Key=layout.channel_key("joe", "stable"))["Body"].read()
    assert parse_channel(channel) == "1.0"


def test_channel_moves_only_when_asked(s3_server, bucket, mirror_env, model_dir) -> None:
    assert run(mirror_env, "publish", str(model_dir), "--name", "joe", "--version", "1.0").exit_code == 0
    assert keys_under(s3_server, bucket, "channels/") == []


def test_republish_identical_is_a_noop_and_different_is_refused(s3_server, bucket, mirror_env, model_dir) -> None:
    args = ["publish", str(model_dir), "--name", "joe", "--version", "1.0"]
    assert run(mirror_env, *args).exit_code == 0
    before = s3_server.client().get_object(Bucket=bucket, Key=layout.manifest_key("joe", "1.0"))["Body"].read()

    again = run(mirror_env, *args)
    assert again.exit_code == 0
    assert "already published with identical content: nothing to do" in again.stdout

    (model_dir / "config.json").write_text('{"sample_rate": 16000}\n')
    refused = run(mirror_env, *args)
    assert refused.exit_code == 1
    assert "already published with different content" in refused.output and "immutable" in refused.output
    after = s3_server.client().get_object(Bucket=bucket, Key=layout.manifest_key("joe", "1.0"))["Body"].read()
    assert after == before
    # The object itself was not overwritten either.
    body = s3_server.client().get_object(Bucket=bucket, Key=layout.object_key("joe", "1.0", "config.json"))
    assert body["Body"].read() == b'{"sample_rate": 22050}\n'


def test_added_file_is_also_refused(mirror_env, model_dir) -> None:
    args = ["publish", str(model_dir), "--name", "joe", "--version", "1.0"]
    assert run(mirror_env, *args).exit_code == 0
    (model_dir / "extra.bin").write_bytes(b"x")
    assert run(mirror_env, *args).exit_code == 1


def test_noop_restores_a_missing_signature(s3_server, bucket, mirror_env, model_dir) -> None:
    args = ["publish", str(model_dir), "--name", "joe", "--version", "1.0"]
    assert run(mirror_env, *args).exit_code == 0
    s3_server.client().delete_object(Bucket=bucket, Key=layout.signature_key("joe", "1.0"))
    assert run(mirror_env, *args).exit_code == 0
    assert layout.signature_key("joe", "1.0") in keys_under(s3_server, bucket)


def test_symlink_inside_the_directory_is_published(s3_server, bucket, mirror_env, model_dir) -> None:
    (model_dir / "alias.json").symlink_to("config.json")
    assert run(mirror_env, "publish", str(model_dir), "--name", "joe", "--version", "1.0").exit_code == 0
    body = s3_server.client().get_object(Bucket=bucket, Key=layout.object_key("joe", "1.0", "alias.json"))
    assert body["Body"].read() == (model_dir / "config.json").read_bytes()


def test_credentials_from_the_environment(s3_server, bucket, mirror_env, model_dir) -> None:
    env = dict(mirror_env, TTS_S3_ACCESS_KEY=s3_server.credentials.access_key,
               TTS_S3_SECRET_KEY=s3_server.credentials.secret_key)
    del env["TTS_MIRROR_CREDENTIALS"]
    assert run(env, "publish", str(model_dir), "--name", "joe", "--version", "1.0").exit_code == 0


def test_console_script_exit_codes(mirror_env, model_dir, tmp_path) -> None:
    """The installed `tts-mirror` itself: 0, 1 with one line and no traceback, 2 for usage."""
    exe = Path(sys.executable).parent / "tts-mirror"
    env = dict(os.environ, **mirror_env)
    ok = subprocess.run([exe, "publish", model_dir, "--name", "joe", "--version", "1.0"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = subprocess.run([exe, "publish", empty, "--name", "joe", "--version", "2.0"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"tts-mirror: error: {empty} contains no files: nothing to publish"]
    usage = subprocess.run([exe, "publish", model_dir, "--version", "1.0"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "--name" in usage.stderr


def test_help_documents_the_environment() -> None:
    out = CliRunner().invoke(main, ["publish", "--help"]).output
    for var in ("TTS_MIRROR_ENDPOINT", "TTS_MIRROR_BUCKET", "TTS_MIRROR_CREDENTIALS", "TTS_MIRROR_SIGNING_KEY"):
        assert var in out


def test_bad_names_are_usage_errors(mirror_env, model_dir) -> None:
    result = run(mirror_env, "publish", str(model_dir), "--name", "../joe", "--version", "1.0")
    assert result.exit_code == 2
    assert "invalid model name" in result.output


# --------------------------------------------------------------------------- bad input


def _refused(s3_server, bucket, mirror_env, directory: Path, message: str) -> None:
    result = run(mirror_env, "publish", str(directory), "--name", "joe", "--version", "1.0")
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert keys_under(s3_server, bucket) == []  # refused before anything was uploaded


def test_symlink_pointing_outside_is_refused(s3_server, bucket, mirror_env, model_dir, tmp_path) -> None:
    (tmp_path / "secret.txt").write_text("not for the mirror")
    (model_dir / "sub" / "innocent.txt").symlink_to("../../secret.txt")
    _refused(s3_server, bucket, mirror_env, model_dir, "sub/innocent.txt is a symlink pointing outside")


def test_absolute_symlink_outside_is_refused(s3_server, bucket, mirror_env, model_dir) -> None:
    (model_dir / "passwd").symlink_to("/etc/passwd")
    _refused(s3_server, bucket, mirror_env, model_dir, "passwd is a symlink pointing outside")


def test_symlinked_directory_is_refused(s3_server, bucket, mirror_env, model_dir) -> None:
    (model_dir / "loop").symlink_to(".")
    _refused(s3_server, bucket, mirror_env, model_dir, "loop is a symlink to a directory")


def test_fifo_is_refused(s3_server, bucket, mirror_env, model_dir) -> None:
    os.mkfifo(model_dir / "sub" / "pipe")
    _refused(s3_server, bucket, mirror_env, model_dir, "sub/pipe is not a regular file")


def test_empty_directory_is_refused(s3_server, bucket, mirror_env, tmp_path) -> None:
    empty = tmp_path / "empty"
    (empty / "only" / "dirs").mkdir(parents=True)
    _refused(s3_server, bucket, mirror_env, empty, "contains no files")


def test_dangling_symlink_is_unreadable(s3_server, bucket, mirror_env, model_dir) -> None:
    # Tests run as root, which reads chmod 000 files anyway: a dangling link is the
    # unreadable file every user gets.
    (model_dir / "gone.bin").symlink_to("does-not-exist.bin")
    _refused(s3_server, bucket, mirror_env, model_dir, "cannot read gone.bin")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod 000 files; covered by the dangling-symlink test")
def test_chmod_000_file_is_unreadable(s3_server, bucket, mirror_env, model_dir) -> None:
    (model_dir / "config.json").chmod(0)
    _refused(s3_server, bucket, mirror_env, model_dir, "cannot read config.json")


def test_reserved_name_is_refused(s3_server, bucket, mirror_env, model_dir) -> None:
    (model_dir / "manifest.json").write_text("{}")
    _refused(s3_server, bucket, mirror_env, model_dir, "reserved")


def test_backslash_name_is_refused(s3_server, bucket, mirror_env, model_dir) -> None:
    (model_dir / "a\\..\\b").write_text("x")
    _refused(s3_server, bucket, mirror_env, model_dir, "backslash")


def test_non_utf8_name_is_refused(s3_server, bucket, mirror_env, model_dir) -> None:
    with open(os.path.join(os.fsencode(model_dir), b"bad\xffname"), "wb") as f:
        f.write(b"x")
    _refused(s3_server, bucket, mirror_env, model_dir, "not valid UTF-8")


def test_wrong_credentials_are_a_clear_error(s3_server, bucket, mirror_env, model_dir, tmp_path) -> None:
    Credentials(s3_server.credentials.access_key, "wrong-secret").write(tmp_path / "bad.toml")
    env = dict(mirror_env, TTS_MIRROR_CREDENTIALS=str(tmp_path / "bad.toml"))
    result = run(env, "publish", str(model_dir), "--name", "joe", "--version", "1.0")
    assert result.exit_code == 1
    assert "rejected the credentials" in result.output
    assert "wrong-secret" not in result.output

    Credentials("nobody", "nothing").write(tmp_path / "unknown.toml")
    env = dict(mirror_env, TTS_MIRROR_CREDENTIALS=str(tmp_path / "unknown.toml"))
    result = run(env, "publish", str(model_dir), "--name", "joe", "--version", "1.0")
    assert result.exit_code == 1 and "rejected the credentials" in result.output


def test_world_readable_credentials_are_refused(mirror_env, model_dir) -> None:
    Path(mirror_env["TTS_MIRROR_CREDENTIALS"]).chmod(0o644)
    result = run(mirror_env, "publish", str(model_dir), "--name", "joe", "--version", "1.0")
    assert result.exit_code == 1 and "chmod 600" in result.output


def test_unreachable_endpoint_is_a_clear_error(mirror_env, model_dir) -> None:
    from tts_testkit.s3servers import free_port

    env = dict(mirror_env, TTS_MIRROR_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    result = run(env, "publish", str(model_dir), "--name", "joe", "--version", "1.0")
    assert result.exit_code == 1 and "cannot reach the mirror" in result.output


def test_missing_bucket_is_named_and_create_bucket_creates_it(s3_server, mirror_env, model_dir) -> None:
    missing = "tts-missing-" + os.urandom(4).hex()
    env = dict(mirror_env, TTS_MIRROR_BUCKET=missing)
    result = run(env, "publish", str(model_dir), "--name", "joe", "--version", "1.0")
    assert result.exit_code == 1
    assert f"bucket '{missing}' does not exist" in result.output and "--create-bucket" in result.output

    result = run(env, "publish", str(model_dir), "--name", "joe", "--version", "1.0", "--create-bucket")
    assert result.exit_code == 0, result.output
    assert f"created bucket {missing}" in result.stdout
    assert layout.manifest_key("joe", "1.0") in keys_under(s3_server, missing)


# --------------------------------------------------------------------------- interruptions


class FaultyMirror(Mirror):
    """A mirror whose upload client misbehaves for chosen keys (botocore event hooks)."""

    fail_keys: set[str]
    drop_keys: set[str]  # "succeed" without storing anything

    def unsigned_payload_client(self):
        client = super().unsigned_payload_client()
        for op in ("PutObject", "UploadPart"):
            client.meta.events.register(f"before-parameter-build.s3.{op}", self._check)
            client.meta.events.register(f"before-call.s3.{op}", self._drop)
        return client

    def _check(self, params, context, **kwargs):
        # API parameters are visible here; before-call only sees the wire request.
        key = params.get("Key", "")
        context["tts_key"] = key
        if any(key.endswith(k) for k in self.fail_keys) and params.get("PartNumber", 2) >= 2:
            raise EndpointConnectionError(endpoint_url=self.endpoint)  # multipart: part 1 lands, part 2 fails

    def _drop(self, context, **kwargs):
        if any(context.get("tts_key", "").endswith(k) for k in self.drop_keys):
            return SimpleNamespace(status_code=200, headers={}), {"ETag": '"0"', "ResponseMetadata": {}}
        return None


def faulty(s3_server, bucket, fail=(), drop=()) -> FaultyMirror:
    m = FaultyMirror.connect(s3_server.endpoint, bucket, s3_server.credentials)
    m.fail_keys, m.drop_keys = set(fail), set(drop)
    return m


@pytest.fixture
def three_files(tmp_path: Path) -> Path:
    d = tmp_path / "three"
    d.mkdir()
    (d / "a.bin").write_bytes(os.urandom(1000))
    (d / "b.bin").write_bytes(os.urandom(2000))
    (d / "big.bin").write_bytes(os.urandom(11 * MiB))  # 3 parts of 5 MiB
    return d


SMALL_PARTS = default_transfer_config(max_concurrency=4, chunk_mib=5)


def test_interrupted_upload_resumes_and_manifest_waits(s3_server, bucket, keys, three_files) -> None:
    key = load_private_key(keys.private)
    broken = faulty(s3_server, bucket, fail={"big.bin"})
    with pytest.raises(MirrorError, match="upload failed for big.bin.*no manifest written"):
        publish_dir(three_files, name="joe", version="1.0", mirror=broken, signing_key=key,
                    transfer_config=SMALL_PARTS)
    present = keys_under(s3_server, bucket)
    assert layout.manifest_key("joe", "1.0") not in present
    assert layout.object_key("joe", "1.0", "a.bin") in present
    assert layout.object_key("joe", "1.0", "big.bin") not in present  # aborted multipart, no object

    report = publish_dir(three_files, name="joe", version="1.0", mirror=mirror_for(s3_server, bucket),
                         signing_key=key, transfer_config=SMALL_PARTS)
    assert report.uploaded == ["big.bin"]
    assert sorted(report.present) == ["a.bin", "b.bin"]
    assert layout.manifest_key("joe", "1.0") in keys_under(s3_server, bucket)


def test_manifest_is_not_written_when_an_object_is_not_confirmed(s3_server, bucket, keys, three_files) -> None:
    lying = faulty(s3_server, bucket, drop={"b.bin"})
    with pytest.raises(MirrorError, match="not writing the manifest: b.bin is missing"):
        publish_dir(three_files, name="joe", version="1.0", mirror=lying, signing_key=keys.private,
                    transfer_config=SMALL_PARTS)
    assert layout.manifest_key("joe", "1.0") not in keys_under(s3_server, bucket)


def test_file_changed_during_publish_is_caught(s3_server, bucket, keys, three_files) -> None:
    m = mirror_for(s3_server, bucket)
    original = m.unsigned_payload_client

    def touching_client():
        client = original()

        def touch(params, **kwargs):
            if params.get("Key", "").endswith("a.bin"):
                os.utime(three_files / "a.bin", ns=(1, 1))

        client.meta.events.register("before-parameter-build.s3.PutObject", touch)
        return client

    m.unsigned_payload_client = touching_client
    with pytest.raises(MirrorError, match="a.bin changed while it was being published"):
        publish_dir(three_files, name="joe", version="1.0", mirror=m, signing_key=keys.private,
                    transfer_config=SMALL_PARTS)
    assert layout.manifest_key("joe", "1.0") not in keys_under(s3_server, bucket)


def test_existing_object_with_other_content_is_replaced_before_publishing(s3_server, bucket, keys, three_files) -> None:
    """A leftover object from an older, never-finished run is not trusted just by its name."""
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key=layout.object_key("joe", "1.0", "a.bin"), Body=b"x" * 1000,
                      Metadata={"sha256": "00" * 32})
    report = publish_dir(three_files, name="joe", version="1.0", mirror=mirror_for(s3_server, bucket),
                         signing_key=keys.private, transfer_config=SMALL_PARTS)
    assert "a.bin" in report.uploaded
    body = client.get_object(Bucket=bucket, Key=layout.object_key("joe", "1.0", "a.bin"))["Body"].read()
    assert body == (three_files / "a.bin").read_bytes()


def test_without_s3_checksums(s3_server, bucket, keys, three_files) -> None:
    report = publish_dir(three_files, name="joe", version="1.0", mirror=mirror_for(s3_server, bucket),
                         signing_key=keys.private, transfer_config=SMALL_PARTS, s3_checksum=False)
    assert len(report.uploaded) == 3
