"""`tts-mirror promote`, `list`, `verify`, `keygen` and `import-piper` against a real S3 server."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from mirror import layout
from mirror.cli import main
from mirror.manifest import parse_channel
from mirror.signing import generate_keypair
from tests.mirror_fixtures import run


@pytest.fixture
def published(mirror_env, model_dir) -> dict[str, str]:
    for version in ("1.0", "1.1"):
        result = run(mirror_env, "publish", str(model_dir), "--name", "joe", "--version", version)
        assert result.exit_code == 0, result.output
    return mirror_env


def channel_of(s3_server, bucket: str, channel: str) -> str:
    body = s3_server.client().get_object(Bucket=bucket, Key=layout.channel_key("joe", channel))["Body"].read()
    return parse_channel(body)


# --------------------------------------------------------------------------- promote


@pytest.mark.integration
def test_promote_moves_the_channel(s3_server, bucket, published, keys) -> None:
    result = run(published, "promote", "joe", "1.0", "--channel", "stable", "--public-key", str(keys.public))
    assert result.exit_code == 0, result.output
    assert "channel stable of joe: none -> 1.0" in result.stdout
    result = run(published, "promote", "joe", "1.1", "--channel", "stable")
    assert "1.0 -> 1.1" in result.stdout
    assert channel_of(s3_server, bucket, "stable") == "1.1"


@pytest.mark.integration
def test_promote_refuses_an_unpublished_version(published) -> None:
    result = run(published, "promote", "joe", "9.9", "--channel", "stable")
    assert result.exit_code == 1 and "has no manifest" in result.output


@pytest.mark.integration
def test_promote_refuses_a_missing_signature(s3_server, bucket, published) -> None:
    s3_server.client().delete_object(Bucket=bucket, Key=layout.signature_key("joe", "1.0"))
    result = run(published, "promote", "joe", "1.0", "--channel", "stable")
    assert result.exit_code == 1 and "manifest.json.sig is missing" in result.output


@pytest.mark.integration
def test_promote_refuses_a_signature_by_an_unknown_key(published, tmp_path) -> None:
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    result = run(published, "promote", "joe", "1.0", "--channel", "stable", "--public-key", str(tmp_path / "other.pub"))
    assert result.exit_code == 1 and "does not verify" in result.output


@pytest.mark.integration
def test_promote_refuses_a_truncated_object(s3_server, bucket, published) -> None:
    key = layout.object_key("joe", "1.0", "sub/weights.bin")
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"short")
    result = run(published, "promote", "joe", "1.0", "--channel", "stable")
    assert result.exit_code == 1 and "sub/weights.bin is 5 bytes" in result.output
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="channels/")
    assert "Contents" not in listing


# --------------------------------------------------------------------------- list


@pytest.mark.integration
def test_list_table_and_json(s3_server, bucket, published, model_dir) -> None:
    run(published, "promote", "joe", "1.1", "--channel", "canary")
    # A version whose publish never finished: objects but no manifest.
    s3_server.client().put_object(Bucket=bucket, Key=layout.object_key("joe", "2.0", "x.bin"), Body=b"x")

    table = run(published, "list")
    assert table.exit_code == 0
    for text in ("joe", "1.0", "1.1", "2.0", "incomplete", "canary", "3.0 MiB"):
        assert text in table.stdout

    doc = json.loads(run(published, "list", "--json").stdout)
    assert [m["name"] for m in doc] == ["joe"]
    assert doc[0]["channels"] == {"canary": "1.1"}
    versions = {v["version"]: v for v in doc[0]["versions"]}
    assert versions["1.0"]["state"] == "published" and versions["1.0"]["signed"] is True
    assert versions["1.0"]["files"] == 3
    assert versions["1.0"]["size"] == sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    assert versions["2.0"]["state"] == "incomplete"


@pytest.mark.integration
def test_list_of_an_empty_bucket(mirror_env) -> None:
    result = run(mirror_env, "list")
    assert result.exit_code == 0 and "no models" in result.stdout


# --------------------------------------------------------------------------- verify


@pytest.mark.integration
def test_verify_passes_on_an_intact_version(published, keys) -> None:
    result = run(published, "verify", "joe", "1.0", "--public-key", str(keys.public))
    assert result.exit_code == 0, result.output
    assert "3 files" in result.stdout and "all sha256 match" in result.stdout and "ed25519:" in result.stdout


@pytest.mark.integration
def test_verify_reports_every_mismatch(s3_server, bucket, published) -> None:
    client = s3_server.client()
    weights = layout.object_key("joe", "1.0", "sub/weights.bin")
    size = client.head_object(Bucket=bucket, Key=weights)["ContentLength"]
    client.put_object(Bucket=bucket, Key=weights, Body=b"\0" * size)  # same size, other bytes
    client.delete_object(Bucket=bucket, Key=layout.object_key("joe", "1.0", "config.json"))
    result = run(published, "verify", "joe", "1.0")
    assert result.exit_code == 1
    assert "MISMATCH sub/weights.bin: sha256" in result.stdout
    assert "MISMATCH config.json: missing" in result.stdout
    assert "2 problem(s)" in result.output


@pytest.mark.integration
def test_verify_checks_the_signature_with_a_key(s3_server, bucket, published, tmp_path) -> None:
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    result = run(published, "verify", "joe", "1.0", "--public-key", str(tmp_path / "other.pub"))
    assert result.exit_code == 1 and "does not verify" in result.stdout


@pytest.mark.integration
def test_verify_of_a_missing_version(published) -> None:
    result = run(published, "verify", "joe", "7.0")
    assert result.exit_code == 1 and "no manifest" in result.output


# --------------------------------------------------------------------------- keygen, import-piper


@pytest.mark.unit
def test_keygen_writes_a_private_key_0600(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["keygen", "--out-dir", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "k" / "mirror-signing.key").stat().st_mode) == 0o600
    assert "ed25519:" in result.stdout
    again = CliRunner().invoke(main, ["keygen", "--out-dir", str(tmp_path / "k")])
    assert again.exit_code == 1 and "already exists" in again.output


@pytest.mark.unit
def test_import_piper_usage_errors(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["import-piper", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    onnx = tmp_path / "v.onnx"
    onnx.write_bytes(b"x")
    result = CliRunner().invoke(main, ["import-piper", str(onnx), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2


@pytest.mark.unit
def test_import_piper_bad_onnx_is_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("piper_import")
    onnx, cfg = tmp_path / "v.onnx", tmp_path / "v.onnx.json"
    onnx.write_bytes(b"not an onnx graph")
    cfg.write_text("{}")
    result = CliRunner().invoke(main, ["import-piper", str(onnx), str(cfg), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("main: error: ") and "Traceback" not in result.output  # CliRunner: prog "main"


@pytest.mark.unit
def test_import_piper_bundled_voice(tmp_path: Path) -> None:
    piper_import = pytest.importorskip("piper_import")
    try:
        piper_import.bundled_voice_paths()
    except piper_import.PiperImportError as exc:
        pytest.skip(f"bundled voice unavailable: {exc}")
    result = CliRunner().invoke(main, ["import-piper", "--bundled", "--out", str(tmp_path / "joe")])
    assert result.exit_code == 0, result.output
    assert "tensors mapped" in result.stdout
    assert any((tmp_path / "joe").iterdir())
