"""Models on a test mirror and a provisioner configured for it, for tests and benchmarks:
signing keys, deterministic file contents, objects put byte by byte, provisioner.toml.

Deliberately low-level (raw S3 puts) so tests can publish hostile or broken manifests that
`tts-mirror publish` would refuse to create.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from mirror import layout
from mirror.manifest import FileEntry, Manifest, channel_bytes
from mirror.signing import generate_keypair, load_private_key, sign


@dataclass
class Keys:
    private: Path
    public: Path


def make_keys(tmp: Path) -> Keys:
    keys = Keys(tmp / "mirror.key", tmp / "mirror.pub")
    generate_keypair(keys.private, keys.public)
    return keys


def model_files(seed: int, sizes: dict[str, int]) -> dict[str, bytes]:
    """Deterministic pseudo-random file contents."""
    out = {}
    for i, (path, size) in enumerate(sizes.items()):
        out[path] = (hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32 + 1))[:size]
    return out


def publish_raw(client, bucket: str, name: str, version: str, files: dict[str, bytes], keys: Keys | None,
                channel: str | None = "stable", manifest_bytes: bytes | None = None) -> Manifest | None:
    for path, data in files.items():
        client.put_object(Bucket=bucket, Key=layout.object_key(name, version, path), Body=data)
    manifest = None
    if manifest_bytes is None:
        manifest = Manifest.build(name, version, [
            FileEntry(path, len(data), hashlib.sha256(data).hexdigest()) for path, data in files.items()])
        manifest_bytes = manifest.to_bytes()
    client.put_object(Bucket=bucket, Key=f"models/{name}/{version}/manifest.json", Body=manifest_bytes)
    if keys is not None:
        sig = sign(manifest_bytes, load_private_key(keys.private))
        client.put_object(Bucket=bucket, Key=f"models/{name}/{version}/manifest.json.sig", Body=sig)
    if channel:
        set_channel(client, bucket, name, channel, version)
    return manifest


def set_channel(client, bucket: str, name: str, channel: str, version: str) -> None:
    client.put_object(Bucket=bucket, Key=layout.channel_key(name, channel), Body=channel_bytes(version))


def write_config(tmp: Path, mirrors: list[dict], keys: Keys | None, models: str = 'name = "joe"\nchannel = "stable"',
                 extra: str = "", aria2: str = "") -> Path:
    """Write tmp/provisioner.toml; each mirror dict: name, endpoint, bucket, credentials_file, priority.

    The rest is given as TOML text: `models` the body of the [[models]] entry (more entries
    after "[[models]]" lines), `extra` top-level keys and tables (its keys win over the
    defaults here, tables merge), `aria2` keys of the [aria2] table."""
    config = {
        "cache_dir": str(tmp / "cache"),
        "runtime_dir": str(tmp / "run"),
        "poll_interval": 1,
        "require_signature": keys is not None,
        "public_keys": [str(keys.public)] if keys else [],
        "disk_margin_mb": 1,
        "aria2": {"connections": 4, "min_split_size": "1M"},
        "mirrors": [{"name": m["name"], "endpoint": m["endpoint"], "bucket": m["bucket"],
                     "credentials_file": str(m["credentials_file"]), "priority": m.get("priority", 10)}
                    for m in mirrors],
        "models": tomllib.loads("[[models]]\n" + models)["models"],
    }
    _merge(config, tomllib.loads(extra))
    _merge(config, {"aria2": tomllib.loads(aria2)})
    path = tmp / "provisioner.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def wait_status(path: Path, predicate, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> dict:
    """Poll (bounded) a status.json until `predicate` holds; fail early if `proc` exits."""
    deadline, last = time.monotonic() + timeout, {}
    for _ in range(int(timeout * 10) + 1):
        try:
            last = json.loads(path.read_text())
            if predicate(last):
                return last
        except (OSError, ValueError):
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}: {proc.stderr.read()[-3000:] if proc.stderr else ''}")
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise AssertionError(f"status never matched within {timeout}s; last: {json.dumps(last)[:800]}")
