"""The README's main job (scripts/demo.py) end to end, once per local S3 server: publish
the bundled voice, sync it with aria2, serve it on a socket, synthesize a WAV."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import soundfile as sf

from tests.conftest import s3_kinds
from tts_testkit.paths import REPO

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", [k for k in s3_kinds() if k != "external"])
def test_demo_end_to_end(tmp_path, kind):
    out = tmp_path / "demo-out"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py")], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, TTS_DEMO_DIR=str(out), TTS_DEMO_S3=kind))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"starting a local S3 server ({kind})" in r.stderr
    assert f"snapshot: {out / 'cache' / 'snapshots' / 'joe' / '1.0.0'}" in r.stdout
    wav = out / "hello.wav"
    assert f"wav: {wav}" in r.stdout
    info = sf.info(str(wav))
    assert info.samplerate == 22050 and 3.0 < info.duration < 15.0, info
    secret = (out / "mirror-credentials.toml").read_text().split('secret_key = "')[1].split('"')[0]
    for log in out.glob("*.log"):
        assert secret not in log.read_text(errors="replace"), f"secret in {log.name}"


def test_demo_names_an_unknown_s3_server(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py")], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, TTS_DEMO_DIR=str(tmp_path / "d"), TTS_DEMO_S3="minio"))
    assert r.returncode != 0
    assert "TTS_DEMO_S3='minio' is not a known S3 server" in r.stderr
