"""Helpers for provisioner tests: run the CLI, read its status, a fresh cache with one
mirror. Putting models on the mirror and writing configs is tts_testkit.provisioner_setup
(bench/ uses it too)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tts_testkit.paths import VENV_BIN as BIN
from tts_testkit.provisioner_setup import make_keys, wait_status, write_config  # noqa: F401 (re-exported)


def run_cli(*args: str, config: Path | None = None, timeout: float = 120, env: dict | None = None,
            tool: str = "tts-provisioner") -> subprocess.CompletedProcess:
    cmd = [str(BIN / tool)]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, TTS_LOG_FORMAT="json", **(env or {})))


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def provisioner_env(tmp: Path, s3_server, bucket: str) -> dict:
    """Keys, credentials, one mirror and a config for a fresh cache under `tmp`."""
    keys = make_keys(tmp)
    creds = s3_server.write_credentials(tmp / "creds.toml")
    mirror = dict(name="primary", endpoint=s3_server.endpoint, bucket=bucket, credentials_file=creds)
    return dict(tmp=tmp, keys=keys, client=s3_server.client(), bucket=bucket, mirror=mirror, creds=creds,
                config=write_config(tmp, [mirror], keys), s3=s3_server)


def events(stderr: str, name: str) -> list[dict]:
    """The JSON log lines of `stderr` whose event is `name`."""
    out = []
    for line in stderr.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == name:
            out.append(doc)
    return out


def stop(proc, timeout: float = 30) -> None:
    """SIGTERM a daemon still running and reap it; SIGKILL if it is not gone in `timeout` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
