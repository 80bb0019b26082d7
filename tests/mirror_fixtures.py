"""Fixtures for the mirror CLI tests (a pytest plugin: tests/conftest.py registers it):
a signing key pair, the environment `tts-mirror` reads, a small model directory; and `run`,
which invokes the CLI in-process."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from mirror.cli import main
from mirror.signing import generate_keypair

MiB = 1024 * 1024


@pytest.fixture
def keys(tmp_path: Path) -> SimpleNamespace:
    generate_keypair(tmp_path / "keys" / "sign.key", tmp_path / "keys" / "sign.pub")
    return SimpleNamespace(private=tmp_path / "keys" / "sign.key", public=tmp_path / "keys" / "sign.pub")


@pytest.fixture
def mirror_env(s3_server, bucket, keys, tmp_path) -> dict[str, str]:
    """Everything `tts-mirror` needs, passed the documented way: environment variables."""
    creds = s3_server.write_credentials(tmp_path / "creds.toml")
    return {
        "TTS_MIRROR_ENDPOINT": s3_server.endpoint,
        "TTS_MIRROR_BUCKET": bucket,
        "TTS_MIRROR_CREDENTIALS": str(creds),
        "TTS_MIRROR_SIGNING_KEY": str(keys.private),
        "TTS_LOG_FORMAT": "json",
    }


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"sample_rate": 22050}\n')
    (d / "sub" / "weights.bin").write_bytes(os.urandom(3 * MiB + 17))
    (d / "empty.txt").write_bytes(b"")
    return d


def run(env: dict[str, str], *args: str):
    """`tts-mirror ARGS` in-process with `env`; a traceback in the output fails the test."""
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    assert "Traceback" not in result.output
    return result
