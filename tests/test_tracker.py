"""The fleet's tracker: Debian's opentracker run with the role's configuration, fed the
whitelist `tts-mirror tracker-whitelist` writes from a real mirror.

The configuration is the role's template as shipped, rendered with jinja2; only its
`tracker.rootdir` line is pointed at the test's directory (the unit's is
/var/lib/tts-tracker). Announces are plain HTTP GETs, as aria2 sends them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirror.publish import publish_dir
from mirror.remote import Mirror
from mirror.signing import generate_keypair
from tts_testkit.tracker import NOT_AUTHORIZED, OPENTRACKER, announce, run_tracker

pytestmark = [pytest.mark.integration, pytest.mark.skipif(OPENTRACKER is None, reason="opentracker missing: run scripts/setup.sh (Debian package opentracker)")]


def test_tracker_serves_published_info_hashes_only(s3_server, bucket, tmp_path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    generate_keypair(tmp_path / "sign.key", tmp_path / "sign.pub")
    mirror = Mirror.connect(s3_server.endpoint, bucket, s3_server.credentials)
    publish_dir(model, name="joe", version="1.0", mirror=mirror, signing_key=tmp_path / "sign.key")
    btih = mirror.manifest("joe", "1.0")[0].file("weights.bin").btih
    assert btih

    with run_tracker() as tracker:
        # Not on the whitelist yet: refused.
        assert NOT_AUTHORIZED in announce(tracker.port, btih)
        env = {**os.environ, "TTS_MIRROR_ENDPOINT": s3_server.endpoint, "TTS_MIRROR_BUCKET": bucket,
               "TTS_MIRROR_CREDENTIALS": str(s3_server.write_credentials(tmp_path / "creds.toml"))}
        out = subprocess.run([str(Path(sys.executable).parent / "tts-mirror"), "tracker-whitelist", "--out",
                              str(tracker.rootdir / "whitelist.txt")], env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert (tracker.rootdir / "whitelist.txt").read_text() == btih + "\n"
        tracker.reload()
        tracker.wait_served([btih])
        assert b"peers" in announce(tracker.port, btih)
        # Anything else stays refused.
        assert NOT_AUTHORIZED in announce(tracker.port, "f" * 40)
